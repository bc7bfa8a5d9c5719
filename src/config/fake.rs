//! The `fake:` section of the daemon's config: the in-process fake backend's latency per
//! operation, its injected faults, and where it keeps its VM list (tests and benchmarks only).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The operations whose latency and faults can be configured. `boot` is the guest's time from
/// start to phone-home, `run` the command's run time, `upload` the runner's upload time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FakeOp {
    Clone,
    Start,
    Boot,
    AgentPing,
    Exec,
    ExecStatus,
    Run,
    Upload,
    Destroy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub min_ms: u64,
    pub max_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fault {
    /// Probability in [0, 1] that the operation fails.
    pub fail_rate: f64,
    /// The first N calls fail.
    pub fail_times: u32,
    /// The first N calls panic.
    pub panic_times: u32,
    /// The Nth call (counting from 1) panics, once; 0: none. Makes an actor crash in the middle of
    /// a phase that calls the operation repeatedly.
    pub panic_on_call: u32,
    /// Every call hangs forever.
    pub hang: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeConfig {
    pub latency: BTreeMap<FakeOp, Latency>,
    pub faults: BTreeMap<FakeOp, Fault>,
    /// The simulated command's exit code.
    pub exit_code: i32,
    /// The errors the simulated guest's cloud-init reports in its result.json.
    pub cloud_init_errors: Vec<String>,
    /// Where the fake keeps its VM list, so leaks survive a daemon restart. None: memory only.
    pub state_file: Option<PathBuf>,
    /// What `disk_usage` reports. None: the trait's default (thick, nothing measured).
    pub disk: Option<FakeDisk>,
    /// What `memory_usage` reports for every running VM. None: nothing measured.
    pub memory: Option<FakeMemory>,
    /// A test plays every guest over the real guest API: nothing is simulated after a VM starts
    /// (no phone-home, the runner runs until its VM is destroyed), and each new VM's provisioning,
    /// tokens included, is appended to this file as one JSON line (`FakeProvisioning`).
    pub external_guest: Option<PathBuf>,
}

/// What a test playing a guest learns of its VM: one line of `external_guest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeProvisioning {
    pub name: String,
    pub job_id: String,
    pub guest_url: String,
    pub phone_home_url: String,
    pub bootstrap_token: String,
}

/// What every running fake VM holds in host memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMemory {
    pub pss_bytes: u64,
    pub rss_bytes: u64,
}

/// The fake's storage: thin or thick, and what every VM's disk takes on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeDisk {
    pub thin: bool,
    /// Bytes each VM's disk occupies.
    pub allocated_bytes: u64,
}

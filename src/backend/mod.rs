//! The seam between the lifecycle and the machines: the `Backend` trait every backend (local QEMU,
//! Proxmox, the in-process fake) implements, and the types that cross it.
//!
//! Contract for implementors:
//! - Every operation is idempotent for a given VM name, because a restarted SandboxActor re-runs the
//!   phase it was in. `clone_vm` for a name that already exists returns that VM instead of making a
//!   second one; `start_vm` on a running VM succeeds; `destroy_vm` on a missing VM succeeds.
//! - Operations may be cancelled at any await point (the lifecycle drops the future on a phase
//!   timeout or a cancel) and must leave nothing that a later `destroy_vm` cannot remove.
//! - Blocking work (child processes, file IO of any size) runs off the async executor threads.

pub mod fake;
pub mod templates;

pub use crate::config::backends::{BackendKind, NetworkMode};
pub use crate::model::StartMode;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// What the guest's cloud-init receives.
#[derive(Clone, PartialEq, Eq)]
pub struct CloudInitSpec {
    pub hostname: String,
    /// The URL the guest phones home to when boot is done.
    pub phone_home_url: String,
    /// The daemon's guest endpoint, as the guest reaches it.
    pub guest_url: String,
    /// One-time token the runner redeems for its job spec.
    pub bootstrap_token: String,
}

/// The daemon's runner as a guest fetches it: `GET url` with the bearer `token`, installed only
/// if its sha256 is `sha256`.
#[derive(Clone, PartialEq, Eq)]
pub struct RunnerFetch {
    pub url: String,
    pub token: String,
    pub sha256: String,
}

impl std::fmt::Debug for RunnerFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerFetch")
            .field("url", &self.url)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl std::fmt::Debug for CloudInitSpec {
    // Tokens never reach logs, so the Debug form leaves them out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudInitSpec")
            .field("hostname", &self.hostname)
            .field("guest_url", &self.guest_url)
            .finish_non_exhaustive()
    }
}

/// Everything a backend needs to create one sandbox VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    pub job_id: String,
    /// The VM's name, `sandbox-…`; stable across actor restarts.
    pub name: String,
    /// The profile's template: an image name for qemu, a VMID for pve.
    pub template: String,
    pub cores: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub network: NetworkMode,
    /// What a job's guest gets at boot. None for a pool sandbox, booted before any job: its seed
    /// names only its hostname (and the runner's fetch), and the job that takes it gets its
    /// identity through the guest agent.
    pub cloud_init: Option<CloudInitSpec>,
    /// Where the guest fetches the daemon's runner, when the daemon serves one: a job's sandbox
    /// and a pool sandbox alike (each with a token of its own), and the template VM of the
    /// snapshot it makes.
    pub runner: Option<RunnerFetch>,
    /// The daemon's instance id (`crate::instance`), which the VM carries so that a restarted
    /// daemon tells its own VMs from everyone else's.
    pub owner: String,
    /// How the job asked the sandbox to start. With `Snapshot`, a restore that fails fails the
    /// start; otherwise the backend falls back to a cold boot.
    pub start: StartMode,
    /// The snapshot to restore the sandbox from (an id `snapshot_status` gave); None boots cold.
    pub restore_from: Option<String>,
}

/// A template snapshot a backend can restore sandboxes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// How long making it took, from the template VM's launch until it was saved.
    pub made_seconds: f64,
    /// What its files take on the host: the guest's RAM (sparse), device state, disk.
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub disk_bytes: u64,
    /// The template VM's cloud-init result.json, as read when the snapshot was made.
    pub cloud_init_result: Option<String>,
}

/// Whether the snapshot a sandbox would be restored from exists.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotStatus {
    Ready(SnapshotInfo),
    /// Not made yet (or discarded): `make_snapshot` makes it under this id.
    Missing {
        id: String,
    },
}

/// How a VM started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartReport {
    /// The snapshot the VM was restored from; None for a cold boot.
    pub restored_from: Option<String>,
    /// What the lifecycle should tell the job's events (a restore that fell back, say).
    pub notes: Vec<String>,
}

impl StartReport {
    pub fn cold() -> StartReport {
        StartReport::default()
    }
}

/// A VM the backend made, as the store records it. `vm_ref` is backend-specific (a VMID for pve,
/// the sandbox directory for qemu) and enough to find the VM again after a daemon restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandle {
    pub name: String,
    pub vm_ref: String,
}

/// A VM as `list_vms` reports it: its handle and the instance id it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedVm {
    pub vm: VmHandle,
    /// The owner recorded with the VM (`SandboxSpec::owner` at its clone); None when it carries
    /// none, as a VM made by hand does.
    pub owner: Option<String>,
}

/// A command to start in the guest through the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommand {
    pub path: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Bytes for the command's stdin, which is closed after them (the guest sees EOF). None
    /// leaves the agent's own stdin to the command.
    pub stdin: Option<GuestInput>,
}

/// What a guest command reads on its stdin. It can carry a token, so Debug shows only its size.
#[derive(Clone, PartialEq, Eq)]
pub struct GuestInput(Vec<u8>);

impl GuestInput {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        GuestInput(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for GuestInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestInput(<{} bytes>)", self.0.len())
    }
}

/// What the guest agent reports of a command it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStatus {
    Running,
    Exited { code: i32 },
    Signalled { signal: i32 },
}

/// Whether a VM exists and runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Stopped,
    Missing,
}

/// How a backend's storage provisions sandbox disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    /// A disk takes its whole virtual size when it is made (plain LVM, preallocated files), or
    /// the backend cannot tell: the governor counts virtual sizes.
    #[default]
    Thick,
    /// A disk takes only what the guest has written (qcow2 overlays, LVM-thin, ZFS zvols): the
    /// governor counts what each disk really takes plus a growth reserve.
    Thin,
}

/// What the backend's sandbox disks really take on its storage, measured once for all VMs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub provisioning: Provisioning,
    /// Bytes each live VM's disks occupy on the storage, by VM name. A VM the storage could not
    /// measure is left out (it counts as having written nothing yet).
    pub allocated: HashMap<String, u64>,
}

impl DiskUsage {
    /// What a backend that cannot tell reports: thick, nothing measured.
    pub fn thick() -> DiskUsage {
        DiskUsage::default()
    }
}

/// What one live VM's process really holds in host memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMemory {
    /// Proportional set size: each page counted once across every process that maps it, so pages
    /// shared with other clones of the same template snapshot count a share each. What it costs.
    pub pss_bytes: u64,
    /// Resident set size: every page it maps, shared or not.
    pub rss_bytes: u64,
}

/// What the backend's live VMs really hold in host memory, measured once for all VMs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUsage {
    /// By VM name. A VM that is not running, or that the backend cannot measure, is left out.
    pub by_vm: HashMap<String, VmMemory>,
}

impl MemoryUsage {
    /// Sum of the measured VMs' PSS.
    pub fn total_pss_bytes(&self) -> u64 {
        self.by_vm.values().map(|m| m.pss_bytes).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("VM {0} does not exist")]
    Missing(String),
    #[error("guest agent not responding: {0}")]
    AgentUnavailable(String),
    #[error("{operation} failed: {message}")]
    Operation {
        operation: &'static str,
        message: String,
    },
    #[error("{operation} timed out after {seconds:.0}s")]
    Timeout {
        operation: &'static str,
        seconds: f64,
    },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    pub fn operation(operation: &'static str, message: impl Into<String>) -> Self {
        BackendError::Operation {
            operation,
            message: message.into(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }
}

#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// The vCPUs and memory (MB) a VM asked to have `cores` and `memory_mb` really gets here: a
    /// backend may clamp a profile's size to the host. The ResourceGovernor budgets with this.
    fn effective_size(&self, cores: u32, memory_mb: u64) -> (u32, u64) {
        (cores, memory_mb)
    }

    /// Creates the VM (linked clone, cloud-init seed, resources) without starting it.
    async fn clone_vm(&self, spec: &SandboxSpec) -> Result<VmHandle, BackendError>;

    /// Boots the VM, or restores it when it was cloned with `restore_from`. On a running VM it
    /// reports how that VM started.
    async fn start_vm(&self, vm: &VmHandle) -> Result<StartReport, BackendError>;

    /// One guest-agent round trip (sync + ping). Fails fast when the agent is not up yet.
    async fn agent_ping(&self, vm: &VmHandle) -> Result<(), BackendError>;

    /// Starts a command in the guest and returns its pid without waiting for it.
    async fn exec(&self, vm: &VmHandle, command: &GuestCommand) -> Result<i64, BackendError>;

    async fn exec_status(&self, vm: &VmHandle, pid: i64) -> Result<ExecStatus, BackendError>;

    /// A small guest file, read through the guest agent: None if it does not exist; an error if
    /// it is larger than `limit` bytes.
    async fn read_guest_file(
        &self,
        vm: &VmHandle,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, BackendError>;

    /// Checks a whole-disk image and registers it as a template that boots by firmware
    /// (`agentlab template import`). Only the local QEMU backend keeps templates of its own.
    async fn import_template(
        &self,
        request: &templates::TemplateImportRequest,
    ) -> Result<templates::ImportOutcome, BackendError> {
        let _ = request;
        Err(BackendError::InvalidInput(format!(
            "the {} backend does not import templates: only the local QEMU backend does (on \
             Proxmox VE, make a template VM with scripts/create_template.sh)",
            self.kind().as_str()
        )))
    }

    /// Stops the VM and removes everything that belongs to it. Succeeds if it is already gone.
    async fn destroy_vm(&self, vm: &VmHandle) -> Result<(), BackendError>;

    async fn vm_state(&self, vm: &VmHandle) -> Result<VmState, BackendError>;

    /// Every VM this backend holds whose name carries `model::VM_NAME_PREFIX`, with its owner.
    async fn list_vms(&self) -> Result<Vec<ListedVm>, BackendError>;

    /// The VM made under `name`, if any. A backend whose clone can outlive its cancelled caller
    /// (pve's `qm clone` in a blocking thread) waits for that clone first, so that what it makes
    /// is found and never lingers.
    async fn find_vm(&self, name: &str) -> Result<Option<ListedVm>, BackendError> {
        Ok(self
            .list_vms()
            .await?
            .into_iter()
            .find(|listed| listed.vm.name == name))
    }

    /// Whether this backend can start a sandbox by restoring a template snapshot
    /// (`StartMode::Snapshot`); the others boot every sandbox cold.
    fn snapshot_starts(&self) -> bool {
        false
    }

    /// The snapshot a sandbox of `spec` would be restored from, if it exists.
    async fn snapshot_status(&self, spec: &SandboxSpec) -> Result<SnapshotStatus, BackendError> {
        let _ = spec;
        Err(BackendError::InvalidInput(format!(
            "the {} backend has no snapshot starts",
            self.kind().as_str()
        )))
    }

    /// Makes the snapshot for `spec`'s template and shape (booting a template VM once), or
    /// returns it when it exists. Concurrent calls for one snapshot share one making, which
    /// goes on to its end when a caller gives up.
    async fn make_snapshot(&self, spec: &SandboxSpec) -> Result<SnapshotInfo, BackendError> {
        let _ = spec;
        Err(BackendError::InvalidInput(format!(
            "the {} backend has no snapshot starts",
            self.kind().as_str()
        )))
    }

    /// The accelerator VMs run with, once known (`kvm`, `tcg`); None where the backend does not
    /// choose one or has not decided yet.
    fn accelerator(&self) -> Option<&'static str> {
        None
    }

    /// Removes what the backend keeps outside its VMs (the Proxmox backend's cloud-init snippets)
    /// for VMs that no longer exist, and names what it removed. The reconciler calls it after a
    /// restart and on every pass; backends that keep everything inside the VM have nothing to do.
    async fn sweep(&self) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }

    /// How this backend's storage provisions disks, and what each live VM's disks really take
    /// there, in one measurement for all VMs (the governor asks once per admission round). The
    /// default is thick with nothing measured, which keeps the governor counting virtual sizes.
    async fn disk_usage(&self) -> Result<DiskUsage, BackendError> {
        Ok(DiskUsage::thick())
    }

    /// What each live VM really holds in host memory (for status and metrics, not admission: a
    /// sandbox's `memory_mb` is what it is committed, which the budget keeps counting). Cheap
    /// enough to call per status request; a backend whose measurement is not caches it. The
    /// default measures nothing.
    async fn memory_usage(&self) -> Result<MemoryUsage, BackendError> {
        Ok(MemoryUsage::default())
    }
}

pub type SharedBackend = Arc<dyn Backend>;

/// How a backend reports what the guest does on its own (the fake backend simulates a guest and
/// reports through this; real guests report over the guest HTTP endpoint, which calls the same sink).
#[async_trait]
pub trait GuestSink: Send + Sync + std::fmt::Debug {
    async fn phoned_home(&self, job_id: &str);
    async fn command_exited(&self, job_id: &str, exit_code: i32);
    async fn uploads_done(&self, job_id: &str);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_input_debug_shows_only_its_size() {
        let command = GuestCommand {
            path: "/usr/local/bin/agentlab-runner".into(),
            args: vec!["identity".into()],
            env: Default::default(),
            stdin: Some(GuestInput::new(r#"{"token":"secret-token"}"#)),
        };
        let text = format!("{command:?}");
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("GuestInput(<24 bytes>)"), "{text}");
    }
}

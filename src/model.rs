//! Domain types shared by the store, the actors, the HTTP API and the CLI: jobs, sandboxes, their
//! lifecycle phases and statuses, and the events they record.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Name prefix of every VM the daemon creates; reconciliation only ever touches VMs carrying it.
pub const VM_NAME_PREFIX: &str = "sandbox-";

#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct ParseEnumError {
    kind: &'static str,
    value: String,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseEnumError { kind: $kind, value: s.to_owned() }),
                }
            }
        }
    };
}

string_enum!(
    /// Where a job stands. Everything but QUEUED and RUNNING is terminal.
    JobStatus, "job status", {
        Queued => "QUEUED",
        Running => "RUNNING",
        Completed => "COMPLETED",
        Failed => "FAILED",
        Timeout => "TIMEOUT",
        Cancelled => "CANCELLED",
    }
);

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }
}

string_enum!(
    /// The sandbox lifecycle, in order. Each phase has its own timeout.
    Phase, "phase", {
        Clone => "clone",
        Start => "start",
        CloudInit => "cloud_init",
        GuestAgent => "guest_agent",
        Run => "run",
        Upload => "upload",
        Destroy => "destroy",
    }
);

impl Phase {
    /// The phases before the job's command runs; together they make up provisioning.
    pub const PROVISIONING: &'static [Phase] = &[
        Phase::Clone,
        Phase::Start,
        Phase::CloudInit,
        Phase::GuestAgent,
    ];

    pub fn next(self) -> Option<Phase> {
        let all = Phase::ALL;
        let at = all.iter().position(|p| *p == self)?;
        all.get(at + 1).copied()
    }

    pub fn is_provisioning(self) -> bool {
        Phase::PROVISIONING.contains(&self)
    }

    /// The sandbox state a VM is in while this phase runs.
    pub fn sandbox_state(self) -> SandboxState {
        match self {
            Phase::Clone | Phase::Start => SandboxState::Provisioning,
            Phase::CloudInit | Phase::GuestAgent => SandboxState::Booting,
            Phase::Run => SandboxState::Running,
            Phase::Upload => SandboxState::Uploading,
            Phase::Destroy => SandboxState::Destroying,
        }
    }
}

string_enum!(
    /// Where a sandbox (one VM) stands. DESTROYED is the only terminal state.
    SandboxState, "sandbox state", {
        Provisioning => "PROVISIONING",
        Booting => "BOOTING",
        Ready => "READY",
        Running => "RUNNING",
        Uploading => "UPLOADING",
        Kept => "KEPT",
        Destroying => "DESTROYING",
        Destroyed => "DESTROYED",
    }
);

/// What a client asks for when it submits a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub profile: String,
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_minutes: Option<u32>,
    /// Overrides the tuning's run-phase timeout for this job (it can only shorten it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_timeout_seconds: Option<u64>,
    /// The job fails rather than start after this many seconds in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_seconds: Option<u64>,
    /// How the sandbox starts: restored from a template snapshot, booted cold, or whichever
    /// the host can do (the default).
    #[serde(default, skip_serializing_if = "StartMode::is_auto")]
    pub start: StartMode,
    /// Fetch the agent's changes into the host repository as branch `agentlab/JOB`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_branch: bool,
}

/// True for a repo that a guest clones itself rather than the daemon bundling it.
pub fn is_remote_repo(repo: &str) -> bool {
    repo.contains("://") || (repo.contains('@') && repo.contains(':') && !repo.starts_with('/'))
}

impl JobRequest {
    /// The job's repository if it is one on the daemon's host (not a URL the guest clones).
    pub fn host_repo(&self) -> Option<&str> {
        self.repo.as_deref().filter(|repo| !is_remote_repo(repo))
    }
}

/// How a job's sandbox starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartMode {
    /// Restored from a snapshot where one exists for the sandbox's shape or can be made; a cold
    /// boot otherwise.
    #[default]
    Auto,
    /// A full boot of the template, as before snapshots.
    Cold,
    /// Restored from a snapshot, or the job fails.
    Snapshot,
}

impl StartMode {
    pub const ALL: &'static [StartMode] = &[StartMode::Auto, StartMode::Cold, StartMode::Snapshot];

    pub fn is_auto(&self) -> bool {
        *self == StartMode::Auto
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            StartMode::Auto => "auto",
            StartMode::Cold => "cold",
            StartMode::Snapshot => "snapshot",
        }
    }

    /// The valid values, for messages: `auto, cold, snapshot`.
    pub fn valid_values() -> String {
        StartMode::ALL
            .iter()
            .map(StartMode::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for StartMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StartMode {
    type Err = ParseEnumError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StartMode::ALL
            .iter()
            .copied()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| ParseEnumError {
                kind: "start mode",
                value: s.to_owned(),
            })
    }
}

// By hand rather than derived: serde's message for an unknown variant does not say which field
// it is about, and a job request has several.
impl<'de> Deserialize<'de> for StartMode {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct StartModeVisitor;

        impl serde::de::Visitor<'_> for StartModeVisitor {
            type Value = StartMode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "`start` as one of {}", StartMode::valid_values())
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<StartMode, E> {
                value.parse().map_err(|_| {
                    E::custom(format!(
                        "`start` must be one of {}, not `{value}`",
                        StartMode::valid_values()
                    ))
                })
            }
        }

        de.deserialize_str(StartModeVisitor)
    }
}

string_enum!(
    /// How a sandbox really started, once it has: booted cold, or restored from a snapshot.
    StartMethod, "start method", {
        Cold => "cold",
        Restored => "restored",
    }
);

/// How long one phase of one attempt took, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRun {
    pub phase: Phase,
    pub started_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// A job as the API shows it. The request's `env` values are never shown: they may be secrets; nor
/// are the credentials of a repo URL (`repo` is `https://***@host/x.git`, `secrets::url`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub profile: String,
    pub task: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    pub env_keys: Vec<String>,
    pub artifacts: Vec<String>,
    /// How the job asked its sandbox to start.
    #[serde(default)]
    pub start: StartMode,
    pub status: JobStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub restarts: u32,
    pub created_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseRun>,
    /// Whether the job asked for its changes as a branch of its host repository.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_branch: bool,
    /// What the agent changed in its host repository's checkout, once the job has uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<JobChanges>,
}

/// Cloud-init's verdict on the last cold boot of a template, as `GET /v1/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateCheck {
    pub backend: String,
    /// The profile's `image` (empty: the backend's default template).
    pub template: String,
    /// The job whose boot it was.
    pub job_id: String,
    pub checked_at_ms: i64,
    /// Empty when cloud-init reported none.
    pub errors: Vec<String>,
}

/// What a job's agent changed in the checkout of its host repository: its commits (and the
/// runner's commit of what it left uncommitted) against the commit the checkout started at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobChanges {
    pub commits: u64,
    pub files: u64,
    pub insertions: u64,
    pub deletions: u64,
    /// The branch of the host repository that holds them, when the job asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Why the change could not be read or its branch made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl JobChanges {
    /// The event's words: `2 commits, 3 files changed (+10 -2); branch agentlab/JOB`.
    pub fn summary(&self, branch_asked: bool) -> String {
        let changes = self;
        let mut text = if changes.commits == 0 && changes.error.is_none() {
            "the agent left the repository unchanged".to_owned()
        } else {
            format!(
                "{} commit{}, {} file{} changed (+{} -{})",
                changes.commits,
                plural(changes.commits),
                changes.files,
                plural(changes.files),
                changes.insertions,
                changes.deletions
            )
        };
        if let Some(branch) = &changes.branch {
            text.push_str(&format!("; branch {branch} in the host repository"));
        } else if branch_asked && changes.commits == 0 && changes.error.is_none() {
            text.push_str("; no branch made");
        }
        if let Some(error) = &changes.error {
            text.push_str(&format!("; {error}"));
        }
        text
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A sandbox (one VM) as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub job_id: String,
    pub backend: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_ref: Option<String>,
    pub state: SandboxState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    pub profile: String,
    pub cores: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub keepalive: bool,
    pub lease_expires_at_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How the VM started, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_method: Option<StartMethod>,
    /// The snapshot it was restored from (`start_method: restored`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Booted ahead of its job in the warm pool, which the job then took.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_pool: bool,
}

/// A sandbox of the warm pool: booted ahead of any job for its profile, waiting READY until an
/// admitted job takes it (then it becomes that job's sandbox) or it is replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSandbox {
    pub id: String,
    pub profile: String,
    pub backend: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_ref: Option<String>,
    /// BOOTING while its phases run, READY once its guest agent answers, DESTROYING on its way out.
    pub state: SandboxState,
    pub cores: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub created_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at_ms: Option<i64>,
    /// The boot phases done so far, as the job that takes it will list them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_method: Option<StartMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PoolSandbox {
    /// A pool sandbox about to boot, as an admission round writes its row: `size` is (vCPUs,
    /// memory MB, disk GB).
    pub fn booting(
        id: String,
        profile: &str,
        backend: &str,
        (cores, memory_mb, disk_gb): (u32, u64, u64),
        created_at_ms: i64,
    ) -> PoolSandbox {
        PoolSandbox {
            id,
            profile: profile.to_owned(),
            backend: backend.to_owned(),
            vm_ref: None,
            state: SandboxState::Booting,
            cores,
            memory_mb,
            disk_gb,
            created_at_ms,
            ready_at_ms: None,
            phases: Vec::new(),
            start_method: None,
            snapshot_id: None,
            error: None,
        }
    }
}

/// One entry in a job's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub job_id: String,
    pub at_ms: i64,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    pub message: String,
}

/// An artifact collected from a job's checkout and stored by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub job_id: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub created_at_ms: i64,
}

/// How much of a job's artifact quota its stored artifacts use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArtifactUsage {
    pub files: u64,
    pub bytes: u64,
}

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// A new, time-ordered id, so ids sort by creation.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A fresh VM name for a pool sandbox. The `p` after the prefix is no hex digit, so it never
/// equals a job's sandbox name.
pub fn new_pool_sandbox_name() -> String {
    let id = new_id();
    format!("{VM_NAME_PREFIX}p{}", &id[id.len().saturating_sub(11)..])
}

/// The VM name of a job's sandbox. Deterministic, so a restarted actor finds the VM it cloned.
pub fn sandbox_name_for(job_id: &str) -> String {
    let tail = &job_id[job_id.len().saturating_sub(12)..];
    format!("{VM_NAME_PREFIX}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_text() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), *status);
        }
        for phase in Phase::ALL {
            assert_eq!(phase.as_str().parse::<Phase>().unwrap(), *phase);
        }
        assert!("BOGUS".parse::<JobStatus>().is_err());
        for mode in StartMode::ALL {
            assert_eq!(mode.as_str().parse::<StartMode>().unwrap(), *mode);
        }
        for method in StartMethod::ALL {
            assert_eq!(method.as_str().parse::<StartMethod>().unwrap(), *method);
        }
    }

    #[test]
    fn a_job_request_reads_start_and_names_the_field_when_it_is_wrong() {
        let parse = |body: &str| serde_json::from_str::<JobRequest>(body);
        let base = r#"{"profile": "balanced", "task": "t""#;
        assert_eq!(parse(&format!("{base}}}")).unwrap().start, StartMode::Auto);
        for mode in StartMode::ALL {
            let body = format!(r#"{base}, "start": "{mode}"}}"#);
            assert_eq!(parse(&body).unwrap().start, *mode);
        }
        let err = parse(&format!(r#"{base}, "start": "warm"}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`start` must be one of auto, cold, snapshot, not `warm`"),
            "{err}"
        );
        let err = parse(&format!(r#"{base}, "start": 1}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`start` as one of auto, cold, snapshot"),
            "{err}"
        );
        // The default is left out, so a request stored before start existed reads the same.
        let auto = JobRequest {
            profile: "balanced".into(),
            task: "t".into(),
            ..JobRequest::default()
        };
        assert!(!serde_json::to_string(&auto).unwrap().contains("start"));
        let cold = JobRequest {
            start: StartMode::Cold,
            ..auto
        };
        assert!(serde_json::to_string(&cold)
            .unwrap()
            .contains(r#""start":"cold""#));
    }

    #[test]
    fn phases_run_in_lifecycle_order() {
        assert_eq!(Phase::Clone.next(), Some(Phase::Start));
        assert_eq!(Phase::Upload.next(), Some(Phase::Destroy));
        assert_eq!(Phase::Destroy.next(), None);
        assert!(Phase::GuestAgent.is_provisioning());
        assert!(!Phase::Run.is_provisioning());
    }

    #[test]
    fn sandbox_names_are_stable_and_prefixed() {
        let id = new_id();
        assert_eq!(sandbox_name_for(&id), sandbox_name_for(&id));
        assert!(sandbox_name_for(&id).starts_with(VM_NAME_PREFIX));
        let pooled = new_pool_sandbox_name();
        assert!(pooled.starts_with(VM_NAME_PREFIX), "{pooled}");
        assert_eq!(pooled.len(), sandbox_name_for(&id).len());
        assert_ne!(pooled, new_pool_sandbox_name());
        assert!(!JobStatus::Running.is_terminal());
        assert!(JobStatus::Cancelled.is_terminal());
    }

    #[test]
    fn summarises_changes_branches_and_errors() {
        let changes = JobChanges {
            commits: 2,
            files: 1,
            insertions: 10,
            deletions: 2,
            branch: Some("agentlab/j1".into()),
            error: None,
        };
        assert_eq!(
            changes.summary(true),
            "2 commits, 1 file changed (+10 -2); branch agentlab/j1 in the host repository"
        );
        assert_eq!(
            JobChanges::default().summary(true),
            "the agent left the repository unchanged; no branch made"
        );
        let failed = JobChanges {
            error: Some("the result bundle is refused: it is not a git bundle".into()),
            ..JobChanges::default()
        };
        assert_eq!(
            failed.summary(false),
            "0 commits, 0 files changed (+0 -0); the result bundle is refused: it is not a git bundle"
        );
    }
}

//! Making one template snapshot: boot the template in a VM whose RAM is the snapshot's memory
//! file (mapped shared), wait until its guest is fully up (guest agent answering, cloud-init's
//! `result.json` written; no job), check that the runner its seed fetched is there, pause it and
//! save its device state, quit, and publish the folder. See `snapshot` for what the files are.
//!
//! Everything happens in `<id>.building/`; only a whole snapshot is renamed to `<id>/`. A making
//! that fails removes its folder and stops its VM; one cut short by a daemon crash leaves the
//! folder, which the backend's sweep clears on the next start.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::accel::Accelerator;
use super::files::{create_private_dir, create_private_dir_all, remove_dir_all, write_file};
use super::launch::{self, GuestMemory, LaunchPlan};
use super::layout::{self, SandboxPaths, SandboxRecord};
use super::migration;
use super::overlay;
use super::process;
use super::qga::{ExecRequest, ExecStatusReply, QgaClient, QgaError};
use super::qmp::QmpClient;
use super::seed::{self, SeedError, SeedTools};
use super::snapshot::{SnapshotFiles, SnapshotManifest, SnapshotShape};
use crate::backend::RunnerFetch;
use crate::backend::{BackendError, StartMode};
use crate::cloudinit;
use crate::config::qemu::QemuConfig;
use crate::model::now_ms;

/// Where the guest says cloud-init is done (docs/guest-contract.md).
const CLOUD_INIT_RESULT: &str = "/run/cloud-init/result.json";

/// The hostname of every template VM; a restored sandbox gets its own through the agent.
const TEMPLATE_HOSTNAME: &str = "sandbox-snapshot";

/// How often the template VM's guest is asked whether it is up.
const UP_POLL: Duration = Duration::from_millis(200);

/// Run in the template VM once it is up, so that what every job's first seconds read (the
/// runner, git, their libraries) is in the guest's page cache when it is saved: each restored
/// sandbox then finds it in the shared RAM instead of reading it through its disk. A template
/// without them still snapshots; the warm-up is only a speed-up.
const WARM_UP: &str = "cat /usr/local/bin/agentlab-runner /usr/lib/git-core/git >/dev/null 2>&1; \
                       /usr/local/bin/agentlab-runner --version >/dev/null 2>&1; \
                       git --version >/dev/null 2>&1";

/// How long the warm-up may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long checking the fetched runner's digest may take (hashing a few megabytes).
const RUNNER_CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of the guest's words (cloud-init's errors, sha256sum's output) a refusal quotes.
const QUOTED_CHARS: usize = 600;

/// How long saving the device state may take (about a megabyte; it takes milliseconds).
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a making needs, owned, so it can run in a task of its own that outlives its callers.
#[derive(Debug, Clone)]
pub struct SnapshotMaker {
    pub config: QemuConfig,
    pub snapshots_dir: std::path::PathBuf,
    pub guest_endpoint: SocketAddr,
    pub owner: Option<String>,
}

impl SnapshotMaker {
    /// Makes the snapshot of `shape`, booted with `accel`, replacing any residue of an earlier
    /// attempt. The caller makes sure no other making of the same id runs.
    pub async fn make(
        &self,
        shape: &SnapshotShape,
        accel: Accelerator,
        runner: Option<&RunnerFetch>,
    ) -> Result<SnapshotManifest, BackendError> {
        let id = shape.id();
        let building = SnapshotFiles::building(&self.snapshots_dir, &id);
        let started = Instant::now();
        self.clear(&building).await?;
        let result = self.build(shape, accel, runner, &building, started).await;
        if result.is_err() {
            if let Err(e) = self.clear(&building).await {
                tracing::warn!(snapshot = %id, error = %e, "cannot clear a failed snapshot's folder");
            }
        }
        let manifest = result?;
        let finished = SnapshotFiles::new(&self.snapshots_dir, &id);
        // A finished folder of the same id here was discarded while this one was made.
        remove_dir_all(&finished.dir).await?;
        tokio::fs::rename(&building.dir, &finished.dir)
            .await
            .map_err(|e| BackendError::io(format!("publishing {}", finished.dir.display()), e))?;
        tracing::info!(
            snapshot = %id,
            seconds = manifest.made_seconds,
            memory_bytes = manifest.memory_bytes,
            state_bytes = manifest.state_bytes,
            "template snapshot made"
        );
        Ok(manifest)
    }

    /// Stops the VM of a building folder and removes the folder.
    pub async fn clear(&self, building: &SnapshotFiles) -> Result<(), BackendError> {
        process::stop(&building.vm(), self.config.stop_grace).await?;
        remove_dir_all(&building.dir).await
    }

    async fn build(
        &self,
        shape: &SnapshotShape,
        accel: Accelerator,
        runner: Option<&RunnerFetch>,
        building: &SnapshotFiles,
        started: Instant,
    ) -> Result<SnapshotManifest, BackendError> {
        let id = shape.id();
        let vm = building.vm();
        create_private_dir_all(&self.snapshots_dir).await?;
        create_private_dir(&building.dir).await?;
        // First, so that even the residue of a making cut short says whose it is.
        write_file(
            &building.owner(),
            self.owner.as_deref().unwrap_or_default().as_bytes(),
        )
        .await?;
        overlay::create(
            &self.config.qemu_img_binary,
            &shape.template.root_disk,
            &building.disk(),
            shape.disk_bytes,
            self.config.tool_timeout,
        )
        .await?;
        let seed_files =
            cloudinit::render_template(&format!("snapshot-{id}"), TEMPLATE_HOSTNAME, runner)
                .map_err(|e| BackendError::InvalidInput(e.to_string()))?;
        let tools = SeedTools {
            mkfs_vfat: self.config.mkfs_vfat_binary.clone(),
            mcopy: self.config.mcopy_binary.clone(),
            timeout: self.config.tool_timeout,
        };
        seed::write_image(&seed_files, &vm.seed_image(), &vm.seed_staging(), &tools)
            .await
            .map_err(|e| match e {
                SeedError::Io { context, source } => BackendError::io(context, source),
                other => BackendError::operation("snapshot", other.to_string()),
            })?;

        let record = SandboxRecord {
            name: format!("snapshot-{id}"),
            job_id: String::new(),
            created_ms: now_ms(),
            template: shape.template.clone(),
            cores: shape.cores,
            memory_mb: shape.memory_mb,
            disk_gb: shape.disk_bytes >> 30,
            network: shape.network,
            owner: self.owner.clone(),
            restore: None,
            start: StartMode::Cold,
        };
        let memory_file = building.memory();
        let plan = LaunchPlan {
            qemu_binary: &self.config.qemu_binary,
            socat_binary: &self.config.socat_binary,
            paths: &vm,
            record: &record,
            accel,
            guest_endpoint: self.guest_endpoint,
            memory: GuestMemory::SnapshotTemplate {
                memory_file: &memory_file,
            },
        };
        launch::launch(&plan, self.config.tool_timeout).await?;
        let cloud_init_result = self.wait_until_up(&vm).await?;
        if let Some(runner) = runner {
            self.check_runner(&vm, runner, &cloud_init_result).await?;
        }
        self.warm_up(&vm).await;

        let mut qmp = QmpClient::connect(&vm.qmp_socket(), Duration::from_secs(5))
            .await
            .map_err(|e| BackendError::operation("snapshot", e.to_string()))?;
        migration::save_state(&mut qmp, &building.state(), SAVE_TIMEOUT)
            .await
            .map_err(|e| BackendError::operation("snapshot", format!("saving the state: {e}")))?;
        let made_seconds = started.elapsed().as_secs_f64();
        drop(qmp);
        process::stop(&vm, self.config.stop_grace).await?;
        for stale in [vm.qmp_socket(), vm.qga_socket(), vm.pidfile()] {
            super::files::remove_file_if_present(&stale).await?;
        }

        let sizes = seal(building.clone()).await?;
        let manifest = SnapshotManifest {
            id,
            shape: shape.clone(),
            owner: self.owner.clone(),
            created_ms: now_ms(),
            made_seconds,
            memory_bytes: sizes.memory,
            state_bytes: sizes.state,
            disk_bytes: sizes.disk,
            cloud_init_result: Some(String::from_utf8_lossy(&cloud_init_result).into_owned()),
        };
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BackendError::operation("snapshot", e.to_string()))?;
        write_file(&building.manifest(), &text).await?;
        Ok(manifest)
    }

    /// Waits until the template VM's guest agent answers and cloud-init has written its result.
    /// Returns the result file as read.
    async fn wait_until_up(&self, vm: &SandboxPaths) -> Result<Vec<u8>, BackendError> {
        let timeout = self.config.snapshot_boot_timeout;
        let deadline = Instant::now() + timeout;
        let mut agent = QgaClient::new(vm.qga_socket());
        loop {
            if Instant::now() >= deadline {
                return Err(BackendError::Timeout {
                    operation: "snapshot boot",
                    seconds: timeout.as_secs_f64(),
                });
            }
            if process::running_pid(vm).await?.is_none() {
                let console = process::log_tail(vm.console_log(), 1000).await;
                let qemu = process::log_tail(vm.qemu_log(), 500).await;
                return Err(BackendError::operation(
                    "snapshot boot",
                    format!(
                        "the template VM stopped while booting (console: {console}; qemu: {qemu})"
                    ),
                ));
            }
            if agent.ping(self.config.agent_ping_timeout).await.is_ok() {
                match agent
                    .read_file(CLOUD_INIT_RESULT, 64 << 10, self.config.agent_call_timeout)
                    .await
                {
                    Ok(result) => {
                        report_cloud_init(&result);
                        return Ok(result);
                    }
                    Err(e) if e.is_unavailable() => agent = QgaClient::new(vm.qga_socket()),
                    // Not written yet.
                    Err(_) => {}
                }
            }
            tokio::time::sleep(UP_POLL).await;
        }
    }
}

impl SnapshotMaker {
    /// Checks that the runner the seed fetched is in the template VM with the daemon's sha256.
    /// A fetch can fail where a job's boot would only record it (its token ended with the job or
    /// pool sandbox that asked for the snapshot, the endpoint was down), and a snapshot saved then
    /// would hand every sandbox restored from it a guest without the daemon's runner.
    async fn check_runner(
        &self,
        vm: &SandboxPaths,
        runner: &RunnerFetch,
        cloud_init_result: &[u8],
    ) -> Result<(), BackendError> {
        let digest = format!("sha256sum {} 2>&1", cloudinit::RUNNER_PATH);
        let reply = tokio::time::timeout(RUNNER_CHECK_TIMEOUT, self.run_to_end(vm, &digest))
            .await
            .map_err(|_| BackendError::Timeout {
                operation: "snapshot runner check",
                seconds: RUNNER_CHECK_TIMEOUT.as_secs_f64(),
            })?
            .map_err(|e| {
                BackendError::operation("snapshot", format!("checking the runner: {e}"))
            })?;
        runner_verdict(&runner.sha256, &reply, cloud_init_result)
            .map_err(|refusal| BackendError::operation("snapshot", refusal))
    }

    /// Runs `WARM_UP` in the template VM and waits for it; a failure is only logged.
    async fn warm_up(&self, vm: &SandboxPaths) {
        match tokio::time::timeout(WARM_UP_TIMEOUT, self.run_to_end(vm, WARM_UP)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "warming the template VM's page cache failed"),
            Err(_) => tracing::warn!("warming the template VM's page cache timed out"),
        }
    }

    /// Runs `script` with the template VM's `/bin/sh` through its guest agent, output captured,
    /// and waits for it to end.
    async fn run_to_end(
        &self,
        vm: &SandboxPaths,
        script: &str,
    ) -> Result<ExecStatusReply, QgaError> {
        let mut agent = QgaClient::new(vm.qga_socket());
        let request = ExecRequest {
            path: "/bin/sh".to_owned(),
            args: vec!["-c".to_owned(), script.to_owned()],
            capture_output: true,
            ..ExecRequest::default()
        };
        let timeout = self.config.agent_call_timeout;
        let pid = agent.exec(&request, timeout).await?;
        loop {
            let status = agent.exec_status(pid, timeout).await?;
            if status.exited {
                return Ok(status);
            }
            tokio::time::sleep(UP_POLL).await;
        }
    }
}

/// Whether `sha256sum`'s `reply` in the template VM shows the runner with digest `want`; if not,
/// the refusal, with what cloud-init's `result` says went wrong.
fn runner_verdict(want: &str, reply: &ExecStatusReply, result: &[u8]) -> Result<(), String> {
    let output = String::from_utf8_lossy(&reply.stdout);
    let found = match (reply.exit_code, output.split_whitespace().next()) {
        (Some(0), Some(have)) if have == want => return Ok(()),
        (Some(0), Some(have)) => format!("its sha256 is {have}, not the daemon's {want}"),
        _ => format!("it is not there ({})", cut(output.trim())),
    };
    Err(format!(
        "the template VM has not installed the daemon's runner, so no snapshot is saved: {} \
         {found}; cloud-init reported {}",
        cloudinit::RUNNER_PATH,
        cloud_init_errors(result)
    ))
}

/// cloud-init's errors in its `result.json`, quoted, for a refusal.
fn cloud_init_errors(result: &[u8]) -> String {
    let errors = serde_json::from_slice::<serde_json::Value>(result)
        .ok()
        .and_then(|v| v["v1"]["errors"].as_array().cloned());
    match errors {
        None => "no readable result".to_owned(),
        Some(errors) if errors.is_empty() => "no errors".to_owned(),
        Some(errors) => {
            let text = errors
                .iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join("; ");
            format!("{} error(s): {}", errors.len(), cut(&text))
        }
    }
}

/// The guest's `text`, cut to `QUOTED_CHARS` for a refusal: whatever the guest writes, a
/// refusal stays a line of a log.
fn cut(text: &str) -> String {
    let mut quoted: String = text.chars().take(QUOTED_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    quoted
}

/// Logs what cloud-init reported in the template VM: errors there are in every restored sandbox.
fn report_cloud_init(result: &[u8]) {
    let errors = serde_json::from_slice::<serde_json::Value>(result)
        .ok()
        .and_then(|v| v["v1"]["errors"].as_array().map(Vec::len));
    match errors {
        Some(0) => {}
        Some(count) => {
            tracing::warn!(
                count,
                "cloud-init reported errors in the snapshot's template VM"
            )
        }
        None => {
            tracing::warn!("cloud-init's result.json in the template VM is not what it should be")
        }
    }
}

/// What a snapshot's files take on the host.
struct Sizes {
    memory: u64,
    state: u64,
    disk: u64,
}

/// Flushes the snapshot's files to disk (it must survive a host crash, not only a daemon
/// restart), makes the ones nothing writes again read-only, and measures them. The memory file
/// stays writable by its owner: QEMU 7.2 opens a private mapping's file read-write.
async fn seal(files: SnapshotFiles) -> Result<Sizes, BackendError> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        let sync = |path: &Path| -> std::io::Result<u64> {
            let file = std::fs::OpenOptions::new().read(true).open(path)?;
            file.sync_all()?;
            layout::allocated_bytes(path)
        };
        let io = |path: &Path, e: std::io::Error| {
            BackendError::io(format!("sealing {}", path.display()), e)
        };
        let memory = sync(&files.memory()).map_err(|e| io(&files.memory(), e))?;
        let state_len = std::fs::metadata(files.state())
            .map_err(|e| io(&files.state(), e))?
            .len();
        let state = sync(&files.state()).map_err(|e| io(&files.state(), e))?;
        let disk = sync(&files.disk()).map_err(|e| io(&files.disk(), e))?;
        for path in [files.state(), files.disk()] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
                .map_err(|e| io(&path, e))?;
        }
        let dir = std::fs::File::open(&files.dir).map_err(|e| io(&files.dir, e))?;
        dir.sync_all().map_err(|e| io(&files.dir, e))?;
        if state_len == 0 {
            return Err(BackendError::operation(
                "snapshot",
                "the saved device state is empty",
            ));
        }
        Ok(Sizes {
            memory,
            state,
            disk,
        })
    })
    .await
    .map_err(|e| BackendError::operation("snapshot", e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256sum(code: i32, output: &str) -> ExecStatusReply {
        ExecStatusReply {
            exited: true,
            exit_code: Some(code),
            signal: None,
            stdout: output.as_bytes().to_vec(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    const CLEAN: &[u8] = br#"{"v1": {"datasource": "DataSourceNoCloud", "errors": []}}"#;

    #[test]
    fn the_runner_with_the_daemons_digest_passes() {
        let want = "ab".repeat(32);
        let reply = sha256sum(0, &format!("{want}  /usr/local/bin/agentlab-runner\n"));
        assert_eq!(runner_verdict(&want, &reply, CLEAN), Ok(()));
    }

    #[test]
    fn a_missing_or_other_runner_is_refused_with_cloud_inits_errors() {
        let want = "ab".repeat(32);
        let failed = br#"{"v1": {"errors": ["('scripts_user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted commands'))"]}}"#;
        let missing = sha256sum(
            1,
            "sha256sum: /usr/local/bin/agentlab-runner: No such file or directory\n",
        );
        let refusal = runner_verdict(&want, &missing, failed).unwrap_err();
        assert!(refusal.contains("no snapshot is saved"), "{refusal}");
        assert!(refusal.contains("No such file or directory"), "{refusal}");
        assert!(refusal.contains("1 error(s): ('scripts_user'"), "{refusal}");

        let other = "cd".repeat(32);
        let baked = sha256sum(0, &format!("{other}  /usr/local/bin/agentlab-runner\n"));
        let refusal = runner_verdict(&want, &baked, CLEAN).unwrap_err();
        assert!(
            refusal.contains(&format!("its sha256 is {other}")),
            "{refusal}"
        );
        assert!(
            refusal.contains("cloud-init reported no errors"),
            "{refusal}"
        );

        // sha256sum's output is the guest's: an empty one is no digest.
        assert!(runner_verdict(&want, &sha256sum(0, ""), CLEAN).is_err());
        assert!(runner_verdict(&want, &sha256sum(1, ""), b"not json")
            .unwrap_err()
            .contains("no readable result"));
    }

    #[test]
    fn long_errors_are_cut() {
        let long = format!(r#"{{"v1": {{"errors": ["{}"]}}}}"#, "x".repeat(5000));
        let quoted = cloud_init_errors(long.as_bytes());
        assert!(quoted.chars().count() < QUOTED_CHARS + 40, "{quoted}");
        assert!(quoted.ends_with('…'));
        let flood = sha256sum(1, &"y".repeat(1 << 20));
        let refusal = runner_verdict(&"ab".repeat(32), &flood, CLEAN).unwrap_err();
        assert!(refusal.len() < 2 * QUOTED_CHARS, "{} bytes", refusal.len());
    }
}

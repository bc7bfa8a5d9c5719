//! Making one template snapshot: boot the template in a VM whose RAM is the snapshot's memory
//! file (mapped shared), wait until its guest is fully up (guest agent answering, cloud-init's
//! `result.json` written; no job, no runner), pause it and save its device state, quit, and
//! publish the folder. See `snapshot` for what the files are.
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
use super::qga::{ExecRequest, QgaClient};
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
    /// Runs `WARM_UP` in the template VM and waits for it; a failure is only logged.
    async fn warm_up(&self, vm: &SandboxPaths) {
        let mut agent = QgaClient::new(vm.qga_socket());
        let request = ExecRequest {
            path: "/bin/sh".to_owned(),
            args: vec!["-c".to_owned(), WARM_UP.to_owned()],
            ..ExecRequest::default()
        };
        let timeout = self.config.agent_call_timeout;
        let warmed = async {
            let pid = agent.exec(&request, timeout).await?;
            loop {
                if agent.exec_status(pid, timeout).await?.exited {
                    return Ok::<(), super::qga::QgaError>(());
                }
                tokio::time::sleep(UP_POLL).await;
            }
        };
        match tokio::time::timeout(WARM_UP_TIMEOUT, warmed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "warming the template VM's page cache failed"),
            Err(_) => tracing::warn!("warming the template VM's page cache timed out"),
        }
    }
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

//! `QemuBackend`: the `Backend` trait on local QEMU. A sandbox is a folder under `sandboxes_dir`
//! holding a qcow2 overlay of its template, a NoCloud seed, `sandbox.json` and, while it runs,
//! the VM's pidfile, QMP and guest-agent sockets and console log. The folder is the whole state:
//! a restarted daemon finds its VMs by listing folders and recognises their QEMU processes by
//! command line.
//!
//! Ownership: `sandbox.json` records the instance id of the daemon that made the folder, and is
//! written before anything else goes in, so even the residue of an interrupted clone says whose it
//! is. A folder recording another daemon's id is never stopped (the process scan matches every
//! QEMU naming files in the folder) nor removed, by destroy or by a clone's residue clean-up.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::OwnedMutexGuard;

use super::accel::{AccelChooser, Accelerator, ProbeBoot};
use super::files::{
    create_private_dir_all, exists, remove_dir_all, remove_file_if_present, write_file,
};
use super::import::{ImportError, Importer};
use super::launch::GuestMemory;
use super::launch::{self, LaunchPlan};
use super::layout::{self, RestoreSource, SandboxPaths, SandboxRecord, Template};
use super::library::SnapshotLibrary;
use super::memory::{self, MemoryCache};
use super::overlay::{self, tool_error};
use super::process;
use super::qga::{ExecRequest, QgaClient, QgaError};
use super::qmp::QmpClient;
use super::restore;
use super::seed::{self, SeedError, SeedTools};
use super::snapshot::{SnapshotFiles, SnapshotManifest};
use super::snapshot_maker::SnapshotMaker;
use super::tool::{self, ToolError};
use crate::backend::templates::{ImportOutcome, TemplateImportRequest};
use crate::backend::{
    Backend, BackendError, BackendKind, DiskUsage, ExecStatus, GuestCommand, ListedVm, MemoryUsage,
    Provisioning, SandboxSpec, SnapshotInfo, SnapshotStatus, StartMode, StartReport, VmHandle,
    VmState,
};
use crate::cloudinit;
use crate::config::qemu::QemuConfig;
use crate::model::{now_ms, VM_NAME_PREFIX};

/// How a guest reaches the daemon's guest API (the config's default `guest_url` on this backend).
pub use crate::config::qemu::GUEST_URL;

/// The PATH a guest command gets when the caller sets an environment without one: `guest-exec`
/// replaces the agent's environment entirely, and the runner needs `git` on PATH.
const GUEST_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long one QMP conversation during start may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// Each guest-agent call of a guest file read may take this long (a busy TCG guest is slow).
const GUEST_FILE_CALL: Duration = Duration::from_secs(5);

/// Where the backend keeps templates and sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuDirs {
    pub images: PathBuf,
    pub sandboxes: PathBuf,
    pub snapshots: PathBuf,
}

impl QemuDirs {
    /// The configured folders, or their defaults under the daemon's `data_dir`.
    pub fn resolve(config: &QemuConfig, data_dir: &Path) -> QemuDirs {
        QemuDirs {
            images: config.images_dir(data_dir),
            sandboxes: config.sandboxes_dir(data_dir),
            snapshots: config.snapshots_dir(data_dir),
        }
    }
}

#[derive(Debug)]
pub struct QemuBackend {
    config: QemuConfig,
    dirs: QemuDirs,
    guest_endpoint: SocketAddr,
    accel: Arc<AccelChooser>,
    /// This daemon's instance id: folders recording another are left alone. None (tests, the
    /// pve stand-in): no check.
    instance: Option<String>,
    /// Serialises the operations on one VM: QEMU serves one QMP and one guest-agent client at a
    /// time, and clone/start/destroy must not interleave.
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Exit statuses already collected: the guest agent reports an exit only once, and a
    /// restarted actor may ask again.
    finished: Mutex<HashMap<(String, i64), ExecStatus>>,
    /// Guest-agent connections kept between calls. A request left unanswered while the guest
    /// boots stays queued on the connection, so the agent answers the moment it starts instead
    /// of at the next poll; the client resynchronises past the stale replies.
    agents: Mutex<HashMap<String, QgaClient>>,
    /// Template snapshots that sandboxes are restored from.
    snapshots: Arc<SnapshotLibrary>,
    /// The last `memory_usage` measurement, answered again for a few seconds.
    memory: MemoryCache,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl QemuBackend {
    /// `guest_endpoint` is the daemon's guest listener (`guest_listen`) as the host reaches it:
    /// `guestfwd` connects a socat on the host to it for every guest connection to
    /// `GUEST_URL`. An unspecified address (0.0.0.0, ::) stands for the host's loopback.
    pub fn new(
        config: QemuConfig,
        dirs: QemuDirs,
        guest_endpoint: SocketAddr,
    ) -> Result<QemuBackend, BackendError> {
        layout::validate_dir("qemu.images_dir", &dirs.images)?;
        layout::validate_dir("qemu.sandboxes_dir", &dirs.sandboxes)?;
        layout::validate_sandboxes_dir_room(&dirs.sandboxes)?;
        layout::validate_dir("qemu.snapshots_dir", &dirs.snapshots)?;
        let building = SnapshotFiles::building(&dirs.snapshots, &"0".repeat(16));
        layout::validate_vm_socket_room("qemu.snapshots_dir", &dirs.snapshots, &building.vm())?;
        if dirs.snapshots.to_string_lossy().contains('\'') {
            return Err(BackendError::InvalidInput(format!(
                "qemu.snapshots_dir {} must not contain quotes",
                dirs.snapshots.display()
            )));
        }
        if guest_endpoint.port() == 0 {
            return Err(BackendError::InvalidInput(
                "the guest endpoint needs a port".to_owned(),
            ));
        }
        let guest_endpoint = match guest_endpoint.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), guest_endpoint.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), guest_endpoint.port())
            }
            _ => guest_endpoint,
        };
        let socat = config.socat_binary.to_string_lossy();
        if socat.is_empty() || socat.contains([' ', ',', '\'', '"', '\\']) {
            return Err(BackendError::InvalidInput(format!(
                "qemu.socat_binary `{socat}` must be a path without spaces, commas or quotes"
            )));
        }
        let accel = Arc::new(AccelChooser::new(
            config.accel,
            config.qemu_binary.clone(),
            config.kvm_probe_timeout,
            dirs.sandboxes.join(".kvm-probe"),
        ));
        let snapshots = Self::library(&config, &dirs, guest_endpoint, &accel, None);
        Ok(QemuBackend {
            config,
            dirs,
            guest_endpoint,
            accel,
            snapshots,
            instance: None,
            vm_locks: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashMap::new()),
            memory: MemoryCache::new(memory::MEMORY_USAGE_MAX_AGE),
        })
    }

    fn library(
        config: &QemuConfig,
        dirs: &QemuDirs,
        guest_endpoint: SocketAddr,
        accel: &Arc<AccelChooser>,
        owner: Option<String>,
    ) -> Arc<SnapshotLibrary> {
        let maker = SnapshotMaker {
            config: config.clone(),
            snapshots_dir: dirs.snapshots.clone(),
            guest_endpoint,
            owner,
        };
        Arc::new(SnapshotLibrary::new(
            maker,
            dirs.images.clone(),
            Arc::clone(accel),
        ))
    }

    /// Checks the host once at daemon start: the sandboxes folder can be made and every tool the
    /// backend runs is there. A missing default template is only warned about.
    pub async fn preflight(&self) -> Result<(), BackendError> {
        create_private_dir_all(&self.dirs.sandboxes).await?;
        let config = &self.config;
        let checks: [(&Path, &[&str]); 5] = [
            (&config.qemu_binary, &["--version"]),
            (&config.qemu_img_binary, &["--version"]),
            (&config.socat_binary, &["-V"]),
            (&config.mcopy_binary, &["-V"]),
            (&config.mkfs_vfat_binary, &["--help"]),
        ];
        for (binary, args) in checks {
            let mut command = Command::new(binary);
            command.args(args);
            match tool::run(command, config.tool_timeout).await {
                // mkfs.vfat --help exits non-zero on some versions; it ran, which is the point.
                Ok(_) | Err(ToolError::Failed { .. }) => {}
                Err(e) => {
                    return Err(BackendError::operation(
                        "qemu preflight",
                        format!(
                            "{e} (install qemu-system-x86, qemu-utils, socat, mtools, dosfstools)"
                        ),
                    ))
                }
            }
        }
        if let Err(e) = Template::resolve(&self.dirs.images, "", None).await {
            tracing::warn!(error = %e, "the default QEMU template is missing");
        }
        Ok(())
    }

    pub fn dirs(&self) -> &QemuDirs {
        &self.dirs
    }

    /// Makes this backend the daemon `instance`'s: what it destroys must not record another.
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = Some(instance.to_owned());
        self.snapshots = Self::library(
            &self.config,
            &self.dirs,
            self.guest_endpoint,
            &self.accel,
            self.instance.clone(),
        );
        self
    }

    /// Starts the accelerator probe in the background (daemon start-up), with the default
    /// template's kernel, so that the first VM start finds its answer or waits for the probe
    /// already running instead of starting one. Returns the probe's task, or None when there is
    /// nothing to probe (a fixed accelerator) or no default template to probe with (the first
    /// start then probes with its own).
    pub async fn start_accel_probe(&self) -> Option<tokio::task::JoinHandle<Accelerator>> {
        if self.accel.known().is_some() {
            return None;
        }
        let template = match Template::resolve(&self.dirs.images, "", None).await {
            Ok(template) => template,
            Err(e) => {
                tracing::info!(error = %e, "no default template to probe KVM with; the first start probes");
                return None;
            }
        };
        let accel = Arc::clone(&self.accel);
        Some(tokio::spawn(async move {
            accel.choose(ProbeBoot::of(&template)).await
        }))
    }

    /// Whether the folder records another daemon's id; its owner if so.
    async fn foreign_owner(&self, paths: &SandboxPaths) -> Option<String> {
        let ours = self.instance.as_deref()?;
        let owner = Self::recorded_owner(paths).await?;
        (owner != ours).then_some(owner)
    }

    /// The owner `sandbox.json` records; None without a readable record or an owner in it.
    async fn recorded_owner(paths: &SandboxPaths) -> Option<String> {
        Self::read_record(paths).await.ok()?.owner
    }

    fn refuse_foreign(name: &str, owner: &str) -> BackendError {
        BackendError::InvalidInput(format!(
            "{name} belongs to agentlabd instance {owner}, not this one; it is left alone"
        ))
    }

    async fn lock_vm(&self, name: &str) -> OwnedMutexGuard<()> {
        let vm_lock = Arc::clone(lock(&self.vm_locks).entry(name.to_owned()).or_default());
        vm_lock.lock_owned().await
    }

    /// Forgets a destroyed VM's lock and exit statuses. The lock is only dropped when nobody else
    /// holds or awaits it.
    fn forget(&self, name: &str) {
        lock(&self.finished).retain(|(vm, _), _| vm != name);
        lock(&self.agents).remove(name);
        let mut locks = lock(&self.vm_locks);
        if locks.get(name).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(name);
        }
    }

    /// The VM's kept guest-agent client, or a new one. Callers hold the VM lock and hand the
    /// client back with `keep_agent`; a cancelled call simply drops it.
    fn take_agent(&self, name: &str, paths: &SandboxPaths) -> QgaClient {
        lock(&self.agents)
            .remove(name)
            .unwrap_or_else(|| QgaClient::new(paths.qga_socket()))
    }

    fn keep_agent(&self, name: &str, agent: QgaClient) {
        lock(&self.agents).insert(name.to_owned(), agent);
    }

    fn paths_for_name(&self, name: &str) -> Result<SandboxPaths, BackendError> {
        layout::validate_name(name)?;
        layout::validate_socket_room(&self.dirs.sandboxes, name)?;
        Ok(SandboxPaths::new(&self.dirs.sandboxes, name))
    }

    /// The folder of a handle; refuses a `vm_ref` that is not that folder, so a corrupt or stale
    /// handle never points a destroy at some other path.
    fn paths(&self, vm: &VmHandle) -> Result<SandboxPaths, BackendError> {
        let paths = self.paths_for_name(&vm.name)?;
        if Path::new(&vm.vm_ref) != paths.dir {
            return Err(BackendError::InvalidInput(format!(
                "vm_ref {} of {} is not its sandbox folder {} (did qemu.sandboxes_dir change?)",
                vm.vm_ref,
                vm.name,
                paths.dir.display()
            )));
        }
        Ok(paths)
    }

    fn handle(paths: &SandboxPaths, name: &str) -> VmHandle {
        VmHandle {
            name: name.to_owned(),
            vm_ref: paths.dir.display().to_string(),
        }
    }

    async fn read_record(paths: &SandboxPaths) -> Result<SandboxRecord, BackendError> {
        let path = paths.record();
        let text = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_str(&text)
            .map_err(|e| BackendError::InvalidInput(format!("{}: {e}", path.display())))
    }

    async fn create_sandbox(
        &self,
        spec: &SandboxSpec,
        paths: &SandboxPaths,
        seed_files: &cloudinit::SeedFiles,
    ) -> Result<(), BackendError> {
        let template = Template::resolve(
            &self.dirs.images,
            &spec.template,
            self.config.kernel_cmdline.as_deref(),
        )
        .await?;
        let restore = self.snapshot_to_restore(spec).await?;
        create_private_dir_all(&self.dirs.sandboxes).await?;
        let mut builder = tokio::fs::DirBuilder::new();
        builder.mode(0o700);
        builder
            .create(&paths.dir)
            .await
            .map_err(|e| BackendError::io(format!("creating {}", paths.dir.display()), e))?;
        // First, so that even the residue of a clone cut short here says whose it is.
        let record = SandboxRecord {
            name: spec.name.clone(),
            job_id: spec.job_id.clone(),
            created_ms: now_ms(),
            template: template.clone(),
            cores: self.config.clamp_cores(spec.cores),
            memory_mb: self.config.clamp_memory_mb(spec.memory_mb),
            disk_gb: spec.disk_gb,
            network: spec.network,
            owner: Some(spec.owner.clone()),
            restore: restore.as_ref().map(|manifest| RestoreSource {
                snapshot_id: manifest.id.clone(),
                dir: SnapshotFiles::new(&self.dirs.snapshots, &manifest.id).dir,
            }),
            start: spec.start,
        };
        Self::write_record(paths, &record).await?;

        // A linked clone: O(1) whatever the base's size. A restored sandbox's base is the
        // snapshot's disk, as the guest left it at the pause, at the size the guest saw.
        let (base, size_bytes) = match &restore {
            Some(manifest) => (
                SnapshotFiles::new(&self.dirs.snapshots, &manifest.id).disk(),
                manifest.shape.disk_bytes,
            ),
            None => (
                template.root_disk.clone(),
                overlay::size_for(&template.root_disk, spec.disk_gb).await?,
            ),
        };
        overlay::create(
            &self.config.qemu_img_binary,
            &base,
            &paths.overlay(),
            size_bytes,
            self.config.tool_timeout,
        )
        .await?;

        // A restored sandbox gets the job's seed too: the same devices as its snapshot, and
        // what a cold boot needs should the restore fail.
        let tools = SeedTools {
            mkfs_vfat: self.config.mkfs_vfat_binary.clone(),
            mcopy: self.config.mcopy_binary.clone(),
            timeout: self.config.tool_timeout,
        };
        seed::write_image(
            seed_files,
            &paths.seed_image(),
            &paths.seed_staging(),
            &tools,
        )
        .await
        .map_err(seed_error)?;

        write_file(&paths.complete_marker(), b"").await
    }

    async fn write_record(
        paths: &SandboxPaths,
        record: &SandboxRecord,
    ) -> Result<(), BackendError> {
        let text = serde_json::to_string_pretty(record)
            .map_err(|e| BackendError::operation("clone", e.to_string()))?;
        write_file(&paths.record(), text.as_bytes()).await
    }

    /// The snapshot a clone of `spec` restores from: the one it names, if that is still the
    /// snapshot of the spec's shape. A snapshot gone since the lifecycle looked makes a
    /// `Snapshot` start fail and any other boot cold.
    async fn snapshot_to_restore(
        &self,
        spec: &SandboxSpec,
    ) -> Result<Option<SnapshotManifest>, BackendError> {
        let Some(id) = &spec.restore_from else {
            return Ok(None);
        };
        let (shape, _) = self.snapshots.shape_for(spec).await?;
        let manifest = match shape.id() == *id {
            true => self.snapshots.ready(id).await?,
            false => None,
        };
        if manifest.is_none() && spec.start == StartMode::Snapshot {
            return Err(BackendError::InvalidInput(format!(
                "snapshot {id} is not the current snapshot of {}'s template and shape any more",
                spec.name
            )));
        }
        Ok(manifest)
    }

    /// Restores a cloned sandbox from its snapshot; on failure the snapshot is discarded and,
    /// unless the job asked for a snapshot start, the sandbox is turned into a cold one (its
    /// overlay made again on the template) for the caller to boot. Returns the report of a
    /// restore that worked, or the note on one that fell back.
    async fn restore_or_fall_back(
        &self,
        vm: &VmHandle,
        paths: &SandboxPaths,
        record: &mut SandboxRecord,
        source: &RestoreSource,
    ) -> Result<Result<StartReport, String>, BackendError> {
        let files = SnapshotFiles {
            dir: source.dir.clone(),
        };
        let accel = match files.read_manifest().await {
            Ok(Some(manifest)) if manifest.shape.accel == Accelerator::Kvm.as_str() => {
                Accelerator::Kvm
            }
            _ => Accelerator::Tcg,
        };
        let memory_file = files.memory();
        let plan = LaunchPlan {
            qemu_binary: &self.config.qemu_binary,
            socat_binary: &self.config.socat_binary,
            paths,
            record,
            accel,
            guest_endpoint: self.guest_endpoint,
            memory: GuestMemory::Restore {
                memory_file: &memory_file,
            },
        };
        let started = std::time::Instant::now();
        let restored = restore::restore(
            &plan,
            &files,
            self.config.tool_timeout,
            self.config.restore_timeout,
            self.config.agent_ping_timeout,
        )
        .await;
        let reason = match restored {
            Ok(agent) => {
                self.keep_agent(&vm.name, agent);
                tracing::info!(vm = %vm.name, snapshot = %source.snapshot_id, elapsed = ?started.elapsed(), "VM restored");
                return Ok(Ok(StartReport {
                    restored_from: Some(source.snapshot_id.clone()),
                    notes: Vec::new(),
                }));
            }
            Err(failed) => failed.0,
        };
        self.stop_processes(paths).await?;
        self.snapshots.discard(&source.snapshot_id, &reason).await?;
        if record.start == StartMode::Snapshot {
            return Err(BackendError::operation(
                "start",
                format!(
                    "snapshot {} did not restore ({reason}); it was discarded",
                    source.snapshot_id
                ),
            ));
        }
        // The record first: a crash before the new overlay is in place leaves a cold boot on
        // the snapshot's disk, which boots; the other order could restore onto the wrong disk.
        let cold_overlay = paths.overlay().with_extension("cold.partial");
        remove_file_if_present(&cold_overlay).await?;
        overlay::create(
            &self.config.qemu_img_binary,
            &record.template.root_disk,
            &cold_overlay,
            overlay::size_for(&record.template.root_disk, record.disk_gb).await?,
            self.config.tool_timeout,
        )
        .await?;
        record.restore = None;
        Self::write_record(paths, record).await?;
        tokio::fs::rename(&cold_overlay, paths.overlay())
            .await
            .map_err(|e| BackendError::io(format!("replacing {}", paths.overlay().display()), e))?;
        Ok(Err(format!(
            "snapshot {} did not restore ({reason}); it was discarded, the sandbox boots cold and \
             the next sandbox of this shape makes the snapshot again",
            source.snapshot_id
        )))
    }

    /// Stops every QEMU process of a sandbox (see `process::stop`).
    async fn stop_processes(&self, paths: &SandboxPaths) -> Result<(), BackendError> {
        process::stop(paths, self.config.stop_grace).await
    }

    /// Checks over QMP that a VM whose QEMU is alive really runs.
    async fn confirm_running(paths: &SandboxPaths) -> Result<(), BackendError> {
        let status = async {
            let mut qmp = QmpClient::connect(&paths.qmp_socket(), QMP_TIMEOUT).await?;
            qmp.query_status(QMP_TIMEOUT).await
        }
        .await
        .map_err(|e| BackendError::operation("start", format!("qemu runs but QMP failed: {e}")))?;
        if status.running {
            Ok(())
        } else {
            Err(BackendError::operation(
                "start",
                format!("qemu runs but the VM is {}", status.status),
            ))
        }
    }

    /// Turns a guest-agent failure into the backend's error; an unreachable agent of a VM whose
    /// QEMU is gone is reported as such, not as "not up yet".
    async fn agent_error(
        &self,
        operation: &'static str,
        name: &str,
        paths: &SandboxPaths,
        error: QgaError,
    ) -> BackendError {
        if !error.is_unavailable() {
            return BackendError::operation(operation, error.to_string());
        }
        if matches!(process::running_pid(paths).await, Ok(None)) {
            let qemu_log = process::log_tail(paths.qemu_log(), 500).await;
            return BackendError::operation(
                operation,
                format!(
                    "{name} is not running (console: {}){}{qemu_log}",
                    paths.console_log().display(),
                    if qemu_log.is_empty() { "" } else { "; qemu: " }
                ),
            );
        }
        BackendError::AgentUnavailable(error.to_string())
    }

    async fn require_dir(paths: &SandboxPaths, name: &str) -> Result<(), BackendError> {
        if exists(&paths.dir).await? {
            Ok(())
        } else {
            Err(BackendError::Missing(name.to_owned()))
        }
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn effective_size(&self, cores: u32, memory_mb: u64) -> (u32, u64) {
        (
            self.config.clamp_cores(cores),
            self.config.clamp_memory_mb(memory_mb),
        )
    }

    fn accelerator(&self) -> Option<&'static str> {
        self.accel.known().map(Accelerator::as_str)
    }

    fn snapshot_starts(&self) -> bool {
        true
    }

    async fn snapshot_status(&self, spec: &SandboxSpec) -> Result<SnapshotStatus, BackendError> {
        let (shape, _) = self.snapshots.shape_for(spec).await?;
        let id = shape.id();
        Ok(match self.snapshots.ready(&id).await? {
            Some(manifest) => SnapshotStatus::Ready(SnapshotInfo::from(&manifest)),
            None => SnapshotStatus::Missing { id },
        })
    }

    async fn make_snapshot(&self, spec: &SandboxSpec) -> Result<SnapshotInfo, BackendError> {
        let (shape, accel) = self.snapshots.shape_for(spec).await?;
        let runner = spec.runner.clone();
        let manifest = self.snapshots.make(shape, accel, runner).await?;
        Ok(SnapshotInfo::from(&manifest))
    }

    /// Clears stale snapshot folders (see `SnapshotLibrary::sweep`), keeping every snapshot a
    /// sandbox folder names.
    async fn sweep(&self) -> Result<Vec<String>, BackendError> {
        let mut in_use = std::collections::HashSet::new();
        for listed in self.list_vms().await? {
            let paths = SandboxPaths::new(&self.dirs.sandboxes, &listed.vm.name);
            match Self::read_record(&paths).await {
                Ok(record) => {
                    if let Some(source) = record.restore {
                        in_use.insert(source.snapshot_id);
                    }
                }
                // A clone cut short before its record: it restores from nothing yet.
                Err(BackendError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                // Unreadable: keep every snapshot rather than guess.
                Err(_) => return Ok(Vec::new()),
            }
        }
        self.snapshots.sweep(&in_use).await
    }

    async fn clone_vm(&self, spec: &SandboxSpec) -> Result<VmHandle, BackendError> {
        let paths = self.paths_for_name(&spec.name)?;
        if spec.cores == 0 || spec.memory_mb == 0 || spec.disk_gb == 0 {
            return Err(BackendError::InvalidInput(format!(
                "{}: cores, memory_mb and disk_gb must be above 0",
                spec.name
            )));
        }
        let seed_files =
            cloudinit::render_for(&spec.name, spec.cloud_init.as_ref(), spec.runner.as_ref())
                .map_err(|e| seed_error(e.into()))?;
        let handle = Self::handle(&paths, &spec.name);
        let _guard = self.lock_vm(&spec.name).await;

        if exists(&paths.complete_marker()).await? {
            if let Some(owner) = self.foreign_owner(&paths).await {
                return Err(Self::refuse_foreign(&spec.name, &owner));
            }
            let record = Self::read_record(&paths).await?;
            if record.job_id != spec.job_id {
                return Err(BackendError::InvalidInput(format!(
                    "VM {} already exists for job {}",
                    spec.name, record.job_id
                )));
            }
            return Ok(handle);
        }
        if exists(&paths.dir).await? {
            if let Some(owner) = self.foreign_owner(&paths).await {
                return Err(Self::refuse_foreign(&spec.name, &owner));
            }
            tracing::info!(vm = %spec.name, "removing the residue of an interrupted clone");
            self.stop_processes(&paths).await?;
            remove_dir_all(&paths.dir).await?;
        }
        let started = std::time::Instant::now();
        self.create_sandbox(spec, &paths, &seed_files).await?;
        tracing::debug!(vm = %spec.name, elapsed = ?started.elapsed(), "cloned");
        Ok(handle)
    }

    async fn start_vm(&self, vm: &VmHandle) -> Result<StartReport, BackendError> {
        let paths = self.paths(vm)?;
        let _guard = self.lock_vm(&vm.name).await;
        Self::require_dir(&paths, &vm.name).await?;
        if !exists(&paths.complete_marker()).await? {
            return Err(BackendError::operation(
                "start",
                format!(
                    "the clone of {} never finished; destroy it and clone again",
                    vm.name
                ),
            ));
        }
        let mut record = Self::read_record(&paths).await?;
        if process::running_pid(&paths).await?.is_some() {
            match Self::confirm_running(&paths).await {
                Ok(()) => {
                    return Ok(StartReport {
                        restored_from: record.restore.map(|r| r.snapshot_id),
                        notes: Vec::new(),
                    })
                }
                // A restore cut short (a daemon killed while the state loaded) leaves QEMU
                // paused or still waiting for its state: it is stopped and restored again.
                Err(e) if record.restore.is_some() => {
                    tracing::info!(vm = %vm.name, error = %e, "restoring again an interrupted restore");
                }
                Err(e) => return Err(e),
            }
        }
        // A launch cancelled before QEMU wrote its pidfile may have left a half-started VM.
        self.stop_processes(&paths).await?;
        // A connection to a previous QEMU's agent socket is of no use to the new one.
        lock(&self.agents).remove(&vm.name);
        for stale in [paths.qmp_socket(), paths.qga_socket(), paths.pidfile()] {
            remove_file_if_present(&stale).await?;
        }
        let mut notes = Vec::new();
        if let Some(source) = record.restore.clone() {
            match self
                .restore_or_fall_back(vm, &paths, &mut record, &source)
                .await?
            {
                Ok(report) => return Ok(report),
                Err(note) => notes.push(note),
            }
            for stale in [paths.qmp_socket(), paths.qga_socket(), paths.pidfile()] {
                remove_file_if_present(&stale).await?;
            }
        }
        if let Some(missing) = record.template.missing_file().await {
            return Err(BackendError::InvalidInput(format!(
                "{} cannot start: its template file {} is gone (rebuild the template and clone \
                 the sandbox again)",
                vm.name,
                missing.display()
            )));
        }
        let accel = self.accel.choose(ProbeBoot::of(&record.template)).await;
        let plan = LaunchPlan {
            qemu_binary: &self.config.qemu_binary,
            socat_binary: &self.config.socat_binary,
            paths: &paths,
            record: &record,
            accel,
            guest_endpoint: self.guest_endpoint,
            memory: GuestMemory::Anonymous,
        };
        launch::launch(&plan, self.config.tool_timeout).await?;
        if process::running_pid(&paths).await?.is_none() {
            let qemu_log = process::log_tail(paths.qemu_log(), 1000).await;
            return Err(BackendError::operation(
                "start",
                format!("qemu daemonized but is not running: {qemu_log}"),
            ));
        }
        tracing::info!(vm = %vm.name, ?accel, "VM started");
        Ok(StartReport {
            restored_from: None,
            notes,
        })
    }

    async fn agent_ping(&self, vm: &VmHandle) -> Result<(), BackendError> {
        let paths = self.paths(vm)?;
        Self::require_dir(&paths, &vm.name).await?;
        let _guard = self.lock_vm(&vm.name).await;
        let mut agent = self.take_agent(&vm.name, &paths);
        let result = agent.ping(self.config.agent_ping_timeout).await;
        self.keep_agent(&vm.name, agent);
        match result {
            Ok(()) => Ok(()),
            Err(e) => Err(self.agent_error("guest ping", &vm.name, &paths, e).await),
        }
    }

    async fn import_template(
        &self,
        request: &TemplateImportRequest,
    ) -> Result<ImportOutcome, BackendError> {
        let importer = Importer {
            images_dir: self.dirs.images.clone(),
            qemu_img: self.config.qemu_img_binary.clone(),
            tool_timeout: self.config.tool_timeout,
            convert_timeout: self.config.import_timeout,
        };
        importer.import(request).await.map_err(|e| match e {
            ImportError::InvalidInput(_)
            | ImportError::NotImported(_)
            | ImportError::Unreadable(_) => BackendError::InvalidInput(e.to_string()),
            ImportError::Tool(tool) => overlay::tool_error("import", tool),
            ImportError::Io { context, source } => BackendError::io(context, source),
            ImportError::Task(message) => BackendError::operation("import", message),
        })
    }

    async fn read_guest_file(
        &self,
        vm: &VmHandle,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, BackendError> {
        let paths = self.paths(vm)?;
        Self::require_dir(&paths, &vm.name).await?;
        let _guard = self.lock_vm(&vm.name).await;
        let mut agent = self.take_agent(&vm.name, &paths);
        let result = agent
            .read_file(
                path,
                limit,
                self.config.agent_ping_timeout.max(GUEST_FILE_CALL),
            )
            .await;
        self.keep_agent(&vm.name, agent);
        match result {
            Ok(contents) => Ok(Some(contents)),
            Err(QgaError::Guest { command, desc, .. })
                if command == "guest-file-open" && desc.contains("No such file") =>
            {
                Ok(None)
            }
            Err(e) => Err(self
                .agent_error("guest file read", &vm.name, &paths, e)
                .await),
        }
    }

    async fn exec(&self, vm: &VmHandle, command: &GuestCommand) -> Result<i64, BackendError> {
        let paths = self.paths(vm)?;
        Self::require_dir(&paths, &vm.name).await?;
        let request = ExecRequest {
            path: command.path.clone(),
            args: command.args.clone(),
            env: guest_env(&command.env),
            // guest-exec's input-data: qemu-ga writes it to a pipe on the command's stdin and
            // closes the pipe after it, so the command reads to EOF.
            input: command
                .stdin
                .as_ref()
                .map(|input| input.as_bytes().to_vec()),
            capture_output: false,
        };
        let _guard = self.lock_vm(&vm.name).await;
        let mut agent = self.take_agent(&vm.name, &paths);
        let result = agent.exec(&request, self.config.agent_call_timeout).await;
        self.keep_agent(&vm.name, agent);
        match result {
            Ok(pid) => Ok(pid),
            Err(e) => Err(self.agent_error("guest exec", &vm.name, &paths, e).await),
        }
    }

    async fn exec_status(&self, vm: &VmHandle, pid: i64) -> Result<ExecStatus, BackendError> {
        let key = (vm.name.clone(), pid);
        if let Some(status) = lock(&self.finished).get(&key) {
            return Ok(*status);
        }
        let paths = self.paths(vm)?;
        Self::require_dir(&paths, &vm.name).await?;
        let _guard = self.lock_vm(&vm.name).await;
        let mut agent = self.take_agent(&vm.name, &paths);
        let result = agent.exec_status(pid, self.config.agent_call_timeout).await;
        self.keep_agent(&vm.name, agent);
        let reply = match result {
            Ok(reply) => reply,
            Err(e) => {
                return Err(self
                    .agent_error("guest exec-status", &vm.name, &paths, e)
                    .await)
            }
        };
        let status = match (reply.exited, reply.signal, reply.exit_code) {
            (false, _, _) => ExecStatus::Running,
            (true, Some(signal), _) => ExecStatus::Signalled { signal },
            (true, None, Some(code)) => ExecStatus::Exited { code },
            (true, None, None) => {
                return Err(BackendError::operation(
                    "guest exec-status",
                    format!("process {pid} exited with neither a code nor a signal"),
                ))
            }
        };
        if status != ExecStatus::Running {
            lock(&self.finished).insert(key, status);
        }
        Ok(status)
    }

    async fn destroy_vm(&self, vm: &VmHandle) -> Result<(), BackendError> {
        let paths = self.paths(vm)?;
        let guard = self.lock_vm(&vm.name).await;
        if exists(&paths.dir).await? {
            if let Some(owner) = self.foreign_owner(&paths).await {
                return Err(Self::refuse_foreign(&vm.name, &owner));
            }
            self.stop_processes(&paths).await?;
            // The marker goes first: should the removal be cut short, what is left reads as an
            // interrupted clone, which every operation knows to clean up.
            remove_file_if_present(&paths.complete_marker()).await?;
            remove_dir_all(&paths.dir).await?;
            tracing::info!(vm = %vm.name, "VM destroyed");
        }
        drop(guard);
        self.forget(&vm.name);
        Ok(())
    }

    async fn vm_state(&self, vm: &VmHandle) -> Result<VmState, BackendError> {
        let paths = self.paths(vm)?;
        if !exists(&paths.dir).await? {
            return Ok(VmState::Missing);
        }
        if process::running_pid(&paths).await?.is_some() {
            return Ok(VmState::Running);
        }
        // No trustworthy pidfile: a launch may have been cut short after QEMU forked.
        if !exists(&paths.pidfile()).await? && !process::find(&paths).await?.is_empty() {
            return Ok(VmState::Running);
        }
        Ok(VmState::Stopped)
    }

    async fn list_vms(&self) -> Result<Vec<ListedVm>, BackendError> {
        let dir = &self.dirs.sandboxes;
        let mut entries = match tokio::fs::read_dir(dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(BackendError::io(format!("listing {}", dir.display()), e)),
        };
        let mut vms = Vec::new();
        loop {
            let entry = entries
                .next_entry()
                .await
                .map_err(|e| BackendError::io(format!("listing {}", dir.display()), e))?;
            let Some(entry) = entry else { break };
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !name.starts_with(VM_NAME_PREFIX) || layout::validate_name(&name).is_err() {
                continue;
            }
            let is_dir = entry.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                let paths = SandboxPaths::new(dir, &name);
                vms.push(ListedVm {
                    vm: Self::handle(&paths, &name),
                    owner: Self::recorded_owner(&paths).await,
                });
            }
        }
        vms.sort_by(|a, b| a.vm.name.cmp(&b.vm.name));
        Ok(vms)
    }

    /// qcow2 overlays are thin: each sandbox takes what its folder's files occupy on the host.
    async fn disk_usage(&self) -> Result<DiskUsage, BackendError> {
        let vms = self.list_vms().await?;
        let dir = self.dirs.sandboxes.clone();
        let measured = tokio::task::spawn_blocking(move || {
            let mut allocated = HashMap::new();
            for vm in vms {
                let folder = SandboxPaths::new(&dir, &vm.vm.name).dir;
                match layout::allocated_bytes(&folder) {
                    Ok(bytes) => {
                        allocated.insert(vm.vm.name, bytes);
                    }
                    // Destroyed since the listing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(BackendError::io(
                            format!("measuring {}", folder.display()),
                            e,
                        ))
                    }
                }
            }
            Ok(allocated)
        })
        .await
        .map_err(|e| BackendError::operation("disk usage", e.to_string()))??;
        Ok(DiskUsage {
            provisioning: Provisioning::Thin,
            allocated: measured,
        })
    }

    /// PSS and RSS of each running sandbox of this daemon's, by its trusted pidfile; cached for
    /// `memory::MEMORY_USAGE_MAX_AGE`.
    async fn memory_usage(&self) -> Result<MemoryUsage, BackendError> {
        self.memory
            .get_or_measure(|| async {
                let mut pids = Vec::new();
                for listed in self.list_vms().await? {
                    let ours = self.instance.is_none() || listed.owner == self.instance;
                    if !ours {
                        continue;
                    }
                    let paths = SandboxPaths::new(&self.dirs.sandboxes, &listed.vm.name);
                    if let Some(pid) = process::running_pid(&paths).await? {
                        pids.push((listed.vm.name, pid));
                    }
                }
                memory::measure(pids).await
            })
            .await
    }
}

/// The environment for `guest-exec`: empty keeps the agent's own; otherwise PATH is supplied if
/// the caller left it out.
fn guest_env(env: &BTreeMap<String, String>) -> Vec<String> {
    if env.is_empty() {
        return Vec::new();
    }
    let mut entries: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !env.contains_key("PATH") {
        entries.push(format!("PATH={GUEST_DEFAULT_PATH}"));
    }
    entries
}

fn seed_error(error: SeedError) -> BackendError {
    match error {
        SeedError::Render(_) => BackendError::InvalidInput(error.to_string()),
        SeedError::Io { context, source } => BackendError::io(context, source),
        SeedError::Tool(e) => tool_error("clone", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::layout::{Boot, KernelBoot};

    fn backend(root: &Path) -> QemuBackend {
        QemuBackend::new(
            QemuConfig::default(),
            QemuDirs {
                images: root.join("images"),
                sandboxes: root.join("sandboxes"),
                snapshots: root.join("snapshots"),
            },
            "127.0.0.1:8848".parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn constructor_validates_its_inputs() {
        let dirs = QemuDirs {
            images: "/i".into(),
            sandboxes: "/s".into(),
            snapshots: "/snap".into(),
        };
        let endpoint: SocketAddr = "127.0.0.1:8848".parse().unwrap();
        assert!(QemuBackend::new(QemuConfig::default(), dirs.clone(), endpoint).is_ok());
        let any: SocketAddr = "0.0.0.0:8848".parse().unwrap();
        let backend = QemuBackend::new(QemuConfig::default(), dirs.clone(), any).unwrap();
        assert_eq!(
            backend.guest_endpoint, endpoint,
            "0.0.0.0 is reached on loopback"
        );
        let no_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(QemuBackend::new(QemuConfig::default(), dirs.clone(), no_port).is_err());
        let relative = QemuDirs {
            sandboxes: "s".into(),
            ..dirs.clone()
        };
        assert!(QemuBackend::new(QemuConfig::default(), relative, endpoint).is_err());
        let config = QemuConfig {
            socat_binary: "/opt/my socat".into(),
            ..QemuConfig::default()
        };
        assert!(QemuBackend::new(config, dirs, endpoint).is_err());
    }

    #[test]
    fn guest_url_is_where_guestfwd_listens() {
        let forwarded = launch::GUEST_ENDPOINT_IN_GUEST.strip_suffix(":80").unwrap();
        assert_eq!(GUEST_URL, format!("http://{forwarded}"));
    }

    #[test]
    fn dirs_default_under_data_dir() {
        let dirs = QemuDirs::resolve(&QemuConfig::default(), Path::new("/var/lib/agentlab"));
        assert_eq!(dirs.images, Path::new("/var/lib/agentlab/images"));
        assert_eq!(dirs.sandboxes, Path::new("/var/lib/agentlab/sandboxes"));
    }

    #[test]
    fn guest_env_supplies_path_only_when_replacing_the_environment() {
        assert!(guest_env(&BTreeMap::new()).is_empty());
        let env = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        assert_eq!(
            guest_env(&env),
            ["A=1", &format!("PATH={GUEST_DEFAULT_PATH}")]
        );
        let env = BTreeMap::from([("PATH".to_owned(), "/bin".to_owned())]);
        assert_eq!(guest_env(&env), ["PATH=/bin"]);
    }

    #[tokio::test]
    async fn handles_must_point_at_their_own_folder() {
        let root = tempfile::tempdir().unwrap();
        let backend = backend(root.path());
        let forged = VmHandle {
            name: "sandbox-abc".into(),
            vm_ref: "/etc".into(),
        };
        assert!(matches!(
            backend.destroy_vm(&forged).await,
            Err(BackendError::InvalidInput(_))
        ));
        let foreign = VmHandle {
            name: "../../etc".into(),
            vm_ref: root
                .path()
                .join("sandboxes/../../etc")
                .display()
                .to_string(),
        };
        assert!(backend.destroy_vm(&foreign).await.is_err());
    }

    #[tokio::test]
    async fn missing_vms_are_missing_and_destroy_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let backend = backend(root.path());
        let sandboxes = root.path().join("sandboxes");
        let vm = VmHandle {
            name: "sandbox-none".into(),
            vm_ref: sandboxes.join("sandbox-none").display().to_string(),
        };
        assert_eq!(backend.vm_state(&vm).await.unwrap(), VmState::Missing);
        backend.destroy_vm(&vm).await.unwrap();
        assert!(matches!(
            backend.start_vm(&vm).await,
            Err(BackendError::Missing(_))
        ));
        assert!(matches!(
            backend.agent_ping(&vm).await,
            Err(BackendError::Missing(_))
        ));
        assert!(backend.list_vms().await.unwrap().is_empty());

        // Residue of an interrupted clone: listed, stopped, destroyable.
        std::fs::create_dir_all(sandboxes.join("sandbox-none")).unwrap();
        std::fs::create_dir_all(sandboxes.join("not-ours")).unwrap();
        std::fs::create_dir_all(sandboxes.join(".kvm-probe")).unwrap();
        let listed = backend.list_vms().await.unwrap();
        assert_eq!(
            listed,
            [ListedVm {
                vm: vm.clone(),
                owner: None
            }]
        );
        assert_eq!(backend.vm_state(&vm).await.unwrap(), VmState::Stopped);
        assert!(backend.start_vm(&vm).await.is_err());
        backend.destroy_vm(&vm).await.unwrap();
        assert_eq!(backend.vm_state(&vm).await.unwrap(), VmState::Missing);
        assert!(sandboxes.join("not-ours").exists());
    }

    /// A sandbox folder holding `sandbox.json` that names `owner`, as a clone writes it.
    fn sandbox_folder(sandboxes: &Path, name: &str, owner: Option<&str>) -> VmHandle {
        let paths = SandboxPaths::new(sandboxes, name);
        std::fs::create_dir_all(&paths.dir).unwrap();
        let record = SandboxRecord {
            name: name.into(),
            job_id: "job".into(),
            created_ms: 0,
            template: Template {
                boot: Boot::Kernel(KernelBoot {
                    kernel: "/i/vmlinuz".into(),
                    initrd: "/i/initrd.img".into(),
                    cmdline: String::new(),
                }),
                root_disk: "/i/root.qcow2".into(),
            },
            cores: 1,
            memory_mb: 256,
            disk_gb: 1,
            network: crate::backend::NetworkMode::Restricted,
            owner: owner.map(str::to_owned),
            restore: None,
            start: crate::model::StartMode::Cold,
        };
        std::fs::write(paths.record(), serde_json::to_vec(&record).unwrap()).unwrap();
        std::fs::write(paths.overlay(), b"disk").unwrap();
        std::fs::write(paths.complete_marker(), b"").unwrap();
        QemuBackend::handle(&paths, name)
    }

    #[tokio::test]
    async fn folders_of_another_daemon_are_listed_with_their_owner_and_never_removed() {
        let root = tempfile::tempdir().unwrap();
        let backend = backend(root.path()).with_instance("0199-ours");
        let sandboxes = root.path().join("sandboxes");
        let ours = sandbox_folder(&sandboxes, "sandbox-ours", Some("0199-ours"));
        let theirs = sandbox_folder(&sandboxes, "sandbox-theirs", Some("0199-theirs"));
        let legacy = sandbox_folder(&sandboxes, "sandbox-legacy", None);
        let by_hand = SandboxPaths::new(&sandboxes, "sandbox-byhand");
        std::fs::create_dir_all(&by_hand.dir).unwrap();
        std::fs::write(by_hand.dir.join("notes.txt"), b"mine").unwrap();

        let owners: Vec<(String, Option<String>)> = backend
            .list_vms()
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.vm.name, l.owner))
            .collect();
        assert_eq!(
            owners,
            [
                ("sandbox-byhand".to_owned(), None),
                ("sandbox-legacy".to_owned(), None),
                ("sandbox-ours".to_owned(), Some("0199-ours".to_owned())),
                ("sandbox-theirs".to_owned(), Some("0199-theirs".to_owned())),
            ]
        );

        let err = backend.destroy_vm(&theirs).await.unwrap_err();
        assert!(err.to_string().contains("0199-theirs"), "{err}");
        assert!(SandboxPaths::new(&sandboxes, "sandbox-theirs")
            .complete_marker()
            .exists());
        // Nor is it taken for the residue of one of our clones and cleared.
        let mut spec_theirs = SandboxSpec {
            job_id: "job".into(),
            name: "sandbox-theirs".into(),
            template: String::new(),
            cores: 1,
            memory_mb: 256,
            disk_gb: 1,
            network: crate::backend::NetworkMode::Restricted,
            cloud_init: Some(crate::backend::CloudInitSpec {
                hostname: "sandbox-theirs".into(),
                phone_home_url: "http://10.0.2.100/p".into(),
                guest_url: "http://10.0.2.100".into(),
                bootstrap_token: "t".into(),
            }),
            runner: None,
            owner: "0199-ours".into(),
            start: crate::model::StartMode::Cold,
            restore_from: None,
        };
        let err = backend.clone_vm(&spec_theirs).await.unwrap_err();
        assert!(err.to_string().contains("0199-theirs"), "{err}");
        std::fs::remove_file(SandboxPaths::new(&sandboxes, "sandbox-theirs").complete_marker())
            .unwrap();
        spec_theirs.job_id = "another".into();
        let err = backend.clone_vm(&spec_theirs).await.unwrap_err();
        assert!(err.to_string().contains("0199-theirs"), "{err}");
        assert!(SandboxPaths::new(&sandboxes, "sandbox-theirs")
            .overlay()
            .exists());

        // Ours, and one from before instance ids, are destroyed when asked.
        backend.destroy_vm(&ours).await.unwrap();
        backend.destroy_vm(&legacy).await.unwrap();
        assert!(!Path::new(&ours.vm_ref).exists());
        assert!(!Path::new(&legacy.vm_ref).exists());
    }

    /// Kills a test's stand-in QEMU even when an assertion fails first.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A process naming a file in the sandbox folder, recorded in its pidfile, as QEMU is.
    fn stand_in_qemu(sandboxes: &Path, name: &str) -> KillOnDrop {
        let paths = SandboxPaths::new(sandboxes, name);
        let log = paths.dir.join("console.log");
        std::fs::write(&log, b"").unwrap();
        let child = std::process::Command::new("tail")
            .arg("-f")
            .arg(&log)
            .spawn()
            .unwrap();
        std::fs::write(paths.pidfile(), format!("{}\n", child.id())).unwrap();
        KillOnDrop(child)
    }

    #[tokio::test]
    async fn memory_usage_measures_running_sandboxes_of_this_daemon_only() {
        let root = tempfile::tempdir().unwrap();
        let backend = backend(root.path()).with_instance("0199-ours");
        let sandboxes = root.path().join("sandboxes");
        sandbox_folder(&sandboxes, "sandbox-running", Some("0199-ours"));
        sandbox_folder(&sandboxes, "sandbox-stopped", Some("0199-ours"));
        sandbox_folder(&sandboxes, "sandbox-theirs", Some("0199-theirs"));
        let _running = stand_in_qemu(&sandboxes, "sandbox-running");
        let _theirs = stand_in_qemu(&sandboxes, "sandbox-theirs");

        let usage = backend.memory_usage().await.unwrap();
        let names: Vec<&str> = usage.by_vm.keys().map(String::as_str).collect();
        assert_eq!(names, ["sandbox-running"], "{usage:?}");
        let running = usage.by_vm["sandbox-running"];
        assert!(running.pss_bytes > 0, "{running:?}");
        assert!(running.rss_bytes >= running.pss_bytes, "{running:?}");
    }
}

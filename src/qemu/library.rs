//! The local backend's snapshot library: which snapshot a sandbox's spec maps to, whether it is
//! there, making it once however many jobs ask at the same time, discarding one that failed to
//! restore, and clearing what is stale (a making cut short by a crash, a snapshot of a template
//! build or QEMU that is gone, once no sandbox is restored from it any more).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::accel::{AccelChooser, Accelerator, ProbeBoot};
use super::files::remove_dir_all;
use super::layout::Template;
use super::overlay;
use super::snapshot::{
    self, QemuBuild, SnapshotEntry, SnapshotFiles, SnapshotManifest, SnapshotShape, SNAPSHOT_FORMAT,
};
use super::snapshot_maker::SnapshotMaker;
use super::tool;
use crate::backend::{BackendError, SandboxSpec, SnapshotInfo};
use crate::config::qemu::QemuConfig;

#[derive(Debug)]
pub struct SnapshotLibrary {
    maker: SnapshotMaker,
    images_dir: PathBuf,
    accel: Arc<AccelChooser>,
    /// One lock per snapshot id: held by its making, so a second caller waits for the first
    /// making instead of starting its own.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The QEMU binary's build, re-read when the binary's size or time changes.
    qemu_build: Mutex<Option<QemuBuild>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SnapshotLibrary {
    pub fn new(
        maker: SnapshotMaker,
        images_dir: PathBuf,
        accel: Arc<AccelChooser>,
    ) -> SnapshotLibrary {
        SnapshotLibrary {
            maker,
            images_dir,
            accel,
            locks: Mutex::new(HashMap::new()),
            qemu_build: Mutex::new(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.maker.snapshots_dir
    }

    fn config(&self) -> &QemuConfig {
        &self.maker.config
    }

    /// The shape a sandbox of `spec` has on this host, with the accelerator it boots with.
    pub async fn shape_for(
        &self,
        spec: &SandboxSpec,
    ) -> Result<(SnapshotShape, Accelerator), BackendError> {
        let config = self.config();
        let template = Template::resolve(
            &self.images_dir,
            &spec.template,
            config.kernel_cmdline.as_deref(),
        )
        .await?;
        let root_disk_modified_ms = tokio::fs::metadata(&template.root_disk)
            .await
            .map(|meta| snapshot::modified_ms(&meta))
            .map_err(|e| {
                BackendError::io(format!("reading {}", template.root_disk.display()), e)
            })?;
        let disk_bytes = overlay::size_for(&template.root_disk, spec.disk_gb).await?;
        let accel = self.accel.choose(ProbeBoot::of(&template)).await;
        let qemu = self.qemu_build().await?;
        let shape = SnapshotShape {
            format: SNAPSHOT_FORMAT,
            template_name: spec.template.clone(),
            template,
            root_disk_modified_ms,
            qemu,
            accel: accel.as_str().to_owned(),
            cores: config.clamp_cores(spec.cores),
            memory_mb: config.clamp_memory_mb(spec.memory_mb),
            disk_bytes,
            network: spec.network,
            runner_sha256: runner_of(spec).map(|r| r.sha256.clone()),
        };
        Ok((shape, accel))
    }

    /// The finished snapshot `id`, if it is whole.
    pub async fn ready(&self, id: &str) -> Result<Option<SnapshotManifest>, BackendError> {
        let files = SnapshotFiles::new(self.dir(), id);
        let Some(manifest) = files.read_manifest().await? else {
            return Ok(None);
        };
        if manifest.id != id || manifest.shape.id() != id {
            return Ok(None);
        }
        if files.missing_file().await.is_some() {
            return Ok(None);
        }
        Ok(Some(manifest))
    }

    /// Makes the snapshot of `shape` unless it is there. The making runs in a task of its own:
    /// a caller that is cancelled (a phase timeout, a cancelled job) does not cut it short and
    /// leave a template VM behind, and the next caller finds the snapshot made.
    pub async fn make(
        self: &Arc<Self>,
        shape: SnapshotShape,
        accel: Accelerator,
        runner: Option<crate::backend::RunnerFetch>,
    ) -> Result<SnapshotManifest, BackendError> {
        let id = shape.id();
        let id_lock = Arc::clone(lock(&self.locks).entry(id.clone()).or_default());
        let library = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _making = id_lock.lock().await;
            if let Some(manifest) = library.ready(&id).await? {
                return Ok(manifest);
            }
            library.maker.make(&shape, accel, runner.as_ref()).await
        });
        task.await
            .map_err(|e| BackendError::operation("snapshot", e.to_string()))?
    }

    /// Removes snapshot `id` after a restore from it failed. Sandboxes running from it keep
    /// their open files; one not started yet falls back to a cold boot.
    pub async fn discard(&self, id: &str, reason: &str) -> Result<(), BackendError> {
        let files = SnapshotFiles::new(self.dir(), id);
        if !self.is_ours(&files).await {
            return Ok(());
        }
        tracing::warn!(snapshot = %id, %reason, "discarding a snapshot that did not restore");
        remove_dir_all(&files.dir).await
    }

    async fn is_ours(&self, files: &SnapshotFiles) -> bool {
        match (self.maker.owner.as_deref(), files.recorded_owner().await) {
            (Some(ours), Some(theirs)) => ours == theirs,
            // Without instance ids (tests) or from before them: ours.
            (None, _) | (_, None) => true,
        }
    }

    /// Clears what is stale: folders of makings that no task is running (a crash cut them
    /// short), and finished snapshots that no longer match their template or QEMU and that no
    /// sandbox in `in_use` is restored from. Names what it removed.
    pub async fn sweep(&self, in_use: &HashSet<String>) -> Result<Vec<String>, BackendError> {
        let mut entries = match tokio::fs::read_dir(self.dir()).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(BackendError::io(
                    format!("listing {}", self.dir().display()),
                    e,
                ))
            }
        };
        let mut removed = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| BackendError::io(format!("listing {}", self.dir().display()), e))?
        {
            let Some(parsed) = entry.file_name().to_str().and_then(SnapshotEntry::parse) else {
                continue;
            };
            match parsed {
                SnapshotEntry::Building(id) => {
                    let files = SnapshotFiles::building(self.dir(), &id);
                    if self.making(&id) || !self.is_ours(&files).await {
                        continue;
                    }
                    self.maker.clear(&files).await?;
                    removed.push(format!("snapshot {id} (an interrupted making)"));
                }
                SnapshotEntry::Finished(id) => {
                    let files = SnapshotFiles::new(self.dir(), &id);
                    if in_use.contains(&id) || self.making(&id) || !self.is_ours(&files).await {
                        continue;
                    }
                    let Ok(Some(manifest)) = files.read_manifest().await else {
                        continue;
                    };
                    if self.is_current(&manifest.shape).await {
                        continue;
                    }
                    remove_dir_all(&files.dir).await?;
                    removed.push(format!("snapshot {id} (its template or QEMU changed)"));
                }
            }
        }
        Ok(removed)
    }

    fn making(&self, id: &str) -> bool {
        lock(&self.locks)
            .get(id)
            .is_some_and(|l| l.try_lock().is_err())
    }

    /// Whether a snapshot's template build and QEMU are still the ones a new sandbox gets.
    async fn is_current(&self, shape: &SnapshotShape) -> bool {
        let template = Template::resolve(
            &self.images_dir,
            &shape.template_name,
            self.config().kernel_cmdline.as_deref(),
        )
        .await;
        let same_template = template.is_ok_and(|t| t == shape.template);
        let same_qemu = self.qemu_build().await.is_ok_and(|q| q == shape.qemu);
        same_template && same_qemu
    }

    /// The QEMU binary's build; `--version` runs again only when the binary changed.
    async fn qemu_build(&self) -> Result<QemuBuild, BackendError> {
        let binary = self.config().qemu_binary.clone();
        let (path, size, modified_ms) =
            tokio::task::spawn_blocking(move || snapshot::locate_binary(&binary))
                .await
                .map_err(|e| BackendError::operation("snapshot", e.to_string()))?
                .map_err(|e| {
                    BackendError::io(
                        format!("finding {}", self.config().qemu_binary.display()),
                        e,
                    )
                })?;
        if let Some(known) = lock(&self.qemu_build).as_ref() {
            if known.path == path && known.size == size && known.modified_ms == modified_ms {
                return Ok(known.clone());
            }
        }
        let mut command = tokio::process::Command::new(&path);
        command.arg("--version");
        let output = tool::run(command, self.config().tool_timeout)
            .await
            .map_err(|e| overlay::tool_error("snapshot", e))?;
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let build = QemuBuild {
            path,
            version,
            size,
            modified_ms,
        };
        *lock(&self.qemu_build) = Some(build.clone());
        Ok(build)
    }
}

impl From<&SnapshotManifest> for SnapshotInfo {
    fn from(manifest: &SnapshotManifest) -> SnapshotInfo {
        SnapshotInfo {
            id: manifest.id.clone(),
            made_seconds: manifest.made_seconds,
            memory_bytes: manifest.memory_bytes,
            state_bytes: manifest.state_bytes,
            disk_bytes: manifest.disk_bytes,
            cloud_init_result: manifest.cloud_init_result.clone(),
        }
    }
}

/// The runner fetch of the spec's seed, which the template VM of its snapshot uses too: a job's
/// and a pool sandbox's alike, so both map to one snapshot.
fn runner_of(spec: &SandboxSpec) -> Option<&crate::backend::RunnerFetch> {
    spec.runner.as_ref()
}

//! Where an import works and how its result becomes the template: a scratch folder under the
//! images folder (one import at a time, leftovers of a crashed one cleared by the next), the
//! template's `manifest.json`, and publishing as the build scripts do: the build moved to
//! `images/NAME/builds/<id>/`, the `current` link swapped by a rename under the template's
//! `.lock` (the lock the scripts take too), the stable names linking into `current/`, and only
//! the newest builds kept.

use std::path::{Path, PathBuf};

use rand::RngCore;

use super::{io_error, ImportError};
use crate::backend::templates::TemplateImport;

/// As the build scripts: the new build and the one before it (running VMs hold theirs open).
const KEEP_BUILDS: usize = 2;
const SCRATCH_PREFIX: &str = ".import-";
const IMPORT_LOCK: &str = ".import.lock";
/// What only a build script's (kernel-booted) template folder holds.
const BUILT_TEMPLATE_FILES: [&str; 2] = ["vmlinuz", "initrd.img"];

/// The folder one import works in, with the lock that makes it the only one.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    _lock: std::fs::File,
}

impl Scratch {
    /// Takes the images folder's import lock (waiting for an import under way), clears what a
    /// crashed import left, and makes a fresh folder.
    pub async fn create(images_dir: &Path, name: &str) -> Result<Scratch, ImportError> {
        let images_dir = images_dir.to_owned();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&images_dir)
                .map_err(io_error(format!("creating {}", images_dir.display())))?;
            let lock = lock_file(&images_dir.join(IMPORT_LOCK))?;
            let entries = std::fs::read_dir(&images_dir)
                .map_err(io_error(format!("listing {}", images_dir.display())))?;
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(SCRATCH_PREFIX)
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            let path = images_dir.join(format!("{SCRATCH_PREFIX}{name}"));
            std::fs::create_dir(&path).map_err(io_error(format!("creating {}", path.display())))?;
            Ok(Scratch { path, _lock: lock })
        })
        .await
        .map_err(|e| ImportError::Task(e.to_string()))?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn remove(self) {
        if let Err(e) = tokio::fs::remove_dir_all(&self.path).await {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove an import's scratch folder");
        }
    }
}

/// Opens `path` (made if missing) and takes its exclusive lock, waiting for it.
fn lock_file(path: &Path) -> Result<std::fs::File, ImportError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_error(format!("opening {}", path.display())))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_error(format!("locking {}", path.display()))(e.into()))?;
    Ok(file)
}

/// Whether the template folder holds a kernel-booted template (a build script's), which an
/// import must not take over.
pub async fn is_built_template(dir: &Path) -> bool {
    for file in BUILT_TEMPLATE_FILES {
        if tokio::fs::symlink_metadata(dir.join(file)).await.is_ok() {
            return true;
        }
    }
    false
}

/// A build id as the scripts make them: UTC time, then random hex.
pub fn build_id() -> String {
    let time: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let mut random = [0u8; 6];
    rand::rng().fill_bytes(&mut random);
    format!("{time}-{}", hex::encode(random))
}

/// The template's `manifest.json`: how it boots, what it came from, and what its check found.
pub async fn write_manifest(
    build: &Path,
    import: &TemplateImport,
    source_name: &str,
) -> Result<(), ImportError> {
    let check = &import.check;
    let manifest = serde_json::json!({
        "format": 1,
        "boot": import.boot,
        "build_id": import.build_id,
        "built_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "build_seconds": import.import_seconds.round(),
        "imported_from": {
            "name": source_name,
            "format": check.format,
            "virtual_size": check.virtual_size,
        },
        "os": check.os,
        "partition_table": check.partition_table,
        "boot_loader": check.boot_loader,
        "root_partition": check.root_partition,
        "root_fs": check.root_fs,
        "found": check.found,
        "files": {
            "root.qcow2": {
                "size": import.disk_bytes,
                "format": "qcow2",
                "virtual_size": check.virtual_size,
            },
        },
    });
    let path = build.join("manifest.json");
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ImportError::Task(format!("writing the manifest: {e}")))?;
    tokio::fs::write(&path, text)
        .await
        .map_err(io_error(format!("writing {}", path.display())))
}

/// Moves `build` into template folder `dir` as build `build_id` and makes it current.
pub async fn publish(dir: PathBuf, build: PathBuf, build_id: String) -> Result<(), ImportError> {
    tokio::task::spawn_blocking(move || publish_blocking(&dir, &build, &build_id))
        .await
        .map_err(|e| ImportError::Task(e.to_string()))?
}

fn publish_blocking(dir: &Path, build: &Path, build_id: &str) -> Result<(), ImportError> {
    let builds = dir.join("builds");
    std::fs::create_dir_all(&builds).map_err(io_error(format!("creating {}", builds.display())))?;
    let _lock = lock_file(&dir.join(".lock"))?;
    // Under the lock: a build script may have made the folder a kernel template meanwhile.
    if BUILT_TEMPLATE_FILES
        .iter()
        .any(|f| std::fs::symlink_metadata(dir.join(f)).is_ok())
    {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        return Err(ImportError::NotImported(name.unwrap_or_default()));
    }
    let target = builds.join(build_id);
    std::fs::rename(build, &target).map_err(io_error(format!(
        "moving the build to {}",
        target.display()
    )))?;
    replace_link(dir, "current", Path::new("builds").join(build_id).as_path())?;
    for file in ["root.qcow2", "manifest.json"] {
        replace_link(dir, file, Path::new("current").join(file).as_path())?;
    }
    prune(&builds, build_id);
    Ok(())
}

/// Points `dir/name` at `target` in one rename, so that no reader sees it missing.
fn replace_link(dir: &Path, name: &str, target: &Path) -> Result<(), ImportError> {
    let link = dir.join(name);
    let staged = dir.join(format!(".{name}.link"));
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(target, &staged)
        .map_err(io_error(format!("linking {}", staged.display())))?;
    std::fs::rename(&staged, &link).map_err(io_error(format!("replacing {}", link.display())))
}

/// Removes all but the newest `KEEP_BUILDS` builds (ids sort by time), never `current`.
fn prune(builds: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(builds) else {
        return;
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    let old = ids.len().saturating_sub(KEEP_BUILDS);
    for id in ids.into_iter().take(old).filter(|id| id != current) {
        if let Err(e) = std::fs::remove_dir_all(builds.join(&id)) {
            tracing::warn!(build = %id, error = %e, "cannot remove an old template build");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_swaps_current_keeps_two_builds_and_refuses_a_built_template() {
        let images = tempfile::tempdir().unwrap();
        let dir = images.path().join("stock");
        let mut ids = Vec::new();
        for n in 0..3 {
            let build = images.path().join(format!("b{n}"));
            std::fs::create_dir(&build).unwrap();
            std::fs::write(build.join("root.qcow2"), format!("disk {n}")).unwrap();
            std::fs::write(build.join("manifest.json"), "{}").unwrap();
            let id = format!("2026120{n}T000000Z-00");
            publish_blocking(&dir, &build, &id).unwrap();
            ids.push(id);
            assert_eq!(
                std::fs::read_to_string(dir.join("root.qcow2")).unwrap(),
                format!("disk {n}")
            );
        }
        let mut kept: Vec<String> = std::fs::read_dir(dir.join("builds"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ids[1..]);
        assert_eq!(
            std::fs::read_link(dir.join("current")).unwrap(),
            Path::new("builds").join(&ids[2])
        );

        std::os::unix::fs::symlink("current/vmlinuz", dir.join("vmlinuz")).unwrap();
        let build = images.path().join("b3");
        std::fs::create_dir(&build).unwrap();
        let err = publish_blocking(&dir, &build, "20261204T000000Z-00").unwrap_err();
        assert!(matches!(err, ImportError::NotImported(_)), "{err}");
        assert!(build.exists(), "a refused build stays where it was");
    }

    #[test]
    fn build_ids_sort_by_time_and_differ() {
        let (a, b) = (build_id(), build_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), "20261203T120110Z-".len() + 12, "{a}");
        assert!(a.as_bytes()[8] == b'T' && a.contains("Z-"), "{a}");
    }
}

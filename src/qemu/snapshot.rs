//! Template snapshots on disk: what identifies one, the files of one and its manifest.
//!
//! A snapshot is a booted template guest, paused and saved: its RAM (`memory`, the file the
//! template VM's RAM was mapped from), its device state (`state`, a migration stream) and its root
//! disk as it was at the pause (`overlay.qcow2`, an overlay of the template's root disk, which
//! becomes the read-only base of every restored sandbox's overlay). It lives in
//! `snapshots_dir/<id>/`, where the id hashes everything a restore depends on: the template's
//! resolved build, the QEMU binary and its version, the accelerator, and the VM's shape (vCPUs,
//! memory, disk size, network mode). A rebuilt template or another QEMU gives another id, so a
//! stale snapshot is never restored; `snapshot_maker` makes the new one.
//!
//! A snapshot is made in `<id>.building/` and renamed into place once whole, so a folder named by
//! a bare id is always complete. Each folder records the instance id of the daemon that made it
//! (`owner`, written first), and a daemon only ever removes its own.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::layout::{SandboxPaths, Template};
use crate::backend::{BackendError, NetworkMode};

/// Bumped whenever the way a snapshot is made or restored changes incompatibly (another device
/// on the command line, say), so that older snapshots stop matching.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The suffix of a folder a snapshot is being made in.
const BUILDING_SUFFIX: &str = ".building";

/// The QEMU binary a snapshot was made with: its state only loads into the same QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuBuild {
    /// The binary's resolved path.
    pub path: PathBuf,
    /// The first line of `--version`.
    pub version: String,
    pub size: u64,
    pub modified_ms: i64,
}

/// Everything a restore depends on. Two sandboxes whose shapes are equal can be restored from
/// the same snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotShape {
    pub format: u32,
    /// The template's name as profiles give it ("" for the default).
    pub template_name: String,
    /// The template's files, resolved to the build they come from.
    pub template: Template,
    pub root_disk_modified_ms: i64,
    pub qemu: QemuBuild,
    pub accel: String,
    pub cores: u32,
    pub memory_mb: u64,
    /// The root disk's virtual size, as the guest saw it at the pause.
    pub disk_bytes: u64,
    /// The guest's DHCP lease (a route and DNS, or neither) depends on it.
    pub network: NetworkMode,
    /// The sha256 of the daemon's runner the template VM fetched, if it fetched one: every
    /// restored sandbox has that runner, so a daemon with another one makes a new snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_sha256: Option<String>,
}

impl SnapshotShape {
    /// The snapshot's id: 16 hex digits of the shape's hash.
    pub fn id(&self) -> String {
        // A struct of plain fields always serializes; the fallback only keeps this total.
        let text = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&text);
        hex::encode(&digest[..8])
    }
}

/// What `manifest.json` in a snapshot's folder says about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub id: String,
    pub shape: SnapshotShape,
    pub owner: Option<String>,
    pub created_ms: i64,
    /// From the template VM's launch until the snapshot was saved.
    pub made_seconds: f64,
    /// What the files take on the host (allocated blocks; the memory file is sparse).
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub disk_bytes: u64,
    /// The template VM's `/run/cloud-init/result.json` as it was read before the pause (every
    /// restored sandbox has the same), for the daemon to record cloud-init's verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init_result: Option<String>,
}

/// The files of one snapshot folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub dir: PathBuf,
}

impl SnapshotFiles {
    /// The folder of the finished snapshot `id`.
    pub fn new(snapshots_dir: &Path, id: &str) -> SnapshotFiles {
        SnapshotFiles {
            dir: snapshots_dir.join(id),
        }
    }

    /// The folder snapshot `id` is made in.
    pub fn building(snapshots_dir: &Path, id: &str) -> SnapshotFiles {
        SnapshotFiles {
            dir: snapshots_dir.join(format!("{id}{BUILDING_SUFFIX}")),
        }
    }

    /// The folder as a VM's: the template VM's sockets, pidfile, logs, root disk overlay
    /// (`overlay.qcow2`) and seed live under the same names as a sandbox's.
    pub fn vm(&self) -> SandboxPaths {
        SandboxPaths {
            dir: self.dir.clone(),
        }
    }

    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn disk(&self) -> PathBuf {
        self.vm().overlay()
    }

    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// The instance id of the daemon making the snapshot, written before anything else.
    pub fn owner(&self) -> PathBuf {
        self.dir.join("owner")
    }

    /// Whether the files a restore opens are all there.
    pub async fn missing_file(&self) -> Option<PathBuf> {
        for path in [self.memory(), self.state(), self.disk()] {
            if !matches!(tokio::fs::try_exists(&path).await, Ok(true)) {
                return Some(path);
            }
        }
        None
    }

    /// The manifest, or None without one (a folder being made, or not a snapshot).
    pub async fn read_manifest(&self) -> Result<Option<SnapshotManifest>, BackendError> {
        let path = self.manifest();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackendError::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| BackendError::InvalidInput(format!("{}: {e}", path.display())))
    }

    /// The owner recorded in the folder, from the manifest or, while it is made, `owner`.
    pub async fn recorded_owner(&self) -> Option<String> {
        if let Ok(Some(manifest)) = self.read_manifest().await {
            return manifest.owner;
        }
        let text = tokio::fs::read_to_string(self.owner()).await.ok()?;
        let owner = text.trim();
        (!owner.is_empty()).then(|| owner.to_owned())
    }
}

/// What a folder under `snapshots_dir` is, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotEntry {
    Finished(String),
    Building(String),
}

impl SnapshotEntry {
    /// Parses a folder name; None for anything that is not a snapshot's.
    pub fn parse(name: &str) -> Option<SnapshotEntry> {
        let (id, building) = match name.strip_suffix(BUILDING_SUFFIX) {
            Some(id) => (id, true),
            None => (name, false),
        };
        let valid = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
        match (valid, building) {
            (false, _) => None,
            (true, true) => Some(SnapshotEntry::Building(id.to_owned())),
            (true, false) => Some(SnapshotEntry::Finished(id.to_owned())),
        }
    }
}

/// Resolves `binary` through PATH the way a spawn does, and reads what identifies its build.
/// Blocking: run it off the executor.
pub fn locate_binary(binary: &Path) -> std::io::Result<(PathBuf, u64, i64)> {
    let found = if binary.components().count() > 1 {
        binary.to_owned()
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} is not on PATH", binary.display()),
                )
            })?
    };
    let resolved = std::fs::canonicalize(&found)?;
    let meta = std::fs::metadata(&resolved)?;
    Ok((resolved, meta.len(), modified_ms(&meta)))
}

/// A file's modification time in milliseconds since the epoch (0 where the host cannot say).
pub fn modified_ms(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::layout::{Boot, KernelBoot};

    fn shape() -> SnapshotShape {
        SnapshotShape {
            format: SNAPSHOT_FORMAT,
            template_name: String::new(),
            template: Template {
                boot: Boot::Kernel(KernelBoot {
                    kernel: "/i/builds/1/vmlinuz".into(),
                    initrd: "/i/builds/1/initrd.img".into(),
                    cmdline: "console=ttyS0".into(),
                }),
                root_disk: "/i/builds/1/root.qcow2".into(),
            },
            root_disk_modified_ms: 1,
            qemu: QemuBuild {
                path: "/usr/bin/qemu-system-x86_64".into(),
                version: "QEMU emulator version 7.2.22".into(),
                size: 10,
                modified_ms: 2,
            },
            accel: "tcg".into(),
            cores: 1,
            memory_mb: 256,
            disk_bytes: 4 << 30,
            network: NetworkMode::Restricted,
            runner_sha256: None,
        }
    }

    #[test]
    fn every_input_of_a_restore_changes_the_id() {
        let base = shape();
        let id = base.id();
        assert_eq!(id.len(), 16);
        assert_eq!(id, shape().id(), "the id is stable");
        let variants: Vec<SnapshotShape> = vec![
            SnapshotShape {
                template: Template {
                    root_disk: "/i/builds/2/root.qcow2".into(),
                    ..base.template.clone()
                },
                ..base.clone()
            },
            SnapshotShape {
                qemu: QemuBuild {
                    version: "QEMU emulator version 8.2.0".into(),
                    ..base.qemu.clone()
                },
                ..base.clone()
            },
            SnapshotShape {
                accel: "kvm".into(),
                ..base.clone()
            },
            SnapshotShape {
                memory_mb: 512,
                ..base.clone()
            },
            SnapshotShape {
                cores: 2,
                ..base.clone()
            },
            SnapshotShape {
                network: NetworkMode::Egress,
                ..base.clone()
            },
            SnapshotShape {
                format: SNAPSHOT_FORMAT + 1,
                ..base.clone()
            },
        ];
        for variant in variants {
            assert_ne!(variant.id(), id, "{variant:?}");
        }
    }

    #[test]
    fn folder_names_parse_into_snapshots_and_nothing_else() {
        assert_eq!(
            SnapshotEntry::parse("0123456789abcdef"),
            Some(SnapshotEntry::Finished("0123456789abcdef".into()))
        );
        assert_eq!(
            SnapshotEntry::parse("0123456789abcdef.building"),
            Some(SnapshotEntry::Building("0123456789abcdef".into()))
        );
        for other in [
            "",
            "notes",
            "0123456789abcde",
            "0123456789abcdeg",
            ".building",
            "0123456789abcdef.old",
        ] {
            assert_eq!(SnapshotEntry::parse(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn owner_comes_from_the_manifest_or_the_owner_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::new(dir.path(), "0123456789abcdef");
        std::fs::create_dir_all(&files.dir).unwrap();
        assert_eq!(files.recorded_owner().await, None);
        std::fs::write(files.owner(), "0199-ours\n").unwrap();
        assert_eq!(files.recorded_owner().await.as_deref(), Some("0199-ours"));
        let manifest = SnapshotManifest {
            id: "0123456789abcdef".into(),
            shape: shape(),
            owner: Some("0199-manifest".into()),
            created_ms: 0,
            made_seconds: 1.0,
            memory_bytes: 0,
            state_bytes: 0,
            disk_bytes: 0,
            cloud_init_result: None,
        };
        std::fs::write(files.manifest(), serde_json::to_vec(&manifest).unwrap()).unwrap();
        assert_eq!(files.read_manifest().await.unwrap(), Some(manifest));
        assert_eq!(
            files.recorded_owner().await.as_deref(),
            Some("0199-manifest")
        );
        assert_eq!(files.missing_file().await, Some(files.memory()));
    }

    #[test]
    fn binaries_resolve_through_path() {
        let (path, size, _) = locate_binary(Path::new("sh")).unwrap();
        assert!(path.is_absolute());
        assert!(size > 0);
        assert!(locate_binary(Path::new("no-such-binary-here")).is_err());
    }
}

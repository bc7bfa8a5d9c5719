//! Who this daemon is, and which VMs under our name prefix are someone else's.
//!
//! Every VM a daemon makes carries its instance id (`sandbox.json` on the local backend, a tag
//! on Proxmox), so that the reconciler destroys only what this daemon made: a `sandbox-*` VM made
//! by hand or by another agentlabd on the same host is left alone and reported as foreign.
//!
//! The id is generated once and kept in `data_dir/instance-id` (one line, written atomically,
//! 0644 so operators can read it). A file rather than a row in SQLite because it names the
//! daemon's state as a whole, is read before the store opens, and is easy to look at when a
//! VM's owner tag has to be matched by hand. Losing the file makes a new daemon, whose
//! reconciler then leaves the old one's VMs alone instead of destroying them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// The file under `data_dir` that holds the id.
pub const INSTANCE_ID_FILE: &str = "instance-id";

/// The longest id accepted: a Proxmox tag carries it with a prefix, and tags are short.
const MAX_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("{path}: `{id}` is not an instance id (1 to {MAX_LEN} of a-z, 0-9, '-')")]
    Invalid { path: PathBuf, id: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// A daemon's identity: lowercase letters, digits and '-', so it fits a Proxmox tag (which
/// Proxmox lowercases) and a file name unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(String);

impl InstanceId {
    /// A fresh id (a UUID: time-ordered, random in its low bits).
    pub fn generate() -> InstanceId {
        InstanceId(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// Checks `text` is a valid id.
    pub fn parse(text: &str) -> Option<InstanceId> {
        let valid = !text.is_empty()
            && text.len() <= MAX_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        valid.then(|| InstanceId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id kept in `data_dir`, made on first start. Blocking file IO: call it off the
    /// executor.
    pub fn load_or_create(data_dir: &Path) -> Result<InstanceId, InstanceError> {
        let path = data_dir.join(INSTANCE_ID_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim();
                InstanceId::parse(id).ok_or_else(|| InstanceError::Invalid {
                    path: path.clone(),
                    id: id.to_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = InstanceId::generate();
                write_new(&path, &id)?;
                tracing::info!(instance = %id, file = %path.display(), "new instance id");
                Ok(id)
            }
            Err(source) => Err(InstanceError::Io {
                context: format!("reading {}", path.display()),
                source,
            }),
        }
    }
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes the id through a temporary file, so a crash never leaves half an id behind; a file
/// that appeared meanwhile (a second daemon on the same folder) wins over ours.
fn write_new(path: &Path, id: &InstanceId) -> Result<(), InstanceError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |context: String| move |source| InstanceError::Io { context, source };
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&partial)
        .map_err(io(format!("creating {}", partial.display())))?;
    file.write_all(format!("{id}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(format!("writing {}", partial.display())))?;
    // A hard link fails if the name exists, unlike a rename: the first writer's id stays.
    let linked = std::fs::hard_link(&partial, path);
    let _ = std::fs::remove_file(&partial);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(InstanceError::Io {
            context: format!("writing {}", path.display()),
            source,
        }),
    }
}

/// A VM under our name prefix that this daemon did not make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignVm {
    pub name: String,
    pub vm_ref: String,
    /// The instance id it carries; None when it carries none (made by hand, or by a daemon
    /// from before instance ids).
    pub owner: Option<String>,
}

/// This daemon's id and the foreign VMs the last reconciler pass saw (what `GET /v1/status`
/// shows).
#[derive(Debug)]
pub struct Instance {
    pub id: InstanceId,
    foreign: Mutex<Vec<ForeignVm>>,
}

impl Instance {
    pub fn new(id: InstanceId) -> Instance {
        Instance {
            id,
            foreign: Mutex::new(Vec::new()),
        }
    }

    fn foreign_guard(&self) -> MutexGuard<'_, Vec<ForeignVm>> {
        self.foreign
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The foreign VMs the last pass saw.
    pub fn foreign(&self) -> Vec<ForeignVm> {
        self.foreign_guard().clone()
    }

    /// Puts `seen` in place of the last pass's list and returns the VMs new to it, the ones worth
    /// a warning.
    pub fn replace_foreign(&self, seen: Vec<ForeignVm>) -> Vec<ForeignVm> {
        let mut guard = self.foreign_guard();
        let new = seen
            .iter()
            .filter(|vm| !guard.contains(vm))
            .cloned()
            .collect();
        *guard = seen;
        new
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_id_is_made_once_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceId::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(INSTANCE_ID_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(InstanceId::load_or_create(dir.path()).unwrap(), first);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no partial file left"
        );
        assert!(InstanceId::parse(first.as_str()).is_some());
        assert_ne!(InstanceId::generate(), first);
    }

    #[test]
    fn a_damaged_id_stops_start_up_instead_of_making_a_new_daemon() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(INSTANCE_ID_FILE), "Not An Id\n").unwrap();
        let err = InstanceId::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, InstanceError::Invalid { .. }), "{err}");
        for bad in ["", "A", "a;b", "a b", &"a".repeat(65)] {
            assert!(InstanceId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn only_newly_seen_foreign_vms_are_worth_a_warning() {
        let instance = Instance::new(InstanceId::generate());
        let vm = |name: &str| ForeignVm {
            name: name.into(),
            vm_ref: "1".into(),
            owner: None,
        };
        assert_eq!(
            instance.replace_foreign(vec![vm("sandbox-a")]),
            [vm("sandbox-a")]
        );
        assert_eq!(
            instance.replace_foreign(vec![vm("sandbox-a"), vm("sandbox-b")]),
            [vm("sandbox-b")]
        );
        assert_eq!(instance.foreign().len(), 2);
        assert!(instance.replace_foreign(vec![vm("sandbox-b")]).is_empty());
        assert_eq!(instance.foreign(), [vm("sandbox-b")]);
    }
}

//! The user-data snippet of each sandbox, `agentlab-<vm name>.yaml` in the snippets storage's
//! folder. It holds one-time tokens, so it is written mode 0600 through a temporary file that is
//! renamed into place (Proxmox reading it at `qm start` never sees half of it), and removed when
//! the VM is destroyed. Files whose VM is gone are swept up by `PveBackend::sweep`.
//!
//! Everything here blocks; callers run it on the blocking pool.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::model::VM_NAME_PREFIX;

const PREFIX: &str = "agentlab-";
const SUFFIX: &str = ".yaml";
/// Temporary files start with a dot, so Proxmox's snippet listing skips them.
const TEMP_PREFIX: &str = ".agentlab-";

/// The snippet file name of VM `vm_name`.
pub fn file_name(vm_name: &str) -> String {
    format!("{PREFIX}{vm_name}{SUFFIX}")
}

/// The `--cicustom` volume for VM `vm_name` on `storage`.
pub fn volume(storage: &str, vm_name: &str) -> String {
    format!("{storage}:snippets/{}", file_name(vm_name))
}

/// What a file in the snippets folder is to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The snippet of the VM of that name.
    Snippet { vm_name: String },
    /// A temporary file left by a write that never finished.
    Partial { vm_name: String },
}

impl Entry {
    pub fn vm_name(&self) -> &str {
        match self {
            Entry::Snippet { vm_name } | Entry::Partial { vm_name } => vm_name,
        }
    }
}

/// Recognises our files; anything else in the folder belongs to someone else.
pub fn parse_file_name(name: &str) -> Option<Entry> {
    if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
        let (vm_name, _) = rest.split_once(".yaml.tmp-")?;
        return vm_name.starts_with(VM_NAME_PREFIX).then(|| Entry::Partial {
            vm_name: vm_name.to_owned(),
        });
    }
    let vm_name = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    vm_name.starts_with(VM_NAME_PREFIX).then(|| Entry::Snippet {
        vm_name: vm_name.to_owned(),
    })
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> super::errors::PveError {
    move |source| super::errors::PveError::Io { context, source }
}

/// Writes `contents` as VM `vm_name`'s snippet in `dir`, atomically and mode 0600.
pub fn write(
    dir: &Path,
    vm_name: &str,
    contents: &str,
) -> Result<PathBuf, super::errors::PveError> {
    let path = dir.join(file_name(vm_name));
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{vm_name}{SUFFIX}.tmp-{}",
        crate::model::new_id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io_error(format!("creating {}", temp.display())))?;
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error(format!("writing {}", temp.display())))?;
        std::fs::rename(&temp, &path)
            .map_err(io_error(format!("renaming {} into place", temp.display())))?;
        // The rename is only durable once the folder is.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(format!("syncing {}", dir.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map(|()| path)
}

/// Removes VM `vm_name`'s snippet; a missing file is fine.
pub fn remove(dir: &Path, vm_name: &str) -> Result<bool, super::errors::PveError> {
    remove_file(&dir.join(file_name(vm_name)))
}

/// Removes one file of ours by its name in `dir`.
pub fn remove_named(dir: &Path, file: &str) -> Result<bool, super::errors::PveError> {
    remove_file(&dir.join(file))
}

fn remove_file(path: &Path) -> Result<bool, super::errors::PveError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(super::errors::PveError::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
    }
}

/// Our files in `dir`, by file name. A missing folder holds none.
pub fn list(dir: &Path) -> Result<Vec<(String, Entry)>, super::errors::PveError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("listing {}", dir.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(format!("listing {}", dir.display())))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(parsed) = parse_file_name(&name) {
            found.push((name, parsed));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn names_round_trip_and_foreign_files_are_not_ours() {
        assert_eq!(file_name("sandbox-abc"), "agentlab-sandbox-abc.yaml");
        assert_eq!(
            volume("local", "sandbox-abc"),
            "local:snippets/agentlab-sandbox-abc.yaml"
        );
        assert_eq!(
            parse_file_name("agentlab-sandbox-abc.yaml"),
            Some(Entry::Snippet {
                vm_name: "sandbox-abc".into()
            })
        );
        assert_eq!(
            parse_file_name(".agentlab-sandbox-abc.yaml.tmp-0199"),
            Some(Entry::Partial {
                vm_name: "sandbox-abc".into()
            })
        );
        for foreign in [
            "user-data.yaml",
            "agentlab-other.yaml",
            "agentlab-sandbox-abc.yml",
            ".x",
        ] {
            assert_eq!(parse_file_name(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn written_private_and_whole_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "sandbox-abc", "#cloud-config\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "#cloud-config\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second write replaces the first.
        write(dir.path(), "sandbox-abc", "#cloud-config\nhostname: x\n").unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("hostname"));
        std::fs::write(dir.path().join("someone-else.yaml"), "").unwrap();
        let listed = list(dir.path()).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(remove(dir.path(), "sandbox-abc").unwrap());
        assert!(!remove(dir.path(), "sandbox-abc").unwrap());
        assert!(dir.path().join("someone-else.yaml").exists());
        assert!(list(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(&dir.path().join("missing"), "sandbox-abc", "x").unwrap_err();
        assert!(err.to_string().contains("creating"), "{err}");
        assert!(list(dir.path()).unwrap().is_empty());
    }
}

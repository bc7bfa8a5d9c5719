//! Job profiles (`profiles/*.yaml`): the template, resources, storage, network, lease defaults,
//! agent command and artifact paths a job runs with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::backends::NetworkMode;
use super::{read_yaml, ConfigError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cores: u32,
    pub memory_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub root_size_gb: u64,
    /// Proxmox storage for the clone; ignored by the local backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    pub mode: NetworkMode,
    /// Proxmox bridge; ignored by the local backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// Run by `/bin/sh -c` in the checkout when the job gives no command of its own.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Proxmox template VMID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_vmid: Option<u32>,
    /// Local backend template image name under the images folder; empty means the default one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    pub resources: Resources,
    pub storage: Storage,
    #[serde(default)]
    pub network: Network,
    pub ttl_minutes: u32,
    /// Keep the sandbox after the job until its lease ends (for interactive use).
    #[serde(default)]
    pub keepalive: bool,
    pub agent: Agent,
    #[serde(default)]
    pub artifacts: Vec<String>,
}

impl Profile {
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let bad = |key: &str, message: &str| Err(ConfigError::invalid(path, key, message));
        if self.name != stem {
            return bad("name", &format!("must match the file name `{stem}`"));
        }
        if !(1..=256).contains(&self.resources.cores) {
            return bad("resources.cores", "must be between 1 and 256");
        }
        if self.resources.memory_mb < 128 {
            return bad("resources.memory_mb", "must be at least 128");
        }
        if self.storage.root_size_gb == 0 {
            return bad("storage.root_size_gb", "must be above 0");
        }
        if self.ttl_minutes == 0 {
            return bad("ttl_minutes", "must be above 0");
        }
        if self.agent.command.trim().is_empty() {
            return bad("agent.command", "must not be empty");
        }
        if let Some(glob) = self
            .artifacts
            .iter()
            .find(|g| !crate::paths::is_safe_relative(g))
        {
            return bad(
                "artifacts",
                &format!("`{glob}` must be relative and stay inside the checkout"),
            );
        }
        Ok(())
    }
}

/// Every profile in `profiles_dir`, by name.
#[derive(Debug, Clone, Default)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
}

impl Profiles {
    pub fn load_dir(dir: &Path) -> Result<Profiles, ConfigError> {
        let mut by_name = BTreeMap::new();
        for path in yaml_files(dir)? {
            let profile: Profile = read_yaml(&path)?;
            profile.validate(&path)?;
            by_name.insert(profile.name.clone(), profile);
        }
        if by_name.is_empty() {
            return Err(ConfigError::Other {
                path: dir.to_owned(),
                message: "holds no profiles (*.yaml)".to_owned(),
            });
        }
        Ok(Profiles { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Profile> {
        self.by_name.values()
    }

    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
}

/// The `*.yaml` files of a folder, sorted by name.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles");

    #[test]
    fn shipped_profiles_load_with_the_documented_sizes() {
        let profiles = Profiles::load_dir(Path::new(SHIPPED)).unwrap();
        let sizes = |name: &str| {
            let p = profiles.get(name).unwrap();
            (
                p.resources.cores,
                p.resources.memory_mb,
                p.storage.root_size_gb,
            )
        };
        assert_eq!(sizes("yolo-ephemeral"), (4, 6144, 30));
        assert_eq!(sizes("high-throughput"), (2, 2048, 15));
        assert_eq!(sizes("balanced"), (4, 6144, 30));
        assert_eq!(sizes("high-performance"), (8, 16384, 100));
        assert!(profiles.get("interactive-dev").unwrap().keepalive);
    }

    #[test]
    fn a_profile_whose_name_differs_from_its_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(Path::new(SHIPPED).join("balanced.yaml")).unwrap();
        std::fs::write(dir.path().join("other.yaml"), text).unwrap();
        let err = Profiles::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("other.yaml") && err.contains("key `name`"),
            "{err}"
        );
    }

    #[test]
    fn an_escaping_artifact_glob_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(Path::new(SHIPPED).join("balanced.yaml")).unwrap();
        let text = text.replace("artifacts:", "artifacts:\n  - ../secrets\n");
        std::fs::write(dir.path().join("balanced.yaml"), text).unwrap();
        let err = Profiles::load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("artifacts"), "{err}");
    }
}

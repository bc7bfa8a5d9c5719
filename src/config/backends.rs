//! The backend choices the config file and profiles name: which backend a daemon runs, and how a
//! sandbox may reach the network. Plain data; each backend decides how it honours them.

use serde::{Deserialize, Serialize};

/// Which backend a daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Qemu,
    Pve,
    Fake,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Pve => "pve",
            BackendKind::Fake => "fake",
        }
    }
}

/// How a guest may reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Only the daemon's guest endpoint is reachable.
    #[default]
    Restricted,
    /// Outbound traffic is allowed too.
    Egress,
}

#[cfg(test)]
mod tests {
    /// The config is plain data every part of the daemon reads: it names no backend module, so a
    /// backend can change without the config following it.
    #[test]
    fn the_config_depends_on_no_backend() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for module in ["backend", "qemu", "pve"] {
                // Built here, so that this very file does not trip over its own list.
                let backend = format!("crate::{module}");
                assert!(
                    !text.contains(&backend),
                    "{} uses {backend}",
                    path.display()
                );
            }
            checked += 1;
        }
        assert!(checked >= 7, "only {checked} files under {}", dir.display());
    }
}

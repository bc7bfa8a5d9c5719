//! The `pve:` section of the daemon's config: where the node, snippets, bridge and clone storage
//! are, which `qm`/`pvesh` to run, and the backend's own retry and timeout knobs. The per-command
//! timeout itself is the top-level `proxmox_command_timeout`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PveConfig {
    /// The Proxmox node the daemon runs on. None: detected from `pvesh get /nodes` (the only
    /// node, or the one named like this host).
    pub node: Option<String>,
    /// The storage (content type `snippets`) that holds the cloud-init user-data files.
    pub snippets_storage: String,
    /// That storage's `snippets/` folder on this host.
    pub snippets_dir: PathBuf,
    /// The bridge every sandbox's `net0` joins (the agent subnet).
    pub bridge: String,
    /// Target storage for a full clone, when the template's storage cannot make linked clones.
    /// None: the template's own storage.
    pub storage: Option<String>,
    pub qm_binary: PathBuf,
    pub pvesh_binary: PathBuf,
    /// Cap on one `qm guest cmd ID ping`. Shorter than the command timeout, because the lifecycle
    /// polls it while the guest boots.
    #[serde(with = "humantime_serde")]
    pub agent_ping_timeout: Duration,
    /// How often a command refused with "locked" or "busy" is tried again.
    pub busy_retries: u32,
    /// The first wait before such a retry; it doubles each time.
    #[serde(with = "humantime_serde")]
    pub busy_backoff: Duration,
    /// Between SIGTERM and SIGKILL when a command outlives its timeout: `qm` cleans up (removes
    /// half-made disks, drops its lock) when it is terminated, but not when it is killed.
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    /// How long a template that passed validation is trusted before it is checked again.
    #[serde(with = "humantime_serde")]
    pub template_check_ttl: Duration,
}

impl Default for PveConfig {
    fn default() -> Self {
        PveConfig {
            node: None,
            snippets_storage: "local".to_owned(),
            snippets_dir: PathBuf::from("/var/lib/vz/snippets"),
            bridge: "vmbr1".to_owned(),
            storage: None,
            qm_binary: PathBuf::from("qm"),
            pvesh_binary: PathBuf::from("pvesh"),
            agent_ping_timeout: Duration::from_secs(4),
            busy_retries: 5,
            busy_backoff: Duration::from_millis(500),
            kill_grace: Duration::from_secs(5),
            template_check_ttl: Duration::from_secs(60),
        }
    }
}

/// What is wrong with a `pve:` section; `key` is the key under `pve`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pve.{key}: {message}")]
pub struct PveConfigError {
    pub key: &'static str,
    pub message: String,
}

impl PveConfig {
    /// Checks what serde cannot: identifiers that end up inside `qm` option values, and paths.
    pub fn validate(&self) -> Result<(), PveConfigError> {
        let bad = |key, message: &str| {
            Err(PveConfigError {
                key,
                message: message.to_owned(),
            })
        };
        if let Some(node) = &self.node {
            if !is_identifier(node) {
                return bad(
                    "node",
                    "must be a node name (letters, digits, '-', '_', '.')",
                );
            }
        }
        if !is_identifier(&self.snippets_storage) {
            return bad("snippets_storage", "must be a storage id");
        }
        if let Some(storage) = &self.storage {
            if !is_identifier(storage) {
                return bad("storage", "must be a storage id");
            }
        }
        if !is_identifier(&self.bridge) {
            return bad("bridge", "must be a bridge name such as vmbr1");
        }
        if !self.snippets_dir.is_absolute() {
            return bad("snippets_dir", "must be an absolute path");
        }
        for (key, path) in [
            ("qm_binary", &self.qm_binary),
            ("pvesh_binary", &self.pvesh_binary),
        ] {
            if path.as_os_str().is_empty() {
                return bad(key, "must not be empty");
            }
        }
        if self.agent_ping_timeout.is_zero() {
            return bad("agent_ping_timeout", "must be above 0");
        }
        Ok(())
    }

    /// Makes a relative `snippets_dir` absolute against the config file's folder.
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.snippets_dir.is_relative() {
            self.snippets_dir = base.join(&self.snippets_dir);
        }
    }
}

/// A Proxmox identifier (node, storage, bridge): the characters its own schemas allow, which
/// also keeps it from changing the meaning of a `key=value,key=value` option string.
pub fn is_identifier(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !value.starts_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_gives_the_documented_defaults() {
        let config: PveConfig = yaml_serde::from_str("{}").unwrap();
        assert_eq!(config, PveConfig::default());
        assert_eq!(config.snippets_storage, "local");
        assert_eq!(config.snippets_dir, Path::new("/var/lib/vz/snippets"));
        assert_eq!(config.bridge, "vmbr1");
        assert_eq!(config.node, None);
        config.validate().unwrap();
    }

    #[test]
    fn parses_every_key() {
        let text =
            "node: pve1\nsnippets_storage: snip\nsnippets_dir: /srv/snippets\nbridge: vmbr7\n\
                    storage: local-zfs\nqm_binary: /usr/sbin/qm\npvesh_binary: /usr/bin/pvesh\n\
                    agent_ping_timeout: 2s\nbusy_retries: 2\nbusy_backoff: 100ms\nkill_grace: 1s\n\
                    template_check_ttl: 5m\n";
        let config: PveConfig = yaml_serde::from_str(text).unwrap();
        assert_eq!(config.node.as_deref(), Some("pve1"));
        assert_eq!(config.storage.as_deref(), Some("local-zfs"));
        assert_eq!(config.busy_backoff, Duration::from_millis(100));
        assert_eq!(config.template_check_ttl, Duration::from_secs(300));
        config.validate().unwrap();
    }

    #[test]
    fn rejects_values_that_would_change_a_qm_option_string() {
        let config = PveConfig {
            bridge: "vmbr1,firewall=0".into(),
            ..PveConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "bridge");
        let config = PveConfig {
            snippets_storage: "local:snippets".into(),
            ..PveConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "snippets_storage");
        let config = PveConfig {
            node: Some("../etc".into()),
            ..PveConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "node");
        assert!(yaml_serde::from_str::<PveConfig>("bogus: 1").is_err());
    }
}

//! The daemon's configuration: the YAML file given by `--config`, its defaults, and the loading of
//! every file the daemon reads at start-up (profiles and tuning live in their own modules, and so
//! do the backends' sections: plain data the backends import, never the other way round).

pub mod backends;
pub mod fake;
pub mod governor;
pub mod pool;
pub mod profile;
pub mod pve;
pub mod qemu;
pub mod tuning;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use backends::BackendKind;
use fake::FakeConfig;
use pve::PveConfig;
use qemu::QemuConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key that does not exist or a value of the wrong shape; `key` is the dotted path to it.
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Other { path: PathBuf, message: String },
}

impl ConfigError {
    fn invalid(path: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// Parses one YAML document into `T`, turning serde's error into one that names the file and the
/// dotted key at fault.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let deserializer = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let message = err.into_inner().to_string();
        if key == "." || key.is_empty() {
            ConfigError::Other {
                path: path.to_owned(),
                message,
            }
        } else {
            ConfigError::Invalid {
                path: path.to_owned(),
                key,
                message,
            }
        }
    })
}

pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_yaml(path, &text)
}

/// Log output format: text for terminals, JSON for journald and log shippers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub socket_path: PathBuf,
    /// Group that owns the socket (mode 0660), so its members may use the CLI without root.
    pub socket_group: Option<String>,
    /// Prometheus endpoint; an empty string turns it off.
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Optional TCP listener for the control API; needs `control_token_file`.
    #[serde(deserialize_with = "optional_addr")]
    pub control_listen: Option<SocketAddr>,
    pub control_token_file: Option<PathBuf>,
    /// Where the daemon serves the guest API.
    pub guest_listen: SocketAddr,
    /// The guest API's URL as guests see it. Default: `http://10.0.2.100` (the local backend's
    /// forward) for qemu, the `guest_listen` address otherwise.
    pub guest_url: Option<String>,
    pub profiles_dir: PathBuf,
    pub tuning_dir: PathBuf,
    /// Which tuning file of `tuning_dir` is in force (`NAME.yaml`).
    pub tuning: String,
    pub backend: BackendKind,
    #[serde(with = "humantime_serde")]
    pub proxmox_command_timeout: Duration,
    /// Cap on clone → guest agent ready, on top of each phase's own timeout.
    #[serde(with = "humantime_serde")]
    pub provisioning_timeout: Duration,
    pub artifact_token_ttl_minutes: u64,
    /// Cap on one artifact.
    pub artifact_max_bytes: u64,
    /// Cap on an image uploaded by `agentlab template import`.
    pub template_import_max_bytes: u64,
    /// Folders on this host under which a job's local `repo` must lie (absolute, existing; the
    /// check resolves symlinks). Empty: no job may use a repository on this host.
    pub repo_roots: Vec<PathBuf>,
    /// Cap on all of a job's artifacts together; past it uploads get 413 and the job goes on.
    pub artifact_job_max_bytes: u64,
    /// How many artifacts a job may store.
    pub artifact_max_files: u64,
    /// Cap on a job's stored stdout/stderr.
    pub log_max_bytes: u64,
    /// How many guest API requests one job may have in flight; past it, 429 at once.
    pub guest_requests_per_job: usize,
    /// How long the guest API waits for the next piece of a request body before giving up (408).
    #[serde(with = "humantime_serde")]
    pub guest_body_timeout: Duration,
    /// Cap on control API request bodies.
    pub request_max_bytes: usize,
    pub log_format: LogFormat,
    /// How long SIGTERM waits for in-flight backend calls to reach a resumable point.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Ended jobs (rows, logs and artifacts) older than this are removed.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Artifacts older than this are removed even while their job stays; null: `retention`.
    #[serde(with = "humantime_serde")]
    pub artifact_retention: Option<Duration>,
    /// The runner binary the daemon serves to its guests (`GET /guest/v1/runner`), which every
    /// sandbox's user-data fetches and installs unless the template's own is the same. Default:
    /// `agentlab-runner` beside the daemon's executable, if it is there; an empty string turns
    /// serving off (templates must then bring their own runner).
    pub runner_path: Option<PathBuf>,
    pub fake: FakeConfig,
    /// The Proxmox VE backend's settings (`backend: pve`).
    pub pve: PveConfig,
    /// The local QEMU backend (`backend: qemu`).
    pub qemu: QemuConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/agentlab"),
            socket_path: PathBuf::from("/run/agentlab/agentlabd.sock"),
            socket_group: None,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8847))),
            control_listen: None,
            control_token_file: None,
            guest_listen: SocketAddr::from(([127, 0, 0, 1], 8848)),
            guest_url: None,
            profiles_dir: PathBuf::from("/etc/agentlab/profiles"),
            tuning_dir: PathBuf::from("/etc/agentlab/tuning"),
            tuning: "default".to_owned(),
            backend: BackendKind::Qemu,
            proxmox_command_timeout: Duration::from_secs(120),
            provisioning_timeout: Duration::from_secs(600),
            artifact_token_ttl_minutes: 1440,
            artifact_max_bytes: 256 * 1024 * 1024,
            template_import_max_bytes: 64 * 1024 * 1024 * 1024,
            repo_roots: Vec::new(),
            artifact_job_max_bytes: 1024 * 1024 * 1024,
            artifact_max_files: 1000,
            log_max_bytes: 64 * 1024 * 1024,
            guest_requests_per_job: 8,
            guest_body_timeout: Duration::from_secs(30),
            request_max_bytes: 1024 * 1024,
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_secs(20),
            retention: Duration::from_secs(30 * 24 * 3600),
            artifact_retention: None,
            runner_path: None,
            fake: FakeConfig::default(),
            pve: PveConfig::default(),
            qemu: QemuConfig::default(),
        }
    }
}

fn optional_addr<'de, D: Deserializer<'de>>(de: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = Option::<String>::deserialize(de)?.unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim().parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not an address like 127.0.0.1:8847 ({e})"
        ))
    })
}

impl Config {
    /// Reads and validates the config file. Relative paths in it are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = read_yaml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in [
            &mut config.data_dir,
            &mut config.socket_path,
            &mut config.profiles_dir,
            &mut config.tuning_dir,
        ] {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        let optional_paths = [
            config.fake.state_file.as_mut(),
            config.qemu.images_dir.as_mut(),
            config.qemu.sandboxes_dir.as_mut(),
            config.qemu.snapshots_dir.as_mut(),
        ];
        for path in optional_paths.into_iter().flatten() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        config.pve.resolve_paths(base);
        config.validate(path)?;
        config.check_repo_roots_exist(path)?;
        Ok(config)
    }

    /// Each of `repo_roots` must be a folder that exists now: a typo would otherwise refuse every
    /// job that names a repository under it, long after start-up.
    fn check_repo_roots_exist(&self, path: &Path) -> Result<(), ConfigError> {
        for root in &self.repo_roots {
            match std::fs::metadata(root) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(ConfigError::invalid(
                        path,
                        "repo_roots",
                        format!("{} is not a folder", root.display()),
                    ))
                }
                Err(err) => {
                    return Err(ConfigError::invalid(
                        path,
                        "repo_roots",
                        format!("{}: {err}", root.display()),
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.control_listen.is_some() && self.control_token_file.is_none() {
            return Err(ConfigError::invalid(
                path,
                "control_token_file",
                "is required when control_listen is set (the TCP API needs a bearer token)",
            ));
        }
        for (key, value) in [
            ("artifact_max_bytes", self.artifact_max_bytes),
            ("template_import_max_bytes", self.template_import_max_bytes),
            ("artifact_job_max_bytes", self.artifact_job_max_bytes),
            ("artifact_max_files", self.artifact_max_files),
            ("guest_requests_per_job", self.guest_requests_per_job as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(path, key, "must be above 0"));
            }
        }
        if self.guest_body_timeout.is_zero() {
            return Err(ConfigError::invalid(
                path,
                "guest_body_timeout",
                "must be above 0",
            ));
        }
        if let Some(root) = self.repo_roots.iter().find(|r| !r.is_absolute()) {
            return Err(ConfigError::invalid(
                path,
                "repo_roots",
                format!(
                    "{} must be an absolute path (a root is never taken from the config's folder)",
                    root.display()
                ),
            ));
        }
        if self.artifact_token_ttl_minutes == 0 {
            return Err(ConfigError::invalid(
                path,
                "artifact_token_ttl_minutes",
                "must be above 0",
            ));
        }
        if self.provisioning_timeout.is_zero() {
            return Err(ConfigError::invalid(
                path,
                "provisioning_timeout",
                "must be above 0",
            ));
        }
        if self.request_max_bytes < 1024 {
            return Err(ConfigError::invalid(
                path,
                "request_max_bytes",
                "must be at least 1024",
            ));
        }
        if self.tuning.is_empty() || self.tuning.contains('/') {
            return Err(ConfigError::invalid(
                path,
                "tuning",
                "must be a file name in tuning_dir, without .yaml",
            ));
        }
        if self.proxmox_command_timeout.is_zero() {
            return Err(ConfigError::invalid(
                path,
                "proxmox_command_timeout",
                "must be above 0",
            ));
        }
        if self.retention.is_zero() {
            return Err(ConfigError::invalid(path, "retention", "must be above 0"));
        }
        match self.artifact_retention {
            Some(d) if d.is_zero() => {
                return Err(ConfigError::invalid(
                    path,
                    "artifact_retention",
                    "must be above 0 (or null for the same as retention)",
                ));
            }
            Some(d) if d > self.retention => {
                return Err(ConfigError::invalid(
                    path,
                    "artifact_retention",
                    format!(
                        "must not exceed retention ({}): a job's artifacts go with the job",
                        humantime::format_duration(self.retention)
                    ),
                ));
            }
            _ => {}
        }
        if let Err(err) = self.pve.validate() {
            return Err(ConfigError::invalid(
                path,
                &format!("pve.{}", err.key),
                err.message,
            ));
        }
        for (op, fault) in &self.fake.faults {
            if !(0.0..=1.0).contains(&fault.fail_rate) {
                return Err(ConfigError::invalid(
                    path,
                    &format!("fake.faults.{op:?}.fail_rate"),
                    "must be between 0 and 1",
                ));
            }
        }
        Ok(())
    }

    /// `bound` is where the guest API actually listens (`guest_listen` may ask for port 0).
    pub fn resolved_guest_url(&self, bound: SocketAddr) -> String {
        match (&self.guest_url, self.backend) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, BackendKind::Qemu) => qemu::GUEST_URL.to_owned(),
            (None, _) => format!("http://{bound}"),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("agentlab.db")
    }

    /// Where uploads wait for the daemon to take them in (an image to import).
    pub fn uploads_dir(&self) -> PathBuf {
        self.data_dir.join("uploads")
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.data_dir.join("artifacts")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    pub fn tuning_path(&self) -> PathBuf {
        self.tuning_dir.join(format!("{}.yaml", self.tuning))
    }

    /// How long artifacts are kept: `artifact_retention`, else `retention`.
    pub fn artifact_retention(&self) -> Duration {
        self.artifact_retention.unwrap_or(self.retention)
    }

    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.artifact_token_ttl_minutes.saturating_mul(60))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_example_config_parses_and_shows_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/config.example.yaml");
        let config = Config::load(&example).unwrap();
        assert_eq!(config.qemu, crate::config::qemu::QemuConfig::default());
        assert_eq!(config.pve, crate::config::pve::PveConfig::default());
    }

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_yaml(Path::new("/etc/agentlab/config.yaml"), text)?;
        config.validate(Path::new("/etc/agentlab/config.yaml"))?;
        Ok(config)
    }

    #[test]
    fn defaults_follow_the_performance_document() {
        let config = parse("{}").unwrap();
        assert_eq!(config.proxmox_command_timeout, Duration::from_secs(120));
        assert_eq!(config.provisioning_timeout, Duration::from_secs(600));
        assert_eq!(config.artifact_token_ttl_minutes, 1440);
        assert_eq!(config.artifact_max_bytes, 268_435_456);
        assert_eq!(config.artifact_job_max_bytes, 1 << 30);
        assert_eq!(config.artifact_max_files, 1000);
        assert_eq!(config.guest_requests_per_job, 8);
        assert_eq!(config.guest_body_timeout, Duration::from_secs(30));
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:8847".parse().unwrap())
        );
        assert_eq!(
            config.db_path(),
            PathBuf::from("/var/lib/agentlab/agentlab.db")
        );
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = parse("data_dir: /tmp\nbogus_key: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/agentlab/config.yaml"), "{err}");
        assert!(err.contains("bogus_key"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key_and_problem() {
        let err = parse("provisioning_timeout: soon\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `provisioning_timeout`"), "{err}");
        let err = parse("metrics_listen: nowhere\n").unwrap_err().to_string();
        assert!(
            err.contains("key `metrics_listen`") && err.contains("nowhere"),
            "{err}"
        );
        let err = parse("backend: vmware\n").unwrap_err().to_string();
        assert!(err.contains("key `backend`"), "{err}");
        let err = parse("fake:\n  faults:\n    clone: {fail_rate: 2}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fail_rate"), "{err}");
    }

    #[test]
    fn empty_metrics_listen_turns_metrics_off() {
        assert_eq!(
            parse("metrics_listen: \"\"\n").unwrap().metrics_listen,
            None
        );
    }

    #[test]
    fn pve_section_defaults_and_errors_name_the_key() {
        let config = parse("backend: pve\n").unwrap();
        assert_eq!(config.pve.bridge, "vmbr1");
        assert_eq!(config.pve.snippets_storage, "local");
        let config = parse("backend: pve\npve: {node: pve1, bridge: vmbr2}\n").unwrap();
        assert_eq!(config.pve.node.as_deref(), Some("pve1"));
        let err = parse("pve: {bridge: \"vmbr1,firewall=0\"}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `pve.bridge`"), "{err}");
        let err = parse("pve: {brige: vmbr1}\n").unwrap_err().to_string();
        assert!(err.contains("pve") && err.contains("brige"), "{err}");
    }

    #[test]
    fn retention_defaults_to_30_days_and_artifacts_cannot_outlive_their_job() {
        let config = parse("{}").unwrap();
        assert_eq!(config.retention, Duration::from_secs(30 * 86400));
        assert_eq!(config.artifact_retention(), config.retention);
        let config = parse("retention: 10d\nartifact_retention: 2d\n").unwrap();
        assert_eq!(config.artifact_retention(), Duration::from_secs(2 * 86400));
        for (text, key) in [
            ("retention: 0s\n", "key `retention`"),
            ("retention: forever\n", "key `retention`"),
            ("artifact_retention: 40d\n", "key `artifact_retention`"),
            ("artifact_retention: 0s\n", "key `artifact_retention`"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn repo_roots_default_to_none_and_must_be_absolute_existing_folders() {
        assert!(parse("{}").unwrap().repo_roots.is_empty());
        let err = parse("repo_roots: [srv/repos]\n").unwrap_err().to_string();
        assert!(
            err.contains("key `repo_roots`") && err.contains("srv/repos"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        let missing = dir.path().join("missing");
        std::fs::write(&file, format!("repo_roots: [{}]\n", missing.display())).unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("key `repo_roots`") && err.contains(&missing.display().to_string()),
            "{err}"
        );
        std::fs::write(&file, format!("repo_roots: [{}]\n", file.display())).unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(err.contains("is not a folder"), "{err}");
        std::fs::write(&file, format!("repo_roots: [{}]\n", dir.path().display())).unwrap();
        assert_eq!(
            Config::load(&file).unwrap().repo_roots,
            [dir.path().to_path_buf()]
        );
    }

    #[test]
    fn guest_quotas_and_limits_must_be_above_zero() {
        for key in [
            "artifact_job_max_bytes: 0",
            "artifact_max_files: 0",
            "guest_requests_per_job: 0",
            "guest_body_timeout: 0s",
        ] {
            let err = parse(&format!("{key}\n")).unwrap_err().to_string();
            let name = key.split(':').next().unwrap();
            assert!(err.contains(&format!("key `{name}`")), "{key}: {err}");
        }
    }

    #[test]
    fn control_listen_requires_a_token() {
        let err = parse("control_listen: 127.0.0.1:9000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("control_token_file"), "{err}");
    }
}

//! What the runner is told: the bootstrap file the daemon writes into the guest, and the `JobSpec`
//! the guest API hands out in exchange for its one-time token. Both carry tokens, so their `Debug`
//! output redacts them (and the job's env values, which may be secrets).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::RunnerError;

/// Where the bootstrap file lives in the guest unless `--bootstrap` says otherwise.
pub const DEFAULT_BOOTSTRAP_PATH: &str = "/etc/agentlab/bootstrap.json";

/// `/etc/agentlab/bootstrap.json`: the daemon's guest endpoint and a one-time token.
#[derive(Clone, Deserialize)]
pub struct Bootstrap {
    pub url: String,
    pub token: String,
}

impl fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bootstrap")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Bootstrap {
    pub fn load(path: &Path) -> Result<Self, RunnerError> {
        let text = std::fs::read(path).map_err(|source| RunnerError::BootstrapRead {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| RunnerError::BootstrapParse {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Where the job's code comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RepoSpec {
    /// The daemon serves a bundle of a repository on its host at `GET /guest/v1/repo.bundle`.
    Bundle {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        git_ref: Option<String>,
    },
    /// The guest clones it itself (this needs egress).
    Url {
        url: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        git_ref: Option<String>,
    },
}

/// The job as the runner receives it from `POST /guest/v1/bootstrap`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: String,
    /// Short-lived and scoped to this job; every guest call after the bootstrap carries it.
    pub session_token: String,
    pub task: String,
    /// Run by `/bin/sh -c` in the checkout.
    pub command: String,
    #[serde(default)]
    pub repo: Option<RepoSpec>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub artifacts: Vec<String>,
    pub run_timeout_seconds: u64,
    pub max_artifact_bytes: u64,
    pub workdir: PathBuf,
    /// Whether the runner sends back the work left in the checkout (`changes`): the daemon asks
    /// for it when the repository is on its host.
    #[serde(default)]
    pub send_changes: bool,
}

impl fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSpec")
            .field("job_id", &self.job_id)
            .field("session_token", &"<redacted>")
            .field("task", &self.task)
            .field("command", &self.command)
            .field("repo", &self.repo)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("artifacts", &self.artifacts)
            .field("run_timeout_seconds", &self.run_timeout_seconds)
            .field("max_artifact_bytes", &self.max_artifact_bytes)
            .field("workdir", &self.workdir)
            .field("send_changes", &self.send_changes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_job_spec() {
        let spec: JobSpec = serde_json::from_str(
            r#"{"job_id":"j1","session_token":"s3cr3t-session","task":"fix it","command":"make",
                "repo":{"kind":"url","url":"https://example.invalid/r.git","ref":"main"},
                "env":{"API_KEY":"hunter2hunter2"},"artifacts":["out/**"],
                "run_timeout_seconds":3600,"max_artifact_bytes":268435456,"workdir":"/srv/job/repo"}"#,
        )
        .unwrap();
        assert_eq!(
            spec.repo,
            Some(RepoSpec::Url {
                url: "https://example.invalid/r.git".into(),
                git_ref: Some("main".into())
            })
        );
        let bundle: RepoSpec = serde_json::from_str(r#"{"kind":"bundle","ref":"main"}"#).unwrap();
        assert_eq!(
            bundle,
            RepoSpec::Bundle {
                git_ref: Some("main".into())
            }
        );
        let debug = format!("{spec:?}");
        assert!(!debug.contains("s3cr3t-session"));
        assert!(!debug.contains("hunter2hunter2"));
    }

    #[test]
    fn a_null_repo_means_no_repo() {
        let spec: JobSpec = serde_json::from_str(
            r#"{"job_id":"j1","session_token":"t","task":"x","command":"true","repo":null,
                "run_timeout_seconds":1,"max_artifact_bytes":1,"workdir":"/w"}"#,
        )
        .unwrap();
        assert_eq!(spec.repo, None);
        assert!(spec.env.is_empty());
    }
}

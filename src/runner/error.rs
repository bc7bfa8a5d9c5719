//! The runner's error type. Messages never carry a token: the guest API sends tokens in headers,
//! so neither URLs nor API answers quoted here contain one.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot read the bootstrap file {path}: {source}")]
    BootstrapRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the bootstrap file {path} is not valid: {source}")]
    BootstrapParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("{what}: cannot reach the daemon: {source}")]
    Transport {
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("{what}: the daemon answered {status} {code}: {message}")]
    Api {
        what: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{what}: unreadable answer from the daemon: {source}")]
    Decode {
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("git {args} failed: {detail}")]
    Git { args: String, detail: String },
    #[error("the checkout directory {0} already exists and is not empty")]
    WorkdirNotEmpty(PathBuf),
    #[error("the daemon stored sha256 {stored} but the runner sent {sent}")]
    DigestMismatch { stored: String, sent: String },
    #[error("cannot start the command: {0}")]
    Spawn(#[source] std::io::Error),
}

impl RunnerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RunnerError::Io {
            context: context.into(),
            source,
        }
    }
}

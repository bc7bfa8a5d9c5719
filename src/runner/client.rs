//! The runner's side of the guest API (`/guest/v1/*`): one blocking HTTP client, the bearer token,
//! and retries with backoff, so a daemon restart mid-job costs a pause rather than the job.
//!
//! Retries: transport errors and 502/503/504 are retried until the policy's budget runs out. The
//! bootstrap call redeems a one-time token, so on an answer it is retried only after a 503; on a
//! transport error it is retried too, because behind the local backend's guest forward a stopped
//! daemon looks like a connection that opens and closes unanswered. If the daemon did use the
//! token before failing to answer, the retry gets a clear 401, no worse than not retrying. A log append that
//! reached the daemon but lost its answer is sent again, so the log is at-least-once across a
//! daemon restart.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::error::RunnerError;
use super::spec::JobSpec;
use crate::model::Artifact;
use crate::urlpath::encode_path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// No new attempt starts once this much time has passed since the first.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            budget: Duration::from_secs(180),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Safe to send again (or acceptable to duplicate, like a log append).
    Transient,
    /// Consumes a one-time token: resend on transport errors and 503 only.
    NotDelivered,
}

impl Retry {
    fn on_transport(self, err: &reqwest::Error) -> bool {
        match self {
            Retry::Transient | Retry::NotDelivered => {
                !err.is_builder() && !err.is_decode() && !err.is_status()
            }
        }
    }

    fn on_status(self, status: StatusCode) -> bool {
        match self {
            Retry::Transient => matches!(status.as_u16(), 502..=504),
            Retry::NotDelivered => status == StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// How long a small call (log, exit, done) may take before it counts as a transport error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads get a base allowance plus time for the bytes at a slow but plausible rate.
const UPLOAD_BASE: Duration = Duration::from_secs(60);
const UPLOAD_MIN_BYTES_PER_SEC: u64 = 256 * 1024;
/// How much of an artifact is handed to the connection at a time.
const UPLOAD_CHUNK: usize = 1024 * 1024;
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct GuestClient {
    base: String,
    token: Option<String>,
    http: Client,
    retry: RetryPolicy,
}

impl std::fmt::Debug for GuestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestClient")
            .field("base", &self.base)
            .field("has_session", &self.token.is_some())
            .finish()
    }
}

impl GuestClient {
    pub fn new(base_url: &str, retry: RetryPolicy) -> Result<Self, RunnerError> {
        let http = Client::builder()
            // The guest endpoint is reached directly; a proxy from the guest's environment must
            // not see the tokens.
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(RunnerError::Client)?;
        Ok(GuestClient {
            base: base_url.trim_end_matches('/').to_owned(),
            token: None,
            http,
            retry,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/guest/v1/{}", self.base, path)
    }

    /// Redeems the one-time bootstrap token for the job spec, and keeps the session token for
    /// every later call.
    pub fn bootstrap(&mut self, bootstrap_token: &str) -> Result<JobSpec, RunnerError> {
        const WHAT: &str = "bootstrap";
        let url = self.url("bootstrap");
        let resp = self.execute(WHAT, Retry::NotDelivered, || {
            Ok(self.http.post(&url).bearer_auth(bootstrap_token))
        })?;
        let spec: JobSpec = resp
            .json()
            .map_err(|source| RunnerError::Decode { what: WHAT, source })?;
        self.token = Some(spec.session_token.clone());
        Ok(spec)
    }

    /// Downloads the job's repository bundle to `dest`, starting over if the transfer breaks.
    pub fn download_bundle(&self, dest: &Path) -> Result<u64, RunnerError> {
        const WHAT: &str = "download the repository bundle";
        let url = self.url("repo.bundle");
        let started = Instant::now();
        let mut delay = self.retry.initial_delay;
        loop {
            let mut resp = self.execute(WHAT, Retry::Transient, || {
                Ok(self.authed(self.http.get(&url)).timeout(BUNDLE_TIMEOUT))
            })?;
            let mut file = File::create(dest)
                .map_err(|e| RunnerError::io(format!("create {}", dest.display()), e))?;
            match std::io::copy(&mut resp, &mut file).and_then(|n| file.flush().map(|()| n)) {
                Ok(n) => return Ok(n),
                Err(e) if started.elapsed() + delay < self.retry.budget => {
                    eprintln!("agentlab-runner: {WHAT}: transfer broke ({e}); retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(self.retry.max_delay);
                }
                Err(e) => return Err(RunnerError::io(WHAT, e)),
            }
        }
    }

    pub fn post_log(&self, bytes: &[u8]) -> Result<(), RunnerError> {
        let url = self.url("log");
        self.execute("send output", Retry::Transient, || {
            Ok(self.authed(self.http.post(&url)).body(bytes.to_vec()))
        })
        .map(drop)
    }

    pub fn post_exit(&self, exit_code: i32) -> Result<(), RunnerError> {
        let url = self.url("exit");
        let body = serde_json::json!({ "exit_code": exit_code });
        self.execute("report the exit code", Retry::Transient, || {
            Ok(self.authed(self.http.post(&url)).json(&body))
        })
        .map(drop)
    }

    pub fn post_done(&self, uploaded: usize, errors: &[String]) -> Result<(), RunnerError> {
        let url = self.url("done");
        let body = serde_json::json!({ "uploaded": uploaded, "errors": errors });
        self.execute("report done", Retry::Transient, || {
            Ok(self.authed(self.http.post(&url)).json(&body))
        })
        .map(drop)
    }

    /// Streams one file to `PUT /guest/v1/artifacts/{rel}` without reading it into memory, and
    /// checks the digest the daemon reports (when it reports one) against the bytes sent.
    ///
    /// The body goes through reqwest's async client in `UPLOAD_CHUNK` pieces: the blocking
    /// client hands a reader over in 8 KiB pieces, each costing syscalls and a thread wake-up,
    /// which under a software-emulated guest cap an upload at a few MB/s.
    pub fn put_artifact(&self, rel: &[u8], file: &Path, len: u64) -> Result<(), RunnerError> {
        const WHAT: &str = "upload an artifact";
        let url = self.url(&format!("artifacts/{}", encode_path(rel)));
        let timeout = UPLOAD_BASE + Duration::from_secs(len / UPLOAD_MIN_BYTES_PER_SEC);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RunnerError::io("start the upload runtime", e))?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(RunnerError::Client)?;
        let started = Instant::now();
        let mut delay = self.retry.initial_delay;
        loop {
            let handle = File::open(file)
                .map_err(|e| RunnerError::io(format!("open {}", file.display()), e))?;
            // Each attempt hashes what it sends; the last attempt's is the one the answer describes.
            let hasher = Arc::new(Mutex::new(Sha256::new()));
            let attempt =
                runtime.block_on(self.send_file(&client, &url, handle, len, timeout, &hasher));
            let retry_left = started.elapsed() + delay < self.retry.budget;
            match attempt {
                Ok((status, text)) if status.is_success() => {
                    let sent = hex::encode(
                        std::mem::take(&mut *hasher.lock().unwrap_or_else(PoisonError::into_inner))
                            .finalize(),
                    );
                    // The answer should be an Artifact; an answer we cannot read is not worth
                    // failing an upload the daemon accepted.
                    if let Ok(artifact) = serde_json::from_str::<Artifact>(&text) {
                        if !artifact.sha256.eq_ignore_ascii_case(&sent) {
                            return Err(RunnerError::DigestMismatch {
                                stored: artifact.sha256,
                                sent,
                            });
                        }
                    }
                    return Ok(());
                }
                Ok((status, text)) => {
                    if !(Retry::Transient.on_status(status) && retry_left) {
                        return Err(api_error_parts(WHAT, status, &text));
                    }
                    eprintln!("agentlab-runner: {WHAT}: daemon answered {status}; retrying");
                }
                Err(source) => {
                    if !(Retry::Transient.on_transport(&source) && retry_left) {
                        return Err(RunnerError::Transport { what: WHAT, source });
                    }
                    eprintln!("agentlab-runner: {WHAT}: {source}; retrying");
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(self.retry.max_delay);
        }
    }

    async fn send_file(
        &self,
        client: &reqwest::Client,
        url: &str,
        file: File,
        len: u64,
        timeout: Duration,
        hasher: &Arc<Mutex<Sha256>>,
    ) -> Result<(StatusCode, String), reqwest::Error> {
        use futures_util::StreamExt;
        use tokio::io::AsyncReadExt;
        let hasher = Arc::clone(hasher);
        let chunks = tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(file).take(len),
            UPLOAD_CHUNK,
        )
        .map(move |chunk| {
            if let Ok(bytes) = &chunk {
                hasher
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .update(bytes);
            }
            chunk
        });
        let mut request = client
            .put(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(chunks));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, text))
    }

    fn authed(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    fn execute(
        &self,
        what: &'static str,
        mode: Retry,
        build: impl Fn() -> Result<RequestBuilder, RunnerError>,
    ) -> Result<Response, RunnerError> {
        let started = Instant::now();
        let mut delay = self.retry.initial_delay;
        loop {
            let outcome = build()?.send();
            let retry_left = started.elapsed() + delay < self.retry.budget;
            match outcome {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status();
                    if !(mode.on_status(status) && retry_left) {
                        return Err(api_error(what, resp));
                    }
                    eprintln!("agentlab-runner: {what}: daemon answered {status}; retrying");
                }
                Err(source) => {
                    if !(mode.on_transport(&source) && retry_left) {
                        return Err(RunnerError::Transport { what, source });
                    }
                    eprintln!("agentlab-runner: {what}: {source}; retrying");
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(self.retry.max_delay);
        }
    }
}

fn api_error(what: &'static str, resp: Response) -> RunnerError {
    let status = resp.status();
    let text = resp.text().unwrap_or_default();
    api_error_parts(what, status, &text)
}

fn api_error_parts(what: &'static str, status: StatusCode, text: &str) -> RunnerError {
    let (code, message) = match serde_json::from_str::<ErrorBody>(text) {
        Ok(body) => (body.error.code, body.error.message),
        Err(_) => (
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase(),
            text.chars().take(500).collect(),
        ),
    };
    RunnerError::Api {
        what,
        status: status.as_u16(),
        code,
        message,
    }
}

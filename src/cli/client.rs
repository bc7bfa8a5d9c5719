//! A small blocking client for the control API, over the daemon's Unix socket or, with
//! `--endpoint`, over TCP with a bearer token. It turns transport failures and the API's
//! `{"error": {"code", "message"}}` answers into `CliError`s with the documented exit codes.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::exit::CliError;

pub const DEFAULT_SOCKET: &str = "/run/agentlab/agentlabd.sock";

/// How long an ordinary call may take; streams (follow, downloads) have no limit.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    Socket(PathBuf),
    Endpoint { base: String, token: Option<String> },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(path) => write!(f, "Socket({})", path.display()),
            Target::Endpoint { base, token } => f
                .debug_struct("Endpoint")
                .field("base", base)
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Socket(path) => path.display().to_string(),
            Target::Endpoint { base, .. } => base.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    calls: Client,
    streams: Client,
    base: String,
    token: Option<String>,
    target: String,
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

impl ApiClient {
    pub fn new(target: &Target) -> Result<Self, CliError> {
        let builder = || {
            let b = Client::builder().connect_timeout(Duration::from_secs(5));
            match target {
                Target::Socket(path) => b.unix_socket(path.as_path()),
                Target::Endpoint { .. } => b,
            }
        };
        let build_error =
            |e: reqwest::Error| CliError::Usage(format!("cannot set up the client: {e}"));
        let calls = builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(build_error)?;
        let streams = builder().timeout(None).build().map_err(build_error)?;
        let (base, token) = match target {
            // The host is ignored on a Unix socket, but a request still needs one.
            Target::Socket(_) => ("http://localhost".to_owned(), None),
            Target::Endpoint { base, token } => {
                // Built without TLS: a remote daemon is reached through a proxy or tunnel that
                // terminates it.
                if !base.starts_with("http://") {
                    return Err(CliError::Usage(format!(
                        "--endpoint must be an http:// URL, not `{base}`"
                    )));
                }
                (base.trim_end_matches('/').to_owned(), token.clone())
            }
        };
        Ok(ApiClient {
            calls,
            streams,
            base,
            token,
            target: target.describe(),
        })
    }

    fn request(&self, client: &Client, method: reqwest::Method, path: &str) -> RequestBuilder {
        let req = client.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    fn send(&self, req: RequestBuilder) -> Result<Response, CliError> {
        let resp = req.send().map_err(|e| self.transport_error(&e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(api_error(resp))
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> CliError {
        if e.is_connect() || e.is_timeout() || e.is_request() {
            CliError::Unreachable {
                target: self.target.clone(),
                detail: unreachable_detail(e),
            }
        } else {
            CliError::Protocol(error_chain(e))
        }
    }

    /// GET, returning the body as text (for `--json`, which prints it as the daemon sent it).
    pub fn get_text(&self, path: &str) -> Result<String, CliError> {
        let resp = self.send(self.request(&self.calls, reqwest::Method::GET, path))?;
        resp.text().map_err(|e| self.transport_error(&e))
    }

    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let text = self.get_text(path)?;
        parse(&text)
    }

    /// POST with an optional JSON body, returning the answer as text.
    pub fn post_text(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, CliError> {
        let mut req = self.request(&self.calls, reqwest::Method::POST, path);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = self.send(req)?;
        resp.text().map_err(|e| self.transport_error(&e))
    }

    /// POST a file as the body, without a time limit (it may be gigabytes), returning the
    /// answer as text.
    pub fn post_file(&self, path: &str, file: std::fs::File, len: u64) -> Result<String, CliError> {
        let req = self
            .request(&self.streams, reqwest::Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::blocking::Body::sized(file, len));
        let resp = self.send(req)?;
        resp.text().map_err(|e| self.transport_error(&e))
    }

    /// GET without a time limit, for streams the caller reads as they come.
    pub fn get_stream(&self, path: &str) -> Result<Response, CliError> {
        self.send(self.request(&self.streams, reqwest::Method::GET, path))
    }

    pub fn target(&self) -> &str {
        &self.target
    }
}

pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, CliError> {
    serde_json::from_str(text).map_err(|e| CliError::Protocol(format!("{e} in {}", clip(text))))
}

fn clip(text: &str) -> String {
    let mut s: String = text.chars().take(200).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// reqwest's top-level message is often just "error sending request"; the cause says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The root cause, which says what actually happened, plus a hint for the usual ones.
fn unreachable_detail(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out waiting for an answer".into();
    }
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut root: &dyn std::error::Error = e;
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            let hint = match io.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    " (is agentlabd running?)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    " (is this user allowed on the socket? it is mode 0660)"
                }
                _ => "",
            };
            return format!("{io}{hint}");
        }
        root = cause;
        source = cause.source();
    }
    root.to_string()
}

fn api_error(resp: Response) -> CliError {
    let status = resp.status();
    let text = resp.text().unwrap_or_default();
    api_error_from(status, &text)
}

/// Maps an error answer to a `CliError`: 404 is "not found" (exit 4), the rest exit 7.
pub fn api_error_from(status: StatusCode, text: &str) -> CliError {
    let (code, message) = match serde_json::from_str::<ErrorBody>(text) {
        Ok(body) => (body.error.code, body.error.message),
        Err(_) => (
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
                .replace(' ', "_"),
            if text.trim().is_empty() {
                status.to_string()
            } else {
                clip(text.trim())
            },
        ),
    };
    if status == StatusCode::NOT_FOUND {
        return CliError::NotFound { message };
    }
    CliError::Api {
        status: status.as_u16(),
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_become_clear_errors_with_the_right_exit_codes() {
        let e = api_error_from(
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"not_found","message":"job 0199 does not exist"}}"#,
        );
        assert_eq!(e.to_string(), "job 0199 does not exist");
        assert_eq!(e.exit_code(), 4);

        let e = api_error_from(
            StatusCode::CONFLICT,
            r#"{"error":{"code":"conflict","message":"job is already COMPLETED"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "agentlabd answered 409 (conflict): job is already COMPLETED"
        );
        assert_eq!(e.exit_code(), 7);

        let e = api_error_from(StatusCode::BAD_GATEWAY, "");
        assert_eq!(
            e.to_string(),
            "agentlabd answered 502 (bad_gateway): 502 Bad Gateway"
        );
    }

    #[test]
    fn a_missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let client = ApiClient::new(&Target::Socket(dir.path().join("nope.sock"))).unwrap();
        let e = client.get_text("/health").unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        assert!(e.to_string().contains("nope.sock"), "{e}");
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        let e = ApiClient::new(&Target::Endpoint {
            base: "localhost:8080".into(),
            token: None,
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let t = Target::Endpoint {
            base: "http://h".into(),
            token: Some("tok-123456".into()),
        };
        assert!(!format!("{t:?}").contains("tok-123456"));
    }
}

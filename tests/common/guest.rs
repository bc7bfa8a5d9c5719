//! A test playing a sandbox's guest against the daemon's real guest API. The fake backend's
//! `external_guest` mode simulates nothing after a VM starts and hands each VM's provisioning
//! (tokens included) to the test through a file; `Guest` reads it and makes the calls the runner
//! would, or the ones an attacker would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentlab::backend::fake::FakeProvisioning;
use serde_json::Value;

/// The fake backend's config for a daemon whose guests a test plays: provisioning goes to
/// `provisioning` (a file under the test's folder).
pub fn external_guest_fake(provisioning: &Path) -> String {
    format!("fake:\n  external_guest: {}\n", provisioning.display())
}

/// An HTTP answer: status and body (JSON if it parses, else Null) and the raw text.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub json: Value,
    pub text: String,
}

pub struct Guest {
    pub provisioning: FakeProvisioning,
    client: reqwest::blocking::Client,
}

impl Guest {
    /// Waits until the daemon has provisioned a VM for `job_id` and returns its guest.
    pub fn of_job(file: &Path, job_id: &str, limit: Duration) -> Guest {
        let deadline = Instant::now() + limit;
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let found = text
                .lines()
                .filter_map(|line| serde_json::from_str::<FakeProvisioning>(line).ok())
                .find(|p| p.job_id == job_id);
            if let Some(provisioning) = found {
                return Guest {
                    provisioning,
                    client: reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(60))
                        .build()
                        .unwrap(),
                };
            }
            assert!(Instant::now() < deadline, "job {job_id} got no VM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.provisioning.guest_url.trim_end_matches('/')
        )
    }

    fn answer(response: reqwest::blocking::Response) -> Answer {
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        Answer {
            status,
            json: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    pub fn phone_home(&self) -> Answer {
        let response = self
            .client
            .post(&self.provisioning.phone_home_url)
            .send()
            .unwrap();
        Self::answer(response)
    }

    /// Redeems a bootstrap token (the VM's own unless `token` says otherwise).
    pub fn bootstrap_with(&self, token: &str) -> Answer {
        let response = self
            .client
            .post(self.url("/guest/v1/bootstrap"))
            .bearer_auth(token)
            .send()
            .unwrap();
        Self::answer(response)
    }

    /// Phones home and redeems the VM's bootstrap token: the job spec, whose `session_token`
    /// authorizes the rest.
    pub fn start(&self) -> Value {
        assert_eq!(self.phone_home().status, 200);
        let answer = self.bootstrap_with(&self.provisioning.bootstrap_token);
        assert_eq!(answer.status, 200, "{}", answer.text);
        answer.json
    }

    pub fn post(&self, token: &str, path: &str, body: Vec<u8>) -> Answer {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .body(body)
            .send()
            .unwrap();
        Self::answer(response)
    }

    pub fn post_json(&self, token: &str, path: &str, body: &Value) -> Answer {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .unwrap();
        Self::answer(response)
    }

    pub fn get(&self, token: &str, path: &str) -> (Answer, Vec<u8>) {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.bytes().unwrap_or_default().to_vec();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (
            Answer {
                status,
                json: serde_json::from_str(&text).unwrap_or(Value::Null),
                text,
            },
            bytes,
        )
    }

    /// Uploads `body` as artifact `path` (sent as given: no normalisation by the client).
    pub fn put_artifact(&self, token: &str, path: &str, body: Vec<u8>) -> Answer {
        let response = self
            .client
            .put(self.url(&format!("/guest/v1/artifacts/{path}")))
            .bearer_auth(token)
            .body(body)
            .send()
            .unwrap();
        Self::answer(response)
    }

    /// Reports the command's exit and the end of uploads, as the runner does at the end.
    pub fn finish(&self, token: &str, exit_code: i32) {
        let exit = self.post_json(
            token,
            "/guest/v1/exit",
            &serde_json::json!({"exit_code": exit_code}),
        );
        assert_eq!(exit.status, 204, "{}", exit.text);
        let done = self.post_json(token, "/guest/v1/done", &serde_json::json!({"uploaded": 0}));
        assert_eq!(done.status, 204, "{}", done.text);
    }
}

/// A file under the test's folder for the provisioning lines.
pub fn provisioning_file(dir: &Path) -> PathBuf {
    dir.join("provisioning.jsonl")
}

impl Guest {
    /// The guest API's address, host:port.
    pub fn authority(&self) -> String {
        let url = reqwest::Url::parse(&self.provisioning.guest_url).unwrap();
        format!(
            "{}:{}",
            url.host_str().unwrap(),
            url.port_or_known_default().unwrap()
        )
    }

    /// Sends `head` (request line and headers, without the blank line) and `body` over a raw
    /// connection and returns the status: for targets an HTTP client would normalise (`..`).
    pub fn raw(&self, head: &str, body: &[u8]) -> Answer {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.authority()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let request = format!(
            "{head}\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.authority(),
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        Answer {
            status,
            json: serde_json::from_str(&body).unwrap_or(Value::Null),
            text: body,
        }
    }
}

impl Guest {
    /// Opens a request over a raw connection and sends `head` (request line and headers, without
    /// the blank line) with a `Content-Length` of `declared`, then only `partial` of the body: a
    /// guest that stalls mid-body. Read the answer, if any, with `read_answer`.
    pub fn open_stalled(&self, head: &str, declared: usize, partial: &[u8]) -> std::net::TcpStream {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(self.authority()).unwrap();
        let request = format!(
            "{head}\r\nHost: {}\r\nContent-Length: {declared}\r\n\r\n",
            self.authority()
        );
        stream.write_all(request.as_bytes()).unwrap();
        stream.write_all(partial).unwrap();
        stream.flush().unwrap();
        stream
    }
}

/// Reads one HTTP answer (head, then as much body as its `Content-Length` says) off a raw
/// connection, without waiting for the connection to close; status 0 if it closed first.
pub fn read_answer(stream: &mut std::net::TcpStream) -> Answer {
    use std::io::Read;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(at + 4);
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break None,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    };
    let Some(head_end) = head_end else {
        return Answer {
            status: 0,
            json: Value::Null,
            text: String::from_utf8_lossy(&received).into_owned(),
        };
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while received.len() < head_end + length {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&received[head_end..]).into_owned();
    Answer {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

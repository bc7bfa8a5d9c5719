//! Minimal async QMP (QEMU Machine Protocol) client: the greeting and capabilities negotiation,
//! `query-status` and `quit`. Commands carry an id, so events and stray replies are skipped. A
//! connection is meant for one short conversation: QEMU serves one QMP client at a time.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::BufReader;
use tokio::net::UnixStream;

use super::wire::{self, LineError, Reply, MAX_LINE_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}: {source}")]
    NotConnected {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP connection lost: {0}")]
    Disconnected(String),
    #[error("QMP {command} got no answer within {timeout:?}")]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("QMP protocol error in {command}: {message}")]
    Protocol {
        command: &'static str,
        message: String,
    },
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: &'static str,
        class: String,
        desc: String,
    },
}

impl QmpError {
    fn from_line(command: &'static str, error: LineError) -> Self {
        match error {
            LineError::Closed => QmpError::Disconnected("closed by QEMU".to_owned()),
            LineError::Io(e) => QmpError::Disconnected(e.to_string()),
            LineError::TooLong => QmpError::Protocol {
                command,
                message: format!("message longer than {MAX_LINE_BYTES} bytes"),
            },
        }
    }
}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunState {
    /// QEMU's run state: "running", "paused", "prelaunch", "shutdown", "guest-panicked", …
    pub status: String,
    pub running: bool,
}

#[derive(Debug)]
pub struct QmpClient {
    connection: BufReader<UnixStream>,
    next_id: u64,
}

impl QmpClient {
    /// Connects, reads the greeting and leaves negotiation mode; `timeout` covers all of it.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        const COMMAND: &str = "qmp_capabilities";
        let handshake = async {
            let stream =
                UnixStream::connect(socket)
                    .await
                    .map_err(|source| QmpError::NotConnected {
                        path: socket.to_owned(),
                        source,
                    })?;
            let mut client = QmpClient {
                connection: BufReader::new(stream),
                next_id: 1,
            };
            let greeting = client.read_message(COMMAND).await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Protocol {
                    command: COMMAND,
                    message: format!("expected the QMP greeting, got {greeting}"),
                });
            }
            client.execute_unbounded(COMMAND, None).await?;
            Ok(client)
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .unwrap_or(Err(QmpError::Timeout {
                command: COMMAND,
                timeout,
            }))
    }

    pub async fn query_status(&mut self, timeout: Duration) -> Result<RunState, QmpError> {
        const COMMAND: &str = "query-status";
        let reply = self.execute(COMMAND, None, timeout).await?;
        serde_json::from_value(reply).map_err(|e| QmpError::Protocol {
            command: COMMAND,
            message: e.to_string(),
        })
    }

    /// Asks QEMU to exit. QEMU may close the connection before its reply is read, which counts
    /// as success too.
    pub async fn quit(&mut self, timeout: Duration) -> Result<(), QmpError> {
        match self.execute("quit", None, timeout).await {
            Ok(_) | Err(QmpError::Disconnected(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute_unbounded(command, arguments))
            .await
            .unwrap_or(Err(QmpError::Timeout { command, timeout }))
    }

    async fn execute_unbounded(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = json!(self.next_id);
        self.next_id += 1;
        let line = wire::command_line(command, arguments.as_ref(), Some(&id));
        wire::write_all(self.connection.get_mut(), &line)
            .await
            .map_err(|e| QmpError::Disconnected(e.to_string()))?;
        loop {
            let message = self.read_message(command).await?;
            if message.get("event").is_some() || message.get("id") != Some(&id) {
                continue;
            }
            return match Reply::classify(message) {
                Reply::Return(value) => Ok(value),
                Reply::Error { class, desc } => Err(QmpError::Command {
                    command,
                    class,
                    desc,
                }),
                Reply::Other(other) => Err(QmpError::Protocol {
                    command,
                    message: format!("unexpected message: {other}"),
                }),
            };
        }
    }

    async fn read_message(&mut self, command: &'static str) -> Result<Value, QmpError> {
        loop {
            let line = wire::read_line(&mut self.connection, MAX_LINE_BYTES)
                .await
                .map_err(|e| QmpError::from_line(command, e))?;
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return wire::parse_line(&line).ok_or_else(|| QmpError::Protocol {
                command,
                message: format!("not JSON: {}", wire::excerpt(&line)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    const T: Duration = Duration::from_secs(2);

    #[derive(Debug, Default)]
    struct Seen {
        commands: Vec<String>,
    }

    /// A fake QEMU: greeting, capabilities, events before replies, and `quit` that closes the
    /// connection without answering (QEMU may exit before its reply is flushed).
    async fn fake_qemu(listener: UnixListener, status: &'static str, seen: Arc<Mutex<Seen>>) {
        while let Ok((stream, _)) = listener.accept().await {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read);
            let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}});
            let _ = write.write_all(format!("{greeting}\n").as_bytes()).await;
            let mut negotiated = false;
            loop {
                let mut line = String::new();
                match lines.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let request: Value = serde_json::from_str(&line).unwrap();
                let command = request["execute"].as_str().unwrap().to_owned();
                seen.lock().unwrap().commands.push(command.clone());
                let id = request["id"].clone();
                let reply = match (negotiated, command.as_str()) {
                    (false, "qmp_capabilities") => {
                        negotiated = true;
                        json!({"return": {}, "id": id})
                    }
                    (false, _) => {
                        json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": id})
                    }
                    (true, "query-status") => {
                        let event = json!({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}});
                        let stale =
                            json!({"return": {"status": "paused", "running": false}, "id": 999});
                        let _ = write
                            .write_all(format!("{event}\n{stale}\n").as_bytes())
                            .await;
                        json!({"return": {"status": status, "singlestep": false, "running": status == "running"}, "id": id})
                    }
                    (true, "quit") => break,
                    (true, _) => {
                        json!({"error": {"class": "CommandNotFound", "desc": format!("The command {command} has not been found")}, "id": id})
                    }
                };
                let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
            }
        }
    }

    fn spawn_fake(status: &'static str) -> (tempfile::TempDir, PathBuf, Arc<Mutex<Seen>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::spawn(fake_qemu(listener, status, seen.clone()));
        (dir, path, seen)
    }

    #[tokio::test]
    async fn negotiates_then_queries_status_past_events() {
        let (_dir, path, seen) = spawn_fake("running");
        let mut qmp = QmpClient::connect(&path, T).await.unwrap();
        let state = qmp.query_status(T).await.unwrap();
        assert_eq!(
            state,
            RunState {
                status: "running".into(),
                running: true
            }
        );
        assert_eq!(
            seen.lock().unwrap().commands,
            ["qmp_capabilities", "query-status"]
        );
    }

    #[tokio::test]
    async fn quit_succeeds_when_qemu_closes_the_connection() {
        let (_dir, path, seen) = spawn_fake("running");
        let mut qmp = QmpClient::connect(&path, T).await.unwrap();
        qmp.quit(T).await.unwrap();
        assert_eq!(seen.lock().unwrap().commands.last().unwrap(), "quit");
    }

    #[tokio::test]
    async fn command_errors_are_typed() {
        let (_dir, path, _seen) = spawn_fake("paused");
        let mut qmp = QmpClient::connect(&path, T).await.unwrap();
        assert!(!qmp.query_status(T).await.unwrap().running);
        let err = qmp.execute("stop-the-world", None, T).await.unwrap_err();
        assert!(
            matches!(err, QmpError::Command { ref class, .. } if class == "CommandNotFound"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn missing_socket_and_silent_peer() {
        let dir = tempfile::tempdir().unwrap();
        let err = QmpClient::connect(&dir.path().join("none.sock"), T)
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::NotConnected { .. }), "{err}");

        // A peer that accepts but never greets (a second client while QEMU serves a first one).
        let path = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _held = tokio::spawn(async move {
            let conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        });
        let err = QmpClient::connect(&path, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    }
}

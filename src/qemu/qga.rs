//! Async client for the QEMU guest agent (QGA) on a VM's virtio-serial unix socket.
//!
//! The channel has no request ids, and a reply the client gave up on still arrives later, so the
//! stream is only trusted right after a `guest-sync-delimited` handshake: the client sends 0xFF
//! (which makes the agent drop any half-parsed input) and a random id, then skips everything up to
//! a 0xFF and discards replies until that id comes back. A timeout or an unparsable reply marks
//! the stream unsynchronised and the next call handshakes again; a closed or broken connection is
//! dropped and the next call reconnects.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::BufReader;
use tokio::net::UnixStream;

use super::wire::{self, LineError, Reply, MAX_LINE_BYTES};

/// Precedes the reply to `guest-sync-delimited`; never part of valid UTF-8, hence of any JSON.
const SYNC_DELIMITER: u8 = 0xFF;

/// Size of one `guest-file-read`/`guest-file-write` chunk.
const FILE_CHUNK_BYTES: usize = 48 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// Nothing listens on the socket (the VM is not running), or the socket is missing.
    #[error("cannot connect to the guest agent socket {path}: {source}")]
    NotConnected {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The connection closed or broke. QEMU accepts connections even before the guest's agent is
    /// up; this means QEMU itself went away or dropped us.
    #[error("guest agent connection lost: {0}")]
    Disconnected(String),
    /// No answer in time; while a guest boots, this is what "agent not up yet" looks like.
    #[error("guest agent did not answer {command} within {timeout:?}")]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("guest agent protocol error in {command}: {message}")]
    Protocol {
        command: &'static str,
        message: String,
    },
    /// The agent answered with `{"error": {"class", "desc"}}`.
    #[error("guest agent refused {command}: {class}: {desc}")]
    Guest {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("guest file {path} is larger than {limit} bytes")]
    FileTooLarge { path: String, limit: usize },
}

impl QgaError {
    fn protocol(command: &'static str, message: impl Into<String>) -> Self {
        QgaError::Protocol {
            command,
            message: message.into(),
        }
    }

    fn from_line(command: &'static str, error: LineError) -> Self {
        match error {
            LineError::Closed => QgaError::Disconnected("closed by QEMU".to_owned()),
            LineError::Io(e) => QgaError::Disconnected(e.to_string()),
            LineError::TooLong => {
                QgaError::protocol(command, format!("reply longer than {MAX_LINE_BYTES} bytes"))
            }
        }
    }

    /// Whether the agent simply is not reachable yet (or any more), as opposed to misbehaving.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            QgaError::NotConnected { .. } | QgaError::Disconnected(_) | QgaError::Timeout { .. }
        )
    }
}

/// A command for `guest-exec`. The Debug form leaves out environment values and input, which may
/// carry secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub path: String,
    pub args: Vec<String>,
    /// `KEY=VALUE` entries. When not empty they replace the agent's environment entirely.
    pub env: Vec<String>,
    /// Sent base64-encoded as `input-data`: qemu-ga writes it to a pipe on the command's stdin
    /// and closes the pipe after the last byte, so the command reads it to EOF. None leaves the
    /// command qemu-ga's own stdin.
    pub input: Option<Vec<u8>>,
    /// Have the agent buffer stdout/stderr for `guest-exec-status` (capped at about 16 MB).
    pub capture_output: bool,
}

impl fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_keys: Vec<&str> = self
            .env
            .iter()
            .map(|entry| entry.split('=').next().unwrap_or(""))
            .collect();
        f.debug_struct("ExecRequest")
            .field("path", &self.path)
            .field("args", &self.args)
            .field("env_keys", &env_keys)
            .field("input_bytes", &self.input.as_ref().map(Vec::len))
            .field("capture_output", &self.capture_output)
            .finish()
    }
}

/// What `guest-exec-status` reports, with captured output already base64-decoded.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExecStatusReply {
    pub exited: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl fmt::Debug for ExecStatusReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecStatusReply")
            .field("exited", &self.exited)
            .field("exit_code", &self.exit_code)
            .field("signal", &self.signal)
            .field("stdout_bytes", &self.stdout.len())
            .field("stderr_bytes", &self.stderr.len())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawExecStatus {
    exited: bool,
    exitcode: Option<i32>,
    signal: Option<i32>,
    #[serde(rename = "out-data")]
    out_data: Option<String>,
    #[serde(rename = "err-data")]
    err_data: Option<String>,
    #[serde(rename = "out-truncated", default)]
    out_truncated: bool,
    #[serde(rename = "err-truncated", default)]
    err_truncated: bool,
}

#[derive(Deserialize)]
struct RawFileRead {
    #[serde(rename = "buf-b64")]
    buf_b64: String,
    eof: bool,
}

#[derive(Deserialize)]
struct RawFileWrite {
    count: usize,
}

#[derive(Deserialize)]
struct RawExec {
    pid: i64,
}

/// One chunk of a guest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    pub data: Vec<u8>,
    pub eof: bool,
}

type Connection = BufReader<UnixStream>;

/// A guest agent client. Calls take `&mut self`: the channel carries one conversation at a time.
#[derive(Debug)]
pub struct QgaClient {
    /// Where to (re)connect; None for a client made from a stream, which cannot reconnect.
    socket: Option<PathBuf>,
    connection: Option<Connection>,
    synced: bool,
}

impl QgaClient {
    /// A client for the agent behind `socket`; it connects on the first call.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        QgaClient {
            socket: Some(socket.into()),
            connection: None,
            synced: false,
        }
    }

    /// A client on an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        QgaClient {
            socket: None,
            connection: Some(BufReader::new(stream)),
            synced: false,
        }
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<(), QgaError> {
        self.call("guest-ping", None, timeout).await.map(drop)
    }

    /// Starts a command and returns its guest pid without waiting for it.
    pub async fn exec(
        &mut self,
        request: &ExecRequest,
        timeout: Duration,
    ) -> Result<i64, QgaError> {
        let mut arguments = json!({
            "path": request.path,
            "arg": request.args,
            "capture-output": request.capture_output,
        });
        if !request.env.is_empty() {
            arguments["env"] = json!(request.env);
        }
        if let Some(input) = &request.input {
            arguments["input-data"] = json!(BASE64.encode(input));
        }
        let reply = self.call("guest-exec", Some(arguments), timeout).await?;
        let raw: RawExec = decode("guest-exec", reply)?;
        Ok(raw.pid)
    }

    /// Polls a command started by `exec`. The agent forgets a command once it has reported it
    /// exited, so a second poll after that is a guest error.
    pub async fn exec_status(
        &mut self,
        pid: i64,
        timeout: Duration,
    ) -> Result<ExecStatusReply, QgaError> {
        const COMMAND: &str = "guest-exec-status";
        let reply = self
            .call(COMMAND, Some(json!({ "pid": pid })), timeout)
            .await?;
        let raw: RawExecStatus = decode(COMMAND, reply)?;
        Ok(ExecStatusReply {
            exited: raw.exited,
            exit_code: raw.exitcode,
            signal: raw.signal,
            stdout: decode_base64(COMMAND, raw.out_data.as_deref())?,
            stderr: decode_base64(COMMAND, raw.err_data.as_deref())?,
            stdout_truncated: raw.out_truncated,
            stderr_truncated: raw.err_truncated,
        })
    }

    /// Opens a guest file with an fopen(3) mode ("r", "w", "a", …) and returns its handle.
    pub async fn file_open(
        &mut self,
        path: &str,
        mode: &str,
        timeout: Duration,
    ) -> Result<i64, QgaError> {
        const COMMAND: &str = "guest-file-open";
        let reply = self
            .call(
                COMMAND,
                Some(json!({ "path": path, "mode": mode })),
                timeout,
            )
            .await?;
        reply.as_i64().ok_or_else(|| {
            QgaError::protocol(COMMAND, format!("handle is not an integer: {reply}"))
        })
    }

    pub async fn file_read(
        &mut self,
        handle: i64,
        count: usize,
        timeout: Duration,
    ) -> Result<FileChunk, QgaError> {
        const COMMAND: &str = "guest-file-read";
        let reply = self
            .call(
                COMMAND,
                Some(json!({ "handle": handle, "count": count })),
                timeout,
            )
            .await?;
        let raw: RawFileRead = decode(COMMAND, reply)?;
        Ok(FileChunk {
            data: decode_base64(COMMAND, Some(&raw.buf_b64))?,
            eof: raw.eof,
        })
    }

    /// Writes one chunk and returns how many bytes the agent wrote.
    pub async fn file_write(
        &mut self,
        handle: i64,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, QgaError> {
        const COMMAND: &str = "guest-file-write";
        let arguments = json!({ "handle": handle, "buf-b64": BASE64.encode(data) });
        let reply = self.call(COMMAND, Some(arguments), timeout).await?;
        let raw: RawFileWrite = decode(COMMAND, reply)?;
        Ok(raw.count)
    }

    pub async fn file_close(&mut self, handle: i64, timeout: Duration) -> Result<(), QgaError> {
        self.call(
            "guest-file-close",
            Some(json!({ "handle": handle })),
            timeout,
        )
        .await
        .map(drop)
    }

    /// Reads a small guest file whole; `timeout` applies to each agent call.
    pub async fn read_file(
        &mut self,
        path: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, QgaError> {
        let handle = self.file_open(path, "r", timeout).await?;
        let mut contents = Vec::new();
        let result = loop {
            match self.file_read(handle, FILE_CHUNK_BYTES, timeout).await {
                Ok(chunk) => {
                    contents.extend_from_slice(&chunk.data);
                    if contents.len() > limit {
                        break Err(QgaError::FileTooLarge {
                            path: path.to_owned(),
                            limit,
                        });
                    }
                    if chunk.eof || chunk.data.is_empty() {
                        break Ok(contents);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        // The agent holds open handles until closed; closing is worth a try even after a failure.
        let closed = self.file_close(handle, timeout).await;
        let contents = result?;
        closed?;
        Ok(contents)
    }

    /// Creates or truncates a guest file and writes `data` to it; `timeout` applies to each call.
    pub async fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), QgaError> {
        let handle = self.file_open(path, "w", timeout).await?;
        let mut result = Ok(());
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(FILE_CHUNK_BYTES)];
            match self.file_write(handle, chunk, timeout).await {
                Ok(0) => {
                    result = Err(QgaError::protocol(
                        "guest-file-write",
                        format!("wrote nothing with {} bytes left", rest.len()),
                    ));
                    break;
                }
                Ok(written) => rest = &rest[written.min(rest.len())..],
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let closed = self.file_close(handle, timeout).await;
        result?;
        closed
    }

    /// Sends one command and returns its `return` value. `timeout` covers connecting,
    /// resynchronising and the round trip.
    pub async fn call(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let outcome = tokio::time::timeout(timeout, self.call_unbounded(command, arguments)).await;
        let result = outcome.unwrap_or(Err(QgaError::Timeout { command, timeout }));
        match &result {
            Ok(_) | Err(QgaError::Guest { .. }) | Err(QgaError::FileTooLarge { .. }) => {}
            Err(QgaError::Timeout { .. }) | Err(QgaError::Protocol { .. }) => self.synced = false,
            Err(QgaError::NotConnected { .. }) | Err(QgaError::Disconnected(_)) => {
                self.connection = None;
                self.synced = false;
            }
        }
        result
    }

    async fn call_unbounded(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
    ) -> Result<Value, QgaError> {
        if self.connection.is_none() {
            self.connection = Some(self.connect().await?);
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err(QgaError::Disconnected("no connection".to_owned()));
        };
        if !self.synced {
            synchronise(connection).await?;
            self.synced = true;
        }
        let line = wire::command_line(command, arguments.as_ref(), None);
        wire::write_all(connection.get_mut(), &line)
            .await
            .map_err(|e| QgaError::Disconnected(e.to_string()))?;
        loop {
            let line = wire::read_line(connection, MAX_LINE_BYTES)
                .await
                .map_err(|e| QgaError::from_line(command, e))?;
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let Some(message) = wire::parse_line(&line) else {
                return Err(QgaError::protocol(
                    command,
                    format!("not JSON: {}", wire::excerpt(&line)),
                ));
            };
            return match Reply::classify(message) {
                Reply::Return(value) => Ok(value),
                Reply::Error { class, desc } => Err(QgaError::Guest {
                    command,
                    class,
                    desc,
                }),
                Reply::Other(other) => Err(QgaError::protocol(
                    command,
                    format!(
                        "unexpected message: {}",
                        wire::excerpt(other.to_string().as_bytes())
                    ),
                )),
            };
        }
    }

    async fn connect(&self) -> Result<Connection, QgaError> {
        let Some(path) = &self.socket else {
            return Err(QgaError::Disconnected(
                "stream closed and there is no socket path to reconnect to".to_owned(),
            ));
        };
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QgaError::NotConnected {
                path: path.clone(),
                source,
            })?;
        Ok(BufReader::new(stream))
    }
}

/// Runs the `guest-sync-delimited` handshake: afterwards the next reply on the stream answers the
/// next command.
async fn synchronise(connection: &mut Connection) -> Result<(), QgaError> {
    const COMMAND: &str = "guest-sync-delimited";
    // Kept within 2^31 because some agents parse the id as a C int.
    let id = i64::from(rand::random::<u32>() >> 1);
    let mut request = vec![SYNC_DELIMITER];
    request.extend(wire::command_line(
        COMMAND,
        Some(&json!({ "id": id })),
        None,
    ));
    wire::write_all(connection.get_mut(), &request)
        .await
        .map_err(|e| QgaError::Disconnected(e.to_string()))?;
    loop {
        wire::skip_past(connection, SYNC_DELIMITER)
            .await
            .map_err(|e| QgaError::from_line(COMMAND, e))?;
        let line = wire::read_line(connection, MAX_LINE_BYTES)
            .await
            .map_err(|e| QgaError::from_line(COMMAND, e))?;
        // A stale delimiter may directly precede ours on the same line.
        let after_last_delimiter = line
            .iter()
            .rposition(|b| *b == SYNC_DELIMITER)
            .map_or(&line[..], |at| &line[at + 1..]);
        let Some(message) = wire::parse_line(after_last_delimiter) else {
            continue;
        };
        if let Reply::Return(value) = Reply::classify(message) {
            if value.as_i64() == Some(id) {
                return Ok(());
            }
        }
        // A reply to an earlier sync; keep looking.
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    command: &'static str,
    reply: Value,
) -> Result<T, QgaError> {
    serde_json::from_value(reply).map_err(|e| QgaError::protocol(command, e.to_string()))
}

fn decode_base64(command: &'static str, data: Option<&str>) -> Result<Vec<u8>, QgaError> {
    match data {
        None => Ok(Vec::new()),
        Some(text) => BASE64
            .decode(text)
            .map_err(|e| QgaError::protocol(command, format!("bad base64: {e}"))),
    }
}

#[cfg(test)]
pub(crate) mod fake_agent {
    //! An in-process guest agent speaking enough of the protocol for the client's tests.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use base64::Engine;
    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    use super::BASE64;

    /// How the fake misbehaves.
    #[derive(Debug, Default, Clone)]
    pub struct Script {
        /// Raw bytes written before the reply to the first sync (stale replies, junk).
        pub before_first_sync: Vec<u8>,
        /// The first N pings are answered only after this delay.
        pub slow_pings: usize,
        pub slow_ping_delay: Duration,
    }

    #[derive(Debug, Default)]
    pub struct State {
        pub files: HashMap<String, Vec<u8>>,
        pub execs: Vec<Value>,
        pub syncs: usize,
        pub connections: usize,
    }

    pub type Shared = Arc<Mutex<State>>;

    fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
        state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one connection until the client closes it.
    pub async fn serve(stream: UnixStream, script: Arc<Mutex<Script>>, state: Shared) {
        lock(&state).connections += 1;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let mut handles: HashMap<i64, (String, usize, String)> = HashMap::new();
        let mut next_handle = 100;
        loop {
            let mut line = Vec::new();
            match lines.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            // Like qemu-ga, a 0xFF resets the parser: whatever precedes it is dropped.
            let start = line.iter().rposition(|b| *b == 0xFF).map_or(0, |at| at + 1);
            let Ok(request) = serde_json::from_slice::<Value>(&line[start..]) else {
                continue;
            };
            let command = request["execute"].as_str().unwrap_or("").to_owned();
            let args = request["arguments"].clone();
            let mut out: Vec<u8> = Vec::new();
            let reply = match command.as_str() {
                "guest-sync-delimited" => {
                    let first = {
                        let mut state = lock(&state);
                        state.syncs += 1;
                        state.syncs == 1
                    };
                    if first {
                        let junk = lock_script(&script).before_first_sync.clone();
                        out.extend(junk);
                    }
                    out.push(0xFF);
                    json!({"return": args["id"]})
                }
                "guest-ping" => {
                    let delay = {
                        let mut script = lock_script(&script);
                        if script.slow_pings > 0 {
                            script.slow_pings -= 1;
                            Some(script.slow_ping_delay)
                        } else {
                            None
                        }
                    };
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                    json!({"return": {}})
                }
                "guest-exec" => {
                    lock(&state).execs.push(args.clone());
                    json!({"return": {"pid": 4242}})
                }
                "guest-exec-status" => {
                    if args["pid"] == json!(4242) {
                        json!({"return": {
                            "exited": true, "exitcode": 3,
                            "out-data": BASE64.encode("hi\n"), "err-data": BASE64.encode("oops")
                        }})
                    } else {
                        json!({"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}})
                    }
                }
                "guest-file-open" => {
                    let path = args["path"].as_str().unwrap_or("").to_owned();
                    let mode = args["mode"].as_str().unwrap_or("r").to_owned();
                    let exists = lock(&state).files.contains_key(&path);
                    if mode == "r" && !exists {
                        json!({"error": {"class": "GenericError", "desc": "No such file"}})
                    } else {
                        if mode == "w" {
                            lock(&state).files.insert(path.clone(), Vec::new());
                        }
                        next_handle += 1;
                        handles.insert(next_handle, (path, 0, mode));
                        json!({"return": next_handle})
                    }
                }
                "guest-file-read" => {
                    let handle = args["handle"].as_i64().unwrap_or(-1);
                    let count = args["count"].as_u64().unwrap_or(0) as usize;
                    match handles.get_mut(&handle) {
                        Some((path, offset, _)) => {
                            let data = lock(&state)
                                .files
                                .get(path.as_str())
                                .cloned()
                                .unwrap_or_default();
                            let end = (*offset + count).min(data.len());
                            let chunk = &data[*offset..end];
                            *offset = end;
                            json!({"return": {"count": chunk.len(), "buf-b64": BASE64.encode(chunk), "eof": end == data.len()}})
                        }
                        None => json!({"error": {"class": "GenericError", "desc": "bad handle"}}),
                    }
                }
                "guest-file-write" => {
                    let handle = args["handle"].as_i64().unwrap_or(-1);
                    let data = BASE64
                        .decode(args["buf-b64"].as_str().unwrap_or(""))
                        .unwrap_or_default();
                    match handles.get(&handle) {
                        Some((path, _, _)) => {
                            lock(&state)
                                .files
                                .entry(path.clone())
                                .or_default()
                                .extend_from_slice(&data);
                            json!({"return": {"count": data.len(), "eof": false}})
                        }
                        None => json!({"error": {"class": "GenericError", "desc": "bad handle"}}),
                    }
                }
                "guest-file-close" => {
                    let handle = args["handle"].as_i64().unwrap_or(-1);
                    handles.remove(&handle);
                    json!({"return": {}})
                }
                _ => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {command} has not been found")}})
                }
            };
            out.extend(reply.to_string().into_bytes());
            out.push(b'\n');
            if write.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    fn lock_script(script: &Arc<Mutex<Script>>) -> std::sync::MutexGuard<'_, Script> {
        script.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::fake_agent::{self, Script, Shared};
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn start_pair(script: Script) -> (QgaClient, Shared) {
        let (client, agent) = UnixStream::pair().unwrap();
        let state = Shared::default();
        tokio::spawn(fake_agent::serve(
            agent,
            Arc::new(Mutex::new(script)),
            state.clone(),
        ));
        (QgaClient::from_stream(client), state)
    }

    #[tokio::test]
    async fn ping_after_stale_replies_and_junk() {
        let mut junk = Vec::new();
        junk.extend(b"{\"return\": {\"pid\": 1}}\n");
        junk.extend(b"\xff{\"return\": 99}\n");
        junk.extend(b"\xffnot json at all\n");
        junk.extend(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"stale\"}}\n");
        junk.extend(b"half a line");
        let (mut client, state) = start_pair(Script {
            before_first_sync: junk,
            ..Script::default()
        });
        client.ping(T).await.unwrap();
        client.ping(T).await.unwrap();
        assert_eq!(
            state.lock().unwrap().syncs,
            1,
            "a synced stream is not resynced"
        );
    }

    #[tokio::test]
    async fn timeout_then_resync_discards_the_late_reply() {
        let (mut client, state) = start_pair(Script {
            slow_pings: 1,
            slow_ping_delay: Duration::from_millis(300),
            ..Script::default()
        });
        let err = client.ping(Duration::from_millis(100)).await.unwrap_err();
        assert!(
            matches!(
                err,
                QgaError::Timeout {
                    command: "guest-ping",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_unavailable());
        // The late `{"return": {}}` of the first ping is still in the stream; the resync skips it,
        // so the next call's answer really is the next call's.
        let pid = client
            .exec(
                &ExecRequest {
                    path: "/bin/true".into(),
                    ..ExecRequest::default()
                },
                T,
            )
            .await
            .unwrap();
        assert_eq!(pid, 4242);
        assert_eq!(state.lock().unwrap().syncs, 2);
    }

    #[tokio::test]
    async fn exec_and_exec_status_decode_base64() {
        let (mut client, state) = start_pair(Script::default());
        let request = ExecRequest {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi; exit 3".into()],
            env: vec!["SECRET=hunter2".into()],
            input: Some(b"stdin".to_vec()),
            capture_output: true,
        };
        assert!(!format!("{request:?}").contains("hunter2"));
        let pid = client.exec(&request, T).await.unwrap();
        let sent = state.lock().unwrap().execs[0].clone();
        assert_eq!(sent["arg"], json!(["-c", "echo hi; exit 3"]));
        assert_eq!(sent["env"], json!(["SECRET=hunter2"]));
        assert_eq!(sent["input-data"], json!(BASE64.encode("stdin")));
        assert_eq!(sent["capture-output"], json!(true));

        let status = client.exec_status(pid, T).await.unwrap();
        assert!(status.exited);
        assert_eq!(status.exit_code, Some(3));
        assert_eq!(status.signal, None);
        assert_eq!(status.stdout, b"hi\n");
        assert_eq!(status.stderr, b"oops");
    }

    #[tokio::test]
    async fn input_goes_only_when_given_and_stays_out_of_debug() {
        let (mut client, state) = start_pair(Script::default());
        let mut request = ExecRequest {
            path: "/usr/local/bin/agentlab-runner".into(),
            args: vec!["identity".into()],
            input: Some(br#"{"token":"boot-secret"}"#.to_vec()),
            ..ExecRequest::default()
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("boot-secret"), "{shown}");
        assert!(shown.contains("input_bytes: Some(23)"), "{shown}");
        client.exec(&request, T).await.unwrap();
        request.input = None;
        client.exec(&request, T).await.unwrap();
        let execs = state.lock().unwrap().execs.clone();
        let sent = BASE64
            .decode(execs[0]["input-data"].as_str().unwrap())
            .unwrap();
        assert_eq!(sent, br#"{"token":"boot-secret"}"#);
        assert!(execs[1].get("input-data").is_none(), "{}", execs[1]);
        assert!(execs[1].get("env").is_none(), "{}", execs[1]);
    }

    #[tokio::test]
    async fn guest_errors_are_typed_and_keep_the_stream_synced() {
        let (mut client, state) = start_pair(Script::default());
        let err = client.exec_status(7, T).await.unwrap_err();
        match &err {
            QgaError::Guest {
                command,
                class,
                desc,
            } => {
                assert_eq!(*command, "guest-exec-status");
                assert_eq!(class, "GenericError");
                assert!(desc.contains("pid"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.is_unavailable());
        let err = client.call("guest-nonsense", None, T).await.unwrap_err();
        assert!(matches!(err, QgaError::Guest { ref class, .. } if class == "CommandNotFound"));
        client.ping(T).await.unwrap();
        assert_eq!(state.lock().unwrap().syncs, 1);
    }

    #[tokio::test]
    async fn small_files_round_trip_in_chunks() {
        let (mut client, state) = start_pair(Script::default());
        let data: Vec<u8> = (0..FILE_CHUNK_BYTES * 2 + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        client.write_file("/tmp/x", &data, T).await.unwrap();
        assert_eq!(state.lock().unwrap().files["/tmp/x"], data);
        assert_eq!(client.read_file("/tmp/x", 1 << 20, T).await.unwrap(), data);
        let err = client.read_file("/tmp/x", 1000, T).await.unwrap_err();
        assert!(matches!(err, QgaError::FileTooLarge { .. }), "{err}");
        let err = client.read_file("/nope", 1000, T).await.unwrap_err();
        assert!(
            matches!(
                err,
                QgaError::Guest {
                    command: "guest-file-open",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn missing_socket_is_not_connected() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = QgaClient::new(dir.path().join("qga.sock"));
        let err = client.ping(T).await.unwrap_err();
        assert!(matches!(err, QgaError::NotConnected { .. }), "{err}");
        assert!(err.is_unavailable());
    }

    #[tokio::test]
    async fn silent_agent_times_out_like_a_booting_guest() {
        // QEMU accepts the connection before the guest's agent runs; nothing ever answers.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _held = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        });
        let mut client = QgaClient::new(&path);
        let err = client.ping(Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, QgaError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn reconnects_after_qemu_drops_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let state = Shared::default();
        let served = state.clone();
        tokio::spawn(async move {
            // The first connection is dropped on the spot, as when a VM restarts.
            let (first, _) = listener.accept().await.unwrap();
            drop(first);
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let script = Arc::new(Mutex::new(Script::default()));
                tokio::spawn(fake_agent::serve(stream, script, served.clone()));
            }
        });
        let mut client = QgaClient::new(&path);
        let err = client.ping(T).await.unwrap_err();
        assert!(matches!(err, QgaError::Disconnected(_)), "{err}");
        client.ping(T).await.unwrap();
        assert_eq!(state.lock().unwrap().connections, 1);
    }
}

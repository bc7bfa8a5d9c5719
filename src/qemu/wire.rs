//! The line-delimited JSON framing shared by QMP and the guest agent: bounded line reads, command
//! writes, and the `{"return": …}` / `{"error": {"class", "desc"}}` reply shapes.

use std::io;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Cap on one reply line. The guest is untrusted, and the largest legitimate reply (a 16 MB
/// capture in base64) stays well below it.
pub(crate) const MAX_LINE_BYTES: u64 = 64 << 20;

#[derive(Debug)]
pub(crate) enum LineError {
    /// The peer closed the connection (possibly mid-line).
    Closed,
    TooLong,
    Io(io::Error),
}

/// Reads one `\n`-terminated line, at most `max` bytes. Dropping the future loses only bytes of a
/// line nobody wanted any more; callers resynchronise after a cancelled read.
pub(crate) async fn read_line<R>(reader: &mut R, max: u64) -> Result<Vec<u8>, LineError>
where
    R: AsyncBufRead + Unpin,
{
    let mut line = Vec::new();
    let read = reader
        .take(max)
        .read_until(b'\n', &mut line)
        .await
        .map_err(LineError::Io)?;
    if line.last() == Some(&b'\n') {
        return Ok(line);
    }
    if read as u64 >= max {
        Err(LineError::TooLong)
    } else {
        Err(LineError::Closed)
    }
}

/// Discards input up to and including the next `delimiter`, without buffering what it skips.
pub(crate) async fn skip_past<R>(reader: &mut R, delimiter: u8) -> Result<(), LineError>
where
    R: AsyncBufRead + Unpin,
{
    loop {
        let available = reader.fill_buf().await.map_err(LineError::Io)?;
        if available.is_empty() {
            return Err(LineError::Closed);
        }
        if let Some(at) = available.iter().position(|b| *b == delimiter) {
            reader.consume(at + 1);
            return Ok(());
        }
        let skipped = available.len();
        reader.consume(skipped);
    }
}

pub(crate) async fn write_all<W>(writer: &mut W, bytes: &[u8]) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Serialises `{"execute": command, "arguments": arguments}` plus a newline.
pub(crate) fn command_line(
    command: &str,
    arguments: Option<&Value>,
    id: Option<&Value>,
) -> Vec<u8> {
    let mut message = serde_json::Map::new();
    message.insert("execute".to_owned(), Value::from(command));
    if let Some(arguments) = arguments {
        message.insert("arguments".to_owned(), arguments.clone());
    }
    if let Some(id) = id {
        message.insert("id".to_owned(), id.clone());
    }
    let mut line = Value::Object(message).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// What one JSON message from QEMU or the guest agent is.
#[derive(Debug)]
pub(crate) enum Reply {
    Return(Value),
    Error {
        class: String,
        desc: String,
    },
    /// A QMP event, a greeting, or something unexpected; the caller decides.
    Other(Value),
}

impl Reply {
    pub(crate) fn classify(mut message: Value) -> Reply {
        if let Some(value) = message.get_mut("return") {
            return Reply::Return(value.take());
        }
        if let Some(error) = message.get("error") {
            let text = |key: &str| {
                error
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            return Reply::Error {
                class: text("class"),
                desc: text("desc"),
            };
        }
        Reply::Other(message)
    }
}

/// Parses a line as JSON, ignoring surrounding whitespace and stray 0xFF sync delimiters.
pub(crate) fn parse_line(line: &[u8]) -> Option<Value> {
    let start = line
        .iter()
        .position(|b| !b.is_ascii_whitespace() && *b != 0xFF)?;
    serde_json::from_slice(&line[start..]).ok()
}

/// A short, printable excerpt of bytes the peer sent, for error messages.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
    text.trim().escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn read_line_stops_at_newline_and_reports_close_and_overflow() {
        let mut reader = BufReader::new(&b"one\ntwo"[..]);
        assert_eq!(read_line(&mut reader, 100).await.unwrap(), b"one\n");
        assert!(matches!(
            read_line(&mut reader, 100).await,
            Err(LineError::Closed)
        ));
        let mut reader = BufReader::new(&b"0123456789\n"[..]);
        assert!(matches!(
            read_line(&mut reader, 4).await,
            Err(LineError::TooLong)
        ));
    }

    #[tokio::test]
    async fn skip_past_discards_through_the_delimiter() {
        let mut reader = BufReader::with_capacity(2, &b"garbage\xffrest\n"[..]);
        skip_past(&mut reader, 0xFF).await.unwrap();
        assert_eq!(read_line(&mut reader, 100).await.unwrap(), b"rest\n");
    }

    #[test]
    fn classifies_replies() {
        assert!(matches!(
            Reply::classify(json!({"return": 5})),
            Reply::Return(v) if v == json!(5)
        ));
        match Reply::classify(json!({"error": {"class": "GenericError", "desc": "no"}})) {
            Reply::Error { class, desc } => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "no"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Reply::classify(json!({"event": "STOP"})),
            Reply::Other(_)
        ));
        assert_eq!(
            parse_line(b"\xff {\"return\": 1}\n"),
            Some(json!({"return": 1}))
        );
        assert_eq!(parse_line(b"not json\n"), None);
    }

    #[test]
    fn command_line_is_one_json_line() {
        let line = command_line("guest-ping", None, None);
        assert_eq!(line, b"{\"execute\":\"guest-ping\"}\n");
        let line = command_line("x", Some(&json!({"a": 1})), Some(&json!(7)));
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            json!({"execute": "x", "arguments": {"a": 1}, "id": 7})
        );
    }
}

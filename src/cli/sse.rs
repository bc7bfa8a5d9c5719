//! Reading a `text/event-stream`: the `data:` payloads of each event, joined as the format says.
//! Comments (keep-alives), `event:`, `id:` and `retry:` fields are skipped; the daemon puts
//! everything in `data`.

use std::io::BufRead;

#[derive(Debug)]
pub struct SseReader<R> {
    reader: R,
    done: bool,
}

impl<R: BufRead> SseReader<R> {
    pub fn new(reader: R) -> Self {
        SseReader {
            reader,
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for SseReader<R> {
    type Item = std::io::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut data: Option<String> = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    self.done = true;
                    // A last event without its blank line still counts.
                    return data.map(Ok);
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                if let Some(data) = data.take() {
                    return Some(Ok(data));
                }
                continue;
            }
            if text.starts_with(':') {
                continue;
            }
            let (field, value) = match text.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (text, ""),
            };
            if field == "data" {
                match &mut data {
                    Some(existing) => {
                        existing.push('\n');
                        existing.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Vec<String> {
        SseReader::new(text.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn reads_data_payloads() {
        let text = ": keep-alive\n\nid: 1\nevent: job\ndata: {\"a\":1}\n\ndata:{\"b\":2}\r\n\r\n";
        assert_eq!(events(text), [r#"{"a":1}"#, r#"{"b":2}"#]);
    }

    #[test]
    fn joins_multi_line_data_and_keeps_a_trailing_event() {
        assert_eq!(
            events("data: one\ndata: two\n\ndata: last"),
            ["one\ntwo", "last"]
        );
        assert!(events("\n\n: only comments\n").is_empty());
    }
}

//! A job's log file: appended by the guest up to the log cap, read back from an offset, and
//! followed as it grows.

use std::io::SeekFrom;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{JobFiles, JobFilesError, Quota};

/// How much one read of a followed log returns at most.
const LOG_CHUNK: usize = 64 * 1024;

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogAppend {
    /// All of it is in the log.
    Stored,
    /// This append reached the cap: what fitted is in the log, then the truncation notice.
    CapReached(Quota),
    /// The log was already full (its notice written): nothing was stored.
    Full(Quota),
}

impl JobFiles {
    /// Appends to the job's log, up to `log_max_bytes`: the append that reaches the cap stores
    /// what fits and the truncation notice, the later ones store nothing. Appends to one job's
    /// log take turns, so the size read before writing is still the size when writing.
    pub async fn append_log(&self, job_id: &str, bytes: &[u8]) -> Result<LogAppend, JobFilesError> {
        let path = self.log_path(job_id);
        let cap = self.limits.log_max_bytes;
        let fail = |what: &str| JobFilesError::io(format!("{what} {}", path.display()));
        let _turn = self.log_appends.lock(job_id).await;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(fail("creating the folder of"))?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(fail("opening"))?;
        let written = file.metadata().await.map_err(fail("reading"))?.len();
        // Only the notice takes a log past its cap.
        if written > cap {
            return Ok(LogAppend::Full(Quota::Log(cap)));
        }
        let room = usize::try_from(cap - written).unwrap_or(usize::MAX);
        let outcome = if bytes.len() <= room {
            file.write_all(bytes).await.map_err(fail("writing"))?;
            LogAppend::Stored
        } else {
            file.write_all(&bytes[..room])
                .await
                .map_err(fail("writing"))?;
            file.write_all(format!("\n[agentlab: log truncated at {cap} bytes]\n").as_bytes())
                .await
                .map_err(fail("writing"))?;
            LogAppend::CapReached(Quota::Log(cap))
        };
        file.flush().await.map_err(fail("writing"))?;
        Ok(outcome)
    }

    /// The job's log from `offset` to its current end; empty if the job has no log yet.
    pub async fn read_log(&self, job_id: &str, offset: u64) -> Result<Vec<u8>, JobFilesError> {
        let mut reader = self.log_reader(job_id, offset);
        let mut text = Vec::new();
        while let Some(chunk) = reader.next_chunk().await? {
            text.extend_from_slice(&chunk);
        }
        Ok(text)
    }

    /// A reader of the job's log from `offset`, for following it as it grows.
    pub fn log_reader(&self, job_id: &str, offset: u64) -> LogReader {
        LogReader {
            path: self.log_path(job_id),
            offset,
            file: None,
        }
    }
}

/// Reads a log from an offset on, picking up what was appended since the last read. The log may
/// not exist yet: it is opened once it does.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    offset: u64,
    file: Option<tokio::fs::File>,
}

impl LogReader {
    /// The next chunk of the log, or None when everything written so far has been read.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, JobFilesError> {
        let fail = |what: &str| JobFilesError::io(format!("{what} {}", self.path.display()));
        let file = match &mut self.file {
            Some(file) => file,
            None => match tokio::fs::File::open(&self.path).await {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(self.offset))
                        .await
                        .map_err(fail("seeking in"))?;
                    self.file.insert(file)
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(fail("opening")(err)),
            },
        };
        let mut buffer = vec![0u8; LOG_CHUNK];
        let n = file.read(&mut buffer).await.map_err(fail("reading"))?;
        if n == 0 {
            return Ok(None);
        }
        buffer.truncate(n);
        self.offset += n as u64;
        Ok(Some(buffer))
    }

    /// How far the log has been read.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{files, ROOMY};
    use super::super::{Limits, Quota};
    use super::LogAppend;

    #[tokio::test]
    async fn appends_and_reads_from_an_offset() {
        let (_dir, files) = files(ROOMY);
        assert!(files.read_log("j1", 0).await.unwrap().is_empty());
        files.append_log("j1", b"hello ").await.unwrap();
        files.append_log("j1", b"world\n").await.unwrap();
        assert_eq!(files.read_log("j1", 0).await.unwrap(), b"hello world\n");
        assert_eq!(files.read_log("j1", 6).await.unwrap(), b"world\n");
        assert!(files.read_log("j1", 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_cap_truncates_once_with_a_notice() {
        let (_dir, files) = files(Limits {
            log_max_bytes: 10,
            ..ROOMY
        });
        let cap = Quota::Log(10);
        assert_eq!(
            files.append_log("j1", b"0123456").await.unwrap(),
            LogAppend::Stored
        );
        assert_eq!(
            files.append_log("j1", b"789abcdef").await.unwrap(),
            LogAppend::CapReached(cap)
        );
        assert_eq!(
            files.append_log("j1", b"more").await.unwrap(),
            LogAppend::Full(cap)
        );
        let text = String::from_utf8(files.read_log("j1", 0).await.unwrap()).unwrap();
        assert_eq!(text, "0123456789\n[agentlab: log truncated at 10 bytes]\n");
    }

    #[tokio::test]
    async fn a_log_filled_exactly_gets_its_notice_with_the_next_append() {
        let (_dir, files) = files(Limits {
            log_max_bytes: 4,
            ..ROOMY
        });
        assert_eq!(
            files.append_log("j1", b"abcd").await.unwrap(),
            LogAppend::Stored
        );
        assert_eq!(
            files.append_log("j1", b"e").await.unwrap(),
            LogAppend::CapReached(Quota::Log(4))
        );
        let text = String::from_utf8(files.read_log("j1", 0).await.unwrap()).unwrap();
        assert_eq!(text, "abcd\n[agentlab: log truncated at 4 bytes]\n");
    }

    /// Many appends at once, each of whole lines: the cap holds, exactly one reaches it, and no
    /// append is split by another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_appends_hold_the_cap_and_reach_it_once() {
        let (_dir, files) = files(Limits {
            log_max_bytes: 1000,
            ..ROOMY
        });
        let tasks: Vec<_> = (0..50u8)
            .map(|i| {
                let files = files.clone();
                tokio::spawn(async move {
                    let line = vec![b'a' + i % 26; 99]
                        .into_iter()
                        .chain([b'\n'])
                        .collect::<Vec<_>>();
                    files.append_log("j1", &line).await.unwrap()
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        let stored = outcomes.iter().filter(|o| **o == LogAppend::Stored).count();
        let reached = outcomes
            .iter()
            .filter(|o| matches!(o, LogAppend::CapReached(_)))
            .count();
        assert_eq!((stored, reached), (10, 1), "{outcomes:?}");
        let text = String::from_utf8(files.read_log("j1", 0).await.unwrap()).unwrap();
        let (body, notice) = text.split_at(1000);
        assert_eq!(notice, "\n[agentlab: log truncated at 1000 bytes]\n");
        for line in body.lines() {
            assert_eq!(line.len(), 99, "{line:?}");
            assert!(line.bytes().all(|b| b == line.as_bytes()[0]), "{line:?}");
        }
        assert_eq!(files.log_appends.len(), 0);
    }

    #[tokio::test]
    async fn a_reader_follows_the_log_as_it_grows() {
        let (_dir, files) = files(ROOMY);
        let mut reader = files.log_reader("j1", 0);
        assert_eq!(reader.next_chunk().await.unwrap(), None, "no log yet");
        files.append_log("j1", b"first\n").await.unwrap();
        assert_eq!(reader.next_chunk().await.unwrap().unwrap(), b"first\n");
        assert_eq!(reader.next_chunk().await.unwrap(), None);
        files.append_log("j1", b"second\n").await.unwrap();
        assert_eq!(reader.next_chunk().await.unwrap().unwrap(), b"second\n");
        assert_eq!(reader.offset(), 13);
    }

    #[tokio::test]
    async fn a_large_log_comes_in_bounded_chunks() {
        let (_dir, files) = files(ROOMY);
        let body = vec![b'x'; super::LOG_CHUNK + 10];
        files.append_log("j1", &body).await.unwrap();
        let mut reader = files.log_reader("j1", 0);
        assert_eq!(
            reader.next_chunk().await.unwrap().unwrap().len(),
            super::LOG_CHUNK
        );
        assert_eq!(reader.next_chunk().await.unwrap().unwrap().len(), 10);
        assert_eq!(files.read_log("j1", 0).await.unwrap(), body);
    }
}

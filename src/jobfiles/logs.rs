//! A job's log file: appended by the guest up to the log cap, read back from an offset, and
//! followed as it grows.

use std::io::SeekFrom;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{JobFiles, JobFilesError};

/// How much one read of a followed log returns at most.
const LOG_CHUNK: usize = 64 * 1024;

impl JobFiles {
    /// Appends to the job's log. Past `log_max_bytes` the rest is dropped, once with a notice.
    pub async fn append_log(&self, job_id: &str, bytes: &[u8]) -> Result<(), JobFilesError> {
        let path = self.log_path(job_id);
        let cap = self.limits.log_max_bytes;
        let fail = |what: &str| JobFilesError::io(format!("{what} {}", path.display()));
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
        if written >= cap {
            return Ok(());
        }
        let room = usize::try_from(cap - written).unwrap_or(usize::MAX);
        if bytes.len() <= room {
            file.write_all(bytes).await.map_err(fail("writing"))?;
        } else {
            file.write_all(&bytes[..room])
                .await
                .map_err(fail("writing"))?;
            file.write_all(format!("\n[agentlab: log truncated at {cap} bytes]\n").as_bytes())
                .await
                .map_err(fail("writing"))?;
        }
        file.flush().await.map_err(fail("writing"))
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
    use super::super::Limits;

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
        files.append_log("j1", b"0123456").await.unwrap();
        files.append_log("j1", b"789abcdef").await.unwrap();
        files.append_log("j1", b"more").await.unwrap();
        let text = String::from_utf8(files.read_log("j1", 0).await.unwrap()).unwrap();
        assert_eq!(text, "0123456789\n[agentlab: log truncated at 10 bytes]\n");
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

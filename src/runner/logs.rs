//! Moving the command's output to the daemon without ever stalling the command.
//!
//! One pump thread per pipe reads, masks and pushes into a `LogQueue`; one shipper thread takes
//! batches out and sends them. The queue is bounded in bytes: when the network falls behind,
//! new output is dropped (and a marker line says how much) instead of blocking the pumps, so the
//! child never blocks on a full pipe. Both pumps share the queue, so output keeps the order in
//! which the runner read it.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::client::GuestClient;
use super::error::RunnerError;
use super::mask::Masker;

/// Where batches go: the guest API in production, a buffer in tests.
pub trait LogSink: Send + Sync {
    fn send(&self, batch: &[u8]) -> Result<(), RunnerError>;
}

impl LogSink for GuestClient {
    fn send(&self, batch: &[u8]) -> Result<(), RunnerError> {
        self.post_log(batch)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// A batch goes out at the latest this long after its first byte arrived.
    pub flush_interval: Duration,
    /// A batch goes out as soon as it holds this much.
    pub batch_bytes: usize,
    /// Output beyond this much waiting to be sent is dropped.
    pub queue_bytes: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            flush_interval: Duration::from_millis(250),
            batch_bytes: 64 * 1024,
            queue_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Default)]
struct QueueState {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Dropped since the last marker was queued.
    dropped: u64,
    dropped_total: u64,
    closed: bool,
}

#[derive(Debug)]
pub struct LogQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

fn drop_marker(bytes: u64) -> Vec<u8> {
    format!("\n[agentlab-runner] {bytes} bytes of output dropped: the log upload fell behind\n")
        .into_bytes()
}

impl LogQueue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(LogQueue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues output, or drops it when the queue is full. Never blocks on the network.
    pub fn push(&self, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let mut state = self.lock();
        if state.closed {
            return;
        }
        if state.bytes + data.len() > self.capacity {
            let n = data.len() as u64;
            state.dropped += n;
            state.dropped_total += n;
            return;
        }
        Self::flush_marker(&mut state);
        state.bytes += data.len();
        state.chunks.push_back(data);
        self.ready.notify_one();
    }

    /// Queues a line from the runner itself. Notes are small and rare, so they bypass the cap.
    pub fn note(&self, text: &str) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        Self::flush_marker(&mut state);
        let line = format!("[agentlab-runner] {}\n", text.trim_end()).into_bytes();
        state.bytes += line.len();
        state.chunks.push_back(line);
        self.ready.notify_one();
    }

    fn flush_marker(state: &mut QueueState) {
        if state.dropped > 0 {
            let marker = drop_marker(state.dropped);
            state.dropped = 0;
            state.bytes += marker.len();
            state.chunks.push_back(marker);
        }
    }

    /// No more output: the shipper sends what is queued and stops.
    pub fn close(&self) {
        let mut state = self.lock();
        Self::flush_marker(&mut state);
        state.closed = true;
        self.ready.notify_all();
    }

    pub fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }

    /// Waits for output, then gathers until the batch is full, the interval since its first
    /// byte has passed, or the queue is closed. `None` once closed and empty.
    fn next_batch(&self, settings: &LogSettings) -> Option<Vec<u8>> {
        let mut state = self.lock();
        while state.chunks.is_empty() {
            if state.closed {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let deadline = Instant::now() + settings.flush_interval;
        let mut batch = Vec::new();
        loop {
            while let Some(chunk) = state.chunks.pop_front() {
                state.bytes -= chunk.len();
                batch.extend_from_slice(&chunk);
                if batch.len() >= settings.batch_bytes {
                    return Some(batch);
                }
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return Some(batch);
            }
            state = self
                .ready
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// What the shipper managed, for the runner's own diagnostics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShipReport {
    pub sent_bytes: u64,
    pub failed_batches: u64,
    pub last_error: Option<String>,
}

/// Starts the thread that sends batches until the queue is closed and drained.
pub fn spawn_shipper(
    queue: Arc<LogQueue>,
    sink: Arc<dyn LogSink>,
    settings: LogSettings,
) -> JoinHandle<ShipReport> {
    std::thread::spawn(move || {
        let mut report = ShipReport::default();
        while let Some(batch) = queue.next_batch(&settings) {
            // The sink retries transient failures itself; a batch that still fails is lost,
            // and the next one is tried anyway in case the daemon is back.
            match sink.send(&batch) {
                Ok(()) => report.sent_bytes += batch.len() as u64,
                Err(e) => {
                    report.failed_batches += 1;
                    report.last_error = Some(e.to_string());
                }
            }
        }
        report
    })
}

/// Reads one pipe to its end, masking as it goes. Returns when the pipe closes.
pub fn pump(mut source: impl Read, mut masker: Masker, queue: &LogQueue) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut out = Vec::with_capacity(n);
                masker.push(&buf[..n], &mut out);
                queue.push(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let mut out = Vec::new();
    masker.finish(&mut out);
    queue.push(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        batches: Mutex<Vec<Vec<u8>>>,
        delay: Duration,
    }

    impl LogSink for Collect {
        fn send(&self, batch: &[u8]) -> Result<(), RunnerError> {
            std::thread::sleep(self.delay);
            self.batches.lock().unwrap().push(batch.to_vec());
            Ok(())
        }
    }

    #[test]
    fn keeps_order_and_batches_by_size() {
        let queue = LogQueue::new(1 << 20);
        let sink = Arc::new(Collect::default());
        let settings = LogSettings {
            flush_interval: Duration::from_millis(50),
            batch_bytes: 1000,
            queue_bytes: 1 << 20,
        };
        let shipper = spawn_shipper(Arc::clone(&queue), sink.clone(), settings);
        let mut expected = Vec::new();
        for i in 0..2000 {
            let line = format!("line {i}\n").into_bytes();
            expected.extend_from_slice(&line);
            queue.push(line);
        }
        queue.close();
        let report = shipper.join().unwrap();
        let batches = sink.batches.lock().unwrap();
        assert_eq!(batches.concat(), expected);
        assert_eq!(report.sent_bytes, expected.len() as u64);
        // Full batches are cut as soon as they reach the size (a chunk may overshoot it).
        assert!(batches.len() > 10);
        assert!(batches.iter().all(|b| b.len() < 1000 + 16));
    }

    #[test]
    fn flushes_a_partial_batch_after_the_interval() {
        let queue = LogQueue::new(1 << 20);
        let sink = Arc::new(Collect::default());
        let settings = LogSettings {
            flush_interval: Duration::from_millis(50),
            ..LogSettings::default()
        };
        let shipper = spawn_shipper(Arc::clone(&queue), sink.clone(), settings);
        queue.push(b"early".to_vec());
        let waited = Instant::now();
        while sink.batches.lock().unwrap().is_empty() {
            assert!(waited.elapsed() < Duration::from_secs(5), "never flushed");
            std::thread::sleep(Duration::from_millis(10));
        }
        queue.close();
        shipper.join().unwrap();
        assert_eq!(sink.batches.lock().unwrap()[0], b"early");
    }

    #[test]
    fn drops_with_a_marker_instead_of_blocking_when_the_sink_is_slow() {
        let queue = LogQueue::new(100);
        let sink = Arc::new(Collect {
            delay: Duration::from_millis(200),
            ..Collect::default()
        });
        let settings = LogSettings {
            flush_interval: Duration::from_millis(1),
            batch_bytes: 1000,
            queue_bytes: 100,
        };
        let shipper = spawn_shipper(Arc::clone(&queue), sink.clone(), settings);
        let started = Instant::now();
        for _ in 0..1000 {
            queue.push(vec![b'x'; 10]);
        }
        // 1000 pushes against a sink that takes 200 ms a batch: only dropping keeps this fast.
        assert!(started.elapsed() < Duration::from_millis(150));
        // Once the sink has caught up, output flows again, after a marker for the gap.
        std::thread::sleep(Duration::from_millis(700));
        queue.push(b"END".to_vec());
        queue.close();
        shipper.join().unwrap();
        let all = String::from_utf8(sink.batches.lock().unwrap().concat()).unwrap();
        assert!(all.ends_with("the log upload fell behind\nEND"), "{all}");
        assert!(queue.dropped_total() > 0);
    }

    #[test]
    fn pump_masks_what_it_reads() {
        let queue = LogQueue::new(1 << 20);
        let masker = Masker::new(["topsecret"]);
        let reader = std::io::Cursor::new(b"a topsecret b\nc topsec".to_vec());
        pump(reader, masker, &queue);
        queue.close();
        let mut all = Vec::new();
        while let Some(batch) = queue.next_batch(&LogSettings::default()) {
            all.extend(batch);
        }
        assert_eq!(all, b"a *** b\nc topsec");
    }
}

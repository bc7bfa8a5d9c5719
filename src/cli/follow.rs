//! Watching a job to its end: its events (SSE) drive a live view of the phases, its logs stream
//! to stdout, and both reconnect where they left off if the daemon restarts meanwhile.
//!
//! On a terminal the current phase is one line redrawn in place at the bottom, with the job's
//! output scrolling above it; otherwise each phase is one plain line as it starts. While the job
//! is queued, the job itself is polled for what it waits for (the governor's reason at the head,
//! the jobs ahead behind it): the live line shows it, and a plain line is printed each time the
//! reason or the place changes. The caller prints the final status and per-phase durations from
//! the job as the daemon records it.

use std::io::{BufReader, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::client::ApiClient;
use super::exit::CliError;
use super::format;
use super::sse::SseReader;
use crate::governor::status::JobQueue;
use crate::model::{Event, Job, JobStatus};
use crate::urlpath::encode_segment;

/// How long a follow keeps trying while the daemon is unreachable (a restart takes seconds).
const RECONNECT_BUDGET: Duration = Duration::from_secs(120);
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// Once the job has ended, how long its log stream may take to deliver the rest.
const LOG_DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How often a queued job is asked what it waits for.
const QUEUE_POLL: Duration = Duration::from_secs(1);
const SPINNER: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// Tracks the time spent unreachable so a follow gives up only after a real outage.
struct Reconnect {
    since: Option<Instant>,
}

impl Reconnect {
    fn new() -> Self {
        Reconnect { since: None }
    }

    /// After a failure: `Err` when it is not worth retrying, else sleeps a little.
    fn after_failure(&mut self, error: CliError) -> Result<(), CliError> {
        if !matches!(error, CliError::Unreachable { .. }) {
            return Err(error);
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_BUDGET {
            return Err(error);
        }
        std::thread::sleep(RECONNECT_DELAY);
        Ok(())
    }

    fn connected(&mut self) {
        self.since = None;
    }
}

fn job_path(id: &str) -> String {
    format!("/v1/jobs/{}", encode_segment(id))
}

/// `Some(job)` once the job has ended.
fn terminal_job(client: &ApiClient, id: &str) -> Result<Option<Job>, CliError> {
    let job: Job = client.get_json(&job_path(id))?;
    Ok(job.status.is_terminal().then_some(job))
}

/// Streams the job's log to `sink` until the job has ended, resuming at the byte offset
/// reached if the stream breaks.
pub fn follow_logs(
    client: &ApiClient,
    id: &str,
    mut sink: impl FnMut(&[u8]) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let mut offset: u64 = 0;
    let mut reconnect = Reconnect::new();
    loop {
        let path = format!("{}/logs?follow=1&offset={offset}", job_path(id));
        match client.get_stream(&path) {
            Ok(mut resp) => {
                reconnect.connected();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match resp.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            offset += n as u64;
                            sink(&buf[..n])?;
                        }
                    }
                }
            }
            Err(e) => {
                reconnect.after_failure(e)?;
                continue;
            }
        }
        match terminal_job(client, id) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => std::thread::sleep(RECONNECT_DELAY),
            Err(e) => reconnect.after_failure(e)?,
        }
    }
}

/// Streams the job's events to `sink` until the job has ended; returns the ended job.
fn follow_events(
    client: &ApiClient,
    id: &str,
    mut sink: impl FnMut(Event) -> bool,
) -> Result<Job, CliError> {
    let mut after: Option<i64> = None;
    let mut reconnect = Reconnect::new();
    loop {
        let resume = after.map_or_else(String::new, |a| format!("&after={a}"));
        let path = format!("{}/events?follow=1{resume}", job_path(id));
        match client.get_stream(&path) {
            Ok(resp) => {
                reconnect.connected();
                for data in SseReader::new(BufReader::new(resp)) {
                    let Ok(data) = data else { break };
                    // An event this CLI cannot read is skipped rather than fatal: the live view
                    // is a convenience, the final status comes from the job itself.
                    let Ok(event) = serde_json::from_str::<Event>(&data) else {
                        continue;
                    };
                    after = Some(event.id);
                    if !sink(event) {
                        return Err(CliError::Protocol("the viewer went away".into()));
                    }
                }
            }
            Err(e) => {
                reconnect.after_failure(e)?;
                continue;
            }
        }
        match terminal_job(client, id) {
            Ok(Some(job)) => return Ok(job),
            Ok(None) => std::thread::sleep(RECONNECT_DELAY),
            Err(e) => reconnect.after_failure(e)?,
        }
    }
}

/// The part of `GET /v1/jobs/{id}` the queued view reads.
#[derive(Debug, serde::Deserialize)]
struct QueuedView {
    status: JobStatus,
    #[serde(default)]
    queue: Option<JobQueue>,
}

/// Sends what the job waits for each time it changes, until the job leaves the queue (or the
/// viewer goes away). Errors are left to the event stream, which reconnects and reports them.
fn follow_queue(client: &ApiClient, id: &str, mut sink: impl FnMut(JobQueue) -> bool) {
    let mut last: Option<JobQueue> = None;
    loop {
        if let Ok(view) = client.get_json::<QueuedView>(&job_path(id)) {
            if view.status != JobStatus::Queued {
                return;
            }
            if let Some(queue) = view.queue.filter(|q| last.as_ref() != Some(q)) {
                last = Some(queue.clone());
                if !sink(queue) {
                    return;
                }
            }
        }
        std::thread::sleep(QUEUE_POLL);
    }
}

enum Msg {
    Event(Event),
    Queue(JobQueue),
    Log(Vec<u8>),
    EventsEnded(Box<Result<Job, CliError>>),
    LogsEnded(Result<(), CliError>),
}

/// What `watch` shows besides the phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logs {
    None,
    /// The job's output goes to stdout.
    Stdout,
    /// The job's output goes to stderr, keeping stdout for the final JSON.
    Stderr,
}

/// Follows a job until it ends, rendering progress to `err` and the job's output where `logs`
/// says. Returns the ended job.
pub fn watch(
    client: &ApiClient,
    id: &str,
    logs: Logs,
    tty: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Job, CliError> {
    let (tx, rx) = mpsc::channel();
    {
        let (client, id, tx) = (client.clone(), id.to_owned(), tx.clone());
        std::thread::spawn(move || {
            let events = tx.clone();
            let ended = follow_events(&client, &id, |e| events.send(Msg::Event(e)).is_ok());
            let _ = tx.send(Msg::EventsEnded(Box::new(ended)));
        });
    }
    {
        let (client, id, tx) = (client.clone(), id.to_owned(), tx.clone());
        std::thread::spawn(move || follow_queue(&client, &id, |q| tx.send(Msg::Queue(q)).is_ok()));
    }
    if logs != Logs::None {
        let (client, id, tx) = (client.clone(), id.to_owned(), tx.clone());
        std::thread::spawn(move || {
            let chunks = tx.clone();
            let ended = follow_logs(&client, &id, |bytes| {
                chunks
                    .send(Msg::Log(bytes.to_vec()))
                    .map_err(|_| CliError::Protocol("the viewer went away".into()))
            });
            let _ = tx.send(Msg::LogsEnded(ended));
        });
    }
    drop(tx);

    let mut progress = Progress::new(tty, terminal_width());
    let mut ended: Option<(Job, Instant)> = None;
    let mut logs_done = logs == Logs::None;
    let tick = if tty {
        Duration::from_millis(150)
    } else {
        Duration::from_secs(1)
    };
    let io = |e| CliError::io("write output", e);
    loop {
        match rx.recv_timeout(tick) {
            Ok(Msg::Event(event)) => progress.event(&event, err).map_err(io)?,
            Ok(Msg::Queue(queue)) => progress.queue(&queue, format::now_ms(), err).map_err(io)?,
            Ok(Msg::Log(bytes)) => {
                progress.clear(err).map_err(io)?;
                let sink: &mut dyn Write = if logs == Logs::Stderr {
                    &mut *err
                } else {
                    &mut *out
                };
                sink.write_all(&bytes)
                    .and_then(|()| sink.flush())
                    .map_err(io)?;
                progress.log_ends_line = bytes.last() == Some(&b'\n');
            }
            Ok(Msg::EventsEnded(result)) => match *result {
                Ok(job) => ended = Some((job, Instant::now())),
                Err(e) => {
                    progress.clear(err).map_err(io)?;
                    return Err(e);
                }
            },
            Ok(Msg::LogsEnded(result)) => {
                logs_done = true;
                if let Err(e) = result {
                    progress.clear(err).map_err(io)?;
                    let _ = writeln!(err, "agentlab: log stream ended early: {e}");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Some((_, at)) = &ended {
            if logs_done || at.elapsed() > LOG_DRAIN_GRACE {
                break;
            }
        }
        progress.draw(err).map_err(io)?;
    }
    let Some((job, _)) = ended else {
        return Err(CliError::Protocol("lost track of the job".into()));
    };
    if !progress.log_ends_line {
        // Keep what follows off the end of an unterminated last line of output.
        let sink: &mut dyn Write = if logs == Logs::Stderr {
            &mut *err
        } else {
            &mut *out
        };
        writeln!(sink).map_err(io)?;
    }
    progress.finish(&job, err).map_err(io)?;
    Ok(job)
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|w: &usize| *w >= 20)
        .unwrap_or(80)
}

/// The live phase view.
#[derive(Debug)]
struct Progress {
    tty: bool,
    width: usize,
    /// The phase in progress (or "queued"), since when (daemon clock, ms).
    current: Option<(String, i64)>,
    /// The first event's time: plain lines show time since then.
    first_at_ms: Option<i64>,
    message: String,
    /// A live line is on screen and must be cleared before anything else is written.
    drawn: bool,
    /// Whether the job's output so far ends with a newline; the live line is drawn only then.
    log_ends_line: bool,
    frame: usize,
    /// The queue place and reason last printed as a plain line.
    queue_shown: Option<(u64, String)>,
}

impl Progress {
    fn new(tty: bool, width: usize) -> Self {
        Progress {
            tty,
            width,
            current: None,
            first_at_ms: None,
            message: String::new(),
            drawn: false,
            log_ends_line: true,
            frame: 0,
            queue_shown: None,
        }
    }

    /// What the queued job waits for, at `now_ms`. Ignored once a phase has begun (a poll can
    /// lag the event stream).
    fn queue(&mut self, queue: &JobQueue, now_ms: i64, w: &mut dyn Write) -> std::io::Result<()> {
        if self
            .current
            .as_ref()
            .is_some_and(|(label, _)| label != "queued")
        {
            return Ok(());
        }
        self.message = format!("waiting for {}", queue.waiting_for);
        let key = (queue.position, queue.reason.clone());
        if self.tty || self.queue_shown.as_ref() == Some(&key) {
            return Ok(());
        }
        self.queue_shown = Some(key);
        let first = *self.first_at_ms.get_or_insert(now_ms);
        let elapsed = format::duration((now_ms - first).max(0) as f64 / 1000.0);
        let line = format!("[{elapsed:>7}] queued: {}", self.message);
        writeln!(w, "{}", format::clip(&line, self.width.max(100)))
    }

    fn event(&mut self, event: &Event, w: &mut dyn Write) -> std::io::Result<()> {
        let first = *self.first_at_ms.get_or_insert(event.at_ms);
        let label = match (event.phase, &self.current) {
            (Some(phase), _) => phase.to_string(),
            (None, Some((label, _))) => label.clone(),
            (None, None) => "queued".to_owned(),
        };
        self.message = event.message.clone();
        if self.current.as_ref().map(|(l, _)| l) == Some(&label) {
            return Ok(());
        }
        self.close_current(event.at_ms, w)?;
        if !self.tty {
            let elapsed = format::duration((event.at_ms - first) as f64 / 1000.0);
            let line = if event.message.is_empty() {
                format!("[{elapsed:>7}] {label}")
            } else {
                format!("[{elapsed:>7}] {label}: {}", event.message)
            };
            writeln!(w, "{}", format::clip(&line, self.width.max(100)))?;
        }
        self.current = Some((label, event.at_ms));
        Ok(())
    }

    /// On a terminal, replaces the live line with the finished phase and its duration.
    fn close_current(&mut self, end_ms: i64, w: &mut dyn Write) -> std::io::Result<()> {
        let Some((label, since)) = self.current.take() else {
            return Ok(());
        };
        if self.tty {
            self.clear(w)?;
            let took = format::duration((end_ms - since) as f64 / 1000.0);
            writeln!(w, "  ✓ {label:<12} {took:>7}")?;
        }
        Ok(())
    }

    fn clear(&mut self, w: &mut dyn Write) -> std::io::Result<()> {
        if self.drawn {
            write!(w, "\r\x1b[2K")?;
            w.flush()?;
            self.drawn = false;
        }
        Ok(())
    }

    fn draw(&mut self, w: &mut dyn Write) -> std::io::Result<()> {
        if !self.tty || !self.log_ends_line {
            return Ok(());
        }
        let Some((label, since)) = &self.current else {
            return Ok(());
        };
        self.frame = (self.frame + 1) % SPINNER.len();
        let elapsed = format::duration((format::now_ms() - since).max(0) as f64 / 1000.0);
        let line = format!(
            "  {} {label:<12} {elapsed:>7}  {}",
            SPINNER[self.frame], self.message
        );
        // Never wrap: a wrapped line cannot be redrawn in place.
        let line = format::clip(&line, self.width.saturating_sub(1));
        write!(w, "\r\x1b[2K{line}")?;
        w.flush()?;
        self.drawn = true;
        Ok(())
    }

    fn finish(&mut self, job: &Job, w: &mut dyn Write) -> std::io::Result<()> {
        // The daemon's record of the last phase beats our estimate from event times.
        let recorded = self.current.as_ref().and_then(|(label, since)| {
            let run = job
                .phases
                .iter()
                .rev()
                .find(|p| p.phase.as_str() == label)?;
            let secs = run.duration_seconds?;
            Some(since + (secs * 1000.0) as i64)
        });
        let end = recorded
            .or(job.finished_at_ms)
            .unwrap_or_else(format::now_ms);
        let since = self.current.as_ref().map_or(end, |(_, since)| *since);
        self.close_current(end.max(since), w)?;
        self.clear(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Phase;

    fn event(id: i64, at_ms: i64, phase: Option<Phase>, message: &str) -> Event {
        Event {
            id,
            job_id: "j".into(),
            at_ms,
            kind: "phase".into(),
            phase,
            message: message.into(),
        }
    }

    #[test]
    fn plain_output_is_one_line_per_phase() {
        let mut p = Progress::new(false, 80);
        let mut w = Vec::new();
        p.event(&event(1, 1000, None, "queued"), &mut w).unwrap();
        p.event(&event(2, 1500, Some(Phase::Clone), "cloning"), &mut w)
            .unwrap();
        p.event(&event(3, 1700, Some(Phase::Clone), "still cloning"), &mut w)
            .unwrap();
        p.event(&event(4, 3000, Some(Phase::Start), ""), &mut w)
            .unwrap();
        p.draw(&mut w).unwrap();
        assert_eq!(
            String::from_utf8(w).unwrap(),
            "[   0.0s] queued: queued\n[   0.5s] clone: cloning\n[   2.0s] start\n"
        );
    }

    fn queue(position: u64, reason: &str, waiting_for: &str) -> JobQueue {
        JobQueue {
            position,
            reason: reason.into(),
            waiting_for: waiting_for.into(),
            since_ms: None,
        }
    }

    #[test]
    fn a_queued_job_says_what_it_waits_for_each_time_that_changes() {
        let mut p = Progress::new(false, 120);
        let mut w = Vec::new();
        p.event(&event(1, 1000, None, "QUEUED"), &mut w).unwrap();
        p.queue(
            &queue(2, "queue", "1 job ahead; the first waits for disk"),
            1500,
            &mut w,
        )
        .unwrap();
        // New numbers for the same reason and place: no new line.
        p.queue(
            &queue(2, "queue", "1 job ahead; the first waits for cpu"),
            2000,
            &mut w,
        )
        .unwrap();
        p.queue(
            &queue(1, "disk", "disk: storage: 60.0 GB free"),
            3000,
            &mut w,
        )
        .unwrap();
        p.queue(
            &queue(1, "disk", "disk: storage: 59.0 GB free"),
            4000,
            &mut w,
        )
        .unwrap();
        p.event(&event(2, 5000, Some(Phase::Clone), ""), &mut w)
            .unwrap();
        // A poll that lags the job's start changes nothing.
        p.queue(&queue(1, "boot_cap", "boot_cap: 1 booting"), 5100, &mut w)
            .unwrap();
        assert_eq!(
            String::from_utf8(w).unwrap(),
            "[   0.0s] queued: QUEUED\n\
             [   0.5s] queued: waiting for 1 job ahead; the first waits for disk\n\
             [   2.0s] queued: waiting for disk: storage: 60.0 GB free\n\
             [   4.0s] clone\n"
        );
    }

    #[test]
    fn a_terminal_shows_the_wait_on_the_live_line() {
        let mut p = Progress::new(true, 120);
        let mut w = Vec::new();
        p.event(&event(1, 1000, None, "QUEUED"), &mut w).unwrap();
        p.queue(
            &queue(1, "disk", "disk: storage: 60.0 GB free"),
            1500,
            &mut w,
        )
        .unwrap();
        assert!(w.is_empty(), "nothing printed, only drawn");
        p.draw(&mut w).unwrap();
        let text = String::from_utf8(w).unwrap();
        assert!(text.contains("queued"), "{text:?}");
        assert!(
            text.ends_with("waiting for disk: storage: 60.0 GB free"),
            "{text:?}"
        );
    }

    #[test]
    fn a_terminal_gets_finished_phases_with_durations_and_a_live_line() {
        let mut p = Progress::new(true, 80);
        let mut w = Vec::new();
        p.event(&event(1, 1000, Some(Phase::Clone), ""), &mut w)
            .unwrap();
        p.event(&event(2, 2250, Some(Phase::Start), "booting"), &mut w)
            .unwrap();
        p.draw(&mut w).unwrap();
        let text = String::from_utf8(w.clone()).unwrap();
        assert!(text.starts_with("  ✓ clone           1.2s\n"), "{text:?}");
        assert!(text.contains("\r\x1b[2K  ⠙ start"), "{text:?}");
        assert!(text.ends_with("booting"), "{text:?}");

        // Output mid-line suppresses the live line until the line is finished.
        p.clear(&mut w).unwrap();
        p.log_ends_line = false;
        w.clear();
        p.draw(&mut w).unwrap();
        assert!(w.is_empty());
    }
}

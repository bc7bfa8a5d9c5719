//! How things look on a terminal: tables, times, durations, and the detail views of a job and a
//! sandbox. Pure functions from model types to text, so they are easy to test.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use crate::actors::pool_status::PoolStatus;
use crate::backend::templates::TemplateImport;
use crate::governor::status::{GovernorStatus, JobQueue, MemoryStatus, SandboxMemory};
use crate::model::{Artifact, Job, PhaseRun, Sandbox, StartMethod};

/// `1.2s`, `2m03s`, `1h02m`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let total = seconds.round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else {
        format!("{m}m{s:02}s")
    }
}

/// A timestamp in ms since the epoch, as RFC 3339 UTC to the second.
pub fn timestamp(ms: i64) -> String {
    let Ok(ms) = u64::try_from(ms) else {
        return "-".into();
    };
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// How long ago `ms` was, relative to `now_ms`: `5s ago`, `3m ago`, `2h ago`, `4d ago`.
pub fn age(ms: i64, now_ms: i64) -> String {
    let secs = (now_ms - ms).max(0) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `text` cut to `max` characters, with an ellipsis, on one line.
pub fn clip(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn opt<T: ToString>(value: &Option<T>) -> String {
    value.as_ref().map_or_else(|| "-".into(), T::to_string)
}

pub fn job_list(jobs: &[Job], now_ms: i64) -> String {
    if jobs.is_empty() {
        return "no jobs\n".into();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.status.to_string(),
                opt(&j.phase),
                j.profile.clone(),
                age(j.created_at_ms, now_ms),
                opt(&j.exit_code),
                clip(&j.task, 50),
            ]
        })
        .collect();
    table(
        &[
            "ID", "STATUS", "PHASE", "PROFILE", "CREATED", "EXIT", "TASK",
        ],
        &rows,
    )
}

/// The phases a job went through, one row per run (a restarted phase appears again).
pub fn phase_table(phases: &[PhaseRun]) -> String {
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|p| {
            vec![
                p.phase.to_string(),
                p.duration_seconds.map_or_else(
                    || match p.ended_at_ms {
                        Some(end) => duration((end - p.started_at_ms) as f64 / 1000.0),
                        None => "running".into(),
                    },
                    duration,
                ),
                opt(&p.result),
            ]
        })
        .collect();
    table(&["PHASE", "DURATION", "RESULT"], &rows)
}

/// A job as `GET /v1/jobs/{id}` answers: the job, while it is queued what it waits for, and once
/// its sandbox has started how it did.
#[derive(Debug, Clone, Deserialize)]
pub struct ShownJob {
    #[serde(flatten)]
    pub job: Job,
    #[serde(default)]
    pub queue: Option<JobQueue>,
    #[serde(default)]
    pub start_method: Option<StartMethod>,
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// How a sandbox started: `booted cold`, `restored from snapshot ID`.
pub fn start_method(method: StartMethod, snapshot_id: Option<&str>) -> String {
    match (method, snapshot_id) {
        (StartMethod::Cold, _) => "booted cold".to_owned(),
        (StartMethod::Restored, Some(id)) => format!("restored from snapshot {id}"),
        (StartMethod::Restored, None) => "restored from a snapshot".to_owned(),
    }
}

/// `agentlab job show`: the job, with what it waits for while queued and how its sandbox
/// started once it has.
pub fn shown_job(shown: &ShownJob) -> String {
    let started = shown
        .start_method
        .map(|method| start_method(method, shown.snapshot_id.as_deref()));
    job_detail_with(&shown.job, shown.queue.as_ref(), started)
}

pub fn job_detail(job: &Job) -> String {
    job_detail_with(job, None, None)
}

/// `started`: how the sandbox started, when known.
fn job_detail_with(job: &Job, queue: Option<&JobQueue>, started: Option<String>) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        // At least one space, so a label longer than the column stays readable.
        let _ = writeln!(out, "{:<13} {}", format!("{name}:"), value);
    };
    field("id", job.id.clone());
    field("status", job.status.to_string());
    if let Some(phase) = job.phase {
        field("phase", phase.to_string());
    }
    if let Some(position) = job.queue_position {
        field("queue position", position.to_string());
    }
    if let Some(queue) = queue {
        field("waiting for", clip(&queue.waiting_for, 300));
    }
    field("profile", job.profile.clone());
    field("task", clip(&job.task, 200));
    if let Some(command) = &job.command {
        field("command", clip(command, 200));
    }
    if let Some(repo) = &job.repo {
        let at = job
            .git_ref
            .as_ref()
            .map_or_else(String::new, |r| format!(" @ {r}"));
        field("repo", format!("{repo}{at}"));
    }
    if !job.env_keys.is_empty() {
        field("env", job.env_keys.join(", "));
    }
    if !job.artifacts.is_empty() {
        field("artifacts", job.artifacts.join(" "));
    }
    if let Some(sandbox) = &job.sandbox_id {
        field("sandbox", sandbox.clone());
    }
    field(
        "start",
        match started {
            Some(started) => format!("{started} (asked: {})", job.start),
            None => job.start.to_string(),
        },
    );
    if let Some(code) = job.exit_code {
        field("exit code", code.to_string());
    }
    match &job.changes {
        Some(changes) => field("changes", changes.summary(job.result_branch)),
        None if job.result_branch && job.status.is_terminal() => {
            field("changes", "none came back, so no branch was made".into())
        }
        None if job.result_branch => field("changes", "to come, as a branch".into()),
        None => {}
    }
    if let Some(error) = &job.error {
        field("error", error.clone());
    }
    if job.restarts > 0 {
        field("restarts", job.restarts.to_string());
    }
    field("created", timestamp(job.created_at_ms));
    if let Some(at) = job.started_at_ms {
        field("started", timestamp(at));
    }
    if let Some(at) = job.finished_at_ms {
        field("finished", timestamp(at));
        field("took", duration((at - job.created_at_ms) as f64 / 1000.0));
    }
    if let Some(at) = job.deadline_at_ms {
        field("deadline", timestamp(at));
    }
    if !job.phases.is_empty() {
        out.push('\n');
        out.push_str(&phase_table(&job.phases));
    }
    out
}

/// The last lines of `job run --wait`: the outcome, then each phase's duration.
pub fn job_summary(job: &Job) -> String {
    let mut out = format!("job {} {}", job.id, job.status);
    if let Some(code) = job.exit_code {
        let _ = write!(out, ", exit code {code}");
    }
    if let Some(end) = job.finished_at_ms {
        let _ = write!(
            out,
            ", {} in all",
            duration((end - job.created_at_ms) as f64 / 1000.0)
        );
    }
    out.push('\n');
    if let Some(error) = &job.error {
        let _ = writeln!(out, "error: {error}");
    }
    if !job.phases.is_empty() {
        out.push_str(&phase_table(&job.phases));
    }
    out
}

/// How far off `ms` is from `now_ms`: `in 25m`, `in 3h`, or `passed` once it is behind.
pub fn until(ms: i64, now_ms: i64) -> String {
    let secs = (ms - now_ms) / 1000;
    match secs {
        ..=0 => "passed".into(),
        1..60 => format!("in {secs}s"),
        60..3600 => format!("in {}m", secs / 60),
        3600..86400 => format!("in {}h", secs / 3600),
        _ => format!("in {}d", secs / 86400),
    }
}

/// A lease counts only while the sandbox is KEPT (after its job); otherwise there is none to show.
fn lease_ends(s: &Sandbox) -> Option<i64> {
    (s.state == crate::model::SandboxState::Kept).then_some(s.lease_expires_at_ms)
}

pub fn sandbox_list(sandboxes: &[Sandbox], now_ms: i64) -> String {
    if sandboxes.is_empty() {
        return "no sandboxes\n".into();
    }
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.job_id.clone(),
                s.state.to_string(),
                opt(&s.phase),
                s.backend.clone(),
                s.profile.clone(),
                format!("{}c/{}M/{}G", s.cores, s.memory_mb, s.disk_gb),
                age(s.created_at_ms, now_ms),
                lease_ends(s).map_or_else(|| "-".into(), |at| until(at, now_ms)),
            ]
        })
        .collect();
    table(
        &[
            "ID", "JOB", "STATE", "PHASE", "BACKEND", "PROFILE", "SIZE", "CREATED", "LEASE",
        ],
        &rows,
    )
}

pub fn sandbox_detail(s: &Sandbox, now_ms: i64) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{:<14}{}", format!("{name}:"), value);
    };
    field("id", s.id.clone());
    field("job", s.job_id.clone());
    field("state", s.state.to_string());
    if let Some(phase) = s.phase {
        field("phase", phase.to_string());
    }
    field("backend", s.backend.clone());
    if let Some(vm) = &s.vm_ref {
        field("vm", vm.clone());
    }
    field("profile", s.profile.clone());
    field(
        "size",
        format!(
            "{} cores, {} MiB memory, {} GiB disk",
            s.cores, s.memory_mb, s.disk_gb
        ),
    );
    field("keepalive", s.keepalive.to_string());
    if let Some(method) = s.start_method {
        field("start", start_method(method, s.snapshot_id.as_deref()));
    }
    if let Some(at) = lease_ends(s) {
        field(
            "lease",
            format!("until {} ({})", timestamp(at), until(at, now_ms)),
        );
    }
    field("created", timestamp(s.created_at_ms));
    field("updated", timestamp(s.updated_at_ms));
    if let Some(at) = s.destroyed_at_ms {
        field("destroyed", timestamp(at));
    }
    if let Some(error) = &s.error {
        field("error", error.clone());
    }
    out
}

pub fn artifact_list(artifacts: &[Artifact]) -> String {
    if artifacts.is_empty() {
        return "no artifacts\n".into();
    }
    let rows: Vec<Vec<String>> = artifacts
        .iter()
        .map(|a| vec![a.path.clone(), a.size.to_string(), a.sha256.clone()])
        .collect();
    table(&["PATH", "SIZE", "SHA256"], &rows)
}

/// `GET /v1/status`; fields are optional so an older or newer daemon still prints.
#[derive(Debug, Default, Deserialize)]
pub struct DaemonStatus {
    pub version: Option<String>,
    pub backend: Option<String>,
    pub uptime_seconds: Option<f64>,
    #[serde(default)]
    pub jobs: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub sandboxes: std::collections::BTreeMap<String, u64>,
    pub queue_length: Option<u64>,
    pub shutting_down: Option<bool>,
    /// The daemon's instance id, which its VMs carry.
    pub instance_id: Option<String>,
    /// `kvm` or `tcg` on the local backend once known.
    pub accelerator: Option<String>,
    /// VMs under our name prefix the daemon did not make, and leaves alone.
    #[serde(default)]
    pub foreign_vms: Vec<crate::instance::ForeignVm>,
    /// Cloud-init's verdict on each template's last cold boot.
    #[serde(default)]
    pub templates: Vec<crate::model::TemplateCheck>,
    /// `GET /v1/governor`'s answer; kept loose so a daemon of another version still prints.
    pub governor: Option<Value>,
}

pub fn status(s: &DaemonStatus) -> String {
    let counts = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "version:      {}", opt(&s.version));
    let _ = writeln!(out, "backend:      {}", opt(&s.backend));
    let _ = writeln!(out, "instance:     {}", opt(&s.instance_id));
    if let Some(accelerator) = &s.accelerator {
        let _ = writeln!(out, "accelerator:  {accelerator}");
    }
    let _ = writeln!(
        out,
        "uptime:       {}",
        s.uptime_seconds.map_or_else(|| "-".into(), duration)
    );
    let _ = writeln!(out, "queue:        {}", opt(&s.queue_length));
    let _ = writeln!(out, "jobs:         {}", counts(&s.jobs));
    let _ = writeln!(out, "sandboxes:    {}", counts(&s.sandboxes));
    if s.shutting_down == Some(true) {
        let _ = writeln!(out, "shutting down: yes");
    }
    if !s.foreign_vms.is_empty() {
        let _ = writeln!(out, "foreign VMs (not made by this daemon; left alone):");
        let rows: Vec<Vec<String>> = s
            .foreign_vms
            .iter()
            .map(|vm| {
                vec![
                    vm.name.clone(),
                    vm.vm_ref.clone(),
                    vm.owner.clone().unwrap_or_else(|| "none".into()),
                ]
            })
            .collect();
        out.push_str(&table(&["NAME", "REF", "OWNER"], &rows));
    }
    if !s.templates.is_empty() {
        let _ = writeln!(out, "templates (cloud-init on the last cold boot):");
        let rows: Vec<Vec<String>> = s
            .templates
            .iter()
            .map(|t| {
                let name = if t.template.is_empty() {
                    "(default)".to_owned()
                } else {
                    t.template.clone()
                };
                let verdict = if t.errors.is_empty() {
                    "ok".to_owned()
                } else {
                    clip(&format!("ERRORS: {}", t.errors.join("; ")), 200)
                };
                vec![name, t.backend.clone(), t.job_id.clone(), verdict]
            })
            .collect();
        out.push_str(&table(&["TEMPLATE", "BACKEND", "JOB", "CLOUD-INIT"], &rows));
    }
    if let Some(governor) = s
        .governor
        .clone()
        .and_then(|v| serde_json::from_value::<GovernorStatus>(v).ok())
    {
        out.push_str(&governor_view(&governor, now_ms()));
    }
    out
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

/// The governor's state: readings, budgets, the boot cap, tripped signals, why the queue waits.
pub fn governor_view(g: &GovernorStatus, now_ms: i64) -> String {
    let mut out = String::new();
    let sampled = g.sampled_at_ms.map_or_else(
        || "no sample yet".to_owned(),
        |at| format!("sampled {}", age(at, now_ms)),
    );
    let _ = writeln!(
        out,
        "governor:     {} ({sampled}, every {})",
        if g.enabled {
            "on"
        } else {
            "OFF (admission by max_concurrent only)"
        },
        duration(g.sample_interval_ms as f64 / 1000.0)
    );
    if let Some(r) = &g.readings {
        let l = r.cpu.load_average;
        let _ = writeln!(
            out,
            "  host:       {} cores ({} CPUs), CPU {:.0}%, load {:.2} {:.2} {:.2}, iowait {}",
            r.cores(),
            r.cpu.logical_cpus,
            r.cpu.usage_percent,
            l.one,
            l.five,
            l.fifteen,
            r.iowait_percent
                .map_or_else(|| "-".to_owned(), |w| format!("{w:.1}%"))
        );
        let _ = writeln!(
            out,
            "  memory:     {} available of {}, swap {} used",
            gb(r.memory.available_bytes),
            gb(r.memory.total_bytes),
            gb(r.memory.swap_used_bytes)
        );
        match &r.pressure {
            Some(p) => {
                let stall = |s: &crate::governor::readings::Stall| match s.full_avg10 {
                    Some(full) => format!("{:.1}/{full:.1}", s.some_avg10),
                    None => format!("{:.1}/-", s.some_avg10),
                };
                let _ = writeln!(
                    out,
                    "  pressure:   cpu {}, io {}, memory {} (PSI some/full avg10, %)",
                    stall(&p.cpu),
                    stall(&p.io),
                    stall(&p.memory)
                );
            }
            None => {
                let _ = writeln!(out, "  pressure:   {}", g.pressure_source);
            }
        }
        if let (Some(disk), Some(free)) = (&r.disk, r.disk_free_percent()) {
            let _ = writeln!(
                out,
                "  storage:    {} free of {} ({free:.0}%) at {}",
                gb(disk.available_bytes),
                gb(disk.total_bytes),
                disk.path.display()
            );
        }
    }
    let c = &g.committed;
    if let Some(b) = &g.budgets {
        let _ = writeln!(
            out,
            "  budget:     memory {} of {} MB, vCPUs {} of {}, {} sandboxes ({} booting)",
            b.memory_used_mb(c),
            b.memory_mb,
            c.vcpus,
            b.vcpus,
            c.sandboxes,
            c.booting
        );
    }
    if let Some(memory) = &g.memory {
        out.push_str(&memory_view(memory));
    }
    let cap = &g.boot_cap;
    let baseline = cap.baseline_seconds.map_or_else(
        || "no baseline yet".to_owned(),
        |s| format!("fastest recent {s:.1}s"),
    );
    let _ = writeln!(
        out,
        "  boot cap:   {} booting of {} (cap {:.2}, {}..{}); on time within {:.1}s ({baseline}); \
         {} on time, {} slow, {} timed out",
        cap.booting,
        cap.limit,
        cap.cap,
        cap.min,
        cap.max,
        cap.on_time_seconds,
        cap.on_time,
        cap.slow,
        cap.timeouts
    );
    let tripped: Vec<String> = g
        .signals
        .iter()
        .filter(|s| s.tripped)
        .map(|s| {
            format!(
                "{} {} (trip {}, clear {})",
                s.signal.key(),
                s.value
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
                s.trip,
                s.clear
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "  signals:    {}",
        if tripped.is_empty() {
            "none tripped".to_owned()
        } else {
            format!("tripped: {}", tripped.join("; "))
        }
    );
    let q = &g.queue;
    let rate = q
        .admissions_per_minute
        .map_or_else(String::new, |r| format!(", {r:.1}/min lately"));
    let _ = writeln!(out, "  admitted:   {}{rate}", q.admitted_total);
    match (&q.head, &q.waiting) {
        (Some(head), Some(w)) => {
            let _ = writeln!(
                out,
                "  queue:      {} waiting; the head {head} waits ({}) for {}: {}",
                q.length,
                age(w.since_ms, now_ms).trim_end_matches(" ago"),
                w.reason,
                w.detail
            );
        }
        _ => {
            let _ = writeln!(out, "  queue:      {} waiting", q.length);
        }
    }
    let _ = writeln!(
        out,
        "  sampling:   {:.2} ms CPU per sample (mean of {})",
        g.cost.mean_cpu_ms, g.cost.samples
    );
    out
}

/// A size in the unit that reads best: MB below a GB, GB above.
pub fn bytes(bytes: u64) -> String {
    if bytes >= 1024 * 1024 * 1024 {
        gb(bytes)
    } else {
        mb(bytes)
    }
}

/// What `template import` registered and what its check found.
pub fn template_import(import: &TemplateImport) -> String {
    let check = &import.check;
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let mut out = format!(
        "template {} registered (build {}), boots by {}: {}\n",
        import.template,
        import.build_id,
        import.boot,
        or_dash(check.os.as_deref())
    );
    out.push_str(&format!(
        "  image: {} {} virtual, {} partition table, boot loader {}, root partition {} ({})\n",
        check.format,
        gb(check.virtual_size),
        or_dash(check.partition_table.as_deref()),
        or_dash(check.boot_loader.as_deref()),
        check
            .root_partition
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        or_dash(check.root_fs.as_deref())
    ));
    for found in &check.found {
        let version = found
            .version
            .as_deref()
            .map(|v| format!(" {v}"))
            .unwrap_or_default();
        out.push_str(&format!("  {}: {}{version}\n", found.what, found.path));
    }
    out.push_str(&format!(
        "  template disk: {}, imported in {:.1} s; a profile uses it with `image: {}`\n",
        bytes(import.disk_bytes),
        import.import_seconds,
        import.template
    ));
    out
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / (1024.0 * 1024.0))
}

/// Sandboxes listed one by one in `agentlab status`; the rest are counted.
const MEMORY_ROWS_MAX: usize = 20;

/// Memory committed to live sandboxes next to what they really hold (PSS, and RSS, which counts
/// the pages they share in full for each), in total and per sandbox.
fn memory_view(m: &MemoryStatus) -> String {
    let mut out = String::new();
    let used = match (m.pss_bytes, m.rss_bytes) {
        (Some(pss), Some(rss)) => format!(
            "really holding {} PSS ({} RSS) in the {} measured",
            mb(pss),
            mb(rss),
            m.measured
        ),
        _ => match &m.error {
            Some(error) => format!("not measured: {error}"),
            None => "not measured by this backend".to_owned(),
        },
    };
    let _ = writeln!(
        out,
        "  sandbox memory: {} MB committed to {}; {used}",
        m.committed_mb,
        m.sandboxes.len()
    );
    let measured: Vec<&SandboxMemory> = m
        .sandboxes
        .iter()
        .filter(|s| s.pss_bytes.is_some())
        .collect();
    for s in measured.iter().take(MEMORY_ROWS_MAX) {
        let _ = writeln!(
            out,
            "    {}{}: {} MB committed, {} PSS, {} RSS",
            s.vm,
            if s.booting { " (booting)" } else { "" },
            s.committed_mb,
            s.pss_bytes.map_or_else(|| "-".to_owned(), mb),
            s.rss_bytes.map_or_else(|| "-".to_owned(), mb)
        );
    }
    if measured.len() > MEMORY_ROWS_MAX {
        let _ = writeln!(out, "    … and {} more", measured.len() - MEMORY_ROWS_MAX);
    }
    out
}

/// Profiles have no fixed schema in the API, so show `name` first and then every scalar field
/// any profile has, in the order first seen.
pub fn profiles(profiles: &[Value]) -> String {
    if profiles.is_empty() {
        return "no profiles\n".into();
    }
    let mut columns: Vec<String> = vec!["name".into()];
    for p in profiles {
        if let Some(obj) = p.as_object() {
            for (k, v) in obj {
                let scalar = !(v.is_object() || v.is_array());
                if scalar && !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    let rows: Vec<Vec<String>> = profiles
        .iter()
        .map(|p| {
            columns
                .iter()
                .map(|c| match p.get(c) {
                    None | Some(Value::Null) => "-".into(),
                    Some(Value::String(s)) => clip(s, 60),
                    Some(v) => v.to_string(),
                })
                .collect()
        })
        .collect();
    let header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header, &rows)
}

/// `agentlab pool`: a row per profile, then the pool's sandboxes.
pub fn pool(p: &PoolStatus, now_ms: i64) -> String {
    if p.profiles.is_empty() {
        return "no warm pool (tuning's `pool.profiles` is empty)\n".into();
    }
    let rows: Vec<Vec<String>> = p
        .profiles
        .iter()
        .map(|profile| {
            let waits = match (profile.backoff_until_ms, &profile.last_error) {
                (Some(until), Some(error)) => format!(
                    "boots wait {} after: {}",
                    duration((until - now_ms).max(0) as f64 / 1000.0),
                    clip(error, 60)
                ),
                _ => profile
                    .refill_waits
                    .as_deref()
                    .map_or_else(|| "-".into(), |why| format!("waits: {}", clip(why, 80))),
            };
            vec![
                profile.profile.clone(),
                profile.target.to_string(),
                profile.ready.to_string(),
                profile.booting.to_string(),
                profile.hits.to_string(),
                profile.misses.to_string(),
                profile
                    .oldest_age_seconds
                    .map_or_else(|| "-".into(), duration),
                waits,
            ]
        })
        .collect();
    let mut out = table(
        &[
            "PROFILE", "TARGET", "READY", "BOOTING", "HITS", "MISSES", "OLDEST", "REFILL",
        ],
        &rows,
    );
    let _ = writeln!(out, "max idle: {}", duration(p.max_idle_seconds as f64));
    if !p.sandboxes.is_empty() {
        let rows: Vec<Vec<String>> = p
            .sandboxes
            .iter()
            .map(|view| {
                let s = &view.sandbox;
                vec![
                    s.id.clone(),
                    s.profile.clone(),
                    s.state.as_str().to_owned(),
                    s.ready_at_ms
                        .map_or_else(|| "-".into(), |at| age(at, now_ms)),
                    view.memory_pss_bytes.map_or_else(|| "-".into(), mb),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["SANDBOX", "PROFILE", "STATE", "READY", "PSS"],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobStatus, Phase};

    #[test]
    fn the_pool_view_shows_each_profile_and_why_refills_wait() {
        let status = PoolStatus {
            max_idle_seconds: 1800,
            profiles: vec![crate::actors::pool_status::ProfilePool {
                profile: "balanced".into(),
                target: 2,
                ready: 1,
                booting: 1,
                hits: 7,
                misses: 3,
                oldest_age_seconds: Some(90.0),
                last_error: Some("clone failed".into()),
                backoff_until_ms: Some(20_000),
                ..Default::default()
            }],
            sandboxes: Vec::new(),
        };
        let text = pool(&status, 10_000);
        let row = text.lines().nth(1).unwrap();
        for cell in [
            "balanced",
            "2",
            "1",
            "7",
            "3",
            "1m30s",
            "boots wait 10.0s after: clone failed",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        assert!(text.contains("max idle: 30m00s"), "{text}");
        assert!(pool(&PoolStatus::default(), 0).contains("no warm pool"));
    }

    fn job() -> Job {
        Job {
            id: "0199aa".into(),
            profile: "small".into(),
            task: "fix the\nbug".into(),
            command: None,
            repo: Some("/srv/repo".into()),
            git_ref: Some("main".into()),
            env_keys: vec!["API_KEY".into()],
            artifacts: vec!["out/**".into()],
            start: crate::model::StartMode::Auto,
            status: JobStatus::Failed,
            phase: None,
            sandbox_id: None,
            exit_code: Some(2),
            error: Some("command exited with 2".into()),
            restarts: 0,
            created_at_ms: 1_700_000_000_000,
            started_at_ms: Some(1_700_000_001_000),
            finished_at_ms: Some(1_700_000_075_000),
            deadline_at_ms: None,
            queue_position: None,
            phases: vec![
                PhaseRun {
                    phase: Phase::Clone,
                    started_at_ms: 1_700_000_001_000,
                    ended_at_ms: Some(1_700_000_002_200),
                    duration_seconds: Some(1.2),
                    result: Some("ok".into()),
                },
                PhaseRun {
                    phase: Phase::Run,
                    started_at_ms: 1_700_000_002_200,
                    ended_at_ms: None,
                    duration_seconds: None,
                    result: None,
                },
            ],
            result_branch: true,
            changes: Some(crate::model::JobChanges {
                commits: 2,
                files: 3,
                insertions: 7,
                deletions: 1,
                branch: Some("agentlab/0199aa".into()),
                error: None,
            }),
        }
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(0.04), "0.0s");
        assert_eq!(duration(1.25), "1.2s");
        assert_eq!(duration(59.94), "59.9s");
        assert_eq!(duration(123.0), "2m03s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(duration(-1.0), "-");
        assert_eq!(age(0, 90_000), "1m ago");
        assert_eq!(timestamp(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn a_lease_shows_only_while_the_sandbox_is_kept() {
        assert_eq!(until(1_000, 2_000), "passed");
        assert_eq!(until(30 * 60_000, 0), "in 30m");
        assert_eq!(until(3 * 86_400_000, 0), "in 3d");
        let now = 1_700_000_000_000;
        let mut sandbox = Sandbox {
            id: "sandbox-1".into(),
            job_id: "j1".into(),
            backend: "fake".into(),
            vm_ref: None,
            state: crate::model::SandboxState::Running,
            phase: None,
            profile: "interactive-dev".into(),
            cores: 2,
            memory_mb: 2048,
            disk_gb: 10,
            keepalive: true,
            lease_expires_at_ms: now + 7_200_000,
            created_at_ms: now,
            updated_at_ms: now,
            destroyed_at_ms: None,
            error: None,
            start_method: None,
            snapshot_id: None,
            from_pool: false,
        };
        assert!(!sandbox_detail(&sandbox, now).contains("lease"));
        let list = sandbox_list(std::slice::from_ref(&sandbox), now);
        assert!(list.trim_end().ends_with("ago   -"), "{list}");
        sandbox.state = crate::model::SandboxState::Kept;
        let detail = sandbox_detail(&sandbox, now);
        assert!(
            detail.contains("lease:        until 2023-11-15T00:13:20Z (in 2h)"),
            "{detail}"
        );
        let list = sandbox_list(std::slice::from_ref(&sandbox), now);
        assert!(
            list.contains("LEASE") && list.ends_with("in 2h\n"),
            "{list}"
        );
    }

    #[test]
    fn sandbox_show_prints_how_it_started_once_it_has() {
        let now = 1_700_000_000_000;
        let mut sandbox: Sandbox = serde_json::from_value(serde_json::json!({
            "id": "sandbox-1", "job_id": "j1", "backend": "qemu", "state": "RUNNING",
            "profile": "small", "cores": 2, "memory_mb": 2048, "disk_gb": 10,
            "keepalive": false, "lease_expires_at_ms": now, "created_at_ms": now,
            "updated_at_ms": now
        }))
        .unwrap();
        assert!(!sandbox_detail(&sandbox, now).contains("start:"));
        sandbox.start_method = Some(StartMethod::Restored);
        sandbox.snapshot_id = Some("snap-2c".into());
        let detail = sandbox_detail(&sandbox, now);
        assert!(
            detail.contains("start:        restored from snapshot snap-2c\n"),
            "{detail}"
        );
        sandbox.start_method = Some(StartMethod::Cold);
        sandbox.snapshot_id = None;
        assert!(sandbox_detail(&sandbox, now).contains("start:        booted cold\n"));
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "BB", "C"],
            &[vec!["long-cell".into(), "x".into(), "last".into()]],
        );
        assert_eq!(t, "A          BB  C\nlong-cell  x   last\n");
    }

    #[test]
    fn job_views_show_what_matters() {
        let list = job_list(&[job()], 1_700_000_100_000);
        assert!(list.starts_with("ID"), "{list}");
        assert!(list.contains("0199aa  FAILED"), "{list}");
        assert!(list.contains("fix the bug"), "{list}");

        let detail = job_detail(&job());
        assert!(detail.contains("status:       FAILED"), "{detail}");
        assert!(
            detail.contains("repo:         /srv/repo @ main"),
            "{detail}"
        );
        assert!(detail.contains("exit code:    2"), "{detail}");
        assert!(
            detail.contains(
                "changes:      2 commits, 3 files changed (+7 -1); branch agentlab/0199aa"
            ),
            "{detail}"
        );
        assert!(detail.contains("took:         1m15s"), "{detail}");
        let nothing_back = Job {
            changes: None,
            ..job()
        };
        assert!(
            job_detail(&nothing_back).contains("changes:      none came back"),
            "{}",
            job_detail(&nothing_back)
        );
        assert!(detail.contains("clone  1.2s      ok"), "{detail}");
        assert!(detail.contains("run    running"), "{detail}");

        let summary = job_summary(&job());
        assert!(
            summary.starts_with(
                "job 0199aa FAILED, exit code 2, 1m15s in all\nerror: command exited with 2\n"
            ),
            "{summary}"
        );
    }

    #[test]
    fn a_queued_job_shows_what_it_waits_for() {
        let mut value = serde_json::to_value(Job {
            status: crate::model::JobStatus::Queued,
            queue_position: Some(1),
            ..job()
        })
        .unwrap();
        value["queue"] = serde_json::json!({"position": 1, "reason": "disk",
            "waiting_for": "disk: storage: 60.0 GB free", "since_ms": 5});
        let shown: ShownJob = serde_json::from_value(value).unwrap();
        let detail = shown_job(&shown);
        assert!(detail.contains("queue position: 1"), "{detail}");
        assert!(
            detail.contains("waiting for:  disk: storage: 60.0 GB free"),
            "{detail}"
        );
        assert!(!job_detail(&job()).contains("waiting for"));
    }

    #[test]
    fn job_show_prints_the_start_asked_for_and_how_it_went() {
        let mut value = serde_json::to_value(Job {
            start: crate::model::StartMode::Snapshot,
            ..job()
        })
        .unwrap();
        let shown: ShownJob = serde_json::from_value(value.clone()).unwrap();
        assert!(
            shown_job(&shown).contains("start:        snapshot\n"),
            "{}",
            shown_job(&shown)
        );
        value["start_method"] = "restored".into();
        value["snapshot_id"] = "snap-2c".into();
        let shown: ShownJob = serde_json::from_value(value.clone()).unwrap();
        let detail = shown_job(&shown);
        assert!(
            detail.contains("start:        restored from snapshot snap-2c (asked: snapshot)\n"),
            "{detail}"
        );
        value["start_method"] = "cold".into();
        value["start"] = "auto".into();
        let shown: ShownJob = serde_json::from_value(value).unwrap();
        let detail = shown_job(&shown);
        assert!(
            detail.contains("start:        booted cold (asked: auto)\n"),
            "{detail}"
        );
    }

    #[test]
    fn profiles_show_scalar_fields() {
        let p = vec![
            serde_json::json!({"name": "small", "cores": 2, "image": "ubuntu"}),
            serde_json::json!({"name": "big", "cores": 8, "tags": ["x"]}),
        ];
        let t = profiles(&p);
        assert_eq!(
            t,
            "NAME   CORES  IMAGE\nsmall  2      ubuntu\nbig    8      -\n"
        );
    }

    #[test]
    fn status_lists_counts() {
        let s: DaemonStatus = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "backend": "qemu", "uptime_seconds": 75,
            "jobs": {"RUNNING": 2, "QUEUED": 1}, "sandboxes": {}, "queue_length": 1,
            "shutting_down": false
        }))
        .unwrap();
        let text = status(&s);
        assert!(text.contains("jobs:         QUEUED 1, RUNNING 2"), "{text}");
        assert!(text.contains("uptime:       1m15s"), "{text}");
        assert!(!text.contains("shutting"), "{text}");
        assert!(!text.contains("foreign"), "{text}");
    }

    #[test]
    fn status_shows_which_templates_cloud_init_reports_errors_for() {
        let s: DaemonStatus = serde_json::from_value(serde_json::json!({
            "templates": [
                {"backend": "qemu", "template": "", "job_id": "j1", "checked_at_ms": 1,
                 "errors": []},
                {"backend": "qemu", "template": "debian-12", "job_id": "j2", "checked_at_ms": 2,
                 "errors": ["('locale', ProcessExecutionError())"]}
            ]
        }))
        .unwrap();
        let text = status(&s);
        assert!(
            text.contains("templates (cloud-init on the last cold boot):"),
            "{text}"
        );
        let default = text.lines().find(|l| l.starts_with("(default)")).unwrap();
        assert!(default.ends_with(" ok"), "{text}");
        let debian = text.lines().find(|l| l.starts_with("debian-12")).unwrap();
        assert!(
            debian.contains("j2") && debian.contains("ERRORS: ('locale'"),
            "{text}"
        );
    }

    #[test]
    fn status_shows_the_instance_and_lists_foreign_vms() {
        let s: DaemonStatus = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "backend": "pve", "instance_id": "0199-ours",
            "accelerator": "kvm",
            "foreign_vms": [
                {"name": "sandbox-byhand", "vm_ref": "200", "owner": null},
                {"name": "sandbox-theirs", "vm_ref": "201", "owner": "0199-theirs"}
            ]
        }))
        .unwrap();
        let text = status(&s);
        assert!(text.contains("instance:     0199-ours\n"), "{text}");
        assert!(text.contains("accelerator:  kvm\n"), "{text}");
        assert!(text.contains("foreign VMs"), "{text}");
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| l.starts_with("sandbox-"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                ["sandbox-byhand", "200", "none"],
                ["sandbox-theirs", "201", "0199-theirs"]
            ]
        );
    }

    #[test]
    fn the_governor_view_sets_committed_memory_against_pss() {
        const MIB: u64 = 1 << 20;
        let sandbox = |vm: &str, pss: Option<u64>| SandboxMemory {
            vm: vm.into(),
            booting: false,
            committed_mb: 1024,
            pss_bytes: pss.map(|p| p * MIB),
            rss_bytes: pss.map(|p| 3 * p * MIB),
        };
        let g = GovernorStatus {
            memory: Some(MemoryStatus {
                committed_mb: 3072,
                pss_bytes: Some(500 * MIB),
                rss_bytes: Some(1500 * MIB),
                measured: 2,
                error: None,
                sandboxes: vec![
                    sandbox("sandbox-a", Some(300)),
                    sandbox("sandbox-b", Some(200)),
                    sandbox("sandbox-c", None),
                ],
            }),
            ..GovernorStatus::default()
        };
        let text = governor_view(&g, 0);
        for want in [
            "sandbox memory: 3072 MB committed to 3; really holding 500 MB PSS (1500 MB RSS) in the 2 measured",
            "    sandbox-a: 1024 MB committed, 300 MB PSS, 900 MB RSS\n",
            "    sandbox-b: 1024 MB committed, 200 MB PSS, 600 MB RSS\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("sandbox-c"),
            "unmeasured rows are left out:\n{text}"
        );

        let unmeasured = GovernorStatus {
            memory: Some(MemoryStatus {
                committed_mb: 1024,
                error: Some("memory usage failed: boom".into()),
                sandboxes: vec![sandbox("sandbox-a", None)],
                ..MemoryStatus::default()
            }),
            ..GovernorStatus::default()
        };
        let text = governor_view(&unmeasured, 0);
        assert!(
            text.contains("1024 MB committed to 1; not measured: memory usage failed: boom"),
            "{text}"
        );
    }

    #[test]
    fn the_governor_view_says_why_the_head_waits() {
        let status = serde_json::json!({
            "enabled": true, "sample_interval_ms": 1000, "sampled_at_ms": 1_000_000,
            "readings": {
                "cpu": {"physical_cores": 2, "logical_cpus": 2, "usage_percent": 63.0,
                        "per_core_percent": [60.0, 66.0],
                        "load_average": {"one": 3.9, "five": 4.5, "fifteen": 4.3}},
                "memory": {"total_bytes": 25_274_793_984_u64, "available_bytes": 23_691_124_736_u64,
                           "swap_total_bytes": 0, "swap_used_bytes": 0},
                "iowait_percent": 0.5,
                "pressure": null,
                "disk": {"path": "/var/lib/agentlab", "total_bytes": 1_000_000_000_000_u64,
                         "available_bytes": 500_000_000_000_u64},
                "notes": ["PSI unavailable (no /proc/pressure)"]
            },
            "pressure_source": "PSI unavailable (no /proc/pressure); cpu falls back to the load average",
            "signals": [{"signal": "load_per_core", "reason": "cpu", "value": 1.95, "trip": 2.0,
                         "clear": 1.25, "tripped": true}],
            "budgets": {"memory_mb": 20007, "sandbox_overhead_mb": 200, "vcpus": 4,
                        "disk_keep_free_bytes": null, "disk_available_bytes": null},
            "committed": {"sandboxes": 1, "vcpus": 1, "memory_mb": 384, "disk_gb": 4,
                          "booting": 1, "booting_disk_gb": 4},
            "boot_cap": {"cap": 1.5, "limit": 1, "booting": 1, "min": 1, "max": 3,
                         "baseline_seconds": 4.8, "on_time_seconds": 9.6, "on_time": 3,
                         "slow": 1, "timeouts": 0, "last": null},
            "queue": {"length": 3, "head": "0199ab",
                      "waiting": {"reason": "boot_cap", "detail": "1 sandboxes booting; the boot cap is 1",
                                  "since_ms": 990_000},
                      "admitted_total": 5, "admissions_per_minute": 6.0},
            "cost": {"samples": 10, "last_cpu_ms": 0.5, "mean_cpu_ms": 0.6, "last_wall_ms": 0.7}
        });
        let status = DaemonStatus {
            governor: Some(status.clone()),
            ..DaemonStatus::default()
        };
        let g: GovernorStatus = serde_json::from_value(status.governor.clone().unwrap()).unwrap();
        let text = governor_view(&g, 1_002_000);
        for want in [
            "governor:     on (sampled 2s ago, every 1.0s)",
            "2 cores (2 CPUs), CPU 63%, load 3.90 4.50 4.30, iowait 0.5%",
            "pressure:   PSI unavailable",
            "budget:     memory 584 of 20007 MB, vCPUs 1 of 4, 1 sandboxes (1 booting)",
            "boot cap:   1 booting of 1 (cap 1.50, 1..3); on time within 9.6s (fastest recent 4.8s)",
            "tripped: load_per_core 1.9",
            "queue:      3 waiting; the head 0199ab waits (12s) for boot_cap: 1 sandboxes booting",
            "0.60 ms CPU per sample",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("sandbox memory"),
            "no figures, no line:\n{text}"
        );
        assert!(self::status(&status).contains("governor:     on"));
        // A daemon without a governor block still prints.
        assert!(!self::status(&DaemonStatus::default()).contains("governor"));
    }
}

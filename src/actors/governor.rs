//! The ResourceGovernor: samples the host every `governor.sample_interval` (on the blocking pool),
//! keeps the latest readings and the policy's state, and answers the Supervisor's admission
//! question for the queue's head. Jobs are taken strictly in FIFO order: when the head waits,
//! nothing overtakes it.
//!
//! It learns boot times from the lifecycle's phase changes (the Hub's phase broadcast): a boot runs
//! from the first boot phase to the guest agent's answer; a boot phase that times out is a timeout.
//! It asks the Supervisor to try admission again whenever that may now succeed: after each sample
//! while jobs wait (which also expires queued jobs whose deadline has passed), when a signal trips
//! or clears, when the boot cap grows, and when a sandbox leaves its boot phases.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::hub::PhaseChange;
use super::supervisor::Admit;
use super::Services;
use crate::backend::DiskUsage;
use crate::config::governor::GovernorTuning;
use crate::config::tuning::Tuning;
use crate::governor::boot_cap::{BootOutcome, CapChange};
use crate::governor::policy::{
    doomed, static_blocks, Block, Budgets, Committed, Decision, Demand, Policy, Throttle,
};
use crate::governor::readings::HostReadings;
use crate::governor::sampler::Sampler;
use crate::governor::status::{
    BootCapStatus, GovernorStatus, HeadWait, QueueStatus, SampleCost, Waiting,
};
use crate::model::{sandbox_name_for, Phase};

/// Capacity-limited admissions kept for the rate estimate, and for how long.
const RATE_SAMPLES: usize = 32;
const RATE_WINDOW: Duration = Duration::from_secs(600);
/// Fewer admissions than this say nothing about the rate.
const RATE_MIN_SAMPLES: usize = 4;

/// One queued job the Supervisor may start, in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub job_id: String,
    /// None when its profile no longer exists (its lifecycle fails it at once).
    pub demand: Option<Demand>,
    /// The profile whose READY pool sandbox it may take; None when it must start its own.
    pub pool_profile: Option<String>,
}

/// An idle READY pool sandbox (its resources are already in `Ask::committed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdlePool {
    pub id: String,
    pub profile: String,
    pub demand: Demand,
}

/// One pool sandbox missing from its profile's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refill {
    pub profile: String,
    pub demand: Demand,
}

/// A queued job with a deadline, and its place in the queue (1 = next).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedDeadline {
    pub job_id: String,
    pub position: u64,
    pub deadline_ms: i64,
}

/// The Supervisor's question: which of the queue's first jobs may start now?
#[derive(Debug, Message)]
#[rtype(result = "Answer")]
pub struct Ask {
    pub committed: Committed,
    pub head: Vec<Candidate>,
    /// Slots left under `admission.max_concurrent`.
    pub free: usize,
    pub queue_length: u64,
    pub deadlines: Vec<QueuedDeadline>,
    /// The daemon clock's now, for deadlines.
    pub now_ms: i64,
    /// The backend's disk measurement for this round; None when it failed (the last one stands).
    pub disk: Option<DiskUsage>,
    /// Idle READY pool sandboxes, oldest first.
    pub pool: Vec<IdlePool>,
    /// Pool sandboxes to boot if nothing waits, in order.
    pub refill: Vec<Refill>,
}

#[derive(Debug, Clone, Default, PartialEq, MessageResponse)]
pub struct Answer {
    /// Start these, in order.
    pub admit: Vec<String>,
    /// The head cannot fit this host at all: fail it with this reason.
    pub never: Option<(String, String)>,
    /// Jobs whose deadline predictably passes before they would start: fail them with the reason.
    pub doomed: Vec<(String, String)>,
    /// Those of `admit` that take a READY pool sandbox of their profile.
    pub hits: Vec<String>,
    /// Idle pool sandboxes to destroy: the queue's head needs their room.
    pub evict: Vec<String>,
    /// Profiles to boot one more pool sandbox of (one entry each).
    pub refill: Vec<String>,
    /// Why the rest of the pool's deficit is not booted now.
    pub refill_waits: Option<String>,
}

/// Takes the first idle pool sandbox `candidate` may have out of `idle`.
fn take_pooled(candidate: &Candidate, idle: &mut Vec<IdlePool>) -> bool {
    let Some(profile) = &candidate.pool_profile else {
        return false;
    };
    match idle.iter().position(|p| &p.profile == profile) {
        Some(at) => {
            idle.remove(at);
            true
        }
        None => false,
    }
}

/// Admission without the governor: pool hits, then up to the free slots in order (an idle pool
/// sandbox goes to make a slot for the head), then refills into the slots left if nothing waits.
pub fn ungoverned(head: &[Candidate], free: usize, pool: &[IdlePool], refill: &[Refill]) -> Answer {
    let mut answer = Answer::default();
    let mut idle = pool.to_vec();
    let mut used = 0;
    let mut waits = false;
    for candidate in head {
        if take_pooled(candidate, &mut idle) {
            answer.hits.push(candidate.job_id.clone());
            answer.admit.push(candidate.job_id.clone());
            continue;
        }
        if used >= free {
            if !idle.is_empty() {
                answer.evict.push(idle.remove(0).id);
            }
            waits = true;
            break;
        }
        used += 1;
        answer.admit.push(candidate.job_id.clone());
    }
    let room = free.saturating_sub(used);
    if !refill.is_empty() {
        if waits {
            answer.refill_waits = Some("jobs are waiting in the queue".into());
        } else if refill.len() > room {
            answer.refill_waits = Some("admission.max_concurrent sandboxes are live".into());
        }
    }
    if !waits {
        for wanted in refill.iter().take(room) {
            answer.refill.push(wanted.profile.clone());
        }
    }
    answer
}

/// The oldest idle pool sandboxes to destroy so that one more sandbox of `demand` fits the
/// static budget (and, with `need_slot`, gets a slot under `max_concurrent`): as few as do it,
/// or all of them when even that is not enough (the pool gives way before a queued job).
fn make_room(
    g: &GovernorTuning,
    readings: Option<&HostReadings>,
    committed: &Committed,
    demand: Option<&Demand>,
    idle: &mut Vec<IdlePool>,
    mut need_slot: bool,
) -> Vec<String> {
    let mut trial = committed.clone();
    let mut evict = Vec::new();
    while !idle.is_empty() {
        let short = match (readings, demand) {
            (Some(readings), Some(demand)) if g.enabled => {
                !matches!(static_blocks(g, readings, &trial, demand), Ok(b) if b.is_empty())
            }
            _ => false,
        };
        if !need_slot && !short {
            break;
        }
        let oldest = idle.remove(0);
        trial.remove_named(&oldest.demand, &oldest.id);
        evict.push(oldest.id);
        need_slot = false;
    }
    evict
}

/// The governor's state for `GET /v1/governor`; `committed` is a fresh tally when the caller has
/// one.
#[derive(Debug, Message)]
#[rtype(result = "GovernorStatus")]
pub struct GetStatus {
    pub committed: Option<Committed>,
}

/// Which job heads the queue and why it waits, for a queued job's view (`GET /v1/jobs/{id}`).
#[derive(Debug, Message)]
#[rtype(result = "HeadWait")]
pub struct GetHeadWait;

#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Tick;

#[derive(Debug)]
struct Sampled {
    readings: HostReadings,
    cpu: Duration,
    wall: Duration,
}

/// A boot in flight, on the governor's clock.
#[derive(Debug, Clone)]
struct BootTrack {
    started: Duration,
    phase_started: Duration,
    worst_share: f64,
    peak: u32,
}

#[derive(Debug, Default)]
struct QueueState {
    length: u64,
    head: Option<String>,
    waiting: Option<Waiting>,
}

#[derive(Debug)]
pub struct ResourceGovernor {
    svc: Arc<Services>,
    sampler: Arc<Mutex<Box<dyn Sampler>>>,
    sampling: bool,
    supervisor: Recipient<Admit>,
    phases: Option<broadcast::Receiver<PhaseChange>>,
    epoch: Instant,
    readings: Option<HostReadings>,
    sampled_at_ms: Option<i64>,
    policy: Policy,
    boots: HashMap<String, BootTrack>,
    committed: Committed,
    /// The backend's last disk measurement (thick until it reports one).
    disk_usage: DiskUsage,
    queue: QueueState,
    admissions: VecDeque<Duration>,
    admitted_total: u64,
    cost: SampleCost,
}

impl ResourceGovernor {
    /// Subscribes to phase changes at once, so no boot that starts after this is missed.
    pub fn new(
        svc: Arc<Services>,
        sampler: Box<dyn Sampler>,
        supervisor: Recipient<Admit>,
    ) -> Self {
        let tuning = svc.tuning.get();
        ResourceGovernor {
            phases: Some(svc.hub.watch_phases()),
            policy: Policy::new(&tuning.governor),
            svc,
            sampler: Arc::new(Mutex::new(sampler)),
            sampling: false,
            supervisor,
            epoch: Instant::now(),
            readings: None,
            sampled_at_ms: None,
            boots: HashMap::new(),
            committed: Committed::default(),
            disk_usage: DiskUsage::thick(),
            queue: QueueState::default(),
            admissions: VecDeque::new(),
            admitted_total: 0,
            cost: SampleCost::default(),
        }
    }

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.epoch)
    }

    fn storage_path(&self, tuning: &Tuning) -> PathBuf {
        tuning
            .governor
            .storage_path
            .clone()
            .unwrap_or_else(|| self.svc.config.data_dir.clone())
    }

    fn retry_admission(&self) {
        self.supervisor.do_send(Admit);
    }

    fn schedule(&self, ctx: &mut Context<Self>) {
        let every = self.svc.tuning.get().governor.sample_interval;
        ctx.run_later(every, |_, ctx| ctx.notify(Tick));
    }

    fn sample(&mut self, ctx: &mut Context<Self>) {
        if self.sampling {
            return;
        }
        self.sampling = true;
        let sampler = Arc::clone(&self.sampler);
        let storage = self.storage_path(&self.svc.tuning.get());
        let work = tokio::task::spawn_blocking(move || {
            let cpu_before = thread_cpu_time();
            let started = std::time::Instant::now();
            let readings = sampler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sample(&storage);
            Sampled {
                readings,
                cpu: thread_cpu_time().saturating_sub(cpu_before),
                wall: started.elapsed(),
            }
        });
        ctx.spawn(work.into_actor(self).map(|result, governor, _| {
            governor.sampling = false;
            match result {
                Ok(sampled) => governor.on_sample(sampled),
                Err(err) => tracing::error!(%err, "sampling the host failed"),
            }
        }));
    }

    fn on_sample(&mut self, sampled: Sampled) {
        let tuning = self.svc.tuning.get();
        let g = &tuning.governor;
        let first = self.readings.is_none();
        let changed = self.policy.observe(g, &sampled.readings);
        if first {
            for note in &sampled.readings.notes {
                tracing::warn!(%note, "host readings");
            }
        }
        let cpu_ms = sampled.cpu.as_secs_f64() * 1e3;
        self.cost.samples += 1;
        self.cost.last_cpu_ms = cpu_ms;
        self.cost.last_wall_ms = sampled.wall.as_secs_f64() * 1e3;
        self.cost.mean_cpu_ms += (cpu_ms - self.cost.mean_cpu_ms) / self.cost.samples as f64;
        self.export_readings(g, &sampled.readings, sampled.cpu);
        self.readings = Some(sampled.readings);
        self.sampled_at_ms = Some(self.svc.clock.now_ms());
        self.forget_stale_boots(&tuning);
        if changed {
            tracing::debug!(signals = ?self.policy.signals(g), "a dynamic signal tripped or cleared");
        }
        if first || changed || self.queue.length > 0 {
            self.retry_admission();
        }
    }

    fn export_readings(&self, g: &GovernorTuning, r: &HostReadings, cost: Duration) {
        let m = &self.svc.metrics.governor;
        m.sample_cpu_seconds.observe(cost.as_secs_f64());
        m.cpu_usage_percent.set(r.cpu.usage_percent);
        for (window, value) in [
            ("1m", r.cpu.load_average.one),
            ("5m", r.cpu.load_average.five),
            ("15m", r.cpu.load_average.fifteen),
        ] {
            m.load_average.with_label_values(&[window]).set(value);
        }
        m.memory_available_bytes
            .set(r.memory.available_bytes as f64);
        m.swap_used_bytes.set(r.memory.swap_used_bytes as f64);
        if let Some(iowait) = r.iowait_percent {
            m.iowait_percent.set(iowait);
        }
        if let Some(p) = &r.pressure {
            for (resource, stall) in [("cpu", p.cpu), ("io", p.io), ("memory", p.memory)] {
                m.pressure_avg10_percent
                    .with_label_values(&[resource, "some"])
                    .set(stall.some_avg10);
                if let Some(full) = stall.full_avg10 {
                    m.pressure_avg10_percent
                        .with_label_values(&[resource, "full"])
                        .set(full);
                }
            }
        }
        if let Some(disk) = &r.disk {
            m.disk_available_bytes.set(disk.available_bytes as f64);
        }
        for state in self.policy.signals(g) {
            m.signal_tripped
                .with_label_values(&[state.signal.key()])
                .set(i64::from(state.tripped));
        }
        m.boot_cap.set(self.policy.boot_cap.value());
    }

    /// Boots tracked for longer than their phases' timeouts together ended without our seeing it
    /// (a lagged broadcast, say).
    fn forget_stale_boots(&mut self, tuning: &Tuning) {
        let limit: Duration = Phase::PROVISIONING
            .iter()
            .map(|p| tuning.phase_timeouts.get(*p))
            .sum::<Duration>()
            .saturating_mul(2);
        let now = self.now();
        self.boots
            .retain(|_, track| now.saturating_sub(track.started) <= limit);
    }

    fn on_phase(&mut self, change: PhaseChange) {
        let now = self.now();
        let tuning = self.svc.tuning.get();
        let boot_phase = change.phase.is_provisioning();
        match (change.result, boot_phase) {
            (None, true) => {
                let track = self
                    .boots
                    .entry(change.job_id)
                    .or_insert_with(|| BootTrack {
                        started: now,
                        phase_started: now,
                        worst_share: 0.0,
                        peak: 0,
                    });
                track.phase_started = now;
                let in_flight = u32::try_from(self.boots.len()).unwrap_or(u32::MAX);
                for track in self.boots.values_mut() {
                    track.peak = track.peak.max(in_flight);
                }
            }
            (None, false) => {
                // Past its boot phases (run, upload, destroy): the store no longer counts it as
                // booting, so a boot slot may be free.
                self.boots.remove(&change.job_id);
                if matches!(change.phase, Phase::Run | Phase::Destroy) {
                    self.retry_admission();
                }
            }
            (Some(result), true) => {
                let Some(track) = self.boots.get_mut(&change.job_id) else {
                    return;
                };
                let timeout = tuning.phase_timeouts.get(change.phase).as_secs_f64();
                if timeout > 0.0 {
                    let share = now.saturating_sub(track.phase_started).as_secs_f64() / timeout;
                    track.worst_share = track.worst_share.max(share.min(1.0));
                }
                let timed_out = result == "timeout";
                let finished = timed_out || (result == "ok" && change.phase == Phase::GuestAgent);
                if result != "ok" && !timed_out {
                    // Failed or cancelled: says nothing about load.
                    self.boots.remove(&change.job_id);
                    return;
                }
                if !finished {
                    return;
                }
                let Some(track) = self.boots.remove(&change.job_id) else {
                    return;
                };
                let outcome = BootOutcome {
                    started_at: track.started,
                    seconds: now.saturating_sub(track.started).as_secs_f64(),
                    timed_out,
                    peak_booting: track.peak,
                    worst_phase_share: track.worst_share,
                };
                self.record_boot(&tuning.governor, &change.job_id, &outcome, now);
            }
            (Some(_), false) => {}
        }
    }

    fn record_boot(
        &mut self,
        g: &GovernorTuning,
        job_id: &str,
        outcome: &BootOutcome,
        now: Duration,
    ) {
        let before = self.policy.boot_limit(g);
        let change = self.policy.record_boot(g, outcome, now);
        let after = self.policy.boot_limit(g);
        let m = &self.svc.metrics.governor;
        m.boot_cap.set(self.policy.boot_cap.value());
        if let Some(last) = &self.policy.boot_cap.last {
            m.boot_seconds
                .with_label_values(&[last.verdict.as_str()])
                .observe(outcome.seconds);
            match change {
                CapChange::Shrank => tracing::warn!(
                    job = job_id, seconds = outcome.seconds, why = %last.why, cap = after,
                    "boot slow: the boot cap shrinks"
                ),
                _ if after != before => tracing::info!(
                    job = job_id,
                    seconds = outcome.seconds,
                    cap = after,
                    "boot cap grows"
                ),
                _ => {
                    tracing::debug!(job = job_id, seconds = outcome.seconds, verdict = %last.verdict, "boot")
                }
            }
        }
        if after > before {
            self.retry_admission();
        }
    }

    /// Admissions per second while jobs were waiting (so the rate is the host's, not the
    /// submitters'). The optimistic reading, so a prediction errs towards letting a job wait.
    fn admission_rate(&self) -> Option<f64> {
        if self.admissions.len() < RATE_MIN_SAMPLES {
            return None;
        }
        let first = *self.admissions.front()?;
        let last = *self.admissions.back()?;
        let span = last.saturating_sub(first).as_secs_f64();
        (span > 0.0).then(|| (self.admissions.len() - 1) as f64 / span)
    }

    fn note_admissions(&mut self, admitted: usize, waiting_after: u64) {
        self.admitted_total += admitted as u64;
        if admitted == 0 || waiting_after == 0 {
            return;
        }
        let now = self.now();
        for _ in 0..admitted {
            self.admissions.push_back(now);
        }
        while self.admissions.len() > RATE_SAMPLES
            || self
                .admissions
                .front()
                .is_some_and(|t| now.saturating_sub(*t) > RATE_WINDOW)
        {
            self.admissions.pop_front();
        }
    }

    fn set_waiting(&mut self, head: Option<String>, waiting: Option<(String, String, Vec<Block>)>) {
        let since_ms = match (&self.queue.waiting, &self.queue.head) {
            (Some(w), Some(previous)) if Some(previous) == head.as_ref() => w.since_ms,
            _ => self.svc.clock.now_ms(),
        };
        self.queue.waiting = waiting.map(|(reason, detail, blocks)| Waiting {
            reason,
            detail,
            blocks,
            since_ms,
        });
        self.queue.head = head;
        let m = &self.svc.metrics.governor;
        for reason in Throttle::ALL {
            let on = self
                .queue
                .waiting
                .as_ref()
                .is_some_and(|w| w.reason == reason.as_str());
            m.throttled
                .with_label_values(&[reason.as_str()])
                .set(i64::from(on));
        }
    }

    fn answer(&mut self, ask: Ask) -> Answer {
        let tuning = self.svc.tuning.get();
        let g = &tuning.governor;
        if let Some(usage) = ask.disk {
            self.disk_usage = usage;
        }
        let mut committed = ask.committed;
        committed.measured(&self.disk_usage);
        let mut answer = Answer::default();
        let mut waiting = None;
        let mut idle = ask.pool.clone();
        // Admissions that take a slot of their own (a pool hit's sandbox holds one already).
        let mut slots_used = 0;
        for candidate in &ask.head {
            if candidate.pool_profile.is_some()
                && idle
                    .iter()
                    .any(|p| Some(&p.profile) == candidate.pool_profile.as_ref())
            {
                let blocks = match &self.readings {
                    Some(_) if g.enabled => self.policy.dynamic_blocks(g, &committed),
                    _ => Vec::new(),
                };
                if let Some(first) = blocks.first().cloned() {
                    waiting = Some((first.reason.as_str().to_owned(), first.detail, blocks));
                    break;
                }
                take_pooled(candidate, &mut idle);
                answer.hits.push(candidate.job_id.clone());
                answer.admit.push(candidate.job_id.clone());
                continue;
            }
            if slots_used >= ask.free {
                answer.evict = make_room(
                    g,
                    self.readings.as_ref(),
                    &committed,
                    candidate.demand.as_ref(),
                    &mut idle,
                    true,
                );
                let making_room = if answer.evict.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} idle pool sandboxes go to make room",
                        answer.evict.len()
                    )
                };
                waiting = Some((
                    "max_concurrent".to_owned(),
                    format!(
                        "admission.max_concurrent ({}) sandboxes are live (running, kept, in the \
                         pool or being destroyed){making_room}",
                        tuning.admission.max_concurrent
                    ),
                    Vec::new(),
                ));
                break;
            }
            let Some(demand) = candidate.demand else {
                slots_used += 1;
                answer.admit.push(candidate.job_id.clone());
                continue;
            };
            if !g.enabled {
                slots_used += 1;
                committed.add_named(&demand, true, sandbox_name_for(&candidate.job_id));
                answer.admit.push(candidate.job_id.clone());
                continue;
            }
            let Some(readings) = &self.readings else {
                waiting = Some((
                    "warming_up".to_owned(),
                    "no host sample yet".to_owned(),
                    Vec::new(),
                ));
                break;
            };
            match self.policy.decide(g, readings, &committed, &demand) {
                Decision::Admit => {
                    slots_used += 1;
                    committed.add_named(&demand, true, sandbox_name_for(&candidate.job_id));
                    answer.admit.push(candidate.job_id.clone());
                }
                Decision::Wait(mut blocks) => {
                    answer.evict = make_room(
                        g,
                        Some(readings),
                        &committed,
                        Some(&demand),
                        &mut idle,
                        false,
                    );
                    if let Some(first) = blocks.first_mut() {
                        if !answer.evict.is_empty() {
                            first.detail.push_str(&format!(
                                "; {} idle pool sandboxes go to make room",
                                answer.evict.len()
                            ));
                        }
                        let first = first.clone();
                        waiting = Some((first.reason.as_str().to_owned(), first.detail, blocks));
                    }
                    break;
                }
                Decision::Never(block) => {
                    answer.never = Some((
                        candidate.job_id.clone(),
                        format!("does not fit this host: {block}"),
                    ));
                    break;
                }
            }
        }
        let admitted = answer.admit.len();
        let waiting_after = ask.queue_length.saturating_sub(admitted as u64);
        if !ask.refill.is_empty() {
            if waiting_after == 0 && answer.never.is_none() {
                let free = ask.free - slots_used.min(ask.free);
                (answer.refill, answer.refill_waits) =
                    self.refills(g, &mut committed, &ask.refill, free);
            } else {
                answer.refill_waits = Some("jobs are waiting in the queue".into());
            }
        }
        self.note_admissions(admitted, waiting_after);
        if tuning.admission.predict_deadlines {
            if let Some(rate) = self.admission_rate() {
                for queued in &ask.deadlines {
                    if answer.admit.contains(&queued.job_id) {
                        continue;
                    }
                    let position = queued.position.saturating_sub(admitted as u64).max(1);
                    let left = (queued.deadline_ms - ask.now_ms) as f64 / 1000.0;
                    if let Some(wait) =
                        doomed(position, left, rate, tuning.admission.deadline_margin)
                    {
                        answer.doomed.push((
                            queued.job_id.clone(),
                            format!(
                                "deadline would pass while queued: at position {position}, with \
                                 about {:.1} jobs starting per minute, it would wait about {wait:.0}s \
                                 and has {:.0}s left",
                                rate * 60.0,
                                left.max(0.0)
                            ),
                        ));
                    }
                }
            }
        }
        let head = ask
            .head
            .get(admitted)
            .map(|c| c.job_id.clone())
            .filter(|_| waiting_after > 0);
        self.committed = committed;
        self.queue.length = waiting_after;
        self.set_waiting(head, waiting.filter(|_| waiting_after > 0));
        self.svc
            .metrics
            .governor
            .queue_length
            .set(i64::try_from(waiting_after).unwrap_or(i64::MAX));
        self.svc
            .metrics
            .governor
            .booting
            .set(i64::from(self.committed.booting));
        answer
    }

    /// The pool sandboxes to boot now, in order, into `free` slots: each must pass the same
    /// rules as a job (budget, boot cap, pressure); the first that does not stops the refill,
    /// and its rule is returned as why the rest waits.
    fn refills(
        &self,
        g: &GovernorTuning,
        committed: &mut Committed,
        wanted: &[Refill],
        free: usize,
    ) -> (Vec<String>, Option<String>) {
        let mut refill = Vec::new();
        for (at, one) in wanted.iter().enumerate() {
            if at >= free {
                let why = "admission.max_concurrent sandboxes are live";
                return (refill, Some(why.into()));
            }
            if g.enabled {
                let Some(readings) = &self.readings else {
                    return (refill, Some("no host sample yet".into()));
                };
                match self.policy.decide(g, readings, committed, &one.demand) {
                    Decision::Admit => {}
                    Decision::Wait(blocks) => {
                        return (refill, blocks.first().map(ToString::to_string));
                    }
                    Decision::Never(block) => return (refill, Some(block.to_string())),
                }
            }
            committed.add(&one.demand, true);
            refill.push(one.profile.clone());
        }
        (refill, None)
    }

    fn status(&self, committed: Option<Committed>) -> GovernorStatus {
        let tuning = self.svc.tuning.get();
        let g = &tuning.governor;
        let committed = match committed {
            Some(mut fresh) => {
                fresh.measured(&self.disk_usage);
                fresh
            }
            None => self.committed.clone(),
        };
        let cap = &self.policy.boot_cap;
        let pressure_source = match &self.readings {
            None => "no sample yet".to_owned(),
            Some(r) if r.pressure.is_some() => "psi".to_owned(),
            Some(r) => r
                .notes
                .iter()
                .find(|n| n.starts_with("PSI unavailable"))
                .cloned()
                .unwrap_or_else(|| "fallback (PSI unavailable)".to_owned()),
        };
        GovernorStatus {
            enabled: g.enabled,
            sample_interval_ms: u64::try_from(g.sample_interval.as_millis()).unwrap_or(u64::MAX),
            sampled_at_ms: self.sampled_at_ms,
            readings: self.readings.clone(),
            pressure_source,
            signals: self.policy.signals(g),
            budgets: self.readings.as_ref().map(|r| Budgets::of(g, r)),
            committed: committed.clone(),
            boot_cap: BootCapStatus {
                cap: cap.value(),
                limit: self.policy.boot_limit(g),
                booting: committed.booting,
                min: g.boot_cap.min,
                max: g.boot_cap.max,
                baseline_seconds: cap.baseline(),
                on_time_seconds: cap.on_time_seconds(&g.boot_cap),
                on_time: cap.on_time,
                slow: cap.slow,
                timeouts: cap.timeouts,
                last: cap.last.clone(),
            },
            queue: QueueStatus {
                length: self.queue.length,
                head: self.queue.head.clone(),
                waiting: self.queue.waiting.clone(),
                admitted_total: self.admitted_total,
                admissions_per_minute: self.admission_rate().map(|r| r * 60.0),
            },
            cost: self.cost,
            memory: None,
        }
    }
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

impl Actor for ResourceGovernor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(rx) = self.phases.take() {
            let changes = futures_util::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(change) => return Some((change, rx)),
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "the governor missed phase changes");
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            ctx.add_stream(changes);
        }
        ctx.notify(Tick);
    }
}

impl Handler<Tick> for ResourceGovernor {
    type Result = ();
    fn handle(&mut self, _: Tick, ctx: &mut Self::Context) {
        self.sample(ctx);
        self.schedule(ctx);
    }
}

impl StreamHandler<PhaseChange> for ResourceGovernor {
    fn handle(&mut self, change: PhaseChange, _: &mut Self::Context) {
        self.on_phase(change);
    }

    fn finished(&mut self, _: &mut Self::Context) {
        // The Hub lives as long as the daemon; keep running (and sampling) regardless.
    }
}

impl Handler<Ask> for ResourceGovernor {
    type Result = Answer;
    fn handle(&mut self, ask: Ask, _: &mut Self::Context) -> Answer {
        self.answer(ask)
    }
}

impl Handler<GetHeadWait> for ResourceGovernor {
    type Result = MessageResult<GetHeadWait>;
    fn handle(&mut self, _: GetHeadWait, _: &mut Self::Context) -> Self::Result {
        MessageResult(HeadWait {
            head: self.queue.head.clone(),
            waiting: self.queue.waiting.clone(),
        })
    }
}

impl Handler<GetStatus> for ResourceGovernor {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, msg: GetStatus, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.status(msg.committed))
    }
}

//! Prometheus metrics, with the performance document's names. Gauges of jobs and sandboxes (and
//! the queue's length) are read from the store at scrape time, so they are right after a restart
//! too. The ResourceGovernor's metrics are `agentlab_governor_*`. What live sandboxes really hold
//! in host memory (`agentlab_sandbox_memory_pss_bytes`, one total: a series per sandbox would grow
//! without bound) is set from the backend's measurement at scrape time and by the status routes.

use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metric: {0}")]
    Register(#[from] prometheus::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub sandboxes_total: GaugeVec,
    pub jobs_total: GaugeVec,
    pub provisioning_duration: Histogram,
    pub api_duration: HistogramVec,
    pub lease_gc_duration: Histogram,
    /// What the retention collector removed: `kind` = jobs, artifacts, files.
    pub retention_removed: IntCounterVec,
    pub phase_duration: HistogramVec,
    pub phase_transitions: IntCounterVec,
    pub actor_restarts: IntCounterVec,
    /// Sum of the live sandboxes' PSS, as the backend last measured it.
    pub sandbox_memory_pss_bytes: Gauge,
    /// READY pool sandboxes per profile, read from the store at scrape time.
    pub pool_ready: IntGaugeVec,
    /// Admitted jobs of a pooled profile: `result` = hit (took a READY sandbox) or miss.
    pub pool_claims: IntCounterVec,
    pub governor: GovernorMetrics,
}

/// The ResourceGovernor's metrics: admissions, the queue, why its head waits, the boot cap, the
/// current host readings, and what a sample costs.
#[derive(Debug, Clone)]
pub struct GovernorMetrics {
    pub admitted: IntCounter,
    pub queue_length: IntGauge,
    /// 1 for the reason the queue's head waits for now, 0 for the others.
    pub throttled: IntGaugeVec,
    pub signal_tripped: IntGaugeVec,
    pub boot_cap: Gauge,
    pub booting: IntGauge,
    pub boot_seconds: HistogramVec,
    pub cpu_usage_percent: Gauge,
    pub load_average: GaugeVec,
    pub memory_available_bytes: Gauge,
    pub swap_used_bytes: Gauge,
    pub iowait_percent: Gauge,
    pub pressure_avg10_percent: GaugeVec,
    pub disk_available_bytes: Gauge,
    pub sample_cpu_seconds: Histogram,
}

impl GovernorMetrics {
    fn new() -> Result<GovernorMetrics, prometheus::Error> {
        let gauge = |name: &str, help: &str| Gauge::with_opts(Opts::new(name, help));
        Ok(GovernorMetrics {
            admitted: IntCounter::new(
                "agentlab_governor_admitted_total",
                "Queued jobs admitted to start",
            )?,
            queue_length: IntGauge::new(
                "agentlab_governor_queue_length",
                "Jobs waiting in the queue",
            )?,
            throttled: IntGaugeVec::new(
                Opts::new(
                    "agentlab_governor_throttled",
                    "1 while the queue's head waits for this reason",
                ),
                &["reason"],
            )?,
            signal_tripped: IntGaugeVec::new(
                Opts::new(
                    "agentlab_governor_signal_tripped",
                    "1 while a dynamic signal is past its threshold (hysteresis applied)",
                ),
                &["signal"],
            )?,
            boot_cap: gauge(
                "agentlab_governor_boot_cap",
                "The adaptive cap on sandboxes in their boot phases",
            )?,
            booting: IntGauge::new(
                "agentlab_governor_booting",
                "Sandboxes in their boot phases",
            )?,
            boot_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "agentlab_governor_boot_seconds",
                    "Boot time (clone until the guest agent answers) as the governor judged it",
                )
                .buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                ]),
                &["verdict"],
            )?,
            cpu_usage_percent: gauge("agentlab_governor_cpu_usage_percent", "Host CPU use")?,
            load_average: GaugeVec::new(
                Opts::new("agentlab_governor_load_average", "Host load average"),
                &["window"],
            )?,
            memory_available_bytes: gauge(
                "agentlab_governor_memory_available_bytes",
                "Host MemAvailable",
            )?,
            swap_used_bytes: gauge("agentlab_governor_swap_used_bytes", "Host swap in use")?,
            iowait_percent: gauge(
                "agentlab_governor_iowait_percent",
                "Share of CPU time in iowait over the last sample",
            )?,
            pressure_avg10_percent: GaugeVec::new(
                Opts::new(
                    "agentlab_governor_pressure_avg10_percent",
                    "PSI avg10 from /proc/pressure",
                ),
                &["resource", "kind"],
            )?,
            disk_available_bytes: gauge(
                "agentlab_governor_disk_available_bytes",
                "Free space on the storage path",
            )?,
            sample_cpu_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "agentlab_governor_sample_cpu_seconds",
                    "CPU time one host sample takes",
                )
                .buckets(exponential_buckets(0.00005, 2.0, 12)?),
            )?,
        })
    }

    fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.admitted.clone()))?;
        registry.register(Box::new(self.queue_length.clone()))?;
        registry.register(Box::new(self.throttled.clone()))?;
        registry.register(Box::new(self.signal_tripped.clone()))?;
        registry.register(Box::new(self.boot_cap.clone()))?;
        registry.register(Box::new(self.booting.clone()))?;
        registry.register(Box::new(self.boot_seconds.clone()))?;
        registry.register(Box::new(self.cpu_usage_percent.clone()))?;
        registry.register(Box::new(self.load_average.clone()))?;
        registry.register(Box::new(self.memory_available_bytes.clone()))?;
        registry.register(Box::new(self.swap_used_bytes.clone()))?;
        registry.register(Box::new(self.iowait_percent.clone()))?;
        registry.register(Box::new(self.pressure_avg10_percent.clone()))?;
        registry.register(Box::new(self.disk_available_bytes.clone()))?;
        registry.register(Box::new(self.sample_cpu_seconds.clone()))?;
        Ok(())
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let seconds = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(name, help).buckets(buckets)
        };
        let boot_buckets = vec![
            0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ];
        let fast_buckets = exponential_buckets(0.0001, 2.5, 14)?;
        let phase_buckets = vec![
            0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
        ];
        let metrics = Metrics {
            sandboxes_total: GaugeVec::new(
                Opts::new("agentlab_sandboxes_total", "Sandboxes by state"),
                &["state"],
            )?,
            jobs_total: GaugeVec::new(
                Opts::new("agentlab_jobs_total", "Jobs by status"),
                &["status"],
            )?,
            provisioning_duration: Histogram::with_opts(seconds(
                "agentlab_provisioning_duration_seconds",
                "Time from clone start until the guest agent answers",
                boot_buckets,
            ))?,
            api_duration: HistogramVec::new(
                seconds(
                    "agentlab_api_duration_seconds",
                    "API request duration",
                    fast_buckets.clone(),
                ),
                &["method", "route", "status"],
            )?,
            lease_gc_duration: Histogram::with_opts(seconds(
                "agentlab_lease_gc_duration_seconds",
                "Lease GC run time",
                fast_buckets,
            ))?,
            retention_removed: IntCounterVec::new(
                Opts::new(
                    "agentlab_retention_removed_total",
                    "Jobs, artifacts and files removed for being past retention",
                ),
                &["kind"],
            )?,
            phase_duration: HistogramVec::new(
                seconds(
                    "agentlab_phase_duration_seconds",
                    "Lifecycle phase duration",
                    phase_buckets,
                ),
                &["phase", "result"],
            )?,
            phase_transitions: IntCounterVec::new(
                Opts::new(
                    "agentlab_phase_transitions_total",
                    "Lifecycle phases ended, by result",
                ),
                &["phase", "result"],
            )?,
            actor_restarts: IntCounterVec::new(
                Opts::new(
                    "agentlab_actor_restarts_total",
                    "SandboxActor restarts after a crash",
                ),
                &["outcome"],
            )?,
            sandbox_memory_pss_bytes: Gauge::with_opts(Opts::new(
                "agentlab_sandbox_memory_pss_bytes",
                "Host memory live sandboxes really hold (sum of their VMs' PSS)",
            ))?,
            pool_ready: IntGaugeVec::new(
                Opts::new(
                    "agentlab_pool_ready",
                    "Idle READY pool sandboxes waiting for a job, per profile",
                ),
                &["profile"],
            )?,
            pool_claims: IntCounterVec::new(
                Opts::new(
                    "agentlab_pool_claims_total",
                    "Jobs of a pooled profile admitted, by whether they took a pool sandbox",
                ),
                &["profile", "result"],
            )?,
            governor: GovernorMetrics::new()?,
            registry,
        };
        metrics
            .registry
            .register(Box::new(metrics.sandboxes_total.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.jobs_total.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.provisioning_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.api_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.lease_gc_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.retention_removed.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.phase_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.phase_transitions.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.actor_restarts.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.sandbox_memory_pss_bytes.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.pool_ready.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.pool_claims.clone()))?;
        metrics.governor.register(&metrics.registry)?;
        for reason in crate::governor::policy::Throttle::ALL {
            metrics
                .governor
                .throttled
                .with_label_values(&[reason.as_str()])
                .set(0);
        }
        Ok(metrics)
    }

    pub fn observe_phase(&self, phase: &str, result: &str, seconds: f64) {
        self.phase_duration
            .with_label_values(&[phase, result])
            .observe(seconds);
        self.phase_transitions
            .with_label_values(&[phase, result])
            .inc();
    }

    /// Takes in the backend's memory measurement.
    pub fn observe_memory(&self, usage: &crate::backend::MemoryUsage) {
        self.sandbox_memory_pss_bytes
            .set(usage.total_pss_bytes() as f64);
    }

    /// Refreshes the store-backed gauges and renders the text exposition. Blocking (store).
    pub fn render(&self, store: &Store) -> Result<String, MetricsError> {
        for (status, count) in store.count_jobs_by_status()? {
            self.jobs_total
                .with_label_values(&[status.as_str()])
                .set(count as f64);
        }
        for (state, count) in store.count_sandboxes_by_state()? {
            self.sandboxes_total
                .with_label_values(&[state.as_str()])
                .set(count as f64);
        }
        self.governor
            .queue_length
            .set(i64::try_from(store.queue_length()?).unwrap_or(i64::MAX));
        // Profiles whose pool emptied or went away drop out rather than linger at a stale count.
        self.pool_ready.reset();
        for (profile, count) in store.count_pool_ready()? {
            self.pool_ready
                .with_label_values(&[profile.as_str()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_the_documented_names() {
        let metrics = Metrics::new().unwrap();
        metrics.observe_phase("clone", "ok", 0.5);
        metrics.provisioning_duration.observe(3.0);
        metrics.observe_memory(&crate::backend::MemoryUsage {
            by_vm: [("a", 300u64 << 20), ("b", 200 << 20)]
                .into_iter()
                .map(|(vm, pss_bytes)| {
                    let memory = crate::backend::VmMemory {
                        pss_bytes,
                        rss_bytes: pss_bytes * 3,
                    };
                    (vm.to_owned(), memory)
                })
                .collect(),
        });
        metrics.lease_gc_duration.observe(0.001);
        metrics
            .api_duration
            .with_label_values(&["GET", "/health", "200"])
            .observe(0.001);
        let text = metrics.render(&Store::open_in_memory().unwrap()).unwrap();
        for name in [
            "agentlab_sandboxes_total{state=\"RUNNING\"} 0",
            "agentlab_jobs_total{status=\"QUEUED\"} 0",
            "agentlab_provisioning_duration_seconds_bucket",
            "agentlab_api_duration_seconds_bucket",
            "agentlab_lease_gc_duration_seconds_bucket",
            "agentlab_phase_duration_seconds_bucket{phase=\"clone\",result=\"ok\"",
            "agentlab_governor_admitted_total 0",
            "agentlab_sandbox_memory_pss_bytes 524288000",
            "agentlab_governor_queue_length 0",
            "agentlab_governor_throttled{reason=\"boot_cap\"} 0",
            "agentlab_governor_throttled{reason=\"cpu\"} 0",
            "agentlab_governor_throttled{reason=\"disk\"} 0",
            "agentlab_governor_throttled{reason=\"io\"} 0",
            "agentlab_governor_throttled{reason=\"memory\"} 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }

    #[test]
    fn the_pool_shows_in_the_sandbox_states_and_its_own_gauges_and_counters() {
        use crate::model::{PoolSandbox, StartMethod};
        let store = Store::open_in_memory().unwrap();
        let pooled = |id: &str| PoolSandbox::booting(id.into(), "balanced", "qemu", (1, 512, 4), 1);
        store
            .insert_pool_sandboxes(&[pooled("p1"), pooled("p2")])
            .unwrap();
        assert!(store
            .set_pool_ready("p1", StartMethod::Cold, None, 2)
            .unwrap());
        let metrics = Metrics::new().unwrap();
        metrics
            .pool_claims
            .with_label_values(&["balanced", "hit"])
            .inc();
        let text = metrics.render(&store).unwrap();
        for line in [
            "agentlab_sandboxes_total{state=\"READY\"} 1",
            "agentlab_sandboxes_total{state=\"BOOTING\"} 1",
            "agentlab_pool_ready{profile=\"balanced\"} 1",
            "agentlab_pool_claims_total{profile=\"balanced\",result=\"hit\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        store.remove_pool_sandbox("p1").unwrap();
        let text = metrics.render(&store).unwrap();
        assert!(!text.contains("agentlab_pool_ready{"), "{text}");
    }
}

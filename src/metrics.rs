//! Prometheus metrics, with the performance document's names. Gauges of jobs and sandboxes are
//! read from the store at scrape time, so they are right after a restart too.

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec,
    Opts, Registry, TextEncoder,
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
    pub phase_duration: HistogramVec,
    pub phase_transitions: IntCounterVec,
    pub actor_restarts: IntCounterVec,
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
            .register(Box::new(metrics.phase_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.phase_transitions.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.actor_restarts.clone()))?;
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
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}

//! Control-plane benchmark on the fake backend with zero latency. Prints a table of percentiles:
//! store inserts, submit → clone call, listing 1000 sandboxes, API latency under load on the
//! socket, and the daemon's RSS idle and with 1000 live sandboxes.
//!
//! Run: `cargo bench --bench control_plane` (add `-- --quick` for fewer iterations).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentlab::backend::fake::FakeBackend;
use agentlab::config::Config;
use agentlab::daemon::BuiltBackend;
use agentlab::model::{new_id, now_ms, sandbox_name_for, JobRequest, Sandbox, SandboxState};
use agentlab::store::{NewJob, Store};
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

struct Samples(Vec<Duration>);

impl Samples {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort();
        let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[at]
    }
}

fn row(name: &str, samples: &Samples) {
    println!(
        "| {name} | {} | {:.3} ms | {:.3} ms |",
        samples.0.len(),
        samples.percentile(0.5).as_secs_f64() * 1e3,
        samples.percentile(0.99).as_secs_f64() * 1e3
    );
}

fn request() -> JobRequest {
    JobRequest {
        profile: "balanced".into(),
        task: "bench".into(),
        ..JobRequest::default()
    }
}

fn sandbox(job_id: &str) -> Sandbox {
    let now = now_ms();
    Sandbox {
        id: sandbox_name_for(job_id),
        job_id: job_id.to_owned(),
        backend: "fake".into(),
        vm_ref: None,
        state: SandboxState::Provisioning,
        phase: None,
        profile: "balanced".into(),
        cores: 4,
        memory_mb: 6144,
        disk_gb: 30,
        keepalive: false,
        lease_expires_at_ms: now + 3_600_000,
        created_at_ms: now,
        updated_at_ms: now,
        destroyed_at_ms: None,
        error: None,
        start_method: None,
        snapshot_id: None,
        from_pool: false,
    }
}

fn bench_store(dir: &Path, n: usize) {
    let store = Store::open(&dir.join("bench.db")).unwrap();
    let mut job_inserts = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let new = NewJob {
            id: new_id(),
            request: request(),
            deadline_ms: None,
        };
        let started = Instant::now();
        store.insert_job(&new, u64::MAX).unwrap();
        job_inserts.push(started.elapsed());
        ids.push(new.id);
    }
    let mut sandbox_inserts = Vec::with_capacity(n);
    for id in &ids {
        let row = sandbox(id);
        let started = Instant::now();
        store.insert_sandbox(&row).unwrap();
        sandbox_inserts.push(started.elapsed());
    }
    let mut lists = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let all = store.list_sandboxes(None).unwrap();
        lists.push(started.elapsed());
        assert_eq!(all.len(), n);
    }
    row("store: job insert (WAL, file)", &Samples(job_inserts));
    row(
        "store: sandbox-row insert (WAL, file)",
        &Samples(sandbox_inserts),
    );
    row(&format!("store: list {n} sandboxes"), &Samples(lists));
}

fn daemon_config(dir: &Path, extra_tuning: &str) -> std::path::PathBuf {
    let tuning = dir.join("tuning");
    std::fs::create_dir_all(&tuning).unwrap();
    std::fs::write(
        tuning.join("default.yaml"),
        // The fake makes no VMs, and this measures the control plane with many of them alive,
        // which the governor's budget would rightly refuse on a real host.
        format!(
            "admission: {{max_concurrent: 2000, queue_max: 100000}}\ngovernor: off\n{extra_tuning}"
        ),
    )
    .unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: {d}/data\nsocket_path: {d}/agentlabd.sock\nmetrics_listen: \"\"\nguest_listen: 127.0.0.1:0\n\
             profiles_dir: {REPO}/profiles\ntuning_dir: {d}/tuning\nbackend: fake\n",
            d = dir.display()
        ),
    )
    .unwrap();
    config
}

fn client(socket: &Path) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .unix_socket(socket.to_owned())
        .build()
        .unwrap()
}

fn submit(client: &reqwest::blocking::Client) -> String {
    let answer: Value = client
        .post("http://agentlabd/v1/jobs")
        .json(&json!({"profile": "balanced", "task": "bench"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    answer["id"].as_str().unwrap().to_owned()
}

/// Starts the daemon inside this process (its own actix system on a thread).
fn start_in_process(config_path: &Path) -> Arc<FakeBackend> {
    let config = Config::load(config_path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let started = agentlab::daemon::start(config).await.unwrap();
            let BuiltBackend::Fake(fake) = started.backend.clone() else {
                panic!("not the fake backend")
            };
            tx.send(fake).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

fn bench_daemon(dir: &Path, jobs: usize, load_requests: usize) {
    let config = daemon_config(dir, "");
    let fake = start_in_process(&config);
    let socket = dir.join("agentlabd.sock");
    let http = client(&socket);
    let mut to_clone = Vec::with_capacity(jobs);
    let mut ids = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let started = Instant::now();
        let id = submit(&http);
        let name = sandbox_name_for(&id);
        let cloned = loop {
            if let Some(at) = fake.clone_called_at(&name) {
                break at;
            }
            std::thread::sleep(Duration::from_micros(20));
        };
        to_clone.push(cloned.duration_since(started));
        // Measure each submission on an idle daemon: let this job end before the next one.
        while !fake.vm_names().is_empty() {
            std::thread::sleep(Duration::from_micros(50));
        }
        ids.push(id);
    }
    row(
        "POST /v1/jobs → clone call (fake, zero latency)",
        &Samples(to_clone),
    );
    eprintln!("bench: {jobs} jobs submitted; measuring list and load");
    // Let every job finish so the sandbox list is complete.
    std::thread::sleep(Duration::from_millis(500));
    let mut lists = Vec::new();
    let mut body = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        body = http
            .get("http://agentlabd/v1/sandboxes")
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .to_vec();
        lists.push(started.elapsed());
    }
    let listed: Value = serde_json::from_slice(&body).unwrap();
    assert!(listed["sandboxes"].as_array().unwrap().len() >= jobs);
    row(
        &format!("GET /v1/sandboxes with {jobs} sandboxes"),
        &Samples(lists),
    );

    let threads = 4;
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let socket = socket.clone();
            let ids = ids.clone();
            std::thread::spawn(move || {
                let http = client(&socket);
                let mut samples = Vec::with_capacity(load_requests);
                for i in 0..load_requests {
                    let id = &ids[(i * threads + t) % ids.len()];
                    let one = Instant::now();
                    let response = http
                        .get(format!("http://agentlabd/v1/jobs/{id}"))
                        .send()
                        .unwrap();
                    assert!(response.status().is_success());
                    let _ = response.bytes().unwrap();
                    samples.push(one.elapsed());
                }
                samples
            })
        })
        .collect();
    let samples: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let rate = samples.len() as f64 / started.elapsed().as_secs_f64();
    row(
        &format!("GET /v1/jobs/{{id}} under load ({threads} clients, {rate:.0} req/s)"),
        &Samples(samples),
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn bench_rss(dir: &Path, live: usize) {
    let config = daemon_config(dir, "");
    let text = std::fs::read_to_string(&config).unwrap()
        + "fake:\n  latency:\n    run: {min_ms: 3600000, max_ms: 3600000}\n";
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentlabd"))
        .arg("--config")
        .arg(&config)
        .env("AGENTLAB_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = client(&dir.join("agentlabd.sock"));
    while http.get("http://agentlabd/health").send().is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(child.id());
    for _ in 0..live {
        submit(&http);
    }
    loop {
        let status: Value = http
            .get("http://agentlabd/v1/status")
            .send()
            .unwrap()
            .json()
            .unwrap();
        if status["sandboxes"]["RUNNING"].as_u64() == Some(live as u64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let loaded = rss_kib(child.id());
    println!(
        "| agentlabd RSS, idle | | {:.1} MiB | |",
        idle as f64 / 1024.0
    );
    println!(
        "| agentlabd RSS, {live} live sandboxes (one actor each) | | {:.1} MiB | |",
        loaded as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    // `cargo test --all-targets` runs bench targets too; this one only measures under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("control_plane: measures only under `cargo bench`");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 200 } else { 1000 };
    println!("| measurement | n | p50 | p99 |\n|---|---|---|---|");
    let dir = tempfile::tempdir().unwrap();
    bench_store(dir.path(), n);
    let dir = tempfile::tempdir().unwrap();
    bench_daemon(dir.path(), n, if quick { 500 } else { 2500 });
    let dir = tempfile::tempdir().unwrap();
    bench_rss(dir.path(), n);
}

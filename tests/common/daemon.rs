//! Runs the real `agentlabd` binary against a temporary data dir, and talks to it over its socket.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Daemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    /// Extra environment for the daemon (the pve tests put the qm/pvesh stand-ins on PATH).
    pub envs: Vec<(String, String)>,
    child: Option<Child>,
    client: reqwest::blocking::Client,
}

pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The config line that lets jobs use host repositories under `roots`.
pub fn repo_roots(roots: &[&Path]) -> String {
    let quoted: Vec<String> = roots
        .iter()
        .map(|r| serde_json::to_string(r.to_str().unwrap()).unwrap())
        .collect();
    format!("repo_roots: [{}]\n", quoted.join(", "))
}

/// The shipped default tuning, except for the governor's disk rule (off): the fake backend makes
/// no disks, and the machine running the tests may not have a profile's disk free.
pub fn test_tuning() -> String {
    use agentlab::config::tuning::Tuning;
    let mut tuning = Tuning::load(&repo_dir().join("tuning/default.yaml")).unwrap();
    tuning.governor.budget.disk_min_free_percent = None;
    yaml_serde::to_string(&tuning).unwrap()
}

impl Daemon {
    /// Writes a config for `backend` plus `extra` YAML lines into `dir` and starts the daemon.
    pub fn start(dir: &Path, backend: &str, extra: &str) -> Daemon {
        Daemon::start_with_env(dir, backend, extra, Vec::new())
    }

    /// As `start`, with `envs` added to the daemon's environment.
    pub fn start_with_env(
        dir: &Path,
        backend: &str,
        extra: &str,
        envs: Vec<(String, String)>,
    ) -> Daemon {
        let mut daemon = Daemon::configure(dir, backend, extra, envs);
        daemon.spawn();
        daemon
    }

    /// Writes the config as `start` does and runs the daemon expecting it to stop at start-up:
    /// its exit status and its log (stderr).
    pub fn start_expecting_failure(
        dir: &Path,
        backend: &str,
        extra: &str,
    ) -> (std::process::ExitStatus, String) {
        let daemon = Daemon::configure(dir, backend, extra, Vec::new());
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentlabd"))
            .arg("--config")
            .arg(&daemon.config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline || daemon.try_get("/health").is_some() {
                child.kill().unwrap();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "agentlabd started when it should not have: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Writes the config for `backend` plus `extra` into `dir`; the daemon is not started.
    fn configure(dir: &Path, backend: &str, extra: &str, envs: Vec<(String, String)>) -> Daemon {
        let config = dir.join("config.yaml");
        let socket = dir.join("agentlabd.sock");
        // A test that restarts the daemon under running VMs pins the guest port in `extra`.
        let guest = if extra.contains("guest_listen:") {
            ""
        } else {
            "guest_listen: 127.0.0.1:0\n"
        };
        // The test template has a runner of its own; only the tests about serving one (which
        // name it in `extra`) make the guests fetch the daemon's, a stripped copy.
        let guest = if extra.contains("runner_path:") {
            guest.to_owned()
        } else {
            format!("{guest}runner_path: \"\"\n")
        };
        // The repository's profiles, unless the test brings its own.
        let profiles = if extra.contains("profiles_dir:") {
            String::new()
        } else {
            format!("profiles_dir: {}/profiles\n", repo_dir().display())
        };
        let text = format!(
            "data_dir: {data}\nsocket_path: {socket}\nmetrics_listen: \"\"\n{guest}\
             {profiles}tuning_dir: {tuning}\nbackend: {backend}\n{extra}\n",
            data = dir.join("data").display(),
            socket = socket.display(),
            tuning = dir.join("tuning").display(),
        );
        std::fs::write(&config, text).unwrap();
        let tuning = dir.join("tuning");
        if !tuning.exists() {
            std::fs::create_dir_all(&tuning).unwrap();
            std::fs::write(tuning.join("default.yaml"), test_tuning()).unwrap();
        }
        Daemon {
            dir: dir.to_owned(),
            config,
            socket: socket.clone(),
            envs,
            child: None,
            client: reqwest::blocking::Client::builder()
                .unix_socket(socket)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_agentlabd"))
            .arg("--config")
            .arg(&self.config)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.try_get("/health").is_some() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agentlabd exited at start ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agentlabd did not answer: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agentlabd did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(path: &str) -> String {
        format!("http://agentlabd{path}")
    }

    pub fn try_get(&self, path: &str) -> Option<Value> {
        self.client.get(Self::url(path)).send().ok()?.json().ok()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(Self::url(path)).send().unwrap();
        (
            response.status().as_u16(),
            response.json().unwrap_or(Value::Null),
        )
    }

    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.client.post(Self::url(path)).json(body).send().unwrap();
        (
            response.status().as_u16(),
            response.json().unwrap_or(Value::Null),
        )
    }

    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .client
            .post(Self::url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        (
            response.status().as_u16(),
            response.json().unwrap_or(Value::Null),
        )
    }

    pub fn submit(&self, body: &Value) -> String {
        let (status, answer) = self.post_json("/v1/jobs", body);
        assert_eq!(status, 201, "{answer}");
        answer["id"].as_str().unwrap().to_owned()
    }

    pub fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/jobs/{id}")).1
    }

    /// Polls until the job is terminal or `limit` passes.
    pub fn wait_terminal(&self, id: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job(id);
            let status = job["status"].as_str().unwrap_or("");
            if !["QUEUED", "RUNNING", ""].contains(&status) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still {status}: {job}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The raw body of a GET (an artifact's bytes, say).
    pub fn get_bytes(&self, path: &str) -> Vec<u8> {
        self.client
            .get(Self::url(path))
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .to_vec()
    }

    /// The messages of the job's events of `kind`, in order.
    pub fn event_messages(&self, id: &str, kind: &str) -> Vec<String> {
        let (_, events) = self.get(&format!("/v1/jobs/{id}/events"));
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["message"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The job's log (stdout and stderr) so far.
    pub fn job_log(&self, id: &str) -> String {
        self.client
            .get(Self::url(&format!("/v1/jobs/{id}/logs")))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// Polls until the job's log holds `text` or `limit` passes.
    pub fn wait_log(&self, id: &str, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.job_log(id).contains(text) {
            assert!(
                Instant::now() < deadline,
                "job {id} never logged {text:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_phase(&self, id: &str, phase: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job(id);
            if job["phase"] == phase {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {phase}: {job}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! The in-process fake backend: configurable latency per operation, fault injection (failure rate,
//! fail-N-times, hang, panic), and a simulated guest that phones home, runs and uploads. It serves
//! unit tests and control-plane benchmarks; it is never how a feature is shown to work.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde::{Deserialize, Serialize};

pub use crate::config::fake::{
    FakeConfig, FakeDisk, FakeMemory, FakeOp, FakeProvisioning, Fault, Latency,
};

use crate::runner::identity;

use super::{
    Backend, BackendError, BackendKind, DiskUsage, ExecStatus, GuestCommand, GuestSink, ListedVm,
    MemoryUsage, Provisioning, SandboxSpec, StartReport, VmHandle, VmMemory, VmState,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FakeVm {
    job_id: String,
    running: bool,
    /// The instance id it was cloned with; a test writes another (or none) into the state file
    /// to stand for a VM someone else made.
    #[serde(default)]
    owner: Option<String>,
    #[serde(skip)]
    procs: HashMap<i64, ExecStatus>,
}

#[derive(Debug, Default)]
struct FaultCounters {
    failed: AtomicU32,
    panicked: AtomicU32,
}

#[derive(Debug)]
pub struct FakeBackend {
    config: FakeConfig,
    sink: Arc<dyn GuestSink>,
    vms: Arc<Mutex<BTreeMap<String, FakeVm>>>,
    counters: HashMap<FakeOp, FaultCounters>,
    creations: Mutex<HashMap<String, u32>>,
    calls: Mutex<HashMap<FakeOp, u32>>,
    /// When clone was first called for each name: benchmarks time submit → clone with it.
    clone_called: Mutex<HashMap<String, std::time::Instant>>,
    next_pid: AtomicI64,
    disk: Mutex<Option<FakeDisk>>,
    /// Every command `exec` was given, stdin included, with the VM it was for, in order.
    executed: Mutex<Vec<(String, GuestCommand)>>,
    /// What a simulated `agentlab-runner identity` exits with.
    identity_exit_code: AtomicI32,
    memory: Mutex<Option<FakeMemory>>,
}

const ALL_OPS: [FakeOp; 9] = [
    FakeOp::Clone,
    FakeOp::Start,
    FakeOp::Boot,
    FakeOp::AgentPing,
    FakeOp::Exec,
    FakeOp::ExecStatus,
    FakeOp::Run,
    FakeOp::Upload,
    FakeOp::Destroy,
];

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic injected on purpose must not poison the fake for the restarted actor.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

enum Verdict {
    Proceed,
    Fail,
}

impl FakeBackend {
    pub fn new(config: FakeConfig, sink: Arc<dyn GuestSink>) -> Result<Self, BackendError> {
        let vms = match &config.state_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
                let mut vms: BTreeMap<String, FakeVm> = serde_json::from_str(&text)
                    .map_err(|e| BackendError::InvalidInput(format!("{}: {e}", path.display())))?;
                // Simulated guests do not survive the process that simulated them.
                for vm in vms.values_mut() {
                    vm.procs.clear();
                }
                vms
            }
            _ => BTreeMap::new(),
        };
        Ok(FakeBackend {
            disk: Mutex::new(config.disk),
            memory: Mutex::new(config.memory),
            config,
            sink,
            vms: Arc::new(Mutex::new(vms)),
            counters: ALL_OPS
                .iter()
                .map(|op| (*op, FaultCounters::default()))
                .collect(),
            creations: Mutex::new(HashMap::new()),
            calls: Mutex::new(HashMap::new()),
            clone_called: Mutex::new(HashMap::new()),
            next_pid: AtomicI64::new(1000),
            executed: Mutex::new(Vec::new()),
            identity_exit_code: AtomicI32::new(0),
        })
    }

    /// How many VMs were actually created under this name (not counting idempotent re-clones).
    pub fn creations(&self, name: &str) -> u32 {
        lock(&self.creations).get(name).copied().unwrap_or(0)
    }

    pub fn clone_called_at(&self, name: &str) -> Option<std::time::Instant> {
        lock(&self.clone_called).get(name).copied()
    }

    pub fn calls(&self, op: FakeOp) -> u32 {
        lock(&self.calls).get(&op).copied().unwrap_or(0)
    }

    /// The commands `exec` started in the VM named `name`, stdin included, oldest first.
    pub fn executed(&self, name: &str) -> Vec<GuestCommand> {
        lock(&self.executed)
            .iter()
            .filter(|(vm, _)| vm == name)
            .map(|(_, command)| command.clone())
            .collect()
    }

    /// Makes every later `agentlab-runner identity` exit with `code` (0 until then).
    pub fn set_identity_exit_code(&self, code: i32) {
        self.identity_exit_code.store(code, Ordering::SeqCst);
    }

    /// Changes what `disk_usage` reports from now on.
    pub fn set_disk(&self, disk: Option<FakeDisk>) {
        *lock(&self.disk) = disk;
    }

    /// Changes what `memory_usage` reports for every running VM from now on.
    pub fn set_memory(&self, memory: Option<FakeMemory>) {
        *lock(&self.memory) = memory;
    }

    pub fn vm_names(&self) -> Vec<String> {
        lock(&self.vms).keys().cloned().collect()
    }

    /// Adds a stopped VM behind the daemon's back, carrying `owner` (None: no owner at all), as
    /// one made by hand or by another daemon.
    pub fn insert_vm(&self, name: &str, owner: Option<&str>) {
        lock(&self.vms).insert(
            name.to_owned(),
            FakeVm {
                job_id: String::new(),
                running: false,
                owner: owner.map(str::to_owned),
                procs: HashMap::new(),
            },
        );
    }

    fn latency(&self, op: FakeOp) -> Option<Duration> {
        let latency = self.config.latency.get(&op)?;
        let ms = if latency.max_ms > latency.min_ms {
            rand::rng().random_range(latency.min_ms..=latency.max_ms)
        } else {
            latency.min_ms
        };
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Applies the configured latency and faults for one call of `op`.
    async fn step(&self, op: FakeOp) -> Verdict {
        *lock(&self.calls).entry(op).or_default() += 1;
        if let Some(delay) = self.latency(op) {
            tokio::time::sleep(delay).await;
        }
        let Some(fault) = self.config.faults.get(&op) else {
            return Verdict::Proceed;
        };
        let Some(counters) = self.counters.get(&op) else {
            return Verdict::Proceed;
        };
        if fault.hang {
            std::future::pending::<()>().await;
        }
        let call = counters.panicked.fetch_add(1, Ordering::SeqCst);
        if call < fault.panic_times || call.checked_add(1) == Some(fault.panic_on_call) {
            panic!("fake backend: injected panic in {op:?}");
        }
        if counters.failed.fetch_add(1, Ordering::SeqCst) < fault.fail_times {
            return Verdict::Fail;
        }
        if fault.fail_rate > 0.0 && rand::rng().random_bool(fault.fail_rate.clamp(0.0, 1.0)) {
            return Verdict::Fail;
        }
        Verdict::Proceed
    }

    async fn checked(&self, op: FakeOp, operation: &'static str) -> Result<(), BackendError> {
        match self.step(op).await {
            Verdict::Proceed => Ok(()),
            Verdict::Fail => Err(BackendError::operation(operation, "injected failure")),
        }
    }

    async fn persist(&self) -> Result<(), BackendError> {
        let Some(path) = self.config.state_file.clone() else {
            return Ok(());
        };
        let text = serde_json::to_string(&*lock(&self.vms))
            .map_err(|e| BackendError::InvalidInput(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(|e| BackendError::operation("persist", e.to_string()))?
        .map_err(|e| BackendError::io("writing fake backend state", e))
    }

    fn with_vm<R>(&self, name: &str, f: impl FnOnce(&mut FakeVm) -> R) -> Result<R, BackendError> {
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| BackendError::Missing(name.to_owned()))?;
        Ok(f(vm))
    }

    /// Hands a new VM's provisioning to the test playing its guest.
    async fn publish_provisioning(&self, spec: &SandboxSpec) -> Result<(), BackendError> {
        let (Some(path), Some(seed)) = (self.config.external_guest.clone(), &spec.cloud_init)
        else {
            return Ok(());
        };
        let line = FakeProvisioning {
            name: spec.name.clone(),
            job_id: spec.job_id.clone(),
            guest_url: seed.guest_url.clone(),
            phone_home_url: seed.phone_home_url.clone(),
            bootstrap_token: seed.bootstrap_token.clone(),
        };
        let mut text =
            serde_json::to_string(&line).map_err(|e| BackendError::InvalidInput(e.to_string()))?;
        text.push('\n');
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?
                .write_all(text.as_bytes())
        })
        .await
        .map_err(|e| BackendError::operation("provisioning", e.to_string()))?
        .map_err(|e| BackendError::io("writing the external guest's provisioning", e))
    }

    fn guest_is_external(&self) -> bool {
        self.config.external_guest.is_some()
    }

    /// Simulates the guest booting: after `boot` latency it phones home, unless boot is faulted,
    /// in which case the VM dies (a hang means it never phones home).
    fn simulate_boot(self: &Arc<Self>, name: String, job_id: String) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            match this.step(FakeOp::Boot).await {
                Verdict::Proceed => this.sink.phoned_home(&job_id).await,
                Verdict::Fail => {
                    let _ = this.with_vm(&name, |vm| vm.running = false);
                }
            }
        });
    }

    /// Simulates the runner: the command runs, the runner reports its exit, uploads, reports done
    /// and exits with the command's code. A faulted run or upload kills the runner early.
    fn simulate_runner(self: &Arc<Self>, name: String, job_id: String, pid: i64) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let set = |status: ExecStatus| {
                let _ = this.with_vm(&name, |vm| vm.procs.insert(pid, status));
            };
            if let Verdict::Fail = this.step(FakeOp::Run).await {
                set(ExecStatus::Signalled { signal: 9 });
                return;
            }
            let code = this.config.exit_code;
            this.sink.command_exited(&job_id, code).await;
            if let Verdict::Fail = this.step(FakeOp::Upload).await {
                set(ExecStatus::Exited { code: 70 });
                return;
            }
            this.sink.uploads_done(&job_id).await;
            set(ExecStatus::Exited { code });
        });
    }
}

/// The fake needs `Arc<Self>` to spawn its simulated guest, so the trait is implemented on a thin
/// shared wrapper.
#[derive(Debug, Clone)]
pub struct SharedFake(pub Arc<FakeBackend>);

#[async_trait]
impl Backend for SharedFake {
    fn kind(&self) -> BackendKind {
        BackendKind::Fake
    }

    async fn clone_vm(&self, spec: &SandboxSpec) -> Result<VmHandle, BackendError> {
        let fake = &self.0;
        lock(&fake.clone_called)
            .entry(spec.name.clone())
            .or_insert_with(std::time::Instant::now);
        let handle = VmHandle {
            name: spec.name.clone(),
            vm_ref: format!("fake:{}", spec.name),
        };
        if lock(&fake.vms).contains_key(&spec.name) {
            return Ok(handle);
        }
        fake.checked(FakeOp::Clone, "clone").await?;
        let created = {
            let mut vms = lock(&fake.vms);
            let fresh = !vms.contains_key(&spec.name);
            vms.entry(spec.name.clone()).or_insert_with(|| FakeVm {
                job_id: spec.job_id.clone(),
                running: false,
                owner: Some(spec.owner.clone()),
                procs: HashMap::new(),
            });
            fresh
        };
        if created {
            *lock(&fake.creations).entry(spec.name.clone()).or_default() += 1;
            fake.publish_provisioning(spec).await?;
        }
        fake.persist().await?;
        Ok(handle)
    }

    async fn start_vm(&self, vm: &VmHandle) -> Result<StartReport, BackendError> {
        let fake = &self.0;
        fake.checked(FakeOp::Start, "start").await?;
        let (was_running, job_id) = fake.with_vm(&vm.name, |v| {
            let was = v.running;
            v.running = true;
            (was, v.job_id.clone())
        })?;
        if !was_running && !fake.guest_is_external() {
            fake.simulate_boot(vm.name.clone(), job_id);
        }
        fake.persist().await.map(|()| StartReport::cold())
    }

    async fn agent_ping(&self, vm: &VmHandle) -> Result<(), BackendError> {
        let fake = &self.0;
        if !fake.with_vm(&vm.name, |v| v.running)? {
            return Err(BackendError::AgentUnavailable(format!(
                "{} is not running",
                vm.name
            )));
        }
        match fake.step(FakeOp::AgentPing).await {
            Verdict::Proceed => Ok(()),
            // A hard protocol error, unlike "not up yet", which the lifecycle keeps retrying.
            Verdict::Fail => Err(BackendError::operation("guest agent", "injected failure")),
        }
    }

    async fn exec(&self, vm: &VmHandle, command: &GuestCommand) -> Result<i64, BackendError> {
        let fake = &self.0;
        fake.checked(FakeOp::Exec, "guest exec").await?;
        lock(&fake.executed).push((vm.name.clone(), command.clone()));
        let pid = fake.next_pid.fetch_add(1, Ordering::SeqCst);
        // The identity step is done by the time anyone polls it, and reports nothing to the sink;
        // any other command is taken for the job runner.
        let identity = command.args.first().map(String::as_str) == Some(identity::SUBCOMMAND);
        let status = if identity {
            ExecStatus::Exited {
                code: fake.identity_exit_code.load(Ordering::SeqCst),
            }
        } else {
            ExecStatus::Running
        };
        let job_id = fake.with_vm(&vm.name, |v| {
            v.procs.insert(pid, status);
            v.job_id.clone()
        })?;
        if !identity && !fake.guest_is_external() {
            fake.simulate_runner(vm.name.clone(), job_id, pid);
        }
        Ok(pid)
    }

    /// The guest contract's result.json (with the configured errors); no other file exists.
    async fn read_guest_file(
        &self,
        vm: &VmHandle,
        path: &str,
        _limit: usize,
    ) -> Result<Option<Vec<u8>>, BackendError> {
        let fake = &self.0;
        if !fake.with_vm(&vm.name, |v| v.running)? {
            return Err(BackendError::AgentUnavailable(format!(
                "{} is not running",
                vm.name
            )));
        }
        if path != "/run/cloud-init/result.json" {
            return Ok(None);
        }
        let result = serde_json::json!({"v1": {
            "datasource": "DataSourceNoCloud [seed=fake]",
            "errors": fake.config.cloud_init_errors,
        }});
        Ok(Some(result.to_string().into_bytes()))
    }

    async fn exec_status(&self, vm: &VmHandle, pid: i64) -> Result<ExecStatus, BackendError> {
        let fake = &self.0;
        fake.checked(FakeOp::ExecStatus, "guest exec-status")
            .await?;
        fake.with_vm(&vm.name, |v| v.procs.get(&pid).copied())?
            .ok_or_else(|| {
                BackendError::operation("guest exec-status", format!("no process {pid}"))
            })
    }

    async fn destroy_vm(&self, vm: &VmHandle) -> Result<(), BackendError> {
        let fake = &self.0;
        fake.checked(FakeOp::Destroy, "destroy").await?;
        lock(&fake.vms).remove(&vm.name);
        fake.persist().await
    }

    async fn vm_state(&self, vm: &VmHandle) -> Result<VmState, BackendError> {
        Ok(match lock(&self.0.vms).get(&vm.name) {
            None => VmState::Missing,
            Some(v) if v.running => VmState::Running,
            Some(_) => VmState::Stopped,
        })
    }

    async fn list_vms(&self) -> Result<Vec<ListedVm>, BackendError> {
        Ok(lock(&self.0.vms)
            .iter()
            .map(|(name, vm)| ListedVm {
                vm: VmHandle {
                    name: name.clone(),
                    vm_ref: format!("fake:{name}"),
                },
                owner: vm.owner.clone(),
            })
            .collect())
    }

    async fn disk_usage(&self) -> Result<DiskUsage, BackendError> {
        let Some(disk) = *lock(&self.0.disk) else {
            return Ok(DiskUsage::thick());
        };
        Ok(DiskUsage {
            provisioning: if disk.thin {
                Provisioning::Thin
            } else {
                Provisioning::Thick
            },
            allocated: lock(&self.0.vms)
                .keys()
                .map(|name| (name.clone(), disk.allocated_bytes))
                .collect(),
        })
    }

    async fn memory_usage(&self) -> Result<MemoryUsage, BackendError> {
        let Some(memory) = *lock(&self.0.memory) else {
            return Ok(MemoryUsage::default());
        };
        Ok(MemoryUsage {
            by_vm: lock(&self.0.vms)
                .iter()
                .filter(|(_, vm)| vm.running)
                .map(|(name, _)| {
                    (
                        name.clone(),
                        VmMemory {
                            pss_bytes: memory.pss_bytes,
                            rss_bytes: memory.rss_bytes,
                        },
                    )
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CloudInitSpec, GuestInput, NetworkMode, StartMode};

    /// Counts what the simulated guest reports.
    #[derive(Debug, Default)]
    struct CountingSink {
        exits: Mutex<Vec<(String, i32)>>,
    }

    #[async_trait]
    impl GuestSink for CountingSink {
        async fn phoned_home(&self, _job_id: &str) {}
        async fn command_exited(&self, job_id: &str, exit_code: i32) {
            lock(&self.exits).push((job_id.to_owned(), exit_code));
        }
        async fn uploads_done(&self, _job_id: &str) {}
    }

    fn spec() -> SandboxSpec {
        SandboxSpec {
            job_id: "job-1".into(),
            name: "sandbox-one".into(),
            template: String::new(),
            cores: 1,
            memory_mb: 256,
            disk_gb: 1,
            network: NetworkMode::Restricted,
            cloud_init: Some(CloudInitSpec {
                hostname: "sandbox-one".into(),
                phone_home_url: "http://10.0.2.100/ph".into(),
                guest_url: "http://10.0.2.100".into(),
                bootstrap_token: "boot".into(),
            }),
            runner: None,
            owner: "me".into(),
            start: StartMode::Cold,
            restore_from: None,
        }
    }

    fn command(args: &[&str], stdin: Option<&str>) -> GuestCommand {
        GuestCommand {
            path: "/usr/local/bin/agentlab-runner".into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Default::default(),
            stdin: stdin.map(GuestInput::new),
        }
    }

    async fn settled(backend: &SharedFake, vm: &VmHandle, pid: i64) -> ExecStatus {
        for _ in 0..1000 {
            match backend.exec_status(vm, pid).await.unwrap() {
                ExecStatus::Running => tokio::task::yield_now().await,
                done => return done,
            }
        }
        panic!("process {pid} never finished");
    }

    #[tokio::test]
    async fn exec_records_commands_with_their_stdin_and_identity_exits_on_its_own() {
        let sink = Arc::new(CountingSink::default());
        let fake = Arc::new(FakeBackend::new(FakeConfig::default(), sink.clone()).unwrap());
        let backend = SharedFake(Arc::clone(&fake));
        let vm = backend.clone_vm(&spec()).await.unwrap();
        backend.start_vm(&vm).await.unwrap();

        let identity = command(&["identity"], Some(r#"{"hostname":"sandbox-one"}"#));
        let pid = backend.exec(&vm, &identity).await.unwrap();
        assert_eq!(
            backend.exec_status(&vm, pid).await.unwrap(),
            ExecStatus::Exited { code: 0 }
        );
        fake.set_identity_exit_code(2);
        let pid = backend.exec(&vm, &identity).await.unwrap();
        assert_eq!(
            backend.exec_status(&vm, pid).await.unwrap(),
            ExecStatus::Exited { code: 2 }
        );
        assert!(lock(&sink.exits).is_empty(), "identity is not the job");

        let runner = command(&["--bootstrap", "/etc/agentlab/bootstrap.json"], None);
        let pid = backend.exec(&vm, &runner).await.unwrap();
        assert_eq!(
            settled(&backend, &vm, pid).await,
            ExecStatus::Exited { code: 0 }
        );
        assert_eq!(*lock(&sink.exits), [("job-1".to_owned(), 0)]);

        let executed = fake.executed("sandbox-one");
        assert_eq!(executed, [identity.clone(), identity, runner]);
        assert_eq!(
            executed[0].stdin.as_ref().map(GuestInput::as_bytes),
            Some(&br#"{"hostname":"sandbox-one"}"#[..])
        );
        assert!(fake.executed("sandbox-other").is_empty());
    }
}

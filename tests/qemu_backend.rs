#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The QEMU backend with real VMs, through the `Backend` trait: clone, boot, guest agent, exec,
//! phone-home over the restricted network, destroy, and the idempotency and error cases. The
//! guest template must have been built first (see `template_dir`); the tests fail without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use agentlab::backend::{
    Backend, BackendError, CloudInitSpec, ExecStatus, GuestCommand, GuestInput, ListedVm,
    NetworkMode, RunnerFetch, SandboxSpec, SnapshotStatus, VmHandle, VmState,
};
use agentlab::qemu::qmp::QmpClient;
use agentlab::qemu::{Accel, QemuBackend, QemuConfig, QemuDirs};
use agentlab::runner::identity::{self, BootstrapFile, Entropy, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The daemon instance these backends belong to.
const OWNER: &str = "0199-qemu-tests";

/// How `list_vms` reports a VM this backend made.
fn ours(vm: &VmHandle) -> ListedVm {
    ListedVm {
        vm: vm.clone(),
        owner: Some(OWNER.into()),
    }
}

/// Generous: TCG boots take about 5 s alone, several times that on a busy 2-core host.
const BOOT_LIMIT: Duration = Duration::from_secs(90);

/// The built guest template: `$AGENTLAB_TEST_IMAGES`, else `target/guest-image/images`.
fn template_dir() -> PathBuf {
    let dir = std::env::var_os("AGENTLAB_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest-image/images"));
    let missing: Vec<&str> = ["vmlinuz", "initrd.img", "root.qcow2"]
        .into_iter()
        .filter(|file| !dir.join(file).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "the guest template is missing {missing:?} in {dir}. Build it with\n  \
         AGENTLAB_DATA_DIR=$PWD/target/guest-image scripts/build-guest-image.sh --runner RUNNER\n\
         (RUNNER: target/debug/agentlab-runner, or any placeholder `#!/bin/sh` script), or point \
         AGENTLAB_TEST_IMAGES at a built images folder.",
        dir = dir.display()
    );
    dir
}

/// A scratch folder under `target/`, short enough for unix socket paths and on the same
/// filesystem as the template.
fn scratch() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/qemu-tests");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("t")
        .tempdir_in(base)
        .unwrap()
}

fn config() -> QemuConfig {
    QemuConfig {
        // The KVM probe hangs on some nested hosts; it has a test of its own.
        accel: Accel::Tcg,
        memory_mb_cap: Some(256),
        ..QemuConfig::default()
    }
}

fn backend(root: &Path, images: &Path, endpoint: std::net::SocketAddr) -> QemuBackend {
    let dirs = QemuDirs {
        images: images.to_owned(),
        sandboxes: root.join("sandboxes"),
        snapshots: root.join("snapshots"),
    };
    QemuBackend::new(config(), dirs, endpoint)
        .unwrap()
        .with_instance(OWNER)
}

fn spec(name: &str, job_id: &str) -> SandboxSpec {
    SandboxSpec {
        job_id: job_id.into(),
        name: name.into(),
        template: String::new(),
        cores: 1,
        memory_mb: 1024,
        disk_gb: 2,
        network: NetworkMode::Restricted,
        cloud_init: Some(CloudInitSpec {
            hostname: name.into(),
            phone_home_url: format!("http://10.0.2.100/guest/v1/phone-home/ph-{job_id}"),
            guest_url: "http://10.0.2.100".into(),
            bootstrap_token: format!("boot-{job_id}"),
        }),
        runner: None,
        owner: OWNER.into(),
        start: agentlab::model::StartMode::Cold,
        restore_from: None,
    }
}

/// Pids of live processes whose command line names a file in `dir`.
fn processes_naming(dir: &Path) -> Vec<u32> {
    let marker = format!("{}/", dir.display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `agent_ping` until the guest agent answers; returns how long that took.
async fn wait_for_agent(backend: &QemuBackend, vm: &VmHandle) -> Duration {
    let started = Instant::now();
    loop {
        match backend.agent_ping(vm).await {
            Ok(()) => return started.elapsed(),
            Err(BackendError::AgentUnavailable(_)) => {}
            Err(e) => panic!("agent_ping failed: {e}"),
        }
        assert!(
            started.elapsed() < BOOT_LIMIT,
            "guest agent not up after {BOOT_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `script` with the guest's `/bin/sh` and waits for it to finish.
async fn run_in_guest(backend: &QemuBackend, vm: &VmHandle, script: &str) -> ExecStatus {
    let command = GuestCommand {
        path: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: Default::default(),
        stdin: None,
    };
    let pid = backend.exec(vm, &command).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match backend.exec_status(vm, pid).await.unwrap() {
            ExecStatus::Running => {
                assert!(Instant::now() < deadline, "`{script}` still running");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done => return done,
        }
    }
}

/// Restricted networking: the host's loopback (10.0.2.2 in user-mode networking) is out of the
/// guest's reach, even the port the guest endpoint listens on.
async fn assert_host_out_of_reach(
    backend: &QemuBackend,
    vm: &VmHandle,
    endpoint: std::net::SocketAddr,
    requests: &mut mpsc::UnboundedReceiver<String>,
) {
    let escape = format!(
        "timeout 10 wget -q -O /dev/null http://10.0.2.2:{}/escape",
        endpoint.port()
    );
    let status = run_in_guest(backend, vm, &escape).await;
    assert_ne!(status, ExecStatus::Exited { code: 0 });
    assert!(requests.try_recv().is_err(), "the guest reached the host");
}

/// A stand-in for the daemon's guest endpoint: answers every request with 200 and reports each
/// request's head and body.
async fn guest_endpoint() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = tx.send(String::from_utf8_lossy(&request).to_string());
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_runs_a_command_phones_home_and_leaves_nothing() {
    let images = template_dir();
    let root = scratch();
    let (endpoint, mut requests) = guest_endpoint().await;
    let backend = backend(root.path(), &images, endpoint);
    let spec = spec("sandbox-full01", "job-full01");

    let started = Instant::now();
    let vm = backend.clone_vm(&spec).await.unwrap();
    let clone_time = started.elapsed();
    let dir = PathBuf::from(&vm.vm_ref);
    assert_eq!(dir, root.path().join("sandboxes/sandbox-full01"));
    assert_eq!(backend.vm_state(&vm).await.unwrap(), VmState::Stopped);
    assert_eq!(backend.list_vms().await.unwrap(), [ours(&vm)]);

    let started = Instant::now();
    backend.start_vm(&vm).await.unwrap();
    wait_for_agent(&backend, &vm).await;
    let agent_time = started.elapsed();
    assert_eq!(backend.vm_state(&vm).await.unwrap(), VmState::Running);

    // Starting a running VM is a no-op, not a second QEMU.
    backend.start_vm(&vm).await.unwrap();
    assert_eq!(processes_naming(&dir).len(), 1, "exactly one qemu");

    let command = GuestCommand {
        path: "/bin/sh".into(),
        args: vec!["-c".into(), "echo hi; exit 3".into()],
        env: Default::default(),
        stdin: None,
    };
    let pid = backend.exec(&vm, &command).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match backend.exec_status(&vm, pid).await.unwrap() {
            ExecStatus::Running => {
                assert!(Instant::now() < deadline, "command still running");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done => break done,
        }
    };
    assert_eq!(status, ExecStatus::Exited { code: 3 });
    // An environment of our own replaces the agent's; PATH is still there for `wget`.
    let with_env = GuestCommand {
        path: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "test \"$GREETING\" = hello && command -v wget".into(),
        ],
        env: [("GREETING".to_owned(), "hello".to_owned())].into(),
        stdin: None,
    };
    let env_pid = backend.exec(&vm, &with_env).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend.exec_status(&vm, env_pid).await.unwrap() == ExecStatus::Running {
        assert!(Instant::now() < deadline, "env command still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        backend.exec_status(&vm, env_pid).await.unwrap(),
        ExecStatus::Exited { code: 0 }
    );
    // The agent forgets a reaped command; the backend remembers for a restarted caller.
    assert_eq!(
        backend.exec_status(&vm, pid).await.unwrap(),
        ExecStatus::Exited { code: 3 }
    );

    // Phone-home went through guestfwd and socat to our endpoint, with cloud-init's form body.
    let request = tokio::time::timeout(BOOT_LIMIT, requests.recv())
        .await
        .expect("no phone-home within the boot limit")
        .unwrap();
    assert!(
        request.starts_with("POST /guest/v1/phone-home/ph-job-full01 "),
        "{request}"
    );
    assert!(request.contains("instance_id=sandbox-full01"), "{request}");
    assert!(request.contains("hostname=sandbox-full01"), "{request}");

    // write_files ran before phone_home: the runner's bootstrap file is there, private.
    let status = run_in_guest(
        &backend,
        &vm,
        "test \"$(stat -c %a /etc/agentlab/bootstrap.json)\" = 600 && \
         grep -q '\"token\":\"boot-job-full01\"' /etc/agentlab/bootstrap.json",
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 });

    // guestfwd's cmd: form serves one connection after another, not just the first.
    let status = run_in_guest(
        &backend,
        &vm,
        "for i in 1 2 3; do wget -q -O /dev/null http://10.0.2.100/seq/$i || exit 1; done",
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 });
    for i in 1..=3 {
        let request = tokio::time::timeout(Duration::from_secs(10), requests.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(request.starts_with(&format!("GET /seq/{i} ")), "{request}");
    }
    assert_host_out_of_reach(&backend, &vm, endpoint, &mut requests).await;

    let started = Instant::now();
    backend.destroy_vm(&vm).await.unwrap();
    let destroy_time = started.elapsed();
    assert!(processes_naming(&dir).is_empty(), "a qemu survived destroy");
    assert!(!dir.exists());
    assert_eq!(backend.vm_state(&vm).await.unwrap(), VmState::Missing);
    assert!(backend.list_vms().await.unwrap().is_empty());
    backend.destroy_vm(&vm).await.unwrap();

    eprintln!(
        "timings: clone {clone_time:?}, start to agent ready {agent_time:?}, destroy {destroy_time:?}"
    );
}

/// Starts `agentlab-runner identity` with `document` on its stdin and waits for its exit.
async fn apply_identity(backend: &QemuBackend, vm: &VmHandle, document: &[u8]) -> ExecStatus {
    let command = GuestCommand {
        path: "/usr/local/bin/agentlab-runner".into(),
        args: vec![identity::SUBCOMMAND.into()],
        env: Default::default(),
        stdin: Some(GuestInput::new(document)),
    };
    let pid = backend.exec(vm, &command).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match backend.exec_status(vm, pid).await.unwrap() {
            ExecStatus::Running => {
                assert!(Instant::now() < deadline, "identity still running");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done => return done,
        }
    }
}

fn unix_now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_step_renames_the_guest_sets_its_clock_and_writes_its_bootstrap_file() {
    let images = template_dir();
    let root = scratch();
    let backend = backend(root.path(), &images, "127.0.0.1:9".parse().unwrap());
    let vm = backend
        .clone_vm(&spec("sandbox-ident1", "job-ident1"))
        .await
        .unwrap();
    backend.start_vm(&vm).await.unwrap();
    wait_for_agent(&backend, &vm).await;

    let hour_ahead_ms = unix_now_ms() + 3_600_000;
    let document = |hostname: &str, unix_time_ms: i64, token: &str| {
        serde_json::to_vec(&Identity {
            hostname: hostname.into(),
            unix_time_ms,
            entropy: Entropy::random(64),
            bootstrap_path: "/etc/agentlab/bootstrap.json".into(),
            bootstrap: BootstrapFile {
                url: "http://10.0.2.100".into(),
                token: token.into(),
            },
        })
        .unwrap()
    };
    let status = apply_identity(
        &backend,
        &vm,
        &document("sandbox-renamed", hour_ahead_ms, "identity-token-1"),
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 });

    let status = run_in_guest(&backend, &vm, "test \"$(hostname)\" = sandbox-renamed").await;
    assert_eq!(status, ExecStatus::Exited { code: 0 }, "hostname");
    // cloud-init's file (the cold boot's token) is replaced, and still private.
    let status = run_in_guest(
        &backend,
        &vm,
        "test \"$(stat -c %a /etc/agentlab/bootstrap.json)\" = 600 && \
         grep -q '\"token\":\"identity-token-1\"' /etc/agentlab/bootstrap.json && \
         ! grep -q boot-job-ident1 /etc/agentlab/bootstrap.json",
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 }, "bootstrap file");
    // The guest's clock runs on from the time given, an hour ahead of the host's; the slack
    // above covers the exec round trips of a busy TCG guest.
    let hour_ahead = hour_ahead_ms / 1000;
    let status = run_in_guest(
        &backend,
        &vm,
        &format!(
            "now=$(date +%s); test \"$now\" -ge {} && test \"$now\" -le {}",
            hour_ahead - 2,
            hour_ahead + 120
        ),
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 }, "clock");

    // A document it refuses changes nothing and exits 2.
    let status = apply_identity(&backend, &vm, b"{\"hostname\": \"Bad_Name\"}").await;
    assert_eq!(status, ExecStatus::Exited { code: 2 });

    // And back to the host's time, with a second identity over the first.
    let now_ms = unix_now_ms();
    let status = apply_identity(
        &backend,
        &vm,
        &document("sandbox-ident1", now_ms, "identity-token-2"),
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 });
    let status = run_in_guest(
        &backend,
        &vm,
        &format!(
            "now=$(date +%s); test \"$now\" -ge {} && test \"$now\" -le {} && \
             test \"$(hostname)\" = sandbox-ident1 && \
             grep -q identity-token-2 /etc/agentlab/bootstrap.json",
            now_ms / 1000 - 2,
            now_ms / 1000 + 120
        ),
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 }, "set back");

    backend.destroy_vm(&vm).await.unwrap();
    assert!(processes_naming(Path::new(&vm.vm_ref)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_vm_reaches_the_host_and_outlives_its_backend() {
    let images = template_dir();
    let root = scratch();
    let (endpoint, mut requests) = guest_endpoint().await;
    let backend = backend(root.path(), &images, endpoint);
    let mut spec = spec("sandbox-egress", "job-egress");
    spec.network = NetworkMode::Egress;
    let vm = backend.clone_vm(&spec).await.unwrap();
    backend.start_vm(&vm).await.unwrap();
    wait_for_agent(&backend, &vm).await;
    let status = run_in_guest(
        &backend,
        &vm,
        &format!(
            "timeout 20 wget -q -O /dev/null http://10.0.2.2:{}/outside",
            endpoint.port()
        ),
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 });
    let mut seen = Vec::new();
    while let Ok(request) = requests.try_recv() {
        seen.push(request);
    }
    assert!(
        seen.iter().any(|r| r.starts_with("GET /outside ")),
        "{seen:?}"
    );

    // A restarted daemon (a new backend on the same folders) finds the VM still running and can
    // drive and destroy it.
    drop(backend);
    let restarted = self::backend(root.path(), &images, endpoint);
    assert_eq!(restarted.list_vms().await.unwrap(), [ours(&vm)]);
    assert_eq!(restarted.vm_state(&vm).await.unwrap(), VmState::Running);
    restarted.agent_ping(&vm).await.unwrap();
    restarted.start_vm(&vm).await.unwrap();
    assert_eq!(processes_naming(Path::new(&vm.vm_ref)).len(), 1);
    restarted.destroy_vm(&vm).await.unwrap();
    assert!(processes_naming(Path::new(&vm.vm_ref)).is_empty());
    assert!(restarted.list_vms().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_while_booting_leaves_nothing() {
    let images = template_dir();
    let root = scratch();
    let backend = backend(root.path(), &images, "127.0.0.1:9".parse().unwrap());
    let vm = backend
        .clone_vm(&spec("sandbox-boot01", "job-boot01"))
        .await
        .unwrap();
    let dir = PathBuf::from(&vm.vm_ref);
    backend.start_vm(&vm).await.unwrap();
    assert!(matches!(
        backend.agent_ping(&vm).await,
        Err(BackendError::AgentUnavailable(_))
    ));
    backend.destroy_vm(&vm).await.unwrap();
    assert!(processes_naming(&dir).is_empty(), "a qemu survived destroy");
    assert!(!dir.exists());
    assert_eq!(backend.vm_state(&vm).await.unwrap(), VmState::Missing);
}

#[tokio::test]
async fn clone_is_idempotent_and_redoes_an_interrupted_clone() {
    let images = template_dir();
    let root = scratch();
    let backend = backend(root.path(), &images, "127.0.0.1:9".parse().unwrap());
    let spec = spec("sandbox-twice1", "job-twice1");

    let first = backend.clone_vm(&spec).await.unwrap();
    let overlay = Path::new(&first.vm_ref).join("overlay.qcow2");
    let created = std::fs::metadata(&overlay).unwrap().modified().unwrap();
    let second = backend.clone_vm(&spec).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(
        std::fs::metadata(&overlay).unwrap().modified().unwrap(),
        created,
        "the second clone must not recreate the overlay"
    );
    let sandboxes: Vec<_> = std::fs::read_dir(root.path().join("sandboxes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sandbox-"))
        .collect();
    assert_eq!(sandboxes.len(), 1);

    // The overlay is a linked clone of the template's resolved root disk.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let backing = info["full-backing-filename"].as_str().unwrap();
    assert_eq!(
        Path::new(backing),
        images.join("root.qcow2").canonicalize().unwrap()
    );

    // Another job under the same name is refused, not handed this job's VM.
    let other = self::spec("sandbox-twice1", "job-other");
    assert!(matches!(
        backend.clone_vm(&other).await,
        Err(BackendError::InvalidInput(_))
    ));

    // A clone cut short (no completion marker) is redone from scratch.
    std::fs::remove_file(Path::new(&first.vm_ref).join("complete")).unwrap();
    std::fs::remove_file(&overlay).unwrap();
    let third = backend.clone_vm(&spec).await.unwrap();
    assert_eq!(third, first);
    assert!(overlay.exists());

    backend.destroy_vm(&first).await.unwrap();
    assert!(!Path::new(&first.vm_ref).exists());
}

#[tokio::test]
async fn a_missing_template_is_a_clear_error() {
    let images = template_dir();
    let root = scratch();
    let backend = backend(root.path(), &images, "127.0.0.1:9".parse().unwrap());
    let mut missing = spec("sandbox-notpl1", "job-notpl1");
    missing.template = "no-such-template".into();
    let err = backend.clone_vm(&missing).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, BackendError::InvalidInput(_)), "{message}");
    assert!(message.contains("no-such-template"), "{message}");
    assert!(message.contains("build-guest-image.sh"), "{message}");
    assert!(backend.list_vms().await.unwrap().is_empty());

    // A template deleted between clone and start: start says which file is gone.
    let own_images = root.path().join("images");
    std::fs::create_dir(&own_images).unwrap();
    for file in ["vmlinuz", "initrd.img", "root.qcow2"] {
        let source = images.join(file).canonicalize().unwrap();
        if std::fs::hard_link(&source, own_images.join(file)).is_err() {
            std::fs::copy(&source, own_images.join(file)).unwrap();
        }
    }
    let backend = self::backend(root.path(), &own_images, "127.0.0.1:9".parse().unwrap());
    let vm = backend
        .clone_vm(&spec("sandbox-notpl2", "job-notpl2"))
        .await
        .unwrap();
    std::fs::remove_file(own_images.join("vmlinuz")).unwrap();
    let err = backend.start_vm(&vm).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("vmlinuz"), "{message}");
    assert!(message.contains("is gone"), "{message}");
    assert!(processes_naming(Path::new(&vm.vm_ref)).is_empty());
    backend.destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn kvm_probe_answers_within_its_timeout_and_leaves_no_qemu() {
    use agentlab::qemu::accel::ProbeBoot;
    let images = template_dir();
    let root = scratch();
    let scratch_dir = root.path().join("probe");
    let kernel = images.join("vmlinuz");
    for probe in [ProbeBoot::Kernel(&kernel), ProbeBoot::Firmware] {
        let started = Instant::now();
        let verdict = agentlab::qemu::accel::probe_kvm(
            Path::new("qemu-system-x86_64"),
            probe,
            &scratch_dir,
            Duration::from_secs(3),
        )
        .await;
        eprintln!(
            "KVM probe {probe:?}: {verdict:?} after {:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        // Killed on timeout, and reaped: nothing names the scratch folder any more.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(processes_naming(&scratch_dir).is_empty(), "{probe:?}");
    }
}

/// Sandbox folders on disk, no VM booted: the reconciler of a restarted daemon destroys the one
/// it made and the store forgot, and leaves alone a folder made by hand and one whose
/// `sandbox.json` names another daemon, both reported as foreign.
#[tokio::test]
async fn a_reconcile_leaves_sandbox_folders_it_did_not_make() {
    use agentlab::actors::{reconciler, Clock, Hub, LiveConfig, Services};
    use agentlab::config::profile::Profiles;
    use agentlab::config::tuning::{Tuning, TuningHandle};
    use agentlab::config::Config;
    use agentlab::instance::{ForeignVm, Instance, InstanceId};
    use agentlab::metrics::Metrics;
    use agentlab::store::Store;
    use std::sync::Arc;

    let root = scratch();
    let images = root.path().join("images");
    let sandboxes = root.path().join("sandboxes");
    let backend = backend(root.path(), &images, "127.0.0.1:8848".parse().unwrap());
    // What a clone of ours writes first, and one by another daemon sharing the folder.
    let record = |owner: &str| {
        serde_json::json!({
            "name": "x", "job_id": "j", "created_ms": 0,
            "template": {"kernel": "/i/k", "initrd": "/i/i", "root_disk": "/i/r", "kernel_cmdline": ""},
            "cores": 1, "memory_mb": 256, "disk_gb": 1, "network": "restricted", "owner": owner
        })
        .to_string()
    };
    for (name, owner) in [
        ("sandbox-orphan0000", Some(OWNER)),
        ("sandbox-theirs0000", Some("0199-another")),
        ("sandbox-byhand0000", None),
    ] {
        let dir = sandboxes.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("overlay.qcow2"), b"disk").unwrap();
        if let Some(owner) = owner {
            std::fs::write(dir.join("sandbox.json"), record(owner)).unwrap();
        }
    }
    let svc = Services {
        config: Arc::new(Config::default()),
        store: Store::open_in_memory().unwrap(),
        backend: Arc::new(backend),
        tuning: TuningHandle::new(Tuning::default()),
        profiles: std::sync::RwLock::new(Arc::new(Profiles::default())),
        hub: Arc::new(Hub::default()),
        metrics: Metrics::new().unwrap(),
        guest_url: "http://10.0.2.100".into(),
        clock: Clock::new(),
        instance: Instance::new(InstanceId::parse(OWNER).unwrap()),
        live: LiveConfig::new(&Config::default()),
        pool: Default::default(),
        runner: None,
    };
    let report = reconciler::reconcile(&svc, &Default::default())
        .await
        .unwrap();
    assert_eq!(report.destroyed_orphans, ["sandbox-orphan0000"]);
    let folder = |name: &str| sandboxes.join(name).display().to_string();
    assert_eq!(
        report.foreign,
        [
            ForeignVm {
                name: "sandbox-byhand0000".into(),
                vm_ref: folder("sandbox-byhand0000"),
                owner: None,
            },
            ForeignVm {
                name: "sandbox-theirs0000".into(),
                vm_ref: folder("sandbox-theirs0000"),
                owner: Some("0199-another".into()),
            },
        ]
    );
    assert!(!sandboxes.join("sandbox-orphan0000").exists());
    for name in ["sandbox-theirs0000", "sandbox-byhand0000"] {
        assert!(
            sandboxes.join(name).join("overlay.qcow2").exists(),
            "{name}"
        );
    }
    // The next pass finds the same and destroys nothing more.
    let again = reconciler::reconcile(&svc, &Default::default())
        .await
        .unwrap();
    assert!(again.destroyed_orphans.is_empty());
    assert_eq!(again.foreign, report.foreign);
}

/// A spec that restores from the snapshot of its shape, making it first if need be.
async fn restoring_spec(backend: &QemuBackend, name: &str, job_id: &str) -> (SandboxSpec, String) {
    let mut spec = spec(name, job_id);
    spec.start = agentlab::model::StartMode::Auto;
    let id = match backend.snapshot_status(&spec).await.unwrap() {
        SnapshotStatus::Ready(info) => info.id,
        SnapshotStatus::Missing { .. } => backend.make_snapshot(&spec).await.unwrap().id,
    };
    spec.restore_from = Some(id.clone());
    (spec, id)
}

/// A pool sandbox's spec as the daemon sends it: no job, no cloud-init identity, and a runner
/// fetch with a token of its own.
fn pool_spec(name: &str, runner: RunnerFetch) -> SandboxSpec {
    SandboxSpec {
        job_id: String::new(),
        cloud_init: None,
        runner: Some(runner),
        ..spec(name, "unused")
    }
}

fn runner_fetch(token: &str, sha256: &str) -> RunnerFetch {
    RunnerFetch {
        url: "http://10.0.2.100/guest/v1/runner".into(),
        token: token.into(),
        sha256: sha256.into(),
    }
}

/// No VM: the ids come from the template and the specs alone.
#[tokio::test]
async fn a_job_and_a_pool_sandbox_of_one_shape_map_to_one_snapshot_whatever_their_tokens() {
    let images = template_dir();
    let root = scratch();
    let (endpoint, _requests) = guest_endpoint().await;
    let backend = backend(root.path(), &images, endpoint);
    let id_of = |status: SnapshotStatus| match status {
        SnapshotStatus::Missing { id } => id,
        SnapshotStatus::Ready(info) => info.id,
    };
    let digest = "ab".repeat(32);
    let job = SandboxSpec {
        runner: Some(runner_fetch("job-token", &digest)),
        ..spec("sandbox-0123456789ab", "job-1")
    };
    let pool = pool_spec("sandbox-p0123456789a", runner_fetch("pool-token", &digest));
    let job_id = id_of(backend.snapshot_status(&job).await.unwrap());
    assert_eq!(
        id_of(backend.snapshot_status(&pool).await.unwrap()),
        job_id,
        "a pool sandbox would make a snapshot no job restores from"
    );
    // The runner's digest is part of the shape: another runner, another snapshot; and a
    // template that keeps its own (no fetch) is another shape again.
    let other = pool_spec(
        "sandbox-p0123456789a",
        runner_fetch("pool-token", &"cd".repeat(32)),
    );
    let bare = SandboxSpec {
        runner: None,
        ..pool.clone()
    };
    let other_id = id_of(backend.snapshot_status(&other).await.unwrap());
    let bare_id = id_of(backend.snapshot_status(&bare).await.unwrap());
    assert_ne!(other_id, job_id);
    assert_ne!(bare_id, job_id);
    assert_ne!(bare_id, other_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_made_once_and_restored_sandboxes_run_from_it() {
    let images = template_dir();
    let root = scratch();
    // The snapshot is made by a backend on another guest endpoint than the one that restores
    // from it: a restored guest's traffic goes where its own QEMU forwards it.
    let (making_endpoint, _making_requests) = guest_endpoint().await;
    let maker = backend(root.path(), &images, making_endpoint);
    let (endpoint, mut requests) = guest_endpoint().await;
    let backend = backend(root.path(), &images, endpoint);
    let snapshots = root.path().join("snapshots");

    let first = spec("sandbox-snap01", "job-snap01");
    let SnapshotStatus::Missing { id } = maker.snapshot_status(&first).await.unwrap() else {
        panic!("no snapshot can exist yet");
    };
    // Two makings at once share one template VM and one snapshot.
    let (a, b) = tokio::join!(maker.make_snapshot(&first), maker.make_snapshot(&first));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.id.as_str(), b.id.as_str()), (id.as_str(), id.as_str()));
    assert_eq!(a.made_seconds, b.made_seconds, "made once");
    assert!(a.state_bytes > 0 && a.state_bytes < 16 << 20, "{a:?}");
    let folder = snapshots.join(&id);
    for file in ["memory", "state", "overlay.qcow2", "manifest.json"] {
        assert!(folder.join(file).exists(), "{file} is in the snapshot");
    }
    assert!(
        processes_naming(&snapshots).is_empty(),
        "the template VM is gone"
    );
    assert_eq!(
        maker.snapshot_status(&first).await.unwrap(),
        SnapshotStatus::Ready(a.clone())
    );
    // Another shape is another snapshot.
    let mut egress = first.clone();
    egress.network = NetworkMode::Egress;
    let SnapshotStatus::Missing { id: other } = maker.snapshot_status(&egress).await.unwrap()
    else {
        panic!("the egress shape has no snapshot");
    };
    assert_ne!(other, id);

    let (spec, _) = restoring_spec(&backend, "sandbox-snap01", "job-snap01").await;
    let vm = backend.clone_vm(&spec).await.unwrap();
    let report = backend.start_vm(&vm).await.unwrap();
    assert_eq!(report.restored_from.as_deref(), Some(id.as_str()));
    assert!(report.notes.is_empty(), "{report:?}");
    // The agent answered before start_vm returned.
    backend.agent_ping(&vm).await.unwrap();
    // Booted once, by the template VM: the guest's uptime goes on from there, and its disk is
    // the snapshot's (cloud-init's result is already written).
    let status = run_in_guest(
        &backend,
        &vm,
        "test -s /run/cloud-init/result.json && [ \"$(hostname)\" = sandbox-snapshot ]",
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 });
    // The restored guest's network is its sandbox's: the guest endpoint answers, through this
    // QEMU's own guestfwd, and the host beyond it is out of reach.
    let status = run_in_guest(
        &backend,
        &vm,
        "wget -q -O /dev/null http://10.0.2.100/restored",
    )
    .await;
    assert_eq!(status, ExecStatus::Exited { code: 0 });
    let request = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let request = requests.recv().await.unwrap();
            if request.starts_with("GET /restored ") {
                return request;
            }
        }
    })
    .await;
    assert!(
        request.is_ok(),
        "the restored guest reached the guest endpoint"
    );
    assert_host_out_of_reach(&backend, &vm, endpoint, &mut requests).await;
    // A running restored VM reports how it started.
    assert_eq!(backend.start_vm(&vm).await.unwrap(), report);
    let dir = PathBuf::from(&vm.vm_ref);
    assert_eq!(processes_naming(&dir).len(), 1);
    // One left paused (as a daemon killed in the middle of a restore leaves it) is restored
    // again, not taken for running.
    let mut qmp = QmpClient::connect(&dir.join("qmp.sock"), Duration::from_secs(5))
        .await
        .unwrap();
    qmp.execute("stop", None, Duration::from_secs(5))
        .await
        .unwrap();
    drop(qmp);
    assert_eq!(backend.start_vm(&vm).await.unwrap(), report);
    backend.agent_ping(&vm).await.unwrap();
    assert_eq!(processes_naming(&dir).len(), 1);

    // Nothing of the snapshot is stale: a sweep leaves it.
    assert!(backend.sweep().await.unwrap().is_empty());
    backend.destroy_vm(&vm).await.unwrap();
    assert!(!dir.exists());
    assert!(processes_naming(&dir).is_empty());
    assert!(
        folder.join("memory").exists(),
        "the snapshot outlives its sandboxes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_does_not_load_is_discarded_and_the_sandbox_boots_cold() {
    let images = template_dir();
    let root = scratch();
    let (endpoint, mut requests) = guest_endpoint().await;
    let backend = backend(root.path(), &images, endpoint);
    let (spec, id) = restoring_spec(&backend, "sandbox-snap02", "job-snap02").await;
    common::vm::truncate_file(&root.path().join("snapshots").join(&id).join("state"), 1, 2);

    let vm = backend.clone_vm(&spec).await.unwrap();
    let report = backend.start_vm(&vm).await.unwrap();
    assert_eq!(report.restored_from, None);
    assert_eq!(report.notes.len(), 1, "{report:?}");
    assert!(
        report.notes[0].contains(&id) && report.notes[0].contains("boots cold"),
        "{report:?}"
    );
    assert!(
        !root.path().join("snapshots").join(&id).exists(),
        "discarded"
    );
    // A cold boot with the job's own seed: it phones home.
    wait_for_agent(&backend, &vm).await;
    let phoned = tokio::time::timeout(BOOT_LIMIT, async {
        loop {
            let request = requests.recv().await.unwrap();
            if request.contains("/guest/v1/phone-home/ph-job-snap02") {
                return request;
            }
        }
    })
    .await
    .expect("the cold-booted guest phones home");
    assert!(phoned.contains("hostname=sandbox-snap02"), "{phoned}");
    backend.destroy_vm(&vm).await.unwrap();

    // The next sandbox of the shape finds no snapshot, and a new one is made.
    let fresh = spec.clone();
    assert_eq!(
        backend.snapshot_status(&fresh).await.unwrap(),
        SnapshotStatus::Missing { id: id.clone() }
    );
    assert_eq!(backend.make_snapshot(&fresh).await.unwrap().id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_clears_an_interrupted_making_and_stale_snapshots_only() {
    let images = template_dir();
    let root = scratch();
    let (endpoint, _requests) = guest_endpoint().await;
    let backend = backend(root.path(), &images, endpoint);
    let snapshots = root.path().join("snapshots");
    let (_, id) = restoring_spec(&backend, "sandbox-snap03", "job-snap03").await;

    // A making cut short by a crash: its folder, with our owner, and a process naming it.
    let interrupted = snapshots.join("00000000000000aa.building");
    std::fs::create_dir_all(&interrupted).unwrap();
    std::fs::write(interrupted.join("owner"), OWNER).unwrap();
    let mut sleeper = std::process::Command::new("sh")
        .args(["-c", "sleep 300; :"])
        .arg(interrupted.join("marker"))
        .spawn()
        .unwrap();
    // Until the child has exec'd, its command line is still this test's.
    let spawned = Instant::now();
    while processes_naming(&interrupted).is_empty() {
        assert!(
            spawned.elapsed() < Duration::from_secs(10),
            "the stand-in never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another daemon's making, and a folder that is no snapshot.
    let theirs = snapshots.join("00000000000000bb.building");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("owner"), "0199-someone-else").unwrap();
    std::fs::create_dir_all(snapshots.join("notes")).unwrap();
    // A snapshot of a template build that is gone.
    let stale = snapshots.join("00000000000000cc");
    std::fs::create_dir_all(&stale).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snapshots.join(&id).join("manifest.json")).unwrap())
            .unwrap();
    manifest["shape"]["template"]["root_disk"] = "/gone/root.qcow2".into();
    manifest["id"] = "00000000000000cc".into();
    std::fs::write(stale.join("manifest.json"), manifest.to_string()).unwrap();

    let mut removed = backend.sweep().await.unwrap();
    removed.sort();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(removed[0].contains("00000000000000aa"), "{removed:?}");
    assert!(removed[1].contains("00000000000000cc"), "{removed:?}");
    assert!(!interrupted.exists() && !stale.exists());
    let stopped = Instant::now();
    while sleeper.try_wait().unwrap().is_none() {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "its process was stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(theirs.exists() && snapshots.join("notes").exists());
    assert!(
        snapshots.join(&id).join("memory").exists(),
        "the current one stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_vm_that_did_not_install_the_daemons_runner_is_not_saved_as_a_snapshot() {
    let images = template_dir();
    let root = scratch();
    // The stand-in endpoint answers the runner's fetch with an empty body, as a dead token's
    // 401 would leave the guest without the runner: its digest is not the one the seed names.
    let (endpoint, mut requests) = guest_endpoint().await;
    let backend = backend(root.path(), &images, endpoint);
    let spec = SandboxSpec {
        runner: Some(runner_fetch("ended-token", &"ab".repeat(32))),
        ..spec("sandbox-norunner", "job-norunner")
    };
    let SnapshotStatus::Missing { id } = backend.snapshot_status(&spec).await.unwrap() else {
        panic!("no snapshot can exist yet");
    };
    let refusal = backend.make_snapshot(&spec).await.unwrap_err().to_string();
    assert!(
        refusal.contains("has not installed the daemon's runner")
            && refusal.contains("no snapshot is saved"),
        "{refusal}"
    );
    // The guest did ask for the runner, with the seed's token.
    let mut fetched = false;
    while let Ok(request) = requests.try_recv() {
        fetched |= request.starts_with("GET /guest/v1/runner") && request.contains("ended-token");
    }
    assert!(fetched, "the template VM never fetched the runner");
    assert_eq!(
        backend.snapshot_status(&spec).await.unwrap(),
        SnapshotStatus::Missing { id: id.clone() },
        "a snapshot without the runner was published"
    );
    let snapshots = root.path().join("snapshots");
    assert!(!snapshots.join(&id).exists());
    assert!(!snapshots.join(format!("{id}.building")).exists());
    assert!(processes_naming(&snapshots).is_empty(), "a qemu survived");
}

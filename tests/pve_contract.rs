#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Contract tests of the Proxmox VE backend without Proxmox: a recording runner stands in for
//! `qm`/`pvesh`, answers from a small model of one node, and keeps every argv. The tests assert
//! the exact commands of each operation, the reaction to each classified failure (busy, id
//! taken, no linked clone, agent down, VM missing), and that no command carries an option `qm`
//! does not accept (the options per subcommand come from qm(1) of the pve-docs).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentlab::backend::{
    Backend, BackendError, CloudInitSpec, ExecStatus, GuestCommand, GuestInput, ListedVm,
    NetworkMode, SandboxSpec, VmHandle, VmState,
};
use agentlab::pve::command::{CommandError, CommandOutput};
use agentlab::pve::{CommandRunner, Invocation, PveBackend, PveConfig, Tool};

const TIMEOUT: Duration = Duration::from_secs(120);
const NAME: &str = "sandbox-0123456789ab";
/// The daemon instance the specs are cloned for.
const OWNER: &str = "0199-contract-tests";

#[derive(Debug, Clone)]
struct Vm {
    name: String,
    running: bool,
    template: bool,
    config: BTreeMap<String, String>,
}

type Hook = Box<dyn FnMut(&mut Model) -> Option<CommandOutput> + Send>;

/// One node, `pve`, holding template 9000 and whatever the commands make.
#[derive(Default)]
struct Model {
    vms: BTreeMap<u32, Vm>,
    agent_up: bool,
    cluster_firewall: bool,
    exec_statuses: Vec<&'static str>,
    /// Hooks by argv prefix, tried before the model; one that answers None lets the model run.
    hooks: Vec<(Vec<String>, Hook)>,
    /// Commands (by argv prefix) that take this long, as a real clone does. Meanwhile a clone's
    /// target holds qemu-server's unnamed, locked placeholder config, as on Proxmox.
    slow: Vec<(Vec<String>, Duration)>,
    calls: Vec<Invocation>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("vms", &self.vms).finish()
    }
}

fn template_config() -> BTreeMap<String, String> {
    [
        ("agent", "enabled=1"),
        ("boot", "order=scsi0;ide2;net0"),
        ("cores", "2"),
        ("ide2", "local-zfs:vm-9000-cloudinit,media=cdrom"),
        ("memory", "2048"),
        ("name", "agentlab-template"),
        ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr1,firewall=1"),
        ("scsi0", "local-zfs:base-9000-disk-0,discard=on,size=3584M"),
        ("template", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn fail(stderr: &str) -> CommandOutput {
    CommandOutput::failed(stderr)
}

impl Model {
    fn new() -> Model {
        let mut model = Model {
            agent_up: true,
            cluster_firewall: true,
            ..Model::default()
        };
        model.vms.insert(
            9000,
            Vm {
                name: "agentlab-template".into(),
                running: false,
                template: true,
                config: template_config(),
            },
        );
        model
    }

    fn missing(id: u32) -> CommandOutput {
        fail(&format!(
            "Configuration file 'nodes/pve/qemu-server/{id}.conf' does not exist\n"
        ))
    }

    fn answer(&mut self, tool: Tool, args: &[String]) -> CommandOutput {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = |s: &str| s.parse::<u32>().unwrap();
        match (tool, a.as_slice()) {
            (Tool::Pvesh, ["get", "/nodes", "--output-format", "json"]) => {
                CommandOutput::ok(r#"[{"node":"pve","status":"online","maxcpu":16}]"#)
            }
            (Tool::Pvesh, ["get", "/cluster/nextid"]) => {
                let next = (100..).find(|i| !self.vms.contains_key(i)).unwrap();
                CommandOutput::ok(format!("{next}\n"))
            }
            (Tool::Pvesh, ["get", "/nodes/pve/qemu", "--output-format", "json"]) => {
                let list: Vec<serde_json::Value> = self
                    .vms
                    .iter()
                    .map(|(vmid, vm)| {
                        let mut entry = serde_json::json!({
                            "vmid": vmid,
                            "status": if vm.running { "running" } else { "stopped" },
                            "cpus": 2,
                        });
                        if !vm.name.is_empty() {
                            entry["name"] = vm.name.clone().into();
                        }
                        if vm.template {
                            entry["template"] = 1.into();
                        }
                        // As Proxmox lists them: the config's `;`-separated tag list.
                        if let Some(tags) = vm.config.get("tags") {
                            entry["tags"] = tags.clone().into();
                        }
                        entry
                    })
                    .collect();
                CommandOutput::ok(serde_json::to_string(&list).unwrap())
            }
            (Tool::Pvesh, ["get", "/cluster/firewall/options", "--output-format", "json"]) => {
                CommandOutput::ok(format!(
                    r#"{{"enable":{}}}"#,
                    u8::from(self.cluster_firewall)
                ))
            }
            (Tool::Pvesh, ["get", path, "--output-format", "json"])
                if path.ends_with("/firewall/options") =>
            {
                CommandOutput::ok(r#"{"enable":1,"policy_out":"DROP","dhcp":1}"#)
            }
            (Tool::Qm, ["config", vmid]) => match self.vms.get(&id(vmid)) {
                Some(vm) => CommandOutput::ok(
                    vm.config
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}\n"))
                        .collect::<String>(),
                ),
                None => Self::missing(id(vmid)),
            },
            (Tool::Qm, ["clone", template, newid, "--name", name, "--full", _, ..]) => {
                let (template, newid) = (id(template), id(newid));
                if self.vms.contains_key(&newid) {
                    return fail(&format!(
                        "unable to create VM {newid} - VM {newid} already exists on node 'pve'\n"
                    ));
                }
                let Some(source) = self.vms.get(&template) else {
                    return Self::missing(template);
                };
                let mut config = source.config.clone();
                config.remove("template");
                config.insert("name".into(), (*name).to_owned());
                config.insert(
                    "scsi0".into(),
                    format!("local-zfs:vm-{newid}-disk-0,discard=on,size=3584M"),
                );
                self.vms.insert(
                    newid,
                    Vm {
                        name: (*name).to_owned(),
                        running: false,
                        template: false,
                        config,
                    },
                );
                CommandOutput::ok(format!(
                    "create linked clone of drive scsi0 (local-zfs:base-{template}-disk-0)\n"
                ))
            }
            (Tool::Qm, ["set", vmid, rest @ ..]) => match self.vms.get_mut(&id(vmid)) {
                Some(vm) => {
                    for pair in rest.chunks(2) {
                        let key = pair[0].trim_start_matches("--");
                        vm.config.insert(key.to_owned(), pair[1].to_owned());
                    }
                    CommandOutput::ok("")
                }
                None => Self::missing(id(vmid)),
            },
            (Tool::Qm, ["resize", vmid, disk, size]) => match self.vms.get_mut(&id(vmid)) {
                Some(vm) => {
                    vm.config
                        .insert((*disk).to_owned(), format!("local-zfs:vm-disk,size={size}"));
                    CommandOutput::ok("")
                }
                None => Self::missing(id(vmid)),
            },
            (Tool::Qm, ["start", vmid]) => match self.vms.get_mut(&id(vmid)) {
                Some(vm) if vm.running => fail(&format!("VM {vmid} already running\n")),
                Some(vm) => {
                    vm.running = true;
                    CommandOutput::ok("")
                }
                None => Self::missing(id(vmid)),
            },
            (Tool::Qm, ["stop", vmid]) => match self.vms.get_mut(&id(vmid)) {
                Some(vm) => {
                    vm.running = false;
                    CommandOutput::ok("")
                }
                None => Self::missing(id(vmid)),
            },
            (Tool::Qm, ["destroy", vmid, "--purge", "1", ..]) => match self.vms.get(&id(vmid)) {
                Some(vm) if vm.running => fail(&format!("VM {vmid} is running - destroy failed\n")),
                Some(_) => {
                    self.vms.remove(&id(vmid));
                    CommandOutput::ok("")
                }
                None => Self::missing(id(vmid)),
            },
            (Tool::Qm, ["guest", "cmd", vmid, "ping"]) => match self.vms.get(&id(vmid)) {
                None => Self::missing(id(vmid)),
                Some(vm) if !vm.running => fail(&format!("VM {vmid} is not running\n")),
                Some(_) if !self.agent_up => fail("QEMU guest agent is not running\n"),
                Some(_) => CommandOutput::ok(""),
            },
            (Tool::Qm, ["guest", "exec", vmid, ..]) => match self.vms.get(&id(vmid)) {
                Some(vm) if vm.running => CommandOutput::ok("{\n   \"pid\" : 4242\n}\n"),
                Some(_) => fail(&format!("VM {vmid} is not running\n")),
                None => Self::missing(id(vmid)),
            },
            (Tool::Qm, ["guest", "exec-status", _, "4242"]) => {
                if self.exec_statuses.is_empty() {
                    fail("Agent error: Invalid parameter 'pid'\n")
                } else {
                    CommandOutput::ok(self.exec_statuses.remove(0))
                }
            }
            _ => fail(&format!("400 unknown command: {}\n", args.join(" "))),
        }
    }
}

/// The recording runner the backend is built with.
#[derive(Debug, Clone)]
struct Recorder(Arc<Mutex<Model>>);

impl CommandRunner for Recorder {
    fn run(&self, invocation: &Invocation) -> Result<CommandOutput, CommandError> {
        agentlab::pve::command::check_args(invocation)?;
        let args = invocation.args.clone();
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        let delay = {
            let mut model = self.0.lock().unwrap();
            model.calls.push(invocation.clone());
            let delay = model
                .slow
                .iter()
                .find(|(p, _)| args.starts_with(p))
                .map(|(_, d)| *d);
            if let (Some(_), ["clone", _, newid, ..]) = (delay, words.as_slice()) {
                model.vms.entry(newid.parse().unwrap()).or_insert(Vm {
                    name: String::new(),
                    running: false,
                    template: false,
                    config: [("lock".to_owned(), "clone".to_owned())].into(),
                });
            }
            delay
        };
        if let Some(delay) = delay {
            // Without the model's lock: other commands run meanwhile, as on a real node.
            std::thread::sleep(delay);
            if let ["clone", _, newid, ..] = words.as_slice() {
                self.0.lock().unwrap().vms.remove(&newid.parse().unwrap());
            }
        }
        let mut model = self.0.lock().unwrap();
        let mut hooks = std::mem::take(&mut model.hooks);
        let mut answer = None;
        for (prefix, hook) in hooks.iter_mut() {
            if args.starts_with(prefix) {
                if let Some(output) = hook(&mut model) {
                    answer = Some(output);
                    break;
                }
            }
        }
        model.hooks = hooks;
        Ok(answer.unwrap_or_else(|| model.answer(invocation.tool, &args)))
    }
}

struct Rig {
    model: Arc<Mutex<Model>>,
    backend: PveBackend,
    snippets: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(|_| {})
    }

    fn with(adjust: impl FnOnce(&mut PveConfig)) -> Rig {
        let snippets = tempfile::tempdir().unwrap();
        let mut config = PveConfig {
            snippets_dir: snippets.path().to_owned(),
            busy_backoff: Duration::from_millis(10),
            ..PveConfig::default()
        };
        adjust(&mut config);
        let model = Arc::new(Mutex::new(Model::new()));
        let backend = PveBackend::new(config, TIMEOUT, Arc::new(Recorder(Arc::clone(&model))))
            .unwrap()
            .with_hostname(Some("pve".into()));
        Rig {
            model,
            backend,
            snippets,
        }
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap()
    }

    /// Every command so far as `tool arg arg …`, and forgets them.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.model().calls)
            .iter()
            .map(|c| format!("{} {}", c.tool.as_str(), c.args.join(" ")))
            .collect()
    }

    fn hook(
        &self,
        prefix: &[&str],
        hook: impl FnMut(&mut Model) -> Option<CommandOutput> + Send + 'static,
    ) {
        self.model().hooks.push((
            prefix.iter().map(|s| (*s).to_owned()).collect(),
            Box::new(hook),
        ));
    }

    /// Fails the first `times` commands starting with `prefix` with `stderr`.
    fn fail_times(&self, prefix: &[&str], times: usize, stderr: &'static str) {
        let mut left = times;
        self.hook(prefix, move |_| {
            (left > 0).then(|| {
                left -= 1;
                fail(stderr)
            })
        });
    }

    fn snippet(&self, name: &str) -> std::path::PathBuf {
        self.snippets.path().join(format!("agentlab-{name}.yaml"))
    }
}

fn spec(network: NetworkMode) -> SandboxSpec {
    SandboxSpec {
        job_id: "0199aaaa0123456789ab".into(),
        name: NAME.into(),
        template: "9000".into(),
        cores: 4,
        memory_mb: 6144,
        disk_gb: 30,
        network,
        cloud_init: Some(CloudInitSpec {
            hostname: NAME.into(),
            phone_home_url: "http://10.77.0.1:8848/guest/v1/phone-home/ph-secret".into(),
            guest_url: "http://10.77.0.1:8848".into(),
            bootstrap_token: "boot-secret".into(),
        }),
        runner: None,
        owner: OWNER.into(),
        start: agentlab::model::StartMode::Cold,
        restore_from: None,
    }
}

fn vm(vmid: u32) -> VmHandle {
    VmHandle {
        name: NAME.into(),
        vm_ref: vmid.to_string(),
    }
}

const LIST: &str = "pvesh get /nodes/pve/qemu --output-format json";

#[tokio::test]
async fn clone_issues_exactly_these_commands() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Restricted))
        .await
        .unwrap();
    assert_eq!(handle, vm(100));
    assert_eq!(
        rig.take(),
        [
            "qm config 9000",
            "pvesh get /cluster/firewall/options --output-format json",
            // The node is detected on first need (the daemon's preflight does it at start-up).
            "pvesh get /nodes --output-format json",
            "pvesh get /nodes/pve/qemu/9000/firewall/options --output-format json",
            LIST,
            "pvesh get /cluster/nextid",
            "qm clone 9000 100 --name sandbox-0123456789ab --full 0",
            "qm set 100 --cores 4 --memory 6144 --net0 virtio,bridge=vmbr1,firewall=1 \
             --ipconfig0 ip=dhcp --cicustom user=local:snippets/agentlab-sandbox-0123456789ab.yaml \
             --tags agentlab-owner-0199-contract-tests",
            "qm resize 100 scsi0 30G",
        ]
    );
    // The snippet holds the tokens: private, and never on a command line.
    let snippet = rig.snippet(NAME);
    let text = std::fs::read_to_string(&snippet).unwrap();
    assert!(text.starts_with("#cloud-config\n") && text.contains("boot-secret"));
    // One guest contract: exactly the user-data of the local backend's seed.
    let spec_sent = spec(NetworkMode::Restricted);
    let seed = agentlab::cloudinit::render_for(
        NAME,
        spec_sent.cloud_init.as_ref(),
        spec_sent.runner.as_ref(),
    );
    assert_eq!(text, seed.unwrap().user_data);
    assert_eq!(
        std::fs::metadata(&snippet).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(rig.model().calls.is_empty());

    // An egress sandbox skips the firewall checks and gets no VM firewall on its NIC. The
    // template check is cached per network kind; the node is detected once.
    let mut egress = spec(NetworkMode::Egress);
    egress.name = "sandbox-0123456789ac".into();
    let handle = rig.backend.clone_vm(&egress).await.unwrap();
    assert_eq!(handle.vm_ref, "101");
    let calls = rig.take();
    assert_eq!(calls[0], "qm config 9000");
    assert!(
        !calls.iter().any(|c| c.contains("firewall/options")),
        "{calls:?}"
    );
    assert!(calls.contains(&"qm set 101 --cores 4 --memory 6144 --net0 virtio,bridge=vmbr1,firewall=0 --ipconfig0 ip=dhcp --cicustom user=local:snippets/agentlab-sandbox-0123456789ac.yaml --tags agentlab-owner-0199-contract-tests".to_owned()), "{calls:?}");
}

#[tokio::test]
async fn clone_again_returns_the_same_vm_and_configures_it_again() {
    let rig = Rig::new();
    let first = rig
        .backend
        .clone_vm(&spec(NetworkMode::Restricted))
        .await
        .unwrap();
    rig.take();
    // The snippet never made it (a crash between clone and set): the re-run writes it again.
    std::fs::remove_file(rig.snippet(NAME)).unwrap();
    let again = rig
        .backend
        .clone_vm(&spec(NetworkMode::Restricted))
        .await
        .unwrap();
    assert_eq!(first, again);
    let calls = rig.take();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("qm clone") || c.contains("nextid")),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.starts_with("qm set 100 ")),
        "{calls:?}"
    );
    assert!(rig.snippet(NAME).exists());
    assert_eq!(rig.model().vms.len(), 2, "one template, one clone");

    // Once it runs, a re-run leaves it alone.
    rig.backend.start_vm(&first).await.unwrap();
    rig.take();
    rig.backend
        .clone_vm(&spec(NetworkMode::Restricted))
        .await
        .unwrap();
    assert_eq!(rig.take(), [LIST]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_cancelled_midway_is_waited_for_not_made_twice() {
    let rig = Rig::new();
    rig.model()
        .slow
        .push((vec!["clone".to_owned()], Duration::from_millis(400)));
    let spec = spec(NetworkMode::Egress);
    // The phase times out (or the job is cancelled) while qm clone runs; qm goes on to the end.
    let cut = tokio::time::timeout(Duration::from_millis(100), rig.backend.clone_vm(&spec)).await;
    assert!(cut.is_err(), "cancelled while qm clone ran");
    // The restarted phase finds that clone instead of making a second VM under the same name.
    let handle = rig.backend.clone_vm(&spec).await.unwrap();
    assert_eq!(handle.vm_ref, "100");
    let clones = rig
        .take()
        .iter()
        .filter(|c| c.starts_with("qm clone"))
        .count();
    assert_eq!(clones, 1);
    assert_eq!(rig.model().vms.len(), 2, "the template and one clone");
}

#[tokio::test]
async fn a_taken_vmid_is_replaced_by_the_next_free_one() {
    let rig = Rig::new();
    // Someone else creates VM 100 between our nextid and our clone.
    let mut raced = false;
    rig.hook(&["clone", "9000", "100"], move |model| {
        if !raced {
            raced = true;
            model.vms.insert(
                100,
                Vm {
                    name: "someone-else".into(),
                    running: false,
                    template: false,
                    config: BTreeMap::new(),
                },
            );
        }
        None
    });
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    assert_eq!(handle.vm_ref, "101");
    let calls: Vec<String> = rig
        .take()
        .into_iter()
        .filter(|c| c.contains("nextid") || c.starts_with("qm clone"))
        .collect();
    assert_eq!(
        calls,
        [
            "pvesh get /cluster/nextid",
            "qm clone 9000 100 --name sandbox-0123456789ab --full 0",
            "pvesh get /cluster/nextid",
            "qm clone 9000 101 --name sandbox-0123456789ab --full 0",
        ]
    );
    assert_eq!(rig.model().vms[&100].name, "someone-else", "untouched");
}

#[tokio::test]
async fn no_linked_clone_falls_back_to_a_full_clone_after_removing_the_residue() {
    let rig = Rig::with(|c| c.storage = Some("local-lvm".into()));
    // The failed linked clone leaves qm's unnamed, locked placeholder behind.
    rig.hook(&["clone", "9000", "100", "--name", NAME, "--full", "0"], |model| {
        model.vms.insert(
            100,
            Vm {
                name: String::new(),
                running: false,
                template: false,
                config: [("lock".to_owned(), "clone".to_owned())].into(),
            },
        );
        Some(fail(
            "400 Parameter verification failed.\nfull: linked clone feature is not supported for drive 'scsi0'\n",
        ))
    });
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    assert_eq!(handle.vm_ref, "100");
    let calls: Vec<String> = rig
        .take()
        .into_iter()
        .filter(|c| c.starts_with("qm clone") || c.starts_with("qm destroy"))
        .collect();
    assert_eq!(
        calls,
        [
            "qm clone 9000 100 --name sandbox-0123456789ab --full 0",
            "qm destroy 100 --purge 1 --skiplock 1",
            "qm clone 9000 100 --name sandbox-0123456789ab --full 1 --storage local-lvm",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn locked_or_busy_is_retried_with_backoff_then_reported_with_stderr() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    rig.take();
    rig.fail_times(&["start"], 2, "VM is locked (clone)\n");
    let started = tokio::time::Instant::now();
    rig.backend.start_vm(&handle).await.unwrap();
    assert_eq!(
        rig.take(),
        [LIST, "qm start 100", "qm start 100", "qm start 100"]
    );
    // 10 ms then 20 ms: the backoff doubles.
    assert!(
        started.elapsed() >= Duration::from_millis(30),
        "{:?}",
        started.elapsed()
    );

    rig.fail_times(
        &["stop"],
        100,
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout\n",
    );
    let err = rig
        .backend
        .destroy_vm(&handle)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qm stop 100") && err.contains("can't lock file"),
        "{err}"
    );
    let stops = rig.take().iter().filter(|c| *c == "qm stop 100").count();
    assert_eq!(stops, 6, "one try and busy_retries (5) more");
}

#[tokio::test]
async fn start_is_idempotent_and_refuses_a_vmid_that_is_not_ours() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    rig.take();
    rig.backend.start_vm(&handle).await.unwrap();
    assert_eq!(rig.take(), [LIST, "qm start 100"]);
    rig.backend.start_vm(&handle).await.unwrap();
    assert_eq!(rig.take(), [LIST], "a running VM is not started again");
    // qm's own "already running" (a race with the listing) is success too.
    rig.hook(&["start"], |_| Some(fail("VM 100 already running\n")));
    rig.model().vms.get_mut(&100).unwrap().running = false;
    rig.backend.start_vm(&handle).await.unwrap();

    let foreign = VmHandle {
        name: "sandbox-ffffffffffff".into(),
        vm_ref: "100".into(),
    };
    assert!(matches!(
        rig.backend.start_vm(&foreign).await,
        Err(BackendError::Missing(_))
    ));
    let template = VmHandle {
        name: "agentlab-template".into(),
        vm_ref: "9000".into(),
    };
    rig.take();
    assert!(rig.backend.start_vm(&template).await.is_err());
    assert_eq!(rig.take(), [LIST], "a template is never started");
}

#[tokio::test]
async fn agent_ping_is_one_guest_cmd_with_a_short_timeout() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    rig.backend.start_vm(&handle).await.unwrap();
    rig.take();
    rig.model().agent_up = false;
    let err = rig.backend.agent_ping(&handle).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::AgentUnavailable(m) if m.contains("QEMU guest agent is not running")),
        "{err}"
    );
    rig.model().agent_up = true;
    rig.backend.agent_ping(&handle).await.unwrap();
    let calls = std::mem::take(&mut rig.model().calls);
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(call.args, ["guest", "cmd", "100", "ping"]);
        assert_eq!(call.timeout, Duration::from_secs(4));
    }
    rig.model().vms.remove(&100);
    assert!(matches!(
        rig.backend.agent_ping(&handle).await,
        Err(BackendError::Missing(_))
    ));
}

#[tokio::test]
async fn the_runner_starts_asynchronously_and_its_exit_is_remembered() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    rig.backend.start_vm(&handle).await.unwrap();
    rig.take();
    let command = GuestCommand {
        path: "/usr/local/bin/agentlab-runner".into(),
        args: vec!["--bootstrap".into(), "/etc/agentlab/bootstrap.json".into()],
        env: Default::default(),
        stdin: None,
    };
    assert_eq!(rig.backend.exec(&handle, &command).await.unwrap(), 4242);
    let calls = std::mem::take(&mut rig.model().calls);
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1].args,
        [
            "guest",
            "exec",
            "100",
            "--synchronous",
            "0",
            "--",
            "/usr/local/bin/agentlab-runner",
            "--bootstrap",
            "/etc/agentlab/bootstrap.json"
        ]
    );
    assert!(!calls[1].loggable, "guest argv stays out of the logs");

    rig.model().exec_statuses = vec![
        "{\n   \"exited\" : 0\n}\n",
        "{\n   \"exitcode\" : 3,\n   \"exited\" : 1,\n   \"out-data\" : \"\"\n}\n",
    ];
    assert_eq!(
        rig.backend.exec_status(&handle, 4242).await.unwrap(),
        ExecStatus::Running
    );
    let done = ExecStatus::Exited { code: 3 };
    assert_eq!(rig.backend.exec_status(&handle, 4242).await.unwrap(), done);
    // The agent has forgotten the pid now; the backend has not.
    assert_eq!(rig.backend.exec_status(&handle, 4242).await.unwrap(), done);
    assert_eq!(
        rig.take(),
        [
            "qm guest exec-status 100 4242",
            "qm guest exec-status 100 4242"
        ]
    );
    // A pid the agent never knew is an error naming it.
    let err = rig
        .backend
        .exec_status(&handle, 7)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("qm guest exec-status 100 7"), "{err}");
}

#[tokio::test]
async fn guest_stdin_goes_through_pass_stdin_and_only_when_given() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    rig.backend.start_vm(&handle).await.unwrap();
    rig.take();
    let document = br#"{"hostname":"sandbox-0123456789ab","bootstrap":{"token":"boot-secret"}}"#;
    let command = GuestCommand {
        path: "/usr/local/bin/agentlab-runner".into(),
        args: vec!["identity".into()],
        env: Default::default(),
        stdin: Some(GuestInput::new(&document[..])),
    };
    assert_eq!(rig.backend.exec(&handle, &command).await.unwrap(), 4242);
    let calls = std::mem::take(&mut rig.model().calls);
    let exec = calls.last().unwrap();
    assert_eq!(
        exec.args,
        [
            "guest",
            "exec",
            "100",
            "--synchronous",
            "0",
            "--pass-stdin",
            "1",
            "--",
            "/usr/local/bin/agentlab-runner",
            "identity"
        ]
    );
    assert_eq!(exec.stdin.as_deref(), Some(&document[..]));
    assert!(!exec.loggable);
    assert!(!format!("{exec:?}").contains("boot-secret"), "{exec:?}");

    // More than qm forwards is refused before anything runs.
    let too_much = GuestCommand {
        stdin: Some(GuestInput::new(vec![b' '; 1024 * 1024 + 1])),
        ..command
    };
    let err = rig.backend.exec(&handle, &too_much).await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidInput(_)), "{err}");
    assert!(!rig.take().iter().any(|c| c.starts_with("qm guest exec")));
}

#[tokio::test]
async fn destroy_stops_then_destroys_then_removes_the_snippet_and_is_idempotent() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    rig.backend.start_vm(&handle).await.unwrap();
    rig.take();
    rig.backend.destroy_vm(&handle).await.unwrap();
    assert_eq!(
        rig.take(),
        [LIST, "qm stop 100", "qm destroy 100 --purge 1"]
    );
    assert!(!rig.snippet(NAME).exists());
    assert_eq!(
        rig.backend.vm_state(&handle).await.unwrap(),
        VmState::Missing
    );
    rig.take();
    rig.backend.destroy_vm(&handle).await.unwrap();
    assert_eq!(rig.take(), [LIST], "a missing VM is destroyed already");
}

#[tokio::test]
async fn never_destroys_a_vm_the_daemon_did_not_create() {
    let rig = Rig::new();
    // Our VM 100 is long gone and its id now belongs to someone else's VM; and a handle pointing
    // at the template.
    rig.model().vms.insert(
        100,
        Vm {
            name: "db-server".into(),
            running: true,
            template: false,
            config: BTreeMap::new(),
        },
    );
    rig.backend.destroy_vm(&vm(100)).await.unwrap();
    let template = VmHandle {
        name: "agentlab-template".into(),
        vm_ref: "9000".into(),
    };
    rig.backend.destroy_vm(&template).await.unwrap();
    let calls = rig.take();
    assert!(
        calls
            .iter()
            .all(|c| !c.starts_with("qm stop") && !c.starts_with("qm destroy")),
        "{calls:?}"
    );
    assert!(rig.model().vms[&100].running);
    assert!(rig.model().vms.contains_key(&9000));
    assert_eq!(
        rig.backend.vm_state(&vm(100)).await.unwrap(),
        VmState::Missing
    );
    assert!(rig.backend.list_vms().await.unwrap().is_empty());
}

#[tokio::test]
async fn status_and_listing_report_what_pvesh_lists() {
    let rig = Rig::new();
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    assert_eq!(
        rig.backend.vm_state(&handle).await.unwrap(),
        VmState::Stopped
    );
    rig.backend.start_vm(&handle).await.unwrap();
    assert_eq!(
        rig.backend.vm_state(&handle).await.unwrap(),
        VmState::Running
    );
    assert_eq!(
        rig.backend.list_vms().await.unwrap(),
        [ListedVm {
            vm: handle.clone(),
            owner: Some(OWNER.into())
        }]
    );
    // Gone behind our back: missing, which lets reconciliation clean up.
    rig.model().vms.remove(&100);
    assert_eq!(
        rig.backend.vm_state(&handle).await.unwrap(),
        VmState::Missing
    );
    let calls = rig.take();
    assert!(
        calls.ends_with(&[LIST.to_owned(), LIST.to_owned(), LIST.to_owned()]),
        "{calls:?}"
    );
}

#[tokio::test]
async fn sweep_removes_only_snippets_whose_vm_is_gone() {
    let rig = Rig::new();
    let live = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    let dir = rig.snippets.path();
    std::fs::write(dir.join("agentlab-sandbox-gone00000000.yaml"), "x").unwrap();
    std::fs::write(
        dir.join(".agentlab-sandbox-gone00000001.yaml.tmp-0199"),
        "x",
    )
    .unwrap();
    std::fs::write(dir.join("someone-elses-user-data.yaml"), "x").unwrap();
    rig.take();
    let swept = rig.backend.sweep().await.unwrap();
    assert_eq!(
        swept,
        [
            ".agentlab-sandbox-gone00000001.yaml.tmp-0199",
            "agentlab-sandbox-gone00000000.yaml"
        ]
    );
    assert_eq!(rig.take(), [LIST]);
    assert!(rig.snippet(&live.name).exists());
    assert!(dir.join("someone-elses-user-data.yaml").exists());
    assert!(rig.backend.sweep().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_template_that_cannot_serve_is_refused_before_any_clone() {
    type Case = (&'static str, fn(&mut Model), &'static str);
    let cases: [Case; 5] = [
        (
            "missing",
            |m| {
                m.vms.remove(&9000);
            },
            "template VM 9000 does not exist",
        ),
        (
            "not a template",
            |m| {
                m.vms.get_mut(&9000).unwrap().config.remove("template");
            },
            "qm template 9000",
        ),
        (
            "no agent",
            |m| {
                m.vms
                    .get_mut(&9000)
                    .unwrap()
                    .config
                    .insert("agent".into(), "0".into());
            },
            "guest agent",
        ),
        (
            "no cloud-init drive",
            |m| {
                m.vms.get_mut(&9000).unwrap().config.remove("ide2");
            },
            "cloud-init drive",
        ),
        ("firewall off", |m| m.cluster_firewall = false, "firewall"),
    ];
    for (case, break_it, expected) in cases {
        let rig = Rig::new();
        break_it(&mut rig.model());
        let err = rig
            .backend
            .clone_vm(&spec(NetworkMode::Restricted))
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::InvalidInput(_)),
            "{case}: {err}"
        );
        assert!(err.to_string().contains(expected), "{case}: {err}");
        let calls = rig.take();
        assert!(
            !calls.iter().any(|c| c.starts_with("qm clone")),
            "{case}: {calls:?}"
        );
    }
    let rig = Rig::new();
    let mut no_template = spec(NetworkMode::Egress);
    no_template.template = String::new();
    let err = rig
        .backend
        .clone_vm(&no_template)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("template_vmid"), "{err}");
    assert!(rig.take().is_empty());
}

/// The options qm(1) lists for each subcommand the backend uses (pve-docs, qm.1 synopsis).
fn accepted_options(subcommand: &str) -> &'static [&'static str] {
    match subcommand {
        "clone" => &[
            "--bwlimit",
            "--description",
            "--format",
            "--full",
            "--name",
            "--pool",
            "--snapname",
            "--storage",
            "--target",
        ],
        "set" => &[
            "--cores",
            "--memory",
            "--net0",
            "--ipconfig0",
            "--cicustom",
            "--tags",
            "--name",
            "--agent",
            "--delete",
        ],
        "destroy" => &["--destroy-unreferenced-disks", "--purge", "--skiplock"],
        "stop" => &[
            "--keepActive",
            "--migratedfrom",
            "--overrule-shutdown",
            "--skiplock",
            "--timeout",
        ],
        "start" => &["--skiplock", "--timeout", "--machine"],
        "guest exec" => &["--pass-stdin", "--synchronous", "--timeout"],
        "config" | "resize" | "guest cmd" | "guest exec-status" => &[],
        other => panic!("unexpected qm subcommand {other}"),
    }
}

#[tokio::test]
async fn every_qm_option_is_one_qm_accepts_and_every_command_has_its_timeout() {
    let rig = Rig::with(|c| c.storage = Some("local-lvm".into()));
    rig.hook(
        &["clone", "9000", "100", "--name", NAME, "--full", "0"],
        |_| {
            Some(fail(
                "Linked clone feature is not supported for drive 'scsi0'\n",
            ))
        },
    );
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Restricted))
        .await
        .unwrap();
    rig.backend.start_vm(&handle).await.unwrap();
    rig.backend.agent_ping(&handle).await.unwrap();
    let command = GuestCommand {
        path: "/usr/local/bin/agentlab-runner".into(),
        args: vec!["--bootstrap".into(), "/etc/agentlab/bootstrap.json".into()],
        env: Default::default(),
        stdin: None,
    };
    let pid = rig.backend.exec(&handle, &command).await.unwrap();
    rig.model().exec_statuses = vec![r#"{"exited":1,"exitcode":0}"#];
    rig.backend.exec_status(&handle, pid).await.unwrap();
    rig.backend.destroy_vm(&handle).await.unwrap();

    let calls = std::mem::take(&mut rig.model().calls);
    assert!(calls.len() > 10);
    for call in &calls {
        let expected = if call.args.get(1).map(String::as_str) == Some("cmd") {
            Duration::from_secs(4)
        } else {
            TIMEOUT
        };
        assert_eq!(call.timeout, expected, "{call:?}");
        if call.tool != Tool::Qm {
            continue;
        }
        let args: Vec<&str> = call.args.iter().map(String::as_str).collect();
        let (subcommand, rest) = match args[0] {
            "guest" => (format!("guest {}", args[1]), &args[2..]),
            _ => (args[0].to_owned(), &args[1..]),
        };
        // Options end at `--`; after it comes the guest's argv.
        let options = rest.iter().take_while(|a| **a != "--");
        for option in options.filter(|a| a.starts_with("--")) {
            assert!(
                accepted_options(&subcommand).contains(option),
                "qm {subcommand} does not accept {option}: {args:?}"
            );
        }
        if subcommand == "guest exec" {
            assert!(
                !args.contains(&"--timeout"),
                "qm refuses --timeout with --synchronous 0"
            );
        }
        if subcommand == "clone" && args.contains(&"--storage") {
            assert!(
                args.windows(2).any(|w| w == ["--full", "1"]),
                "--storage needs --full 1"
            );
        }
    }
}

#[tokio::test]
async fn the_node_comes_from_config_without_asking() {
    let rig = Rig::with(|c| c.node = Some("pve".into()));
    rig.backend.list_vms().await.unwrap();
    assert_eq!(rig.take(), [LIST]);
}

#[test]
fn the_recorder_refuses_control_characters_like_the_real_runner() {
    let recorder = Recorder(Arc::new(Mutex::new(Model::new())));
    let invocation = Invocation::new(Tool::Qm, ["set", "100", "--name", "a\nb"], TIMEOUT);
    assert!(recorder.run(&invocation).is_err());
    assert!(recorder.0.lock().unwrap().calls.is_empty());
}

/// After a restart the reconciler destroys VMs of ours the store does not know and sweeps the
/// snippets of VMs that are gone: the upstream shell backend leaked both. `sandbox-` VMs that
/// another daemon tagged, or that carry no owner tag (cloned by hand), are left alone.
#[actix_rt::test]
async fn reconciliation_destroys_unknown_vms_of_ours_and_sweeps_their_snippets() {
    use agentlab::actors::{reconciler, Clock, Hub, LiveConfig, Services};
    use agentlab::config::profile::Profiles;
    use agentlab::config::tuning::{Tuning, TuningHandle};
    use agentlab::config::Config;
    use agentlab::instance::{ForeignVm, Instance, InstanceId};
    use agentlab::metrics::Metrics;
    use agentlab::store::Store;

    let rig = Rig::new();
    // A VM cloned before a crash wiped the store, and the snippet of one destroyed by hand.
    rig.backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    let dir = rig.snippets.path().to_owned();
    std::fs::write(dir.join("agentlab-sandbox-handdeleted0.yaml"), "x").unwrap();
    for (vmid, name, tags) in [
        (
            300,
            "sandbox-theirs000000",
            Some("team-a;agentlab-owner-0199-another"),
        ),
        (301, "sandbox-byhand000000", None),
    ] {
        let mut config = template_config();
        config.remove("template");
        config.insert("name".into(), name.into());
        if let Some(tags) = tags {
            config.insert("tags".into(), tags.into());
        }
        rig.model().vms.insert(
            vmid,
            Vm {
                name: name.into(),
                running: true,
                template: false,
                config,
            },
        );
    }
    rig.take();

    let Rig {
        model,
        backend,
        snippets,
    } = rig;
    let svc = Services {
        config: Arc::new(Config::default()),
        store: Store::open_in_memory().unwrap(),
        backend: Arc::new(backend),
        tuning: TuningHandle::new(Tuning::default()),
        profiles: std::sync::RwLock::new(Arc::new(Profiles::default())),
        hub: Arc::new(Hub::default()),
        metrics: Metrics::new().unwrap(),
        guest_url: "http://10.77.0.1:8848".into(),
        clock: Clock::new(),
        live: LiveConfig::new(&Config::default()),
        pool: Default::default(),
        runner: None,
        instance: Instance::new(InstanceId::parse(OWNER).unwrap()),
    };
    let report = reconciler::reconcile(&svc, &Default::default())
        .await
        .unwrap();
    assert_eq!(report.destroyed_orphans, [NAME]);
    assert_eq!(report.swept, ["agentlab-sandbox-handdeleted0.yaml"]);
    let foreign = [
        ForeignVm {
            name: "sandbox-byhand000000".into(),
            vm_ref: "301".into(),
            owner: None,
        },
        ForeignVm {
            name: "sandbox-theirs000000".into(),
            vm_ref: "300".into(),
            owner: Some("0199-another".into()),
        },
    ];
    assert_eq!(report.foreign, foreign);
    assert_eq!(svc.instance.foreign(), foreign, "what status shows");
    assert!(std::fs::read_dir(snippets.path()).unwrap().next().is_none());
    let model = model.lock().unwrap();
    assert_eq!(model.vms.keys().collect::<Vec<_>>(), [&300, &301, &9000]);
    assert!(model.vms[&300].running && model.vms[&301].running);
    let calls: Vec<String> = model
        .calls
        .iter()
        .map(|c| format!("{} {}", c.tool.as_str(), c.args.join(" ")))
        .collect();
    assert_eq!(calls, [LIST, LIST, "qm destroy 100 --purge 1", LIST]);
}

#[tokio::test]
async fn the_owner_tag_joins_the_templates_tags_and_the_listing_reports_it() {
    let rig = Rig::new();
    // The template's own tags come along with the clone; a stale owner tag on it does not.
    rig.model()
        .vms
        .get_mut(&9000)
        .unwrap()
        .config
        .insert("tags".into(), "agentlab-owner-0199-old;ubuntu".into());
    let handle = rig
        .backend
        .clone_vm(&spec(NetworkMode::Egress))
        .await
        .unwrap();
    let set = rig
        .take()
        .into_iter()
        .find(|c| c.starts_with("qm set 100 "))
        .unwrap();
    assert!(
        set.ends_with(" --tags ubuntu;agentlab-owner-0199-contract-tests"),
        "{set}"
    );
    // What pvesh lists, whatever separator and order: the owner tag's id, or none.
    for (tags, owner) in [
        (
            Some("agentlab-owner-0199-contract-tests;ubuntu"),
            Some(OWNER),
        ),
        (Some("a,agentlab-owner-0199-x b"), Some("0199-x")),
        (Some("ubuntu"), None),
        (Some(""), None),
        (Some("agentlab-owner-"), None),
        (None, None),
    ] {
        {
            let mut model = rig.model();
            let config = &mut model.vms.get_mut(&100).unwrap().config;
            match tags {
                Some(tags) => config.insert("tags".into(), tags.into()),
                None => config.remove("tags"),
            };
        }
        let listed = rig.backend.list_vms().await.unwrap();
        assert_eq!(
            listed,
            [ListedVm {
                vm: handle.clone(),
                owner: owner.map(str::to_owned)
            }],
            "{tags:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_waits_for_a_cancelled_clone_and_destroys_what_it_made() {
    let rig = Rig::new();
    rig.model()
        .slow
        .push((vec!["clone".to_owned()], Duration::from_millis(400)));
    let spec = spec(NetworkMode::Egress);
    let cut = tokio::time::timeout(Duration::from_millis(100), rig.backend.clone_vm(&spec)).await;
    assert!(cut.is_err(), "cancelled while qm clone ran");
    // Meanwhile the VMID holds qemu-server's unnamed placeholder: a listing now finds nothing
    // under the name. The destroy path's lookup waits for the clone instead.
    let found = rig.backend.find_vm(NAME).await.unwrap();
    let found = found.expect("the clone's VM, once the clone is done");
    assert_eq!(found.vm, vm(100));
    assert_eq!(found.owner, None, "cut short before its qm set tagged it");
    rig.backend.destroy_vm(&found.vm).await.unwrap();
    assert_eq!(rig.model().vms.keys().collect::<Vec<_>>(), [&9000]);

    // A destroy by handle while the clone still runs waits for it too.
    let cut = tokio::time::timeout(Duration::from_millis(100), rig.backend.clone_vm(&spec)).await;
    assert!(cut.is_err());
    rig.backend.destroy_vm(&vm(100)).await.unwrap();
    assert_eq!(rig.model().vms.keys().collect::<Vec<_>>(), [&9000]);
    let calls = rig.take();
    let last_clone = calls
        .iter()
        .rposition(|c| c.starts_with("qm clone"))
        .unwrap();
    let last_destroy = calls
        .iter()
        .rposition(|c| c.starts_with("qm destroy 100"))
        .unwrap();
    assert!(last_clone < last_destroy, "{calls:?}");
}

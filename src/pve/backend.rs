//! `PveBackend`: the `Backend` trait in `qm`/`pvesh` terms. A sandbox is a linked clone of the
//! profile's template VM, named after the sandbox (`sandbox-…`); its VMID is the handle's
//! `vm_ref`. Listing and status come from `pvesh get /nodes/NODE/qemu`, so a VM that is gone
//! reads as missing and reconciliation can clean up after it.
//!
//! Safety rules, because the daemon shares the host with VMs it must never touch:
//! - only VMs whose name carries `model::VM_NAME_PREFIX` are listed, and a handle whose VMID now
//!   holds a VM of another name is treated as gone, never stopped or destroyed;
//! - templates are never started, changed or destroyed;
//! - every clone is tagged `agentlab-owner-ID` (`parse::OWNER_TAG_PREFIX`) with the daemon's
//!   instance id, in the `qm set` that configures it; `list_vms` reports that owner, and the
//!   reconciler leaves VMs with another owner, or none, alone.
//!
//! A `qm clone` runs in a blocking thread that holds its name's lock until qm exits, even when
//! the caller was cancelled (see `CloneHold`). A destroy, and `find_vm`, take the same lock (an
//! async wait), so a clone cut short by a timeout or cancel is waited for and then destroyed with
//! what it made, instead of finishing after the destroy and lingering.
//!
//! Every phase is idempotent for its VM name (see `backend` module docs): `clone_vm` finds a VM
//! already cloned under the name and configures it again, starting a running VM succeeds, and a
//! missing VM is destroyed already.
//!
//! Disk usage for the governor comes from the node's storages and their image volumes (`pvesh get
//! /nodes/NODE/storage`, `…/storage/ID/content`), one listing per storage for all VMs, kept for
//! `DISK_USAGE_MAX_AGE` so that admission rounds (up to one per second while jobs wait) do not
//! run `pvesh` each time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::command::{CommandError, CommandOutput, CommandRunner, DuctRunner, Invocation, Tool};
use super::errors::{ErrorClass, PveError};
use super::parse::{self, TemplateInfo, VmEntry};
use super::snippets;
use crate::backend::{
    Backend, BackendError, BackendKind, DiskUsage, ExecStatus, GuestCommand, ListedVm, NetworkMode,
    SandboxSpec, StartReport, VmHandle, VmState,
};
use crate::config::pve::PveConfig;
use crate::model::VM_NAME_PREFIX;

/// How many VMIDs a clone tries before giving up: another creator may take each one between
/// `nextid` and the clone.
const ID_ATTEMPTS: u32 = 5;

/// How long a guest file read (a synchronous `qm guest exec`) may take.
const GUEST_READ_TIMEOUT_SECONDS: u64 = 15;
/// The exit code of the read's shell when the file does not exist.
const ABSENT_EXIT: i64 = 3;
/// How often `exec_status` asks again when the guest agent does not answer: one missed poll of a
/// long job should not fail it.
const STATUS_ATTEMPTS: u32 = 3;
const STATUS_RETRY_WAIT: Duration = Duration::from_millis(500);

/// The guest's `env(1)`, for commands given an environment: `qm guest exec` has no option for it.
const GUEST_ENV: &str = "/usr/bin/env";

/// What `qm guest exec --pass-stdin 1` forwards at most (it aborts past 1 MiB).
const MAX_PASS_STDIN_BYTES: usize = 1024 * 1024;

/// How long a disk-usage measurement is reused: disks grow over minutes, and each `pvesh` costs
/// the node a fraction of a CPU second.
const DISK_USAGE_MAX_AGE: Duration = Duration::from_secs(5);

/// Held while a `qm clone` for a name runs, by the blocking thread that waits for it: a clone
/// whose caller was cancelled goes on to the end, and a re-run for the same name must wait for it
/// rather than clone a second VM under that name.
type CloneHold = Arc<tokio::sync::OwnedMutexGuard<()>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
pub struct PveBackend {
    config: PveConfig,
    /// `proxmox_command_timeout`: the cap on every command but the agent ping.
    command_timeout: Duration,
    runner: Arc<dyn CommandRunner>,
    /// This host's name, to pick our node out of a cluster's.
    hostname: Option<String>,
    node: tokio::sync::OnceCell<String>,
    /// Templates that passed validation, by (VMID, restricted network), and when.
    templates: Mutex<HashMap<(u32, bool), (Instant, TemplateInfo)>>,
    /// Exit statuses already collected: the guest agent reports an exit only once, and a
    /// restarted actor may ask again.
    finished: Mutex<HashMap<(u32, i64), ExecStatus>>,
    /// One lock per VM name, held across a clone (see `CloneHold`).
    clones: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    issued: AtomicU64,
    /// The last disk-usage measurement, and when it was taken.
    disk_usage: Mutex<Option<(Instant, DiskUsage)>>,
}

/// Whether a VMID still holds the VM a handle names.
enum Ownership {
    Ours(VmEntry),
    Gone,
}

impl PveBackend {
    /// A backend running commands through `runner` (the contract tests pass a recorder).
    pub fn new(
        config: PveConfig,
        command_timeout: Duration,
        runner: Arc<dyn CommandRunner>,
    ) -> Result<PveBackend, BackendError> {
        config
            .validate()
            .map_err(|e| BackendError::InvalidInput(e.to_string()))?;
        if command_timeout.is_zero() {
            return Err(BackendError::InvalidInput(
                "proxmox_command_timeout must be above 0".into(),
            ));
        }
        Ok(PveBackend {
            config,
            command_timeout,
            runner,
            hostname: local_hostname(),
            node: tokio::sync::OnceCell::new(),
            templates: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashMap::new()),
            clones: Mutex::new(HashMap::new()),
            issued: AtomicU64::new(0),
            disk_usage: Mutex::new(None),
        })
    }

    /// The production backend: the configured `qm` and `pvesh` through duct.
    pub fn with_duct(
        config: PveConfig,
        command_timeout: Duration,
    ) -> Result<PveBackend, BackendError> {
        let runner = DuctRunner {
            qm: config.qm_binary.clone(),
            pvesh: config.pvesh_binary.clone(),
            kill_grace: config.kill_grace,
        };
        PveBackend::new(config, command_timeout, Arc::new(runner))
    }

    /// Replaces the host name node detection matches against.
    pub fn with_hostname(mut self, hostname: Option<String>) -> Self {
        self.hostname = hostname;
        self
    }

    /// How many commands this backend has run (retries included).
    pub fn commands_issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Checks the host once at daemon start: the node is known and the snippets folder exists.
    pub async fn preflight(&self) -> Result<String, BackendError> {
        let node = self.node().await.map_err(|e| e.into_backend("preflight"))?;
        let dir = self.config.snippets_dir.clone();
        let is_dir = tokio::fs::metadata(&dir).await.map(|m| m.is_dir());
        if !matches!(is_dir, Ok(true)) {
            return Err(BackendError::InvalidInput(format!(
                "pve.snippets_dir {} is not a folder: enable content type `snippets` on storage \
                 `{}` (pvesm set {} --content …,snippets) or point pve.snippets_dir at its \
                 snippets folder",
                dir.display(),
                self.config.snippets_storage,
                self.config.snippets_storage
            )));
        }
        Ok(node)
    }

    /// The lock of VM name `name` (see `CloneHold`).
    fn name_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.clones).entry(name.to_owned()).or_default())
    }

    /// Forgets the lock of a destroyed VM's name, unless someone holds or awaits it.
    fn forget_name_lock(&self, name: &str) {
        let mut clones = lock(&self.clones);
        if clones.get(name).is_some_and(|l| Arc::strong_count(l) == 1) {
            clones.remove(name);
        }
    }

    fn invocation<S: Into<String>>(
        &self,
        tool: Tool,
        args: impl IntoIterator<Item = S>,
    ) -> Invocation {
        Invocation::new(tool, args, self.command_timeout)
    }

    /// Runs one command off the executor; a non-zero exit is an error carrying its stderr.
    /// `hold` stays held until the command ends, even if this future is dropped before.
    async fn run_once(
        &self,
        invocation: Invocation,
        hold: Option<CloneHold>,
    ) -> Result<CommandOutput, PveError> {
        let runner = Arc::clone(&self.runner);
        let command = invocation.display();
        self.issued.fetch_add(1, Ordering::Relaxed);
        let output = tokio::task::spawn_blocking(move || {
            let _hold = hold;
            runner.run(&invocation)
        })
        .await
        .map_err(|e| PveError::Invalid(format!("`{command}` did not finish: {e}")))??;
        tracing::debug!(%command, elapsed_ms = output.elapsed.as_millis() as u64, code = ?output.code, "pve command");
        if output.success() {
            Ok(output)
        } else {
            Err(PveError::failed(command, &output))
        }
    }

    /// Runs a command, trying again with a doubling backoff while Proxmox reports the VM locked
    /// or busy. Returns its stdout.
    async fn run(&self, invocation: Invocation) -> Result<String, PveError> {
        self.run_holding(invocation, None).await
    }

    async fn run_holding(
        &self,
        invocation: Invocation,
        hold: Option<CloneHold>,
    ) -> Result<String, PveError> {
        let mut wait = self.config.busy_backoff;
        let mut attempt = 0;
        loop {
            match self.run_once(invocation.clone(), hold.clone()).await {
                Ok(output) => return Ok(output.stdout),
                Err(err) if err.is(ErrorClass::Busy) && attempt < self.config.busy_retries => {
                    attempt += 1;
                    tracing::info!(command = %invocation.display(), %err, ?wait, attempt, "busy; trying again");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn qm<S: Into<String>>(
        &self,
        args: impl IntoIterator<Item = S>,
    ) -> Result<String, PveError> {
        self.run(self.invocation(Tool::Qm, args)).await
    }

    async fn pvesh_json(&self, path: &str) -> Result<String, PveError> {
        self.run(self.invocation(Tool::Pvesh, ["get", path, "--output-format", "json"]))
            .await
    }

    /// The node this daemon runs on: configured, the only one, or the one named like this host.
    async fn node(&self) -> Result<String, PveError> {
        self.node
            .get_or_try_init(|| async {
                if let Some(node) = &self.config.node {
                    return Ok(node.clone());
                }
                let text = self
                    .run(self.invocation(Tool::Pvesh, ["get", "/nodes", "--output-format", "json"]))
                    .await?;
                let nodes = parse::nodes(&text)
                    .map_err(|problem| unreadable("pvesh get /nodes", problem, &text))?;
                let node = pick_node(
                    nodes.into_iter().map(|n| n.node).collect(),
                    self.hostname.as_deref(),
                )?;
                tracing::info!(%node, "Proxmox node detected");
                Ok(node)
            })
            .await
            .cloned()
    }

    /// Measures what our sandboxes' disks take: the storages, each image storage's volumes, and
    /// the VMs they belong to.
    async fn measure_disks(&self) -> Result<DiskUsage, PveError> {
        let node = self.node().await?;
        let path = format!("/nodes/{node}/storage");
        let text = self.pvesh_json(&path).await?;
        let storages = parse::storages(&text)
            .map_err(|problem| unreadable(&format!("pvesh get {path}"), problem, &text))?;
        let mut volumes = Vec::new();
        for storage in storages.iter().filter(|s| s.holds_images()) {
            if storage.storage.contains('/') || storage.storage.chars().any(char::is_control) {
                continue;
            }
            let path = format!("/nodes/{node}/storage/{}/content", storage.storage);
            let invocation = self.invocation(
                Tool::Pvesh,
                [
                    "get",
                    &path,
                    "--content",
                    "images",
                    "--output-format",
                    "json",
                ],
            );
            let text = self.run(invocation).await?;
            let list = parse::volumes(&text)
                .map_err(|problem| unreadable(&format!("pvesh get {path}"), problem, &text))?;
            volumes.push((storage.storage.clone(), list));
        }
        let vms = self.list().await?;
        Ok(parse::disk_usage(&storages, &volumes, &vms))
    }

    /// Every VM on our node.
    async fn list(&self) -> Result<Vec<VmEntry>, PveError> {
        let path = format!("/nodes/{}/qemu", self.node().await?);
        let text = self.pvesh_json(&path).await?;
        parse::vms(&text)
            .map_err(|problem| unreadable(&format!("pvesh get {path}"), problem, &text))
    }

    async fn lookup(&self, vmid: u32) -> Result<Option<VmEntry>, PveError> {
        Ok(self.list().await?.into_iter().find(|vm| vm.vmid == vmid))
    }

    /// Whether `vm`'s VMID still holds that VM (same name, not a template).
    async fn ownership(&self, vm: &VmHandle, vmid: u32) -> Result<Ownership, PveError> {
        Ok(match self.lookup(vmid).await? {
            Some(entry) if entry.name() == vm.name && !entry.template => Ownership::Ours(entry),
            Some(entry) => {
                tracing::warn!(vmid, expected = %vm.name, found = %entry.name(), template = entry.template,
                    "the VMID now holds another VM; ours is gone and the other is left alone");
                Ownership::Gone
            }
            None => Ownership::Gone,
        })
    }

    /// The VM cloned under `name`, if any. Duplicates (which only a hand-made VM can cause) are
    /// resolved to the lowest VMID.
    async fn find_by_name(&self, name: &str) -> Result<Option<VmEntry>, PveError> {
        let mut matches: Vec<VmEntry> = self
            .list()
            .await?
            .into_iter()
            .filter(|vm| vm.name() == name && !vm.template)
            .collect();
        matches.sort_by_key(|vm| vm.vmid);
        if matches.len() > 1 {
            let ids: Vec<u32> = matches.iter().map(|vm| vm.vmid).collect();
            tracing::warn!(%name, ?ids, "several VMs carry this name; using the first");
        }
        Ok(matches.into_iter().next())
    }

    /// Validates template `vmid` (cached for `template_check_ttl`): a template with the guest
    /// agent and a cloud-init drive, and, for a restricted network, the firewall that enforces it.
    async fn template(&self, vmid: u32, restricted: bool) -> Result<TemplateInfo, PveError> {
        let key = (vmid, restricted);
        if let Some((at, info)) = lock(&self.templates).get(&key) {
            if at.elapsed() < self.config.template_check_ttl {
                return Ok(info.clone());
            }
        }
        let text = self
            .qm(["config".to_owned(), vmid.to_string()])
            .await
            .map_err(|err| {
                if err.is(ErrorClass::VmMissing) {
                    PveError::Invalid(format!(
                        "template VM {vmid} does not exist on this node (check the profile's \
                     template_vmid; scripts/create_template.sh makes one): {err}"
                    ))
                } else {
                    err
                }
            })?;
        let info =
            parse::template_info(vmid, &parse::qm_config(&text)).map_err(PveError::Invalid)?;
        if restricted {
            self.check_firewall(vmid).await?;
        }
        lock(&self.templates).insert(key, (Instant::now(), info.clone()));
        Ok(info)
    }

    /// A restricted sandbox may reach only the daemon's guest endpoint. On Proxmox that is the
    /// VM firewall (copied from the template by `qm clone`, applied through `firewall=1` on
    /// net0), which only acts while the datacenter firewall is on.
    async fn check_firewall(&self, template: u32) -> Result<(), PveError> {
        let text = self.pvesh_json("/cluster/firewall/options").await?;
        let cluster = parse::firewall_options(&text)
            .map_err(|problem| unreadable("pvesh get /cluster/firewall/options", problem, &text))?;
        if !cluster.enable {
            return Err(PveError::Invalid(
                "restricted sandboxes rely on the Proxmox firewall, which is off for the \
                 datacenter (`pvesh set /cluster/firewall/options --enable 1`; see \
                 docs/proxmox.md)"
                    .into(),
            ));
        }
        let path = format!(
            "/nodes/{}/qemu/{template}/firewall/options",
            self.node().await?
        );
        let text = self.pvesh_json(&path).await?;
        let vm = parse::firewall_options(&text)
            .map_err(|problem| unreadable(&format!("pvesh get {path}"), problem, &text))?;
        if !vm.enable
            || !vm
                .policy_out
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case("DROP"))
        {
            return Err(PveError::Invalid(format!(
                "restricted sandboxes need template {template}'s firewall enabled with outbound \
                 policy DROP and a rule letting the guest reach the daemon \
                 (scripts/create_template.sh sets it up; see docs/proxmox.md)"
            )));
        }
        Ok(())
    }

    async fn nextid(&self) -> Result<u32, PveError> {
        let text = self
            .run(self.invocation(Tool::Pvesh, ["get", "/cluster/nextid"]))
            .await?;
        parse::nextid(&text)
            .map_err(|problem| unreadable("pvesh get /cluster/nextid", problem, &text))
    }

    /// Clones `template` under `name` and returns the new VMID: a linked clone, or a full one
    /// when the template's storage cannot link.
    async fn clone_from(
        &self,
        template: u32,
        name: &str,
        hold: &CloneHold,
    ) -> Result<u32, PveError> {
        let mut full = false;
        for _ in 0..ID_ATTEMPTS {
            let vmid = self.nextid().await?;
            let mut args = vec![
                "clone".to_owned(),
                template.to_string(),
                vmid.to_string(),
                "--name".to_owned(),
                name.to_owned(),
                "--full".to_owned(),
                if full { "1" } else { "0" }.to_owned(),
            ];
            // `--storage` is only valid for a full clone; qm refuses it on a linked one.
            if let (true, Some(storage)) = (full, &self.config.storage) {
                args.extend(["--storage".to_owned(), storage.clone()]);
            }
            let invocation = self.invocation(Tool::Qm, args);
            match self.run_holding(invocation, Some(Arc::clone(hold))).await {
                Ok(_) => return Ok(vmid),
                Err(err) if err.is(ErrorClass::IdTaken) => {
                    tracing::info!(vmid, %err, "VMID taken meanwhile; picking another");
                }
                Err(err) if err.is(ErrorClass::LinkedCloneUnsupported) && !full => {
                    tracing::warn!(template, %err, "no linked clone on this storage; falling back to a full clone (slow)");
                    self.remove_clone_residue(vmid, name).await?;
                    full = true;
                }
                Err(err) => return Err(err),
            }
        }
        Err(PveError::Invalid(format!(
            "no free VMID after {ID_ATTEMPTS} tries (every one was taken before the clone)"
        )))
    }

    /// Removes what a failed clone to `vmid` left: its config (named `name`, or the unnamed
    /// placeholder `qm clone` writes first) and any disk it made.
    async fn remove_clone_residue(&self, vmid: u32, name: &str) -> Result<(), PveError> {
        let Some(entry) = self.lookup(vmid).await? else {
            return Ok(());
        };
        if entry.template || !(entry.name() == name || entry.name().is_empty()) {
            return Ok(());
        }
        tracing::info!(vmid, "removing the residue of the failed linked clone");
        // The lock is the dead clone's own; the clone task has exited.
        match self
            .qm([
                "destroy",
                &vmid.to_string(),
                "--purge",
                "1",
                "--skiplock",
                "1",
            ])
            .await
        {
            Err(err) if !err.is(ErrorClass::VmMissing) => Err(err),
            _ => Ok(()),
        }
    }

    /// Writes the user-data snippet and sets the clone's resources, network, cloud-init and owner
    /// tag; grows its boot disk to the profile's size. Every step can run again, and each holds
    /// the name's lock until it is done, like the clone.
    async fn configure(
        &self,
        vmid: u32,
        spec: &SandboxSpec,
        info: &TemplateInfo,
        hold: &CloneHold,
    ) -> Result<(), PveError> {
        // The same user-data as the local backend's seed; Proxmox makes the meta-data itself.
        let contents = crate::cloudinit::render_for(
            &spec.name,
            spec.cloud_init.as_ref(),
            spec.runner.as_ref(),
        )
        .map_err(|e| PveError::Invalid(e.to_string()))?
        .user_data;
        let (dir, name) = (self.config.snippets_dir.clone(), spec.name.clone());
        let snippet_hold = Arc::clone(hold);
        tokio::task::spawn_blocking(move || {
            let _hold = snippet_hold;
            snippets::write(&dir, &name, &contents)
        })
        .await
        .map_err(|e| PveError::Invalid(format!("writing the snippet did not finish: {e}")))??;
        let firewall = match spec.network {
            NetworkMode::Restricted => 1,
            NetworkMode::Egress => 0,
        };
        let set = self.invocation(
            Tool::Qm,
            [
                "set".to_owned(),
                vmid.to_string(),
                "--cores".to_owned(),
                spec.cores.to_string(),
                "--memory".to_owned(),
                spec.memory_mb.to_string(),
                "--net0".to_owned(),
                format!("virtio,bridge={},firewall={firewall}", self.config.bridge),
                "--ipconfig0".to_owned(),
                "ip=dhcp".to_owned(),
                "--cicustom".to_owned(),
                format!(
                    "user={}",
                    snippets::volume(&self.config.snippets_storage, &spec.name)
                ),
                "--tags".to_owned(),
                parse::tags_with_owner(&info.tags, &spec.owner),
            ],
        );
        self.run_holding(set, Some(Arc::clone(hold))).await?;
        // An absolute size, not `+N`, so that running this again never grows the disk twice;
        // never smaller than the template's, which qm refuses.
        let want = spec.disk_gb.saturating_mul(1 << 30);
        if info.root_size_bytes.is_some_and(|have| have >= want) {
            return Ok(());
        }
        let resize = self.invocation(
            Tool::Qm,
            [
                "resize".to_owned(),
                vmid.to_string(),
                info.root_disk.clone(),
                format!("{}G", spec.disk_gb),
            ],
        );
        match self.run_holding(resize, Some(Arc::clone(hold))).await {
            Err(PveError::Failed { stderr, .. }) if stderr.contains("shrinking") => Ok(()),
            other => other.map(drop),
        }
    }

    /// Stops and destroys VM `vmid` if it still is `vm`, and removes its snippet. The caller holds
    /// the name's lock.
    async fn destroy_unlocked(&self, vm: &VmHandle, vmid: u32) -> Result<(), BackendError> {
        let fail = |e: PveError| e.into_backend("destroy");
        if let Ownership::Ours(entry) = self.ownership(vm, vmid).await.map_err(fail)? {
            let id = vmid.to_string();
            if entry.status != "stopped" {
                match self.qm(["stop", &id]).await {
                    Err(err)
                        if !(err.is(ErrorClass::VmMissing) || err.is(ErrorClass::VmNotRunning)) =>
                    {
                        return Err(fail(err))
                    }
                    _ => {}
                }
            }
            match self.qm(["destroy", &id, "--purge", "1"]).await {
                Err(err) if !err.is(ErrorClass::VmMissing) => return Err(fail(err)),
                _ => tracing::info!(vm = %vm.name, vmid, "VM destroyed"),
            }
        }
        let (dir, name) = (self.config.snippets_dir.clone(), vm.name.clone());
        tokio::task::spawn_blocking(move || snippets::remove(&dir, &name))
            .await
            .map_err(|e| BackendError::operation("destroy", e.to_string()))?
            .map_err(fail)?;
        lock(&self.finished).retain(|(id, _), _| *id != vmid);
        Ok(())
    }
}

/// The VMID a handle records.
fn vmid_of(vm: &VmHandle) -> Result<u32, BackendError> {
    vm.vm_ref
        .parse::<u32>()
        .ok()
        .filter(|id| parse::VMID_RANGE.contains(id))
        .ok_or_else(|| {
            BackendError::InvalidInput(format!(
                "vm_ref `{}` of {} is not a VMID (was it made by another backend?)",
                vm.vm_ref, vm.name
            ))
        })
}

fn handle(name: &str, vmid: u32) -> VmHandle {
    VmHandle {
        name: name.to_owned(),
        vm_ref: vmid.to_string(),
    }
}

/// A sandbox name is also a Proxmox VM name (a DNS label), a hostname and part of a file name.
fn check_name(name: &str) -> Result<(), BackendError> {
    let plain = name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    if name.starts_with(VM_NAME_PREFIX) && plain {
        Ok(())
    } else {
        Err(BackendError::InvalidInput(format!(
            "VM name `{name}` must be `{VM_NAME_PREFIX}` followed by a-z, 0-9 and '-'"
        )))
    }
}

fn unreadable(command: &str, problem: String, output: &str) -> PveError {
    let mut output = output.trim().to_owned();
    output.truncate(300);
    PveError::Unreadable {
        command: command.to_owned(),
        problem,
        output,
    }
}

/// Picks this host's node: the only one, or the one named like this host (Proxmox names a node
/// after the host's short name).
fn pick_node(nodes: Vec<String>, hostname: Option<&str>) -> Result<String, PveError> {
    if nodes.len() == 1 {
        return Ok(nodes.into_iter().next().unwrap_or_default());
    }
    let short = hostname.map(|h| h.split('.').next().unwrap_or(h));
    if let Some(found) = nodes.iter().find(|n| Some(n.as_str()) == short) {
        return Ok(found.clone());
    }
    Err(PveError::Invalid(format!(
        "cannot tell which of the nodes {nodes:?} this host ({}) is; set pve.node",
        short.unwrap_or("unknown")
    )))
}

fn local_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// The argv after `--` that starts `command` in the guest. An environment goes through the
/// guest's `env(1)`, since `qm guest exec` cannot pass one.
fn guest_argv(command: &GuestCommand) -> Result<Vec<String>, BackendError> {
    let mut argv = Vec::new();
    if !command.env.is_empty() {
        argv.push(GUEST_ENV.to_owned());
        for (key, value) in &command.env {
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(BackendError::InvalidInput(format!(
                    "`{key}` is not an environment variable name"
                )));
            }
            argv.push(format!("{key}={value}"));
        }
    }
    argv.push(command.path.clone());
    argv.extend(command.args.iter().cloned());
    Ok(argv)
}

#[async_trait]
impl Backend for PveBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Pve
    }

    async fn clone_vm(&self, spec: &SandboxSpec) -> Result<VmHandle, BackendError> {
        check_name(&spec.name)?;
        if spec.cores == 0 || spec.memory_mb == 0 || spec.disk_gb == 0 {
            return Err(BackendError::InvalidInput(format!(
                "{}: cores, memory_mb and disk_gb must be above 0",
                spec.name
            )));
        }
        let template: u32 = spec
            .template
            .parse()
            .ok()
            .filter(|id| parse::VMID_RANGE.contains(id))
            .ok_or_else(|| {
                BackendError::InvalidInput(format!(
                    "template `{}` is not a VMID: the profile needs template_vmid for the pve \
                     backend",
                    spec.template
                ))
            })?;
        let restricted = spec.network == NetworkMode::Restricted;
        let fail = |e: PveError| e.into_backend("clone");
        let info = self.template(template, restricted).await.map_err(fail)?;
        let hold: CloneHold = Arc::new(self.name_lock(&spec.name).lock_owned().await);
        // A restarted actor re-runs this phase: the VM may exist already, configured or not.
        if let Some(existing) = self.find_by_name(&spec.name).await.map_err(fail)? {
            if !existing.running() {
                self.configure(existing.vmid, spec, &info, &hold)
                    .await
                    .map_err(fail)?;
            }
            tracing::info!(vm = %spec.name, vmid = existing.vmid, "VM exists already");
            return Ok(handle(&spec.name, existing.vmid));
        }
        let started = Instant::now();
        let vmid = self
            .clone_from(template, &spec.name, &hold)
            .await
            .map_err(fail)?;
        self.configure(vmid, spec, &info, &hold)
            .await
            .map_err(fail)?;
        tracing::info!(vm = %spec.name, vmid, template, elapsed_ms = started.elapsed().as_millis() as u64, "cloned");
        Ok(handle(&spec.name, vmid))
    }

    async fn start_vm(&self, vm: &VmHandle) -> Result<StartReport, BackendError> {
        let vmid = vmid_of(vm)?;
        let fail = |e: PveError| e.into_backend("start");
        match self.ownership(vm, vmid).await.map_err(fail)? {
            Ownership::Gone => return Err(BackendError::Missing(vm.name.clone())),
            Ownership::Ours(entry) if entry.running() => return Ok(StartReport::cold()),
            Ownership::Ours(_) => {}
        }
        match self.qm(["start".to_owned(), vmid.to_string()]).await {
            Ok(_) => Ok(StartReport::cold()),
            Err(err) if err.is(ErrorClass::AlreadyRunning) => Ok(StartReport::cold()),
            Err(err) if err.is(ErrorClass::VmMissing) => {
                Err(BackendError::Missing(vm.name.clone()))
            }
            Err(err) => Err(fail(err)),
        }
    }

    async fn agent_ping(&self, vm: &VmHandle) -> Result<(), BackendError> {
        let vmid = vmid_of(vm)?;
        let invocation = Invocation::new(
            Tool::Qm,
            [
                "guest".to_owned(),
                "cmd".to_owned(),
                vmid.to_string(),
                "ping".to_owned(),
            ],
            self.config.agent_ping_timeout.min(self.command_timeout),
        );
        match self.run_once(invocation, None).await {
            Ok(_) => Ok(()),
            Err(PveError::Command(CommandError::Timeout { seconds, .. })) => Err(
                BackendError::AgentUnavailable(format!("no answer to a ping within {seconds:.0}s")),
            ),
            Err(err) if err.is(ErrorClass::VmMissing) => {
                Err(BackendError::Missing(vm.name.clone()))
            }
            Err(err) => Err(err.into_backend("guest ping")),
        }
    }

    async fn exec(&self, vm: &VmHandle, command: &GuestCommand) -> Result<i64, BackendError> {
        let vmid = vmid_of(vm)?;
        let fail = |e: PveError| e.into_backend("guest exec");
        match self.ownership(vm, vmid).await.map_err(fail)? {
            Ownership::Gone => return Err(BackendError::Missing(vm.name.clone())),
            Ownership::Ours(entry) if !entry.running() => {
                return Err(BackendError::operation(
                    "guest exec",
                    format!("{} (VM {vmid}) is not running", vm.name),
                ))
            }
            Ownership::Ours(_) => {}
        }
        let mut args = vec![
            "guest".to_owned(),
            "exec".to_owned(),
            vmid.to_string(),
            // Asynchronous: qm returns the pid at once. (`--timeout` only goes with a
            // synchronous exec; qm refuses the pair.)
            "--synchronous".to_owned(),
            "0".to_owned(),
        ];
        if let Some(input) = &command.stdin {
            if input.len() > MAX_PASS_STDIN_BYTES {
                return Err(BackendError::InvalidInput(format!(
                    "{} bytes of stdin for a guest command: qm passes at most {MAX_PASS_STDIN_BYTES}",
                    input.len()
                )));
            }
            // qm reads its own stdin to EOF and hands it to the agent as input-data.
            args.extend(["--pass-stdin".to_owned(), "1".to_owned()]);
        }
        args.push("--".to_owned());
        args.extend(guest_argv(command)?);
        let mut invocation = self.invocation(Tool::Qm, args);
        invocation.loggable = false;
        invocation.stdin = command
            .stdin
            .as_ref()
            .map(|input| input.as_bytes().to_vec());
        let text = self.run(invocation).await.map_err(fail)?;
        parse::exec_pid(&text)
            .map_err(|problem| fail(unreadable(&format!("qm guest exec {vmid}"), problem, &text)))
    }

    /// `qm guest exec` (synchronous) of `head -c`: qm has no file-read of its own, and its
    /// exec-status hands back the output, up to qemu-ga's own cap on it.
    async fn read_guest_file(
        &self,
        vm: &VmHandle,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, BackendError> {
        let vmid = vmid_of(vm)?;
        let args = vec![
            "guest".to_owned(),
            "exec".to_owned(),
            vmid.to_string(),
            "--timeout".to_owned(),
            GUEST_READ_TIMEOUT_SECONDS.to_string(),
            "--".to_owned(),
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            format!(
                "test -e \"$1\" || exit {ABSENT_EXIT}; exec head -c {} -- \"$1\"",
                limit + 1
            ),
            "sh".to_owned(),
            path.to_owned(),
        ];
        let text = self
            .run(self.invocation(Tool::Qm, args))
            .await
            .map_err(|e| e.into_backend("guest file read"))?;
        let (code, output) = parse::exec_output(&text).map_err(|problem| {
            unreadable(
                &format!("qm guest exec {vmid} -- head -c {} {path}", limit + 1),
                problem,
                &text,
            )
            .into_backend("guest file read")
        })?;
        match code {
            Some(0) if output.len() > limit => Err(BackendError::operation(
                "guest file read",
                format!("{path} is larger than {limit} bytes"),
            )),
            Some(0) => Ok(Some(output)),
            Some(ABSENT_EXIT) => Ok(None),
            other => Err(BackendError::operation(
                "guest file read",
                format!("reading {path} in VM {vmid} ended with {other:?}"),
            )),
        }
    }

    async fn exec_status(&self, vm: &VmHandle, pid: i64) -> Result<ExecStatus, BackendError> {
        let vmid = vmid_of(vm)?;
        if let Some(status) = lock(&self.finished).get(&(vmid, pid)) {
            return Ok(*status);
        }
        let args = [
            "guest".to_owned(),
            "exec-status".to_owned(),
            vmid.to_string(),
            pid.to_string(),
        ];
        let mut attempt = 1;
        let text = loop {
            match self.run(self.invocation(Tool::Qm, args.clone())).await {
                Ok(text) => break text,
                Err(err) if err.is(ErrorClass::VmMissing) => {
                    return Err(BackendError::Missing(vm.name.clone()))
                }
                Err(err) if err.is(ErrorClass::AgentNotRunning) && attempt < STATUS_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(STATUS_RETRY_WAIT).await;
                }
                Err(err) => return Err(err.into_backend("guest exec-status")),
            }
        };
        let status = parse::exec_status(&text).map_err(|problem| {
            unreadable(
                &format!("qm guest exec-status {vmid} {pid}"),
                problem,
                &text,
            )
            .into_backend("guest exec-status")
        })?;
        if status != ExecStatus::Running {
            lock(&self.finished).insert((vmid, pid), status);
        }
        Ok(status)
    }

    async fn destroy_vm(&self, vm: &VmHandle) -> Result<(), BackendError> {
        let vmid = vmid_of(vm)?;
        let name_lock = self.name_lock(&vm.name);
        let result = {
            // A clone of this name still running in its thread is waited for.
            let _waited = name_lock.lock().await;
            self.destroy_unlocked(vm, vmid).await
        };
        drop(name_lock);
        self.forget_name_lock(&vm.name);
        result
    }

    async fn find_vm(&self, name: &str) -> Result<Option<ListedVm>, BackendError> {
        let name_lock = self.name_lock(name);
        let found = {
            // What a clone still running makes is found once it is made.
            let _waited = name_lock.lock().await;
            self.find_by_name(name).await
        };
        drop(name_lock);
        self.forget_name_lock(name);
        Ok(found
            .map_err(|e| e.into_backend("list"))?
            .map(|entry| ListedVm {
                owner: entry.owner(),
                vm: handle(name, entry.vmid),
            }))
    }

    async fn vm_state(&self, vm: &VmHandle) -> Result<VmState, BackendError> {
        let vmid = vmid_of(vm)?;
        Ok(
            match self
                .ownership(vm, vmid)
                .await
                .map_err(|e| e.into_backend("status"))?
            {
                Ownership::Gone => VmState::Missing,
                Ownership::Ours(entry) if entry.running() => VmState::Running,
                Ownership::Ours(_) => VmState::Stopped,
            },
        )
    }

    async fn list_vms(&self) -> Result<Vec<ListedVm>, BackendError> {
        let mut vms: Vec<ListedVm> = self
            .list()
            .await
            .map_err(|e| e.into_backend("list"))?
            .into_iter()
            .filter(|vm| !vm.template && vm.name().starts_with(VM_NAME_PREFIX))
            .map(|vm| ListedVm {
                owner: vm.owner(),
                vm: handle(vm.name(), vm.vmid),
            })
            .collect();
        vms.sort_by(|a, b| a.vm.name.cmp(&b.vm.name));
        Ok(vms)
    }

    async fn disk_usage(&self) -> Result<DiskUsage, BackendError> {
        if let Some((at, usage)) = lock(&self.disk_usage).as_ref() {
            if at.elapsed() < DISK_USAGE_MAX_AGE {
                return Ok(usage.clone());
            }
        }
        let usage = self
            .measure_disks()
            .await
            .map_err(|e| e.into_backend("disk usage"))?;
        *lock(&self.disk_usage) = Some((Instant::now(), usage.clone()));
        Ok(usage)
    }

    /// Removes the snippets (and half-written snippet files) of VMs that no longer exist. The
    /// folder is read before the VM list: a clone writes its snippet only after its VM exists,
    /// so every snippet listed here either has its VM in the list that follows or is an orphan.
    async fn sweep(&self) -> Result<Vec<String>, BackendError> {
        let dir = self.config.snippets_dir.clone();
        let listed = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || snippets::list(&dir))
                .await
                .map_err(|e| BackendError::operation("sweep", e.to_string()))?
                .map_err(|e| e.into_backend("sweep"))?
        };
        if listed.is_empty() {
            return Ok(Vec::new());
        }
        let live: HashSet<String> = self
            .list()
            .await
            .map_err(|e| e.into_backend("sweep"))?
            .into_iter()
            .filter_map(|vm| vm.name)
            .collect();
        let orphans: BTreeMap<String, String> = listed
            .into_iter()
            .filter(|(_, entry)| !live.contains(entry.vm_name()))
            .map(|(file, entry)| (file, entry.vm_name().to_owned()))
            .collect();
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        tokio::task::spawn_blocking(move || {
            let mut swept = Vec::new();
            for (file, vm_name) in orphans {
                match snippets::remove_named(&dir, &file) {
                    Ok(_) => {
                        tracing::info!(%file, vm = %vm_name, "removed the snippet of a VM that is gone");
                        swept.push(file);
                    }
                    Err(err) => tracing::warn!(%file, %err, "removing an orphan snippet failed"),
                }
            }
            swept
        })
        .await
        .map_err(|e| BackendError::operation("sweep", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_is_the_only_one_or_this_hosts() {
        assert_eq!(pick_node(vec!["pve".into()], None).unwrap(), "pve");
        let nodes = vec!["pve1".to_owned(), "pve2".to_owned()];
        assert_eq!(
            pick_node(nodes.clone(), Some("pve2.example.org")).unwrap(),
            "pve2"
        );
        let err = pick_node(nodes, Some("elsewhere")).unwrap_err().to_string();
        assert!(err.contains("set pve.node"), "{err}");
    }

    #[test]
    fn names_and_refs_are_checked() {
        check_name("sandbox-0123456789ab").unwrap();
        for bad in [
            "vm-1",
            "sandbox-A",
            "sandbox-a/b",
            "sandbox-a b",
            "sandbox-",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let vm = |r: &str| VmHandle {
            name: "sandbox-a".into(),
            vm_ref: r.into(),
        };
        assert_eq!(vmid_of(&vm("101")).unwrap(), 101);
        for bad in [
            "/var/lib/agentlab/sandboxes/sandbox-a",
            "42",
            "fake:sandbox-a",
            "",
        ] {
            assert!(vmid_of(&vm(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_environments_go_through_env() {
        let mut command = GuestCommand {
            path: "/usr/local/bin/agentlab-runner".into(),
            args: vec!["--bootstrap".into(), "/etc/agentlab/bootstrap.json".into()],
            env: Default::default(),
            stdin: None,
        };
        assert_eq!(
            guest_argv(&command).unwrap(),
            [
                "/usr/local/bin/agentlab-runner",
                "--bootstrap",
                "/etc/agentlab/bootstrap.json"
            ]
        );
        command.env.insert("A_1".into(), "x y".into());
        assert_eq!(
            guest_argv(&command).unwrap()[..2],
            ["/usr/bin/env", "A_1=x y"]
        );
        command.env.insert("BAD=KEY".into(), "x".into());
        assert!(guest_argv(&command).is_err());
    }
}

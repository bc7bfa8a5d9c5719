//! `qm` subcommands: create, set, config, status, clone, template, resize (and `disk resize`),
//! start, stop, shutdown, destroy, unlock, list, and `guest cmd|exec|exec-status`. Options are
//! checked against qm(1); errors use qm's wording, so the backend's classification sees what it
//! would see on Proxmox.

use std::io::Read;
use std::time::{Duration, Instant};

use agentlab::qemu::qga::{ExecRequest, QgaError};
use serde_json::{json, Value};

use crate::opts::{self, param_error, Parsed};
use crate::state::{drive_option, drive_volume, is_drive_key, Conf, State};
use crate::vm;
use crate::{Fail, Output, Result};

/// How long the agent check before each guest command waits (qemu-server pings with 3 s).
const AGENT_CHECK: Duration = Duration::from_secs(3);
const AGENT_CALL: Duration = Duration::from_secs(10);

/// The config options `qm create` and `qm set` take here (a subset of qm(1): what templates and
/// sandboxes use).
const CONFIG_OPTIONS: &[&str] = &[
    "name",
    "memory",
    "cores",
    "sockets",
    "cpu",
    "agent",
    "boot",
    "bootdisk",
    "scsihw",
    "ostype",
    "serial[n]",
    "vga",
    "description",
    "onboot",
    "tags",
    "machine",
    "bios",
    "cicustom",
    "citype",
    "ciuser",
    "sshkeys",
    "nameserver",
    "searchdomain",
    "ide[n]",
    "scsi[n]",
    "virtio[n]",
    "sata[n]",
    "net[n]",
    "ipconfig[n]",
    "balloon",
    "numa",
    "protection",
];

const NET_KEYS: &[&str] = &[
    "bridge",
    "firewall",
    "link_down",
    "macaddr",
    "mtu",
    "queues",
    "rate",
    "tag",
    "trunks",
];
const NET_MODELS: &[&str] = &["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"];

fn vmid_arg(parsed: &Parsed, index: usize, usage: &str) -> Result<u32> {
    let text = parsed.positional(index, "vmid", usage)?;
    text.parse::<u32>()
        .ok()
        .filter(|id| (100..=999_999_999).contains(id))
        .ok_or_else(|| {
            param_error(
                "vmid",
                &format!("invalid format - value '{text}' does not look like a valid VM ID"),
            )
        })
}

pub async fn run(state: &State, args: &[String]) -> Result<Output> {
    let Some((command, rest)) = args.split_first() else {
        return Err(Fail::new("ERROR: no command specified"));
    };
    match command.as_str() {
        "create" => create(state, rest).await,
        "set" => set(state, rest).await,
        "config" => config(state, rest),
        "status" => status(state, rest).await,
        "clone" => clone(state, rest).await,
        "template" => template(state, rest).await,
        "resize" => resize(state, rest).await,
        "disk" if rest.first().map(String::as_str) == Some("resize") => {
            resize(state, &rest[1..]).await
        }
        "start" => start(state, rest).await,
        "stop" | "shutdown" => stop(state, command, rest).await,
        "destroy" => destroy(state, rest).await,
        "unlock" => unlock(state, rest),
        "list" => list(state).await,
        "guest" => match rest.split_first() {
            Some((sub, rest)) if sub == "cmd" => guest_cmd(state, rest).await,
            Some((sub, rest)) if sub == "exec" => guest_exec(state, rest).await,
            Some((sub, rest)) if sub == "exec-status" => guest_exec_status(state, rest).await,
            _ => Err(Fail::new("400 unknown command 'qm guest'")),
        },
        other => Err(Fail::new(format!("400 unknown command 'qm {other}'"))),
    }
}

/// Checks one config option's value where the backend depends on qm rejecting bad input.
fn check_value(state: &State, key: &str, value: &str) -> Result<()> {
    let bad = |why: &str| Err(param_error(key, why));
    let positive = |v: &str, min: u64| v.parse::<u64>().ok().filter(|n| *n >= min).is_some();
    if key == "cores" || key == "sockets" {
        if !positive(value, 1) {
            return bad(&format!("type check ('integer') failed - got '{value}'"));
        }
    } else if key == "memory" {
        if !positive(value, 16) {
            return bad(&format!(
                "invalid format - value '{value}' is not a memory size"
            ));
        }
    } else if key == "name" {
        let dns = !value.is_empty()
            && value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !dns {
            return bad(&format!(
                "invalid format - value '{value}' does not look like a valid DNS name"
            ));
        }
    } else if key.starts_with("net") {
        let mut parts = value.split(',');
        let model = parts.next().unwrap_or_default();
        let model = model.split_once('=').map_or(model, |(m, _)| m);
        if !NET_MODELS.contains(&model) {
            return bad(&format!("invalid format - format error\n{key}.model: value '{model}' does not have a value in the enumeration"));
        }
        for part in parts {
            let (k, _) = part.split_once('=').unwrap_or((part, ""));
            if !NET_KEYS.contains(&k) {
                return bad(&format!("invalid format - format error\n{key}.{k}: property is not defined in schema and the schema does not allow additional properties"));
            }
        }
    } else if key.starts_with("ipconfig") {
        for part in value.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if !matches!(k, "ip" | "gw" | "ip6" | "gw6") || v.is_empty() {
                return bad("invalid format - format error");
            }
        }
    } else if key == "cicustom" {
        for part in value.split(',') {
            let (k, volume) = part.split_once('=').unwrap_or((part, ""));
            if !matches!(k, "user" | "meta" | "network" | "vendor") {
                return bad(&format!("invalid format - format error\ncicustom.{k}: property is not defined in schema and the schema does not allow additional properties"));
            }
            let storage = volume.split_once(':').map(|(s, _)| s).unwrap_or_default();
            if !state.storages.contains_key(storage) {
                return bad(&format!("storage '{storage}' does not exist"));
            }
        }
    } else if key == "tags" {
        if let Some(tag) = split_tags(value).into_iter().find(|tag| !valid_tag(tag)) {
            return bad(&format!("invalid format - invalid tag '{tag}'"));
        }
    } else if key == "agent" {
        let known = value.split(',').all(|p| {
            matches!(p, "0" | "1")
                || p.split_once('=').is_some_and(|(k, _)| {
                    matches!(
                        k,
                        "enabled" | "fstrim_cloned_disks" | "type" | "freeze-fs-on-backup"
                    )
                })
        });
        if !known {
            return bad("invalid format - format error");
        }
    }
    Ok(())
}

/// A tag list as qemu-server reads it: split on `;`, `,` and spaces.
fn split_tags(value: &str) -> Vec<&str> {
    value
        .split([';', ',', ' ', '\t'])
        .filter(|t| !t.is_empty())
        .collect()
}

/// qemu-server's `pve-tag` format: `[a-z0-9_][a-z0-9_+.-]*`, any case.
fn valid_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes().map(|b| b.to_ascii_lowercase());
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_+.-".contains(&b))
}

/// What qemu-server stores for `--tags` (`get_unique_tags` with the default tag style): the tags
/// lowercased, sorted, without duplicates, joined by `;`.
fn unique_tags(value: &str) -> String {
    let mut tags: Vec<String> = split_tags(value)
        .into_iter()
        .map(str::to_ascii_lowercase)
        .collect();
    tags.sort();
    tags.dedup();
    tags.join(";")
}

/// Applies `--key value` config options to `conf`, allocating volumes for new disks.
async fn apply(state: &State, vmid: u32, conf: &mut Conf, parsed: &Parsed) -> Result<()> {
    for (key, value) in &parsed.options {
        if key == "delete" {
            for gone in value.split(',') {
                conf.entries.remove(gone.trim());
            }
            continue;
        }
        check_value(state, key, value)?;
        if is_drive_key(key) {
            conf.set(key, allocate(state, vmid, value, conf).await?);
        } else if key == "tags" {
            conf.set(key, unique_tags(value));
        } else {
            conf.set(key, value.clone());
        }
    }
    Ok(())
}

/// A drive value as `qm` writes it once the volume exists: `STORAGE:cloudinit` and
/// `STORAGE:SIZE[,import-from=PATH]` allocate; an existing volume is kept as given.
async fn allocate(state: &State, vmid: u32, value: &str, conf: &Conf) -> Result<String> {
    let (storage, spec) = drive_volume(value);
    let options = value
        .split(',')
        .skip(1)
        .filter(|o| !o.starts_with("import-from=") && !o.starts_with("size="))
        .map(str::to_owned);
    if spec == "cloudinit" {
        let mut parts = vec![
            format!("{storage}:vm-{vmid}-cloudinit"),
            "media=cdrom".to_owned(),
        ];
        parts.extend(options.filter(|o| o != "media=cdrom"));
        return Ok(parts.join(","));
    }
    let Ok(size_gb) = spec.parse::<u64>() else {
        return Ok(value.to_owned());
    };
    let volname = (0..)
        .map(|n| format!("vm-{vmid}-disk-{n}"))
        .find(|name| {
            !state.volume_path(name).exists() && !conf.entries.values().any(|v| v.contains(name))
        })
        .unwrap_or_default();
    let path = state.volume_path(&volname);
    match drive_option(value, "import-from") {
        // Imported as a copy, as Proxmox does: the source may be a temporary file.
        Some(source) => {
            std::fs::copy(source, &path)?;
        }
        None => {
            let bytes = size_gb.max(1) << 30;
            let mut command = tokio::process::Command::new("qemu-img");
            command
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&path)
                .arg(bytes.to_string());
            agentlab::qemu::tool::run(command, Duration::from_secs(60)).await?;
        }
    }
    let size = vm::virtual_size(&path).await?;
    let mut parts = vec![format!("{storage}:{volname}")];
    parts.extend(options);
    parts.push(format!("size={}", size_text(size)));
    Ok(parts.join(","))
}

fn size_text(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes.div_ceil(1 << 20))
    }
}

async fn create(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm create <vmid> [OPTIONS]";
    let parsed = opts::parse(args, CONFIG_OPTIONS, usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let _lock = state.lock()?;
    if state.exists(vmid) {
        return Err(Fail::new(format!(
            "unable to create VM {vmid} - VM {vmid} already exists on node '{}'",
            state.node
        )));
    }
    let mut conf = Conf::default();
    apply(state, vmid, &mut conf, &parsed).await?;
    state.save(vmid, &conf)?;
    Ok(String::new())
}

async fn set(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm set <vmid> [OPTIONS]";
    let mut allowed = CONFIG_OPTIONS.to_vec();
    allowed.extend(["delete", "skiplock", "digest", "revert"]);
    let parsed = opts::parse(args, &allowed, usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let _lock = state.lock()?;
    let mut conf = state.load(vmid)?;
    if parsed.flag("skiplock")? != Some(true) {
        conf.check_lock()?;
    }
    if conf.is_template() && parsed.options.keys().any(|k| is_drive_key(k)) {
        return Err(Fail::new("you can't change disks of a template"));
    }
    apply(state, vmid, &mut conf, &parsed).await?;
    state.save(vmid, &conf)?;
    let changes: Vec<String> = parsed
        .options
        .iter()
        .map(|(k, v)| format!("-{k} {v}"))
        .collect();
    // The config holds a token-free volume reference, so echoing it is harmless.
    Ok(format!("update VM {vmid}: {}\n", changes.join(" ")))
}

fn config(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm config <vmid> [OPTIONS]";
    let parsed = opts::parse(args, &["current", "snapshot"], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let conf = state.load(vmid)?;
    let mut text = String::new();
    if !conf.comments.is_empty()
        && !conf
            .comments
            .iter()
            .any(|c| c.contains("qmclone temporary file"))
    {
        let description: Vec<&str> = conf.comments.iter().map(String::as_str).collect();
        text.push_str(&format!("description: {}\n", description.join("%0A")));
    }
    for (key, value) in &conf.entries {
        text.push_str(&format!("{key}: {value}\n"));
    }
    Ok(text)
}

async fn status(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm status <vmid> [OPTIONS]";
    let parsed = opts::parse(args, &["verbose"], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let conf = state.load(vmid)?;
    let status = if vm::running(state, &conf).await {
        "running"
    } else {
        "stopped"
    };
    Ok(format!("status: {status}\n"))
}

async fn clone(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm clone <vmid> <newid> [OPTIONS]";
    let parsed = opts::parse(
        args,
        &[
            "bwlimit",
            "description",
            "format",
            "full",
            "name",
            "pool",
            "snapname",
            "storage",
            "target",
        ],
        usage,
    )?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let newid = vmid_arg(&parsed, 1, usage)?;
    if let Some(name) = parsed.get("name") {
        check_value(state, "name", name)?;
    }
    let _lock = state.lock()?;
    let source = state.load(vmid)?;
    source.check_lock()?;
    let full = parsed.flag("full")?.unwrap_or(!source.is_template());
    if parsed.get("storage").is_some() && !full {
        return Err(Fail::new(
            "parameter 'storage' not allowed for linked clones",
        ));
    }
    if parsed.get("format").is_some() && !full {
        return Err(Fail::new(
            "parameter 'format' not allowed for linked clones",
        ));
    }
    if state.exists(newid) {
        return Err(Fail::new(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    let disks = source.disks();
    if !full {
        // A linked clone needs a base volume (`qm template`) on a storage that can link.
        if let Some((key, _)) = disks
            .iter()
            .find(|(_, v)| state.no_linked_clone || !drive_volume(v).1.starts_with("base-"))
        {
            return Err(Fail::new(format!(
                "Linked clone feature is not supported for drive '{key}'"
            )));
        }
    }
    // qm's placeholder while the disks are copied; removed again should the copy fail.
    let placeholder = Conf {
        entries: [("lock".to_owned(), "clone".to_owned())].into(),
        comments: vec![" qmclone temporary file".to_owned()],
    };
    state.save(newid, &placeholder)?;
    let result = async {
        let mut conf = Conf {
            entries: source.entries.clone(),
            comments: Vec::new(),
        };
        conf.entries.remove("template");
        conf.set(
            "name",
            parsed
                .get("name")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("Copy-of-VM-{}", source.name())),
        );
        if let Some(net0) = conf.get("net0").map(str::to_owned) {
            conf.set("net0", new_mac(&net0));
        }
        let mut output = String::new();
        for (key, value) in &disks {
            let (storage, volname) = drive_volume(value);
            let target_storage = parsed.get("storage").unwrap_or(&storage);
            let newvol = format!(
                "vm-{newid}-disk-{}",
                key.trim_start_matches(|c: char| c.is_ascii_alphabetic())
            );
            vm::clone_volume(
                &state.volume_path(&volname),
                &state.volume_path(&newvol),
                full,
            )
            .await?;
            let kind = if full { "full clone" } else { "linked clone" };
            output.push_str(&format!(
                "create {kind} of drive {key} ({storage}:{volname})\n"
            ));
            conf.set(
                key,
                value.replacen(
                    &format!("{storage}:{volname}"),
                    &format!("{target_storage}:{newvol}"),
                    1,
                ),
            );
        }
        for (key, value) in source
            .entries
            .iter()
            .filter(|(_, v)| v.contains("cloudinit"))
        {
            let (storage, _) = drive_volume(value);
            conf.set(key, format!("{storage}:vm-{newid}-cloudinit,media=cdrom"));
        }
        Ok::<_, Fail>((conf, output))
    }
    .await;
    match result {
        Ok((conf, output)) => {
            state.save(newid, &conf)?;
            // The VM firewall comes along, as `qm clone` copies it.
            let firewall = state.firewall_path(Some(vmid));
            if firewall.exists() {
                std::fs::copy(firewall, state.firewall_path(Some(newid)))?;
            }
            Ok(output)
        }
        Err(err) => {
            for volume in vm::volumes_of(state, newid)? {
                let _ = std::fs::remove_file(volume);
            }
            let _ = std::fs::remove_file(state.conf_path(newid));
            Err(Fail::new(format!("clone failed: {}", err.0)))
        }
    }
}

/// A net value with a fresh MAC, as every clone gets.
fn new_mac(net: &str) -> String {
    let mut parts: Vec<String> = net.split(',').map(str::to_owned).collect();
    let model = parts[0].split('=').next().unwrap_or("virtio").to_owned();
    let seed = agentlab::model::new_id();
    let bytes: Vec<u8> = (0..3)
        .map(|i| {
            u8::from_str_radix(&seed[seed.len() - 2 * (i + 1)..seed.len() - 2 * i], 16).unwrap_or(0)
        })
        .collect();
    parts[0] = format!(
        "{model}=BC:24:11:{:02X}:{:02X}:{:02X}",
        bytes[0], bytes[1], bytes[2]
    );
    parts.join(",")
}

async fn template(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm template <vmid> [OPTIONS]";
    let parsed = opts::parse(args, &["disk"], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let _lock = state.lock()?;
    let mut conf = state.load(vmid)?;
    conf.check_lock()?;
    if vm::running(state, &conf).await {
        return Err(Fail::new(
            "you can't convert a VM to template if VM is running",
        ));
    }
    // Disks become base volumes, which linked clones refer to.
    for (key, value) in conf.disks() {
        let (_, volname) = drive_volume(&value);
        if let Some(rest) = volname.strip_prefix(&format!("vm-{vmid}-")) {
            let base = format!("base-{vmid}-{rest}");
            std::fs::rename(state.volume_path(&volname), state.volume_path(&base))?;
            conf.set(&key, value.replacen(&volname, &base, 1));
        }
    }
    conf.set("template", "1");
    state.save(vmid, &conf)?;
    Ok(String::new())
}

/// `+?N[.N][KMGT]`, relative with `+`.
fn parse_size(text: &str, current: u64) -> Option<u64> {
    let (relative, text) = match text.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    let bytes = (number.parse::<f64>().ok()? * (1u64 << shift) as f64) as u64;
    Some(if relative { current + bytes } else { bytes })
}

async fn resize(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm disk resize <vmid> <disk> <size> [OPTIONS]";
    let parsed = opts::parse(args, &["digest", "skiplock"], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let disk = parsed.positional(1, "disk", usage)?.to_owned();
    let size = parsed.positional(2, "size", usage)?.to_owned();
    let _lock = state.lock()?;
    let mut conf = state.load(vmid)?;
    if parsed.flag("skiplock")? != Some(true) {
        conf.check_lock()?;
    }
    let value = conf
        .get(&disk)
        .filter(|_| is_drive_key(&disk))
        .map(str::to_owned)
        .ok_or_else(|| Fail::new(format!("disk '{disk}' does not exist")))?;
    if conf.is_template() {
        return Err(Fail::new("you can't resize a disk of a template"));
    }
    let (_, volname) = drive_volume(&value);
    let path = state.volume_path(&volname);
    let current = vm::virtual_size(&path).await?;
    let wanted = parse_size(&size, current).ok_or_else(|| {
        param_error(
            "size",
            &format!("value does not match the regex pattern ('{size}')"),
        )
    })?;
    if wanted < current {
        return Err(Fail::new("shrinking disks is not supported"));
    }
    if wanted == current {
        return Ok(String::new());
    }
    vm::resize_volume(&path, wanted).await?;
    let old = drive_option(&value, "size").map(|s| format!("size={s}"));
    let new = format!("size={}", size_text(wanted));
    let updated = match old {
        Some(old) => value.replacen(&old, &new, 1),
        None => format!("{value},{new}"),
    };
    conf.set(&disk, updated);
    state.save(vmid, &conf)?;
    Ok(String::new())
}

async fn start(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm start <vmid> [OPTIONS]";
    let parsed = opts::parse(
        args,
        &["skiplock", "timeout", "machine", "force-cpu"],
        usage,
    )?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let _lock = state.lock()?;
    let conf = state.load(vmid)?;
    if parsed.flag("skiplock")? != Some(true) {
        conf.check_lock()?;
    }
    if conf.is_template() {
        return Err(Fail::new("you can't start a vm if it's a template"));
    }
    if vm::running(state, &conf).await {
        return Err(Fail::new(format!("VM {vmid} already running")));
    }
    vm::start(state, vmid, &conf).await?;
    Ok(String::new())
}

async fn stop(state: &State, command: &str, args: &[String]) -> Result<Output> {
    let usage = format!("qm {command} <vmid> [OPTIONS]");
    let parsed = opts::parse(
        args,
        &[
            "skiplock",
            "timeout",
            "keepActive",
            "overrule-shutdown",
            "migratedfrom",
            "forceStop",
        ],
        &usage,
    )?;
    let vmid = vmid_arg(&parsed, 0, &usage)?;
    let _lock = state.lock()?;
    let conf = state.load(vmid)?;
    if parsed.flag("skiplock")? != Some(true) {
        conf.check_lock()?;
    }
    vm::stop(state, conf.name()).await?;
    Ok(String::new())
}

async fn destroy(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm destroy <vmid> [OPTIONS]";
    let parsed = opts::parse(
        args,
        &["purge", "skiplock", "destroy-unreferenced-disks"],
        usage,
    )?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let _lock = state.lock()?;
    let conf = state.load(vmid)?;
    if parsed.flag("skiplock")? != Some(true) {
        conf.check_lock()?;
    }
    if conf.get("protection") == Some("1") {
        return Err(Fail::new(format!(
            "can't remove VM {vmid} - protection mode enabled"
        )));
    }
    if vm::running(state, &conf).await {
        return Err(Fail::new(format!("VM {vmid} is running - destroy failed")));
    }
    vm::remove(state, conf.name()).await?;
    for volume in vm::volumes_of(state, vmid)? {
        std::fs::remove_file(volume)?;
    }
    let _ = std::fs::remove_file(state.firewall_path(Some(vmid)));
    std::fs::remove_file(state.conf_path(vmid))?;
    Ok(String::new())
}

fn unlock(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm unlock <vmid>";
    let parsed = opts::parse(args, &[], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let _lock = state.lock()?;
    let mut conf = state.load(vmid)?;
    conf.entries.remove("lock");
    state.save(vmid, &conf)?;
    Ok(String::new())
}

async fn list(state: &State) -> Result<Output> {
    let mut text = format!(
        "{:>10} {:<20} {:<10} {:<10} {:>12} {:<10}\n",
        "VMID", "NAME", "STATUS", "MEM(MB)", "BOOTDISK(GB)", "PID"
    );
    for (vmid, conf) in state.all()? {
        let status = if vm::running(state, &conf).await {
            "running"
        } else {
            "stopped"
        };
        let memory = conf.get("memory").unwrap_or("512");
        text.push_str(&format!(
            "{vmid:>10} {:<20} {status:<10} {memory:<10} {:>12.2} {:<10}\n",
            conf.name(),
            0.0,
            0
        ));
    }
    Ok(text)
}

/// qemu-server's checks before any guest command: config, agent configured, VM running, agent
/// answering a ping.
async fn agent_ready(state: &State, vmid: u32) -> Result<agentlab::qemu::qga::QgaClient> {
    let conf = state.load(vmid)?;
    if conf.get("agent").is_none() {
        return Err(Fail::new("No QEMU guest agent configured"));
    }
    if !vm::running(state, &conf).await {
        return Err(Fail::new(format!("VM {vmid} is not running")));
    }
    let mut agent = vm::agent(state, conf.name());
    if agent.ping(AGENT_CHECK).await.is_err() {
        return Err(Fail::new("QEMU guest agent is not running"));
    }
    Ok(agent)
}

/// qemu-server's wording: the agent's own error, or the QMP call that timed out.
fn agent_error(vmid: u32, command: &str) -> impl Fn(QgaError) -> Fail + '_ {
    move |error| match error {
        QgaError::Guest { desc, .. } => Fail::new(format!("Agent error: {desc}")),
        other if other.is_unavailable() => Fail::new(format!(
            "VM {vmid} qmp command '{command}' failed - got timeout"
        )),
        other => Fail::new(format!("Agent error: {other}")),
    }
}

async fn guest_cmd(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm guest cmd <vmid> <command>";
    let parsed = opts::parse(args, &[], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let command = parsed.positional(1, "command", usage)?;
    let qga_command: &'static str = match command {
        "ping" => "guest-ping",
        "info" => "guest-info",
        "get-osinfo" => "guest-get-osinfo",
        "get-host-name" => "guest-get-host-name",
        "network-get-interfaces" => "guest-network-get-interfaces",
        "get-time" => "guest-get-time",
        other => return Err(param_error("command", &format!("value '{other}' does not have a value in the enumeration (or is not supported by the stand-in)"))),
    };
    let mut agent = agent_ready(state, vmid).await?;
    let result = agent
        .call(qga_command, None, AGENT_CALL)
        .await
        .map_err(agent_error(vmid, qga_command))?;
    Ok(print_agent_result(&result))
}

async fn guest_exec(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm guest exec <vmid> [<extra-args>] [OPTIONS]";
    let parsed = opts::parse(args, &["synchronous", "timeout", "pass-stdin"], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let synchronous = parsed.flag("synchronous")?.unwrap_or(true);
    if parsed.get("timeout").is_some() && !synchronous {
        return Err(param_error("synchronous", "needs to be set for 'timeout'"));
    }
    let timeout: u64 = match parsed.get("timeout") {
        Some(t) => t.parse().map_err(|_| {
            param_error(
                "timeout",
                &format!("type check ('integer') failed - got '{t}'"),
            )
        })?,
        None => 30,
    };
    let mut argv: Vec<String> = parsed.positional[1..].to_vec();
    argv.extend(parsed.extra.iter().cloned());
    let input = if parsed.flag("pass-stdin")? == Some(true) {
        let mut data = Vec::new();
        std::io::stdin()
            .take(1024 * 1024 + 1)
            .read_to_end(&mut data)?;
        if data.len() > 1024 * 1024 {
            return Err(Fail::new(
                "'input-data' (STDIN) is limited to 1 MiB, aborting",
            ));
        }
        Some(data)
    } else {
        None
    };
    let Some((path, rest)) = argv.split_first() else {
        return Err(Fail::new("command or input-data (or both) required"));
    };
    let mut agent = agent_ready(state, vmid).await?;
    let request = ExecRequest {
        path: path.clone(),
        args: rest.to_vec(),
        env: Vec::new(),
        input,
        // qemu-server always asks the agent to capture the output.
        capture_output: true,
    };
    let pid = agent
        .exec(&request, AGENT_CALL)
        .await
        .map_err(agent_error(vmid, "guest-exec"))?;
    if !synchronous {
        return Ok(print_agent_result(&json!({ "pid": pid })));
    }
    let started = Instant::now();
    while timeout == 0 || started.elapsed() < Duration::from_secs(timeout) {
        let reply = agent
            .exec_status(pid, AGENT_CALL)
            .await
            .map_err(agent_error(vmid, "guest-exec-status"))?;
        if reply.exited {
            return Ok(print_agent_result(&status_json(&reply)));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("timeout reached, returning pid");
    Ok(print_agent_result(&json!({ "pid": pid })))
}

async fn guest_exec_status(state: &State, args: &[String]) -> Result<Output> {
    let usage = "qm guest exec-status <vmid> <pid>";
    let parsed = opts::parse(args, &[], usage)?;
    let vmid = vmid_arg(&parsed, 0, usage)?;
    let pid: i64 = parsed
        .positional(1, "pid", usage)?
        .parse()
        .map_err(|_| param_error("pid", "type check ('integer') failed"))?;
    let mut agent = agent_ready(state, vmid).await?;
    let reply = agent
        .exec_status(pid, AGENT_CALL)
        .await
        .map_err(agent_error(vmid, "guest-exec-status"))?;
    Ok(print_agent_result(&status_json(&reply)))
}

/// What qemu-server returns for `guest-exec-status`: booleans as 1/0, output decoded.
fn status_json(reply: &agentlab::qemu::qga::ExecStatusReply) -> Value {
    let mut value = json!({ "exited": u8::from(reply.exited) });
    if let Some(code) = reply.exit_code {
        value["exitcode"] = code.into();
    }
    if let Some(signal) = reply.signal {
        value["signal"] = signal.into();
    }
    if !reply.stdout.is_empty() {
        value["out-data"] = String::from_utf8_lossy(&reply.stdout).into_owned().into();
    }
    if !reply.stderr.is_empty() {
        value["err-data"] = String::from_utf8_lossy(&reply.stderr).into_owned().into();
    }
    if reply.stdout_truncated {
        value["out-truncated"] = 1.into();
    }
    if reply.stderr_truncated {
        value["err-truncated"] = 1.into();
    }
    value
}

/// qm's `print_agent_result`: nothing for an empty object, else Perl JSON's pretty form.
pub fn print_agent_result(value: &Value) -> String {
    if value.as_object().is_some_and(|o| o.is_empty()) || value.is_null() {
        return String::new();
    }
    let mut text = String::new();
    perl_pretty(value, 0, &mut text);
    text.push('\n');
    text
}

/// JSON::PP's `pretty` + `canonical`: three-space indent, `"key" : value`, sorted keys.
fn perl_pretty(value: &Value, depth: usize, out: &mut String) {
    let pad = |n: usize| "   ".repeat(n);
    match value {
        Value::Object(map) => {
            out.push_str("{\n");
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (i, key) in keys.iter().enumerate() {
                out.push_str(&format!(
                    "{}{} : ",
                    pad(depth + 1),
                    Value::from(key.as_str())
                ));
                perl_pretty(&map[*key], depth + 1, out);
                out.push_str(if i + 1 < keys.len() { ",\n" } else { "\n" });
            }
            out.push_str(&format!("{}}}", pad(depth)));
        }
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad(depth + 1));
                perl_pretty(item, depth + 1, out);
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            out.push_str(&format!("{}]", pad(depth)));
        }
        other => out.push_str(&other.to_string()),
    }
}

//! `pvesh`: the API paths the backend and scripts/create_template.sh use, with their JSON:
//! `/cluster/nextid`, `/nodes`, `/nodes/NODE/qemu`, `…/qemu/ID/status/current`, the node's
//! storages and their image volumes (`/nodes/NODE/storage`, `…/storage/ID/content`, reporting
//! each qcow2 volume's virtual size and its real allocation as a directory storage does), and the
//! cluster's and a VM's firewall options and rules. `--output-format json` prints compact JSON as
//! pvesh does; the text format of a scalar is the bare value.

use serde_json::{json, Value};

use crate::opts;
use crate::state::State;
use crate::vm;
use crate::{Fail, Output, Result};

/// The firewall options and rule fields the stand-in keeps (a subset of pve-firewall's).
const FIREWALL_OPTIONS: &[&str] = &[
    "enable",
    "policy_in",
    "policy_out",
    "dhcp",
    "ipfilter",
    "macfilter",
    "ndp",
    "radv",
    "log_level_in",
    "log_level_out",
];
const RULE_FIELDS: &[&str] = &[
    "type", "action", "enable", "dest", "dport", "source", "sport", "proto", "comment", "iface",
    "macro", "log",
];

pub async fn run(state: &State, args: &[String]) -> Result<Output> {
    let Some((verb, rest)) = args.split_first() else {
        return Err(Fail::new("ERROR: no command specified"));
    };
    let Some((path, rest)) = rest.split_first() else {
        return Err(Fail::new(format!(
            "400 not enough arguments\npvesh {verb} <api_path> [OPTIONS] [FORMAT_OPTIONS]"
        )));
    };
    let path = path.trim_end_matches('/');
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut allowed = vec![
        "output-format",
        "noborder",
        "noheader",
        "human-readable",
        "quiet",
    ];
    match (verb.as_str(), parts.as_slice()) {
        ("set", [.., "firewall", "options"]) => allowed.extend(FIREWALL_OPTIONS),
        ("create", [.., "firewall", "rules"]) => allowed.extend(RULE_FIELDS),
        ("get", ["cluster", "resources"]) => allowed.push("type"),
        ("get", ["nodes", _, "storage", _, "content"]) => allowed.extend(["content", "vmid"]),
        _ => {}
    }
    let parsed = opts::parse(rest, &allowed, &format!("pvesh {verb} {path}"))?;
    let json_out = matches!(parsed.get("output-format"), Some("json" | "json-pretty"));
    let params: serde_json::Map<String, Value> = parsed
        .options
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "output-format" | "noborder" | "noheader" | "human-readable" | "quiet"
            )
        })
        .map(|(k, v)| (k.clone(), number_or_string(v)))
        .collect();

    let value = match (verb.as_str(), parts.as_slice()) {
        ("get", ["cluster", "nextid"]) => {
            let vms = state.all()?;
            let next = (100u32..).find(|id| !vms.contains_key(id)).unwrap_or(100);
            Value::String(next.to_string())
        }
        ("get", ["nodes"]) => json!([{
            "node": state.node, "status": "online", "type": "node", "id": format!("node/{}", state.node),
            "maxcpu": 2, "cpu": 0.01, "maxmem": 4u64 << 30, "mem": 1u64 << 30, "level": "", "uptime": 1000,
        }]),
        ("get", ["cluster", "resources"]) => {
            let mut list = Vec::new();
            for (vmid, entry) in vm_list(state).await? {
                let mut entry = entry;
                entry["id"] = format!("qemu/{vmid}").into();
                entry["node"] = state.node.clone().into();
                entry["type"] = "qemu".into();
                list.push(entry);
            }
            Value::Array(list)
        }
        ("get", ["nodes", node, "qemu"]) => {
            check_node(state, node)?;
            Value::Array(vm_list(state).await?.into_iter().map(|(_, v)| v).collect())
        }
        ("get", ["nodes", node, "qemu", vmid, "status", "current"]) => {
            check_node(state, node)?;
            let vmid = vmid_of(vmid)?;
            let conf = state.load(vmid)?;
            let running = vm::running(state, &conf).await;
            let mut value = json!({
                "vmid": vmid, "name": conf.name(),
                "status": if running { "running" } else { "stopped" },
                "qmpstatus": if running { "running" } else { "stopped" },
                "cpus": conf.get("cores").and_then(|c| c.parse::<u64>().ok()).unwrap_or(1),
            });
            if conf.get("agent").is_some() {
                value["agent"] = 1.into();
            }
            if conf.is_template() {
                value["template"] = 1.into();
            }
            value
        }
        ("get", ["nodes", node, "storage"]) => {
            check_node(state, node)?;
            Value::Array(
                state
                    .storages
                    .keys()
                    .map(|id| {
                        json!({"storage": id, "type": "dir", "content": "images,snippets",
                               "active": 1, "enabled": 1, "shared": 0})
                    })
                    .collect(),
            )
        }
        ("get", ["nodes", node, "storage", storage, "content"]) => {
            check_node(state, node)?;
            if !state.storages.contains_key(*storage) {
                return Err(Fail::new(format!(
                    "storage '{storage}' does not exist"
                )));
            }
            Value::Array(storage_volumes(state, storage).await?)
        }
        ("get", ["cluster", "firewall", "options"]) => state.firewall(None)?["options"].clone(),
        ("get", ["nodes", node, "qemu", vmid, "firewall", "options"]) => {
            check_node(state, node)?;
            let vmid = vmid_of(vmid)?;
            state.load(vmid)?;
            state.firewall(Some(vmid))?["options"].clone()
        }
        ("get", ["nodes", node, "qemu", vmid, "firewall", "rules"]) => {
            check_node(state, node)?;
            let vmid = vmid_of(vmid)?;
            state.load(vmid)?;
            state.firewall(Some(vmid))?["rules"].clone()
        }
        ("set", ["cluster", "firewall", "options"]) => {
            let _lock = state.lock()?;
            update_firewall(state, None, |fw| merge(&mut fw["options"], &params))?;
            Value::Null
        }
        ("set", ["nodes", node, "qemu", vmid, "firewall", "options"]) => {
            check_node(state, node)?;
            let vmid = vmid_of(vmid)?;
            let _lock = state.lock()?;
            state.load(vmid)?;
            update_firewall(state, Some(vmid), |fw| merge(&mut fw["options"], &params))?;
            Value::Null
        }
        ("create", ["nodes", node, "qemu", vmid, "firewall", "rules"]) => {
            check_node(state, node)?;
            let vmid = vmid_of(vmid)?;
            for required in ["type", "action"] {
                if !params.contains_key(required) {
                    return Err(opts::param_error(required, "property is missing and it is not optional"));
                }
            }
            let _lock = state.lock()?;
            state.load(vmid)?;
            update_firewall(state, Some(vmid), |fw| {
                if let Some(rules) = fw["rules"].as_array_mut() {
                    let mut rule = Value::Object(params.clone());
                    rule["pos"] = rules.len().into();
                    rules.push(rule);
                }
            })?;
            Value::Null
        }
        (_, ["nodes", node, ..]) if *node != state.node => {
            return Err(Fail::new(format!(
                "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
            )))
        }
        _ => return Err(Fail::new(format!("No '{verb}' handler defined for '{path}'"))),
    };
    Ok(match (&value, json_out) {
        (Value::Null, _) => String::new(),
        (_, true) => format!("{value}\n"),
        (Value::String(s), false) => format!("{s}\n"),
        (other, false) => format!("{}\n", serde_json::to_string_pretty(other)?),
    })
}

fn check_node(state: &State, node: &str) -> Result<()> {
    if node == state.node {
        Ok(())
    } else {
        Err(Fail::new(format!(
            "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
        )))
    }
}

fn vmid_of(text: &str) -> Result<u32> {
    text.parse().map_err(|_| {
        opts::param_error(
            "vmid",
            &format!("invalid format - value '{text}' does not look like a valid VM ID"),
        )
    })
}

/// Options given on the command line as JSON: numbers stay numbers (`--enable 1`).
fn number_or_string(value: &str) -> Value {
    match value.parse::<i64>() {
        Ok(n) => n.into(),
        Err(_) => value.into(),
    }
}

fn merge(target: &mut Value, params: &serde_json::Map<String, Value>) {
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(map) = target.as_object_mut() {
        for (k, v) in params {
            map.insert(k.clone(), v.clone());
        }
    }
}

fn update_firewall(
    state: &State,
    vmid: Option<u32>,
    change: impl FnOnce(&mut Value),
) -> Result<()> {
    let mut firewall = state.firewall(vmid)?;
    change(&mut firewall);
    state.save_firewall(vmid, &firewall)
}

/// The image volumes on `storage` that VM configs name, as a directory storage lists them: the
/// qcow2's virtual size, and as `used` the blocks the file really occupies.
async fn storage_volumes(state: &State, storage: &str) -> Result<Vec<Value>> {
    use std::os::unix::fs::MetadataExt;
    let mut list = Vec::new();
    for (vmid, conf) in state.all()? {
        for (_, value) in conf.disks() {
            let (on, volname) = crate::state::drive_volume(&value);
            if on != storage {
                continue;
            }
            let path = state.volume_path(&volname);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            list.push(json!({
                "volid": format!("{storage}:{volname}"), "vmid": vmid, "format": "qcow2",
                "content": "images", "size": vm::virtual_size(&path).await?,
                "used": meta.blocks() * 512, "ctime": meta.ctime(),
            }));
        }
    }
    Ok(list)
}

/// `GET /nodes/NODE/qemu`: one entry per VM, `template: 1` on templates, the lock and tags if
/// any.
async fn vm_list(state: &State) -> Result<Vec<(u32, Value)>> {
    let mut list = Vec::new();
    for (vmid, conf) in state.all()? {
        let running = vm::running(state, &conf).await;
        let memory: u64 = conf
            .get("memory")
            .and_then(|m| m.parse().ok())
            .unwrap_or(512);
        let mut entry = json!({
            "vmid": vmid,
            "status": if running { "running" } else { "stopped" },
            "cpus": conf.get("cores").and_then(|c| c.parse::<u64>().ok()).unwrap_or(1),
            "maxmem": memory << 20,
            "uptime": 0,
        });
        if !conf.name().is_empty() {
            entry["name"] = conf.name().into();
        }
        if conf.is_template() {
            entry["template"] = 1.into();
        }
        if let Some(lock) = conf.get("lock") {
            entry["lock"] = lock.into();
        }
        // Proxmox lists the config's tags as they are stored: `a;b`.
        if let Some(tags) = conf.get("tags").filter(|t| !t.is_empty()) {
            entry["tags"] = tags.into();
        }
        list.push((vmid, entry));
    }
    Ok(list)
}

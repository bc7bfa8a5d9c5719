//! Reading what `qm` and `pvesh` print: `pvesh … --output-format json` lists, `qm config`'s
//! `key: value` lines, the guest agent's JSON replies, and storages and their volumes (what the
//! governor's disk rule learns from). Proxmox has printed some numbers as
//! strings and some booleans as 0/1 across versions, so the readers accept either.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::backend::{DiskUsage, ExecStatus, Provisioning};
use crate::model::VM_NAME_PREFIX;

/// The lowest and highest VMIDs Proxmox accepts.
pub const VMID_RANGE: std::ops::RangeInclusive<u32> = 100..=999_999_999;

/// `pvesh get /cluster/nextid`: `101` as text, `"101"` as JSON.
pub fn nextid(stdout: &str) -> Result<u32, String> {
    let text = stdout.trim().trim_matches('"');
    let id: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a VMID"))?;
    if VMID_RANGE.contains(&id) {
        Ok(id)
    } else {
        Err(format!("{id} is outside the VMID range"))
    }
}

/// One entry of `pvesh get /nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NodeEntry {
    pub node: String,
    #[serde(default)]
    pub status: Option<String>,
}

pub fn nodes(stdout: &str) -> Result<Vec<NodeEntry>, String> {
    serde_json::from_str(stdout).map_err(|e| e.to_string())
}

/// One entry of `pvesh get /nodes/NODE/qemu`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmEntry {
    #[serde(deserialize_with = "flexible_u32")]
    pub vmid: u32,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "flexible_bool")]
    pub template: bool,
    #[serde(default)]
    pub lock: Option<String>,
    /// Proxmox's tag list, `a;b` (absent without tags).
    #[serde(default)]
    pub tags: Option<String>,
}

impl VmEntry {
    /// The instance id the VM's owner tag carries, if it has one.
    pub fn owner(&self) -> Option<String> {
        owner_in_tags(self.tags.as_deref().unwrap_or_default())
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    pub fn running(&self) -> bool {
        self.status == "running"
    }
}

pub fn vms(stdout: &str) -> Result<Vec<VmEntry>, String> {
    serde_json::from_str(stdout).map_err(|e| e.to_string())
}

/// `qm config ID`: `key: value` lines. Snapshot and pending sections (`[name]`) come after the
/// current config and are not read; `#` lines are the description.
pub fn qm_config(stdout: &str) -> BTreeMap<String, String> {
    let mut config = BTreeMap::new();
    for line in stdout.lines() {
        if line.starts_with('[') {
            break;
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            config.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    config
}

/// The tag that marks a VM as made by the agentlabd instance whose id follows. Proxmox tags take
/// `[a-z0-9_][a-z0-9_+.-]*` and are lowercased, which instance ids already are.
pub const OWNER_TAG_PREFIX: &str = "agentlab-owner-";

/// A tag list as Proxmox takes and prints it: separated by `;` (`,` and spaces are accepted on
/// input too).
pub fn split_tags(text: &str) -> Vec<String> {
    text.split([';', ',', ' ', '\t'])
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The owner named by the first owner tag in `tags`.
pub fn owner_in_tags(tags: &str) -> Option<String> {
    split_tags(tags)
        .into_iter()
        .find_map(|tag| tag.strip_prefix(OWNER_TAG_PREFIX).map(str::to_owned))
        .filter(|owner| !owner.is_empty())
}

/// The `--tags` value of a clone: the tags it got from its template, except owner tags (a clone
/// has one owner: us), and ours.
pub fn tags_with_owner(template_tags: &[String], owner: &str) -> String {
    let mut tags: Vec<String> = template_tags
        .iter()
        .filter(|tag| !tag.starts_with(OWNER_TAG_PREFIX))
        .cloned()
        .collect();
    tags.push(format!("{OWNER_TAG_PREFIX}{owner}"));
    tags.join(";")
}

/// What the backend needs to know of a template, once it has passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateInfo {
    /// The boot disk's config key (`scsi0`, `virtio0`, …): the disk `qm resize` grows.
    pub root_disk: String,
    /// Its size in bytes, when the config says.
    pub root_size_bytes: Option<u64>,
    /// The template's tags, which `qm clone` copies; a clone keeps them next to its owner tag.
    pub tags: Vec<String>,
}

const DISK_BUSES: [&str; 4] = ["scsi", "virtio", "sata", "ide"];

fn is_disk_key(key: &str) -> bool {
    DISK_BUSES.iter().any(|bus| {
        key.strip_prefix(bus)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A drive value's volume (before the first comma) and its `key=value` options.
fn drive_parts(value: &str) -> (&str, BTreeMap<&str, &str>) {
    let mut parts = value.split(',');
    let first = parts.next().unwrap_or_default();
    let (volume, mut options) = match first.split_once('=') {
        Some(("file", volume)) => (volume, BTreeMap::new()),
        _ => (first, BTreeMap::new()),
    };
    for part in parts {
        if let Some((k, v)) = part.split_once('=') {
            options.insert(k, v);
        }
    }
    (volume, options)
}

fn is_cloudinit_drive(value: &str) -> bool {
    drive_parts(value).0.contains("cloudinit")
}

fn is_hard_disk(value: &str) -> bool {
    let (volume, options) = drive_parts(value);
    options.get("media") != Some(&"cdrom") && volume != "none" && !volume.contains("cloudinit")
}

/// `agent: 1`, `agent: enabled=1,fstrim_cloned_disks=1`, `agent: 1,type=virtio`.
pub fn agent_enabled(value: &str) -> bool {
    let mut enabled = None;
    for (index, part) in value.split(',').enumerate() {
        match part.split_once('=') {
            Some(("enabled", v)) => enabled = Some(v),
            None if index == 0 => enabled = Some(part),
            _ => {}
        }
    }
    matches!(enabled.map(str::trim), Some("1" | "true" | "on" | "yes"))
}

/// Disk sizes as Proxmox writes them: `32G`, `2252M`, `512K`, `1T`, or bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit() && *c != '.')
    {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return None,
    };
    if let Ok(whole) = digits.parse::<u64>() {
        return whole.checked_mul(1u64 << shift);
    }
    let value: f64 = digits.parse().ok()?;
    Some((value * (1u64 << shift) as f64) as u64)
}

/// Checks that `config` (of VM `vmid`) is a template the backend can clone and boot: a template,
/// with the guest agent enabled, a cloud-init drive and a boot disk. The error says what to fix.
pub fn template_info(vmid: u32, config: &BTreeMap<String, String>) -> Result<TemplateInfo, String> {
    if config.is_empty() {
        return Err(format!("VM {vmid} has an empty config"));
    }
    if config.get("template").map(String::as_str) != Some("1") {
        return Err(format!(
            "VM {vmid} is not a template (convert it with `qm template {vmid}`, see \
             scripts/create_template.sh)"
        ));
    }
    if !config.get("agent").is_some_and(|v| agent_enabled(v)) {
        return Err(format!(
            "template {vmid} does not enable the QEMU guest agent (`qm set {vmid} --agent \
             enabled=1`, and install qemu-guest-agent in its image)"
        ));
    }
    if !config
        .iter()
        .any(|(key, value)| is_disk_key(key) && is_cloudinit_drive(value))
    {
        return Err(format!(
            "template {vmid} has no cloud-init drive (`qm set {vmid} --ide2 STORAGE:cloudinit`)"
        ));
    }
    let boot_order: Vec<&str> = match config.get("boot") {
        Some(boot) => boot
            .split(',')
            .find_map(|part| part.strip_prefix("order="))
            .map(|order| order.split(';').collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let candidates = boot_order
        .into_iter()
        .chain(config.get("bootdisk").map(String::as_str))
        .map(str::to_owned)
        .chain(config.keys().filter(|k| is_disk_key(k)).cloned());
    for key in candidates {
        let Some(value) = config.get(&key) else {
            continue;
        };
        if is_disk_key(&key) && is_hard_disk(value) {
            let size = drive_parts(value).1.get("size").and_then(|s| parse_size(s));
            return Ok(TemplateInfo {
                root_disk: key,
                root_size_bytes: size,
                tags: split_tags(config.get("tags").map(String::as_str).unwrap_or_default()),
            });
        }
    }
    Err(format!("template {vmid} has no boot disk"))
}

/// `qm guest exec ID --synchronous 0 -- …` prints `{"pid": N}` (pretty-printed).
pub fn exec_pid(stdout: &str) -> Result<i64, String> {
    let value: Value = serde_json::from_str(stdout).map_err(|e| e.to_string())?;
    value
        .get("pid")
        .and_then(as_i64)
        .ok_or_else(|| "no pid in the reply".to_owned())
}

/// A synchronous `qm guest exec`'s reply: the exit code once the process has exited (None while
/// it runs: qm gave up waiting) and its output (`out-data`, decoded by qm already).
pub fn exec_output(stdout: &str) -> Result<(Option<i64>, Vec<u8>), String> {
    let value: Value = serde_json::from_str(stdout).map_err(|e| e.to_string())?;
    let exited = value.get("exited").and_then(as_bool).unwrap_or(false);
    let code = if exited {
        Some(
            value
                .get("exitcode")
                .and_then(as_i64)
                .ok_or_else(|| "exited without an exit code".to_owned())?,
        )
    } else {
        None
    };
    let output = value
        .get("out-data")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .as_bytes()
        .to_vec();
    Ok((code, output))
}

/// `qm guest exec-status ID PID`: `{"exited": 0}` while running; `{"exited": 1, "exitcode": N}`
/// or `{"exited": 1, "signal": N}` once done.
pub fn exec_status(stdout: &str) -> Result<ExecStatus, String> {
    let value: Value = serde_json::from_str(stdout).map_err(|e| e.to_string())?;
    let exited = value
        .get("exited")
        .and_then(as_bool)
        .ok_or_else(|| "no `exited` in the reply".to_owned())?;
    if !exited {
        return Ok(ExecStatus::Running);
    }
    let signal = value.get("signal").and_then(as_i64);
    let code = value.get("exitcode").and_then(as_i64);
    let narrow = |n: i64| i32::try_from(n).map_err(|_| format!("{n} is out of range"));
    match (signal, code) {
        (Some(signal), _) => Ok(ExecStatus::Signalled {
            signal: narrow(signal)?,
        }),
        (None, Some(code)) => Ok(ExecStatus::Exited {
            code: narrow(code)?,
        }),
        (None, None) => Err("the process exited with neither a code nor a signal".to_owned()),
    }
}

/// `pvesh get …/firewall/options`: whether the firewall is on, and its outbound policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FirewallOptions {
    #[serde(default, deserialize_with = "flexible_bool")]
    pub enable: bool,
    #[serde(default)]
    pub policy_out: Option<String>,
}

pub fn firewall_options(stdout: &str) -> Result<FirewallOptions, String> {
    serde_json::from_str(stdout).map_err(|e| e.to_string())
}

/// One entry of `pvesh get /nodes/NODE/storage`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StorageEntry {
    pub storage: String,
    /// The plugin: `dir`, `lvm`, `lvmthin`, `zfspool`, `rbd`, `nfs`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Comma-separated content types (`images,rootdir`).
    #[serde(default)]
    pub content: String,
    #[serde(default, deserialize_with = "flexible_bool")]
    pub active: bool,
}

impl StorageEntry {
    /// Holds VM disks, and is up.
    pub fn holds_images(&self) -> bool {
        self.active && self.content.split(',').any(|c| c.trim() == "images")
    }

    /// Whether a disk on it takes only what the guest wrote. Thin: LVM-thin, ZFS, Ceph RBD,
    /// btrfs, and file storages (qcow2 and raw files are sparse). Plain LVM and iSCSI LUNs
    /// allocate the whole size; a type not known here counts as thick, the safe side.
    pub fn is_thin(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "lvmthin"
                | "zfspool"
                | "zfs"
                | "rbd"
                | "btrfs"
                | "dir"
                | "nfs"
                | "cifs"
                | "glusterfs"
                | "cephfs"
        )
    }
}

pub fn storages(stdout: &str) -> Result<Vec<StorageEntry>, String> {
    serde_json::from_str(stdout).map_err(|e| e.to_string())
}

/// One entry of `pvesh get /nodes/NODE/storage/STORAGE/content`. `size` is the virtual size;
/// `used` what the volume takes, which file storages report (qcow2's allocated size) and
/// LVM-thin and ZFS do not.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VolumeEntry {
    pub volid: String,
    #[serde(default, deserialize_with = "flexible_opt_u64")]
    pub vmid: Option<u64>,
    #[serde(default, deserialize_with = "flexible_opt_u64")]
    pub size: Option<u64>,
    #[serde(default, deserialize_with = "flexible_opt_u64")]
    pub used: Option<u64>,
}

pub fn volumes(stdout: &str) -> Result<Vec<VolumeEntry>, String> {
    serde_json::from_str(stdout).map_err(|e| e.to_string())
}

/// What our sandboxes' disks take, from the node's storages, each image storage's volumes (by
/// storage id) and the node's VMs. The storages that matter are those holding a sandbox's or a
/// template's volume; provisioning is thin only when all of them are thin. A sandbox is
/// measured when every one of its volumes reports `used`; otherwise it is left out (and the
/// governor counts it as having written nothing yet, holding its whole growth reserve).
pub fn disk_usage(
    storages: &[StorageEntry],
    volumes: &[(String, Vec<VolumeEntry>)],
    vms: &[VmEntry],
) -> DiskUsage {
    let sandboxes: BTreeMap<u64, &str> = vms
        .iter()
        .filter(|vm| !vm.template && vm.name().starts_with(VM_NAME_PREFIX))
        .map(|vm| (u64::from(vm.vmid), vm.name()))
        .collect();
    let templates: Vec<u64> = vms
        .iter()
        .filter(|vm| vm.template)
        .map(|vm| u64::from(vm.vmid))
        .collect();
    let mut relevant: Vec<&str> = Vec::new();
    let mut allocated: BTreeMap<&str, Option<u64>> = BTreeMap::new();
    for (storage, list) in volumes {
        for volume in list {
            let Some(vmid) = volume.vmid else { continue };
            if let Some(name) = sandboxes.get(&vmid) {
                let entry = allocated.entry(name).or_insert(Some(0));
                *entry = entry
                    .zip(volume.used)
                    .map(|(sum, used)| sum.saturating_add(used));
            } else if !templates.contains(&vmid) {
                continue;
            }
            if !relevant.contains(&storage.as_str()) {
                relevant.push(storage);
            }
        }
    }
    let thin = !relevant.is_empty()
        && relevant.iter().all(|id| {
            storages
                .iter()
                .find(|s| s.storage == *id)
                .is_some_and(StorageEntry::is_thin)
        });
    DiskUsage {
        provisioning: if thin {
            Provisioning::Thin
        } else {
            Provisioning::Thick
        },
        allocated: allocated
            .into_iter()
            .filter_map(|(name, bytes)| Some((name.to_owned(), bytes?)))
            .collect(),
    }
}

fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Null => Some(false),
        other => as_i64(other).map(|n| n != 0),
    }
}

fn flexible_u32<'de, D: Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    let value = Value::deserialize(de)?;
    as_i64(&value)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| serde::de::Error::custom(format!("`{value}` is not a VMID")))
}

fn flexible_opt_u64<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    let value = Value::deserialize(de)?;
    if value.is_null() {
        return Ok(None);
    }
    as_i64(&value)
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("`{value}` is not a size")))
}

fn flexible_bool<'de, D: Deserializer<'de>>(de: D) -> Result<bool, D::Error> {
    let value = Value::deserialize(de)?;
    as_bool(&value).ok_or_else(|| serde::de::Error::custom(format!("`{value}` is not a boolean")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node with a directory storage (qcow2), an LVM-thin pool and a plain LVM group.
    const STORAGES: &str = r#"[
        {"storage":"local","type":"dir","content":"iso,vztmpl,backup,snippets,images","active":1,
         "enabled":1,"shared":0,"total":100861726720,"used":8591601664,"avail":87092404224},
        {"storage":"local-lvm","type":"lvmthin","content":"rootdir,images","active":1,
         "total":141734395904,"used":2834687918,"avail":138899707986},
        {"storage":"san","type":"lvm","content":"images","active":"1"},
        {"storage":"off","type":"zfspool","content":"images","active":0}
    ]"#;
    /// `local`'s images: template 9000's base and sandbox 101's qcow2 overlay and cloud-init.
    const LOCAL: &str = r#"[
        {"volid":"local:9000/base-9000-disk-0.qcow2","vmid":9000,"format":"qcow2",
         "size":2361393152,"used":598999040,"content":"images","ctime":1700000000},
        {"volid":"local:9000/base-9000-disk-0.qcow2/101/vm-101-disk-0.qcow2","vmid":"101",
         "format":"qcow2","size":32212254720,"used":52887552,"content":"images"},
        {"volid":"local:101/vm-101-cloudinit.qcow2","vmid":101,"format":"qcow2",
         "size":4194304,"used":458752,"content":"images"},
        {"volid":"local:500/vm-500-disk-0.raw","vmid":500,"format":"raw","size":1073741824,
         "used":1073741824,"content":"images"}
    ]"#;
    /// `local-lvm`: LVM-thin reports sizes only.
    const THIN: &str = r#"[
        {"volid":"local-lvm:base-9001-disk-0","vmid":"9001","format":"raw","size":2361393152,
         "content":"images"},
        {"volid":"local-lvm:vm-102-disk-0","vmid":"102","format":"raw","size":32212254720,
         "content":"images"}
    ]"#;
    const VMS: &str = r#"[
        {"vmid":9000,"name":"agentlab-template","status":"stopped","template":1},
        {"vmid":9001,"name":"agentlab-template-thin","status":"stopped","template":1},
        {"vmid":101,"name":"sandbox-0123456789ab","status":"running"},
        {"vmid":102,"name":"sandbox-ba9876543210","status":"running"},
        {"vmid":500,"name":"somebody-else","status":"running"}
    ]"#;

    #[test]
    fn storages_say_what_holds_images_and_how() {
        let list = storages(STORAGES).unwrap();
        let by = |id: &str| list.iter().find(|s| s.storage == id).unwrap().clone();
        assert!(by("local").holds_images() && by("local").is_thin());
        assert!(by("local-lvm").holds_images() && by("local-lvm").is_thin());
        assert!(
            by("san").holds_images() && !by("san").is_thin(),
            "plain LVM is thick"
        );
        assert!(!by("off").holds_images(), "inactive");
        assert!(storages("{").is_err());
    }

    #[test]
    fn disk_usage_sums_what_each_sandbox_s_volumes_take() {
        let list = storages(STORAGES).unwrap();
        let vms = vms(VMS).unwrap();
        let local = ("local".to_owned(), volumes(LOCAL).unwrap());
        let thin = ("local-lvm".to_owned(), volumes(THIN).unwrap());
        let usage = disk_usage(&list, &[local.clone(), thin.clone()], &vms);
        assert_eq!(usage.provisioning, Provisioning::Thin);
        // qcow2 on a directory: the overlay's and the cloud-init volume's allocation.
        assert_eq!(
            usage.allocated.get("sandbox-0123456789ab"),
            Some(&(52887552 + 458752))
        );
        // LVM-thin reports no usage: not measured. Another's VM is never counted.
        assert_eq!(usage.allocated.len(), 1, "{usage:?}");

        // A sandbox on plain LVM makes the storage thick.
        let san = (
            "san".to_owned(),
            volumes(r#"[{"volid":"san:vm-102-disk-1","vmid":102,"size":1073741824}]"#).unwrap(),
        );
        let usage = disk_usage(&list, &[local, thin, san], &vms);
        assert_eq!(usage.provisioning, Provisioning::Thick);
        // Nothing of ours or our templates anywhere: nothing says thin.
        assert_eq!(
            disk_usage(&list, &[], &vms).provisioning,
            Provisioning::Thick
        );
    }

    #[test]
    fn nextid_reads_text_and_json() {
        assert_eq!(nextid("101\n"), Ok(101));
        assert_eq!(nextid("\"102\"\n"), Ok(102));
        assert!(nextid("").is_err());
        assert!(nextid("99").is_err());
        assert!(nextid("abc").is_err());
    }

    #[test]
    fn vm_lists_read_numbers_and_strings() {
        let text = r#"[{"vmid":101,"name":"sandbox-abc","status":"running","cpus":4,"maxmem":6442450944},
                       {"vmid":"9000","name":"agentlab-template","status":"stopped","template":1},
                       {"vmid":102,"status":"stopped","lock":"clone"}]"#;
        let vms = vms(text).unwrap();
        assert_eq!(vms.len(), 3);
        assert!(vms[0].running() && !vms[0].template);
        assert_eq!(vms[1].vmid, 9000);
        assert!(vms[1].template);
        assert_eq!(vms[2].name(), "");
        assert_eq!(vms[2].lock.as_deref(), Some("clone"));
        let nodes = nodes(r#"[{"node":"pve","status":"online","maxcpu":16}]"#).unwrap();
        assert_eq!(nodes[0].node, "pve");
    }

    const TEMPLATE: &str = "agent: enabled=1,fstrim_cloned_disks=1\nboot: order=scsi0;ide2;net0\n\
        cores: 2\nide2: local-lvm:vm-9000-cloudinit,media=cdrom\nmemory: 2048\n\
        name: agentlab-template\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr1,firewall=1\n\
        scsi0: local-lvm:base-9000-disk-0,discard=on,size=3584M\nscsihw: virtio-scsi-pci\n\
        serial0: socket\ntemplate: 1\n\n[pending]\ntemplate: 0\n";

    #[test]
    fn a_good_template_gives_its_boot_disk() {
        let config = qm_config(TEMPLATE);
        assert_eq!(config.get("template").map(String::as_str), Some("1"));
        let info = template_info(9000, &config).unwrap();
        assert_eq!(info.root_disk, "scsi0");
        assert_eq!(info.root_size_bytes, Some(3584 << 20));
    }

    #[test]
    fn template_problems_say_what_to_fix() {
        let without = |key: &str| {
            let mut config = qm_config(TEMPLATE);
            config.remove(key);
            template_info(9000, &config).unwrap_err()
        };
        assert!(without("template").contains("qm template 9000"));
        assert!(without("agent").contains("--agent enabled=1"));
        assert!(without("ide2").contains("cloud-init drive"));
        assert!(without("scsi0").contains("no boot disk"));
        let mut config = qm_config(TEMPLATE);
        config.insert("agent".into(), "0".into());
        assert!(template_info(9000, &config)
            .unwrap_err()
            .contains("guest agent"));
    }

    #[test]
    fn the_boot_disk_comes_from_the_boot_order_then_the_disks() {
        let config = qm_config(
            "template: 1\nagent: 1\nbootdisk: virtio0\nvirtio0: local-zfs:base-9000-disk-0,size=32G\n\
             sata0: local-zfs:vm-9000-cloudinit,media=cdrom\n",
        );
        let info = template_info(9000, &config).unwrap();
        assert_eq!(info.root_disk, "virtio0");
        assert_eq!(info.root_size_bytes, Some(32 << 30));
        let config = qm_config(
            "template: 1\nagent: 1,type=virtio\nide0: local:9000/base-9000-disk-0.qcow2,size=10G\n\
             ide2: local:9000/vm-9000-cloudinit.qcow2,media=cdrom\n",
        );
        assert_eq!(template_info(9000, &config).unwrap().root_disk, "ide0");
    }

    #[test]
    fn a_synchronous_exec_gives_its_code_and_output() {
        assert_eq!(
            exec_output(r#"{"exitcode":0,"exited":1,"out-data":"{\"v1\": {}}\n"}"#).unwrap(),
            (Some(0), b"{\"v1\": {}}\n".to_vec())
        );
        assert_eq!(
            exec_output(r#"{"exitcode":3,"exited":1}"#).unwrap(),
            (Some(3), Vec::new())
        );
        assert_eq!(exec_output(r#"{"pid":12}"#).unwrap(), (None, Vec::new()));
        assert!(exec_output(r#"{"exited":1}"#).is_err());
    }

    #[test]
    fn agent_values() {
        for on in [
            "1",
            "enabled=1",
            "1,type=virtio",
            "fstrim_cloned_disks=1,enabled=1",
        ] {
            assert!(agent_enabled(on), "{on}");
        }
        for off in ["0", "enabled=0", "fstrim_cloned_disks=1", ""] {
            assert!(!agent_enabled(off), "{off}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32G"), Some(32 << 30));
        assert_eq!(parse_size("2252M"), Some(2252 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
    }

    #[test]
    fn guest_exec_replies() {
        assert_eq!(exec_pid("{\n   \"pid\" : 1234\n}\n"), Ok(1234));
        assert!(exec_pid("{}").is_err());
        assert_eq!(
            exec_status("{\n   \"exited\" : 0\n}\n"),
            Ok(ExecStatus::Running)
        );
        assert_eq!(
            exec_status(r#"{"exited":1,"exitcode":3,"out-data":"hi\n"}"#),
            Ok(ExecStatus::Exited { code: 3 })
        );
        assert_eq!(
            exec_status(r#"{"exited":true,"signal":9}"#),
            Ok(ExecStatus::Signalled { signal: 9 })
        );
        assert!(exec_status(r#"{"exited":1}"#).is_err());
    }

    #[test]
    fn firewall_options_read_0_1() {
        let options = firewall_options(r#"{"enable":1,"policy_out":"DROP","dhcp":1}"#).unwrap();
        assert!(options.enable);
        assert_eq!(options.policy_out.as_deref(), Some("DROP"));
        assert_eq!(firewall_options("{}").unwrap(), FirewallOptions::default());
    }
}

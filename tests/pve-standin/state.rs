//! The stand-in's state folder and settings. Everything lives under `PVE_STANDIN_DIR`:
//!
//! - `qemu-server/ID.conf`: each VM's config, in Proxmox's `key: value` format;
//! - `images/VOLNAME.qcow2`: disk volumes (a template's disk is a copy of the imported image, a
//!   linked clone's disk a qcow2 overlay on it);
//! - `firewall/cluster.json`, `firewall/ID.json`: firewall options and rules;
//! - `vms/NAME/`: the local QEMU backend's folder of a VM that has been started;
//! - `calls.log`: one line per call.
//!
//! Settings come from the environment: `PVE_STANDIN_NODE` (default `pve`), `PVE_STANDIN_IMAGES`
//! (the local backend's template folder: kernel and initrd every VM boots),
//! `PVE_STANDIN_GUEST_ENDPOINT` (the daemon's guest listener, which guests reach at
//! 10.0.2.100:80), `PVE_STANDIN_STORAGES` (`id=dir,id=dir`: where `STORAGE:snippets/FILE`
//! resolves; default `local=PVE_STANDIN_DIR/storage/local`), `PVE_STANDIN_ACCEL` (tcg, kvm or
//! auto; default tcg), `PVE_STANDIN_MEMORY_CAP_MB`, `PVE_STANDIN_CORES_CAP`, and
//! `PVE_STANDIN_NO_LINKED_CLONE=1` (the storage cannot link, as with a plain directory of raw
//! images).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::{Fail, Result};

#[derive(Debug, Clone)]
pub struct State {
    pub root: PathBuf,
    pub node: String,
    pub images: Option<PathBuf>,
    pub guest_endpoint: Option<SocketAddr>,
    pub storages: BTreeMap<String, PathBuf>,
    pub accel: agentlab::qemu::Accel,
    pub memory_cap_mb: Option<u64>,
    pub cores_cap: Option<u32>,
    pub no_linked_clone: bool,
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

impl State {
    pub fn from_env() -> Result<State> {
        let root = PathBuf::from(env("PVE_STANDIN_DIR").ok_or_else(|| {
            Fail::new("PVE_STANDIN_DIR is not set (see tests/pve-standin/README.md)")
        })?);
        let mut storages = BTreeMap::new();
        match env("PVE_STANDIN_STORAGES") {
            Some(list) => {
                for entry in list.split(',') {
                    let (id, dir) = entry.split_once('=').ok_or_else(|| {
                        Fail::new(format!("PVE_STANDIN_STORAGES: `{entry}` is not id=dir"))
                    })?;
                    storages.insert(id.to_owned(), PathBuf::from(dir));
                }
            }
            None => {
                storages.insert("local".to_owned(), root.join("storage/local"));
            }
        }
        let accel = match env("PVE_STANDIN_ACCEL").as_deref() {
            None | Some("tcg") => agentlab::qemu::Accel::Tcg,
            Some("kvm") => agentlab::qemu::Accel::Kvm,
            Some("auto") => agentlab::qemu::Accel::Auto,
            Some(other) => return Err(Fail::new(format!("PVE_STANDIN_ACCEL: unknown `{other}`"))),
        };
        let number = |key: &str| -> Result<Option<u64>> {
            env(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| Fail::new(format!("{key}: `{v}` is not a number")))
                })
                .transpose()
        };
        let guest_endpoint = env("PVE_STANDIN_GUEST_ENDPOINT")
            .map(|v| {
                v.parse().map_err(|_| {
                    Fail::new(format!(
                        "PVE_STANDIN_GUEST_ENDPOINT: `{v}` is not host:port"
                    ))
                })
            })
            .transpose()?;
        let state = State {
            node: env("PVE_STANDIN_NODE").unwrap_or_else(|| "pve".to_owned()),
            images: env("PVE_STANDIN_IMAGES").map(PathBuf::from),
            guest_endpoint,
            storages,
            accel,
            memory_cap_mb: number("PVE_STANDIN_MEMORY_CAP_MB")?,
            cores_cap: number("PVE_STANDIN_CORES_CAP")?.map(|n| n as u32),
            no_linked_clone: env("PVE_STANDIN_NO_LINKED_CLONE").as_deref() == Some("1"),
            root,
        };
        for dir in [
            state.conf_dir(),
            state.images_dir(),
            state.firewall_dir(),
            state.vms_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Fail::new(format!("creating {}: {e}", dir.display())))?;
        }
        Ok(state)
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.root.join("qemu-server")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn firewall_dir(&self) -> PathBuf {
        self.root.join("firewall")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn conf_path(&self, vmid: u32) -> PathBuf {
        self.conf_dir().join(format!("{vmid}.conf"))
    }

    /// The path Proxmox names in its "does not exist" message.
    pub fn missing(&self, vmid: u32) -> Fail {
        Fail::new(format!(
            "Configuration file 'nodes/{}/qemu-server/{vmid}.conf' does not exist",
            self.node
        ))
    }

    /// Takes the stand-in's one lock (what Proxmox does per VM, coarser): held until dropped.
    pub fn lock(&self) -> Result<File> {
        let file = File::create(self.root.join(".lock"))?;
        flock(&file, FlockOperation::LockExclusive)?;
        Ok(file)
    }

    pub fn load(&self, vmid: u32) -> Result<Conf> {
        match std::fs::read_to_string(self.conf_path(vmid)) {
            Ok(text) => Ok(Conf::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.missing(vmid)),
            Err(e) => Err(e.into()),
        }
    }

    pub fn exists(&self, vmid: u32) -> bool {
        self.conf_path(vmid).exists()
    }

    pub fn save(&self, vmid: u32, conf: &Conf) -> Result<()> {
        write_atomically(&self.conf_path(vmid), conf.render().as_bytes())
    }

    /// Every VM, by VMID.
    pub fn all(&self) -> Result<BTreeMap<u32, Conf>> {
        let mut vms = BTreeMap::new();
        for entry in std::fs::read_dir(self.conf_dir())? {
            let name = entry?.file_name();
            let Some(vmid) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".conf"))
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            if let Ok(conf) = self.load(vmid) {
                vms.insert(vmid, conf);
            }
        }
        Ok(vms)
    }

    /// Where a `STORAGE:snippets/FILE` volume lives, if the storage is known.
    pub fn snippet_path(&self, volume: &str) -> Option<PathBuf> {
        let (storage, file) = volume.split_once(':')?;
        let file = file.strip_prefix("snippets/")?;
        if file.contains('/') || file.starts_with('.') {
            return None;
        }
        Some(self.storages.get(storage)?.join(file))
    }

    pub fn volume_path(&self, volname: &str) -> PathBuf {
        self.images_dir().join(format!("{volname}.qcow2"))
    }

    pub fn firewall_path(&self, vmid: Option<u32>) -> PathBuf {
        match vmid {
            Some(vmid) => self.firewall_dir().join(format!("{vmid}.json")),
            None => self.firewall_dir().join("cluster.json"),
        }
    }

    pub fn firewall(&self, vmid: Option<u32>) -> Result<serde_json::Value> {
        match std::fs::read_to_string(self.firewall_path(vmid)) {
            Ok(text) => Ok(serde_json::from_str(&text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(serde_json::json!({"options": {}, "rules": []}))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn save_firewall(&self, vmid: Option<u32>, value: &serde_json::Value) -> Result<()> {
        write_atomically(&self.firewall_path(vmid), value.to_string().as_bytes())
    }
}

pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = File::create(&temp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

/// A VM config: `key: value` lines (the order of the file is kept; `qm config` sorts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conf {
    pub entries: BTreeMap<String, String>,
    /// Comment lines (`#…`): the description, or qm clone's placeholder marker.
    pub comments: Vec<String>,
}

impl Conf {
    pub fn parse(text: &str) -> Conf {
        let mut conf = Conf::default();
        for line in text.lines() {
            if line.starts_with('[') {
                break;
            }
            if let Some(comment) = line.strip_prefix('#') {
                conf.comments.push(comment.to_owned());
            } else if let Some((key, value)) = line.split_once(':') {
                conf.entries
                    .insert(key.trim().to_owned(), value.trim().to_owned());
            }
        }
        conf
    }

    pub fn render(&self) -> String {
        let mut text: String = self.comments.iter().map(|c| format!("#{c}\n")).collect();
        for (key, value) in &self.entries {
            text.push_str(&format!("{key}: {value}\n"));
        }
        text
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.entries.insert(key.to_owned(), value.into());
    }

    pub fn name(&self) -> &str {
        self.get("name").unwrap_or_default()
    }

    pub fn is_template(&self) -> bool {
        self.get("template") == Some("1")
    }

    /// `VM is locked (clone)`, as Proxmox refuses most commands on a locked VM.
    pub fn check_lock(&self) -> Result<()> {
        match self.get("lock") {
            Some(lock) => Err(Fail::new(format!("VM is locked ({lock})"))),
            None => Ok(()),
        }
    }

    /// The disk keys that hold a volume (not a CD-ROM, not the cloud-init drive).
    pub fn disks(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .filter(|(key, _)| is_drive_key(key))
            .filter(|(_, value)| !value.contains("media=cdrom") && !value.contains("cloudinit"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

pub fn is_drive_key(key: &str) -> bool {
    ["scsi", "virtio", "sata", "ide", "efidisk", "tpmstate"]
        .iter()
        .any(|bus| {
            key.strip_prefix(bus)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// A drive value's volume name (`local:vm-101-disk-0` → `vm-101-disk-0`) and its options.
pub fn drive_volume(value: &str) -> (String, String) {
    let first = value.split(',').next().unwrap_or_default();
    let first = first.strip_prefix("file=").unwrap_or(first);
    let (storage, volname) = first.split_once(':').unwrap_or(("", first));
    (storage.to_owned(), volname.to_owned())
}

/// A drive option's value (`size=2G` → `2G`).
pub fn drive_option<'a>(value: &'a str, key: &str) -> Option<&'a str> {
    value
        .split(',')
        .skip(1)
        .find_map(|part| part.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

//! The real machines behind the stand-in, through the project's local QEMU backend
//! (`agentlab::qemu`): disk volumes are qcow2 files (a linked clone is an overlay on the
//! template's disk), and a started VM is a local-backend sandbox folder under `vms/NAME` whose
//! seed carries the `--cicustom` user-data, so the guest boots and phones home exactly as a
//! Proxmox guest would. The guest agent is the real one, reached on the VM's QGA socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentlab::backend::{Backend, NetworkMode, VmHandle};
use agentlab::cloudinit::SeedFiles;
use agentlab::model::now_ms;
use agentlab::qemu::layout::{self, SandboxPaths, SandboxRecord, Template};
use agentlab::qemu::qga::QgaClient;
use agentlab::qemu::qmp::QmpClient;
use agentlab::qemu::seed::{self, SeedTools};
use agentlab::qemu::{process, tool, QemuBackend, QemuConfig, QemuDirs};
use tokio::process::Command;

use crate::state::{drive_option, drive_volume, Conf, State};
use crate::{Fail, Result};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn qemu_config(state: &State) -> QemuConfig {
    QemuConfig {
        accel: state.accel,
        memory_mb_cap: state.memory_cap_mb,
        cores_cap: state.cores_cap,
        ..QemuConfig::default()
    }
}

/// The local backend over `vms/`. Commands that never boot anything do not need the images or
/// the guest endpoint, so placeholders stand in for them there.
fn backend(state: &State) -> Result<QemuBackend> {
    let dirs = QemuDirs {
        images: state
            .images
            .clone()
            .unwrap_or_else(|| state.root.join("no-images")),
        sandboxes: state.vms_dir(),
        snapshots: state.root.join("snapshots"),
    };
    let endpoint = state.guest_endpoint.unwrap_or_else(|| {
        "127.0.0.1:9"
            .parse()
            .unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 9)))
    });
    Ok(QemuBackend::new(qemu_config(state), dirs, endpoint)?)
}

pub fn paths(state: &State, name: &str) -> SandboxPaths {
    SandboxPaths::new(&state.vms_dir(), name)
}

fn handle(paths: &SandboxPaths, name: &str) -> VmHandle {
    VmHandle {
        name: name.to_owned(),
        vm_ref: paths.dir.display().to_string(),
    }
}

/// Whether the VM's QEMU runs.
pub async fn running(state: &State, conf: &Conf) -> bool {
    let name = conf.name();
    if layout::validate_name(name).is_err() {
        return false;
    }
    matches!(process::running_pid(&paths(state, name)).await, Ok(Some(_)))
}

/// The local backend's template: kernel and initrd every stand-in VM boots.
pub async fn boot_files(state: &State) -> Result<Template> {
    let images = state
        .images
        .as_ref()
        .ok_or_else(|| Fail::new("PVE_STANDIN_IMAGES is not set: the stand-in needs the local backend's template to boot VMs"))?;
    Ok(Template::resolve(images, "", None).await?)
}

async fn qemu_img(args: &[&str]) -> Result<String> {
    let mut command = Command::new("qemu-img");
    command.args(args);
    let output = tool::run(command, TOOL_TIMEOUT).await?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A volume's virtual size in bytes.
pub async fn virtual_size(path: &Path) -> Result<u64> {
    let info = qemu_img(&[
        "info",
        "--output",
        "json",
        "-U",
        &path.display().to_string(),
    ])
    .await?;
    let value: serde_json::Value = serde_json::from_str(&info)?;
    value["virtual-size"]
        .as_u64()
        .ok_or_else(|| Fail::new(format!("no size for {}", path.display())))
}

/// Makes `dest` a linked clone (qcow2 overlay) of `base`, or a full copy.
pub async fn clone_volume(base: &Path, dest: &Path, full: bool) -> Result<()> {
    let base = std::fs::canonicalize(base)?;
    let (base, dest) = (base.display().to_string(), dest.display().to_string());
    if full {
        qemu_img(&["convert", "-q", "-O", "qcow2", &base, &dest]).await?;
    } else {
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &dest,
        ])
        .await?;
    }
    Ok(())
}

pub async fn resize_volume(path: &Path, bytes: u64) -> Result<()> {
    qemu_img(&[
        "resize",
        "-q",
        &path.display().to_string(),
        &bytes.to_string(),
    ])
    .await?;
    Ok(())
}

/// Boots VM `vmid` the way `qm start` would: its cloud-init drive regenerated from the config
/// (the `--cicustom` user-data, Proxmox-style meta-data), then QEMU launched.
pub async fn start(state: &State, vmid: u32, conf: &Conf) -> Result<()> {
    let name = conf.name();
    layout::validate_name(name).map_err(|_| {
        Fail::new(format!(
            "the stand-in boots only VMs named sandbox-…, not `{name}`"
        ))
    })?;
    let user_volume = conf
        .get("cicustom")
        .and_then(|c| c.split(',').find_map(|p| p.strip_prefix("user=")))
        .ok_or_else(|| {
            Fail::new("the stand-in needs --cicustom user=STORAGE:snippets/FILE to boot a VM")
        })?;
    let snippet = state
        .snippet_path(user_volume)
        .filter(|p| p.is_file())
        .ok_or_else(|| Fail::new(format!("volume '{user_volume}' does not exist")))?;
    let user_data = std::fs::read_to_string(&snippet)?;
    let (disk_key, disk_value) = conf
        .disks()
        .into_iter()
        .next()
        .ok_or_else(|| Fail::new(format!("VM {vmid} has no disk to boot")))?;
    let (_, volname) = drive_volume(&disk_value);
    let volume = state.volume_path(&volname);
    if !volume.exists() {
        return Err(Fail::new(format!(
            "volume for {disk_key} ({volname}) does not exist"
        )));
    }

    let paths = paths(state, name);
    std::fs::create_dir_all(&paths.dir)?;
    let overlay = paths.overlay();
    let _ = std::fs::remove_file(&overlay);
    std::os::unix::fs::symlink(&volume, &overlay)?;

    // Proxmox writes its own meta-data (instance id, hostname) next to the custom user-data.
    let files = SeedFiles {
        meta_data: format!(
            "instance-id: \"pve-{vmid}-{}\"\nlocal-hostname: \"{name}\"\n",
            now_ms()
        ),
        user_data,
    };
    let config = qemu_config(state);
    let tools = SeedTools {
        mkfs_vfat: config.mkfs_vfat_binary.clone(),
        mcopy: config.mcopy_binary.clone(),
        timeout: TOOL_TIMEOUT,
    };
    seed::write_image(&files, &paths.seed_image(), &paths.seed_staging(), &tools).await?;

    let boot = boot_files(state).await?;
    let number = |key: &str, default: u64| -> u64 {
        conf.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let disk_bytes = virtual_size(&volume).await?;
    // net0's firewall flag is the sandbox's network: the template's VM firewall (outbound DROP
    // but for the daemon) is what restricts it on Proxmox, `restrict=on` here.
    let network = match conf.get("net0").and_then(|n| drive_option(n, "firewall")) {
        Some("1") => NetworkMode::Restricted,
        _ => NetworkMode::Egress,
    };
    let record = SandboxRecord {
        name: name.to_owned(),
        job_id: format!("pve-{vmid}"),
        created_ms: now_ms(),
        template: Template {
            root_disk: volume.clone(),
            ..boot
        },
        cores: config.clamp_cores(number("cores", 1) as u32),
        memory_mb: config.clamp_memory_mb(number("memory", 512)),
        disk_gb: disk_bytes.div_ceil(1 << 30),
        network,
        // The stand-in's own folder; whose VM it is, Proxmox-style, is the config's tag.
        owner: None,
        restore: None,
        start: agentlab::model::StartMode::Cold,
    };
    std::fs::write(paths.record(), serde_json::to_string_pretty(&record)?)?;
    std::fs::write(paths.complete_marker(), b"")?;
    backend(state)?.start_vm(&handle(&paths, name)).await?;
    Ok(())
}

/// Stops VM `name`'s QEMU: QMP `quit`, then signals for whatever is left.
pub async fn stop(state: &State, name: &str) -> Result<()> {
    if layout::validate_name(name).is_err() {
        return Ok(());
    }
    let paths = paths(state, name);
    let pids = process::find(&paths).await?;
    if pids.is_empty() {
        return Ok(());
    }
    if let Ok(mut qmp) = QmpClient::connect(&paths.qmp_socket(), Duration::from_secs(2)).await {
        let _ = qmp.quit(Duration::from_secs(2)).await;
    }
    let left = process::wait_gone(&paths, &pids, Duration::from_secs(3)).await?;
    process::terminate(
        &paths,
        &left,
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .await?;
    Ok(())
}

/// Removes VM `name`'s local-backend folder (its QEMU stopped first).
pub async fn remove(state: &State, name: &str) -> Result<()> {
    if layout::validate_name(name).is_err() {
        return Ok(());
    }
    let paths = paths(state, name);
    backend(state)?.destroy_vm(&handle(&paths, name)).await?;
    Ok(())
}

/// A guest-agent client for VM `name`.
pub fn agent(state: &State, name: &str) -> QgaClient {
    QgaClient::new(paths(state, name).qga_socket())
}

/// The disk files of VM `vmid` (`vm-ID-…` and `base-ID-…` volumes).
pub fn volumes_of(state: &State, vmid: u32) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(state.images_dir())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&format!("vm-{vmid}-")) || name.starts_with(&format!("base-{vmid}-")) {
            found.push(path);
        }
    }
    Ok(found)
}

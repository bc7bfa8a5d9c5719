//! The `qemu:` section of the daemon's config: which binaries to run, how to pick the accelerator,
//! where templates and sandboxes live, and the timeouts of the local backend.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a guest of the local QEMU backend reaches the daemon's guest API: a `guestfwd` on the
/// user-mode network to the daemon's `guest_listen`. The daemon builds `CloudInitSpec::guest_url`
/// and the phone-home URL from it; it is `guest_url`'s default on that backend.
pub const GUEST_URL: &str = "http://10.0.2.100";

/// How guests are accelerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot succeeds on this host, TCG otherwise. `/dev/kvm` existing is not enough:
    /// on some nested hosts a KVM guest hangs before its kernel prints anything.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub qemu_binary: PathBuf,
    pub qemu_img_binary: PathBuf,
    /// Runs once per guest connection to the daemon's guest endpoint (the `guestfwd` helper).
    pub socat_binary: PathBuf,
    /// Builds the NoCloud seed image (dosfstools).
    pub mkfs_vfat_binary: PathBuf,
    /// Copies the seed files into the image (mtools).
    pub mcopy_binary: PathBuf,
    pub accel: Accel,
    /// Templates: `images_dir/{vmlinuz,initrd.img,root.qcow2}` is the default template and
    /// `images_dir/NAME/…` the template `NAME`. None: `data_dir/images`.
    pub images_dir: Option<PathBuf>,
    /// One folder per sandbox VM. None: `data_dir/sandboxes`.
    pub sandboxes_dir: Option<PathBuf>,
    /// Template snapshots, one folder per template and VM shape. None: `data_dir/snapshots`.
    pub snapshots_dir: Option<PathBuf>,
    /// How long a snapshot's template VM may take to boot until its guest is fully up.
    #[serde(with = "humantime_serde")]
    pub snapshot_boot_timeout: Duration,
    /// How long a restore may take, from loading the device state until the guest agent
    /// answers; past it the snapshot counts as broken.
    #[serde(with = "humantime_serde")]
    pub restore_timeout: Duration,
    /// How long the one-time KVM probe boot may take before KVM is judged unusable.
    #[serde(with = "humantime_serde")]
    pub kvm_probe_timeout: Duration,
    /// How long a VM gets to exit after QMP `quit` before it is signalled.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Clamp on a guest's RAM, for hosts smaller than the profiles assume. None: no clamp.
    pub memory_mb_cap: Option<u64>,
    /// Clamp on a guest's vCPUs. None: no clamp.
    pub cores_cap: Option<u32>,
    /// The guest kernel's command line. None: the template's `manifest.json` says, else a
    /// built-in default for the test image.
    pub kernel_cmdline: Option<String>,
    /// Cap on one host tool run (qemu-img, mkfs.vfat, mcopy, the qemu launch itself).
    #[serde(with = "humantime_serde")]
    pub tool_timeout: Duration,
    /// Cap on one conversion of `agentlab template import` (qemu-img reading or writing a whole
    /// disk image, gigabytes).
    #[serde(with = "humantime_serde")]
    pub import_timeout: Duration,
    /// Cap on one `agent_ping` (connect, sync, guest-ping); short, because callers poll it.
    #[serde(with = "humantime_serde")]
    pub agent_ping_timeout: Duration,
    /// Cap on one guest-agent call other than ping.
    #[serde(with = "humantime_serde")]
    pub agent_call_timeout: Duration,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            qemu_img_binary: PathBuf::from("qemu-img"),
            socat_binary: PathBuf::from("socat"),
            mkfs_vfat_binary: PathBuf::from("mkfs.vfat"),
            mcopy_binary: PathBuf::from("mcopy"),
            accel: Accel::Auto,
            images_dir: None,
            sandboxes_dir: None,
            snapshots_dir: None,
            snapshot_boot_timeout: Duration::from_secs(300),
            restore_timeout: Duration::from_secs(30),
            kvm_probe_timeout: Duration::from_secs(20),
            stop_grace: Duration::from_secs(3),
            memory_mb_cap: None,
            cores_cap: None,
            kernel_cmdline: None,
            tool_timeout: Duration::from_secs(60),
            import_timeout: Duration::from_secs(30 * 60),
            agent_ping_timeout: Duration::from_millis(1500),
            agent_call_timeout: Duration::from_secs(10),
        }
    }
}

impl QemuConfig {
    /// The templates folder, `data_dir/images` unless configured.
    pub fn images_dir(&self, data_dir: &Path) -> PathBuf {
        self.images_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("images"))
    }

    /// The sandboxes folder, `data_dir/sandboxes` unless configured.
    pub fn sandboxes_dir(&self, data_dir: &Path) -> PathBuf {
        self.sandboxes_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("sandboxes"))
    }

    /// The snapshots folder, `data_dir/snapshots` unless configured.
    pub fn snapshots_dir(&self, data_dir: &Path) -> PathBuf {
        self.snapshots_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("snapshots"))
    }

    /// The memory a guest gets once the host clamp applies.
    pub fn clamp_memory_mb(&self, requested: u64) -> u64 {
        match self.memory_mb_cap {
            Some(cap) => requested.min(cap),
            None => requested,
        }
    }

    pub fn clamp_cores(&self, requested: u32) -> u32 {
        match self.cores_cap {
            Some(cap) => requested.min(cap),
            None => requested,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_gives_defaults() {
        let config: QemuConfig = yaml_serde::from_str("{}").unwrap();
        assert_eq!(config, QemuConfig::default());
        assert_eq!(config.accel, Accel::Auto);
        assert_eq!(config.kvm_probe_timeout, Duration::from_secs(20));
        assert_eq!(config.stop_grace, Duration::from_secs(3));
    }

    #[test]
    fn parses_every_key() {
        let text = r#"
qemu_binary: /opt/qemu/bin/qemu-system-x86_64
qemu_img_binary: /opt/qemu/bin/qemu-img
socat_binary: /usr/local/bin/socat
mkfs_vfat_binary: /sbin/mkfs.vfat
mcopy_binary: /usr/bin/mcopy
accel: tcg
images_dir: /srv/images
sandboxes_dir: /srv/sandboxes
snapshots_dir: /srv/snapshots
snapshot_boot_timeout: 10m
restore_timeout: 20s
kvm_probe_timeout: 5s
stop_grace: 500ms
memory_mb_cap: 512
cores_cap: 1
kernel_cmdline: "console=ttyS0"
tool_timeout: 2m
agent_ping_timeout: 1s
agent_call_timeout: 30s
"#;
        let config: QemuConfig = yaml_serde::from_str(text).unwrap();
        assert_eq!(config.accel, Accel::Tcg);
        assert_eq!(config.stop_grace, Duration::from_millis(500));
        assert_eq!(config.tool_timeout, Duration::from_secs(120));
        assert_eq!(config.snapshot_boot_timeout, Duration::from_secs(600));
        assert_eq!(config.restore_timeout, Duration::from_secs(20));
        assert_eq!(
            config.snapshots_dir(Path::new("/var/lib/agentlab")),
            PathBuf::from("/srv/snapshots")
        );
        assert_eq!(config.clamp_memory_mb(2048), 512);
        assert_eq!(config.clamp_cores(4), 1);
        assert_eq!(
            config.images_dir(Path::new("/var/lib/agentlab")),
            PathBuf::from("/srv/images")
        );
    }

    #[test]
    fn dirs_default_under_data_dir() {
        let config = QemuConfig::default();
        let data = Path::new("/var/lib/agentlab");
        assert_eq!(config.images_dir(data), data.join("images"));
        assert_eq!(config.sandboxes_dir(data), data.join("sandboxes"));
        assert_eq!(config.snapshots_dir(data), data.join("snapshots"));
        assert_eq!(config.clamp_memory_mb(4096), 4096);
    }

    #[test]
    fn unknown_keys_and_accels_are_rejected() {
        assert!(yaml_serde::from_str::<QemuConfig>("qemu_bin: x").is_err());
        assert!(yaml_serde::from_str::<QemuConfig>("accel: hvf").is_err());
    }
}

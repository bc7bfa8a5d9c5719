//! Where things live on disk: the template a sandbox is cloned from, the per-sandbox folder and its
//! files, and `sandbox.json`, the record that lets a restarted daemon find and start its VMs and
//! tells whose they are (its `owner`, written first thing into a new folder).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, NetworkMode, StartMode};
use crate::model::VM_NAME_PREFIX;

/// The longest VM name accepted; it doubles as the guest's hostname.
pub const MAX_NAME_LEN: usize = 63;

/// Unix socket paths must fit `sockaddr_un.sun_path` (108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The kernel command line used when neither the config nor the template's manifest gives one.
pub const FALLBACK_KERNEL_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw quiet panic=-1";

/// The files of one template and how it boots. Each path is resolved through symlinks when the
/// sandbox is cloned, so rebuilding the template (which swaps a `current` link) never changes an
/// existing sandbox's base.
///
/// On disk (`sandbox.json`, a snapshot's shape) a kernel-booted template keeps the form it had
/// before templates could boot by firmware, so that snapshot ids, which hash it, stay the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "TemplateRecord", try_from = "TemplateRecord")]
pub struct Template {
    pub boot: Boot,
    pub root_disk: PathBuf,
}

/// How a template's VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads the template's kernel and initramfs itself (`-kernel`): the templates that
    /// scripts/build-guest-image.sh builds, whose root file system is the whole disk.
    Kernel(KernelBoot),
    /// The firmware (QEMU's SeaBIOS) boots the disk's own boot loader: a whole-disk image with a
    /// partition table, such as a distribution's cloud image (`agentlab template import`).
    Firmware,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// `manifest.json`'s word for a firmware-booted template.
pub const FIRMWARE_BOOT: &str = "firmware";

/// The serialized form of a `Template`.
#[derive(Debug, Serialize, Deserialize)]
struct TemplateRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initrd: Option<PathBuf>,
    root_disk: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel_cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot: Option<String>,
}

impl From<Template> for TemplateRecord {
    fn from(template: Template) -> TemplateRecord {
        match template.boot {
            Boot::Kernel(kernel) => TemplateRecord {
                kernel: Some(kernel.kernel),
                initrd: Some(kernel.initrd),
                root_disk: template.root_disk,
                kernel_cmdline: Some(kernel.cmdline),
                boot: None,
            },
            Boot::Firmware => TemplateRecord {
                kernel: None,
                initrd: None,
                root_disk: template.root_disk,
                kernel_cmdline: None,
                boot: Some(FIRMWARE_BOOT.to_owned()),
            },
        }
    }
}

impl TryFrom<TemplateRecord> for Template {
    type Error = String;

    fn try_from(record: TemplateRecord) -> Result<Template, String> {
        let boot = match (record.boot.as_deref(), record.kernel, record.initrd) {
            (Some(FIRMWARE_BOOT), None, None) => Boot::Firmware,
            (Some(FIRMWARE_BOOT), _, _) => {
                return Err("a firmware-booted template names no kernel or initrd".into())
            }
            (Some(other), _, _) => return Err(format!("unknown template boot `{other}`")),
            (None, Some(kernel), Some(initrd)) => Boot::Kernel(KernelBoot {
                kernel,
                initrd,
                cmdline: record.kernel_cmdline.unwrap_or_default(),
            }),
            (None, _, _) => {
                return Err("a kernel-booted template needs its kernel and initrd".into())
            }
        };
        Ok(Template {
            boot,
            root_disk: record.root_disk,
        })
    }
}

/// The subset of the template's `manifest.json` the backend reads.
#[derive(Debug, Default, Deserialize)]
struct Manifest {
    kernel_cmdline: Option<String>,
    /// `firmware` for a whole-disk image booted by its own boot loader; absent for a kernel one.
    boot: Option<String>,
}

impl Template {
    /// The folder of template `name` under `images_dir`: the folder itself for the default (empty)
    /// name, `images_dir/NAME` otherwise.
    pub fn dir(images_dir: &Path, name: &str) -> Result<PathBuf, BackendError> {
        if name.is_empty() {
            return Ok(images_dir.to_owned());
        }
        let plain = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !plain || name.starts_with('.') || name.len() > MAX_NAME_LEN {
            return Err(BackendError::InvalidInput(format!(
                "template name `{name}` must be a plain folder name under the images folder"
            )));
        }
        Ok(images_dir.join(name))
    }

    /// Finds template `name`, resolving its files to their real paths. `cmdline_override` (from
    /// the config) wins over the template manifest's `kernel_cmdline`; a firmware-booted
    /// template's boot loader has its own command line.
    pub async fn resolve(
        images_dir: &Path,
        name: &str,
        cmdline_override: Option<&str>,
    ) -> Result<Template, BackendError> {
        let dir = Template::dir(images_dir, name)?;
        let label = if name.is_empty() { "default" } else { name };
        let resolve = |file: &'static str| {
            let path = dir.join(file);
            async move {
                tokio::fs::canonicalize(&path).await.map_err(|e| {
                    BackendError::InvalidInput(format!(
                        "template `{label}` is not usable: {} ({e}); build it with \
                         scripts/build-guest-image.sh or import a disk image with \
                         `agentlab template import`",
                        path.display()
                    ))
                })
            }
        };
        let manifest = read_manifest(&dir.join("manifest.json")).await?;
        let root_disk = resolve("root.qcow2").await?;
        let boot = match manifest.boot.as_deref() {
            Some(FIRMWARE_BOOT) => Boot::Firmware,
            Some(other) => {
                return Err(BackendError::InvalidInput(format!(
                    "template `{label}`: its manifest's boot `{other}` is not one this daemon \
                     knows (`{FIRMWARE_BOOT}`, or none for a kernel-booted template)"
                )))
            }
            None => Boot::Kernel(KernelBoot {
                kernel: resolve("vmlinuz").await?,
                initrd: resolve("initrd.img").await?,
                cmdline: match cmdline_override {
                    Some(cmdline) => cmdline.to_owned(),
                    None => manifest
                        .kernel_cmdline
                        .unwrap_or_else(|| FALLBACK_KERNEL_CMDLINE.to_owned()),
                },
            }),
        };
        Ok(Template { boot, root_disk })
    }

    /// The kernel QEMU loads, for a kernel-booted template.
    pub fn kernel(&self) -> Option<&Path> {
        match &self.boot {
            Boot::Kernel(kernel) => Some(&kernel.kernel),
            Boot::Firmware => None,
        }
    }

    /// Whether the files this sandbox was cloned from are all still there.
    pub async fn missing_file(&self) -> Option<&Path> {
        let mut files = vec![self.root_disk.as_path()];
        if let Boot::Kernel(kernel) = &self.boot {
            files.extend([kernel.kernel.as_path(), kernel.initrd.as_path()]);
        }
        for path in files {
            if !matches!(tokio::fs::try_exists(path).await, Ok(true)) {
                return Some(path);
            }
        }
        None
    }
}

async fn read_manifest(path: &Path) -> Result<Manifest, BackendError> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
        Err(e) => return Err(BackendError::io(format!("reading {}", path.display()), e)),
    };
    serde_json::from_str(&text)
        .map_err(|e| BackendError::InvalidInput(format!("{}: {e}", path.display())))
}

/// What the backend keeps about a sandbox in `sandbox.json`: enough to start it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub name: String,
    pub job_id: String,
    pub created_ms: i64,
    pub template: Template,
    pub cores: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub network: NetworkMode,
    /// The instance id of the daemon that made the sandbox (`crate::instance`); None in a
    /// record from before instance ids.
    #[serde(default)]
    pub owner: Option<String>,
    /// The snapshot this sandbox is restored from; None for a cold boot (and after a restore
    /// that failed and fell back to one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSource>,
    /// How the job asked to start: with `Snapshot`, a restore that fails fails the start instead
    /// of falling back to a cold boot.
    #[serde(default)]
    pub start: StartMode,
}

/// Where a restored sandbox's snapshot is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSource {
    pub snapshot_id: String,
    pub dir: PathBuf,
}

/// The files of one sandbox folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(sandboxes_dir: &Path, name: &str) -> SandboxPaths {
        SandboxPaths {
            dir: sandboxes_dir.join(name),
        }
    }

    pub fn overlay(&self) -> PathBuf {
        self.dir.join("overlay.qcow2")
    }

    pub fn seed_image(&self) -> PathBuf {
        self.dir.join("seed.img")
    }

    pub fn seed_staging(&self) -> PathBuf {
        self.dir.join("seed.d")
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join("sandbox.json")
    }

    /// Written last by a clone: a folder without it is an interrupted clone, to be redone.
    pub fn complete_marker(&self) -> PathBuf {
        self.dir.join("complete")
    }

    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    pub fn qga_socket(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// QEMU's own stderr (start-up errors).
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// Every QEMU argument naming a file in the folder contains this, so a process whose command
    /// line contains it is this sandbox's QEMU (and not a process that reused its pid).
    pub fn ownership_marker(&self) -> String {
        format!("{}/", self.dir.display())
    }
}

/// The bytes the files under `dir` really occupy on the host (allocated blocks, so a sparse
/// qcow2 overlay counts what has been written, not its size). Symlinks count as themselves, not
/// what they point at: a sandbox's base image belongs to its template. Blocking: run it off the
/// executor.
pub fn allocated_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    // st_blocks is in 512-byte units whatever the filesystem's block size.
    let mut total = meta.blocks().saturating_mul(512);
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            match allocated_bytes(&entry.path()) {
                Ok(bytes) => total = total.saturating_add(bytes),
                // Removed while we looked (a socket, a staging folder): it takes nothing now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

/// Checks that `name` is one of ours and safe as a folder name, hostname and QEMU option value.
pub fn validate_name(name: &str) -> Result<(), BackendError> {
    let valid = name.starts_with(VM_NAME_PREFIX)
        && name.len() > VM_NAME_PREFIX.len()
        && name.len() <= MAX_NAME_LEN
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(BackendError::InvalidInput(format!(
            "VM name `{name}` must start with `{VM_NAME_PREFIX}`, hold only a-z, 0-9 and '-', and \
             be at most {MAX_NAME_LEN} characters"
        )))
    }
}

/// Checks a folder the backend puts on QEMU's command line. QEMU option values treat ',' as a
/// separator, and the unix sockets inside a sandbox folder must fit `sun_path`.
pub fn validate_dir(key: &str, dir: &Path) -> Result<(), BackendError> {
    let text = dir.to_str().ok_or_else(|| {
        BackendError::InvalidInput(format!("{key} {} is not valid UTF-8", dir.display()))
    })?;
    if !dir.is_absolute() {
        return Err(BackendError::InvalidInput(format!(
            "{key} {text} must be absolute"
        )));
    }
    if text.contains(',') || text.chars().any(char::is_control) {
        return Err(BackendError::InvalidInput(format!(
            "{key} {text} must not contain commas or control characters"
        )));
    }
    Ok(())
}

/// Length of the names the daemon gives its VMs (`model::sandbox_name_for`: prefix + 12).
const USUAL_NAME_LEN: usize = VM_NAME_PREFIX.len() + 12;

/// Checks that the sockets of a VM named `name` fit `sun_path`.
pub fn validate_socket_room(sandboxes_dir: &Path, name: &str) -> Result<(), BackendError> {
    validate_vm_socket_room(
        "sandboxes_dir",
        sandboxes_dir,
        &SandboxPaths::new(sandboxes_dir, name),
    )
}

/// Checks that the sockets of the VM whose folder is `vm` (somewhere under `dir`, the folder the
/// setting `key` names) fit `sun_path`.
pub fn validate_vm_socket_room(
    key: &str,
    dir: &Path,
    vm: &SandboxPaths,
) -> Result<(), BackendError> {
    // `qga.sock` is as long as `qmp.sock`.
    let socket = vm.qmp_socket();
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(BackendError::InvalidInput(format!(
            "{key} {} is too long: the socket {} would take {len} bytes, more than the \
             {MAX_SOCKET_PATH} a unix socket allows",
            dir.display(),
            socket.display()
        )));
    }
    Ok(())
}

/// Checks that the sockets of VMs with the daemon's usual names fit `sun_path`.
pub fn validate_sandboxes_dir_room(sandboxes_dir: &Path) -> Result<(), BackendError> {
    validate_socket_room(sandboxes_dir, &"x".repeat(USUAL_NAME_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_counts_written_blocks_not_sizes() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sandbox-0123456789ab");
        std::fs::create_dir_all(sandbox.join("seed.d")).unwrap();
        // A 1 GiB sparse file with 1 MiB written in the middle, like a fresh overlay.
        let mut overlay = std::fs::File::create(sandbox.join("overlay.qcow2")).unwrap();
        overlay.set_len(1 << 30).unwrap();
        overlay.seek(SeekFrom::Start(512 << 20)).unwrap();
        overlay.write_all(&vec![7u8; 1 << 20]).unwrap();
        overlay.sync_all().unwrap();
        std::fs::write(sandbox.join("seed.d/user-data"), vec![1u8; 64 << 10]).unwrap();
        // A link to a big base image counts as the link only.
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![1u8; 4 << 20]).unwrap();
        std::os::unix::fs::symlink(&base, sandbox.join("base")).unwrap();

        let bytes = allocated_bytes(&sandbox).unwrap();
        let written = (1 << 20) + (64 << 10);
        assert!(bytes >= written, "{bytes} < {written}");
        // Folders and block rounding add a little; nowhere near the 1 GiB size or the 4 MiB base.
        assert!(bytes < written + (1 << 20), "{bytes}");
        assert!(allocated_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn names() {
        validate_name("sandbox-0123456789ab").unwrap();
        for bad in [
            "sandbox-",
            "vm-1",
            "sandbox-A",
            "sandbox-a/..",
            "sandbox-a,b",
            "sandbox-a-",
            &format!("sandbox-{}", "a".repeat(60)),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dirs() {
        validate_dir("sandboxes_dir", Path::new("/var/lib/agentlab/sandboxes")).unwrap();
        assert!(validate_dir("x", Path::new("relative")).is_err());
        assert!(validate_dir("x", Path::new("/a,b")).is_err());
        validate_sandboxes_dir_room(Path::new("/var/lib/agentlab/sandboxes")).unwrap();
        assert!(validate_sandboxes_dir_room(&Path::new("/").join("d".repeat(80))).is_err());
        let long_name = format!("sandbox-{}", "a".repeat(55));
        assert!(validate_socket_room(&Path::new("/").join("d".repeat(50)), &long_name).is_err());
        // A VM whose folder is the checked folder itself (a template VM) needs no room for a
        // name: 98 bytes of folder leave room for `/qmp.sock`.
        let dir = Path::new("/").join("d".repeat(97));
        let vm = SandboxPaths { dir: dir.clone() };
        validate_vm_socket_room("snapshots_dir", &dir, &vm).unwrap();
        let dir = Path::new("/").join("d".repeat(98));
        let vm = SandboxPaths { dir: dir.clone() };
        let err = validate_vm_socket_room("snapshots_dir", &dir, &vm).unwrap_err();
        assert!(err.to_string().contains("snapshots_dir"), "{err}");
    }

    #[test]
    fn ownership_marker_does_not_match_a_sibling_with_a_longer_name() {
        let a = SandboxPaths::new(Path::new("/s"), "sandbox-a");
        let ab = SandboxPaths::new(Path::new("/s"), "sandbox-ab");
        assert!(!ab
            .qmp_socket()
            .to_str()
            .unwrap()
            .contains(&a.ownership_marker()));
        assert!(a
            .qmp_socket()
            .to_str()
            .unwrap()
            .contains(&a.ownership_marker()));
    }

    #[test]
    fn template_dirs() {
        let images = Path::new("/i");
        assert_eq!(Template::dir(images, "").unwrap(), images);
        assert_eq!(
            Template::dir(images, "ubuntu-24.04").unwrap(),
            images.join("ubuntu-24.04")
        );
        for bad in ["..", "../x", "a/b", ".hidden"] {
            assert!(Template::dir(images, bad).is_err(), "{bad}");
        }
    }

    fn cmdline(template: &Template) -> &str {
        match &template.boot {
            Boot::Kernel(kernel) => &kernel.cmdline,
            Boot::Firmware => panic!("a kernel-booted template was expected"),
        }
    }

    #[tokio::test]
    async fn a_firmware_template_needs_only_its_disk_and_says_so_in_its_manifest() {
        let images = tempfile::tempdir().unwrap();
        let dir = images.path().join("stock");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("root.qcow2"), b"x").unwrap();
        std::fs::write(
            dir.join("manifest.json"),
            r#"{"format": 1, "boot": "firmware"}"#,
        )
        .unwrap();
        let template = Template::resolve(images.path(), "stock", Some("quiet"))
            .await
            .unwrap();
        assert_eq!(template.boot, Boot::Firmware);
        assert_eq!(template.kernel(), None);
        assert!(template.missing_file().await.is_none());

        std::fs::write(dir.join("manifest.json"), r#"{"boot": "uefi"}"#).unwrap();
        let err = Template::resolve(images.path(), "stock", None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("boot `uefi`"), "{err}");
    }

    #[test]
    fn a_kernel_template_serializes_as_before_firmware_boot_existed_and_both_round_trip() {
        // Snapshot ids hash this form: it must not change for kernel-booted templates.
        let kernel = Template {
            boot: Boot::Kernel(KernelBoot {
                kernel: "/i/vmlinuz".into(),
                initrd: "/i/initrd.img".into(),
                cmdline: "console=ttyS0".into(),
            }),
            root_disk: "/i/root.qcow2".into(),
        };
        let text = serde_json::to_string(&kernel).unwrap();
        assert_eq!(
            text,
            r#"{"kernel":"/i/vmlinuz","initrd":"/i/initrd.img","root_disk":"/i/root.qcow2","kernel_cmdline":"console=ttyS0"}"#
        );
        assert_eq!(serde_json::from_str::<Template>(&text).unwrap(), kernel);

        let firmware = Template {
            boot: Boot::Firmware,
            root_disk: "/i/stock/root.qcow2".into(),
        };
        let text = serde_json::to_string(&firmware).unwrap();
        assert_eq!(
            text,
            r#"{"root_disk":"/i/stock/root.qcow2","boot":"firmware"}"#
        );
        assert_eq!(serde_json::from_str::<Template>(&text).unwrap(), firmware);

        for bad in [
            r#"{"root_disk":"/r"}"#,
            r#"{"root_disk":"/r","boot":"firmware","kernel":"/k","initrd":"/i"}"#,
            r#"{"root_disk":"/r","boot":"pxe"}"#,
        ] {
            assert!(serde_json::from_str::<Template>(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn resolves_template_files_through_links_and_reads_the_manifest() {
        let images = tempfile::tempdir().unwrap();
        let build = images.path().join("builds/1");
        std::fs::create_dir_all(&build).unwrap();
        for file in ["vmlinuz", "initrd.img", "root.qcow2"] {
            std::fs::write(build.join(file), b"x").unwrap();
            std::os::unix::fs::symlink(build.join(file), images.path().join(file)).unwrap();
        }
        let template = Template::resolve(images.path(), "", None).await.unwrap();
        assert_eq!(
            template.root_disk,
            build.canonicalize().unwrap().join("root.qcow2")
        );
        assert_eq!(cmdline(&template), FALLBACK_KERNEL_CMDLINE);

        std::fs::write(
            images.path().join("manifest.json"),
            r#"{"format": 1, "kernel_cmdline": "console=ttyS0 root=/dev/vda"}"#,
        )
        .unwrap();
        let template = Template::resolve(images.path(), "", None).await.unwrap();
        assert_eq!(cmdline(&template), "console=ttyS0 root=/dev/vda");
        let template = Template::resolve(images.path(), "", Some("quiet"))
            .await
            .unwrap();
        assert_eq!(cmdline(&template), "quiet");
        assert!(template.missing_file().await.is_none());

        let err = Template::resolve(images.path(), "nope", None)
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("template `nope`"), "{message}");
        assert!(message.contains("build-guest-image.sh"), "{message}");
    }
}

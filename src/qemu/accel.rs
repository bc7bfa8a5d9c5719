//! Chooses between KVM and TCG. With `accel: auto` the template's kernel is booted once under
//! KVM, without any disk, and expected to run to its "cannot mount root" panic in time; the answer
//! holds for the life of the process. The daemon starts that probe in the background at start-up
//! (`QemuBackend::start_accel_probe`), so a first job's start phase finds the answer, or waits for
//! the probe under way, instead of paying for it. `/dev/kvm` being present proves nothing:
//! on some nested hosts a KVM guest hangs before its kernel prints a line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::OnceCell;

use super::tool;
use crate::config::qemu::Accel;

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }

    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accelerator::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accelerator::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

#[derive(Debug)]
pub struct AccelChooser {
    configured: Accel,
    qemu_binary: PathBuf,
    probe_timeout: Duration,
    /// Scratch folder for the probe's console log.
    probe_dir: PathBuf,
    probed: OnceCell<Accelerator>,
}

impl AccelChooser {
    pub fn new(
        configured: Accel,
        qemu_binary: PathBuf,
        probe_timeout: Duration,
        probe_dir: PathBuf,
    ) -> Self {
        AccelChooser {
            configured,
            qemu_binary,
            probe_timeout,
            probe_dir,
            probed: OnceCell::new(),
        }
    }

    /// The accelerator, if known without a probe: configured, or probed already.
    pub fn known(&self) -> Option<Accelerator> {
        match self.configured {
            Accel::Kvm => Some(Accelerator::Kvm),
            Accel::Tcg => Some(Accelerator::Tcg),
            Accel::Auto => self.probed.get().copied(),
        }
    }

    /// The accelerator for the next VM. Concurrent callers share one probe; a probe cancelled
    /// half-way is simply run again by the next caller.
    pub async fn choose(&self, kernel: &Path) -> Accelerator {
        match self.configured {
            Accel::Kvm => Accelerator::Kvm,
            Accel::Tcg => Accelerator::Tcg,
            Accel::Auto => {
                *self
                    .probed
                    .get_or_init(|| async {
                        match probe_kvm(
                            &self.qemu_binary,
                            kernel,
                            &self.probe_dir,
                            self.probe_timeout,
                        )
                        .await
                        {
                            Ok(()) => {
                                tracing::info!("KVM probe boot succeeded; VMs run under KVM");
                                Accelerator::Kvm
                            }
                            Err(reason) => {
                                tracing::warn!(%reason, "KVM unusable; VMs run under TCG (slower)");
                                Accelerator::Tcg
                            }
                        }
                    })
                    .await
            }
        }
    }
}

/// Boots `kernel` under KVM with no disk and no initrd; Ok if it reached its panic and QEMU
/// exited (`-no-reboot`) within `timeout`, else why not.
pub async fn probe_kvm(
    qemu_binary: &Path,
    kernel: &Path,
    scratch: &Path,
    timeout: Duration,
) -> Result<(), String> {
    if let Err(e) = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .await
    {
        return Err(format!("cannot open /dev/kvm: {e}"));
    }
    tokio::fs::create_dir_all(scratch)
        .await
        .map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let console = scratch.join(format!("kvm-probe-{}.log", std::process::id()));
    let mut command = Command::new(qemu_binary);
    command
        .args(Accelerator::Kvm.qemu_args())
        .args(["-m", "128", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()));
    let outcome = tool::run(command, timeout).await;
    let log = tokio::fs::read(&console).await.unwrap_or_default();
    let _ = tokio::fs::remove_file(&console).await;
    outcome.map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&log);
    if log.contains("Kernel panic") {
        Ok(())
    } else {
        Err(format!(
            "the probe kernel exited without reaching its panic; console ended with: {}",
            tool::tail(log.as_bytes(), 200)
        ))
    }
}

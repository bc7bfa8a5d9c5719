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
    pub async fn choose(&self, probe: ProbeBoot<'_>) -> Accelerator {
        match self.configured {
            Accel::Kvm => Accelerator::Kvm,
            Accel::Tcg => Accelerator::Tcg,
            Accel::Auto => {
                *self
                    .probed
                    .get_or_init(|| async {
                        match probe_kvm(
                            &self.qemu_binary,
                            probe,
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

/// What the KVM probe boots: the template's kernel, or, for a template booted by firmware, the
/// firmware alone.
#[derive(Debug, Clone, Copy)]
pub enum ProbeBoot<'a> {
    Kernel(&'a Path),
    Firmware,
}

impl<'a> ProbeBoot<'a> {
    pub fn of(template: &'a super::layout::Template) -> ProbeBoot<'a> {
        template
            .kernel()
            .map_or(ProbeBoot::Firmware, ProbeBoot::Kernel)
    }
}

/// What SeaBIOS prints on its debug port once it has looked at every boot device and found none:
/// the firmware ran to its end under KVM.
const FIRMWARE_PROBE_END: &str = "No bootable device";

/// Between two looks at the firmware probe's log.
const FIRMWARE_PROBE_POLL: Duration = Duration::from_millis(100);

/// Boots `probe` under KVM with no disk; Ok if it ran to its end (a kernel to its panic, QEMU
/// exiting with `-no-reboot`; the firmware to its "no bootable device") within `timeout`, else
/// why not.
pub async fn probe_kvm(
    qemu_binary: &Path,
    probe: ProbeBoot<'_>,
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
        .args(["-display", "none", "-no-reboot"]);
    let kernel = match probe {
        ProbeBoot::Kernel(kernel) => kernel,
        ProbeBoot::Firmware => {
            command
                .arg("-chardev")
                .arg(format!("file,id=bios,path={}", console.display()))
                .args(["-device", "isa-debugcon,iobase=0x402,chardev=bios"]);
            let outcome = run_firmware_probe(command, &console, timeout).await;
            let _ = tokio::fs::remove_file(&console).await;
            return outcome;
        }
    };
    command
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

/// Runs the firmware probe until its log shows the firmware's end or `timeout` passes. The
/// firmware waits and tries again after its end instead of exiting, so QEMU is killed either way.
async fn run_firmware_probe(
    mut command: Command,
    log: &Path,
    timeout: Duration,
) -> Result<(), String> {
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run the KVM probe: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = tokio::fs::read(log).await.unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(FIRMWARE_PROBE_END) {
            let _ = child.kill().await;
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the firmware probe exited ({status}) before the firmware's end; its log ended \
                 with: {}",
                tool::tail(&text, 200)
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill().await;
            return Err(format!(
                "the firmware did not reach its end under KVM in {}; its log ended with: {}",
                humantime::format_duration(timeout),
                tool::tail(&text, 200)
            ));
        }
        tokio::time::sleep(FIRMWARE_PROBE_POLL).await;
    }
}

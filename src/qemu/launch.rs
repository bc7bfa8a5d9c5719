//! The QEMU command line of a sandbox VM, and its launch. QEMU daemonizes itself (`-daemonize`):
//! the launcher process exits once the VM is set up, sockets and pidfile included, and the VM runs
//! on in its own session, so a daemon killed with SIGKILL leaves its VMs running for the next one
//! to find.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::accel::Accelerator;
use super::layout::{Boot, SandboxPaths, SandboxRecord};
use super::process;
use crate::backend::{BackendError, NetworkMode};

/// Where the guest reaches the daemon's guest endpoint (docs/guest-contract.md).
pub const GUEST_ENDPOINT_IN_GUEST: &str = "10.0.2.100:80";

/// Where a VM's RAM lives.
#[derive(Debug, Clone, Copy)]
pub enum GuestMemory<'a> {
    /// Anonymous memory, as QEMU allocates it by default: a cold boot.
    Anonymous,
    /// A template VM whose RAM is the snapshot's memory file, mapped shared so that what the
    /// guest writes lands in the file.
    SnapshotTemplate { memory_file: &'a Path },
    /// A clone restored from a snapshot: the memory file mapped privately (copy-on-write, the
    /// file never changes), the VM paused until its device state is loaded (`-incoming defer
    /// -S`; see `migration::load_state`).
    Restore { memory_file: &'a Path },
}

/// Everything that shapes one VM's command line.
#[derive(Debug)]
pub struct LaunchPlan<'a> {
    pub qemu_binary: &'a Path,
    pub socat_binary: &'a Path,
    pub paths: &'a SandboxPaths,
    pub record: &'a SandboxRecord,
    pub accel: Accelerator,
    pub guest_endpoint: SocketAddr,
    pub memory: GuestMemory<'a>,
}

impl LaunchPlan<'_> {
    pub fn args(&self) -> Vec<OsString> {
        let paths = self.paths;
        let record = self.record;
        let template = &record.template;
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&["-name", &record.name]);
        push(&self.accel.qemu_args());
        push(&["-smp", &record.cores.to_string()]);
        push(&["-m", &record.memory_mb.to_string()]);
        // No default devices, no host config files: the command line is the whole machine.
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        // A reboot or panic ends the VM instead of looping; the lifecycle sees it as stopped.
        push(&["-no-reboot"]);
        let overlay = display(&paths.overlay());
        match &template.boot {
            Boot::Kernel(kernel) => {
                push(&["-kernel", &display(&kernel.kernel)]);
                push(&["-initrd", &display(&kernel.initrd)]);
                push(&["-append", &kernel.cmdline]);
                push(&[
                    "-drive",
                    &format!("file={overlay},if=virtio,format=qcow2,discard=unmap"),
                ]);
            }
            // The firmware boots the root disk's own boot loader, and only that disk: the seed's
            // vfat image carries a boot sector too, which would print "not a bootable disk".
            Boot::Firmware => push(&[
                "-drive",
                &format!("file={overlay},if=none,id=root,format=qcow2,discard=unmap"),
                "-device",
                "virtio-blk-pci,drive=root,bootindex=0",
            ]),
        }
        push(&[
            "-drive",
            &format!(
                "file={},if=virtio,format=raw,readonly=on",
                display(&paths.seed_image())
            ),
        ]);
        // No option ROM: the disk is what boots, and the PXE ROM file may not be installed.
        push(&[
            "-netdev",
            &self.netdev(),
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qga0,path={},server=on,wait=off",
                display(&paths.qga_socket())
            ),
            "-device",
            "virtio-serial-pci",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", display(&paths.qmp_socket())),
        ]);
        push(&[
            "-serial",
            &format!("file:{}", display(&paths.console_log())),
        ]);
        // Guest entropy at boot, or TLS and key generation stall in the guest.
        push(&["-device", "virtio-rng-pci"]);
        push(&["-pidfile", &display(&paths.pidfile()), "-daemonize"]);
        let (memory_file, share) = match self.memory {
            GuestMemory::Anonymous => return args,
            GuestMemory::SnapshotTemplate { memory_file } => (memory_file, "on"),
            GuestMemory::Restore { memory_file } => (memory_file, "off"),
        };
        // Same id, size and machine property on both sides: migration matches RAM blocks by them.
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share={share}",
                record.memory_mb,
                display(memory_file)
            ),
            "-machine",
            "memory-backend=ram0",
        ]);
        if matches!(self.memory, GuestMemory::Restore { .. }) {
            push(&["-S", "-incoming", "defer"]);
        }
        args
    }

    /// User-mode networking. The guest endpoint is a `guestfwd` whose `cmd:` form starts one
    /// socat per guest connection; the `tcp:` form connects once at start-up and serves a single
    /// connection, which is not enough for a runner making many HTTP requests. socat's stderr is
    /// the guest connection too, so `-lf /dev/null` keeps its error messages (listener down, say)
    /// from reaching the guest as if they were the HTTP reply.
    fn netdev(&self) -> String {
        let target = match self.guest_endpoint {
            SocketAddr::V4(addr) => format!("TCP4:{}:{}", addr.ip(), addr.port()),
            SocketAddr::V6(addr) => format!("TCP6:[{}]:{}", addr.ip(), addr.port()),
        };
        let restrict = match self.record.network {
            NetworkMode::Restricted => ",restrict=on",
            NetworkMode::Egress => "",
        };
        format!(
            "user,id=net0{restrict},guestfwd=tcp:{GUEST_ENDPOINT_IN_GUEST}-cmd:{} -lf /dev/null \
             STDIO {target}",
            display(self.socat_binary)
        )
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Starts the VM and returns once QEMU has daemonized. QEMU's own stderr goes to `qemu.log` in
/// the sandbox folder (a file, not a pipe, so the daemonized QEMU never blocks on it).
pub async fn launch(plan: &LaunchPlan<'_>, timeout: Duration) -> Result<(), BackendError> {
    let paths = plan.paths;
    let log_path = paths.qemu_log();
    let log = tokio::fs::File::create(&log_path)
        .await
        .map_err(|e| BackendError::io(format!("creating {}", log_path.display()), e))?
        .into_std()
        .await;
    let mut command = Command::new(plan.qemu_binary);
    command
        .args(plan.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Only the launcher dies with a cancelled start; a VM that already forked is found and
        // stopped by destroy_vm through its command line.
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| {
        BackendError::operation(
            "start",
            format!("cannot run {}: {e}", plan.qemu_binary.display()),
        )
    })?;
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(BackendError::io("waiting for the qemu launcher", e)),
        Err(_) => {
            return Err(BackendError::Timeout {
                operation: "start",
                seconds: timeout.as_secs_f64(),
            })
        }
    };
    if !status.success() {
        let tail = process::log_tail(log_path, 2000).await;
        return Err(BackendError::operation(
            "start",
            format!("qemu exited with {status}: {tail}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::layout::{KernelBoot, Template};

    fn record(network: NetworkMode) -> SandboxRecord {
        SandboxRecord {
            name: "sandbox-abc".into(),
            job_id: "job".into(),
            created_ms: 0,
            template: Template {
                boot: Boot::Kernel(KernelBoot {
                    kernel: "/i/vmlinuz".into(),
                    initrd: "/i/initrd.img".into(),
                    cmdline: "console=ttyS0 root=/dev/vda rw".into(),
                }),
                root_disk: "/i/root.qcow2".into(),
            },
            cores: 2,
            memory_mb: 512,
            disk_gb: 4,
            network,
            owner: None,
            restore: None,
            start: crate::model::StartMode::Cold,
        }
    }

    fn args(network: NetworkMode, endpoint: &str) -> Vec<String> {
        args_with(network, endpoint, GuestMemory::Anonymous)
    }

    fn args_with(network: NetworkMode, endpoint: &str, memory: GuestMemory) -> Vec<String> {
        args_of(record(network), endpoint, memory)
    }

    fn args_of(record: SandboxRecord, endpoint: &str, memory: GuestMemory) -> Vec<String> {
        let paths = SandboxPaths::new(Path::new("/s"), "sandbox-abc");
        let plan = LaunchPlan {
            qemu_binary: Path::new("qemu-system-x86_64"),
            socat_binary: Path::new("socat"),
            paths: &paths,
            record: &record,
            accel: Accelerator::Tcg,
            guest_endpoint: endpoint.parse().unwrap(),
            memory,
        };
        plan.args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn restricted_network_forwards_only_the_guest_endpoint() {
        let args = args(NetworkMode::Restricted, "127.0.0.1:8848");
        assert_eq!(
            after(&args, "-netdev"),
            ["user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:socat -lf /dev/null STDIO TCP4:127.0.0.1:8848"]
        );
    }

    #[test]
    fn egress_drops_the_restriction_and_ipv6_endpoints_are_bracketed() {
        let args = args(NetworkMode::Egress, "[::1]:8848");
        assert_eq!(
            after(&args, "-netdev"),
            ["user,id=net0,guestfwd=tcp:10.0.2.100:80-cmd:socat -lf /dev/null STDIO TCP6:[::1]:8848"]
        );
    }

    #[test]
    fn machine_disks_sockets_and_ownership() {
        let args = args(NetworkMode::Restricted, "127.0.0.1:8848");
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(after(&args, "-m"), ["512"]);
        assert_eq!(after(&args, "-kernel"), ["/i/vmlinuz"]);
        assert_eq!(after(&args, "-append"), ["console=ttyS0 root=/dev/vda rw"]);
        assert_eq!(
            after(&args, "-drive"),
            [
                "file=/s/sandbox-abc/overlay.qcow2,if=virtio,format=qcow2,discard=unmap",
                "file=/s/sandbox-abc/seed.img,if=virtio,format=raw,readonly=on",
            ]
        );
        assert_eq!(
            after(&args, "-qmp"),
            ["unix:/s/sandbox-abc/qmp.sock,server=on,wait=off"]
        );
        assert!(args.contains(&"-daemonize".to_owned()));
        assert!(
            args.contains(&"virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".to_owned())
        );
        // process::find relies on this to recognise the VM after a daemon restart.
        let marker = SandboxPaths::new(Path::new("/s"), "sandbox-abc").ownership_marker();
        assert!(after(&args, "-pidfile")[0].contains(&marker));
        // A cold boot has QEMU's own anonymous RAM and starts at once.
        assert!(after(&args, "-object").is_empty());
        assert!(!args.contains(&"-incoming".to_owned()));
    }

    #[test]
    fn a_firmware_template_boots_its_root_disk_without_a_kernel() {
        let mut record = record(NetworkMode::Restricted);
        record.template.boot = Boot::Firmware;
        let args = args_of(record, "127.0.0.1:8848", GuestMemory::Anonymous);
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(after(&args, flag).is_empty(), "{flag} in {args:?}");
        }
        assert_eq!(
            after(&args, "-drive"),
            [
                "file=/s/sandbox-abc/overlay.qcow2,if=none,id=root,format=qcow2,discard=unmap",
                "file=/s/sandbox-abc/seed.img,if=virtio,format=raw,readonly=on",
            ]
        );
        assert!(after(&args, "-device").contains(&"virtio-blk-pci,drive=root,bootindex=0"));
    }

    #[test]
    fn template_maps_the_memory_file_shared_and_a_restore_privately_and_paused() {
        let memory_file = Path::new("/snap/abc/memory");
        let template = args_with(
            NetworkMode::Restricted,
            "127.0.0.1:8848",
            GuestMemory::SnapshotTemplate { memory_file },
        );
        assert_eq!(
            after(&template, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/snap/abc/memory,share=on"]
        );
        assert_eq!(after(&template, "-machine"), ["memory-backend=ram0"]);
        assert!(!template.contains(&"-incoming".to_owned()));

        let restore = args_with(
            NetworkMode::Restricted,
            "127.0.0.1:8848",
            GuestMemory::Restore { memory_file },
        );
        assert_eq!(
            after(&restore, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/snap/abc/memory,share=off"]
        );
        assert_eq!(after(&restore, "-incoming"), ["defer"]);
        assert!(restore.contains(&"-S".to_owned()));
        // Everything else is the same machine, or the device state would not load.
        let strip = |args: &[String]| -> Vec<String> {
            args.iter()
                .filter(|a| {
                    !a.starts_with("memory-backend-file")
                        && !["-S", "-incoming", "defer"].contains(&a.as_str())
                })
                .cloned()
                .collect()
        };
        assert_eq!(strip(&template), strip(&restore));
    }
}

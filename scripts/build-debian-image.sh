#!/usr/bin/env bash
# Build the Debian 12 agent template for the local QEMU backend, from Debian packages only:
#
#   $AGENTLAB_DATA_DIR/images/debian-12/vmlinuz        the image's own kernel (linux-image-amd64),
#                                                      uncompressed PVH ELF unless --bzimage
#   $AGENTLAB_DATA_DIR/images/debian-12/initrd.img     static busybox + guest-image/init + the
#                                                      modules of guest-image/modules
#   $AGENTLAB_DATA_DIR/images/debian-12/root.qcow2     ext4 on the whole device: Debian bookworm
#                                                      (mmdebstrap) with systemd, cloud-init,
#                                                      qemu-ga, git, curl, python3, node, gcc, the
#                                                      runner in /usr/local/bin
#   $AGENTLAB_DATA_DIR/images/debian-12/manifest.json  what was built, from what
#
# Usually run as `scripts/build-guest-image.sh --distro debian`. The packages come from the
# Debian mirror the host's apt is configured with (bookworm, bookworm-updates, bookworm-security),
# listed in guest-image/debian/packages; guest-image/debian/rootfs/ is copied over the result, and,
# unless --untrimmed, guest-image/debian/trim/ and the unit masks below too.
#
# Publishing is the busybox script's: a build is assembled under images/NAME/.build.*, moved to
# images/NAME/builds/<id>/, and published by renaming the "current" link; the four stable names
# are links into current/. A rebuild happens only when an input changed: the mirror's state as the
# host's apt lists see it (their Release files), the package list, guest-image/debian/, the
# initramfs files, the runner, this script and the options. Otherwise it exits within seconds.
# Downloaded .debs are kept in images/.debian-cache so that a rebuild does not fetch them again.
#
# The kernel and initramfs: the image's own linux-image-amd64 kernel, booted the way the busybox
# template boots (uncompressed PVH ELF, a tiny busybox initramfs that loads virtio and ext4 and
# switch_roots to systemd), rather than Debian's initramfs-tools image: that one runs udev and
# its scripts in the initramfs and costs several seconds more under TCG for nothing a sandbox
# needs (no LVM, no crypto, no resume). initramfs-tools is still installed (the kernel package
# depends on it), but update-initramfs is diverted to a no-op during the build. --untrimmed keeps
# Debian's own initramfs and the compressed kernel: it is the reference the trimming is measured
# against.
#
# Root is needed (mmdebstrap in root mode chroots; the files must belong to root in the image).
# Nothing is mounted on the host: the ext4 image is made with mkfs.ext4 -d.
# shellcheck disable=SC2016 # the single-quoted $1 and $(...) are for mmdebstrap, apt and dpkg
set -euo pipefail

readonly SUITE=bookworm
readonly ROOT_LABEL=agentlab-root
# As the busybox template's, plus net.ifnames=0 (the NIC is eth0: no renaming by udev) and no
# console blanking. systemd's status lines stay off the serial console (quiet).
readonly KERNEL_CMDLINE_TRIM="console=ttyS0 root=/dev/vda rw quiet panic=-1 acpi=noirq cryptomgr.notests net.ifnames=0"
# Debian's own: what a stock cloud image boots with, on a serial console.
readonly KERNEL_CMDLINE_STOCK="console=ttyS0 root=/dev/vda rw panic=-1"
readonly KEEP_BUILDS=2

# Units a sandbox never needs. Masked (linked to /dev/null) in the trimmed image.
readonly MASK_UNITS=(
	# periodic jobs: a sandbox lives for hours at most and is thrown away
	apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service
	dpkg-db-backup.timer dpkg-db-backup.service fstrim.timer fstrim.service
	e2scrub_all.timer e2scrub_all.service e2scrub_reap.service man-db.timer man-db.service
	systemd-tmpfiles-clean.timer
	# consoles: nobody logs in (the daemon talks to qemu-ga); no keyboard, no VT
	getty@tty1.service serial-getty@ttyS0.service getty-static.service console-getty.service
	# hardware and boot features a throwaway VM does not have or use
	systemd-pstore.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
	sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount
	systemd-firstboot.service systemd-machine-id-commit.service systemd-hwdb-update.service
	systemd-update-utmp.service systemd-update-utmp-runlevel.service
	systemd-journal-flush.service systemd-random-seed.service systemd-fsck-root.service
	systemd-ask-password-console.path systemd-ask-password-wall.path
	cryptsetup.target remote-fs.target remote-cryptsetup.target veritysetup.target
	# modules loaded on demand anyway, and the file systems they are for (configfs, fusectl)
	modprobe@drm.service modprobe@dm_mod.service modprobe@loop.service modprobe@fuse.service
	modprobe@configfs.service sys-kernel-config.mount sys-fs-fuse-connections.mount
	# logins and seats: nobody logs in
	systemd-logind.service systemd-user-sessions.service
	# cloud-init: hotplug handling (nothing is hot-plugged); its local stage (NoCloud is found by
	# the init stage as well, and one python start less is several seconds under TCG)
	cloud-init-hotplugd.socket cloud-init-hotplugd.service cloud-init-local.service
	# time is set by the host's RTC and, after a restore, by the runner's identity step
	systemd-timesyncd.service
)

# Kernel module folders (under /lib/modules/VER/kernel/) for hardware a QEMU sandbox does not
# have: removed from the trimmed image (about 200 MB), then depmod. Everything virtio, the file
# systems, netfilter, overlay, loop, fuse and the like stay.
readonly PRUNE_MODULES=(
	drivers/gpu drivers/media drivers/infiniband drivers/staging drivers/comedi drivers/isdn
	drivers/iio drivers/bluetooth drivers/net/wireless drivers/net/ethernet drivers/net/can
	drivers/net/usb drivers/usb drivers/hid drivers/input drivers/video drivers/platform
	drivers/scsi/lpfc drivers/scsi/qla2xxx drivers/scsi/mpt3sas drivers/scsi/megaraid
	drivers/scsi/bfa drivers/scsi/be2iscsi drivers/scsi/qedf drivers/scsi/qedi drivers/mmc
	drivers/nfc drivers/hwmon drivers/leds drivers/thunderbolt drivers/misc drivers/mfd
	sound net/wireless net/mac80211 net/bluetooth arch/x86/kvm
)

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
GUEST_DIR=$REPO_ROOT/guest-image
DEB_DIR=$GUEST_DIR/debian

log() { printf 'build-debian-image: %s\n' "$*" >&2; }
die() {
	printf 'build-debian-image: error: %s\n' "$*" >&2
	exit 1
}

usage() {
	cat <<EOF
Usage: $(basename "$0") [options]
       build-guest-image.sh --distro debian [options]

Build the Debian 12 template into \$AGENTLAB_DATA_DIR/images/NAME (default
/var/lib/agentlab/images/debian-12).

Options:
  --runner PATH     guest runner binary (default: \$AGENTLAB_RUNNER_BIN, else
                    target/release/agentlab-runner, else target/debug/agentlab-runner)
  --data-dir DIR    instead of \$AGENTLAB_DATA_DIR
  --name NAME       template folder under images/ (default debian-12; debian-12-untrimmed
                    with --untrimmed)
  --mirror URL      Debian mirror (default: the host apt's source for $SUITE)
  --security URL    Debian security mirror (default: the host apt's source for $SUITE-security)
  --disk-size SIZE  virtual size of root.qcow2 (default 6G; sparse)
  --bzimage         ship the compressed bzImage instead of the uncompressed PVH ELF
  --untrimmed       Debian's stock boot (initramfs-tools, all units and cloud-init modules,
                    compressed kernel): the reference for boot-time measurements
  --force           rebuild even if nothing changed
  -h, --help        this text
EOF
}

DATA_DIR=${AGENTLAB_DATA_DIR:-/var/lib/agentlab}
RUNNER=${AGENTLAB_RUNNER_BIN:-}
NAME=
MIRROR=
SECURITY=
DISK_SIZE=6G
BZIMAGE=0
TRIM=1
FORCE=0
while [ $# -gt 0 ]; do
	case $1 in
	--runner) RUNNER=${2:?--runner needs a path}; shift 2 ;;
	--runner=*) RUNNER=${1#*=}; shift ;;
	--data-dir) DATA_DIR=${2:?--data-dir needs a directory}; shift 2 ;;
	--data-dir=*) DATA_DIR=${1#*=}; shift ;;
	--name) NAME=${2:?--name needs a name}; shift 2 ;;
	--name=*) NAME=${1#*=}; shift ;;
	--mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
	--mirror=*) MIRROR=${1#*=}; shift ;;
	--security) SECURITY=${2:?--security needs a URL}; shift 2 ;;
	--security=*) SECURITY=${1#*=}; shift ;;
	--disk-size) DISK_SIZE=${2:?--disk-size needs a size}; shift 2 ;;
	--disk-size=*) DISK_SIZE=${1#*=}; shift ;;
	--bzimage) BZIMAGE=1; shift ;;
	--untrimmed) TRIM=0; shift ;;
	--force) FORCE=1; shift ;;
	--distro=debian) shift ;;
	--distro) [ "${2:-}" = debian ] || die "--distro ${2:-} is not this script's"; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
if [ -z "$NAME" ]; then
	if [ "$TRIM" = 1 ]; then NAME=debian-12; else NAME=debian-12-untrimmed; fi
fi
case $NAME in
'' | .* | *[!A-Za-z0-9._-]*) die "--name must be a plain folder name" ;;
esac
IMAGES=$DATA_DIR/images
TDIR=$IMAGES/$NAME

# ---- host requirements ------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || die "run as root: mmdebstrap's root mode chroots into the new system"
command -v dpkg-query >/dev/null || die "this script needs a Debian (or derived) host: no dpkg-query"
export PATH="/usr/sbin:/sbin:$PATH"
missing=()
for c in mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs qemu-img:qemu-utils cpio:cpio zstd:zstd \
	xz:xz-utils flock:util-linux sha256sum:coreutils; do
	command -v "${c%%:*}" >/dev/null || missing+=("${c#*:}")
done
[ ${#missing[@]} -eq 0 ] || die "missing Debian packages: ${missing[*]}
  install them with: apt-get install ${missing[*]} (or run scripts/install-deps.sh)"

for f in "$GUEST_DIR/init" "$GUEST_DIR/modules" "$DEB_DIR/packages" "$DEB_DIR/rootfs" "$DEB_DIR/trim"; do
	[ -e "$f" ] || die "$f is missing"
done

# The runner: --runner, $AGENTLAB_RUNNER_BIN, then the cargo build outputs.
if [ -z "$RUNNER" ]; then
	for c in "$REPO_ROOT/target/release/agentlab-runner" "$REPO_ROOT/target/debug/agentlab-runner"; do
		if [ -f "$c" ]; then
			RUNNER=$c
			break
		fi
	done
	[ -n "$RUNNER" ] || die "no guest runner binary: build it with
  cargo build --bin agentlab-runner   (or: cargo build --release --bin agentlab-runner)
  or name one with --runner PATH or AGENTLAB_RUNNER_BIN"
fi
{ [ -f "$RUNNER" ] && [ -r "$RUNNER" ]; } || die "runner binary $RUNNER does not exist or is unreadable"
RUNNER=$(readlink -f "$RUNNER")

# The host apt's sources for the suites: "URI SUITE" lines of Debian's own repositories.
host_source() { # SUITE
	apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(ORIGIN)' 'Created-By: Packages' 2>/dev/null |
		awk -v s="$1" '$2 == s && $3 == "Debian" { print $1; exit }'
}
if [ -z "$MIRROR" ]; then
	MIRROR=$(host_source "$SUITE")
	[ -n "$MIRROR" ] || die "the host's apt has no Debian $SUITE source (is apt-get update done?); use --mirror"
fi
if [ -z "$SECURITY" ]; then
	SECURITY=$(host_source "$SUITE-security")
fi
SOURCES=("deb ${MIRROR%/} $SUITE main" "deb ${MIRROR%/} $SUITE-updates main")
[ -z "$SECURITY" ] || SOURCES+=("deb ${SECURITY%/} $SUITE-security main")

mapfile -t PACKAGES < <(sed 's/#.*//' "$DEB_DIR/packages" | tr -s ' \t' '\n' | sed '/^$/d')
[ ${#PACKAGES[@]} -gt 0 ] || die "$DEB_DIR/packages lists no packages"
INCLUDE=$(IFS=,; echo "${PACKAGES[*]}")

if [ "$TRIM" = 1 ]; then KERNEL_CMDLINE=$KERNEL_CMDLINE_TRIM; else KERNEL_CMDLINE=$KERNEL_CMDLINE_STOCK; fi
[ "$TRIM" = 1 ] || BZIMAGE=1

# ---- inputs -----------------------------------------------------------------------------------

# The mirror's state: the Release files the host's apt has for the suites (they change when the
# archive does, after an apt-get update). A host without them still builds, once: the stamp then
# holds the date, so the build is redone the next day.
release_files() {
	local s
	for s in "$SUITE" "$SUITE-updates" "$SUITE-security"; do
		apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(ORIGIN) $(FILENAME)' 'Created-By: Packages' \
			2>/dev/null | awk -v s="$s" '$2 == s && $3 == "Debian" { print $4 }' |
			sed -n 's#_main_binary-[^/]*_Packages.*##p; s#_main_binary-[^/]*_Packages$##p' | head -n 1
	done
}
stamp_inputs() {
	local base f
	printf 'suite %s name %s disk %s label %s cmdline %s bzimage %s trim %s\n' "$SUITE" "$NAME" \
		"$DISK_SIZE" "$ROOT_LABEL" "$KERNEL_CMDLINE" "$BZIMAGE" "$TRIM"
	printf 'source %s\n' "${SOURCES[@]}"
	printf 'mask %s\n' "${MASK_UNITS[@]}"
	printf 'prune %s\n' "${PRUNE_MODULES[@]}"
	while IFS= read -r base; do
		[ -n "$base" ] || continue
		for f in "${base}_InRelease" "${base}_Release"; do
			[ -f "$f" ] && sha256sum "$f"
		done
	done < <(release_files)
	if [ -z "$(release_files)" ]; then date -u +%F; fi
	(cd "$DEB_DIR" && find . -type f -printf '%m %P\n' -o -type l -printf 'l %P\n' | LC_ALL=C sort)
	{
		printf '%s\n' "$SCRIPT" "$RUNNER" "$GUEST_DIR/init" "$GUEST_DIR/modules"
		find "$DEB_DIR" -type f | LC_ALL=C sort
	} | xargs -d '\n' sha256sum
}
STAMP_TEXT=$(stamp_inputs)
STAMP=$(printf '%s\n' "$STAMP_TEXT" | sha256sum | cut -d' ' -f1)

mkdir -p "$TDIR"
exec 9>"$TDIR/.lock"
flock 9 # one build at a time per template
find "$TDIR" -mindepth 1 -maxdepth 1 -name '.build.*' -exec rm -rf {} +

current_ok() {
	local f
	[ -f "$TDIR/current/stamp" ] && [ "$(cat "$TDIR/current/stamp")" = "$STAMP" ] || return 1
	for f in vmlinuz initrd.img root.qcow2 manifest.json; do
		[ -f "$TDIR/current/$f" ] || return 1
	done
}

publish_links() {
	local f
	for f in vmlinuz initrd.img root.qcow2 manifest.json; do
		if [ "$(readlink "$TDIR/$f" 2>/dev/null)" != "current/$f" ]; then
			ln -sfn "current/$f" "$TDIR/.$f.link"
			mv -Tf "$TDIR/.$f.link" "$TDIR/$f"
		fi
	done
}

if [ "$FORCE" = 0 ] && current_ok; then
	publish_links
	log "up to date: $TDIR ($(readlink "$TDIR/current"))"
	exit 0
fi

# ---- build ------------------------------------------------------------------------------------

START=$(date +%s)
WORK=$(mktemp -d "$TDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OUT=$WORK/out
ROOT=$WORK/root
INITRD=$WORK/initrd
CACHE=$IMAGES/.debian-cache
mkdir -p "$OUT" "$INITRD" "$CACHE"
log "building $NAME in $WORK ($([ "$TRIM" = 1 ] && echo trimmed || echo untrimmed), runner $RUNNER)"
log "sources: ${SOURCES[*]}"

# Documentation, man pages and translations are not installed (dpkg path-exclude): smaller image,
# and no man-db trigger. Copyright files stay.
DPKG_EXCLUDES=(
	'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*'
	'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
	'path-exclude=/usr/share/locale/*' 'path-include=/usr/share/locale/locale.alias'
	'path-exclude=/usr/share/lintian/*' 'path-exclude=/usr/share/linda/*'
)
MM_ARGS=(--variant=apt --mode=root --format=directory "--include=$INCLUDE"
	--aptopt='Acquire::Languages "none"' --aptopt='APT::Install-Recommends "false"')
for o in "${DPKG_EXCLUDES[@]}"; do MM_ARGS+=("--dpkgopt=$o"); done
# The download cache (mmdebstrap's recipe): copy the kept .debs in, fetch only what is new, copy
# the archives back out, then empty them in the image.
MM_ARGS+=(--skip=download/empty --skip=essential/unlink
	--setup-hook='mkdir -p "$1"/var/cache/apt/archives/' --setup-hook="sync-in $CACHE /var/cache/apt/archives/"
	--customize-hook="sync-out /var/cache/apt/archives $CACHE"
	--customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb')
if [ "$TRIM" = 1 ]; then
	# The template's initramfs is ours: Debian's would be built (slowly) and never used.
	MM_ARGS+=(--essential-hook='chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.agentlab --add /usr/sbin/update-initramfs && printf "#!/bin/sh\n# diverted while the AgentLab template is built\nexit 0\n" >"$1/usr/sbin/update-initramfs" && chmod 0755 "$1/usr/sbin/update-initramfs"')
	MM_ARGS+=(--customize-hook='rm -f "$1/usr/sbin/update-initramfs" && chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs')
fi

log "mmdebstrap: ${#PACKAGES[@]} packages and their dependencies"
MM_START=$(date +%s)
mmdebstrap "${MM_ARGS[@]}" "$SUITE" "$ROOT" "${SOURCES[@]}" 2>&1 | sed 's/^/  mmdebstrap: /' >&2
MM_SECONDS=$(($(date +%s) - MM_START))
log "mmdebstrap: done in $MM_SECONDS s"

KVER=$(find "$ROOT/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | LC_ALL=C sort | tail -n 1)
{ [ -n "$KVER" ] && [ -f "$ROOT/boot/vmlinuz-$KVER" ]; } || die "no kernel in the image (linux-image-amd64)"
MODDIR=$ROOT/lib/modules/$KVER

# ---- the root file system --------------------------------------------------------------------

log "root file system: configuring"
cp -R --no-preserve=ownership "$DEB_DIR/rootfs/." "$ROOT/"
if [ "$TRIM" = 1 ]; then
	cp -R --no-preserve=ownership "$DEB_DIR/trim/." "$ROOT/"
	for u in "${MASK_UNITS[@]}"; do
		ln -sfn /dev/null "$ROOT/etc/systemd/system/$u"
	done
	for d in "${PRUNE_MODULES[@]}"; do
		rm -rf "${MODDIR:?}/kernel/$d"
	done
	chroot "$ROOT" depmod -a "$KVER"
	# The apt lists are a snapshot of the build's day: `apt-get update` fetches current ones.
	find "$ROOT/var/lib/apt/lists" -maxdepth 1 -type f ! -name lock -delete
fi
# The build host's resolv.conf must not leak into the image: the DHCP lease's name server, as
# systemd-resolved writes it (no stub listener; see rootfs/etc/systemd/resolved.conf.d).
rm -f "$ROOT/etc/resolv.conf"
ln -s ../run/systemd/resolve/resolv.conf "$ROOT/etc/resolv.conf"
# Networking: systemd-networkd (DHCP on eth0/en*), systemd-resolved for /etc/resolv.conf.
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants" "$ROOT/etc/systemd/system/sockets.target.wants" \
	"$ROOT/etc/systemd/system/network-online.target.wants"
ln -sfn /lib/systemd/system/systemd-networkd.service "$ROOT/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sfn /lib/systemd/system/systemd-networkd.socket "$ROOT/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
ln -sfn /lib/systemd/system/systemd-networkd-wait-online.service \
	"$ROOT/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
ln -sfn /lib/systemd/system/systemd-resolved.service "$ROOT/etc/systemd/system/multi-user.target.wants/systemd-resolved.service"
# No display: the default target is multi-user, not graphical.
ln -sfn /lib/systemd/system/multi-user.target "$ROOT/etc/systemd/system/default.target"
# A new machine id at each first boot of a clone (an empty file: systemd makes one in /run).
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
printf 'agentlab-debian\n' >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
# root has no password (no login is possible: no getty, no sshd); the daemon uses qemu-ga.
mkdir -p "$ROOT/work" "$ROOT/etc/agentlab"
chmod 0700 "$ROOT/etc/agentlab"
install -m 0755 "$RUNNER" "$ROOT/usr/local/bin/agentlab-runner"
printf '%s\n' "$STAMP" >"$ROOT/etc/agentlab-image"
# What the build leaves behind in the tree.
rm -rf "$ROOT"/tmp/* "$ROOT"/var/tmp/* "$ROOT"/var/log/apt/* "$ROOT"/var/cache/debconf/*-old \
	"$ROOT"/var/lib/dpkg/*-old "$ROOT"/var/cache/ldconfig/aux-cache
find "$ROOT/var/log" -type f -exec truncate -s 0 {} +

# Package versions, for the manifest.
chroot "$ROOT" dpkg-query -W -f='${Package}\t${Version}\n' >"$WORK/packages.tsv"
pkg_version() { awk -F'\t' -v p="$1" '$1 == p { print $2 }' "$WORK/packages.tsv"; }

log "root file system: mkfs.ext4 ($DISK_SIZE) and qemu-img convert"
truncate -s "$DISK_SIZE" "$WORK/root.raw"
VIRTUAL_SIZE=$(stat -c %s "$WORK/root.raw")
USED_BYTES=$(du -sb "$ROOT" | cut -f1)
mkfs.ext4 -q -F -L "$ROOT_LABEL" -m 0 -d "$ROOT" \
	-E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 "$WORK/root.raw"
qemu-img convert -f raw -O qcow2 "$WORK/root.raw" "$OUT/root.qcow2"
rm -f "$WORK/root.raw"

# ---- kernel and initramfs ---------------------------------------------------------------------

extract_vmlinux() { # BZIMAGE OUT (as build-guest-image.sh)
	local magic tool off
	for magic in '\xfd7zXZ\x00:xz -dc --single-stream' '\x28\xb5\x2f\xfd:zstd -qdc' '\x1f\x8b\x08:gzip -dc'; do
		tool=${magic#*:}
		off=$(LC_ALL=C grep -obUaP "${magic%%:*}" "$1" | head -n 1 | cut -d: -f1) || true
		[ -n "$off" ] || continue
		tail -c +$((off + 1)) "$1" | $tool >"$2" 2>/dev/null || true
		[ "$(head -c 4 "$2" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && return 0
	done
	return 1
}
KERNEL_FORMAT=bzimage
if [ "$BZIMAGE" = 1 ]; then
	cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
elif grep -qx 'CONFIG_PVH=y' "$ROOT/boot/config-$KVER" && extract_vmlinux "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"; then
	KERNEL_FORMAT=elf-pvh
else
	log "kernel: no PVH or no uncompressed image; keeping the bzImage"
	cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
fi
log "kernel: $KVER, $KERNEL_FORMAT ($(stat -c %s "$OUT/vmlinuz") B)"

MOD_ORDER=()
if [ "$TRIM" = 0 ]; then
	# Debian's initramfs-tools image, made in the image as a stock install makes it.
	chroot "$ROOT" update-initramfs -c -k "$KVER" >/dev/null
	cp "$ROOT/boot/initrd.img-$KVER" "$OUT/initrd.img"
	INITRD_KIND=initramfs-tools
	rm -f "$ROOT/boot/initrd.img-$KVER"
else
	# guest-image/init with the static busybox and modules of the image (dependencies first).
	declare -A MOD_PATH=() MOD_DEPS=() MOD_SEEN=()
	while IFS= read -r line; do
		file=${line%%:*}
		name=${file##*/}
		name=${name%%.ko*}
		name=${name//-/_}
		MOD_PATH[$name]=$file
		MOD_DEPS[$name]=${line#*:}
	done <"$MODDIR/modules.dep"
	add_module() {
		local name=${1//-/_} dep deps i
		[ -z "${MOD_SEEN[$name]:-}" ] || return 0
		MOD_SEEN[$name]=1
		if [ -z "${MOD_PATH[$name]:-}" ]; then
			if grep -q "/${name}\.ko" "$MODDIR/modules.builtin" 2>/dev/null ||
				grep -q "/${name//_/-}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
				return 0
			fi
			die "kernel $KVER has no module $name (guest-image/modules)"
		fi
		read -r -a deps <<<"${MOD_DEPS[$name]}"
		for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
			dep=${deps[$i]##*/}
			add_module "${dep%%.ko*}"
		done
		MOD_ORDER+=("${MOD_PATH[$name]}")
	}
	while read -r m _; do
		case $m in '' | '#'*) continue ;; esac
		add_module "$m"
	done <"$GUEST_DIR/modules"
	mkdir -p "$INITRD"/{bin,dev,proc,sys,newroot,lib/modules}
	install -m 0755 "$GUEST_DIR/init" "$INITRD/init"
	cp "$ROOT/bin/busybox" "$INITRD/bin/busybox"
	while IFS= read -r a; do
		[ "$a" = busybox ] || ln -s busybox "$INITRD/bin/$a"
	done < <("$INITRD/bin/busybox" --list)
	: >"$INITRD/lib/modules/load.list"
	for m in "${MOD_ORDER[@]}"; do
		base=${m##*/}
		case $base in
		*.ko) cp "$MODDIR/$m" "$INITRD/lib/modules/$base" ;;
		*.ko.xz) xz -dc "$MODDIR/$m" >"$INITRD/lib/modules/${base%.xz}" ;;
		*.ko.zst) zstd -qdc "$MODDIR/$m" >"$INITRD/lib/modules/${base%.zst}" ;;
		*) die "unexpected module file $m" ;;
		esac
		echo "${base%.ko*}.ko" >>"$INITRD/lib/modules/load.list"
	done
	find "$INITRD" -exec touch -h -d @0 {} +
	(cd "$INITRD" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) | zstd -q -9 >"$OUT/initrd.img"
	INITRD_KIND=busybox
fi
printf '%s\n' "$STAMP" >"$OUT/stamp"

# ---- manifest ---------------------------------------------------------------------------------

json_str() {
	local s=$1
	s=${s//\\/\\\\}
	s=${s//\"/\\\"}
	printf '"%s"' "$s"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
output() { # NAME, then extra JSON members
	local f=$OUT/$1
	printf '    %s: {"size": %s, "sha256": "%s"%s}' "$(json_str "$1")" "$(stat -c %s "$f")" "$(sha "$f")" "${2:-}"
}
BUILD_ID=$(date -u +%Y%m%dT%H%M%SZ)-${STAMP:0:12}
{
	printf '{\n'
	printf '  "format": 1,\n'
	printf '  "distro": "debian",\n'
	printf '  "suite": "%s",\n' "$SUITE"
	printf '  "trimmed": %s,\n' "$([ "$TRIM" = 1 ] && echo true || echo false)"
	printf '  "build_id": "%s",\n' "$BUILD_ID"
	printf '  "built_at": "%s",\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	printf '  "build_seconds": %s,\n' "$(($(date +%s) - START))"
	printf '  "mmdebstrap_seconds": %s,\n' "$MM_SECONDS"
	printf '  "input_stamp": "%s",\n' "$STAMP"
	printf '  "kernel_version": %s,\n' "$(json_str "$KVER")"
	printf '  "kernel_format": "%s",\n' "$KERNEL_FORMAT"
	printf '  "kernel_cmdline": %s,\n' "$(json_str "$KERNEL_CMDLINE")"
	printf '  "initrd": "%s",\n' "$INITRD_KIND"
	printf '  "root_label": %s,\n' "$(json_str "$ROOT_LABEL")"
	printf '  "root_used_bytes": %s,\n' "$USED_BYTES"
	printf '  "sources": ['
	sep=
	for s in "${SOURCES[@]}"; do printf '%s%s' "$sep" "$(json_str "$s")"; sep=', '; done
	printf '],\n'
	printf '  "files": {\n'
	output vmlinuz
	printf ',\n'
	output initrd.img
	printf ',\n'
	output root.qcow2 ", \"format\": \"qcow2\", \"virtual_size\": $VIRTUAL_SIZE, \"filesystem\": \"ext4\""
	printf '\n  },\n'
	printf '  "runner": {"path": %s, "sha256": "%s"},\n' "$(json_str "$RUNNER")" "$(sha "$RUNNER")"
	printf '  "packages": {'
	sep=
	for p in "${PACKAGES[@]}" "linux-image-$KVER" systemd cloud-init qemu-guest-agent git python3 nodejs npm gcc; do
		case " ${seen_pkgs:-} " in *" $p "*) continue ;; esac
		seen_pkgs="${seen_pkgs:-} $p"
		printf '%s%s: %s' "$sep" "$(json_str "$p")" "$(json_str "$(pkg_version "$p")")"
		sep=', '
	done
	printf '},\n'
	printf '  "masked_units": ['
	sep=
	if [ "$TRIM" = 1 ]; then
		for u in "${MASK_UNITS[@]}"; do printf '%s%s' "$sep" "$(json_str "$u")"; sep=', '; done
	fi
	printf '],\n'
	printf '  "modules": ['
	sep=
	for m in "${MOD_ORDER[@]}"; do printf '%s%s' "$sep" "$(json_str "${m##*/}")"; sep=', '; done
	printf ']\n}\n'
} >"$OUT/manifest.json"

# ---- publish ----------------------------------------------------------------------------------

mkdir -p "$TDIR/builds"
mv "$OUT" "$TDIR/builds/$BUILD_ID"
ln -sfn "builds/$BUILD_ID" "$TDIR/.current.link"
mv -Tf "$TDIR/.current.link" "$TDIR/current"
publish_links
mapfile -t old < <(find "$TDIR/builds" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | LC_ALL=C sort -r |
	tail -n +$((KEEP_BUILDS + 1)))
for b in "${old[@]}"; do
	[ "$b" = "$BUILD_ID" ] || rm -rf "${TDIR:?}/builds/$b"
done

log "done in $(($(date +%s) - START)) s (mmdebstrap $MM_SECONDS s): $TDIR -> builds/$BUILD_ID"
log "  vmlinuz $(stat -Lc %s "$TDIR/vmlinuz") B, initrd.img $(stat -Lc %s "$TDIR/initrd.img") B, root.qcow2 $(stat -Lc %s "$TDIR/root.qcow2") B ($DISK_SIZE virtual), files $((USED_BYTES / 1048576)) MiB"

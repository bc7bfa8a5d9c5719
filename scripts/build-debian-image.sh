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
# --disk-image FILE also makes build-disk-image.sh's whole-disk image (partition table, GRUB,
# Debian's kernel and initramfs-tools initramfs; see that script) from this build's tree, so that
# one mmdebstrap run serves both. It is made only when out of date; when the template is up to
# date and the disk image is not, build-disk-image.sh makes it with its own mmdebstrap run.
#
# Root is needed (mmdebstrap in root mode chroots; the files must belong to root in the image).
# Nothing is mounted on the host: the ext4 image is made with mkfs.ext4 -d.
#
# The Debian tree (sources, packages, the mmdebstrap run, the trim and the configuration shared
# with the disk image) is scripts/lib/debian.sh; stamps, publishing and the initramfs are in
# scripts/lib/common.sh.
# shellcheck disable=SC2016 # the single-quoted $1 and $(...) are for mmdebstrap, apt and dpkg
set -euo pipefail

readonly ROOT_LABEL=agentlab-root
# As the busybox template's, plus net.ifnames=0 (the NIC is eth0: no renaming by udev) and no
# console blanking. systemd's status lines stay off the serial console (quiet).
readonly KERNEL_CMDLINE_TRIM="console=ttyS0 root=/dev/vda rw quiet panic=-1 acpi=noirq cryptomgr.notests net.ifnames=0"
# Debian's own: what a stock cloud image boots with, on a serial console.
readonly KERNEL_CMDLINE_STOCK="console=ttyS0 root=/dev/vda rw panic=-1"
readonly KEEP_BUILDS=2
readonly TEMPLATE_FILES=(vmlinuz initrd.img root.qcow2 manifest.json)

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
LOG_NAME=build-debian-image
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$REPO_ROOT/scripts/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/debian.sh
. "$REPO_ROOT/scripts/lib/debian.sh"
# shellcheck source-path=SCRIPTDIR source=lib/disk.sh
. "$REPO_ROOT/scripts/lib/disk.sh"

usage() {
	cat <<USAGE
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
  --disk-image FILE also make build-disk-image.sh's whole-disk image FILE (its defaults) from
                    the same mmdebstrap run, when it is not up to date (trimmed builds only)
  --force           rebuild even if nothing changed
  -h, --help        this text
USAGE
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
DISK_OUTPUT=
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
	--disk-image) DISK_OUTPUT=${2:?--disk-image needs a file}; shift 2 ;;
	--disk-image=*) DISK_OUTPUT=${1#*=}; shift ;;
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
[ -z "$DISK_OUTPUT" ] || [ "$TRIM" = 1 ] || die "--disk-image needs the trimmed tree (no --untrimmed)"
IMAGES=$DATA_DIR/images
TDIR=$IMAGES/$NAME

# ---- host requirements ------------------------------------------------------------------------

require_root "mmdebstrap's root mode chroots into the new system"
require_dpkg
export PATH="/usr/sbin:/sbin:$PATH"
require_commands "${DEBIAN_HOST_COMMANDS[@]}"
[ -z "$DISK_OUTPUT" ] || require_commands "${DISK_HOST_COMMANDS[@]}"
debian_check_files
find_runner "$REPO_ROOT"
debian_sources
debian_packages

if [ "$TRIM" = 1 ]; then KERNEL_CMDLINE=$KERNEL_CMDLINE_TRIM; else KERNEL_CMDLINE=$KERNEL_CMDLINE_STOCK; fi
[ "$TRIM" = 1 ] || BZIMAGE=1

# ---- inputs -----------------------------------------------------------------------------------

stamp_inputs() {
	printf 'suite %s name %s disk %s label %s cmdline %s bzimage %s trim %s\n' "$SUITE" "$NAME" \
		"$DISK_SIZE" "$ROOT_LABEL" "$KERNEL_CMDLINE" "$BZIMAGE" "$TRIM"
	debian_stamp_inputs
	{
		build_code_files
		printf '%s\n' "$RUNNER" "$GUEST_DIR/init" "$GUEST_DIR/modules"
	} | xargs -d '\n' sha256sum
}
STAMP=$(stamp_of "$(stamp_inputs)")

build_lock "$TDIR" # one build at a time per template

# The disk image (--disk-image): its own stamp, as build-disk-image.sh computes it with its
# defaults. It is made from this build's tree when the template is rebuilt anyway; when only
# the disk image is out of date, build-disk-image.sh makes it with its own mmdebstrap run.
DISK_NEEDED=0
if [ -n "$DISK_OUTPUT" ]; then
	DISK_OUTPUT=$(disk_output_path "$DISK_OUTPUT")
	disk_defaults
	DISK_STAMP=$(stamp_of "$(disk_stamp_inputs)")
	if [ "$FORCE" = 1 ] || ! file_current_ok "$DISK_OUTPUT" "$DISK_STAMP"; then DISK_NEEDED=1; fi
fi

if [ "$FORCE" = 0 ] && current_ok "$TDIR" "$STAMP" "${TEMPLATE_FILES[@]}"; then
	publish_links "$TDIR" "${TEMPLATE_FILES[@]}"
	log "up to date: $TDIR ($(readlink "$TDIR/current"))"
	if [ "$DISK_NEEDED" = 1 ]; then
		exec "$REPO_ROOT/scripts/build-disk-image.sh" --output "$DISK_OUTPUT" --mirror "$MIRROR" \
			${SECURITY:+--security "$SECURITY"} --data-dir "$DATA_DIR"
	fi
	[ -z "$DISK_OUTPUT" ] || log "up to date: $DISK_OUTPUT"
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

debian_mmdebstrap "$ROOT" "$CACHE" "$TRIM"

# ---- the root file system --------------------------------------------------------------------

debian_configure_root "$ROOT" "$TRIM" agentlab-debian
# root has no password (no login is possible: no getty, no sshd); the daemon uses qemu-ga.
mkdir -p "$ROOT/work" "$ROOT/etc/agentlab"
chmod 0700 "$ROOT/etc/agentlab"
install -m 0755 "$RUNNER" "$ROOT/usr/local/bin/agentlab-runner"
printf '%s\n' "$STAMP" >"$ROOT/etc/agentlab-image"
debian_clean_root "$ROOT"

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
	resolve_modules "$MODDIR" "$KVER" "$GUEST_DIR/modules"
	pack_busybox_initramfs "$GUEST_DIR/init" "$ROOT/bin/busybox" "$MODDIR" "$INITRD" "$OUT/initrd.img"
	INITRD_KIND=busybox
fi
printf '%s\n' "$STAMP" >"$OUT/stamp"

# ---- manifest ---------------------------------------------------------------------------------

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
	for m in ${MOD_ORDER[@]+"${MOD_ORDER[@]}"}; do printf '%s%s' "$sep" "$(json_str "${m##*/}")"; sep=', '; done
	printf ']\n}\n'
} >"$OUT/manifest.json"

# ---- publish ----------------------------------------------------------------------------------

publish_build "$TDIR" "$OUT" "$BUILD_ID" "$KEEP_BUILDS" "${TEMPLATE_FILES[@]}"

log "done in $(($(date +%s) - START)) s (mmdebstrap $MM_SECONDS s): $TDIR -> builds/$BUILD_ID"
log "  vmlinuz $(stat -Lc %s "$TDIR/vmlinuz") B, initrd.img $(stat -Lc %s "$TDIR/initrd.img") B, root.qcow2 $(stat -Lc %s "$TDIR/root.qcow2") B ($DISK_SIZE virtual), files $((USED_BYTES / 1048576)) MiB"

# ---- the disk image, from the same tree (--disk-image) -----------------------------------------

if [ "$DISK_NEEDED" = 1 ]; then
	# The tree is the template's: make_disk_image takes the template's own additions (runner,
	# /work, /etc/agentlab) back out, so the result is the one build-disk-image.sh makes.
	DISK_START=$(date +%s)
	make_disk_image "$ROOT" "$WORK/disk.qcow2"
	disk_publish "$WORK/disk.qcow2" "$DISK_OUTPUT" "$DISK_STAMP"
	log "disk image: done in $(($(date +%s) - DISK_START)) s: $DISK_OUTPUT"
fi

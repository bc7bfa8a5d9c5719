#!/usr/bin/env bash
# Build the AgentLab guest template for the local QEMU backend from the host's Debian packages:
#
#   $AGENTLAB_DATA_DIR/images/vmlinuz        kernel (linux-image-amd64), for QEMU's -kernel; by
#                                            default uncompressed (see "The kernel" below)
#   $AGENTLAB_DATA_DIR/images/initrd.img     busybox + the modules needed to mount the root disk
#   $AGENTLAB_DATA_DIR/images/root.qcow2     ext4 root: busybox, qemu-ga, git, CA certificates,
#                                            the runner, and the boot scripts from guest-image/
#   $AGENTLAB_DATA_DIR/images/manifest.json  what was built, from what
#
# These four are symlinks into images/current/, itself a symlink to images/builds/<id>/; a build
# is assembled in a temporary directory and published by renaming the "current" link, so readers
# see either the old template or the new one, never a mix or a half-written file. The previous
# build is kept: a running VM keeps its backing file open, but create overlays with the resolved
# path (readlink -f images/root.qcow2) so that a rebuild never changes an existing overlay's base.
#
# A rebuild happens only when an input changed (kernel, modules, busybox, qemu-ga, git, CA
# bundle, runner, guest-image/, this script, options); otherwise the script exits in about a
# second. Nothing needs root: the root file system is made with mkfs.ext4 -d (no loop mount), and
# a non-root user runs the build under fakeroot so that the guest's files belong to root.
#
# The kernel: Debian ships an xz-compressed bzImage, and under TCG the decompressor alone takes
# seconds of the boot. The kernel is built with CONFIG_PVH, so QEMU can start the uncompressed ELF
# image directly (PVH entry, no decompression): vmlinuz is that ELF unless --bzimage is given.
# QEMU's -kernel takes either; the manifest's "kernel_format" says which one this is.
#
# The kernel command line the guest is built for is in the manifest ("kernel_cmdline").
#
# See --help for the options. The guest's side of the contract is docs/guest-contract.md.
#
# --distro debian builds the Debian 12 agent template (images/debian-12/) instead: that is
# scripts/build-debian-image.sh, which takes the remaining options (see its --help).
#
# The code shared with the other build scripts (logging, host checks, the stamp and lock,
# publishing, the kernel extraction, the busybox initramfs) is in scripts/lib/common.sh.
set -euo pipefail

# --distro: busybox (this script, the default) or debian (handed over with the other options).
DISTRO=busybox
REST_ARGS=()
while [ $# -gt 0 ]; do
	case $1 in
	--distro) DISTRO=${2:?--distro needs busybox or debian}; shift 2 ;;
	--distro=*) DISTRO=${1#*=}; shift ;;
	*) REST_ARGS+=("$1"); shift ;;
	esac
done
set -- ${REST_ARGS[@]+"${REST_ARGS[@]}"}
case $DISTRO in
busybox) ;;
debian) exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/build-debian-image.sh" "$@" ;;
*)
	printf 'build-guest-image: error: --distro must be busybox or debian, not %s\n' "$DISTRO" >&2
	exit 1
	;;
esac

readonly ROOT_LABEL=agentlab-root
# acpi=noirq: PCI interrupt routing from the BIOS table instead of ACPI link devices, whose
# AML takes most of a second under TCG; cryptomgr.notests: skip the crypto self-tests at boot.
readonly KERNEL_CMDLINE="console=ttyS0 root=/dev/vda rw quiet panic=-1 acpi=noirq cryptomgr.notests"
# git-core programs the guest does not need: servers, and perl programs (there is no perl).
readonly GIT_CORE_SKIP="git-daemon git-http-backend git-http-push git-imap-send git-shell git-instaweb scalar"
readonly KEEP_BUILDS=2
readonly TEMPLATE_FILES=(vmlinuz initrd.img root.qcow2 manifest.json)

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
GUEST_DIR=$REPO_ROOT/guest-image
LOG_NAME=build-guest-image
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$REPO_ROOT/scripts/lib/common.sh"

usage() {
	cat <<EOF
Usage: $(basename "$0") [options]

Build the guest template into \$AGENTLAB_DATA_DIR/images (default /var/lib/agentlab/images).

Options:
  --distro NAME          busybox (default: this template) or debian (the Debian 12 agent
                         template, images/debian-12/: scripts/build-debian-image.sh --help)
  --runner PATH          guest runner binary (default: \$AGENTLAB_RUNNER_BIN, else
                         target/release/agentlab-runner, else target/debug/agentlab-runner)
  --data-dir DIR         instead of \$AGENTLAB_DATA_DIR
  --kernel-version VER   a kernel under /boot and /lib/modules (default: the one
                         linux-image-amd64 depends on)
  --disk-size SIZE       virtual size of root.qcow2 (default 2G; sparse)
  --bzimage              ship the compressed bzImage as vmlinuz instead of the
                         uncompressed PVH ELF (smaller file, slower boot)
  --force                rebuild even if nothing changed
  -h, --help             this text
EOF
}

ORIG_ARGS=("$@")
DATA_DIR=${AGENTLAB_DATA_DIR:-/var/lib/agentlab}
RUNNER=${AGENTLAB_RUNNER_BIN:-}
KVER=
DISK_SIZE=2G
FORCE=0
BZIMAGE=0
while [ $# -gt 0 ]; do
	case $1 in
	--runner) RUNNER=${2:?--runner needs a path}; shift 2 ;;
	--runner=*) RUNNER=${1#*=}; shift ;;
	--data-dir) DATA_DIR=${2:?--data-dir needs a directory}; shift 2 ;;
	--data-dir=*) DATA_DIR=${1#*=}; shift ;;
	--kernel-version) KVER=${2:?--kernel-version needs a version}; shift 2 ;;
	--kernel-version=*) KVER=${1#*=}; shift ;;
	--disk-size) DISK_SIZE=${2:?--disk-size needs a size}; shift 2 ;;
	--disk-size=*) DISK_SIZE=${1#*=}; shift ;;
	--force) FORCE=1; shift ;;
	--bzimage) BZIMAGE=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
IMAGES=$DATA_DIR/images

# ---- host requirements ------------------------------------------------------------------------

# Debian packages the build reads from or runs. busybox-static, not busybox: the initramfs has
# no C library.
REQUIRED_PKGS=(linux-image-amd64 busybox-static qemu-guest-agent git ca-certificates e2fsprogs
	qemu-utils cpio zstd xz-utils)
[ "$(id -u)" = 0 ] || REQUIRED_PKGS+=(fakeroot)
require_dpkg
require_packages "${REQUIRED_PKGS[@]}"

# Re-run under fakeroot when not root, so that the files in the image are owned by root.
if [ "$(id -u)" != 0 ] && [ -z "${AGENTLAB_BUILD_UNDER_FAKEROOT:-}" ]; then
	export AGENTLAB_BUILD_UNDER_FAKEROOT=1
	exec fakeroot -- "$SCRIPT" "${ORIG_ARGS[@]}"
fi

# Files from the packages, by their Debian paths (not PATH: /usr/local may hold other builds).
BUSYBOX=/bin/busybox
QEMU_GA=/usr/sbin/qemu-ga
GIT_CORE=/usr/lib/git-core
GIT_TEMPLATES=/usr/share/git-core/templates
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
for f in "$BUSYBOX:busybox-static" "$QEMU_GA:qemu-guest-agent" "$GIT_CORE/git:git" \
	"$GIT_CORE/git-remote-http:git" "$CA_BUNDLE:ca-certificates"; do
	[ -e "${f%%:*}" ] || die "${f%%:*} is missing: apt-get install --reinstall ${f#*:}"
done
export PATH="/usr/sbin:/sbin:$PATH"
for c in mkfs.ext4 qemu-img cpio zstd xz gzip sha256sum ldd flock; do
	command -v "$c" >/dev/null || die "command $c not found"
done

if [ -z "$KVER" ]; then
	# linux-image-amd64 depends on exactly one versioned image: "linux-image-6.1.0-NN-amd64 (= ...)".
	KVER=$(dpkg-query -W -f='${Depends}' linux-image-amd64 |
		sed -n 's/.*linux-image-\([0-9][^ ,]*\).*/\1/p')
	[ -n "$KVER" ] || die "cannot tell which kernel linux-image-amd64 depends on; use --kernel-version"
fi
VMLINUZ=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[ -r "$VMLINUZ" ] || die "$VMLINUZ is missing or unreadable (apt-get install linux-image-$KVER)"
[ -r "$MODDIR/modules.dep" ] || die "$MODDIR/modules.dep is missing (apt-get install linux-image-$KVER)"

# The runner: --runner, $AGENTLAB_RUNNER_BIN, then the cargo build outputs.
find_runner "$REPO_ROOT"

if [ ! -f "$GUEST_DIR/init" ] || [ ! -f "$GUEST_DIR/modules" ] || [ ! -d "$GUEST_DIR/rootfs" ]; then
	die "$GUEST_DIR is incomplete (init, modules, rootfs/)"
fi

# ---- inputs -----------------------------------------------------------------------------------

# Kernel modules for the initramfs, dependencies first, built-in ones skipped.
resolve_modules "$MODDIR" "$KVER" "$GUEST_DIR/modules"

# Shared libraries of dynamically linked programs (ldd fails on static ones and scripts).
elf_libs() {
	local f
	for f in "$@"; do
		ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' || true
	done
}

git_core_files() { # the regular files and symlinks of git-core that go into the guest
	local f base
	for f in "$GIT_CORE"/*; do
		base=${f##*/}
		case " $GIT_CORE_SKIP " in *" $base "*) continue ;; esac
		if [ -f "$f" ] && [ ! -L "$f" ] && head -n 1 "$f" | grep -q '^#!.*\(perl\|python\)'; then
			continue
		fi
		printf '%s\n' "$f"
	done
}

mapfile -t GIT_FILES < <(git_core_files)
mapfile -t GIT_ELF < <(for f in "${GIT_FILES[@]}"; do [ -L "$f" ] || [ -d "$f" ] || echo "$f"; done)
# libgcc_s is dlopen()ed by glibc (thread cancellation), so ldd does not list it.
mapfile -t LIBS < <({
	elf_libs "$QEMU_GA" "${GIT_ELF[@]}" "$RUNNER"
	ls /lib/x86_64-linux-gnu/libgcc_s.so.1 2>/dev/null
} | sort -u)

# The stamp: hashes of everything the image is made of, plus the options.
stamp_inputs() {
	printf 'kernel %s disk %s label %s cmdline %s bzimage %s\n' "$KVER" "$DISK_SIZE" "$ROOT_LABEL" \
		"$KERNEL_CMDLINE" "$BZIMAGE"
	(cd "$GUEST_DIR" && find . -type f -printf '%m %P\n' -o -type l -printf 'l %P\n' | LC_ALL=C sort)
	find "$GIT_CORE" "$GIT_TEMPLATES" -printf '%m %y %p %l\n' | LC_ALL=C sort
	{
		build_code_files
		printf '%s\n' "$VMLINUZ" "$BUSYBOX" "$QEMU_GA" "$CA_BUNDLE" "$RUNNER"
		printf '%s\n' "${MOD_ORDER[@]/#/$MODDIR/}" "${GIT_ELF[@]}" "${LIBS[@]}"
		find "$GUEST_DIR" "$GIT_TEMPLATES" -type f
	} | xargs -d '\n' sha256sum
}
STAMP=$(stamp_of "$(stamp_inputs)")

build_lock "$IMAGES" # one build at a time per data directory

if [ "$FORCE" = 0 ] && current_ok "$IMAGES" "$STAMP" "${TEMPLATE_FILES[@]}"; then
	publish_links "$IMAGES" "${TEMPLATE_FILES[@]}"
	log "up to date: $IMAGES ($(readlink "$IMAGES/current"))"
	exit 0
fi

# ---- build ------------------------------------------------------------------------------------

START=$(date +%s)
WORK=$(mktemp -d "$IMAGES/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OUT=$WORK/out
ROOT=$WORK/root
INITRD=$WORK/initrd
mkdir -p "$OUT" "$ROOT" "$INITRD"
log "building in $WORK (kernel $KVER, runner $RUNNER)"

# Copy without the source's owner: files created here belong to root (real or fakeroot).
copy() { cp -R --preserve=mode,timestamps,links --no-dereference "$@"; }

copy_libs() { # DEST_ROOT: the shared libraries, at the paths the dynamic linker looks them up by
	local l
	for l in "${LIBS[@]}"; do
		mkdir -p "$1${l%/*}"
		cp -L "$l" "$1$l"
	done
}

# Applet links for a busybox at DEST_ROOT/usr/bin/busybox (merged /usr: bin and sbin are links).
busybox_links() {
	local a dest
	while IFS= read -r a; do
		case $a in
		bin/* | sbin/*) dest=$1/usr/$a ;;
		usr/*) dest=$1/$a ;;
		*) continue ;; # linuxrc
		esac
		[ -e "$dest" ] || [ -L "$dest" ] || ln -s /usr/bin/busybox "$dest"
	done < <("$BUSYBOX" --list-full)
}

log "root file system: staging"
mkdir -p "$ROOT"/usr/{bin,sbin,lib,lib64,local/bin,share} "$ROOT"/{etc/agentlab,etc/ssl/certs} \
	"$ROOT"/{dev,proc,sys,run,mnt,home,work,var/log} "$ROOT"/{root,tmp,var/tmp}
chmod 0700 "$ROOT/root" "$ROOT/etc/agentlab"
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$ROOT/$d"; done
ln -s ../run "$ROOT/var/run"
copy "$GUEST_DIR/rootfs/." "$ROOT/"
chmod 0600 "$ROOT/etc/shadow"
cp "$BUSYBOX" "$ROOT/usr/bin/busybox"
busybox_links "$ROOT"
cp "$QEMU_GA" "$ROOT/usr/sbin/qemu-ga"
mkdir -p "$ROOT/usr/lib/git-core" "$ROOT/usr/share/git-core"
copy "${GIT_FILES[@]}" "$ROOT/usr/lib/git-core/"
ln -s ../lib/git-core/git "$ROOT/usr/bin/git"
copy "$GIT_TEMPLATES" "$ROOT/usr/share/git-core/"
cp -L "$CA_BUNDLE" "$ROOT/etc/ssl/certs/ca-certificates.crt"
install -m 0755 "$RUNNER" "$ROOT/usr/local/bin/agentlab-runner"
copy_libs "$ROOT"
printf '%s\n' "$STAMP" >"$ROOT/etc/agentlab-image"

log "root file system: mkfs.ext4 ($DISK_SIZE) and qemu-img convert"
truncate -s "$DISK_SIZE" "$WORK/root.raw"
VIRTUAL_SIZE=$(stat -c %s "$WORK/root.raw")
# The inode tables and journal are initialised now: otherwise the guest kernel zeroes them in
# the background after boot, costing CPU and growing every overlay.
mkfs.ext4 -q -F -L "$ROOT_LABEL" -m 0 -d "$ROOT" \
	-E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 "$WORK/root.raw"
qemu-img convert -f raw -O qcow2 "$WORK/root.raw" "$OUT/root.qcow2"
rm -f "$WORK/root.raw"

log "initramfs: busybox and ${#MOD_ORDER[@]} modules"
pack_busybox_initramfs "$GUEST_DIR/init" "$BUSYBOX" "$MODDIR" "$INITRD" "$OUT/initrd.img"

# The uncompressed kernel (extract_vmlinux), used only if the kernel has PVH.
KERNEL_FORMAT=bzimage
if [ "$BZIMAGE" = 1 ]; then
	cp "$VMLINUZ" "$OUT/vmlinuz"
elif ! grep -qx 'CONFIG_PVH=y' "/boot/config-$KVER" 2>/dev/null; then
	log "kernel: $KVER has no CONFIG_PVH (or no /boot/config-$KVER); keeping the bzImage"
	cp "$VMLINUZ" "$OUT/vmlinuz"
elif extract_vmlinux "$VMLINUZ" "$OUT/vmlinuz"; then
	KERNEL_FORMAT=elf-pvh
	log "kernel: uncompressed PVH image ($(stat -c %s "$OUT/vmlinuz") B)"
else
	log "kernel: cannot extract the uncompressed image; keeping the bzImage"
	cp "$VMLINUZ" "$OUT/vmlinuz"
fi
printf '%s\n' "$STAMP" >"$OUT/stamp"

# ---- manifest ---------------------------------------------------------------------------------

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
input() { # NAME PATH PACKAGE
	printf '    %s: {"path": %s, "sha256": "%s"' "$(json_str "$1")" "$(json_str "$2")" "$(sha "$2")"
	[ -z "${3:-}" ] || printf ', "package": %s, "version": %s' "$(json_str "$3")" "$(json_str "$(pkg_version "$3")")"
	printf '}'
}
output() { # NAME, then extra JSON members
	local f=$OUT/$1
	printf '    %s: {"size": %s, "sha256": "%s"%s}' "$(json_str "$1")" "$(stat -c %s "$f")" "$(sha "$f")" "${2:-}"
}

BUILD_ID=$(date -u +%Y%m%dT%H%M%SZ)-${STAMP:0:12}
{
	printf '{\n'
	printf '  "format": 1,\n'
	printf '  "build_id": "%s",\n' "$BUILD_ID"
	printf '  "built_at": "%s",\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	printf '  "build_seconds": %s,\n' "$(($(date +%s) - START))"
	printf '  "input_stamp": "%s",\n' "$STAMP"
	printf '  "kernel_version": %s,\n' "$(json_str "$KVER")"
	printf '  "kernel_format": "%s",\n' "$KERNEL_FORMAT"
	printf '  "kernel_cmdline": %s,\n' "$(json_str "$KERNEL_CMDLINE")"
	printf '  "root_label": %s,\n' "$(json_str "$ROOT_LABEL")"
	printf '  "files": {\n'
	output vmlinuz
	printf ',\n'
	output initrd.img ', "compression": "zstd"'
	printf ',\n'
	output root.qcow2 ", \"format\": \"qcow2\", \"virtual_size\": $VIRTUAL_SIZE, \"filesystem\": \"ext4\""
	printf '\n  },\n'
	printf '  "inputs": {\n'
	input kernel "$VMLINUZ" "linux-image-$KVER"
	printf ',\n'
	input busybox "$BUSYBOX" busybox-static
	printf ',\n'
	input qemu_ga "$QEMU_GA" qemu-guest-agent
	printf ',\n'
	input git "$GIT_CORE/git" git
	printf ',\n'
	input git_remote_http "$GIT_CORE/git-remote-http" git
	printf ',\n'
	input ca_certificates "$CA_BUNDLE" ca-certificates
	printf ',\n'
	input runner "$RUNNER"
	printf ',\n'
	input build_script "$SCRIPT"
	printf ',\n'
	printf '    "guest_image": {"path": %s, "sha256": "%s"}\n' "$(json_str "$GUEST_DIR")" \
		"$(cd "$GUEST_DIR" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
	printf '  },\n'
	printf '  "modules": ['
	sep=
	for m in "${MOD_ORDER[@]}"; do
		printf '%s%s' "$sep" "$(json_str "${m##*/}")"
		sep=', '
	done
	printf ']\n}\n'
} >"$OUT/manifest.json"

# ---- publish ----------------------------------------------------------------------------------

publish_build "$IMAGES" "$OUT" "$BUILD_ID" "$KEEP_BUILDS" "${TEMPLATE_FILES[@]}"

log "done in $(($(date +%s) - START)) s: $IMAGES -> builds/$BUILD_ID"
log "  vmlinuz $(stat -Lc %s "$IMAGES/vmlinuz") B, initrd.img $(stat -Lc %s "$IMAGES/initrd.img") B, root.qcow2 $(stat -Lc %s "$IMAGES/root.qcow2") B ($DISK_SIZE virtual)"

#!/usr/bin/env bash
# Build a Debian 12 whole-disk image laid out like a stock cloud image (Debian's genericcloud
# qcow2), from Debian packages only:
#
#   $AGENTLAB_DATA_DIR/disk-images/debian-12-disk.qcow2   (or --output FILE)
#
# one qcow2 file with a dos partition table, GRUB (i386-pc) in the MBR and the post-MBR gap, and
# one ext4 partition holding the whole system: Debian's kernel (linux-image-amd64) and its
# initramfs-tools initramfs in /boot, systemd, cloud-init (NoCloud), qemu-guest-agent, curl,
# ca-certificates, git, and the rest of guest-image/debian/packages. QEMU boots it with its
# default firmware (SeaBIOS → GRUB → kernel + initramfs from the disk), with no -kernel, -initrd
# or -append. It is what `agentlab template import FILE NAME` is tested with: an image the
# project did not build for itself, except that it is made here from the Debian mirror the host's
# apt uses, because nothing else may be downloaded. It has no agentlab-runner (the daemon serves
# it) unless --runner bakes one into /usr/local/bin.
#
# The tree is the debian-12 template's (scripts/lib/debian.sh: the same packages, rootfs/ and
# trim/, masked units and pruned modules), so the two boot alike; only the boot chain differs. The
# layout and why no GRUB patching is needed: scripts/lib/disk.sh. `build-debian-image.sh
# --disk-image FILE` makes the same file from its own mmdebstrap run when it rebuilds the template
# (one run instead of two); this script runs mmdebstrap itself.
#
# Like the other build scripts: root is needed (mmdebstrap's root mode chroots), nothing is
# mounted on the host, the .debs are kept in $AGENTLAB_DATA_DIR/images/.debian-cache (shared with
# the Debian template), and a rebuild happens only when an input changed (the mirror's state as
# the host's apt lists see it, guest-image/debian/, the host's GRUB, these scripts, the options):
# the input stamp is kept beside the output as .FILE.stamp. The file is written under a
# temporary name beside FILE and renamed over it.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
LOG_NAME=build-disk-image
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$REPO_ROOT/scripts/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/debian.sh
. "$REPO_ROOT/scripts/lib/debian.sh"
# shellcheck source-path=SCRIPTDIR source=lib/disk.sh
. "$REPO_ROOT/scripts/lib/disk.sh"

usage() {
	cat <<USAGE
Usage: $(basename "$0") [options]

Build a whole-disk Debian 12 qcow2 image (partition table, GRUB for BIOS, ext4 root with its
own kernel and initramfs-tools initramfs, cloud-init, qemu-ga, curl) into
\$AGENTLAB_DATA_DIR/disk-images/debian-12-disk.qcow2 (default /var/lib/agentlab).

Options:
  --output FILE     the image file to write (default: the path above)
  --data-dir DIR    instead of \$AGENTLAB_DATA_DIR (the output's and the .deb cache's folder)
  --runner PATH     bake this agentlab-runner into /usr/local/bin (default: none; the daemon
                    serves the runner)
  --mirror URL      Debian mirror (default: the host apt's source for $SUITE)
  --security URL    Debian security mirror (default: the host apt's source for $SUITE-security)
  --disk-size SIZE  virtual size of the disk (default 4G; sparse)
  --force           rebuild even if nothing changed
  -h, --help        this text
USAGE
}

DATA_DIR=${AGENTLAB_DATA_DIR:-/var/lib/agentlab}
OUTPUT=
MIRROR=
SECURITY=
FORCE=0
disk_defaults
while [ $# -gt 0 ]; do
	case $1 in
	--output) OUTPUT=${2:?--output needs a file}; shift 2 ;;
	--output=*) OUTPUT=${1#*=}; shift ;;
	--data-dir) DATA_DIR=${2:?--data-dir needs a directory}; shift 2 ;;
	--data-dir=*) DATA_DIR=${1#*=}; shift ;;
	--runner) DI_RUNNER=${2:?--runner needs a path}; shift 2 ;;
	--runner=*) DI_RUNNER=${1#*=}; shift ;;
	--mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
	--mirror=*) MIRROR=${1#*=}; shift ;;
	--security) SECURITY=${2:?--security needs a URL}; shift 2 ;;
	--security=*) SECURITY=${1#*=}; shift ;;
	--disk-size) DI_SIZE=${2:?--disk-size needs a size}; shift 2 ;;
	--disk-size=*) DI_SIZE=${1#*=}; shift ;;
	--force) FORCE=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
OUTPUT=$(disk_output_path "${OUTPUT:-$DATA_DIR/disk-images/debian-12-disk.qcow2}")
IMAGES=$DATA_DIR/images

# ---- host requirements ------------------------------------------------------------------------

require_root "mmdebstrap's root mode chroots into the new system"
require_dpkg
export PATH="/usr/sbin:/sbin:$PATH"
require_commands "${DEBIAN_HOST_COMMANDS[@]}"
disk_check_host
debian_check_files
if [ -n "$DI_RUNNER" ]; then
	{ [ -f "$DI_RUNNER" ] && [ -r "$DI_RUNNER" ]; } || die "runner binary $DI_RUNNER does not exist or is unreadable"
	DI_RUNNER=$(readlink -f "$DI_RUNNER")
fi
debian_sources
debian_packages

# ---- inputs -----------------------------------------------------------------------------------

STAMP=$(stamp_of "$(disk_stamp_inputs)")
OUTDIR=$(dirname "$OUTPUT")
build_lock "$OUTDIR" # one build at a time per output folder

if [ "$FORCE" = 0 ] && file_current_ok "$OUTPUT" "$STAMP"; then
	log "up to date: $OUTPUT"
	exit 0
fi

# ---- build ------------------------------------------------------------------------------------

START=$(date +%s)
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
log "building $OUTPUT in $WORK (runner: ${DI_RUNNER:-none})"
log "sources: ${SOURCES[*]}"

debian_mmdebstrap "$ROOT" "$IMAGES/.debian-cache" 1
debian_configure_root "$ROOT" 1 "$DISK_HOSTNAME"
debian_clean_root "$ROOT"
make_disk_image "$ROOT" "$WORK/disk.qcow2"
disk_publish "$WORK/disk.qcow2" "$OUTPUT" "$STAMP"

log "done in $(($(date +%s) - START)) s (mmdebstrap $MM_SECONDS s): $OUTPUT"
log "  $(stat -c %s "$OUTPUT") B ($DI_SIZE virtual), kernel $KVER, root UUID $DISK_UUID"

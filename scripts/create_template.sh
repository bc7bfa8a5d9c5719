#!/usr/bin/env bash
# Build the AgentLab sandbox template on a Proxmox VE host: an Ubuntu cloud image with
# qemu-guest-agent, git and curl installed (and, with --runner, the AgentLab guest runner; without
# it, each sandbox's user-data fetches the daemon's own runner and checks its sha256), imported as the disk of a VM that
# has the guest agent enabled, a cloud-init drive and the firewall that keeps "restricted"
# sandboxes to the daemon's guest endpoint; then `qm template`. Profiles name it by VMID
# (`template_vmid`, 9000 by default). The guest side of the contract is docs/guest-contract.md;
# the host side (bridge, DHCP, egress rules) is docs/proxmox.md.
#
# Run as root on the Proxmox node. Needs virt-customize (apt install libguestfs-tools). See --help.
set -euo pipefail

VMID=9000
NAME=agentlab-template
STORAGE=local-lvm
BRIDGE=vmbr1
MEMORY=2048
CORES=2
# The agent subnet's host address and the daemon's guest port (guest_url).
GUEST_IP=10.77.0.1
GUEST_PORT=8848
IMAGE_URL=https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img
RUNNER=
CACHE_DIR=/var/lib/agentlab/cache
REPLACE=0

log() { printf 'create_template: %s\n' "$*" >&2; }
die() {
	printf 'create_template: error: %s\n' "$*" >&2
	exit 1
}

usage() {
	cat <<EOF
Usage: $(basename "$0") [options]

Options:
  --runner PATH        also bake this agentlab-runner binary into the image. Not needed for
                       jobs: the daemon serves its own runner to every sandbox. A warm pool on
                       Proxmox boots sandboxes before any job, and needs one baked in.
  --vmid N             template VMID (default $VMID; the profiles' template_vmid)
  --name NAME          template name (default $NAME)
  --storage ID         storage for the template's disks (default $STORAGE). Use one that can
                       make linked clones (ZFS, LVM-thin, Ceph RBD, or qcow2 on a directory);
                       otherwise every sandbox is a slow full copy.
  --bridge NAME        bridge of the agent subnet (default $BRIDGE)
  --guest-ip IP        the daemon's address on that bridge (default $GUEST_IP)
  --guest-port N       the daemon's guest port (default $GUEST_PORT)
  --memory MB          template memory; profiles set their own (default $MEMORY)
  --cores N            template cores; profiles set their own (default $CORES)
  --image-url URL      cloud image (default: Ubuntu 24.04 LTS, $IMAGE_URL)
  --cache-dir DIR      where the downloaded image is kept (default $CACHE_DIR)
  --replace            destroy an existing template with this VMID first
  -h, --help           this text
EOF
}

while [ $# -gt 0 ]; do
	case "$1" in
	--runner) RUNNER=$2; shift 2 ;;
	--vmid) VMID=$2; shift 2 ;;
	--name) NAME=$2; shift 2 ;;
	--storage) STORAGE=$2; shift 2 ;;
	--bridge) BRIDGE=$2; shift 2 ;;
	--guest-ip) GUEST_IP=$2; shift 2 ;;
	--guest-port) GUEST_PORT=$2; shift 2 ;;
	--memory) MEMORY=$2; shift 2 ;;
	--cores) CORES=$2; shift 2 ;;
	--image-url) IMAGE_URL=$2; shift 2 ;;
	--cache-dir) CACHE_DIR=$2; shift 2 ;;
	--replace) REPLACE=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown option $1" ;;
	esac
done

# --- Checks: everything that can fail cheaply fails before the download. -------------------------
[ "$(id -u)" -eq 0 ] || die "run as root (qm, pvesh and virt-customize need it)"
for tool in qm pvesh pvesm; do
	command -v "$tool" >/dev/null || die "$tool not found: run this on a Proxmox VE node"
done
command -v virt-customize >/dev/null || die "virt-customize not found: apt install libguestfs-tools"
[ -z "$RUNNER" ] || [ -x "$RUNNER" ] || die "runner $RUNNER is not an executable file"
case "$VMID" in '' | *[!0-9]*) die "--vmid must be a number" ;; esac
pvesm status --storage "$STORAGE" >/dev/null 2>&1 || die "storage $STORAGE does not exist (pvesm status)"
ip link show "$BRIDGE" >/dev/null 2>&1 || log "warning: bridge $BRIDGE does not exist yet (docs/proxmox.md, Networking)"

if qm status "$VMID" >/dev/null 2>&1; then
	[ "$REPLACE" -eq 1 ] || die "VM $VMID exists; pass --replace to destroy and rebuild it"
	# Clones of a template keep using its base disk; Proxmox refuses to destroy it while they exist.
	log "destroying the existing VM $VMID"
	qm destroy "$VMID" --purge 1
fi

# --- The image: downloaded once, checked against the publisher's SHA256SUMS. ---------------------
mkdir -p "$CACHE_DIR"
image_name=$(basename "$IMAGE_URL")
cached=$CACHE_DIR/$image_name
if [ ! -f "$cached" ]; then
	log "downloading $IMAGE_URL"
	curl -fSL --retry 3 -o "$cached.partial" "$IMAGE_URL"
	mv "$cached.partial" "$cached"
fi
sums_url="$(dirname "$IMAGE_URL")/SHA256SUMS"
if sums=$(curl -fsSL "$sums_url" 2>/dev/null); then
	expected=$(printf '%s\n' "$sums" | awk -v f="$image_name" '$2 == f || $2 == "*" f { print $1 }')
	actual=$(sha256sum "$cached" | cut -d' ' -f1)
	if [ -n "$expected" ] && [ "$expected" != "$actual" ]; then
		rm -f "$cached"
		die "checksum mismatch for $image_name (removed; run again to download it anew)"
	fi
	[ -n "$expected" ] && log "checksum ok ($actual)"
else
	log "warning: no SHA256SUMS at $sums_url; the image is not verified"
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/agentlab-template.XXXXXX")
trap 'rm -rf "$work"' EXIT
disk=$work/disk.qcow2
cp "$cached" "$disk"

# --- Inside the image: what docs/guest-contract.md asks of a guest. -------------------------------
# - qemu-guest-agent: the daemon starts the runner with `qm guest exec` and pings the agent;
# - git and CA certificates: the runner checks out the job's repository;
# - curl, which the user-data uses to fetch the daemon's runner (or, with --runner, the runner at
#   /usr/local/bin/agentlab-runner already), and /etc/agentlab for its bootstrap file;
# - cloud-init state cleaned, so each clone runs cloud-init as a first boot (phone_home included);
# - an empty machine-id, so each clone gets its own (and its own DHCP client id).
log "customising the image (virt-customize)"
runner_args=()
if [ -n "$RUNNER" ]; then
	runner_args=(--upload "$RUNNER:/usr/local/bin/agentlab-runner"
		--chmod 0755:/usr/local/bin/agentlab-runner)
fi
virt-customize -a "$disk" \
	--install qemu-guest-agent,git,ca-certificates,curl \
	--mkdir /etc/agentlab \
	--chmod 0700:/etc/agentlab \
	"${runner_args[@]}" \
	--run-command 'systemctl enable qemu-guest-agent' \
	--run-command 'cloud-init clean --logs --seed' \
	--truncate /etc/machine-id

# --- The VM. ----------------------------------------------------------------------------------
log "creating VM $VMID ($NAME) on storage $STORAGE"
# firewall=1: the VM firewall below applies to net0; sandboxes with egress get firewall=0.
qm create "$VMID" \
	--name "$NAME" \
	--ostype l26 \
	--memory "$MEMORY" \
	--cores "$CORES" \
	--scsihw virtio-scsi-single \
	--net0 "virtio,bridge=$BRIDGE,firewall=1" \
	--serial0 socket \
	--vga serial0 \
	--agent enabled=1,fstrim_cloned_disks=1
# The disk, imported from the customised image (Proxmox VE 7.2 and later).
qm set "$VMID" --scsi0 "$STORAGE:0,import-from=$disk,discard=on"
# The cloud-init drive (NoCloud): the daemon's user-data goes in as a snippet (--cicustom), the
# address comes from DHCP on the agent bridge.
qm set "$VMID" --ide2 "$STORAGE:cloudinit" --boot order=scsi0 --citype nocloud --ipconfig0 ip=dhcp

# --- The firewall of restricted sandboxes: copied to every clone by `qm clone`. ------------------
# Everything in and out is dropped, except DHCP and the guest's connections to the daemon's guest
# endpoint. It only acts while the datacenter firewall is on (docs/proxmox.md).
node=$(hostname -s)
fw=/nodes/$node/qemu/$VMID/firewall
pvesh set "$fw/options" --enable 1 --dhcp 1 --policy_in DROP --policy_out DROP
pvesh create "$fw/rules" --type out --action ACCEPT --proto tcp --dest "$GUEST_IP" --dport "$GUEST_PORT" \
	--enable 1 --comment "agentlab: guest endpoint"

cluster_fw=$(pvesh get /cluster/firewall/options --output-format json)
case "$cluster_fw" in
*'"enable":1'*) ;;
*) log "warning: the datacenter firewall is off, so restricted sandboxes would not be restricted;" \
	"the daemon refuses them until it is on (docs/proxmox.md, Firewall)" ;;
esac

qm template "$VMID"
log "template $VMID ($NAME) is ready; profiles use it with template_vmid: $VMID"

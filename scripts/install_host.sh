#!/usr/bin/env bash
# Install AgentLab on a host: the binaries in /usr/local/bin, the config, profiles and tuning in
# /etc/agentlab (existing files are kept), and the systemd unit. On a Proxmox VE node it also
# installs the unit's Proxmox drop-in and checks what the pve backend needs: a storage with
# content type `snippets`, the agent bridge, and the template. Safe to rerun.
#
# Build first: cargo build --release --bins. See --help.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
BIN_DIR=$REPO/target/release
PREFIX=/usr/local
ETC=/etc/agentlab
UNIT_DIR=/etc/systemd/system
SNIPPETS_STORAGE=local
BRIDGE=vmbr1
TEMPLATE_VMID=9000
START=1

log() { printf 'install_host: %s\n' "$*" >&2; }
warn() { printf 'install_host: warning: %s\n' "$*" >&2; }
die() {
	printf 'install_host: error: %s\n' "$*" >&2
	exit 1
}

usage() {
	cat <<EOF
Usage: $(basename "$0") [options]

Options:
  --bin-dir DIR            where the built binaries are (default $BIN_DIR)
  --prefix DIR             install prefix (default $PREFIX: binaries go to PREFIX/bin)
  --snippets-storage ID    Proxmox: the storage that holds cloud-init snippets (default $SNIPPETS_STORAGE)
  --bridge NAME            Proxmox: the agent bridge (default $BRIDGE)
  --template-vmid N        Proxmox: the template the profiles use (default $TEMPLATE_VMID)
  --no-start               install and enable, but do not (re)start agentlabd
  -h, --help               this text
EOF
}

while [ $# -gt 0 ]; do
	case "$1" in
	--bin-dir) BIN_DIR=$2; shift 2 ;;
	--prefix) PREFIX=$2; shift 2 ;;
	--snippets-storage) SNIPPETS_STORAGE=$2; shift 2 ;;
	--bridge) BRIDGE=$2; shift 2 ;;
	--template-vmid) TEMPLATE_VMID=$2; shift 2 ;;
	--no-start) START=0; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown option $1" ;;
	esac
done

[ "$(id -u)" -eq 0 ] || die "run as root"
for bin in agentlabd agentlab agentlab-runner; do
	[ -x "$BIN_DIR/$bin" ] || die "$BIN_DIR/$bin is missing: cargo build --release --bins"
done

is_pve=0
if command -v pveversion >/dev/null 2>&1 && [ -d /etc/pve ]; then
	is_pve=1
	log "Proxmox VE node: $(pveversion)"
fi

# --- Binaries. The runner is installed too: create_template.sh puts it in the guest image. --------
install -d -m 0755 "$PREFIX/bin"
for bin in agentlabd agentlab agentlab-runner; do
	install -m 0755 "$BIN_DIR/$bin" "$PREFIX/bin/$bin"
done
log "binaries in $PREFIX/bin"

# --- Config, profiles and tuning. An operator's edits are never overwritten. --------------------
install -d -m 0750 "$ETC" "$ETC/profiles" "$ETC/tuning"
install_kept() {
	local source=$1 target=$2 mode=$3
	if [ -e "$target" ]; then
		cmp -s "$source" "$target" || log "kept $target (the shipped version differs: $source)"
	else
		install -m "$mode" "$source" "$target"
		log "installed $target"
	fi
}
if [ ! -e "$ETC/config.yaml" ]; then
	config=$(mktemp)
	cp "$REPO/scripts/config.example.yaml" "$config"
	if [ "$is_pve" -eq 1 ]; then
		# The pve backend, with the guest API on the agent bridge (docs/proxmox.md).
		sed -i \
			-e 's/^backend: qemu /backend: pve  /' \
			-e 's|^guest_listen: 127.0.0.1:8848 |guest_listen: 10.77.0.1:8848 |' \
			-e 's|^# guest_url: http://10.77.0.1:8848 |guest_url: http://10.77.0.1:8848   |' \
			-e "s|^  snippets_storage: local |  snippets_storage: $SNIPPETS_STORAGE |" \
			-e "s|^  bridge: vmbr1 |  bridge: $BRIDGE |" \
			"$config"
	fi
	install -m 0640 "$config" "$ETC/config.yaml"
	rm -f "$config"
	log "installed $ETC/config.yaml"
else
	log "kept $ETC/config.yaml"
fi
for file in "$REPO"/profiles/*.yaml; do
	install_kept "$file" "$ETC/profiles/$(basename "$file")" 0640
done
for file in "$REPO"/tuning/*.yaml; do
	install_kept "$file" "$ETC/tuning/$(basename "$file")" 0640
done
getent group agentlab >/dev/null || groupadd --system agentlab

# --- systemd. ----------------------------------------------------------------------------------
install -m 0644 "$REPO/scripts/agentlabd.service" "$UNIT_DIR/agentlabd.service"
if [ "$is_pve" -eq 1 ]; then
	install -d -m 0755 "$UNIT_DIR/agentlabd.service.d"
	install -m 0644 "$REPO/scripts/agentlabd-pve.conf" "$UNIT_DIR/agentlabd.service.d/pve.conf"
	log "installed the Proxmox drop-in (qm and the VMs it starts need the host unsandboxed)"
fi
systemctl daemon-reload

# --- Proxmox checks: what the pve backend needs and cannot create itself. -----------------------
if [ "$is_pve" -eq 1 ]; then
	storage_json=$(pvesh get "/storage/$SNIPPETS_STORAGE" --output-format json 2>/dev/null || true)
	if [ -z "$storage_json" ]; then
		warn "storage $SNIPPETS_STORAGE does not exist; set pve.snippets_storage to one that does"
	else
		content=$(printf '%s' "$storage_json" | sed -n 's/.*"content":"\([^"]*\)".*/\1/p')
		path=$(printf '%s' "$storage_json" | sed -n 's/.*"path":"\([^"]*\)".*/\1/p')
		case ",$content," in
		*,snippets,*) log "storage $SNIPPETS_STORAGE holds snippets in ${path:-?}/snippets" ;;
		*)
			# Changing it replaces the whole list, so the current types must be given too.
			warn "storage $SNIPPETS_STORAGE has no content type 'snippets'. Add it with:"
			warn "  pvesm set $SNIPPETS_STORAGE --content ${content:+$content,}snippets"
			;;
		esac
		if [ -n "$path" ] && ! grep -q "snippets_dir: $path/snippets" "$ETC/config.yaml"; then
			warn "pve.snippets_dir must be $path/snippets (the storage's path + /snippets)"
		fi
	fi
	ip link show "$BRIDGE" >/dev/null 2>&1 ||
		warn "bridge $BRIDGE does not exist: set it up as docs/proxmox.md (Networking) describes"
	if ! qm config "$TEMPLATE_VMID" 2>/dev/null | grep -q '^template: 1'; then
		warn "no template VM $TEMPLATE_VMID yet: scripts/create_template.sh --runner $PREFIX/bin/agentlab-runner"
	fi
fi

"$PREFIX/bin/agentlabd" --config "$ETC/config.yaml" --check-config ||
	die "$ETC/config.yaml does not pass --check-config; fix it, then rerun"
systemctl enable agentlabd.service >/dev/null
if [ "$START" -eq 1 ]; then
	systemctl restart agentlabd.service
	log "agentlabd (re)started: systemctl status agentlabd; journalctl -u agentlabd"
else
	log "agentlabd enabled, not started (--no-start)"
fi

#!/usr/bin/env bash
# Installs what AgentLab needs to build, run real VMs and run its tests on Debian 12: QEMU, the
# guest images' ingredients (the busybox template's host packages; mmdebstrap and the Debian
# archive keyring for the Debian 12 template; sfdisk and GRUB's BIOS images for the whole-disk
# image of build-disk-image.sh), and (if missing) a Rust toolchain. Safe to rerun: it installs only
# what is missing, then checks that every program and file the project uses is really there.
#
# Why it checks after installing: a machine may come with packages newer than Debian 12's (a
# backported qemu-utils, say). Installing Debian's qemu-system-x86 next to it makes apt remove
# that qemu-utils (it Breaks the older qemu-system-common), so a "what is missing" list taken
# before the install can be wrong after it. The QEMU packages are therefore installed as one
# matched set, and the result is verified by the programs it must provide, not by package names.
#
#   scripts/install-deps.sh           install what is missing, then verify
#   scripts/install-deps.sh --check   only verify: list what is missing, exit 1 if anything is
#
# AGENTLAB_DEPS_PATH overrides where programs are looked for (default: $PATH plus the sbin
# folders); the tests use it to show what the check says about a machine that lacks something.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }

check_only=0
case ${1:-} in
--check) check_only=1 ;;
'') ;;
-h | --help)
	sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
*)
	log "unknown argument: $1 (see --help)"
	exit 2
	;;
esac

# program:package — every program the scripts, the daemon and the tests run.
readonly PROGRAMS=(
	qemu-system-x86_64:qemu-system-x86
	qemu-img:qemu-utils
	qemu-ga:qemu-guest-agent
	mkfs.vfat:dosfstools
	mcopy:mtools
	mkfs.ext4:e2fsprogs
	socat:socat
	git:git
	cpio:cpio
	zstd:zstd
	xz:xz-utils
	curl:curl
	gcc:gcc
	pkg-config:pkg-config
	python3:python3
	mmdebstrap:mmdebstrap
	sfdisk:fdisk
	grub-mkimage:grub-common
)
# file:package — files the guest image is built from, by their Debian paths.
readonly FILES=(
	/bin/busybox:busybox-static
	/etc/ssl/certs/ca-certificates.crt:ca-certificates
	/usr/include/stdio.h:libc6-dev
	/usr/share/keyrings/debian-archive-keyring.gpg:debian-archive-keyring
	/usr/lib/grub/i386-pc/boot.img:grub-pc-bin
	/usr/lib/grub/i386-pc/diskboot.img:grub-pc-bin
)
# Packages checked by name too: the initramfs needs the static busybox (the dynamic one has the
# same path), and the image takes the kernel linux-image-amd64 depends on.
readonly NAMED_PACKAGES=(busybox-static linux-image-amd64)
# Debian 12's QEMU packages must come from one version: qemu-utils 10 (backports) Breaks
# qemu-system-common 7.2.
readonly QEMU_SET=(qemu-system-x86 qemu-utils qemu-guest-agent)

search_path=${AGENTLAB_DEPS_PATH:-$PATH:/usr/sbin:/sbin}
# Without root the guest image is built under fakeroot.
extra_programs=()
[ "$(id -u)" -eq 0 ] || extra_programs+=(fakeroot:fakeroot)

# Not `dpkg-query | grep -q`: under pipefail, grep leaving early can fail the pipe with SIGPIPE.
pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == *"ok installed" ]]; }
has_program() { PATH=$search_path command -v "$1" >/dev/null 2>&1; }

# Prints "package<TAB>what is missing" for each missing thing; nothing when all is there.
what_is_missing() {
	local entry
	for entry in "${PROGRAMS[@]}" ${extra_programs[@]+"${extra_programs[@]}"}; do
		has_program "${entry%%:*}" || printf '%s\tprogram %s\n' "${entry#*:}" "${entry%%:*}"
	done
	for entry in "${FILES[@]}"; do
		[ -e "${entry%%:*}" ] || printf '%s\tfile %s\n' "${entry#*:}" "${entry%%:*}"
	done
	for entry in "${NAMED_PACKAGES[@]}"; do
		pkg_installed "$entry" || printf '%s\tpackage %s\n' "$entry" "$entry"
	done
	if pkg_installed linux-image-amd64 && ! compgen -G '/boot/vmlinuz-*' >/dev/null; then
		printf 'linux-image-amd64\tfile /boot/vmlinuz-*\n'
	fi
}

report_missing() {
	local missing=$1 heading=$2
	log "$heading"
	printf '%s\n' "$missing" | while IFS=$'\t' read -r pkg what; do
		printf '  %-40s (Debian package %s)\n' "$what" "$pkg" >&2
	done
	local pkgs
	pkgs=$(printf '%s\n' "$missing" | cut -f1 | sort -u | tr '\n' ' ')
	log "install them with: apt-get install $pkgs"
}

missing=$(what_is_missing)
if [ "$check_only" = 1 ]; then
	if [ -n "$missing" ]; then
		report_missing "$missing" "missing:"
		exit 1
	fi
	log "ok: every program and file is present"
	exit 0
fi

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

# The version every QEMU package must have: the installed qemu-system-common's, else the one apt
# would install.
qemu_version() {
	if pkg_installed qemu-system-common; then
		dpkg-query -W -f='${Version}' qemu-system-common
		return
	fi
	apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }'
}

apt_install() {
	local wanted=("$@") args=() pkg needs_qemu=0 version
	for pkg in "${wanted[@]}"; do
		case " ${QEMU_SET[*]} " in *" $pkg "*) needs_qemu=1 ;; esac
	done
	if [ "$needs_qemu" = 1 ]; then
		version=$(qemu_version)
		[ -n "$version" ] || {
			log "apt knows no qemu-system-x86 version (is the Debian mirror in sources.list?)"
			exit 1
		}
		for pkg in "${QEMU_SET[@]}"; do args+=("$pkg=$version"); done
		for pkg in "${wanted[@]}"; do
			case " ${QEMU_SET[*]} " in *" $pkg "*) ;; *) args+=("$pkg") ;; esac
		done
		local current
		current=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
		if [ -n "$current" ] && [ "$current" != "$version" ]; then
			log "qemu-utils $current does not match qemu-system-x86 $version: installing $version"
		fi
	else
		args=("${wanted[@]}")
	fi
	log "installing ${args[*]}"
	DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
		--allow-downgrades "${args[@]}" >/dev/null
}

if [ -n "$missing" ]; then
	"${sudo_cmd[@]}" apt-get update -qq
	# shellcheck disable=SC2046 # one package name a word
	apt_install $(printf '%s\n' "$missing" | cut -f1 | sort -u)
	missing=$(what_is_missing)
	if [ -n "$missing" ]; then
		# Something the install removed or did not bring; one more pass, then give up with a list.
		# shellcheck disable=SC2046
		apt_install $(printf '%s\n' "$missing" | cut -f1 | sort -u)
		missing=$(what_is_missing)
	fi
	if [ -n "$missing" ]; then
		report_missing "$missing" "still missing after installing:"
		exit 1
	fi
fi

if ! command -v cargo >/dev/null 2>&1; then
	if [ -x "$HOME/.cargo/bin/cargo" ]; then
		log "cargo is in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)"
	else
		# Debian 12's own rustc is too old for the dependencies; rustup installs a current one.
		log "installing Rust with rustup"
		# rustfmt and clippy too: the test command checks formatting and lints.
		curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
			sh -s -- -y --profile minimal --component rustfmt --component clippy
	fi
fi
log "ok: $(PATH=$search_path qemu-system-x86_64 --version | head -n 1); qemu-img $(PATH=$search_path qemu-img --version | head -n 1 | awk '{ print $3 }')"

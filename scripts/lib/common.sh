# shellcheck shell=bash
# Shared by the image build scripts (build-guest-image.sh, build-debian-image.sh,
# build-disk-image.sh): logging, host checks, the runner lookup, the input stamp and build lock,
# publishing a template (builds/<id>/, the "current" link and the stable names) or a single file,
# the manifest's JSON helpers, the kernel extraction and the busybox initramfs.
#
# Sourced, not run. The sourcing script sets LOG_NAME (its name in messages) first; everything
# here works on the variables and arguments it is given and leaves the shell options to the
# caller (set -euo pipefail).

LIB_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")

log() { printf '%s: %s\n' "$LOG_NAME" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$LOG_NAME" "$*" >&2
	exit 1
}

# ---- host requirements ------------------------------------------------------------------------

require_root() { # WHY
	[ "$(id -u)" = 0 ] || die "run as root: $1"
}

require_dpkg() {
	command -v dpkg-query >/dev/null || die "this script needs a Debian (or derived) host: no dpkg-query"
}

pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# require_commands COMMAND:PACKAGE...: dies naming the Debian packages of the missing commands.
require_commands() {
	local c missing=()
	for c in "$@"; do
		command -v "${c%%:*}" >/dev/null || missing+=("${c#*:}")
	done
	[ ${#missing[@]} -eq 0 ] || die "missing Debian packages: ${missing[*]}
  install them with: apt-get install ${missing[*]} (or run scripts/install-deps.sh)"
}

# require_packages PACKAGE...: dies naming the packages that are not installed.
require_packages() {
	local p missing=()
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] || die "missing Debian packages: ${missing[*]}
  install them with: apt-get install ${missing[*]}"
}

# find_runner REPO_ROOT: sets RUNNER to the resolved path of the guest runner: RUNNER if set
# (--runner, $AGENTLAB_RUNNER_BIN), else the release build, else the debug build.
find_runner() {
	local c
	if [ -z "$RUNNER" ]; then
		for c in "$1/target/release/agentlab-runner" "$1/target/debug/agentlab-runner"; do
			if [ -f "$c" ]; then
				RUNNER=$c
				break
			fi
		done
		[ -n "$RUNNER" ] || die "no guest runner binary: build it with
  cargo build --release --bin agentlab-runner   (or: cargo build --bin agentlab-runner)
  or name one with --runner PATH or AGENTLAB_RUNNER_BIN"
	fi
	{ [ -f "$RUNNER" ] && [ -r "$RUNNER" ]; } || die "runner binary $RUNNER does not exist or is unreadable"
	RUNNER=$(readlink -f "$RUNNER")
}

# ---- inputs and the build lock ----------------------------------------------------------------

# The build scripts' own code: the calling script and these libraries. Part of every stamp, so
# that a change to the build logic rebuilds.
build_code_files() {
	printf '%s\n' "$SCRIPT"
	find "$LIB_DIR" -maxdepth 1 -type f -name '*.sh' | LC_ALL=C sort
}

stamp_of() { # TEXT: the stamp, the sha256 of the inputs' description
	printf '%s\n' "$1" | sha256sum | cut -d' ' -f1
}

# build_lock DIR: one build at a time per DIR (fd 9 is held until the script exits), then removes
# what a killed build left behind (.build.*): nothing else can be using it while we hold the lock.
build_lock() {
	mkdir -p "$1"
	exec 9>"$1/.lock"
	flock 9
	find "$1" -mindepth 1 -maxdepth 1 -name '.build.*' -exec rm -rf {} +
}

# ---- publishing a template: DIR/builds/<id>/, DIR/current -> builds/<id>, DIR/NAME -> current/NAME

# current_ok DIR STAMP FILE...: the current build is of these inputs and has all its files.
current_ok() {
	local dir=$1 stamp=$2 f
	shift 2
	[ -f "$dir/current/stamp" ] && [ "$(cat "$dir/current/stamp")" = "$stamp" ] || return 1
	for f in "$@"; do
		[ -f "$dir/current/$f" ] || return 1
	done
}

# publish_links DIR FILE...: the stable names, each a symlink into current/ (replaced atomically).
publish_links() {
	local dir=$1 f
	shift
	for f in "$@"; do
		if [ "$(readlink "$dir/$f" 2>/dev/null)" != "current/$f" ]; then
			ln -sfn "current/$f" "$dir/.$f.link"
			mv -Tf "$dir/.$f.link" "$dir/$f"
		fi
	done
}

# publish_build DIR OUT BUILD_ID KEEP FILE...: moves OUT to DIR/builds/BUILD_ID, points current at
# it by renaming a link (readers see the old build or the new one, never a mix), republishes the
# stable names and keeps the newest KEEP builds (running VMs hold theirs open).
publish_build() {
	local dir=$1 out=$2 id=$3 keep=$4 b old
	shift 4
	mkdir -p "$dir/builds"
	mv "$out" "$dir/builds/$id"
	ln -sfn "builds/$id" "$dir/.current.link"
	mv -Tf "$dir/.current.link" "$dir/current"
	publish_links "$dir" "$@"
	mapfile -t old < <(find "$dir/builds" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | LC_ALL=C sort -r |
		tail -n +$((keep + 1)))
	for b in ${old[@]+"${old[@]}"}; do
		[ "$b" = "$id" ] || rm -rf "${dir:?}/builds/$b"
	done
}

# ---- publishing a single file (build-disk-image.sh) -------------------------------------------

# The stamp of a single-file output lives beside it, hidden: FILE -> .FILE.stamp. The file stays
# one self-contained file (like a downloaded cloud image); the stamp only says what it was built
# from.
file_stamp_path() { printf '%s/.%s.stamp\n' "$(dirname "$1")" "$(basename "$1")"; }

file_current_ok() { # FILE STAMP
	local s
	s=$(file_stamp_path "$1")
	[ -f "$1" ] && [ -f "$s" ] && [ "$(cat "$s")" = "$2" ]
}

# publish_file TMP FILE STAMP: TMP (beside FILE, same file system) renamed over FILE, then the
# stamp written the same way. A reader sees the old file or the new one, never a partial one.
publish_file() {
	local s
	s=$(file_stamp_path "$2")
	mv -f "$1" "$2"
	printf '%s\n' "$3" >"$s.tmp"
	mv -f "$s.tmp" "$s"
}

# ---- manifest helpers -------------------------------------------------------------------------

json_str() {
	local s=$1
	s=${s//\\/\\\\}
	s=${s//\"/\\\"}
	printf '"%s"' "$s"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

# ---- kernel -----------------------------------------------------------------------------------

# extract_vmlinux BZIMAGE OUT: the uncompressed kernel, the payload of the bzImage found by its
# compression magic (like the kernel's scripts/extract-vmlinux); succeeds only if it is an ELF
# file. Under TCG the bzImage's decompressor takes seconds; a kernel with CONFIG_PVH can be
# started from the ELF image directly.
extract_vmlinux() {
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

# ---- the busybox initramfs (guest-image/init) -------------------------------------------------

# resolve_modules MODDIR KVER LIST: sets MOD_ORDER to the module files (relative to MODDIR) of the
# modules named in LIST (guest-image/modules), dependencies first, built-in ones skipped.
resolve_modules() {
	local moddir=$1 kver=$2 list=$3 line file name m
	declare -gA MOD_PATH=() MOD_DEPS=() MOD_SEEN=()
	MOD_ORDER=()
	while IFS= read -r line; do
		file=${line%%:*}
		name=${file##*/}
		name=${name%%.ko*}
		name=${name//-/_}
		MOD_PATH[$name]=$file
		MOD_DEPS[$name]=${line#*:}
	done <"$moddir/modules.dep"
	_add_module() {
		local name=${1//-/_} dep deps i
		[ -z "${MOD_SEEN[$name]:-}" ] || return 0
		MOD_SEEN[$name]=1
		if [ -z "${MOD_PATH[$name]:-}" ]; then
			if grep -q "/${name}\.ko" "$moddir/modules.builtin" 2>/dev/null ||
				grep -q "/${name//_/-}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
				return 0
			fi
			die "kernel $kver has no module $name (guest-image/modules)"
		fi
		# modules.dep lists every (indirect) dependency; modprobe loads them last to first.
		read -r -a deps <<<"${MOD_DEPS[$name]}"
		for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
			dep=${deps[$i]##*/}
			_add_module "${dep%%.ko*}"
		done
		MOD_ORDER+=("${MOD_PATH[$name]}")
	}
	while read -r m _; do
		case $m in '' | '#'*) continue ;; esac
		_add_module "$m"
	done <"$list"
}

# pack_busybox_initramfs INIT BUSYBOX MODDIR DIR OUT: DIR (empty) filled with INIT as /init, the
# static BUSYBOX and its applet links, and the MOD_ORDER modules (uncompressed, listed in load
# order in lib/modules/load.list), packed into OUT as a zstd-compressed newc cpio.
pack_busybox_initramfs() {
	local init=$1 busybox=$2 moddir=$3 dir=$4 out=$5 a m base
	mkdir -p "$dir"/{bin,dev,proc,sys,newroot,lib/modules}
	install -m 0755 "$init" "$dir/init"
	cp "$busybox" "$dir/bin/busybox"
	while IFS= read -r a; do
		[ "$a" = busybox ] || ln -s busybox "$dir/bin/$a"
	done < <("$dir/bin/busybox" --list)
	: >"$dir/lib/modules/load.list"
	for m in ${MOD_ORDER[@]+"${MOD_ORDER[@]}"}; do
		base=${m##*/}
		case $base in
		*.ko) cp "$moddir/$m" "$dir/lib/modules/$base" ;;
		*.ko.xz) xz -dc "$moddir/$m" >"$dir/lib/modules/${base%.xz}" ;;
		*.ko.zst) zstd -qdc "$moddir/$m" >"$dir/lib/modules/${base%.zst}" ;;
		*.ko.gz) gzip -dc "$moddir/$m" >"$dir/lib/modules/${base%.gz}" ;;
		*) die "unexpected module file $m" ;;
		esac
		echo "${base%.ko*}.ko" >>"$dir/lib/modules/load.list"
	done
	# Fixed timestamps: the same inputs give the same initrd.img.
	find "$dir" -exec touch -h -d @0 {} +
	# zstd: the kernel has CONFIG_RD_ZSTD, and it unpacks faster than gzip.
	(cd "$dir" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) | zstd -q -9 >"$out"
}

# shellcheck shell=bash
# The Debian 12 root file system shared by build-debian-image.sh (the debian-12 template) and
# build-disk-image.sh (the whole-disk "stock cloud image" look-alike): the suite and the host
# apt's mirrors, the package list (guest-image/debian/packages), the units masked and the kernel
# module folders pruned by the trim, the mmdebstrap run with its .deb cache, and the
# configuration both images share (guest-image/debian/rootfs and trim, networking, resolv.conf,
# machine id). What is specific to one image (the runner, the boot loader) stays in its script.
#
# Sourced after lib/common.sh; needs REPO_ROOT.
# shellcheck disable=SC2016 # the single-quoted $1 and $(...) are for mmdebstrap, apt and dpkg

readonly SUITE=bookworm
GUEST_DIR=$REPO_ROOT/guest-image
DEB_DIR=$GUEST_DIR/debian

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

# The host commands a Debian build runs (command:package).
# shellcheck disable=SC2034 # for the scripts' require_commands
readonly DEBIAN_HOST_COMMANDS=(mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs qemu-img:qemu-utils cpio:cpio
	zstd:zstd xz:xz-utils flock:util-linux sha256sum:coreutils)

debian_check_files() {
	local f
	for f in "$GUEST_DIR/init" "$GUEST_DIR/modules" "$DEB_DIR/packages" "$DEB_DIR/rootfs" "$DEB_DIR/trim"; do
		[ -e "$f" ] || die "$f is missing"
	done
}

# The host apt's sources for the suites: "URI SUITE" lines of Debian's own repositories.
host_source() { # SUITE
	apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(ORIGIN)' 'Created-By: Packages' 2>/dev/null |
		awk -v s="$1" '$2 == s && $3 == "Debian" { print $1; exit }'
}

# debian_sources: sets SOURCES from MIRROR and SECURITY (the host apt's when empty).
debian_sources() {
	if [ -z "$MIRROR" ]; then
		MIRROR=$(host_source "$SUITE")
		[ -n "$MIRROR" ] || die "the host's apt has no Debian $SUITE source (is apt-get update done?); use --mirror"
	fi
	if [ -z "$SECURITY" ]; then
		SECURITY=$(host_source "$SUITE-security")
	fi
	SOURCES=("deb ${MIRROR%/} $SUITE main" "deb ${MIRROR%/} $SUITE-updates main")
	[ -z "$SECURITY" ] || SOURCES+=("deb ${SECURITY%/} $SUITE-security main")
}

# debian_packages: sets PACKAGES (guest-image/debian/packages) and INCLUDE (comma-separated).
debian_packages() {
	mapfile -t PACKAGES < <(sed 's/#.*//' "$DEB_DIR/packages" | tr -s ' \t' '\n' | sed '/^$/d')
	[ ${#PACKAGES[@]} -gt 0 ] || die "$DEB_DIR/packages lists no packages"
	INCLUDE=$(IFS=,; echo "${PACKAGES[*]}")
}

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

# The inputs of the Debian tree, for a stamp: the sources, the trim lists, the mirror's state and
# guest-image/debian/ (names, modes and contents).
debian_stamp_inputs() {
	local base f
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
	find "$DEB_DIR" -type f | LC_ALL=C sort | xargs -d '\n' sha256sum
}

# debian_mmdebstrap ROOT CACHE TRIM: the packages into ROOT (a directory), with the .debs kept in
# CACHE. Sets MM_SECONDS, KVER and MODDIR.
debian_mmdebstrap() {
	local root=$1 cache=$2 trim=$3 o
	# Documentation, man pages and translations are not installed (dpkg path-exclude): smaller
	# image, and no man-db trigger. Copyright files stay.
	local excludes=(
		'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*'
		'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
		'path-exclude=/usr/share/locale/*' 'path-include=/usr/share/locale/locale.alias'
		'path-exclude=/usr/share/lintian/*' 'path-exclude=/usr/share/linda/*'
	)
	local args=(--variant=apt --mode=root --format=directory "--include=$INCLUDE"
		--aptopt='Acquire::Languages "none"' --aptopt='APT::Install-Recommends "false"')
	for o in "${excludes[@]}"; do args+=("--dpkgopt=$o"); done
	# The download cache (mmdebstrap's recipe): copy the kept .debs in, fetch only what is new,
	# copy the archives back out, then empty them in the image.
	mkdir -p "$cache"
	args+=(--skip=download/empty --skip=essential/unlink
		--setup-hook='mkdir -p "$1"/var/cache/apt/archives/' --setup-hook="sync-in $cache /var/cache/apt/archives/"
		--customize-hook="sync-out /var/cache/apt/archives $cache"
		--customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb')
	if [ "$trim" = 1 ]; then
		# The initramfs is made after the install, once, if at all: Debian's would be built
		# (slowly) for each kernel and initramfs-tools trigger during the install.
		args+=(--essential-hook='chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.agentlab --add /usr/sbin/update-initramfs && printf "#!/bin/sh\n# diverted while the AgentLab template is built\nexit 0\n" >"$1/usr/sbin/update-initramfs" && chmod 0755 "$1/usr/sbin/update-initramfs"')
		args+=(--customize-hook='rm -f "$1/usr/sbin/update-initramfs" && chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs')
	fi

	log "mmdebstrap: ${#PACKAGES[@]} packages and their dependencies"
	local start
	start=$(date +%s)
	mmdebstrap "${args[@]}" "$SUITE" "$root" "${SOURCES[@]}" 2>&1 | sed 's/^/  mmdebstrap: /' >&2
	MM_SECONDS=$(($(date +%s) - start))
	log "mmdebstrap: done in $MM_SECONDS s"

	KVER=$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | LC_ALL=C sort | tail -n 1)
	{ [ -n "$KVER" ] && [ -f "$root/boot/vmlinuz-$KVER" ]; } || die "no kernel in the image (linux-image-amd64)"
	MODDIR=$root/lib/modules/$KVER
}

# debian_configure_root ROOT TRIM HOSTNAME: the configuration both Debian images share.
debian_configure_root() {
	local root=$1 trim=$2 u d
	log "root file system: configuring"
	cp -R --no-preserve=ownership "$DEB_DIR/rootfs/." "$root/"
	if [ "$trim" = 1 ]; then
		cp -R --no-preserve=ownership "$DEB_DIR/trim/." "$root/"
		for u in "${MASK_UNITS[@]}"; do
			ln -sfn /dev/null "$root/etc/systemd/system/$u"
		done
		for d in "${PRUNE_MODULES[@]}"; do
			rm -rf "${MODDIR:?}/kernel/$d"
		done
		chroot "$root" depmod -a "$KVER"
		# The apt lists are a snapshot of the build's day: `apt-get update` fetches current ones.
		find "$root/var/lib/apt/lists" -maxdepth 1 -type f ! -name lock -delete
	fi
	# The build host's resolv.conf must not leak into the image: the DHCP lease's name server, as
	# systemd-resolved writes it (no stub listener; see rootfs/etc/systemd/resolved.conf.d).
	rm -f "$root/etc/resolv.conf"
	ln -s ../run/systemd/resolve/resolv.conf "$root/etc/resolv.conf"
	# Networking: systemd-networkd (DHCP on eth0/en*), systemd-resolved for /etc/resolv.conf.
	mkdir -p "$root/etc/systemd/system/multi-user.target.wants" "$root/etc/systemd/system/sockets.target.wants" \
		"$root/etc/systemd/system/network-online.target.wants"
	ln -sfn /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
	ln -sfn /lib/systemd/system/systemd-networkd.socket "$root/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
	ln -sfn /lib/systemd/system/systemd-networkd-wait-online.service \
		"$root/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
	ln -sfn /lib/systemd/system/systemd-resolved.service "$root/etc/systemd/system/multi-user.target.wants/systemd-resolved.service"
	# No display: the default target is multi-user, not graphical.
	ln -sfn /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"
	# A new machine id at each first boot of a clone (an empty file: systemd makes one in /run).
	: >"$root/etc/machine-id"
	rm -f "$root/var/lib/dbus/machine-id"
	printf '%s\n' "$3" >"$root/etc/hostname"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
}

# debian_clean_root ROOT: what the build leaves behind in the tree.
debian_clean_root() {
	local root=$1
	rm -rf "$root"/tmp/* "$root"/var/tmp/* "$root"/var/log/apt/* "$root"/var/cache/debconf/*-old \
		"$root"/var/lib/dpkg/*-old "$root"/var/cache/ldconfig/aux-cache
	find "$root/var/log" -type f -exec truncate -s 0 {} +
}

# shellcheck shell=bash
# The whole-disk image of build-disk-image.sh (also made by build-debian-image.sh --disk-image
# from its own tree): a configured Debian tree (lib/debian.sh) turned into one qcow2 file laid out
# like a stock cloud image, which QEMU boots with its default firmware (SeaBIOS):
#
#   sector 0           MBR: GRUB's boot.img (first 440 bytes) + a dos partition table
#   sectors 1..2047    GRUB's core.img (i386-pc) in the post-MBR gap
#   partition 1        from 1 MiB to the end, type 83, bootable: ext4, the root file system,
#                      with /boot/vmlinuz-VER (Debian's kernel), /boot/initrd.img-VER (Debian's
#                      initramfs-tools initramfs) and /boot/grub (grub.cfg and GRUB's modules)
#
# Nothing is mounted: mkfs.ext4 -d fills the file system straight into the raw disk file at its
# partition's offset (-E offset=), sfdisk writes the table into the regular file, and dd puts
# boot.img and core.img in place. No GRUB patching is needed for this layout: boot.img loads the
# sector at its default kernel LBA (1) and diskboot.img's default blocklist starts at sector 2,
# with the length grub-mkimage fills in; core.img then finds the root file system by its UUID
# (an embedded search.fs_uuid, as grub-install writes it) and reads /boot/grub/grub.cfg.
#
# Sourced after lib/common.sh and lib/debian.sh; needs REPO_ROOT.

readonly GRUB_DIR=/usr/lib/grub/i386-pc
# The host commands (command:package) the disk image needs beyond a Debian tree's.
readonly DISK_HOST_COMMANDS=(sfdisk:fdisk grub-mkimage:grub-common dd:coreutils)
# The partition starts at 1 MiB, as every partitioning tool aligns it; the gap before it holds
# core.img (at most 2047 sectors).
readonly DISK_PART_START=2048
# Modules built into core.img: what it needs to reach grub.cfg, and what grub.cfg uses, so that
# GRUB reads no module from the disk through the BIOS before the kernel (slow under TCG). The
# rest are in /boot/grub/i386-pc, as grub-install leaves them.
readonly GRUB_CORE_MODULES=(biosdisk part_msdos ext2 search_fs_uuid normal linux echo serial terminal
	terminfo test)
# Debian's initramfs-tools image, made small: only the modules the root disk needs (virtio PCI
# transport, virtio_blk, ext4 and its crc32c), instead of MODULES=most (every storage driver).
readonly INITRAMFS_MODULES=(virtio_pci virtio_blk crc32c_generic ext4)
readonly DISK_HOSTNAME=localhost

# disk_defaults: the options build-disk-image.sh has when given none (what --disk-image builds).
disk_defaults() {
	DI_SIZE=4G
	DI_RUNNER=
	# Debian genericcloud's consoles (VGA and the serial port), plus the template's speed-ups:
	# PCI interrupt routing from the BIOS table instead of ACPI link devices (whose AML takes most
	# of a second under TCG), no crypto self-tests, and a panic stops the VM instead of hanging.
	DI_CMDLINE_EXTRA="console=tty0 console=ttyS0,115200 panic=-1 acpi=noirq cryptomgr.notests"
}

disk_output_path() { # FILE: absolute, so that the stamp and messages name one file
	readlink -m "$1"
}

disk_check_host() {
	require_commands "${DISK_HOST_COMMANDS[@]}"
	if [ ! -f "$GRUB_DIR/boot.img" ] || [ ! -f "$GRUB_DIR/diskboot.img" ]; then
		die "GRUB's BIOS images are missing ($GRUB_DIR): apt-get install grub-pc-bin"
	fi
}

# The inputs of the disk image, for its stamp: the Debian tree's (lib/debian.sh), the options,
# GRUB's version and images, and the build code (build-disk-image.sh and the libraries).
disk_stamp_inputs() {
	printf 'disk-image suite %s size %s cmdline %s start %s hostname %s\n' "$SUITE" "$DI_SIZE" \
		"$DI_CMDLINE_EXTRA" "$DISK_PART_START" "$DISK_HOSTNAME"
	printf 'grub-module %s\n' "${GRUB_CORE_MODULES[@]}"
	printf 'initramfs-module %s\n' "${INITRAMFS_MODULES[@]}"
	dpkg-query -W -f='${Package} ${Version}\n' grub-pc-bin grub-common 2>/dev/null || true
	debian_stamp_inputs
	{
		printf '%s\n' "$REPO_ROOT/scripts/build-disk-image.sh"
		find "$LIB_DIR" -maxdepth 1 -type f -name '*.sh' | LC_ALL=C sort
		printf '%s\n' "$GRUB_DIR/boot.img" "$GRUB_DIR/diskboot.img" "$GRUB_DIR/kernel.img"
		[ -z "$DI_RUNNER" ] || printf '%s\n' "$DI_RUNNER"
	} | xargs -d '\n' sha256sum
}

# make_disk_image ROOT OUT: ROOT (configured and cleaned by lib/debian.sh, with KVER and MODDIR
# set) made into the disk image OUT (qcow2). Changes ROOT.
make_disk_image() {
	local root=$1 out=$2 raw uuid size_bytes total_sectors part_sectors core kernel initrd cmdline
	raw=$(dirname "$out")/disk.raw
	# What the template build adds to the shared tree: not in a stock image (the daemon serves
	# the runner and its user-data makes what it needs).
	rm -rf "$root/usr/local/bin/agentlab-runner" "$root/etc/agentlab-image" "$root/etc/agentlab" "$root/work"
	printf '%s\n' "$DISK_HOSTNAME" >"$root/etc/hostname"
	if [ -n "$DI_RUNNER" ]; then
		install -m 0755 "$DI_RUNNER" "$root/usr/local/bin/agentlab-runner"
	fi

	# Debian's initramfs, made in the image by its own initramfs-tools. gzip: the image has no
	# zstd program (initramfs-tools would fall back to gzip anyway), and gzip is what the kernel
	# unpacks without one more package. RESUME=none: no wait for a swap device.
	mkdir -p "$root/etc/initramfs-tools/conf.d"
	cat >"$root/etc/initramfs-tools/conf.d/agentlab-disk.conf" <<-'CONF'
		# Only the modules listed in /etc/initramfs-tools/modules (the root disk's), not every
		# storage driver: a smaller initramfs that GRUB loads and the kernel unpacks faster.
		MODULES=list
		COMPRESS=gzip
		RESUME=none
	CONF
	{
		printf '# The root disk of a QEMU VM: virtio PCI transport, virtio_blk, ext4.\n'
		printf '%s\n' "${INITRAMFS_MODULES[@]}"
	} >"$root/etc/initramfs-tools/modules"
	log "disk image: initramfs-tools initramfs for $KVER"
	chroot "$root" update-initramfs -c -k "$KVER" 2>&1 | sed 's/^/  update-initramfs: /' >&2
	kernel=/boot/vmlinuz-$KVER
	initrd=/boot/initrd.img-$KVER
	[ -f "$root$initrd" ] || die "update-initramfs made no $initrd"

	uuid=$(cat /proc/sys/kernel/random/uuid)
	printf '# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=%s / ext4 rw,discard,errors=remount-ro 0 1\n' \
		"$uuid" >"$root/etc/fstab"

	# GRUB: core.img, its modules where grub-install puts them, and grub.cfg.
	log "disk image: GRUB (i386-pc) for UUID $uuid"
	mkdir -p "$root/boot/grub/i386-pc"
	cp "$GRUB_DIR"/*.mod "$GRUB_DIR"/*.lst "$root/boot/grub/i386-pc/"
	# shellcheck disable=SC2016 # $root is GRUB's variable
	printf 'search.fs_uuid %s root\nset prefix=($root)/boot/grub\n' "$uuid" >"$(dirname "$out")/early.cfg"
	core=$(dirname "$out")/core.img
	grub-mkimage -O i386-pc -d "$GRUB_DIR" -c "$(dirname "$out")/early.cfg" -p /boot/grub -o "$core" \
		"${GRUB_CORE_MODULES[@]}"
	[ "$(stat -c %s "$core")" -le $(((DISK_PART_START - 1) * 512)) ] || die "core.img does not fit before the partition"
	cp "$core" "$root/boot/grub/i386-pc/core.img"
	cmdline="root=UUID=$uuid ro $DI_CMDLINE_EXTRA"
	cat >"$root/boot/grub/grub.cfg" <<-CFG
		# Made by build-disk-image.sh (no update-grub in the image): Debian's kernel and
		# initramfs from this file system, on the serial console as well as the screen.
		serial --unit=0 --speed=115200
		terminal_input serial console
		terminal_output serial console
		set default=0
		set timeout=0
		menuentry 'Debian GNU/Linux 12, $KVER' {
		  echo 'Loading Linux $KVER ...'
		  linux $kernel $cmdline
		  echo 'Loading initial ramdisk ...'
		  initrd $initrd
		}
	CFG
	debian_clean_root "$root"

	# The disk: an empty raw file, the file system at its partition's offset, the table, GRUB.
	truncate -s "$DI_SIZE" "$raw"
	size_bytes=$(stat -c %s "$raw")
	total_sectors=$((size_bytes / 512))
	# The partition runs to the last whole MiB, as sfdisk would align its end.
	part_sectors=$(((total_sectors - DISK_PART_START) / 2048 * 2048))
	log "disk image: mkfs.ext4 ($DI_SIZE, partition of $((part_sectors / 2048)) MiB at 1 MiB) and sfdisk"
	mkfs.ext4 -q -F -U "$uuid" -m 0 -d "$root" \
		-E "offset=$((DISK_PART_START * 512)),lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0" \
		"$raw" "$((part_sectors / 2))k"
	printf 'label: dos\nunit: sectors\n\nstart=%s, size=%s, type=83, bootable\n' "$DISK_PART_START" "$part_sectors" |
		sfdisk --quiet --no-reread --no-tell-kernel --wipe never --wipe-partitions never "$raw" &>/dev/null ||
		die "disk image: sfdisk could not write the partition table"
	# boot.img's code only: bytes 440.. are the disk signature and the partition table.
	dd if="$GRUB_DIR/boot.img" of="$raw" bs=440 count=1 conv=notrunc status=none
	dd if="$core" of="$raw" bs=512 seek=1 conv=notrunc status=none
	disk_verify "$raw" "$uuid"
	qemu-img convert -f raw -O qcow2 "$raw" "$out"
	rm -f "$raw" "$core" "$(dirname "$out")/early.cfg"
	# shellcheck disable=SC2034 # for the caller's messages
	DISK_UUID=$uuid
}

# disk_verify RAW UUID: the layout is what the firmware and GRUB expect.
disk_verify() {
	local raw=$1 uuid=$2 got
	[ "$(od -An -tx1 -j 510 -N 2 "$raw" | tr -d ' \n')" = 55aa ] || die "disk image: no MBR signature"
	# boot.img's kernel sector (offset 0x5c) must be 1, where core.img is.
	[ "$(od -An -tu8 -j $((0x5c)) -N 8 "$raw" | tr -d ' ')" = 1 ] || die "disk image: boot.img does not load sector 1"
	# diskboot.img's first blocklist entry (end of sector 1): start sector 2.
	[ "$(od -An -tu8 -j $((512 + 500)) -N 8 "$raw" | tr -d ' ')" = 2 ] || die "disk image: core.img's blocklist does not start at sector 2"
	got=$(sfdisk --dump "$raw" 2>/dev/null | awk -F'[=,]' '/start=/ { gsub(/ /, "", $2); print $2; exit }')
	[ "$got" = "$DISK_PART_START" ] || die "disk image: partition 1 starts at ${got:-nothing}, not $DISK_PART_START"
	got=$(blkid -p -O $((DISK_PART_START * 512)) -s UUID -o value "$raw" 2>/dev/null || true)
	[ "$got" = "$uuid" ] || die "disk image: no ext4 with UUID $uuid at the partition (found ${got:-none})"
}

# disk_publish TMP FILE STAMP: the qcow2 renamed into place (a temporary name beside FILE first,
# so the rename is atomic) and its stamp written.
disk_publish() {
	local tmp=$1 file=$2 stamp=$3 beside
	mkdir -p "$(dirname "$file")"
	beside=$(mktemp "$(dirname "$file")/.$(basename "$file").XXXXXX")
	mv -f "$tmp" "$beside" 2>/dev/null || cp "$tmp" "$beside"
	chmod 0644 "$beside"
	publish_file "$beside" "$file" "$stamp"
}

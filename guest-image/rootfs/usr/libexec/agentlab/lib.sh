# shellcheck shell=sh
# Helpers shared by the guest's boot scripts.
# shellcheck source=/dev/null # a guest path
. /usr/libexec/agentlab/env.sh

AGENTLAB_LOG=/var/log/agentlab-init.log

# log MESSAGE: one line on stdout (the console, ttyS0) and in the log file, with the uptime.
log() {
	read -r _up _ </proc/uptime
	printf 'agentlab-init: [%s] %s\n' "${_up:-?}" "$*"
	printf 'agentlab-init: [%s] %s\n' "${_up:-?}" "$*" >>"$AGENTLAB_LOG" 2>/dev/null
}

# link_virtio_ports [WAIT_TENTHS]: create /dev/virtio-ports/NAME -> ../vportXpY (udev's job
# elsewhere). A port's name arrives from the host shortly after the port appears, so wait up to
# WAIT_TENTHS tenths of a second (default 30) until every port of a virtio console has a name.
link_virtio_ports() {
	_tries=${1:-30}
	# 0x0003 is the virtio console device id; without one there is nothing to wait for.
	_console=0
	for _d in /sys/bus/virtio/devices/*/device; do
		[ -r "$_d" ] && read -r _id <"$_d" && [ "$_id" = 0x0003 ] && _console=1
	done
	[ "$_console" = 1 ] || return 0
	mkdir -p /dev/virtio-ports
	while :; do
		_missing=0 _found=0
		for _p in /sys/class/virtio-ports/vport*; do
			[ -e "$_p/name" ] || continue
			_found=1
			_name=
			read -r _name <"$_p/name"
			if [ -z "$_name" ]; then
				_missing=1
				continue
			fi
			ln -sfn "../${_p##*/}" "/dev/virtio-ports/$_name"
		done
		[ "$_found" = 1 ] && [ "$_missing" = 0 ] && return 0
		_tries=$((_tries - 1))
		[ "$_tries" -gt 0 ] || return 1
		sleep 0.1
	done
}

#!/usr/bin/env bash
# Boot the guest template once, the way the daemon does, and report how it went:
#   - time from QEMU spawn until qemu-ga answers guest-sync-delimited
#   - time until the guest's phone_home POST reaches a loopback receiver (through the guestfwd)
#   - the output of a guest-exec
#   - optionally (--upload MB) guest-to-host upload throughput through the guestfwd
# then quits QEMU through QMP and removes everything (unless --keep).
#
# The template comes from scripts/build-guest-image.sh (--template NAME: the one in images/NAME/,
# such as debian-12 from --distro debian). The last line is a summary to parse:
#   boot-guest: result template=NAME accel=tcg agent_s=N phone_home_s=N
# Nothing here needs root: the overlay is
# made with qemu-img and the vfat seed with mkfs.vfat -C and mcopy.
set -euo pipefail

usage() {
	cat <<EOF
Usage: $(basename "$0") [options]

Options:
  --accel tcg|kvm|auto  accelerator (default auto: KVM if a probe boot works, else TCG)
  --keep                keep the work directory (console.log, overlay, seed)
  --data-dir DIR        instead of \$AGENTLAB_DATA_DIR (default /var/lib/agentlab)
  --template NAME       boot images/NAME/ (default: the default template, images/)
  --memory MB           guest RAM (default 256; 1024 for a Debian template)
  --cores N             guest CPUs (default 1)
  --exec CMD            shell command to run in the guest through guest-exec
                        (default: git --version; ls /work; cat /etc/hostname)
  --upload MB           also time an upload of MB MiB from the guest through the guestfwd
  --timeout SECONDS     give up waiting for the guest agent, and for phone_home, after this
                        long (default 60; 300 for a Debian template)
  -h, --help            this text
EOF
}

log() { printf 'boot-guest: %s\n' "$*" >&2; }
die() {
	printf 'boot-guest: error: %s\n' "$*" >&2
	exit 1
}

ACCEL=auto
KEEP=0
DATA_DIR=${AGENTLAB_DATA_DIR:-/var/lib/agentlab}
EXEC_CMD='git --version; ls /work; cat /etc/hostname'
UPLOAD_MB=0
TIMEOUT=
TEMPLATE=
MEMORY=
CORES=1
while [ $# -gt 0 ]; do
	case $1 in
	--accel) ACCEL=${2:?}; shift 2 ;;
	--accel=*) ACCEL=${1#*=}; shift ;;
	--keep) KEEP=1; shift ;;
	--data-dir) DATA_DIR=${2:?}; shift 2 ;;
	--data-dir=*) DATA_DIR=${1#*=}; shift ;;
	--exec) EXEC_CMD=${2:?}; shift 2 ;;
	--exec=*) EXEC_CMD=${1#*=}; shift ;;
	--upload) UPLOAD_MB=${2:?}; shift 2 ;;
	--upload=*) UPLOAD_MB=${1#*=}; shift ;;
	--timeout) TIMEOUT=${2:?}; shift 2 ;;
	--timeout=*) TIMEOUT=${1#*=}; shift ;;
	--template) TEMPLATE=${2:?}; shift 2 ;;
	--template=*) TEMPLATE=${1#*=}; shift ;;
	--memory) MEMORY=${2:?}; shift 2 ;;
	--memory=*) MEMORY=${1#*=}; shift ;;
	--cores) CORES=${2:?}; shift 2 ;;
	--cores=*) CORES=${1#*=}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
case $ACCEL in tcg | kvm | auto) ;; *) die "--accel must be tcg, kvm or auto" ;; esac
case $UPLOAD_MB in *[!0-9]* | '') die "--upload needs a number of MiB" ;; esac

case $TEMPLATE in
*/* | .*) die "--template must be a folder name under the images folder" ;;
esac
IMAGES=$DATA_DIR/images${TEMPLATE:+/$TEMPLATE}
for f in vmlinuz initrd.img root.qcow2; do
	[ -e "$IMAGES/$f" ] || die "$IMAGES/$f is missing: run scripts/build-guest-image.sh${TEMPLATE:+ (--distro debian for debian-*)} first"
done
# A Debian template (systemd, python cloud-init) needs more memory and time than busybox.
DISTRO=$(sed -n 's/^ *"distro": *"\([a-z]*\)".*/\1/p' "$IMAGES/manifest.json" 2>/dev/null | head -n 1)
if [ "$DISTRO" = debian ]; then
	MEMORY=${MEMORY:-1024}
	TIMEOUT=${TIMEOUT:-300}
fi
MEMORY=${MEMORY:-256}
TIMEOUT=${TIMEOUT:-60}
case $MEMORY$CORES$TIMEOUT in *[!0-9]*) die "--memory, --cores and --timeout take numbers" ;; esac
for c in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils socat:socat python3:python3 \
	mkfs.vfat:dosfstools mcopy:mtools; do
	PATH="$PATH:/usr/sbin:/sbin" command -v "${c%%:*}" >/dev/null ||
		die "${c%%:*} not found (apt-get install ${c#*:})"
done
PYTHON=$(command -v python3)
KERNEL_CMDLINE=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["kernel_cmdline"])' \
	"$IMAGES/manifest.json" 2>/dev/null) ||
	KERNEL_CMDLINE="console=ttyS0 root=/dev/vda rw quiet panic=-1 acpi=noirq cryptomgr.notests"

# ---- the QEMU command line ----------------------------------------------------------------------
#
# This is the command line the daemon's local QEMU backend uses; keep the two in step.
#   ACCEL     tcg or kvm
#   IMAGES    the template directory (vmlinuz, initrd.img; the overlay's backing file)
#   DIR       the VM's own directory: overlay.qcow2, seed.img, qga.sock, qmp.sock, console.log,
#             qemu.pid. Unix socket paths must stay under 108 bytes, and a comma in any path
#             must be doubled inside -drive/-chardev/-netdev option strings.
#   PORT      the daemon's loopback guest listener, reached by the guest at 10.0.2.100:80
#   KERNEL_CMDLINE  the manifest's "kernel_cmdline" (the template says how it wants to boot):
#             console=ttyS0 root=/dev/vda rw quiet panic=-1 acpi=noirq cryptomgr.notests
# Changes from the first draft, and why:
#   acpi=noirq cryptomgr.notests on the kernel command line: PCI interrupt routing without
#   ACPI link devices (their AML takes most of a second under TCG) and no crypto self-tests;
#   virtio-rng-pci: the daemon gives every guest one (entropy at boot);
#   romfile= on virtio-net-pci: no iPXE option ROM to load and run;
#   socat -lf /dev/null: QEMU starts one socat per guest connection (so any number of
#   sequential or parallel connections work) with the connection as its stdin, stdout and
#   stderr, so socat's error messages (listener down, say) would reach the guest as if they
#   were the HTTP reply; -lf sends them nowhere and the guest sees a closed connection.
qemu_cmdline() { # ACCEL IMAGES DIR PORT -> array QEMU_CMD
	local accel=$1 images=$2 dir=$3 port=$4
	# shellcheck disable=SC2054 # the commas belong to QEMU option strings
	QEMU_CMD=(qemu-system-x86_64
		-accel "$accel"
		-m "$MEMORY" -smp "$CORES"
		-nodefaults -no-user-config -nographic
		-kernel "$images/vmlinuz" -initrd "$images/initrd.img"
		-append "$KERNEL_CMDLINE"
		-no-reboot
		-drive "file=$dir/overlay.qcow2,if=virtio,format=qcow2"
		-drive "file=$dir/seed.img,if=virtio,format=raw,readonly=on"
		-netdev "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:socat -lf /dev/null STDIO TCP:127.0.0.1:$port"
		-device virtio-net-pci,netdev=n0,romfile=
		-chardev "socket,path=$dir/qga.sock,server=on,wait=off,id=qga0"
		-device virtio-serial
		-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
		-qmp "unix:$dir/qmp.sock,server=on,wait=off"
		-serial "file:$dir/console.log"
		-device virtio-rng-pci
		-pidfile "$dir/qemu.pid")
}

# ---- helpers: QGA/QMP client and the loopback HTTP receiver -----------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/agentlab-boot.XXXXXX")
RECEIVER_PID=
cleanup() {
	local pid
	if [ -s "$WORK/qemu.pid" ]; then
		pid=$(cat "$WORK/qemu.pid")
		kill "$pid" 2>/dev/null || true
	fi
	[ -z "$RECEIVER_PID" ] || kill "$RECEIVER_PID" 2>/dev/null || true
	if [ "$KEEP" = 1 ]; then
		log "kept $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT

cat >"$WORK/helper.py" <<'PY'
import base64, http.server, json, os, random, socket, socketserver, sys, time

def now():
    return time.time()

# --- receiver: accepts any POST (and GET), prints one JSON line per request -----------------
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def _body(self):
        n = self.headers.get("Content-Length")
        first = last = None
        total = 0
        head = b""
        # No Content-Length: no body (nothing here sends chunked requests).
        remaining = int(n) if n is not None else 0
        while remaining > 0:
            chunk = self.rfile.read1(min(remaining, 1 << 20))
            if not chunk:
                break
            t = now()
            first = first or t
            last = t
            total += len(chunk)
            if len(head) < 4096:
                head += chunk[: 4096 - len(head)]
            remaining -= len(chunk)
        return total, head, first, last
    def _handle(self):
        t0 = now()
        total, head, first, last = self._body()
        rec = {"t": t0, "method": self.command, "path": self.path,
               "content_type": self.headers.get("Content-Type"), "length": total,
               "client": self.client_address[0]}
        if total <= 4096:
            rec["body"] = head.decode("utf-8", "replace")
        if first and last and last > first:
            rec["mb_per_s"] = round(total / (last - first) / 1e6, 2)
            rec["seconds"] = round(last - t0, 3)
        print(json.dumps(rec), flush=True)
        out = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_POST = do_PUT = do_GET = _handle

def serve(portfile):
    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
    srv = Server(("127.0.0.1", 0), Handler)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(portfile + ".tmp", portfile)
    srv.serve_forever()

# --- QGA ------------------------------------------------------------------------------------
class Agent:
    def __init__(self, path, deadline):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if now() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""

    def sync(self, deadline, attempt_timeout=0.5):
        # guest-sync-delimited: the reply is preceded by 0xFF; anything before it is stale.
        while now() < deadline:
            ident = random.randint(1, 2**31)
            self.s.sendall(json.dumps({"execute": "guest-sync-delimited",
                                       "arguments": {"id": ident}}).encode() + b"\n")
            end = min(deadline, now() + attempt_timeout)
            while now() < end:
                r = self.read_msg(end, after_ff=True)
                if r is not None and r.get("return") == ident:
                    return True
        return False

    def read_msg(self, deadline, after_ff=False):
        while True:
            if after_ff:
                i = self.buf.find(b"\xff")
                if i < 0:
                    self.buf = b""
                else:
                    self.buf = self.buf[i + 1:]
                    after_ff = False
            if not after_ff:
                j = self.buf.find(b"\n")
                if j >= 0:
                    line, self.buf = self.buf[:j], self.buf[j + 1:]
                    line = line.strip()
                    if line:
                        try:
                            return json.loads(line)
                        except ValueError:
                            pass
                    continue
            left = deadline - now()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                data = self.s.recv(65536)
            except socket.timeout:
                return None
            if not data:
                raise EOFError("agent socket closed")
            self.buf += data

    def call(self, cmd, args=None, timeout=30):
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        r = self.read_msg(now() + timeout)
        if r is None:
            raise TimeoutError(cmd)
        if "error" in r:
            raise RuntimeError("%s: %s" % (cmd, r["error"]))
        return r["return"]

def wait_agent(sock, t0, timeout):
    # QEMU may drop the client connection while the guest's end of the port is not open yet
    # (a slow boot): connect again until the deadline instead of giving up.
    deadline = now() + timeout
    while now() < deadline:
        try:
            a = Agent(sock, deadline)
            if a.sync(deadline):
                print("%.2f" % (now() - t0))
                return 0
        except (OSError, EOFError):
            time.sleep(0.2)
    return 1

def guest_exec(sock, command, timeout):
    a = Agent(sock, now() + 5)
    if not a.sync(now() + 10):
        print("agent does not answer", file=sys.stderr)
        return 1
    t = now()
    pid = a.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True})["pid"]
    while True:
        st = a.call("guest-exec-status", {"pid": pid})
        if st.get("exited"):
            break
        if now() - t > timeout:
            print("guest-exec timed out", file=sys.stderr)
            return 1
        time.sleep(0.1)
    sys.stdout.write(base64.b64decode(st.get("out-data", "")).decode("utf-8", "replace"))
    sys.stderr.write(base64.b64decode(st.get("err-data", "")).decode("utf-8", "replace"))
    print("[guest-exec: exit %s in %.2f s]" % (st.get("exitcode"), now() - t), file=sys.stderr)
    return st.get("exitcode") or 0

def wait_request(logfile, path_prefix, t0, timeout):
    deadline = now() + timeout
    while now() < deadline:
        try:
            with open(logfile) as f:
                for line in f:
                    r = json.loads(line)
                    if r["path"].startswith(path_prefix):
                        print("%.2f %s" % (r["t"] - t0, json.dumps(r)))
                        return 0
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    return 1

def qmp_quit(sock):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rwb")
    f.readline()  # greeting
    for cmd in ("qmp_capabilities", "quit"):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        f.readline()
    return 0

if __name__ == "__main__":
    c, args = sys.argv[1], sys.argv[2:]
    if c == "serve":
        serve(args[0])
    elif c == "wait-agent":
        sys.exit(wait_agent(args[0], float(args[1]), float(args[2])))
    elif c == "exec":
        sys.exit(guest_exec(args[0], args[1], float(args[2])))
    elif c == "wait-request":
        sys.exit(wait_request(args[0], args[1], float(args[2]), float(args[3])))
    elif c == "qmp-quit":
        sys.exit(qmp_quit(args[0]))
    sys.exit("unknown command " + c)
PY
helper() { "$PYTHON" "$WORK/helper.py" "$@"; }

# ---- seed, overlay, receiver --------------------------------------------------------------------

INSTANCE_ID=boot-$(date +%s)-$$
# The shapes the daemon writes (see yaml2tree.awk): double-quoted strings, "|" block scalars.
cat >"$WORK/meta-data" <<EOF
instance-id: "$INSTANCE_ID"
local-hostname: "agentlab-dev"
EOF
cat >"$WORK/user-data" <<'EOF'
#cloud-config
hostname: "agentlab-dev"
write_files:
  - path: "/etc/agentlab/bootstrap.json"
    permissions: "0600"
    content: |
      {"url": "http://10.0.2.100", "token": "dev-token-not-secret"}
  - path: "/etc/agentlab/motd"
    permissions: "0644"
    content: |
      first line
        indented line with "quotes" and a # hash

      after an empty line
runcmd:
  - "mkdir -p /work && echo 'written by runcmd' > /work/runcmd.txt"
phone_home:
  url: "http://10.0.2.100/phone-home/$INSTANCE_ID"
  post: ["instance_id", "hostname"]
  tries: 10
EOF
mkfs.vfat -n cidata -C "$WORK/seed.img" 1024 >/dev/null 2>&1 # "lowercase label" warning
mcopy -i "$WORK/seed.img" "$WORK/meta-data" "$WORK/user-data" ::

"$PYTHON" "$WORK/helper.py" serve "$WORK/port" >>"$WORK/requests.log" 2>"$WORK/receiver.err" &
RECEIVER_PID=$!
for _ in $(seq 100); do [ -s "$WORK/port" ] && break; sleep 0.05; done
PORT=$(cat "$WORK/port")

# ---- boot -------------------------------------------------------------------------------------

kvm_usable() { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }

boot() { # ACCEL TIMEOUT -> AGENT_SECONDS, T0; returns 1 if the agent never answered
	qemu_cmdline "$1" "$IMAGES" "$WORK" "$PORT"
	rm -f "$WORK/qemu.pid" "$WORK/console.log" "$WORK/overlay.qcow2"
	: >"$WORK/requests.log" # the receiver appends
	# A fresh overlay per boot, on the resolved template path (see build-guest-image.sh).
	qemu-img create -q -f qcow2 -F qcow2 -b "$(readlink -f "$IMAGES/root.qcow2")" "$WORK/overlay.qcow2"
	log "spawning: ${QEMU_CMD[*]}"
	T0=$(date +%s.%N)
	"${QEMU_CMD[@]}" 2>"$WORK/qemu.err" &
	QEMU_PID=$!
	if AGENT_SECONDS=$(helper wait-agent "$WORK/qga.sock" "$T0" "$2"); then
		return 0
	fi
	kill "$QEMU_PID" 2>/dev/null || true
	wait "$QEMU_PID" 2>/dev/null || true
	return 1
}

if [ "$ACCEL" = auto ]; then
	if kvm_usable && boot kvm 20; then
		ACCEL=kvm
	else
		kvm_usable && log "KVM probe: no agent within 20 s, falling back to TCG"
		ACCEL=tcg
	fi
fi
if [ -z "${AGENT_SECONDS:-}" ]; then
	if [ "$ACCEL" = kvm ] && ! kvm_usable; then
		die "/dev/kvm is not usable by this user"
	fi
	if ! boot "$ACCEL" "$TIMEOUT"; then
		log "console log:"
		sed 's/^/  | /' "$WORK/console.log" >&2 || true
		sed 's/^/  qemu: /' "$WORK/qemu.err" >&2 || true
		die "the guest agent did not answer within $TIMEOUT s ($ACCEL)"
	fi
fi
log "accel $ACCEL: guest agent answered guest-sync-delimited $AGENT_SECONDS s after spawn"

PH_SECONDS=none
if PH=$(helper wait-request "$WORK/requests.log" /phone-home/ "$T0" "$TIMEOUT"); then
	PH_SECONDS=${PH%% *}
	log "phone_home arrived ${PH%% *} s after spawn: $(printf '%s' "${PH#* }" |
		"$PYTHON" -c 'import json,sys; r=json.load(sys.stdin); print(r["method"], r["path"], r["content_type"], repr(r.get("body")))')"
else
	log "phone_home did not arrive within $TIMEOUT s"
fi
# The daemon gets many requests per VM through the one guestfwd: check that sequential and
# parallel connections all arrive.
# busybox has wget, the Debian template curl.
# shellcheck disable=SC2016 # $1 and $i are the guest shell's
GET='get() { if command -v wget >/dev/null; then wget -q -O /dev/null "$1"; else curl -fsS -o /dev/null "$1"; fi; }'
# shellcheck disable=SC2016
helper exec "$WORK/qga.sock" "$GET"'
	for i in 1 2 3 4 5; do get http://10.0.2.100/seq/$i; done
	get http://10.0.2.100/par/1 & get http://10.0.2.100/par/2 & wait' 60 \
	>/dev/null 2>&1 || true
seq_n=$(grep -c '"path": "/seq/' "$WORK/requests.log" || true)
par_n=$(grep -c '"path": "/par/' "$WORK/requests.log" || true)
log "guestfwd: $seq_n/5 sequential and $par_n/2 parallel requests received"

log "guest-exec: /bin/sh -c '$EXEC_CMD'"
helper exec "$WORK/qga.sock" "$EXEC_CMD" 60 | sed 's/^/  | /' >&2 || log "guest-exec failed"
helper exec "$WORK/qga.sock" 'cat /run/cloud-init/result.json' 10 |
	sed 's/^/  result.json: /' >&2 || log "cannot read result.json"

if [ "$UPLOAD_MB" -gt 0 ]; then
	# One process sending a file, as the runner will. The file is made first (slowly: a pipeline
	# under TCG); it has no NUL bytes because busybox wget --post-file stops at the first one.
	# A "dd | nc" pipeline is not a fair test: under TCG it is bound by the pipe and small
	# writes in the guest (about 2 MB/s here), not by the network path.
	log "upload: making a ${UPLOAD_MB} MiB file in the guest"
	helper exec "$WORK/qga.sock" "tr '\\0' a </dev/zero | head -c $((UPLOAD_MB * 1048576)) >/work/.upload" 900 \
		>/dev/null 2>&1 || log "upload: cannot make the file"
	start=$(date +%s.%N)
	helper exec "$WORK/qga.sock" "if command -v wget >/dev/null; then wget -q -O /dev/null --post-file /work/.upload http://10.0.2.100/upload; else curl -sS -o /dev/null --data-binary @/work/.upload http://10.0.2.100/upload; fi; rm -f /work/.upload" 900 \
		>/dev/null 2>&1 || log "upload command failed"
	end=$(date +%s.%N)
	if UP=$(helper wait-request "$WORK/requests.log" /upload "$T0" 5); then
		log "upload: $(printf '%s' "${UP#* }" | "$PYTHON" -c 'import json,sys; r=json.load(sys.stdin); print("%d bytes received, %s MB/s at the receiver" % (r["length"], r.get("mb_per_s")))'), $(awk -v s="$start" -v e="$end" -v m="$UPLOAD_MB" 'BEGIN { printf "%.1f s for the whole guest-exec (%.1f MB/s)", e - s, m * 1.048576 / (e - s) }')"
	else
		log "upload: nothing received"
	fi
fi

helper qmp-quit "$WORK/qmp.sock" >/dev/null 2>&1 || log "QMP quit failed"
wait "$QEMU_PID" 2>/dev/null || true
log "QEMU exited"
log "result template=${TEMPLATE:-default} accel=$ACCEL agent_s=$AGENT_SECONDS phone_home_s=$PH_SECONDS"

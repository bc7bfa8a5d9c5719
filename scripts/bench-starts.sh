#!/usr/bin/env bash
# Snapshot starts against cold boots, side by side in one run on this host: starts agentlabd on
# the local QEMU backend in a scratch folder (release binaries, the guest image of
# $AGENTLAB_DATA_DIR, default target/guest-image), makes the template snapshot once, then runs
# scripts/benchmark.sh with --start snapshot and --start cold, first N jobs one after another, then
# P jobs submitted at once, and prints each table (submit → run phase p50/p95, each phase's
# median, time until all P run, jobs/hour, PSS per sandbox) and the snapshot's size and making
# time.
#
#   scripts/bench-starts.sh [--iterations N (10)] [--parallel P (8)] [--profile NAME (yolo-ephemeral)]
#                           [--governor off]
#
# The tuning is the shipped default with room for P sandboxes at once: admission.max_concurrent
# and the boot cap at P, vCPUs per core so that P one-vCPU guests fit, and the disk rule off
# (the test VMs' overlays take megabytes). Guests are clamped to 1 vCPU and 512 MB. With
# --governor off the host's pressure signals do not hold the queue either (admission by
# max_concurrent alone), which shows what the backend itself can start.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

iterations=10
parallel=8
profile=yolo-ephemeral
governor=on
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --governor) governor=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "bench-starts: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$iterations" "$parallel"; do
  case "$n" in ''|*[!0-9]*|0) echo "bench-starts: counts must be positive numbers" >&2; exit 2 ;; esac
done

command -v curl >/dev/null || { echo "bench-starts: curl is needed" >&2; exit 2; }
bin=$root/target/release
for b in agentlabd agentlab agentlab-runner; do
  [ -x "$bin/$b" ] || { echo "bench-starts: $bin/$b is missing: cargo build --release --bins" >&2; exit 2; }
done
images=${AGENTLAB_DATA_DIR:-$root/target/guest-image}/images
[ -e "$images/root.qcow2" ] || {
  echo "bench-starts: no guest image in $images: AGENTLAB_DATA_DIR=$(dirname "$images") scripts/build-guest-image.sh --runner $bin/agentlab-runner" >&2
  exit 2
}

work=$(mktemp -d "${TMPDIR:-/tmp}/agentlab-bench.XXXXXX")
mkdir -p "$work/tuning"
sed -e "s/^  max_concurrent: [0-9]*/  max_concurrent: $parallel/" \
    -e "s/vcpus_per_core: [0-9]*/vcpus_per_core: $parallel/" \
    -e 's/disk_min_free_percent: 20 /disk_min_free_percent: null/' \
    -e "s/^    initial: 1 /    initial: $parallel /" \
    -e "s/^    max: 3$/    max: $parallel/" \
    tuning/default.yaml > "$work/tuning/default.yaml"
case "$governor" in
  on) ;;
  off) sed -i '/^governor:/,/^[a-z]/ s/^  enabled: true/  enabled: false/' "$work/tuning/default.yaml"
       [ "$(grep -c '^  enabled: false' "$work/tuning/default.yaml")" = 1 ] ||
         { echo "bench-starts: could not turn the governor off" >&2; exit 1; } ;;
  *) echo "bench-starts: --governor takes on or off" >&2; exit 2 ;;
esac
for want in "max_concurrent: $parallel" "vcpus_per_core: $parallel" "initial: $parallel" "max: $parallel" \
  "disk_min_free_percent: null"; do
  grep -q "$want" "$work/tuning/default.yaml" ||
    { echo "bench-starts: could not set \`$want\` in the benchmark's tuning" >&2; exit 1; }
done
cat > "$work/config.yaml" <<YAML
data_dir: $work/data
socket_path: $work/agentlabd.sock
metrics_listen: 127.0.0.1:0
guest_listen: 127.0.0.1:18858
profiles_dir: $root/profiles
tuning_dir: $work/tuning
backend: qemu
qemu:
  images_dir: $images
  accel: auto
  memory_mb_cap: 512
  cores_cap: 1
YAML
"$bin/agentlabd" --config "$work/config.yaml" 2> "$work/agentlabd.log" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true; rm -rf "$work"' EXIT
export AGENTLAB_SOCKET=$work/agentlabd.sock AGENTLAB_CLI=$bin/agentlab
for _ in $(seq 100); do
  "$bin/agentlab" status >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$work/agentlabd.log" >&2; exit 1; }
  sleep 0.1
done

echo "== making the template snapshot (one job, --start snapshot)"
"$bin/agentlab" --json job run --profile "$profile" --task "make the snapshot" --command true \
  --start snapshot --wait > "$work/first.json"
first=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$work/first.json")
curl -s --unix-socket "$AGENTLAB_SOCKET" "http://agentlabd/v1/jobs/$first/events" |
  grep -o 'snapshot [0-9a-f]\{16\} made in[^"]*' || echo "bench-starts: no snapshot was made" >&2
du -sh --apparent-size "$work"/data/snapshots/* 2>/dev/null | sed 's/^/apparent: /'
du -sh "$work"/data/snapshots/* 2>/dev/null | sed 's/^/on disk:  /'
ls -l "$work"/data/snapshots/*/state 2>/dev/null | awk '{print "device state: " $5 " bytes"}'

for run in "--iterations $iterations" "--parallel $parallel"; do
  for start in snapshot cold; do
    echo
    echo "== scripts/benchmark.sh $run --start $start --profile $profile"
    # shellcheck disable=SC2086 # $run is two words on purpose
    scripts/benchmark.sh $run --start "$start" --profile "$profile"
  done
done

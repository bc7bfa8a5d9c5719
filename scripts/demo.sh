#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a real job in a real VM: installs the packages,
# builds AgentLab, builds the guest image, starts agentlabd on the local QEMU backend in a scratch
# folder, runs a job against a small git repository (the template is booted once and snapshotted
# first), then a second job restored from that snapshot whose change comes back as a branch of the
# repository, and shows their result, output, artifact, the change and how long each phase took. Everything lives under AGENTLAB_DEMO_DIR (default target/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=${AGENTLAB_DEMO_DIR:-$root/target/demo}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

step "Installing packages (QEMU, guest image ingredients, Rust if missing)"
scripts/install-deps.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

step "Building agentlabd, agentlab and agentlab-runner (release)"
cargo build --release --bins
bin=$root/target/release

step "Building the guest image"
mkdir -p "$demo/data"
AGENTLAB_DATA_DIR=$demo/data scripts/build-guest-image.sh --runner "$bin/agentlab-runner"

step "Starting agentlabd (local QEMU backend) in $demo"
mkdir -p "$demo/tuning"
# The shipped tuning, except that the storage keeps 5% free instead of a production host's 20%:
# the demo's one small VM takes megabytes, and a development machine's disk is often fuller than a
# sandbox host's. (Below that the job would fail at once, naming the disk rule and its numbers.)
sed 's/disk_min_free_percent: 20 /disk_min_free_percent: 5  /' tuning/default.yaml > "$demo/tuning/default.yaml"
grep -q 'disk_min_free_percent: 5 ' "$demo/tuning/default.yaml" ||
  { echo "demo: could not set disk_min_free_percent in the demo's tuning" >&2; exit 1; }
# The daemon bundles a job's host repository only from under repo_roots: the demo's lives in
# $demo/repos (made below, once the daemon is up).
mkdir -p "$demo/repos"
cat > "$demo/config.yaml" <<YAML
data_dir: $demo/data
repo_roots: [$demo/repos]
socket_path: $demo/agentlabd.sock
metrics_listen: 127.0.0.1:0
guest_listen: 127.0.0.1:18848
profiles_dir: $root/profiles
tuning_dir: $demo/tuning
backend: qemu
qemu:
  accel: auto
  # The profiles are sized for real hosts; keep the demo VM small.
  memory_mb_cap: 512
  cores_cap: 1
YAML
"$bin/agentlabd" --config "$demo/config.yaml" --check-config
"$bin/agentlabd" --config "$demo/config.yaml" 2> "$demo/agentlabd.log" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
export AGENTLAB_SOCKET=$demo/agentlabd.sock
for _ in $(seq 100); do
  "$bin/agentlab" status >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$demo/agentlabd.log" >&2; exit 1; }
  sleep 0.1
done

step "Making a small git repository to work on"
repo=$demo/repos/app
rm -rf "$repo" && mkdir -p "$repo"
printf 'AgentLab demo repository\n' > "$repo/README.md"
printf 'def add(a, b):\n    return a + b\n' > "$repo/calc.py"
git -C "$repo" init -q -b main
git -C "$repo" -c user.name=demo -c user.email=demo@example.invalid add .
git -C "$repo" -c user.name=demo -c user.email=demo@example.invalid commit -q -m "demo repository"

step "Running a job in a fresh VM (it boots the template once and snapshots it first)"
set +e
# The command is expanded by the guest's shell, not this one.
# shellcheck disable=SC2016
"$bin/agentlab" job run --profile balanced --repo "$repo" \
  --task "count the lines of every file and write a report" \
  --command 'echo "working in $(pwd) on: $AGENTLAB_TASK"; cat README.md; mkdir -p out; wc -l README.md calc.py > out/report.txt; echo "report written"' \
  --artifact 'out/**' --follow
status=$?
set -e
id=$("$bin/agentlab" --json job list --limit 1 | grep -o '"id":"[^"]*"' | head -n 1 | cut -d'"' -f4)

step "The job, and how long each phase took"
"$bin/agentlab" job show "$id"

step "A second job: restored from the template snapshot the first one made; its change comes back as a branch"
# shellcheck disable=SC2016
"$bin/agentlab" job run --profile balanced --repo "$repo" --result-branch \
  --task "add a subtract function" \
  --command 'echo "restored sandbox $(hostname), its clock at $(date -u +%T)"; printf "\ndef sub(a, b):\n    return a - b\n" >> calc.py' \
  --follow
second=$("$bin/agentlab" --json job list --limit 1 | grep -o '"id":"[^"]*"' | head -n 1 | cut -d'"' -f4)

step "The agent's change: branch agentlab/$second in $repo (nothing else there changed)"
git -C "$repo" log --oneline "main..agentlab/$second"
"$bin/agentlab" job diff "$second"

step "Its artifact, downloaded and checked against its sha256"
"$bin/agentlab" job artifacts "$id" --download "$demo/artifacts"
cat "$demo/artifacts/out/report.txt"

step "Nothing is left behind"
"$bin/agentlab" sandbox list
exit "$status"

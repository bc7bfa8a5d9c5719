#!/usr/bin/env bash
# Runs N jobs one after another (each a cold start: a fresh VM) against a running agentlabd and
# prints the provisioning table of the performance document (median, p95 and p99 of each phase,
# and the total), plus the job overhead, all from the daemon's own phase timings.
#
#   scripts/benchmark.sh --iterations 10 --profile yolo-ephemeral [--command 'true'] [--socket PATH]
set -euo pipefail

iterations=10
profile=yolo-ephemeral
command=true
agentlab=${AGENTLAB_CLI:-agentlab}
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --command) command=$2; shift 2 ;;
    --socket) export AGENTLAB_SOCKET=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "benchmark: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$iterations" in ''|*[!0-9]*|0) echo "benchmark: --iterations needs a positive number" >&2; exit 2 ;; esac
command -v "$agentlab" >/dev/null || { echo "benchmark: $agentlab not found (set AGENTLAB_CLI)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "benchmark: python3 is needed for the report" >&2; exit 2; }

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for i in $(seq "$iterations"); do
  # --wait prints the finished job; its exit code follows the job's status, which the report counts.
  "$agentlab" --json job run --profile "$profile" --task "benchmark run $i" --command "$command" --wait \
    >> "$results" || true
  echo >> "$results"
  printf 'benchmark: %d/%d done\n' "$i" "$iterations" >&2
done

python3 - "$results" "$profile" <<'PY'
import json, sys

jobs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
profile = sys.argv[2]

def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    at = (len(values) - 1) * p
    lo, hi = int(at), min(int(at) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (at - lo)

def row(name, values, note=""):
    print(f"| {name} | {pct(values, .5):.2f}s | {pct(values, .95):.2f}s | {pct(values, .99):.2f}s | {note} |")

def phase(job, name):
    runs = [p for p in job.get("phases", []) if p["phase"] == name and p.get("result") == "ok"]
    return runs[-1]["duration_seconds"] if runs else None

ok = [j for j in jobs if j["status"] == "COMPLETED"]
print(f"\nProvisioning, {len(ok)}/{len(jobs)} jobs completed, profile {profile}\n")
print("| Operation | Median | P95 | P99 | Notes |\n|---|---|---|---|---|")
names = {"clone": "VM clone", "start": "VM start", "cloud_init": "Cloud-init",
         "guest_agent": "Guest agent ready"}
for key, label in names.items():
    row(label, [phase(j, key) for j in ok if phase(j, key) is not None])
prov = [sum(phase(j, k) for k in names) for j in ok if all(phase(j, k) is not None for k in names)]
row("**Total provisioning**", prov, "clone start → guest agent answers")

print(f"\nJob overhead (command: the benchmark's own, near zero)\n")
print("| Phase | Median | P95 | P99 | Notes |\n|---|---|---|---|---|")
queue = [(j["started_at_ms"] - j["created_at_ms"]) / 1000 for j in ok if j.get("started_at_ms")]
row("Job queue → provision", queue, "submit → admitted")
cold = []
for j in ok:
    runs = [p for p in j["phases"] if p["phase"] == "run"]
    if runs:
        cold.append((runs[-1]["started_at_ms"] - j["created_at_ms"]) / 1000)
row("Submit → run phase (cold start)", cold, "the runner is started in the guest")
row("Run (runner: bootstrap, checkout, command)", [phase(j, "run") for j in ok if phase(j, "run") is not None])
row("Artifact upload", [phase(j, "upload") for j in ok if phase(j, "upload") is not None])
row("Destroy", [phase(j, "destroy") for j in ok if phase(j, "destroy") is not None])
total = [(j["finished_at_ms"] - j["created_at_ms"]) / 1000 for j in ok if j.get("finished_at_ms")]
row("**Total overhead**", total, "submit → job finished, VM gone")
PY

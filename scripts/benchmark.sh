#!/usr/bin/env bash
# Runs jobs against a running agentlabd and reports, from the daemon's own phase timings, how
# long sandboxes take to provision and what a job costs on top of its command.
#
#   scripts/benchmark.sh [--iterations N | --parallel N] [--start cold|snapshot|auto]
#                        [--profile NAME] [--command CMD] [--socket PATH] [--json]
#
# Sequential (the default, --iterations N, 10): N jobs one after another, each waited for. Prints
#   the provisioning table of the performance document (median, p95 and p99 of each phase, and
#   the total), the job overhead table, and submit → run phase p50/p95 with each phase's median.
# Parallel (--parallel N): N jobs submitted at once (no --wait), then polled until all are
#   finished. Prints the time from the first submit until all N were in their run phase, submit →
#   run phase p50/p95 over the N, the total wall time (first submit → last job finished) and
#   jobs/hour = N / wall time × 3600, and the same tables.
# --start is passed on to `agentlab job run --start` (cold: a fresh boot; snapshot: restored from
#   the template's booted snapshot; auto: the daemon's choice); left out, the daemon's default.
# Memory: while the jobs run, `agentlab status` is sampled every second; where the daemon reports
#   what sandboxes really hold (governor.memory), the median and peak PSS per sandbox in its run
#   phase and the peak total PSS against the memory committed to sandboxes are printed.
# --json: print one JSON object with every figure instead of the tables.
#
# Needs `agentlab` on PATH (or AGENTLAB_CLI) and python3 for the report.
set -euo pipefail

mode=sequential
count=10
profile=yolo-ephemeral
command=true
start=
json=false
agentlab=${AGENTLAB_CLI:-agentlab}
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) mode=sequential; count=$2; shift 2 ;;
    --parallel) mode=parallel; count=$2; shift 2 ;;
    --start) start=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --command) command=$2; shift 2 ;;
    --socket) export AGENTLAB_SOCKET=$2; shift 2 ;;
    --json) json=true; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "benchmark: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$count" in ''|*[!0-9]*|0) echo "benchmark: --iterations/--parallel need a positive number" >&2; exit 2 ;; esac
case "$start" in ''|cold|snapshot|auto) ;; *) echo "benchmark: --start is cold, snapshot or auto" >&2; exit 2 ;; esac
command -v "$agentlab" >/dev/null || { echo "benchmark: $agentlab not found (set AGENTLAB_CLI)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "benchmark: python3 is needed for the report" >&2; exit 2; }

run_args=(--profile "$profile" --command "$command")
[ -n "$start" ] && run_args+=(--start "$start")

work=$(mktemp -d)
sampler=
cleanup() {
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# One `agentlab status` a second, one JSON document a line, until the report starts.
(
  while :; do
    if line=$("$agentlab" --json status 2>/dev/null); then
      printf '%s\n' "$line" | tr -d '\n' >> "$work/samples"
      echo >> "$work/samples"
    fi
    sleep 1
  done
) &
sampler=$!

if [ "$mode" = sequential ]; then
  for i in $(seq "$count"); do
    # --wait prints the finished job; its exit code follows the job's status, which the report counts.
    "$agentlab" --json job run "${run_args[@]}" --task "benchmark run $i" --wait \
      | tr -d '\n' >> "$work/jobs" || true
    echo >> "$work/jobs"
    printf 'benchmark: %d/%d done\n' "$i" "$count" >&2
  done
else
  # All at once: one CLI per job, in parallel, so that the submissions do not queue behind each
  # other on a host the first sandboxes are already keeping busy.
  submitters=()
  for i in $(seq "$count"); do
    "$agentlab" --json job run "${run_args[@]}" --task "benchmark run $i" > "$work/submitted.$i" &
    submitters+=("$!")
  done
  wait "${submitters[@]}"
  for i in $(seq "$count"); do
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$work/submitted.$i" >> "$work/ids"
  done
  printf 'benchmark: %d jobs submitted\n' "$count" >&2
  # Poll until every job is terminal; the last answer of each is what the report reads.
  declare -A finished=()
  while [ "${#finished[@]}" -lt "$count" ]; do
    sleep 1
    while read -r id; do
      [ -n "${finished[$id]:-}" ] && continue
      shown=$("$agentlab" --json job show "$id" | tr -d '\n') || continue
      status=$(printf '%s' "$shown" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
      # Every status but QUEUED and RUNNING is terminal.
      case "$status" in
        QUEUED|RUNNING) ;;
        *)
          finished[$id]=1
          printf '%s\n' "$shown" >> "$work/jobs"
          printf 'benchmark: %d/%d finished\n' "${#finished[@]}" "$count" >&2 ;;
      esac
    done < "$work/ids"
  done
fi
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=

touch "$work/samples"
python3 - "$work/jobs" "$work/samples" "$profile" "$mode" "${start:-default}" "$json" <<'PY'
import json, sys

jobs_file, samples_file, profile, mode, start, as_json = sys.argv[1:7]
jobs = [json.loads(line) for line in open(jobs_file) if line.strip()]
samples = []
for line in open(samples_file):
    try:
        samples.append(json.loads(line))
    except ValueError:
        pass
as_json = as_json == "true"
MB = 1024 * 1024

def pct(values, p):
    values = sorted(values)
    if not values:
        return None
    at = (len(values) - 1) * p
    lo, hi = int(at), min(int(at) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (at - lo)

def fmt(value, unit="s"):
    return "-" if value is None else f"{value:.2f}{unit}"

def phase(job, name):
    runs = [p for p in job.get("phases", []) if p["phase"] == name and p.get("result") == "ok"]
    return runs[-1]["duration_seconds"] if runs else None

def run_started_ms(job):
    runs = [p for p in job.get("phases", []) if p["phase"] == "run"]
    return runs[-1]["started_at_ms"] if runs else None

ok = [j for j in jobs if j["status"] == "COMPLETED"]
report = {"mode": mode, "start": start, "profile": profile, "jobs": len(jobs),
          "completed": len(ok), "phases": {}}
tables = []

def table(title, rows):
    tables.append((title, rows))

names = {"clone": "VM clone", "start": "VM start", "cloud_init": "Cloud-init",
         "guest_agent": "Guest agent ready"}
rows = []
for key, label in names.items():
    values = [phase(j, key) for j in ok if phase(j, key) is not None]
    rows.append((label, values, ""))
    report["phases"][key] = {"p50": pct(values, .5), "p95": pct(values, .95), "n": len(values)}
prov = [sum(phase(j, k) for k in names) for j in ok if all(phase(j, k) is not None for k in names)]
rows.append(("**Total provisioning**", prov, "clone start → guest agent answers"))
report["provisioning"] = {"p50": pct(prov, .5), "p95": pct(prov, .95)}
table(f"Provisioning, {len(ok)}/{len(jobs)} jobs completed, profile {profile}, start {start}", rows)

queue = [(j["started_at_ms"] - j["created_at_ms"]) / 1000 for j in ok if j.get("started_at_ms")]
to_run = [(run_started_ms(j) - j["created_at_ms"]) / 1000 for j in ok if run_started_ms(j)]
rows = [("Job queue → provision", queue, "submit → admitted"),
        (f"Submit → run phase ({start} start)", to_run, "the runner is started in the guest")]
for key, label in [("run", "Run (runner: bootstrap, checkout, command)"),
                   ("upload", "Artifact upload"), ("destroy", "Destroy")]:
    values = [phase(j, key) for j in ok if phase(j, key) is not None]
    rows.append((label, values, ""))
    report["phases"][key] = {"p50": pct(values, .5), "p95": pct(values, .95), "n": len(values)}
total = [(j["finished_at_ms"] - j["created_at_ms"]) / 1000 for j in ok if j.get("finished_at_ms")]
rows.append(("**Total overhead**", total, "submit → job finished, VM gone"))
table("Job overhead (command: the benchmark's own, near zero)", rows)
report["submit_to_run"] = {"p50": pct(to_run, .5), "p95": pct(to_run, .95), "n": len(to_run)}
report["overhead"] = {"p50": pct(total, .5), "p95": pct(total, .95)}

summary = []
if mode == "parallel" and jobs:
    first_submit = min(j["created_at_ms"] for j in jobs)
    run_starts = [run_started_ms(j) for j in jobs]
    all_running = (max(run_starts) - first_submit) / 1000 if all(run_starts) else None
    ends = [j.get("finished_at_ms") for j in jobs]
    wall = (max(ends) - first_submit) / 1000 if all(ends) else None
    per_hour = len(jobs) / wall * 3600 if wall else None
    report["parallel"] = {"n": len(jobs), "first_submit_to_all_running_s": all_running,
                          "wall_s": wall, "jobs_per_hour": per_hour}
    summary += [f"First submit → all {len(jobs)} in their run phase: {fmt(all_running)}"
                + ("" if all(run_starts) else " (some never reached it)"),
                f"Total wall time (first submit → last finished): {fmt(wall)}",
                f"Throughput: {fmt(per_hour, '')} jobs/hour"]
summary.append(f"Submit → run phase: p50 {fmt(report['submit_to_run']['p50'])}, "
               f"p95 {fmt(report['submit_to_run']['p95'])} over {len(to_run)}")
summary.append("Phase medians: " + ", ".join(
    f"{k} {fmt(v['p50'])}" for k, v in report["phases"].items()))

# What sandboxes really held, where the daemon measured it: sandboxes past their boot phases.
pss, peak_total, peak_committed = [], None, None
for sample in samples:
    memory = ((sample or {}).get("governor") or {}).get("memory") or {}
    measured = [s for s in memory.get("sandboxes", [])
                if s.get("pss_bytes") is not None and not s.get("booting")]
    pss += [s["pss_bytes"] / MB for s in measured]
    if memory.get("pss_bytes") is not None and (peak_total is None or memory["pss_bytes"] / MB > peak_total):
        peak_total = memory["pss_bytes"] / MB
        peak_committed = memory.get("committed_mb")
if pss:
    report["memory"] = {"pss_mb_median": pct(pss, .5), "pss_mb_max": max(pss),
                        "observations": len(pss), "peak_total_pss_mb": peak_total,
                        "committed_mb_at_peak": peak_committed}
    summary.append(f"PSS per running sandbox: median {pct(pss, .5):.0f} MB, "
                   f"max {max(pss):.0f} MB over {len(pss)} observations; peak total "
                   f"{peak_total:.0f} MB PSS against {peak_committed} MB committed")
else:
    summary.append("PSS per sandbox: not reported by this daemon's backend")

if as_json:
    print(json.dumps(report, sort_keys=True))
    sys.exit(0)
for title, rows in tables:
    print(f"\n{title}\n")
    print("| Operation | Median | P95 | P99 | Notes |\n|---|---|---|---|---|")
    for name, values, note in rows:
        print(f"| {name} | {fmt(pct(values, .5))} | {fmt(pct(values, .95))} | {fmt(pct(values, .99))} | {note} |")
print()
for line in summary:
    print(line)
PY

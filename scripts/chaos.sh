#!/usr/bin/env bash
# The disruption campaign (tests/chaos.rs) in release mode, for large runs.
#
#   scripts/chaos.sh [TRIALS] [SEED] [JOBS]
#
# TRIALS defaults to 1000, SEED to one derived from the clock (printed; the
# same seed gives the same schedule of faults and messages). JOBS (default 1)
# runs that many campaigns at once, each with its own ejabberd, proxies and
# clients, TRIALS/JOBS trials each and seeds SEED, SEED+1, ...; a trial is
# mostly waiting, so 3 jobs on 2 cores take about a third of the time. Needs
# what the end-to-end tests need (ejabberd, python3 with slixmpp: see
# scripts/install-test-deps.sh). Extra settings pass through the environment:
#   O2TR_CHAOS_UPSTREAM_SM=true|false   the proxies' --upstream-sm
#   O2TR_CHAOS_ONLY=2,5                 only these fault kinds (see FAULTS)
#   O2TR_CHAOS_FRAGMENT_SIZE=N          the proxies' --fragment-size (300)
#   O2TR_TEST_PROXY_LOG=FILE            keep the proxies' logs, with a line
#                                       at each trial's start (job N: FILE.N)
#   O2TR_CHAOS_BUDGET_SECS=N            start no new trial after N seconds
# Prints the per-fault table at the end (summed over the jobs) and writes it
# to target/chaos-report.txt; each job's output is in target/chaos-job-N.log.
# Exit status: non-zero if any trial of any job failed a check.
set -euo pipefail
cd "$(dirname "$0")/.."
trials="${1:-1000}"
seed="${2:-$(( $(date +%s%N) % 1000000007 ))}"
jobs="${3:-1}"
echo "chaos: $trials trials, seed $seed, $jobs job(s)" >&2
# All seven fault kinds unless told otherwise (cargo test alone leaves out
# the kinds with an open bug).
export O2TR_CHAOS_ONLY="${O2TR_CHAOS_ONLY:-0,1,2,3,4,5,6}"
# Every message fragmented (300-byte pieces) unless told otherwise; the CI
# run (cargo test) uses the product's default, no fragmentation.
export O2TR_CHAOS_FRAGMENT_SIZE="${O2TR_CHAOS_FRAGMENT_SIZE:-300}"
if [ "$jobs" -le 1 ]; then
    export O2TR_CHAOS_TRIALS="$trials" O2TR_CHAOS_SEED="$seed"
    export O2TR_CHAOS_REPORT="$PWD/target/chaos-report.txt"
    exec cargo test --release --locked --test chaos -- --nocapture --test-threads=1
fi

cargo test --release --locked --test chaos --no-run
log_base="${O2TR_TEST_PROXY_LOG:-}"
pids=()
for ((j = 0; j < jobs; j++)); do
    n=$(( trials / jobs + (j < trials % jobs ? 1 : 0) ))
    if [ -n "$log_base" ]; then
        export O2TR_TEST_PROXY_LOG="$log_base.$j"
    fi
    O2TR_CHAOS_TRIALS="$n" O2TR_CHAOS_SEED="$(( seed + j ))" \
        O2TR_CHAOS_REPORT="$PWD/target/chaos-report-$j.txt" \
        cargo test --release --locked --test chaos -- --nocapture --test-threads=1 \
        >"target/chaos-job-$j.log" 2>&1 &
    pids+=("$!")
    sleep 2 # the jobs' ejabberd nodes start one after the other
done
status=0
for j in "${!pids[@]}"; do
    if ! wait "${pids[$j]}"; then
        status=1
        echo "chaos: job $j (seed $(( seed + j ))) had failing trials:" >&2
        grep -E '^\[chaos\] trial [0-9]+ \(.*\): [^ |]' "target/chaos-job-$j.log" >&2 || true
    fi
done
python3 - "$jobs" >target/chaos-report.txt <<'PY'
# Sum the jobs' per-fault tables (the columns of tests/chaos.rs print_table).
import sys
rows, extra, head = {}, {}, None
for j in range(int(sys.argv[1])):
    try:
        lines = open(f"target/chaos-report-{j}.txt").read().splitlines()
    except OSError:
        print(f"job {j}: no report")
        continue
    head = head or lines[1]
    for line in lines[2:]:
        if line.startswith("  explained losses, "):
            k, n = line.rsplit(": ", 1)
            extra[k] = extra.get(k, 0) + int(n)
            continue
        t = line.split()
        name, v = " ".join(t[:-12]), t[-12:]
        r = rows.setdefault(name, [0] * 13)
        a, b = v[3].split("/")
        nums = [int(v[0]), int(v[1]), int(v[2]), int(a), int(b)] + [int(x) for x in v[4:11]]
        for i, x in enumerate(nums):
            r[i] += x
        r[12] += float(v[11]) * int(v[0])
print(f"chaos campaign summed over {sys.argv[1]} jobs")
print(head)
total = [0] * 13
for name, r in rows.items():
    print(f"{name:<27} {r[0]:>6} {r[1]:>5} {r[2]:>9} {f'{r[3]}/{r[4]}':>11} " +
          " ".join(f"{x:>{w}}" for x, w in zip(r[5:12], [9, 5, 5, 5, 5, 5, 6])) +
          f" {r[12] / max(r[0], 1):>6.1f}")
    total = [x + y for x, y in zip(total, r)]
print(f"{'all':<27} {total[0]:>6} {total[1]:>5} {total[2]:>9} {f'{total[3]}/{total[4]}':>11} " +
      " ".join(f"{x:>{w}}" for x, w in zip(total[5:12], [9, 5, 5, 5, 5, 5, 6])) +
      f" {total[12] / max(total[0], 1):>6.1f}")
for k, n in extra.items():
    print(f"{k}: {n}")
PY
cat target/chaos-report.txt
exit "$status"

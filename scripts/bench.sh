#!/bin/sh
# Benchmarks of the OTR core (benches/otr.rs) next to libotr 4.1.1
# (benches/reference/libotr_bench.c), printed as one table.
#
#   scripts/bench.sh [--clock cpu|wall] [--measurement-time SECS] [--quick]
#
# --clock cpu (the default) times the compute-bound items in thread CPU time
# on both sides, so other work on a shared machine does not skew them;
# --clock wall uses wall-clock time. Items that write to the on-disk store
# (o2tr/*, data/alternating_persisted) are always wall-clock: their cost
# includes waiting for fsync. --quick shortens everything (a smoke run).
#
# Needs: cargo, gcc, libotr5-dev (scripts/install-test-deps.sh), python3.
# Takes a few minutes. Criterion's full reports stay in target/criterion/.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
clock=cpu
mtime=3
scale=1
while [ $# -gt 0 ]; do
    case "$1" in
    --clock) clock=$2; shift 2 ;;
    --measurement-time) mtime=$2; shift 2 ;;
    --quick) mtime=1; scale=0.2; shift ;;
    *) echo "usage: $0 [--clock cpu|wall] [--measurement-time SECS] [--quick]" >&2; exit 2 ;;
    esac
done
case "$clock" in cpu|wall) ;; *) echo "--clock must be cpu or wall" >&2; exit 2 ;; esac

out="$root/target/bench-ref"
mkdir -p "$out"
cd "$root"

echo "== building the libotr reference harness" >&2
if pkg-config --exists libotr 2>/dev/null; then
    otr_cflags=$(pkg-config --cflags libotr)
    otr_libs=$(pkg-config --libs libotr)
else
    otr_cflags=
    otr_libs=-lotr
fi
# shellcheck disable=SC2086
gcc -O2 -Wall -Wextra -o "$out/libotr_bench" benches/reference/libotr_bench.c \
    $otr_cflags $otr_libs -lgcrypt -lgpg-error

echo "== cargo bench --bench otr (clock: $clock)" >&2
O2TR_BENCH_CLOCK=$clock cargo bench --bench otr -- \
    --warm-up-time 1 --measurement-time "$mtime" --sample-size 20 >&2

echo "== libotr 4.1.1 (clock: $clock)" >&2
BENCH_CLOCK=$clock "$out/libotr_bench" "$out/keys" "$scale" > "$out/libotr.txt"
cat "$out/libotr.txt" >&2

echo "== machine" >&2
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo "$(nproc) CPUs, $cpu_model, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo

python3 - "$root/target/criterion" "$out/libotr.txt" "$clock" <<'EOF'
import json, os, sys

crit, libotr_file, clock = sys.argv[1:4]

def ours(bench_id):
    # Criterion names the directory after the id with "/" replaced by "_".
    path = os.path.join(crit, bench_id.replace("/", "_"), "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except (OSError, KeyError, ValueError):
        return None

ref = {}
with open(libotr_file) as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "RESULT":
            ref[parts[1]] = float(parts[2])

def fmt(ns):
    if ns is None:
        return "—"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns:.0f} ns"

def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"

durable = {"data/alternating_persisted", "o2tr/offline_first", "o2tr/offline_next", "o2tr/resume"}
targets = {"ake/full": 0.25, "data/alternating": 0.25, "data/burst": 0.5}
rows = [
    "ake/full", "data/alternating", "data/burst", "data/alternating_16k", "data/burst_16k",
    "data/alternating_persisted", "o2tr/offline_first", "o2tr/offline_next", "o2tr/resume",
    "o2tr/offline_first_mem", "o2tr/resume_mem", "modexp/dh_shared",
]
print("| work item | clock | ours (median) | libotr 4.1.1 (median) | ours / libotr | target |")
print("|---|---|---|---|---|---|")
for r in rows:
    o, l = ours(r), ref.get(r)
    t = targets.get(r)
    verdict = ""
    if t is not None and o is not None and l is not None:
        verdict = f"≤ {t}× {'met' if o / l <= t else 'MISSED'}"
    print(f"| {r} | {'wall' if r in durable else clock} | {fmt(o)} | {fmt(l)} | {ratio(o, l)} | {verdict} |")
print()
ake, modexp = ours("ake/full"), ours("modexp/dh_shared")
for r in ["o2tr/resume", "o2tr/resume_mem"]:
    v = ours(r)
    note = ""
    if v is not None and ake:
        note = " (target ≤ 0.1×: " + ("met" if v / ake <= 0.1 else "MISSED") + ")"
    print(f"* {r} / ake/full = {ratio(v, ake)}{note}")
alt = ours("data/alternating")
if alt is not None and modexp:
    print(f"* data/alternating / (3 × modexp/dh_shared) = {ratio(alt, 3 * modexp)}")
EOF

#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after another (nightly toolchain
# and cargo-fuzz required: `rustup toolchain install nightly`,
# `cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Default: 60 s for every target. Each run starts from the committed seeds
# (fuzz/seeds/TARGET) plus the local corpus (fuzz/corpus/TARGET, not
# committed), uses fuzz/dict/xmpp.dict for the XML targets, and prints the
# user+system CPU seconds it used. Crashes land in fuzz/artifacts/TARGET;
# turn each into a regression test (docs/fuzzing.md).
#
# Builds are cargo-fuzz's default (release, debug assertions and overflow
# checks on) without a sanitizer: the crate forbids unsafe code, and
# without ASan about twice as many inputs run per CPU second.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(otr_message fragment data_message smp xml_framer stanza_rewrite snapshot_decode)
fi

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    extra=()
    case "$t" in
        xml_framer | stanza_rewrite) extra+=("-dict=dict/xmpp.dict") ;;
    esac
    seeds=()
    [ -d "seeds/$t" ] && seeds+=("seeds/$t")
    echo "== $t: ${secs}s"
    TIMEFORMAT="== $t: %U s user, %S s system, %R s wall"
    time nice -n 10 cargo +nightly fuzz run --sanitizer none "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 "${extra[@]}"
    echo "== $t: corpus $(find "corpus/$t" -type f | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
done

#!/bin/sh
# Build the libotr peer used by the interop tests.
#
#   tests/peers/build.sh [OUT_DIR]
#
# OUT_DIR defaults to <repo>/target/test-peers. Writes OUT_DIR/libotr_peer,
# skipping the compile when the binary is newer than its source. The binary
# is compiled under a temporary name and renamed into place, so concurrent
# builds never expose a half-written file.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out_dir=${1:-"$root/target/test-peers"}
src="$here/libotr_peer.c"
out="$out_dir/libotr_peer"

mkdir -p "$out_dir"
if [ -x "$out" ] && [ "$out" -nt "$src" ]; then
    exit 0
fi

cc=${CC:-gcc}
if pkg-config --exists libotr 2>/dev/null; then
    otr_cflags=$(pkg-config --cflags libotr)
    otr_libs=$(pkg-config --libs libotr)
else
    otr_cflags=
    otr_libs=-lotr
fi

tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# shellcheck disable=SC2086
"$cc" -O2 -Wall -Wextra -o "$tmp" "$src" $otr_cflags $otr_libs -lgcrypt -lgpg-error
mv -f "$tmp" "$out"
trap - EXIT
echo "built $out"

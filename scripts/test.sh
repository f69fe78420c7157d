#!/usr/bin/env bash
# Runs every test of o2tr-proxy: formatting, lints, unit tests, interop tests
# against libotr and python-potr, and end-to-end tests with a real ejabberd.
# Installs the test dependencies first when they are missing (Debian, root).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
RUST_TEST_THREADS="${O2TR_TEST_THREADS:-2}" cargo test --locked --all-targets
echo "== cargo test --doc"
cargo test --locked --doc
echo "== cargo doc (broken intra-doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps
echo "== docker deployment checks (offline: compose config, hadolint, rendered ejabberd.yml)"
bash scripts/check-docker.sh

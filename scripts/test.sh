#!/usr/bin/env bash
# Every check and test of sbx, as CI runs it: formatting, clippy, unit tests, and the integration
# tests, which start real sandboxes and so need root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test: the integration tests start real sandboxes and must run as root" >&2
  exit 1
fi
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo build --release --bins
cargo test --workspace --no-fail-fast
# The main job, end to end, as a user runs it.
out=$(./target/release/sbx run -- python3 -c "print('hello')")
[ "$out" = "hello" ] || { echo "test: sbx run printed ${out@Q}, expected 'hello'" >&2; exit 1; }
echo "sbx run smoke test: 1 passed, 0 failed"

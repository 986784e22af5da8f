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
cargo clippy --workspace --all-targets -- -D warnings
# The client library alone must build without the runtime's and daemon's dependencies.
cargo check -p sbx --no-default-features --features client --lib
cargo build --release --bins --examples
cargo test --workspace --no-fail-fast
# The main job, end to end, as a user runs it: the CLI starts sbxd on first use.
smoke=$(mktemp -d /tmp/sbx-smoke.XXXXXX)
chmod 755 "$smoke"  # the sandboxes' uids must traverse to their rootfs under the run dir
export SBX_SOCKET="$smoke/sbxd.sock" SBX_STATE_DIR="$smoke/state" SBX_RUN_DIR="$smoke/run"
stop_smoke() {
  if [ -f "$smoke/state/sbxd.pid" ]; then
    pid=$(cat "$smoke/state/sbxd.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$smoke"
}
trap stop_smoke EXIT
out=$(./target/release/sbx run -- python3 -c "print('hello')")
[ "$out" = "hello" ] || { echo "test: sbx run printed ${out@Q}, expected 'hello'" >&2; exit 1; }
echo "sbx run smoke test: 1 passed, 0 failed"

#!/usr/bin/env bash
# Install what sbx needs on a Debian 12 host (run as root): the tools the tests and benches use.
# Idempotent: packages already present are not fetched again.
set -euo pipefail

packages=(
  busybox-static   # test rootfs images
  gcc libc6-dev    # the in-sandbox syscall probe (built static by the tests)
  python3          # the host image's `python3 -c "print('hello')"`
  crun runc bubblewrap  # the peers the benchmark compares against
  procps           # ps/pgrep for debugging
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing: install the Rust toolchain named in rust-toolchain.toml" >&2
  exit 1
fi
# The image tests' registry and OCI tools.
"$(dirname "$0")/setup-images.sh"

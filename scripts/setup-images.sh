#!/usr/bin/env bash
# Install what the image tests need on a Debian 12 host (run as root, no stdin): a local registry,
# the tools that push to it and unpack OCI layouts, and the test rootfs binary.
# Idempotent: `apt-get update` and the install run only when a package is missing.
set -euo pipefail

packages=(
  docker-registry  # Debian's distribution registry; the tests start it on 127.0.0.1 themselves
  skopeo           # pushes test images into the registry; makes docker-archive tarballs
  umoci            # checks that exported OCI layouts unpack
  busybox-static   # the test image's only binary
  apache2-utils    # htpasswd -B: the bcrypt password file of the basic-auth registry test
  debootstrap      # benches/images.rs makes its Debian image with it (once, cached)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-images: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
fi
for bin in docker-registry skopeo umoci busybox htpasswd; do
  if ! command -v "$bin" >/dev/null 2>&1; then
    echo "setup-images: $bin is still missing after the install" >&2
    exit 1
  fi
done

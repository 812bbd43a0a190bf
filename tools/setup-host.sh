#!/usr/bin/env bash
# Installs everything ublk-clone needs on a fresh Debian 12 machine: the build dependencies
# (libclang for libublk's bindgen), the tools the tests drive (fio, mkfs.*, fsck), QEMU and the
# bookworm-backports 6.12 kernel (the host kernel has no ublk), virtme-ng to boot it, and
# cargo-deb for the Debian package.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "setup-host.sh: run as root (apt-get)" >&2; exit 1; }; }
need_root
export DEBIAN_FRONTEND=noninteractive

if [ ! -f /etc/apt/sources.list.d/bookworm-backports.sources ]; then
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

pkgs=(libclang-dev linux-libc-dev fio e2fsprogs xfsprogs util-linux fdisk kmod busybox-static
      nbdkit libnbd-bin systemd)
# QEMU comes from bookworm-backports: the image's qemu-utils is the backports one and breaks
# bookworm's own qemu-system-common.
bpo_pkgs=(qemu-system-x86 qemu-utils)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
bpo_missing=()
for p in "${bpo_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || bpo_missing+=("$p"); done

# The newest bookworm-backports 6.12 kernel (versions rotate: never hard-code one).
kver=$(ls /lib/modules 2>/dev/null | grep -E '^6\.12\..*\+deb12-amd64$' | sort -V | tail -n1 || true)
if [ ${#missing[@]} -gt 0 ] || [ ${#bpo_missing[@]} -gt 0 ] || [ -z "$kver" ]; then
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  if [ ${#bpo_missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${bpo_missing[@]}"
  fi
  if [ -z "$kver" ]; then
    kpkg=$(apt-cache search --names-only '^linux-image-6\.12\..*\+deb12-amd64-unsigned$' \
           | awk '{print $1}' | sort -V | tail -n1)
    [ -n "$kpkg" ] || { echo "setup-host.sh: no linux-image-6.12 in bookworm-backports" >&2; exit 1; }
    apt-get install -y -qq --no-install-recommends "$kpkg"
  fi
fi

if ! command -v vng >/dev/null 2>&1; then
  pip install --quiet --disable-pip-version-check 'virtme-ng==1.42' \
    || pip install --quiet --disable-pip-version-check virtme-ng
fi
# cargo-deb builds the Debian package (tools/build-deb.sh; the VM suite installs it).
if ! command -v cargo-deb >/dev/null 2>&1; then
  cargo install --quiet --locked --version 3.8.0 cargo-deb || cargo install --quiet --locked cargo-deb
fi
echo "setup-host: ok (kernel $(ls /lib/modules | grep -E '^6\.12\.' | sort -V | tail -n1), vng $(vng --version 2>/dev/null | head -n1))"

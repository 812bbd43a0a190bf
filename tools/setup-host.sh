#!/usr/bin/env bash
# Installs everything ublk-clone needs on a fresh Debian 12 machine: the build dependencies
# (libclang for libublk's bindgen), the tools the tests drive (fio, mkfs.*, fsck), QEMU and the
# bookworm-backports 6.12 kernel (the host kernel has no ublk) and the newest trixie-backports
# kernel (tools/vm-run --kernel new), virtme-ng to boot them, and cargo-deb for the Debian
# package.
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

# The newest kernel of Debian's trixie-backports suite: the second guest kernel (today's ublk:
# zero copy, quiesce, batch I/O; dm-clone and dm-log-writes as modules). Fetched with a private
# apt state, so the host's own sources and packages are untouched, and unpacked (dpkg -x of
# linux-binary, linux-modules and linux-base) into /usr/lib/modules/KV, vmlinuz included.
new_kernel() {
  local st=/var/lib/ublk-clone/apt kv dl
  mkdir -p "$st/sources" "$st/lists/partial" "$st/archives/partial" "$st/cache"
  cat > "$st/sources/trixie-backports.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  local apt=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$st/sources"
             -o "Dir::State::Lists=$st/lists" -o "Dir::Cache=$st/cache"
             -o "Dir::Cache::Archives=$st/archives")
  if ! apt-get "${apt[@]}" update -qq; then
    echo "setup-host.sh: cannot reach trixie-backports" >&2; return 1
  fi
  kv=$(apt-cache "${apt[@]}" search --names-only '^linux-binary-[0-9.]+\+deb13-amd64$' \
       | awk '{print $1}' | sed 's/^linux-binary-//' | sort -V | tail -n1)
  [ -n "$kv" ] || { echo "setup-host.sh: no linux-binary-*+deb13-amd64 in trixie-backports" >&2; return 1; }
  if [ -f "/usr/lib/modules/$kv/vmlinuz" ] && [ -f "/usr/lib/modules/$kv/modules.dep" ]; then
    return 0
  fi
  dl=$(mktemp -d)
  (cd "$dl" && apt-get "${apt[@]}" download -qq "linux-binary-$kv" "linux-modules-$kv" "linux-base-$kv" 2>&1 \
     | grep -v 'Download is performed unsandboxed' >&2 || true)
  for d in "$dl"/linux-binary-*.deb "$dl"/linux-modules-*.deb "$dl"/linux-base-*.deb; do
    [ -f "$d" ] || { echo "setup-host.sh: downloading the $kv kernel failed" >&2; rm -rf "$dl"; return 1; }
    dpkg -x "$d" "$dl/root"
  done
  rm -rf "/usr/lib/modules/$kv"
  cp -a "$dl/root/usr/lib/modules/$kv" /usr/lib/modules/
  depmod "$kv"
  rm -rf "$dl"
}
if ! new_kernel; then
  # A kernel fetched earlier still serves (the suite's new-kernel run needs one).
  ls /usr/lib/modules | grep -qE '^[0-9.]+\+deb13-amd64$' || exit 1
fi

if ! command -v vng >/dev/null 2>&1; then
  pip install --quiet --disable-pip-version-check 'virtme-ng==1.42' \
    || pip install --quiet --disable-pip-version-check virtme-ng
fi
# cargo-deb builds the Debian package (tools/build-deb.sh; the VM suite installs it).
if ! command -v cargo-deb >/dev/null 2>&1; then
  cargo install --quiet --locked --version 3.8.0 cargo-deb || cargo install --quiet --locked cargo-deb
fi
echo "setup-host: ok (kernels $(ls /lib/modules | grep -E '^6\.12\.' | sort -V | tail -n1) and $(ls /lib/modules | grep -E '^[0-9.]+\+deb13-amd64$' | sort -V | tail -n1), vng $(vng --version 2>/dev/null | head -n1))"

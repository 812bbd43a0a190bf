#!/usr/bin/env bash
# Builds kernel dm-clone for the 6.12 guest kernel, out of tree: Debian's 6.12 kernel is built
# without CONFIG_DM_CLONE. Benchmark only (tools/bench-clone.sh --kernel 6.12 loads it); no
# test depends on it. Sources: Debian's linux-source-6.12 of the guest kernel's exact version
# (drivers/md/dm-clone-*.c and the private headers they include), built against its
# linux-headers package; what dm-clone calls is exported by dm-mod, dm-bufio and
# dm-persistent-data, which the kernel ships as modules.
# Usage: tools/build-dm-clone.sh   prints the path of dm-clone.ko (cached per kernel version)
set -euo pipefail
kver=$(ls /lib/modules | grep -E '^6\.12\..*\+deb12-amd64$' | sort -V | tail -n1 || true)
[ -n "$kver" ] || { echo "build-dm-clone: no 6.12 guest kernel; run tools/setup-host.sh" >&2; exit 1; }
# Under the repository's target/ (the guest sees the host's root, but not its /var).
out=$(cd "$(dirname "$0")/.." && pwd)/target/dm-clone/$kver
if [ -f "$out/dm-clone.ko" ]; then echo "$out/dm-clone.ko"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s "linux-headers-$kver" >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends "linux-headers-$kver" >&2
fi
ver=$(dpkg-query -W -f='${Version}' "linux-headers-$kver")
if [ "$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null || true)" != "$ver" ]; then
  # The source of exactly the guest kernel's version (never a newer backport).
  apt-get install -y -qq --no-install-recommends --allow-downgrades "linux-source-6.12=$ver" >&2
fi
work=$(mktemp -d /tmp/dm-clone-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
tar -xJf /usr/src/linux-source-6.12.tar.xz -C "$work" --strip-components=3 --wildcards \
  'linux-source-6.12/drivers/md/dm-clone-*' 'linux-source-6.12/drivers/md/dm*.h' \
  'linux-source-6.12/drivers/md/persistent-data/*.h'
cat >"$work/Kbuild" <<'KB'
obj-m := dm-clone.o
dm-clone-y := dm-clone-target.o dm-clone-metadata.o
KB
make -s -C "/usr/src/linux-headers-$kver" M="$work" modules >&2
mkdir -p "$out"
cp "$work/dm-clone.ko" "$out/"
echo "$out/dm-clone.ko"

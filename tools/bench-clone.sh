#!/usr/bin/env bash
# Benchmark (issue 14): kernel dm-clone beside ublk-clone in ONE guest boot, hydrated and cold
# (every cold measurement on a freshly created, empty clone), at two region sizes, with the
# kernel loop device (dm-clone's floor) and rublk's loop target (ours: a ublk device) over the
# same stack (files on the guest's tmpfs behind loop devices with direct I/O). Prints one
# table per region size (each row a profile: ours / rublk loop beside dm-clone / kernel loop,
# and whether ours costs less), hydration under load, and writes JSON and a PNG chart.
#
# Usage: tools/bench-clone.sh [--kernel 6.12|new] [--json FILE] [--png FILE] [ROUNDS] [RUNTIME_S]
#   defaults: --kernel new, results in target/bench-clone.{json,png}, 2 rounds of 4 s. Debian's
#   6.12 kernel has no dm-clone: with --kernel 6.12, tools/build-dm-clone.sh builds it out of
#   tree from Debian's linux-source-6.12 (benchmark only).
#   BENCH_SIZE_MB (1024), BENCH_REGIONS ("4K 64K"), BENCH_PROFILES
#   ("randread seqwrite fsync randwrite seqread") shrink a run for a quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=new json=target/bench-clone.json png=target/bench-clone.png
while [ $# -gt 0 ]; do
  case $1 in
    --kernel) kernel=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    --png) png=$2; shift 2 ;;
    *) break ;;
  esac
done
rounds=${1:-2} runtime=${2:-4}
size_mb=${BENCH_SIZE_MB:-1024}
peer_root=${RUBLK_ROOT:-/opt/rublk-peer}
if [ ! -x "$peer_root/bin/rublk" ]; then
  echo "installing the benchmark peer rublk into $peer_root (cargo install, a few minutes)"
  cargo install --quiet --locked rublk --root "$peer_root" || cargo install --quiet rublk --root "$peer_root"
fi
# The chart: Debian's matplotlib, for the system python (benchmark only, never a test need).
if ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
  apt-get install -y -qq python3-matplotlib >/dev/null || echo "no python3-matplotlib: no chart"
fi
cargo build --release --bins --quiet
dm_ko=-
if [ "$kernel" = 6.12 ]; then
  dm_ko=$(tools/build-dm-clone.sh) || { echo "bench-clone: dm-clone for 6.12 could not be built: its rows are left out"; dm_ko=-; }
fi
out=$(mktemp /tmp/bench-clone.XXXXXX)
trap 'rm -f "$out"' EXIT
# 1 GiB devices: up to six of them on the guest's tmpfs at once.
tools/vm-run --mem $((size_mb * 8 / 1024 + 3))G --kernel "$kernel" -- tools/bench-clone-guest.sh \
  "$(pwd)/target/release/ublk-clone" "$peer_root/bin/rublk" "$rounds" "$runtime" "$size_mb" \
  "${BENCH_REGIONS:-4K 64K}" "${BENCH_PROFILES:-randread seqwrite fsync randwrite seqread}" "$dm_ko" | tee "$out"
grep -q '^DONE' "$out" || { echo "bench-clone: the guest run did not finish" >&2; exit 1; }
mkdir -p "$(dirname "$json")"
/usr/bin/python3 tools/bench-clone-report.py "$out" "$json" "$png" \
  "tools/bench-clone.sh --kernel $kernel $rounds $runtime (${size_mb} MiB devices)"

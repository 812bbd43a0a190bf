#!/usr/bin/env bash
# Benchmark (issue 4): ublk-clone over hydrated and over unhydrated regions, rublk's loop
# target (benchmark peer only, never a dependency) and the kernel loop device, on the same
# kind of backing file, in ONE guest boot, side by side and interleaved over several rounds.
# Prints per-run figures and ratios of medians. Absolute numbers under TCG mean little.
#
# Usage: tools/bench-vm.sh [ROUNDS] [RUNTIME_S] [PROFILES]   (host side; installs rublk if missing)
#        PROFILES: a quoted subset of "randread seqwrite fsync" (default: all three)
#        BENCH_KERNEL=new: boot the newest trixie-backports kernel instead of 6.12. Where the
#        kernel offers zero copy, the hydrated clone also runs with --no-zero-copy, and rublk's
#        loop target with its zero copy (RUBLK_ZC_FLAG, default -z) when this rublk has it.
# Backing files live on a tmpfs inside the guest, so the figures compare the block servers,
# not the disk (all servers therefore use buffered I/O on their backing files).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
runtime=${2:-6}
peer_root=${RUBLK_ROOT:-/opt/rublk-peer}
if [ ! -x "$peer_root/bin/rublk" ]; then
  echo "installing the benchmark peer rublk into $peer_root (cargo install, a few minutes)"
  cargo install --quiet --locked rublk --root "$peer_root" || cargo install --quiet rublk --root "$peer_root"
fi
cargo build --release --bins --quiet
zc_flag=
if "$peer_root/bin/rublk" add loop --help 2>/dev/null | grep -qE -- "${RUBLK_ZC_FLAG:--z}[ ,]"; then
  zc_flag=${RUBLK_ZC_FLAG:--z}
fi
exec tools/vm-run --mem 5G --kernel "${BENCH_KERNEL:-6.12}" -- env RUBLK_ZC_FLAG="$zc_flag" tools/bench-vm-guest.sh "$(pwd)/target/release/ublk-clone" "$peer_root/bin/rublk" "$rounds" "$runtime" "${3:-randread seqwrite fsync}"

#!/usr/bin/env bash
# Benchmark (issue 12): 4k random reads (queue depth 32) of unhydrated regions, the source a
# local file vs the same file behind qemu-nbd, in ONE guest boot, interleaved. Prints the
# medians and the ratio. Absolute numbers under TCG mean little.
# Usage: tools/bench-nbd.sh [ROUNDS] [RUNTIME_S]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
exec tools/vm-run --mem 3G -- tools/bench-nbd-guest.sh "$(pwd)/target/release/ublk-clone" "${1:-3}" "${2:-8}"

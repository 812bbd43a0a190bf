#!/usr/bin/env bash
# Benchmark (issue 11): what the survival copy (every new region bit written through to a
# file under /run before the write that needs it is acknowledged) costs. In ONE guest boot,
# two unhydrated clones of the same source, one with the copy and one without
# (UBLK_CLONE_BENCH_NO_SURVIVAL, benchmarks only), run 4 KiB random writes with fdatasync
# and 1 MiB sequential writes, interleaved over several rounds; each run uses fresh
# destination and metadata so that every write lands in unhydrated regions. Prints the
# medians and the ratio with/without. Absolute numbers under TCG mean little.
# Usage: tools/bench-survival.sh [ROUNDS] [RUNTIME_S]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
exec tools/vm-run --mem 3G -- tools/bench-survival-guest.sh "$(pwd)/target/release/ublk-clone" "${1:-3}" "${2:-8}"

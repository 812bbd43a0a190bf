#!/usr/bin/env bash
# Benchmark (issue 15): trace-driven prefetch. A golden ext4 image behind nbdkit with an added
# read delay (a slow remote source); "boot" = reading a fixed set of files, cold. A first clone
# records the trace of a boot; then, interleaved over ROUNDS, fresh clones boot HEADSTART_S
# after create, with and without --prefetch of that trace (background hydration on, rate
# limited). Prints per-file first-read latency p50/p99 and the boot's time, medians, ratios.
# One guest boot. Usage: tools/bench-prefetch.sh [ROUNDS] [HEADSTART_S]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
exec tools/vm-run --mem 3G -- tools/bench-prefetch-guest.sh "$(pwd)/target/release/ublk-clone" "${1:-3}" "${2:-2}"

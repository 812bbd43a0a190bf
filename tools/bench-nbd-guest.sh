#!/usr/bin/env bash
# Guest half of tools/bench-nbd.sh: 4k random reads at queue depth 32 on a clone whose regions
# are all unhydrated (every read goes to the source, hydration off, hydrate-on-read off), with
# the source a local file or the same file behind qemu-nbd (Unix socket), interleaved over
# ROUNDS; prints each run, the medians and the ratio NBD/local.
set -euo pipefail
bin=$1 rounds=$2 runtime=$3
modprobe ublk_drv
w=$(mktemp -d /dev/shm/bnbd.XXXXXX)
size=512M
head -c $size /dev/urandom >"$w/src"
qemu-nbd -r -t -e 16 -f raw -x img -k "$w/nbd.sock" "$w/src" & nbd=$!
for ((i = 0; i < 500; i++)); do [ -S "$w/nbd.sock" ] && break; sleep 0.02; done
run() { # local|nbd -> IOPS
  local src=$w/src dev
  [ "$1" = nbd ] && src="nbd+unix:///img?socket=$w/nbd.sock"
  rm -f "$w/dst" "$w/meta"; truncate -s $size "$w/dst"; truncate -s 4M "$w/meta"
  dev=$("$bin" create --source "$src" --dest "$w/dst" --metadata "$w/meta" \
    --region-size 64K --no-hydration)
  "$bin" set "$dev" --hydrate-on-read false >/dev/null
  echo none >/sys/block/$(basename "$dev")/queue/scheduler 2>/dev/null || true
  fio --name=b --filename="$dev" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
      --iodepth=32 --runtime="$runtime" --time_based --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"],1))'
  "$bin" stop "$dev" >/dev/null
}
declare -A res
for ((r = 0; r < rounds; r++)); do
  for k in $([ $((r % 2)) = 0 ] && echo "local nbd" || echo "nbd local"); do
    v=$(run "$k"); res[$k]+="$v "
    echo "round $r source $k: $v IOPS"
  done
done
kill "$nbd"
python3 - "${res[local]}" "${res[nbd]}" <<'PY'
import sys, statistics
loc = [float(x) for x in sys.argv[1].split()]
nbd = [float(x) for x in sys.argv[2].split()]
ratio = statistics.median(a / b for a, b in zip(nbd, loc))
print(f"4k randread qd32, unhydrated: NBD source {statistics.median(nbd):.0f} IOPS, local file "
      f"{statistics.median(loc):.0f} IOPS (medians of {len(loc)}); NBD/local {ratio:.3f}x "
      f"(median of per-round ratios)")
PY
rm -rf "$w"

#!/usr/bin/env bash
# Guest half of tools/bench-survival.sh.
set -euo pipefail
bin=$1 rounds=$2 runtime=$3
modprobe ublk_drv
w=$(mktemp -d /dev/shm/bsurv.XXXXXX)
size=512M
head -c $size /dev/urandom >"$w/src"
run() { # KIND PROFILE -> IOPS
  local env=() dev
  [ "$1" = off ] && env=(env UBLK_CLONE_BENCH_NO_SURVIVAL=1)
  rm -f "$w/dst" "$w/meta"; truncate -s $size "$w/dst"; truncate -s 4M "$w/meta"
  dev=$("${env[@]}" "$bin" create --source "$w/src" --dest "$w/dst" --metadata "$w/meta" \
    --region-size 64K --no-hydration --buffered-io)
  echo none >/sys/block/$(basename "$dev")/queue/scheduler 2>/dev/null || true
  case $2 in
    fsync) args="--rw=randwrite --bs=4k --iodepth=1 --fdatasync=1" ;;
    write1m) args="--rw=write --bs=1M --iodepth=8" ;;
  esac
  fio --name=b --filename="$dev" --ioengine=io_uring --direct=1 $args --runtime="$runtime" \
      --time_based --size=448M --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["write"]["iops"],1))'
  "$bin" stop "$dev" >/dev/null
}
declare -A res
for ((r = 0; r < rounds; r++)); do
  for p in fsync write1m; do
    for k in $([ $((r % 2)) = 0 ] && echo "on off" || echo "off on"); do
      v=$(run "$k" "$p"); res[$k.$p]+="$v "
      echo "round $r $p survival $k: $v IOPS"
    done
  done
done
python3 - "${res[@]@K}" <<'PY'
import sys, statistics, shlex
t = shlex.split(" ".join(sys.argv[1:]))
d = {t[i]: [float(x) for x in t[i + 1].split()] for i in range(0, len(t), 2)}
for p, what in (("fsync", "4k randwrite+fdatasync"), ("write1m", "1M sequential write")):
    on, off = d[f"on.{p}"], d[f"off.{p}"]
    ratio = statistics.median(a / b for a, b in zip(on, off))
    print(f"{what}: with survival copy {statistics.median(on):.0f} IOPS, without "
          f"{statistics.median(off):.0f} IOPS (medians of {len(on)}); with/without "
          f"{ratio:.3f}x (median of per-round ratios)")
PY
rm -rf "$w"

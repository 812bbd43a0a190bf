#!/usr/bin/env bash
# Guest half of tools/bench-prefetch.sh.
set -euo pipefail
bin=$1 rounds=$2 headstart=$3
modprobe ublk_drv
w=$(mktemp -d /dev/shm/bpf.XXXXXX)
mkdir -p "$w/gold" "$w/bootsrc" "$w/mnt"
# 48 MiB of other data first, then (written after it, so it lies beyond it) the boot set:
# 64 files of 16-256 KiB (about 8 MiB).
head -c 48M /dev/urandom >"$w/gold/other"
python3 - "$w/bootsrc" <<'PY'
import os, random, sys
r = random.Random(7)
for i in range(64):
    open(os.path.join(sys.argv[1], f"f{i:02d}"), "wb").write(os.urandom(r.choice([16, 64, 128, 256]) << 10))
PY
truncate -s 96M "$w/src"
mkfs.ext4 -q -F -b 4096 -d "$w/gold" "$w/src" >/dev/null
{ echo "mkdir boot"; for f in "$w"/bootsrc/*; do echo "write $f boot/$(basename "$f")"; done; } \
  >"$w/debugfs.cmd"
debugfs -w -f "$w/debugfs.cmd" "$w/src" >/dev/null 2>&1
# The source: 50 ms added to every read (nbdkit's delay filter), over a Unix socket.
nbdkit -f -U "$w/nbd.sock" --filter=delay file "$w/src" rdelay=50ms & nbd=$!
for ((i = 0; i < 500; i++)); do [ -S "$w/nbd.sock" ] && break; sleep 0.02; done
src="nbd+unix:///?socket=$w/nbd.sock"
fresh() { rm -f "$w/dst" "$w/meta"; truncate -s 96M "$w/dst"; truncate -s 4M "$w/meta"; }
boot() { # DEV -> "p50_ms p99_ms total_ms": each boot file read once, cold, in a fixed order
  mount -o ro "$1" "$w/mnt"
  python3 - "$w/mnt/boot" <<'PY'
import os, sys, time
d = sys.argv[1]
lat = []
t0 = time.monotonic()
for f in sorted(os.listdir(d)):
    t = time.monotonic()
    with open(os.path.join(d, f), "rb") as fh:
        while fh.read(1 << 20):
            pass
    lat.append((time.monotonic() - t) * 1000)
total = (time.monotonic() - t0) * 1000
lat.sort()
print(f"{lat[len(lat) // 2]:.1f} {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.1f} {total:.0f}")
PY
  umount "$w/mnt"
}
# The trace of a first boot.
fresh
dev=$("$bin" create --source "$src" --dest "$w/dst" --metadata "$w/meta" --region-size 64K \
  --no-hydration --trace-reads)
boot "$dev" >/dev/null
"$bin" trace "$dev" --out "$w/trace"
grep -v '^#' "$w/trace" | awk '{ m = $1 / 1048576; if (m >= 40) hi++ } END { print "trace: " NR " regions, " hi " of them beyond 40 MiB" }'
"$bin" stop "$dev" >/dev/null
declare -A res
run() { # plain|prefetch
  local extra=()
  [ "$1" = prefetch ] && extra=(--prefetch "$w/trace")
  fresh
  dev=$("$bin" create --source "$src" --dest "$w/dst" --metadata "$w/meta" --region-size 64K \
    --rate 4M "${extra[@]}")
  sleep "$headstart" # the machine boots a little after its disk is created (not synchronisation)
  "$bin" status "$dev" | sed -n 2p | sed "s/^/  $1: before the boot: /" >&2
  boot "$dev"
  "$bin" stop "$dev" >/dev/null
}
for ((r = 0; r < rounds; r++)); do
  for k in $([ $((r % 2)) = 0 ] && echo "plain prefetch" || echo "prefetch plain"); do
    v=$(run "$k"); res[$k]+="$v;"
    echo "round $r $k: per-file p50/p99 and boot time (ms): $v"
  done
done
kill "$nbd"
python3 - "${res[plain]}" "${res[prefetch]}" <<'PY'
import sys, statistics
def parse(s): return [tuple(map(float, x.split())) for x in s.split(";") if x.strip()]
plain, pre = parse(sys.argv[1]), parse(sys.argv[2])
med = lambda v, i: statistics.median(x[i] for x in v)
for i, what in enumerate(["p50 first-read latency", "p99 first-read latency", "boot time"]):
    a, b = med(plain, i), med(pre, i)
    print(f"median {what}: without prefetch {a:.1f} ms, with prefetch {b:.1f} ms: ratio {b / a:.2f}x")
PY

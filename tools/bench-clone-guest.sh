#!/usr/bin/env bash
# Guest half of tools/bench-clone.sh: kernel dm-clone beside ublk-clone in one boot.
#
# Every device sits on the same stack: a file on the guest's tmpfs behind a loop device with
# direct I/O. Peers:
#   kloop    the kernel loop device over a copy of the source: dm-clone's floor
#   rublk    rublk's loop target over such a loop device: ours' floor (a ublk device)
#   dmhyd    kernel dm-clone, hydrated          dmcold   kernel dm-clone, cold (new each run)
#   ubchyd   ublk-clone, hydrated               ubccold  ublk-clone, cold (new each run)
# A cold device is created empty (new metadata, fresh destination, background hydration off)
# for every single measurement. The order of the devices rotates every round.
# Output: one JSON line per measurement ("M {...}") and per hydration-under-load run ("H
# {...}"); the host turns them into tables (tools/bench-clone-report.py).
set -euo pipefail
bin=$1 rublk=$2 rounds=$3 runtime=$4 size_mb=$5 regions=$6 profiles=$7 dm_ko=${8:--}
modprobe ublk_drv
modprobe loop 2>/dev/null || true
if ! modprobe dm-clone 2>/dev/null && [ "$dm_ko" != - ]; then
  # Built out of tree (tools/build-dm-clone.sh): its dependencies first.
  modprobe -a dm-mod dm-bufio dm-persistent-data && insmod "$dm_ko" && echo "dm-clone: $dm_ko"
fi
have_dm=1
grep -qw clone <(dmsetup targets 2>/dev/null) || have_dm=0
[ $have_dm = 1 ] || echo "NOTE kernel $(uname -r) has no dm-clone target: dm-clone rows are left out"
mount -o remount,size=90% /dev/shm
w=$(mktemp -d /dev/shm/bench.XXXXXX)
sectors=$((size_mb * 2048))
echo "setting up ${size_mb} MiB devices in $w on $(uname -r)"
head -c "${size_mb}M" /dev/urandom >"$w/src"
cp "$w/src" "$w/kloop"; cp "$w/src" "$w/rublk"
lo() { losetup --direct-io=on -f --show "$@"; } # FILE [-r]
kl=$(lo "$w/kloop")
rl=$(lo "$w/rublk")
# rublk with zero copy where the kernel offers it (as ours uses it): the best ublk loop device
# of this kernel is ours' floor.
rublk_zc=""
"$bin" features 2>/dev/null | grep -q '^zero-copy: offered' && rublk_zc=-z
if [ -n "$rublk_zc" ]; then echo "NOTE rublk loop: zero copy (-z)"; else echo "NOTE rublk loop: copy (no zero copy offered)"; fi
"$rublk" add loop -f "$rl" -q "$(nproc)" -d 128 $rublk_zc --quiet >"$w/rublk.out" 2>&1
rdev=$(ls -d /dev/ublkb* | sort -V | tail -n1)
echo none >/sys/block/$(basename "$rdev")/queue/scheduler 2>/dev/null || true # as ours
src_ubc=$(lo "$w/src" -r)   # ublk-clone's source
src_dm=$(lo "$w/src" -r)    # dm-clone's (a dm table claims its devices)

dm_status() { dmsetup status "$1" | awk '{split($7, h, "/"); print h[1], h[2]}'; } # hydrated total
dm_make() { # NAME REGION_SECTORS DEST META [no_hydration]
  local n=$1 rs=$2 d=$3 m=$4 feat="0"
  [ "${5:-}" = no_hydration ] && feat="1 no_hydration"
  # Background copies as ours (up to 64 regions in flight, 64 contiguous regions per copy).
  dmsetup create "$n" --table "0 $sectors clone $m $d $src_dm $rs $feat 4 hydration_threshold 64 hydration_batch_size 64"
  echo "/dev/mapper/$n"
}
dm_drop() { udevadm settle 2>/dev/null || true; dmsetup remove --retry "$1"; }
ubc_make() { # REGION DEST META [--no-hydration]
  "$bin" create --source "$src_ubc" --dest "$2" --metadata "$3" --region-size "$1" ${4:-} 2>>"$w/ubc.err"
}
fresh() { # FILE MB: a fresh file of zeroes, allocated (as a disk is), behind a new loop device
  rm -f "$1"; fallocate -l "${2}M" "$1"; lo "$1"
}
unloop() { losetup -d "$1"; }

profile_args() {
  case $1 in
    randread) echo "--rw=randread --bs=4k --iodepth=32 --time_based --runtime=$runtime --size=$((size_mb * 3 / 4))M" ;;
    seqwrite) echo "--rw=write --bs=1M --iodepth=8 --time_based --runtime=$runtime --size=$((size_mb * 3 / 4))M" ;;
    fsync) echo "--rw=randwrite --bs=4k --iodepth=1 --fdatasync=1 --time_based --runtime=$runtime --size=$((size_mb * 3 / 4))M" ;;
    randwrite) echo "--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=$runtime --size=$((size_mb * 3 / 4))M" ;;
    seqread) echo "--rw=read --bs=1M --iodepth=8 --size=${size_mb}M" ;; # the whole device, once
  esac
}
# fio on DEV with PROFILE: prints "iops p50 p99 p99.9" (completion latency, microseconds).
run_fio() {
  fio --name=b --filename="$1" --ioengine=io_uring --direct=1 $(profile_args "$2") \
      --output-format=json 2>"$w/fio.err" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > j["read"]["io_bytes"] else j["read"]
p = side["clat_ns"].get("percentile", {})
us = lambda k: round(p.get(k, 0) / 1000, 1)
print(round(j["read"]["iops"] + j["write"]["iops"], 1), us("50.000000"), us("99.000000"), us("99.900000"))'
}
emit() { # KIND REGION PROFILE ROUND "iops p50 p99 p999"
  set -- "$1" "$2" "$3" "$4" $5
  echo "M {\"dev\":\"$1\",\"region\":\"$2\",\"profile\":\"$3\",\"round\":$4,\"iops\":$5,\"p50_us\":$6,\"p99_us\":$7,\"p999_us\":$8}"
}

for region in $regions; do
  rs=$(( $(numfmt --from=iec "$region") / 512 ))
  echo "== region size $region"
  # Hydrated clones, each hydrated once before its rounds.
  ubc_dst=$(fresh "$w/ubc-dst" "$size_mb"); ubc_md=$(fresh "$w/ubc-md" 64)
  ubchyd=$(ubc_make "$region" "$ubc_dst" "$ubc_md")
  timeout 1200 "$bin" status "$ubchyd" --watch | tail -n 1
  echo none >/sys/block/$(basename "$ubchyd")/queue/scheduler 2>/dev/null || true
  if [ $have_dm = 1 ]; then
    dm_dst=$(fresh "$w/dm-dst" "$size_mb"); dm_md=$(fresh "$w/dm-md" 64)
    dmhyd=$(dm_make bench-hyd "$rs" "$dm_dst" "$dm_md")
    t0=$SECONDS
    until read -r h t < <(dm_status bench-hyd) && [ "$h" = "$t" ]; do
      [ $((SECONDS - t0)) -lt 1200 ] || { echo "dm-clone did not hydrate in 1200 s"; exit 1; }
      sleep 1
    done
    echo "dm-clone hydrated ($t regions) in $((SECONDS - t0)) s"
  fi
  types=(kloop rublk ubchyd ubccold)
  [ $have_dm = 1 ] && types+=(dmhyd dmcold)
  for ((r = 0; r < rounds; r++)); do
    for p in $profiles; do
      for ((i = 0; i < ${#types[@]}; i++)); do
        t=${types[$(((i + r) % ${#types[@]}))]}
        case $t in
          kloop) emit "$t" "$region" "$p" "$r" "$(run_fio "$kl" "$p")" ;;
          rublk) emit "$t" "$region" "$p" "$r" "$(run_fio "$rdev" "$p")" ;;
          ubchyd) emit "$t" "$region" "$p" "$r" "$(run_fio "$ubchyd" "$p")" ;;
          dmhyd) emit "$t" "$region" "$p" "$r" "$(run_fio "$dmhyd" "$p")" ;;
          ubccold)
            cd_=$(fresh "$w/cold-dst" "$size_mb"); cm=$(fresh "$w/cold-md" 64)
            dev=$(ubc_make "$region" "$cd_" "$cm" --no-hydration)
            echo none >/sys/block/$(basename "$dev")/queue/scheduler 2>/dev/null || true
            emit "$t" "$region" "$p" "$r" "$(run_fio "$dev" "$p")"
            "$bin" stop "$dev" >/dev/null; unloop "$cd_"; unloop "$cm"; rm -f "$w/cold-dst" "$w/cold-md" ;;
          dmcold)
            cd_=$(fresh "$w/cold-dst" "$size_mb"); cm=$(fresh "$w/cold-md" 64)
            dev=$(dm_make bench-cold "$rs" "$cd_" "$cm" no_hydration)
            emit "$t" "$region" "$p" "$r" "$(run_fio "$dev" "$p")"
            dm_drop bench-cold; unloop "$cd_"; unloop "$cm"; rm -f "$w/cold-dst" "$w/cold-md" ;;
        esac
      done
    done
  done
  # Hydration under load: a fresh clone hydrating at RATE while fio 4k randrw qd8 runs; the
  # background rate achieved (status bytes_hydrated: copy-on-write of fio's writes not counted;
  # dm-clone's count includes those) as a fraction of RATE, the IOPS as a fraction of the same
  # fio unloaded: on a fresh clone without background hydration (the same cold state, no
  # hydration load: "iops_unloaded"), and on the hydrated clone ("iops_hydrated"). dm-clone (no
  # rate limit; it pauses copying while user I/O is in flight) beside it.
  rate=$((16 << 20)); load=$((runtime * 3))
  loadfio() { fio --name=l --filename="$1" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
      --iodepth=8 --time_based --runtime="$load" --size=$((size_mb * 3 / 4))M --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"],1))'; }
  # loadfio on DEV while COUNTER (a command printing the bytes hydrated so far) is sampled one
  # second into the load and one second before its end: the window holds load only (no fio
  # start-up, no idle copying before it, and the token bucket's burst is spent before it).
  # Prints "iops bytes seconds".
  under_load() { # DEV COUNTER...
    local dev=$1 h0 h1 t0 t1 pid start left; shift
    start=$(date +%s%N)
    loadfio "$dev" >"$w/load.iops" & pid=$!
    # Each clock reading right before its counter's: the two samples lag their clock alike.
    sleep 1; t0=$(date +%s.%N); h0=$("$@")
    # The second sample at a fixed deadline, one second before the load ends: a slow first
    # sample (a status call under load took 2-3 s) must not push it past the load.
    left=$(( (start + (load - 1) * 1000000000 - $(date +%s%N)) / 1000000 ))
    [ "$left" -gt 0 ] && sleep "$((left / 1000)).$(printf %03d $((left % 1000)))"
    t1=$(date +%s.%N); h1=$("$@")
    wait "$pid"
    echo "$(cat "$w/load.iops") $((h1 - h0)) $(python3 -c "print(round($t1 - $t0, 2))")"
  }
  ubc_hydrated() { "$bin" status "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_hydrated"])'; }
  dm_hydrated() { read -r h _ < <(dm_status bench-cold); echo $((h * rs * 512)); }
  hyd_base=$(loadfio "$ubchyd")
  cd_=$(fresh "$w/cold-dst" "$size_mb"); cm=$(fresh "$w/cold-md" 64)
  dev=$(ubc_make "$region" "$cd_" "$cm" --no-hydration)
  base=$(loadfio "$dev")
  "$bin" stop "$dev" >/dev/null; unloop "$cd_"; unloop "$cm"; rm -f "$w/cold-dst" "$w/cold-md"
  # Ours with each hydration policy: `always` (copies at the rate whatever users do) and
  # `idle` (a batch starts only while no user request is in service, as dm-clone's sweep).
  for policy in always idle; do
    cd_=$(fresh "$w/cold-dst" "$size_mb"); cm=$(fresh "$w/cold-md" 64)
    dev=$(ubc_make "$region" "$cd_" "$cm" "--rate $rate --hydrate-when $policy")
    read -r iops bytes secs < <(under_load "$dev" ubc_hydrated "$dev")
    echo "H {\"dev\":\"ubc\",\"policy\":\"$policy\",\"region\":\"$region\",\"rate_limit\":$rate,\"bytes\":$bytes,\"seconds\":$secs,\"iops\":$iops,\"iops_unloaded\":$base,\"iops_hydrated\":$hyd_base}"
    "$bin" stop "$dev" >/dev/null; unloop "$cd_"; unloop "$cm"; rm -f "$w/cold-dst" "$w/cold-md"
  done
  if [ $have_dm = 1 ]; then
    hyd_base=$(loadfio "$dmhyd")
    cd_=$(fresh "$w/cold-dst" "$size_mb"); cm=$(fresh "$w/cold-md" 64)
    dev=$(dm_make bench-cold "$rs" "$cd_" "$cm" no_hydration)
    base=$(loadfio "$dev")
    dm_drop bench-cold; unloop "$cd_"; unloop "$cm"; rm -f "$w/cold-dst" "$w/cold-md"
    cd_=$(fresh "$w/cold-dst" "$size_mb"); cm=$(fresh "$w/cold-md" 64)
    dev=$(dm_make bench-cold "$rs" "$cd_" "$cm")
    read -r iops bytes secs < <(under_load "$dev" dm_hydrated)
    echo "H {\"dev\":\"dm\",\"region\":\"$region\",\"rate_limit\":0,\"bytes\":$bytes,\"seconds\":$secs,\"iops\":$iops,\"iops_unloaded\":$base,\"iops_hydrated\":$hyd_base}"
    dm_drop bench-cold; unloop "$cd_"; unloop "$cm"; rm -f "$w/cold-dst" "$w/cold-md"
  fi
  "$bin" stop "$ubchyd" >/dev/null; unloop "$ubc_dst"; unloop "$ubc_md"
  if [ $have_dm = 1 ]; then dm_drop bench-hyd; unloop "$dm_dst"; unloop "$dm_md"; fi
  rm -f "$w/ubc-dst" "$w/ubc-md" "$w/dm-dst" "$w/dm-md"
done
"$rublk" del -a >/dev/null 2>&1 || true
for d in $kl $rl $src_ubc $src_dm; do losetup -d "$d" 2>/dev/null || true; done
rm -rf "$w"
echo "DONE"

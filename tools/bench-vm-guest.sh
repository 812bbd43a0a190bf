#!/usr/bin/env bash
# Guest half of tools/bench-vm.sh.
set -euo pipefail
bin=$1 rublk=$2 rounds=$3 runtime=$4
profiles=${5:-randread seqwrite fsync}
modprobe ublk_drv
modprobe loop 2>/dev/null || true
# Up to six 256 MiB backing files and a clone's writes: more than tmpfs's default half of RAM.
mount -o remount,size=4G /dev/shm
w=$(mktemp -d /dev/shm/bench.XXXXXX)
size=256M
echo "setting up backing files in $w"
# One source shared (read-only) by both clones; the peers share one copy of it.
head -c $size /dev/urandom >"$w/src"
truncate -s $size "$w/hyd-dst"; truncate -s 4M "$w/hyd-meta"
truncate -s $size "$w/un-dst"; truncate -s 4M "$w/un-meta"
cp "$w/src" "$w/peer"

hyd=$("$bin" create --source "$w/src" --dest "$w/hyd-dst" --metadata "$w/hyd-meta" --region-size 64K)
echo "hydrating $hyd"
timeout 600 "$bin" status "$hyd" --watch | tail -n 1
types=(hyd un peer kl)
# Where the kernel offers zero copy: the same hydrated clone without it (--no-zero-copy, the
# 6.12 data path), and rublk's loop target with its own zero copy where it has it.
"$bin" features | sed 's/^/  /'
if "$bin" features | grep -q '^zero-copy: offered'; then
  truncate -s $size "$w/nz-dst"; truncate -s 4M "$w/nz-meta"
  nz=$("$bin" create --source "$w/src" --dest "$w/nz-dst" --metadata "$w/nz-meta" --region-size 64K --no-zero-copy)
  echo "hydrating $nz (--no-zero-copy)"
  timeout 600 "$bin" status "$nz" --watch | tail -n 1
  types+=(nz)
  if [ -n "${RUBLK_ZC_FLAG:-}" ]; then
    cp "$w/src" "$w/peerzc"
    "$rublk" add loop -f "$w/peerzc" --buffered-io -q "$(nproc)" -d 128 $RUBLK_ZC_FLAG >"$w/rublkzc.out" 2>&1
    peerzc=$(ls -d /dev/ublkb* | sort -V | tail -n1)
    types+=(peerzc)
  fi
fi
un=$("$bin" create --source "$w/src" --dest "$w/un-dst" --metadata "$w/un-meta" --region-size 64K --no-hydration)
"$rublk" add loop -f "$w/peer" --buffered-io -q "$(nproc)" -d 128 >"$w/rublk.out" 2>&1
peer=$(ls -d /dev/ublkb* | sort -V | tail -n1)
kl=$(losetup -f --show "$w/peer")
for d in "$hyd" "$un" "$peer" "$kl" ${nz:-} ${peerzc:-}; do echo none >/sys/block/$(basename "$d")/queue/scheduler 2>/dev/null || true; done
echo "devices: ublk-clone hydrated $hyd, ublk-clone unhydrated $un, rublk loop $peer, kernel loop $kl${nz:+, ublk-clone hydrated --no-zero-copy $nz}${peerzc:+, rublk loop zero copy $peerzc}"

profile_args() {
  case $1 in
    randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
    seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
    fsync) echo "--rw=randwrite --bs=4k --iodepth=1 --fdatasync=1" ;;
  esac
}
run_fio() { # DEV PROFILE -> prints IOPS
  fio --name=b --filename="$1" --ioengine=io_uring --direct=1 $(profile_args "$2") \
      --runtime="$runtime" --time_based --size=192M --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"],1))'
}
declare -A res
for ((r = 0; r < rounds; r++)); do
  for p in $profiles; do
    # Rotate the order every round so that no device always runs first or last.
    for ((i = 0; i < ${#types[@]}; i++)); do
      t=${types[$(((i + r) % ${#types[@]}))]}
      case $t in hyd) d=$hyd ;; un) d=$un ;; peer) d=$peer ;; kl) d=$kl ;; nz) d=$nz ;; peerzc) d=$peerzc ;; esac
      v=$(run_fio "$d" "$p")
      res[$t.$p]+="$v "
      echo "round $r $p $t: $v IOPS"
    done
  done
done
python3 - "${res[@]@K}" <<'PY'
import sys, statistics, shlex
toks = shlex.split(" ".join(sys.argv[1:]))
d = {toks[i]: [float(x) for x in toks[i + 1].split()] for i in range(0, len(toks), 2)}
names = {"hyd": "ublk-clone (hydrated)", "un": "ublk-clone (unhydrated)", "peer": "rublk loop", "kl": "kernel loop",
         "nz": "ublk-clone (hydrated, --no-zero-copy)", "peerzc": "rublk loop (zero copy)"}
names = {t: n for t, n in names.items() if any(k.startswith(t + ".") for k in d)}
# Headline: the median over rounds of the ratio within a round (the four runs of a round are
# adjacent in time, so slow drift of the host cancels out); the ratio of medians is shown too.
for p, target in [("randread", 0.95), ("seqwrite", 0.95), ("fsync", 0.8)]:
    if f"hyd.{p}" not in d:
        continue
    med = {t: statistics.median(d[f"{t}.{p}"]) for t in names}
    print(f"{p}: " + ", ".join(f"{names[t]} {med[t]:.0f}" for t in names) + " IOPS (medians)")
    for t in [t for t in ("hyd", "un", "nz") if t in names]:
        paired = statistics.median(a / b for a, b in zip(d[f"{t}.{p}"], d[f"peer.{p}"]))
        paired_kl = statistics.median(a / b for a, b in zip(d[f"{t}.{p}"], d[f"kl.{p}"]))
        verdict = ("met" if paired >= target else "MISSED") if t == "hyd" else "no target"
        print(f"  ratio {names[t]} / rublk loop = {paired:.2f}x (median of {len(d[f'{t}.{p}'])} per-round ratios;"
              f" ratio of medians {med[t] / med['peer']:.2f}x); target {target}x: {verdict};"
              f" / kernel loop = {paired_kl:.2f}x")
    if "peerzc" in names:
        paired = statistics.median(a / b for a, b in zip(d[f"hyd.{p}"], d[f"peerzc.{p}"]))
        print(f"  ratio {names['hyd']} / rublk loop (zero copy) = {paired:.2f}x")
PY
"$bin" stop "$hyd"; "$bin" stop "$un"; [ -z "${nz:-}" ] || "$bin" stop "$nz"; "$rublk" del -a >/dev/null 2>&1 || true; losetup -d "$kl"
rm -rf "$w"

#!/bin/bash
# Kernel compatibility check for ublk-clone's dm-log-writes replayer. Runs INSIDE the VM
# guest (needs root, loop devices and the kernel's dm-log-writes target):
#
#     bash tests/vm/logwrites.sh /path/to/ublk-clone-replay
#
# For each logical block size (512, 4096): record mkfs.ext4 + a small file workload on
# /dev/mapper/<lw> with the KERNEL's log-writes target, then with OUR replayer:
#  1. replay the whole log onto a zeroed image: it must equal the logged device byte for byte;
#  2. for every FUA entry after mark "mkfs", the log prefix through it must give a clean ext4.
#     Method of xfstests generic/482: mount the replayed image once (the kernel replays the
#     journal, as after a real crash), unmount, then `e2fsck -fn` must exit 0. A plain
#     `e2fsck -fn` on an image whose journal needs recovery is not meaningful (it skips the
#     recovery with -n and reports the unreplayed state).
#     The prefix is built incrementally (entries prev+1..cur replayed onto a cumulative image
#     with --start-entry/--limit), which is the same image as a full prefix replay since entries
#     are applied in order; each check runs on a copy so the mount cannot alter the next state.
# Prints one line per check and ends with "N passed, M failed"; exits 1 on any failure.
set -u
REPLAY=${1:?usage: logwrites.sh /path/to/ublk-clone-replay}
DATA_MB=64
LOG_MB=256
pass=0
fail=0
ok() { echo "ok   $*"; pass=$((pass + 1)); }
bad() { echo "FAIL $*"; fail=$((fail + 1)); }
W=$(mktemp -d /tmp/logwrites.XXXXXX)
DM=lw$$
LOOPS=()

cleanup() {
    mountpoint -q "$W/mnt" 2>/dev/null && umount "$W/mnt"
    mountpoint -q "$W/chk" 2>/dev/null && umount "$W/chk"
    dmsetup remove "$DM" 2>/dev/null
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    LOOPS=()
    rm -rf "$W"
}
trap cleanup EXIT

finish() {
    echo "$pass passed, $fail failed"
    [ "$fail" -eq 0 ] && exit 0
    exit 1
}

loop() { # loop <file> <logical block size>: sets LOOPDEV (not in a subshell: LOOPS is global)
    LOOPDEV=$(losetup -f --show -b "$2" "$1") || return 1
    LOOPS+=("$LOOPDEV")
}

unloop() {
    local l keep=()
    for l in "${LOOPS[@]}"; do
        if [ "$l" = "$1" ]; then losetup -d "$l"; else keep+=("$l"); fi
    done
    LOOPS=("${keep[@]}")
}

entry_of() { # "N@pos" -> N
    echo "${1%@*}"
}

modprobe loop 2>/dev/null
[ -x "$REPLAY" ] || { bad "replay binary $REPLAY is not executable"; finish; }
if ! modprobe dm-log-writes 2>/dev/null && ! dmsetup targets | grep -q '^log-writes'; then
    bad "cannot load the dm-log-writes target"
    finish
fi

run_one() { # run_one <logical block size>
    local bs=$1 d=$W/$1 data logdev sectors out mkfs cur prev chk n=0
    mkdir -p "$d" "$W/mnt" "$W/chk"
    truncate -s ${DATA_MB}M "$d/data.img"
    truncate -s ${LOG_MB}M "$d/log.img"
    loop "$d/data.img" "$bs" && data=$LOOPDEV && loop "$d/log.img" 512 && logdev=$LOOPDEV ||
        { bad "bs=$bs: losetup"; return; }
    sectors=$(blockdev --getsz "$data")
    if ! dmsetup create "$DM" --table "0 $sectors log-writes $data $logdev"; then
        bad "bs=$bs: dmsetup create log-writes"
        return
    fi
    # Workload. mkfs with eager inode table/journal init, so no lazy-init thread writes later.
    if ! { mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "/dev/mapper/$DM" &&
        dmsetup message "$DM" 0 mark mkfs &&
        mount "/dev/mapper/$DM" "$W/mnt" &&
        dd if=/dev/urandom of="$W/mnt/big" bs=1M count=4 status=none conv=fsync &&
        cp -r /usr/share/doc/bash "$W/mnt/doc" &&
        mkdir -p "$W/mnt/d1/d2" &&
        for i in $(seq 1 40); do echo "file $i" >"$W/mnt/d1/d2/f$i"; done &&
        sync &&
        rm -f "$W/mnt/d1/d2/f1"* "$W/mnt/big" &&
        dd if=/dev/urandom of="$W/mnt/small" bs=4k count=16 status=none &&
        sync &&
        dmsetup message "$DM" 0 mark workload-done &&
        umount "$W/mnt"; }; then
        bad "bs=$bs: workload on /dev/mapper/$DM"
        return
    fi
    dmsetup remove "$DM" || { bad "bs=$bs: dmsetup remove"; return; }
    unloop "$data"
    unloop "$logdev"
    echo "     bs=$bs: $("$REPLAY" --log "$d/log.img")"

    # 1. Whole log onto a zeroed image == the logged device.
    truncate -s ${DATA_MB}M "$d/replay.img"
    if "$REPLAY" --log "$d/log.img" --replay "$d/replay.img" &&
        cmp -s "$d/replay.img" "$d/data.img"; then
        ok "bs=$bs: whole-log replay equals the logged device"
    else
        bad "bs=$bs: whole-log replay differs from the logged device"
    fi

    # 2. Each FUA after mark mkfs gives a clean file system.
    out=$("$REPLAY" --log "$d/log.img" --find --end-mark mkfs) ||
        { bad "bs=$bs: mark mkfs not found"; return; }
    mkfs=$(entry_of "$out")
    rm -f "$d/base.img"
    truncate -s ${DATA_MB}M "$d/base.img"
    "$REPLAY" --log "$d/log.img" --replay "$d/base.img" --limit $((mkfs + 1)) ||
        { bad "bs=$bs: replay through mark mkfs"; return; }
    prev=$mkfs
    while out=$("$REPLAY" --log "$d/log.img" --find --next-fua --start-entry $((prev + 1)) 2>/dev/null); do
        cur=$(entry_of "$out")
        n=$((n + 1))
        if ! "$REPLAY" --log "$d/log.img" --replay "$d/base.img" \
            --start-entry $((prev + 1)) --limit $((cur - prev)); then
            bad "bs=$bs: replay to FUA entry $cur"; prev=$cur; continue
        fi
        cp --sparse=always "$d/base.img" "$d/check.img"
        chk=
        if loop "$d/check.img" "$bs" && chk=$LOOPDEV && mount "$chk" "$W/chk" && umount "$W/chk" && unloop "$chk" &&
            e2fsck -fn "$d/check.img" >"$d/fsck.out" 2>&1; then
            ok "bs=$bs: FUA entry $cur: clean"
        else
            mountpoint -q "$W/chk" && umount "$W/chk"
            [ -n "$chk" ] && unloop "$chk" 2>/dev/null
            bad "bs=$bs: FUA entry $cur: not clean: $(grep -v '^Pass\|^e2fsck' "$d/fsck.out" | head -3 | tr '\n' ' ')"
        fi
        prev=$cur
    done
    [ "$n" -eq 0 ] && bad "bs=$bs: no FUA entry after mark mkfs"
    rm -rf "$d"
}

for bs in 512 4096; do
    run_one "$bs"
done
finish

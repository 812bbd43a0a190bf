# Fault injection with the kernel's own device-mapper targets (issue 9, "Also build").
# Sourced by tests/vm/suite.sh, which runs each test_fault_* function in its own subshell with
# errexit and reports ok/not ok; the suite's BIN, WORK, fail, say, status_json and json_field
# are used here. Runs INSIDE the test guest, as root.
#
#   fault_dest_error_writes     dm-flakey error_writes under the destination, ext4 workload
#   fault_dest_drop_writes      dm-flakey drop_writes under the destination, ext4 workload
#   fault_metadata_error_writes dm-flakey error_writes under the metadata, ext4 workload
#   fault_source_bad_blocks     dm "error" ranges in a linear table under the source
#   fault_dest_enospc           a small dm-thin pool as the destination runs out of space
#
# The 6.12 guest kernel has no dm-dust (CONFIG_DM_DUST is not set), so bad source blocks are
# dm-linear segments with dm-error segments between them. Every test builds its devices on a
# tmpfs of its own and removes every dm and loop device at its end, even when it fails (an EXIT
# trap in the test's subshell); a device that cannot be removed fails the test.

FAULT_MB=64                    # source = destination size
FAULT_SECTORS=$((FAULT_MB << 11))
FAULT_RS=65536                 # region size used by every test

# --- Devices, tracked for the cleanup -----------------------------------------------------------

f_init() { # f_init NAME: a tmpfs for this test's files, and the cleanup trap
    F=$WORK/fault-$1
    F_TAG=ucf$BASHPID
    F_LOOPS=() F_DMS=() F_CLONES=() F_MNTS=()
    local m
    for m in loop dm-mod dm-flakey dm-thin-pool; do
        modprobe "$m" || fail "modprobe $m failed"
    done
    mkdir -p "$F"
    mount -t tmpfs -o size=1G tmpfs "$F" || fail "cannot mount a tmpfs on $F"
    mkdir -p "$F/mnt" "$F/ref"
    F_MNTS+=("$F/mnt")
    trap f_cleanup EXIT
}

f_cleanup() {
    local rc=$? d i l ok
    set +e # every step runs, whatever failed before
    for d in "${F_MNTS[@]}"; do mountpoint -q "$d" && { umount "$d" || umount -l "$d"; }; done
    for d in "${F_CLONES[@]}"; do "$BIN" stop "$d" >/dev/null 2>&1; done
    udevadm settle 2>/dev/null
    for ((i = ${#F_DMS[@]} - 1; i >= 0; i--)); do
        ok=0
        for _ in $(seq 1 20); do
            dmsetup remove "${F_DMS[i]}" 2>/dev/null && { ok=1; break; }
            sleep 0.5
        done
        [ $ok = 1 ] || { echo "CLEANUP FAILED: dmsetup remove ${F_DMS[i]}: $(dmsetup info -c "${F_DMS[i]}" 2>&1 | tail -n 1)"; rc=1; }
    done
    for l in "${F_LOOPS[@]}"; do
        ok=0
        for _ in $(seq 1 20); do
            losetup -d "$l" 2>/dev/null && { ok=1; break; }
            sleep 0.5
        done
        [ $ok = 1 ] || { echo "CLEANUP FAILED: losetup -d $l"; rc=1; }
    done
    mountpoint -q "$F" && umount "$F"
    exit $rc
}

f_loop() { # f_loop FILE [losetup options]: sets LOOPDEV (call it outside $(...))
    local f=$1; shift
    LOOPDEV=$(losetup -f --show "$@" "$f") || fail "losetup $f"
    F_LOOPS+=("$LOOPDEV")
}

f_dm() { # f_dm NAME TABLE: creates /dev/mapper/NAME (call it outside $(...))
    dmsetup create "$1" --table "$2" || fail "dmsetup create $1 --table '$2'"
    F_DMS+=("$1")
    udevadm settle 2>/dev/null
}

f_dm_switch() { # f_dm_switch NAME TABLE: swaps a live table (suspend, load, resume)
    dmsetup suspend "$1" && dmsetup load "$1" --table "$2" && dmsetup resume "$1" ||
        fail "cannot switch $1 to '$2'"
    say "$1 now: $(dmsetup table "$1")"
}

f_create() { # f_create SOURCE DEST META [options]: sets DEV
    local src=$1 dst=$2 meta=$3; shift 3
    udevadm settle 2>/dev/null
    DEV=$("$BIN" create --source "$src" --dest "$dst" --metadata "$meta" --region-size $FAULT_RS "$@") ||
        fail "create on $src $dst $meta failed"
    [ -b "$DEV" ] || fail "create printed '$DEV', not a block device"
    F_CLONES+=("$DEV")
}

# flakey table states (dm-flakey: up interval 3600 s and down 0 s = always up; up 0 s and down
# 1 s = always down, with the given feature for writes; reads pass through either way).
flakey_up() { echo "0 $2 flakey $1 0 3600 0"; }              # DEV SECTORS
flakey_down() { echo "0 $2 flakey $1 0 0 1 1 $3"; }          # DEV SECTORS FEATURE

# --- Images ----------------------------------------------------------------------------------

# A golden source: ext4 with a 4 MiB random file (golden/untouched.bin, never written by the
# workloads) and a directory of documents; its sha256 goes to $F/ref/untouched.sha.
mk_golden() { # IMG
    rm -rf "$F/gold"
    mkdir -p "$F/gold/golden"
    head -c 4M /dev/urandom >"$F/gold/golden/untouched.bin"
    cp -r /usr/share/doc/bash "$F/gold/golden/doc"
    sha256sum <"$F/gold/golden/untouched.bin" >"$F/ref/untouched.sha"
    truncate -s ${FAULT_MB}M "$1"
    mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 -d "$F/gold" "$1" >/dev/null ||
        fail "mkfs.ext4 -d of the golden image"
    rm -rf "$F/gold"
}

# A pattern source (each 4 KiB block starts with its block number, then noise), as mk_images.
mk_pattern() { # FILE
    python3 - "$1" "$FAULT_MB" <<'PY'
import sys, random
path, mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
data = bytearray(rnd.randbytes(mb << 20))
for blk in range(mb * 256):
    head = b"block %08d " % blk
    data[blk * 4096 : blk * 4096 + len(head)] = head
open(path, "wb").write(data)
PY
}

# --- Checks ----------------------------------------------------------------------------------

flush_dev() { # FLUSH the block device (fsync of the device node); fails when the FLUSH fails
    python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    os.fsync(fd)
except OSError as e:
    print(f"fsync {sys.argv[1]}: {e}"); sys.exit(1)' "$1"
}

# A FLUSH of DEV must reach the clone (its flush count grows) and fail. Call it with no file
# system mounted on DEV: a fsync of the device node fails without sending a FLUSH when writing
# back the device's dirty pages fails, or when an earlier writeback error is reported.
flush_fails() { # DEV WHY
    local f0 f1
    # A new file description reports a writeback error of the device's page cache (from the
    # file system's metadata writes before the umount) once if nobody has seen it yet, and its
    # fsync stops there: let one fsync see it first.
    flush_dev "$1" >/dev/null 2>&1 || true
    f0=$(status_json "$1" | json_field flushes)
    if flush_dev "$1"; then fail "FLUSH succeeded $2"; fi
    f1=$(status_json "$1" | json_field flushes)
    [ "$f1" -gt "$f0" ] || fail "the fsync failed without a FLUSH reaching the clone (flushes $f0 -> $f1)"
}

fua_write_fails() { # DEV: a FUA write (O_DIRECT|O_DSYNC) into the last 4 KiB of DEV must fail
    if dd if=/dev/zero of="$1" bs=4K count=1 seek=$((FAULT_MB * 256 - 1)) oflag=direct,dsync \
        conv=notrunc status=none 2>>"$LOG"; then
        fail "a FUA write to $1 succeeded in mode $(st_mode "$1")"
    fi
}

st_mode() { # DEV: rw, ro or fail
    status_json "$1" | python3 -c '
import json, sys
m = json.load(sys.stdin)["mode"]
print({"ReadWrite": "rw", "ReadOnly": "ro", "Fail": "fail"}.get(m, m))'
}

st_reason() { status_json "$1" | json_field mode_reason; }

dump_live() { # META FIELD: a field of the live superblock in `ublk-clone dump`
    "$BIN" dump "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
live = [s for s in d["superblocks"] if s["live"]][0]["superblock"]
print(live[sys.argv[1]])' "$2"
}

daemon_cpu_ticks() { # DEV: user+system clock ticks of the daemon serving DEV (all threads)
    local pid
    pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' \
        "/run/ublk-clone/${1#/dev/ublkb}.json") || fail "no daemon record for $1"
    awk '{print $14 + $15}' "/proc/$pid/stat"
}

# Writes N fsynced files pre1..preN of 256 KiB (copies kept in $F/ref) on the mounted clone.
write_fsynced() { # PREFIX N
    local i
    for i in $(seq 1 "$2"); do
        head -c 256K /dev/urandom >"$F/ref/$1$i"
        dd if="$F/ref/$1$i" of="$F/mnt/$1$i" bs=64K conv=fsync status=none ||
            fail "fsync of $1$i failed before any fault"
    done
}

# Restarts the stopped clone of META and copies what it shows to $F/copy.img. `start` of a
# degraded clone is refused by releases that cannot start one read-only (issue 9 finding 13);
# then the operator's way back is used: `reset-mode` and `start`.
copy_clone_after_restart() { # META
    local dev
    if dev=$("$BIN" start --metadata "$1" 2>"$F/start.err"); then
        say "start: $dev, mode $(st_mode "$dev")"
    else
        say "start refused: $(tr '\n' ' ' <"$F/start.err"); using reset-mode + start"
        "$BIN" reset-mode "$1" >>"$LOG" 2>&1 || fail "reset-mode $1 failed"
        udevadm settle 2>/dev/null
        dev=$("$BIN" start --metadata "$1") || fail "start after reset-mode failed"
    fi
    [ -b "$dev" ] || fail "start printed '$dev'"
    F_CLONES+=("$dev")
    "$BIN" set "$dev" --hydration false
    dd if="$dev" of="$F/copy.img" bs=1M iflag=direct status=none || fail "reading the restarted clone failed"
    stop "$dev" || fail "stop of the restarted clone failed"
}

# Mounts $F/copy.img (the kernel replays the ext4 journal, as after a crash), compares the files
# named in $F/ref (written by write_fsynced PREFIX) and golden/untouched.bin, and requires
# e2fsck -fn to pass on the result.
verify_copy() { # PREFIX
    local f
    f_loop "$F/copy.img"
    local l=$LOOPDEV
    mount "$l" "$F/mnt" || fail "the copy of the clone does not mount"
    for f in "$F/ref/$1"*; do
        cmp "$f" "$F/mnt/${f##*/}" || fail "${f##*/}, fsynced before the fault, lost or changed"
    done
    [ "$(sha256sum <"$F/mnt/golden/untouched.bin")" = "$(cat "$F/ref/untouched.sha")" ] ||
        fail "golden/untouched.bin (from the source) changed"
    umount "$F/mnt"
    e2fsck -fn "$l" >"$F/fsck.out" 2>&1 || { cat "$F/fsck.out"; fail "e2fsck -fn on the copy reports problems"; }
}

# The destination on dm-flakey over a loop device, metadata a file, source the golden image.
dest_flakey_setup() {
    mk_golden "$F/src"
    truncate -s ${FAULT_MB}M "$F/dst"
    truncate -s 8M "$F/meta"
    f_loop "$F/src" -r; SRC=$LOOPDEV
    f_loop "$F/dst"; DSTLOOP=$LOOPDEV
    DSTDM=$F_TAG-dst
    f_dm "$DSTDM" "$(flakey_up "$DSTLOOP" $FAULT_SECTORS)"
    # Hydration runs through the whole test (64 MiB at 2 MiB/s), in small batches so that user
    # writes never wait long for a region the hydrator holds.
    f_create "$SRC" "/dev/mapper/$DSTDM" "$F/meta" --rate 2M --batch-size 4
    mount "$DEV" "$F/mnt" || fail "the golden ext4 does not mount on the clone"
}

#---------------------------------------------------------------------------------------------

# dm-flakey error_writes under the destination. Defined outcome: writes fail (a file write +
# fsync gets EIO); the first FLUSH that reaches the clone fails and switches it to read-only
# mode with a reason; every later FLUSH and FUA write fails, also once the destination works
# again; the mode and reason are in the metadata after stop; everything fsynced before the
# fault is intact after a restart, and the file system is clean. (A failed plain write alone
# does not change the mode: the clone learns that data may be lost at the FLUSH.)
test_fault_dest_error_writes() {
    f_init dest-error
    dest_flakey_setup
    write_fsynced pre 4
    f_dm_switch "$DSTDM" "$(flakey_down "$DSTLOOP" $FAULT_SECTORS error_writes)"
    head -c 256K /dev/urandom >"$F/post"
    if dd if="$F/post" of="$F/mnt/post" bs=64K conv=fsync status=none 2>>"$LOG"; then
        fail "a file write + fsync succeeded while the destination fails every write"
    fi
    umount "$F/mnt" || fail "umount of the clone's ext4 after the fault"
    flush_fails "$DEV" "while the destination fails every write"
    [ "$(st_mode "$DEV")" = ro ] || fail "mode after a failed FLUSH: $(st_mode "$DEV"), expected ro"
    reason=$(st_reason "$DEV")
    [ -n "$reason" ] || fail "read-only mode without a reason"
    say "mode ro: $reason"
    fua_write_fails "$DEV"
    # The destination works again: the clone must not pretend that what was lost is safe.
    f_dm_switch "$DSTDM" "$(flakey_up "$DSTLOOP" $FAULT_SECTORS)"
    flush_fails "$DEV" "after a failed FLUSH, the destination working again (the failure is not sticky)"
    flush_fails "$DEV" "the second time after a failed FLUSH"
    [ "$(st_mode "$DEV")" = ro ] || fail "mode left ro: $(st_mode "$DEV")"
    stop "$DEV" || fail "stop of the read-only clone failed"
    [ "$(dump_live "$F/meta" mode)" = read-only ] || fail "dump after stop: mode $(dump_live "$F/meta" mode), expected read-only"
    [ -n "$(dump_live "$F/meta" mode_reason)" ] || fail "dump after stop: no mode reason"
    say "persisted: $(dump_live "$F/meta" mode): $(dump_live "$F/meta" mode_reason)"
    copy_clone_after_restart "$F/meta"
    verify_copy pre
}

# dm-flakey drop_writes under the destination: writes are acknowledged and silently dropped, and
# FLUSHes succeed. Nothing of this is visible to the clone, so the design guarantees only this:
# it stays in read-write mode and keeps working (no crash; stop, check and start work), and data
# fsynced BEFORE the drop began reads back intact after a restart, because its regions were
# hydrated and committed before, and a dropped write cannot change the destination. After the
# drop, regions may be committed as hydrated whose copy never arrived: their content (and so the
# file system on the clone) is not guaranteed, and is not checked. The test checks that the drop
# was real: the data of a file written and fsynced after it is not on the destination.
test_fault_dest_drop_writes() {
    f_init dest-drop
    dest_flakey_setup
    write_fsynced pre 4
    # Where each file lies on the clone, and that the clone shows it there before the drop.
    mkdir -p "$F/x"
    for i in 1 2 3 4; do
        extents_of "$F/mnt/pre$i" >"$F/x/pre$i.ext"
        read_extents "$DEV" "$F/x/pre$i.ext" "$F/x/pre$i.dev" && cmp "$F/ref/pre$i" "$F/x/pre$i.dev" ||
            fail "pre$i: the clone does not show the file's data at its extents before the drop"
    done
    f_dm_switch "$DSTDM" "$(flakey_down "$DSTLOOP" $FAULT_SECTORS drop_writes)"
    head -c 256K /dev/urandom >"$F/post"
    dd if="$F/post" of="$F/mnt/post" bs=64K conv=fsync status=none ||
        fail "fsync failed under drop_writes (the target acknowledges everything)"
    extents_of "$F/mnt/post" >"$F/post.ext"
    umount "$F/mnt" || fail "umount under drop_writes"
    f0=$(status_json "$DEV" | json_field flushes)
    flush_dev "$DEV" || fail "FLUSH failed under drop_writes"
    [ "$(status_json "$DEV" | json_field flushes)" -gt "$f0" ] || fail "the FLUSH did not reach the clone"
    [ "$(st_mode "$DEV")" = rw ] || fail "mode $(st_mode "$DEV") under drop_writes: nothing was reported to the clone"
    stop "$DEV" || fail "stop under drop_writes"
    f_dm_switch "$DSTDM" "$(flakey_up "$DSTLOOP" $FAULT_SECTORS)"
    "$BIN" check "$F/meta" >>"$LOG" 2>&1 || fail "check of the metadata after the drop"
    udevadm settle 2>/dev/null
    DEV=$("$BIN" start --metadata "$F/meta") || fail "start after the drop"
    F_CLONES+=("$DEV")
    "$BIN" set "$DEV" --hydration false
    for i in 1 2 3 4; do
        read_extents "$DEV" "$F/x/pre$i.ext" "$F/x/pre$i.dev" || fail "reading pre$i's extents after restart"
        cmp "$F/ref/pre$i" "$F/x/pre$i.dev" || fail "pre$i, fsynced before the drop, changed after restart"
    done
    read_extents "$DEV" "$F/post.ext" "$F/post.dev" || fail "reading post's extents after restart"
    if cmp -s "$F/post" "$F/post.dev"; then
        fail "the file written under drop_writes is on the destination: the fault was not injected"
    fi
    stop "$DEV" || fail "stop after restart"
}

# Physical extents of a file on ext4 (4 KiB blocks), as "LOGICAL PHYSICAL LENGTH" lines.
extents_of() { # FILE
    filefrag -b4096 -e "$1" >"$F/filefrag.out" || fail "filefrag $1"
    awk '/^ *[0-9]+:/ { gsub(/\.\./, " "); gsub(/:/, " "); print $2, $4, $6 }' "$F/filefrag.out"
}

# Reads the blocks of an extent list from DEV (O_DIRECT) in logical order into OUT, cut to
# 256 KiB (the size of every file the tests write).
read_extents() { # DEV EXTFILE OUT
    python3 - "$@" <<'PY'
import mmap, os, sys
dev, ext, out = sys.argv[1:4]
fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
data = bytearray()
for line in open(ext):
    logical, phys, length = map(int, line.split())
    buf = mmap.mmap(-1, length * 4096)
    n = os.preadv(fd, [buf], phys * 4096)
    if n != length * 4096:
        sys.exit(f"short read at block {phys}")
    end = (logical + length) * 4096
    if len(data) < end:
        data += bytes(end - len(data))
    data[logical * 4096:end] = buf[:]
if not data:
    sys.exit(f"{ext}: no extents")
open(out, "wb").write(bytes(data[:256 * 1024]))
PY
}

# dm-flakey error_writes under the METADATA device. Defined outcome: the next commit fails and
# the clone leaves read-write mode (fail: the mode cannot be recorded either) with a reason,
# before any FLUSH that needed the commit is answered; every later FLUSH fails, also once the
# metadata device works again; stop works; the metadata on disk is consistent (the last good
# commit, or that with the mode recorded), and everything fsynced before the fault is intact
# after a restart, with a clean file system.
test_fault_metadata_error_writes() {
    f_init meta-error
    mk_golden "$F/src"
    truncate -s ${FAULT_MB}M "$F/dst"
    truncate -s 8M "$F/meta"
    f_loop "$F/src" -r; SRC=$LOOPDEV
    f_loop "$F/meta"; METALOOP=$LOOPDEV
    METADM=$F_TAG-meta
    f_dm "$METADM" "$(flakey_up "$METALOOP" 16384)"
    f_create "$SRC" "$F/dst" "/dev/mapper/$METADM" --rate 2M --batch-size 4
    mount "$DEV" "$F/mnt" || fail "the golden ext4 does not mount on the clone"
    write_fsynced pre 4
    f_dm_switch "$METADM" "$(flakey_down "$METALOOP" 16384 error_writes)"
    # New files need copy-on-write hydration (new bits, so a commit), and background hydration
    # keeps setting bits: the next commit must fail.
    head -c 256K /dev/urandom >"$F/post"
    if dd if="$F/post" of="$F/mnt/post" bs=64K conv=fsync status=none 2>>"$LOG"; then
        say "post-fault fsync succeeded (its regions needed no new bit)"
    fi
    umount "$F/mnt" || fail "umount after the metadata fault"
    local t_end=$((SECONDS + 15))
    while [ $SECONDS -lt $t_end ] && [ "$(st_mode "$DEV")" = rw ]; do
        flush_dev "$DEV" >/dev/null && sleep 0.5
    done
    mode=$(st_mode "$DEV")
    [ "$mode" = fail ] || [ "$mode" = ro ] || fail "mode $mode 15 s after the metadata device began failing writes"
    [ -n "$(st_reason "$DEV")" ] || fail "mode $mode without a reason"
    say "mode $mode: $(st_reason "$DEV")"
    flush_fails "$DEV" "after a failed commit"
    fua_write_fails "$DEV"
    f_dm_switch "$METADM" "$(flakey_up "$METALOOP" 16384)"
    flush_fails "$DEV" "once the metadata device works again (the failure is not sticky)"
    stop "$DEV" || fail "stop after the metadata fault"
    "$BIN" check "/dev/mapper/$METADM" >"$F/check.out" 2>&1 ||
        { cat "$F/check.out"; fail "check: the metadata is not consistent after failed commits"; }
    say "metadata after stop: mode $(dump_live "/dev/mapper/$METADM" mode) ($(dump_live "/dev/mapper/$METADM" mode_reason)), generation $(dump_live "/dev/mapper/$METADM" generation)"
    copy_clone_after_restart "/dev/mapper/$METADM"
    verify_copy pre
}

# Unreadable source blocks (dm-error segments in a linear table over the source). Defined
# outcome: reads of those regions get EIO and every other region reads the source's data,
# before and after hydration; hydration finishes every other region, and the status lists
# exactly those regions in failed_regions (hydrated = regions - failed).
test_fault_source_bad_blocks() {
    f_init source-bad
    mk_pattern "$F/src"
    truncate -s ${FAULT_MB}M "$F/dst"
    truncate -s 8M "$F/meta"
    f_loop "$F/src" -r; local sl=$LOOPDEV
    # Bad: one sector inside region 100, regions 300-302 whole, the last 8 sectors of region 700
    # (sector numbers; 128 sectors per region). None of them is one of the 64 blocks that create
    # reads to fingerprint the source (regions 0, 16, 32, 48, 65, ... 1023 at this size): a bad
    # block there makes create refuse the source ("cannot fingerprint the source").
    local s1=$((100 * 128 + 37)) s2=$((300 * 128)) s3=$((701 * 128 - 8))
    local table
    table="0 $s1 linear $sl 0
$s1 1 error
$((s1 + 1)) $((s2 - s1 - 1)) linear $sl $((s1 + 1))
$s2 384 error
$((s2 + 384)) $((s3 - s2 - 384)) linear $sl $((s2 + 384))
$s3 8 error
$((s3 + 8)) $((FAULT_SECTORS - s3 - 8)) linear $sl $((s3 + 8))"
    local bad="100 300 301 302 700" nbad=5
    f_dm "$F_TAG-src" "$table"
    f_create "/dev/mapper/$F_TAG-src" "$F/dst" "$F/meta" --no-hydration
    read_regions "$DEV" "$F/src" "$bad" || fail "reads before hydration (see above)"
    "$BIN" set "$DEV" --hydration true
    local st h n failed t_end=$((SECONDS + 300))
    while [ $SECONDS -lt $t_end ]; do
        st=$(status_json "$DEV")
        h=$(echo "$st" | json_field hydrated); n=$(echo "$st" | json_field regions)
        failed=$(echo "$st" | python3 -c 'import json,sys; print(" ".join(map(str, json.load(sys.stdin)["failed_regions"])))')
        [ $((h + $(echo "$failed" | wc -w))) -ge "$n" ] && break
        sleep 0.5
    done
    say "after hydration: $h/$n hydrated, failed regions: $failed"
    [ "$failed" = "$bad" ] || fail "failed_regions '$failed', expected '$bad'"
    # status --watch ends (exit 1, saying why) when only failed regions are left.
    local wout wrc=0
    wout=$(timeout 60 "$BIN" status "$DEV" --watch 2>&1) || wrc=$?
    say "status --watch: rc $wrc: $(echo "$wout" | tail -n 1)"
    [ $wrc = 1 ] && echo "$wout" | grep -q "hydration ended at $h of $n regions: $nbad regions failed to hydrate" \
        || fail "status --watch with failed regions: rc $wrc: $wout"
    [ "$h" = $((n - nbad)) ] || fail "hydrated $h, expected $((n - nbad)) (regions - failed)"
    read_regions "$DEV" "$F/src" "$bad" || fail "reads after hydration (see above)"
    stop "$DEV" || fail "stop"
    [ "$("$BIN" dump "$F/meta" | json_field hydrated)" = $((n - nbad)) ] || fail "dump: hydrated is not regions - failed"
}

# Reads every region of DEV with O_DIRECT: the regions listed must fail with EIO, every other
# one must equal the same region of SRC.
read_regions() { # DEV SRC "BAD REGIONS"
    python3 - "$1" "$2" "$3" $FAULT_RS <<'PY'
import errno, mmap, os, sys
dev, src, bad, rs = sys.argv[1], sys.argv[2], set(map(int, sys.argv[3].split())), int(sys.argv[4])
fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
ref = open(src, "rb")
n = os.path.getsize(src) // rs
buf = mmap.mmap(-1, rs)
eio, wrong = set(), []
for r in range(n):
    try:
        got = os.preadv(fd, [buf], r * rs)
    except OSError as e:
        if e.errno == errno.EIO:
            eio.add(r)
        else:
            wrong.append(f"region {r}: {e}")
        continue
    ref.seek(r * rs)
    if got != rs or buf[:] != ref.read(rs):
        wrong.append(f"region {r}: differs from the source")
if eio != bad:
    wrong.append(f"EIO on regions {sorted(eio)}, expected {sorted(bad)}")
for w in wrong[:10]:
    print(w)
sys.exit(1 if wrong else 0)
PY
}

# A small dm-thin pool (16 MiB of data for a 64 MiB thin volume) as the destination, with
# error_if_no_space. Defined outcome once the pool is full: writes that need new space fail
# with EIO; writes to provisioned regions and all reads keep working; the status reports the
# failure (a degraded mode with its reason: failing hydration writes are retried a bounded
# number of times, issue 9 finding 12); the daemon does not spin; stop works.
test_fault_dest_enospc() {
    f_init dest-enospc
    mk_pattern "$F/src"
    truncate -s 4M "$F/tmeta"
    truncate -s 16M "$F/tdata"
    truncate -s 8M "$F/meta"
    f_loop "$F/src" -r; local sl=$LOOPDEV
    f_loop "$F/tmeta"; local tm=$LOOPDEV
    f_loop "$F/tdata"; local td=$LOOPDEV
    local pool=$F_TAG-pool thin=$F_TAG-thin
    f_dm "$pool" "0 $((16 << 11)) thin-pool $tm $td 128 0 2 error_if_no_space skip_block_zeroing"
    dmsetup message "$pool" 0 "create_thin 0" || fail "create_thin"
    f_dm "$thin" "0 $FAULT_SECTORS thin /dev/mapper/$pool 0"
    f_create "$sl" "/dev/mapper/$thin" "$F/meta"
    local t0=$SECONDS
    while [ $SECONDS -lt $((t0 + 150)) ] && ! dmsetup status "$pool" | grep -q out_of_data_space; do
        sleep 0.5
    done
    dmsetup status "$pool" | grep -q out_of_data_space || fail "the pool never ran out of space: $(dmsetup status "$pool")"
    say "pool full after $((SECONDS - t0)) s: $(dmsetup status "$pool")"
    # A write into an unprovisioned region (hydration filled the pool from region 0 up).
    head -c 64K /dev/urandom >"$F/w"
    if dd if="$F/w" of="$DEV" bs=64K seek=900 oflag=direct conv=notrunc status=none 2>"$F/dd.err"; then
        fail "a write needing new pool space succeeded"
    fi
    grep -qi "input/output error\|no space" "$F/dd.err" || fail "write failed with '$(cat "$F/dd.err")', expected EIO or ENOSPC"
    # A provisioned region (region 5, hydrated first) still takes writes; reads work.
    dd if="$F/w" of="$DEV" bs=64K seek=5 oflag=direct conv=notrunc status=none ||
        fail "a write into a provisioned region failed"
    cmp "$F/w" <(dd if="$DEV" bs=64K skip=5 count=1 iflag=direct status=none) || fail "region 5 did not read back"
    for r in 10 800; do
        cmp <(dd if="$DEV" bs=64K skip=$r count=1 iflag=direct status=none) \
            <(dd if="$F/src" bs=64K skip=$r count=1 status=none) || fail "region $r does not read the source's data"
    done
    # (Time limits by the clock: a spinning daemon makes every status call slow.)
    local mode=rw t_end=$((SECONDS + 30))
    while [ $SECONDS -lt $t_end ]; do
        mode=$(st_mode "$DEV"); [ "$mode" = rw ] || break
        sleep 1
    done
    local c0 c1
    c0=$(daemon_cpu_ticks "$DEV"); sleep 5; c1=$(daemon_cpu_ticks "$DEV")
    say "daemon CPU over 5 s with the pool full: $((c1 - c0)) ticks of $(getconf CLK_TCK)/s; mode $mode"
    [ "$mode" != rw ] || fail "30 s after the pool filled the status reports nothing (mode rw, no reason): $(status_json "$DEV" | tr -d '\n' | cut -c1-400)"
    [ -n "$(st_reason "$DEV")" ] || fail "mode $mode without a reason"
    [ $((c1 - c0)) -lt "$(getconf CLK_TCK)" ] || fail "the daemon spins: $((c1 - c0)) CPU ticks in 5 s"
    timeout 60 "$BIN" stop "$DEV" >>"$LOG" 2>&1 || fail "stop with the pool full"
}

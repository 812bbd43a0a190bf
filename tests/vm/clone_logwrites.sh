#!/bin/bash
# Crash consistency of a clone on the real kernel, the generic/482 method applied to ublk-clone.
# Runs INSIDE the VM guest (root, loop devices, ublk_drv, the kernel's dm-log-writes target):
#
#     [RECORDER=kernel|daemon] bash tests/vm/clone_logwrites.sh /path/to/ublk-clone [/path/to/ublk-clone-replay]
#
# RECORDER=daemon records with the daemon itself instead (`create --log-writes`, marks with
# `ublk-clone mark`): the same layout in one log, then the same crash-point checks; the
# "logged device" to compare the whole replay with is built from the destination and metadata
# files after the stop.
#
# Recording (kernel): one loop device is the "logged device", holding the clone's destination at
# sector 0 and its metadata at metadata_base = dest size rounded up to 1 MiB (the layout of
# docs/log-writes.md). The KERNEL's log-writes target sits on it (/dev/mapper/$LW), and two
# dm-linear devices over it are the clone's --dest and --metadata, so one log keeps the relative
# order of destination writes and metadata commits. The source is a golden image: an ext4 file
# system made on the source file (golden/untouched.bin, a file the workload never writes, and
# golden/edit.bin, one it overwrites in place), never formatted on the clone, so the workload's
# writes into it are copy-on-write hydrations. Background hydration runs throughout, slowly
# (RATE, one region per copy) so that the clone is only partially hydrated at every crash point.
# On the clone: mark "workload", mount, a small file workload with fsync/sync/deletes and
# in-place overwrites of a golden file, umount, `ublk-clone stop`, then the devices are removed
# (end mark).
#
# Crash points: the clone makes data durable with fdatasync on its destination and metadata
# (never with FUA writes), so the logged device sees empty FLUSH requests; the kernel logs each
# one as a FLUSH entry after the writes completed before it was issued. Every FLUSH or FUA entry
# after mark "workload" is a crash point (all of them, or CAP of them evenly spread, always
# including the last). For each, with our replayer, the log prefix 0..=k is replayed onto a
# zeroed image of the logged device (incrementally, as logwrites.sh does), and on a copy:
#  1. `ublk-clone check` on the metadata range: exit 0 and no problems (notes allowed: bitmap
#     shadow slots or a torn superblock copy left by an interrupted commit, which the open
#     ignores and rewrites). Anything else fails.
#  2. `ublk-clone dump` on the metadata range: the state must be partially hydrated (hydrated <
#     regions), else the crash point tests nothing of copy-on-write; its generation is counted
#     (at least two distinct generations over the checked states).
#  3. `ublk-clone create --no-hydration --dest-moved` (the replayed copy is a moved destination) on the two ranges (losetup --offset/--sizelimit), with
#     the same source file: it must start (it resumes the clone's metadata).
#  4. mount the clone device (the kernel replays the ext4 journal, as after a real crash),
#     golden/untouched.bin must read back as on the source, umount, `e2fsck -fn` on the clone
#     device must exit 0; `ublk-clone stop`.
# Also: the whole log replayed must equal the logged device byte for byte.
# Prints one line per state and "N passed, M failed"; exits 1 on any failure, including "no
# crash point found" and "the clone could not be created" while recording. On failure the
# daemon log, dmesg and the failing metadata go to $KEEP (under /tmp, readable from the host).
set -u
BIN=$(readlink -f "${1:?usage: clone_logwrites.sh /path/to/ublk-clone [/path/to/ublk-clone-replay]}")
REPLAY=$(readlink -f "${2:-$(dirname "$BIN")/ublk-clone-replay}")
CAP=${CAP:-30}              # most crash points checked (about 5 s each under TCG)
SRC_MB=${SRC_MB:-64}        # source = destination size
META_MB=4
LOG_MB=512
RECORDER=${RECORDER:-kernel}
RATE=${RATE:-1M}            # background hydration rate while recording: 16 regions/s, so about
                            # 64 s for all 1024 regions; the recording takes 5-10 s
pass=0
fail=0
ok() { echo "ok   $*"; pass=$((pass + 1)); }
bad() { echo "FAIL $*"; fail=$((fail + 1)); }

W=$(mktemp -d /tmp/clone-logwrites.XXXXXX)
KEEP=/tmp/clone-logwrites-fail.$$
LW=clw$$
DDEV=clonedest$$
MDEV=clonemeta$$
LOOPS=()
CLONES=()
DAEMON_LOG=/run/ublk-clone/daemon.log

cleanup() {
    local d l
    for d in "$W/mnt" "$W/chk"; do mountpoint -q "$d" 2>/dev/null && umount "$d"; done
    for d in "${CLONES[@]}"; do "$BIN" stop "$d" >/dev/null 2>&1; done
    for d in "$DDEV" "$MDEV" "$LW"; do dmsetup remove "$d" 2>/dev/null; done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    mountpoint -q "$W" && umount "$W"
    rm -rf "$W"
}
trap cleanup EXIT

finish() {
    echo "$pass passed, $fail failed"
    [ "$fail" -eq 0 ] && [ "$pass" -gt 0 ] && exit 0
    exit 1
}

keep() { # keep NAME FILE...: save evidence of a failure where the host can read it
    local name=$1; shift
    mkdir -p "$KEEP/$name"
    cp "$@" "$KEEP/$name/" 2>/dev/null
    [ -f "$DAEMON_LOG" ] && cp "$DAEMON_LOG" "$KEEP/$name/daemon.log"
    dmesg | tail -n 60 >"$KEEP/$name/dmesg.txt"
    echo "     evidence kept in $KEEP/$name"
}

loop() { # loop FILE [losetup options]: sets LOOPDEV (not in a subshell: LOOPS is global)
    local f=$1; shift
    LOOPDEV=$(losetup -f --show "$@" "$f") || return 1
    LOOPS+=("$LOOPDEV")
}

unloop() {
    local l keep=()
    for l in "${LOOPS[@]}"; do
        if [ "$l" = "$1" ]; then losetup -d "$l"; else keep+=("$l"); fi
    done
    LOOPS=("${keep[@]}")
}

create() { # create DEST META [options]: sets CLONEDEV
    local dest=$1 meta=$2; shift 2
    CLONEDEV=$("$BIN" create --source "$W/src" --dest "$dest" --metadata "$meta" "$@" 2>"$W/create.err") &&
        [ -b "$CLONEDEV" ] || { cat "$W/create.err" >&2; return 1; }
    CLONES+=("$CLONEDEV")
}

stop_clone() {
    local d keep=()
    "$BIN" stop "$1" >/dev/null 2>"$W/stop.err" || { cat "$W/stop.err" >&2; return 1; }
    for d in "${CLONES[@]}"; do [ "$d" = "$1" ] || keep+=("$d"); done
    CLONES=("${keep[@]}")
}

modprobe loop 2>/dev/null
modprobe ublk_drv 2>/dev/null
[ -x "$BIN" ] || { bad "$BIN is not executable"; finish; }
[ -x "$REPLAY" ] || { bad "$REPLAY is not executable"; finish; }
[ -c /dev/ublk-control ] || { bad "no ublk (/dev/ublk-control missing)"; finish; }
[ "$RECORDER" = kernel ] || [ "$RECORDER" = daemon ] || { bad "RECORDER=$RECORDER: kernel or daemon"; finish; }
if [ "$RECORDER" = kernel ] && ! modprobe dm-log-writes 2>/dev/null && ! dmsetup targets | grep -q '^log-writes'; then
    bad "cannot load the dm-log-writes target"
    finish
fi
# Work in a guest-local tmpfs: the shared /tmp is much slower under TCG.
mount -t tmpfs -o size=1536M tmpfs "$W" || { bad "cannot mount a tmpfs on $W"; finish; }
mkdir -p "$W/mnt" "$W/chk"

DEST_BYTES=$((SRC_MB << 20))
META_BASE=$(((DEST_BYTES + (1 << 20) - 1) >> 20 << 20))
META_BYTES=$((META_MB << 20))
TOTAL_BYTES=$((META_BASE + META_BYTES))
t0=$SECONDS

#--- Recording ---------------------------------------------------------------------------------
# The golden source: random file contents, so a region read from the wrong side shows.
mkdir -p "$W/gold/golden"
head -c 4M /dev/urandom >"$W/gold/golden/untouched.bin"
head -c 2M /dev/urandom >"$W/gold/golden/edit.bin"
cp -r /usr/share/doc/coreutils "$W/gold/golden/doc" 2>/dev/null || cp -r /usr/share/doc/bash "$W/gold/golden/doc"
untouched_sha=$(sha256sum <"$W/gold/golden/untouched.bin")
truncate -s "$DEST_BYTES" "$W/src"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$W/gold" "$W/src" >/dev/null ||
    { bad "mkfs.ext4 -d of the golden source image"; finish; }
rm -rf "$W/gold"
mark() { # mark NAME: a mark in the log, from the kernel target or from the daemon
    if [ "$RECORDER" = kernel ]; then dmsetup message "$LW" 0 mark "$1"; else "$BIN" mark "$dev" "$1" >/dev/null; fi
}
if [ "$RECORDER" = kernel ]; then
    truncate -s "$TOTAL_BYTES" "$W/data.img"      # zeroed logged device (blank metadata = format)
    truncate -s ${LOG_MB}M "$W/log.img"
    loop "$W/data.img" && data=$LOOPDEV && loop "$W/log.img" && logdev=$LOOPDEV ||
        { bad "losetup of the logged device and the log"; finish; }
    if ! { dmsetup create "$LW" --table "0 $((TOTAL_BYTES / 512)) log-writes $data $logdev" &&
        dmsetup create "$DDEV" --table "0 $((DEST_BYTES / 512)) linear /dev/mapper/$LW 0" &&
        dmsetup create "$MDEV" --table "0 $((META_BYTES / 512)) linear /dev/mapper/$LW $((META_BASE / 512))"; }; then
        bad "dmsetup create of log-writes and the two linear ranges"
        finish
    fi
    # Blank metadata is formatted by create; make sure the range is zero (it is, a fresh sparse file).
    udevadm settle 2>/dev/null
    cmp -s -n "$META_BYTES" "/dev/mapper/$MDEV" /dev/zero || { bad "metadata range is not zero"; finish; }
    if ! create "/dev/mapper/$DDEV" "/dev/mapper/$MDEV" --region-size 64K --rate "$RATE" --batch-size 1; then
        bad "ublk-clone create on the logged devices failed (see above)"
        keep record "$W/create.err"
        finish
    fi
else
    truncate -s "$DEST_BYTES" "$W/dst"
    truncate -s "$META_BYTES" "$W/meta"
    if ! create "$W/dst" "$W/meta" --region-size 64K --rate "$RATE" --batch-size 1 \
        --log-writes "$W/log.img" --log-writes-size ${LOG_MB}M; then
        bad "ublk-clone create --log-writes failed (see above)"
        keep record "$W/create.err"
        finish
    fi
fi
dev=$CLONEDEV
echo "     recording ($RECORDER): clone $dev, hydration rate $RATE"
if ! { mark workload &&
    mount "$dev" "$W/mnt" &&
    dd if=/dev/urandom of="$W/mnt/big" bs=1M count=4 status=none conv=fsync &&
    dd if=/dev/urandom of="$W/mnt/golden/edit.bin" bs=4k count=8 seek=37 status=none conv=notrunc,fsync &&
    cp -r /usr/share/doc/bash "$W/mnt/doc" &&
    mkdir -p "$W/mnt/d1/d2" &&
    for i in $(seq 1 40); do echo "file $i" >"$W/mnt/d1/d2/f$i"; done &&
    sync &&
    dd if=/dev/urandom of="$W/mnt/synced" bs=4k count=8 status=none conv=fsync &&
    rm -f "$W/mnt/d1/d2/f1"* "$W/mnt/big" &&
    dd if=/dev/urandom of="$W/mnt/small" bs=4k count=16 status=none &&
    dd if=/dev/urandom of="$W/mnt/golden/edit.bin" bs=4k count=3 seek=300 status=none conv=notrunc &&
    mv "$W/mnt/doc" "$W/mnt/d1/doc" &&
    sync &&
    mark workload-done &&
    umount "$W/mnt"; }; then
    bad "workload on the clone $dev"
    keep record
    finish
fi
st=$("$BIN" status "$dev" 2>&1 | head -n 2 | tr '\n' ' ')
stop_clone "$dev" || { bad "ublk-clone stop $dev"; keep record; finish; }
if [ "$RECORDER" = kernel ]; then
    dmsetup remove "$DDEV" && dmsetup remove "$MDEV" && dmsetup remove "$LW" ||
        { bad "dmsetup remove"; finish; }
    unloop "$data"
    unloop "$logdev"
else
    # The logged device as the daemon saw it: destination at 0, metadata at META_BASE.
    cp --sparse=always "$W/dst" "$W/data.img" && truncate -s "$TOTAL_BYTES" "$W/data.img" &&
        dd if="$W/meta" of="$W/data.img" bs=1M seek=$((META_BASE >> 20)) conv=notrunc,sparse status=none ||
        { bad "cannot assemble the logged device image"; finish; }
    "$REPLAY" --log "$W/log.img" --find --end-mark ublk-clone-start >/dev/null ||
        bad "the daemon's log has no mark ublk-clone-start"
fi
echo "     recorded in $((SECONDS - t0)) s; clone status at stop: $st"
echo "     log: $("$REPLAY" --log "$W/log.img")"

#--- Crash points ------------------------------------------------------------------------------
"$REPLAY" --log "$W/log.img" --list >"$W/list" || { bad "cannot list the log"; finish; }
wl=$(awk -F'[@ ]' '/MARK "workload"/ {print $1; exit}' "$W/list")
[ -n "$wl" ] || { bad "mark workload not found in the log"; finish; }
awk -F'[@ ]' -v m="$wl" '$1 > m && $3 ~ /FLUSH|FUA/ {print $1}' "$W/list" >"$W/points"
n_flush=$(awk -F'[@ ]' -v m="$wl" '$1 > m && $3 ~ /FLUSH/' "$W/list" | wc -l)
n_fua=$(awk -F'[@ ]' -v m="$wl" '$1 > m && $3 ~ /FUA/' "$W/list" | wc -l)
total=$(wc -l <"$W/points")
echo "     after mark workload (entry $wl): $n_flush FLUSH and $n_fua FUA entries"
[ "$total" -gt 0 ] || { bad "no FLUSH or FUA entry after mark workload: nothing to check"; finish; }
# Cross-check with the replayer's own search for the first one.
first=$("$REPLAY" --log "$W/log.img" --find --next-flush --start-entry $((wl + 1)))
[ "${first%@*}" = "$(head -n 1 "$W/points")" ] || [ "$n_fua" -gt 0 ] ||
    bad "--find --next-flush gives '$first', --list gives entry $(head -n 1 "$W/points")"
if [ "$total" -le "$CAP" ]; then
    cp "$W/points" "$W/chosen"
else # CAP evenly spread, the last one always included
    awk -v t="$total" -v c="$CAP" '{ a[NR] = $1 } END {
        for (i = 1; i <= c; i++) { k = int((i * t + c - 1) / c); if (k != prev) print a[k]; prev = k } }' \
        "$W/points" >"$W/chosen"
fi
[ "$(tail -n 1 "$W/chosen")" = "$(tail -n 1 "$W/points")" ] || bad "the last crash point was not chosen"
echo "     checking $(wc -l <"$W/chosen") of $total crash points"

# check_meta FILE_OR_DEV: 0 if healthy (notes allowed); prints a summary.
check_meta() {
    local rc
    "$BIN" check --json "$1" >"$W/check.json" 2>"$W/check.err" && rc=0 || rc=$?
    python3 - "$W/check.json" "$rc" <<'PY'
import json, re, sys
path, rc = sys.argv[1], int(sys.argv[2])
try:
    r = json.load(open(path))
except Exception as e:
    print(f"check exit {rc}, no report ({e})"); sys.exit(1)
probs = r.get("problems", [])
notes = r.get("notes", [])
head = f"gen {r.get('generation')}, {r.get('hydrated')}/{r.get('nr_regions')} hydrated"
if rc == 0 and not probs and not r.get("unreadable"):
    shadow = [n for n in notes if re.fullmatch(r"bitmap block \d+ slot [AB]", n["location"])]
    if notes:
        head += (f", {len(shadow)} interrupted-commit shadow slot(s)"
                 f" and {len(notes) - len(shadow)} other note(s)")
    print(head); sys.exit(0)
print(f"check exit {rc}: " + "; ".join(f"{p['location']}: {p['message']}" for p in probs))
sys.exit(1)
PY
}

truncate -s "$TOTAL_BYTES" "$W/base.img"
prev=-1
max_hydrated=0
: >"$W/generations"
shadows=0
while read -r cur <&3; do
    if ! "$REPLAY" --log "$W/log.img" --replay "$W/base.img" \
        --start-entry $((prev + 1)) --limit $((cur - prev)); then
        bad "entry $cur: replay failed"; prev=$cur; continue
    fi
    prev=$cur
    cp --sparse=always "$W/base.img" "$W/check.img"
    ld= lm= why= meta=
    rm -f "$W/locks.txt"
    if ! loop "$W/check.img" --offset 0 --sizelimit "$DEST_BYTES"; then why="losetup dest"; else ld=$LOOPDEV; fi
    if [ -z "$why" ]; then
        if loop "$W/check.img" --offset "$META_BASE" --sizelimit "$META_BYTES"; then lm=$LOOPDEV; else why="losetup metadata"; fi
    fi
    if [ -z "$why" ]; then
        meta=$(check_meta "$lm") || why="metadata: $meta"
        case $meta in *shadow*) shadows=$((shadows + 1)) ;; esac
    fi
    # A partially hydrated state (copy-on-write and source reads matter); its generation.
    if [ -z "$why" ]; then
        if ! "$BIN" dump "$lm" >"$W/dump.json" 2>"$W/dump.err"; then
            why="dump failed: $(tr '\n' ' ' <"$W/dump.err")"
        else
            gen= hyd= nreg=
            read -r gen hyd nreg < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["generation"], d["hydrated"], d["nr_regions"])' "$W/dump.json")
            if [ -z "$nreg" ]; then
                why="dump output unreadable"
            else
                echo "$gen" >>"$W/generations"
                [ "$hyd" -lt "$nreg" ] || why="fully hydrated ($hyd/$nreg, generation $gen): the state does not test copy-on-write"
                [ "$hyd" -gt "$max_hydrated" ] && max_hydrated=$hyd
            fi
        fi
    fi
    # udev probes a freshly attached loop device holding a shared flock on it, and create's
    # exclusive lock must not race with that: wait for udev first.
    udevadm settle 2>/dev/null
    if [ -z "$why" ] && ! create "$ld" "$lm" --no-hydration --dest-moved 2>"$W/create.out"; then
        why="create failed: $(tr '\n' ' ' <"$W/create.out")"
        { cat /proc/locks; fuser -v "$ld" "$lm"; ps -eo pid,comm,args | grep -i 'udev\|ublk\|blkid'; } >"$W/locks.txt" 2>&1
    fi
    if [ -z "$why" ]; then
        cdev=$CLONEDEV
        if ! mount "$cdev" "$W/chk" 2>"$W/mount.err"; then
            why="mount failed: $(tr '\n' ' ' <"$W/mount.err")"
        elif [ "$(sha256sum <"$W/chk/golden/untouched.bin")" != "$untouched_sha" ]; then
            why="golden/untouched.bin differs from the source's"
        elif ! umount "$W/chk"; then
            why="umount failed"
        elif ! e2fsck -fn "$cdev" >"$W/fsck.out" 2>&1; then
            why="e2fsck -fn: $(grep -v '^Pass\|^e2fsck\|^/dev' "$W/fsck.out" | head -n 4 | tr '\n' ' ')"
        fi
        mountpoint -q "$W/chk" && umount "$W/chk"
        stop_clone "$cdev" || why="${why:+$why; }stop failed"
    fi
    if [ -z "$why" ]; then
        ok "entry $cur: check ok ($meta), generation $gen, $hyd/$nreg hydrated, clone starts, golden file intact, ext4 clean after journal replay"
    else
        bad "entry $cur: $why"
        "$BIN" check "$lm" >"$W/check.txt" 2>&1
        dd if="$W/check.img" of="$W/meta.img" bs=1M skip=$((META_BASE >> 20)) count="$META_MB" status=none
        keep "entry-$cur" "$W/locks.txt" "$W/fsck.out" "$W/check.txt" "$W/meta.img" "$W/create.out" "$W/mount.err"
    fi
    [ -n "$lm" ] && unloop "$lm"
    [ -n "$ld" ] && unloop "$ld"
done 3<"$W/chosen"

# The whole log reproduces the logged device (replay faithfulness, as in logwrites.sh).
if "$REPLAY" --log "$W/log.img" --replay "$W/base.img" --start-entry $((prev + 1)) &&
    cmp -s "$W/base.img" "$W/data.img"; then
    ok "whole log replayed equals the logged device"
else
    bad "whole log replayed differs from the logged device"
fi
# The checked states must not all be one commit: count the distinct generations seen.
gens=$(sort -un "$W/generations" | wc -l)
if [ "$gens" -ge 2 ]; then
    ok "checked states span $gens distinct generations ($(sort -n "$W/generations" | head -n 1)..$(sort -n "$W/generations" | tail -n 1)), at most $max_hydrated regions hydrated"
else
    bad "checked states span $gens distinct generation(s): $(sort -un "$W/generations" | tr '\n' ' ')"
fi
echo "     $shadows state(s) had interrupted-commit shadow slots; total $((SECONDS - t0)) s"
finish

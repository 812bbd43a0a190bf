#!/usr/bin/env bash
# The part of tools/demo that needs a ublk kernel.
set -euo pipefail
bin=$(readlink -f "$1"); work=$2
modprobe ublk_drv
echo "+ ublk-clone create --source source.img --dest dest.img --metadata meta.img --rate 32M"
dev=$("$bin" create --source "$work/source.img" --dest "$work/dest.img" --metadata "$work/meta.img" --rate 32M)
echo "clone device: $dev"
mkdir -p "$work/mnt"
mount "$dev" "$work/mnt"
echo "+ ls $work/mnt"; ls "$work/mnt"
echo "+ writing a new file through the clone"
head -c 8M /dev/urandom >"$work/mnt/new-file.bin"; sync
"$bin" status "$dev"
echo "+ removing the rate limit and waiting for hydration to finish"
"$bin" set "$dev" --rate 0
"$bin" status "$dev" --watch | tail -n 2
umount "$work/mnt"
"$bin" stop "$dev"
echo "+ ublk-clone check meta.img"
"$bin" check "$work/meta.img"
echo "+ e2fsck -fn dest.img (the destination is now a full, standalone copy)"
e2fsck -fn "$work/dest.img"
echo "demo done"

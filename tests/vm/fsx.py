#!/usr/bin/env python3
"""Model-checked file-system exercisers for the VM suite (fsx and fsstress are not packaged
in Debian 12, so these play their parts).

  fsx.py fsx DIR STOPFILE      one file, random writes/truncates/reads, every read checked
                               against an in-memory model (like xfstests' fsx)
  fsx.py tree DIR STOPFILE     many files: create/write/rename/unlink/mkdir, every read
                               checked against the expected contents (like fsstress, checked)
  fsx.py probe FILE STOPFILE   4 KiB O_DIRECT writes in a loop; prints each gap between
                               completions over 20 ms as "gap START_EPOCH SECONDS"

Each runs until STOPFILE exists. fdatasync plus fadvise(DONTNEED) every few operations make
later reads come from the device, not the page cache. Exit status 1 on any mismatch or I/O
error (the first one is printed), else 0; the last line is a summary.
"""
import mmap
import os
import random
import sys
import time


def die(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def drop(fd):
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fsx(d, stop):
    rnd = random.Random(int.from_bytes(os.urandom(8), "little"))
    path = os.path.join(d, "fsx.dat")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    model = bytearray()
    maxlen = 4 << 20
    ops = 0
    worst = 0.0
    while not os.path.exists(stop):
        t0 = time.monotonic()
        op = rnd.random()
        if op < 0.45:
            off = rnd.randrange(0, maxlen - 1)
            n = min(rnd.randrange(1, 64 << 10), maxlen - off)
            data = rnd.randbytes(n)
            try:
                os.pwrite(fd, data, off)
            except OSError as e:
                die(f"write at {off} length {n}: {e}")
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + n] = data
        elif op < 0.5:
            size = rnd.randrange(0, maxlen)
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                die(f"truncate to {size}: {e}")
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        else:
            if not model:
                continue
            off = rnd.randrange(0, len(model))
            n = rnd.randrange(1, 128 << 10)
            try:
                got = os.pread(fd, n, off)
            except OSError as e:
                die(f"read at {off} length {n}: {e}")
            want = bytes(model[off:off + n])
            if got != want:
                bad = next(i for i in range(min(len(got), len(want)) + 1)
                           if i >= len(got) or i >= len(want) or got[i] != want[i])
                die(f"op {ops}: read at {off} length {n} differs from the model at byte "
                    f"{off + bad} (got {len(got)} bytes, want {len(want)})")
        ops += 1
        if ops % 16 == 0:
            try:
                drop(fd)
            except OSError as e:
                die(f"fdatasync: {e}")
        worst = max(worst, time.monotonic() - t0)
    drop(fd)
    if os.pread(fd, len(model) + 1, 0) != bytes(model):
        die("the final full read differs from the model")
    print(f"fsx: {ops} operations, file {len(model)} bytes, slowest {worst * 1000:.0f} ms, "
          "0 mismatches", flush=True)


def content(name, gen, n):
    r = random.Random(f"{name}:{gen}")
    return r.randbytes(n)


def tree(d, stop):
    rnd = random.Random(int.from_bytes(os.urandom(8), "little"))
    root = os.path.join(d, "tree")
    os.makedirs(root, exist_ok=True)
    files = {}  # path -> (content key, generation, size)
    dirs = [root]
    ops = 0
    gen = 0
    worst = 0.0
    while not os.path.exists(stop):
        t0 = time.monotonic()
        op = rnd.random()
        try:
            if len(files) > 150:
                # Bounded: the file system is small.
                p = rnd.choice(list(files))
                os.unlink(p)
                del files[p]
            elif op < 0.35 or not files:
                gen += 1
                p = os.path.join(rnd.choice(dirs), f"f{gen}")
                n = rnd.randrange(0, 256 << 10)
                with open(p, "wb") as f:
                    f.write(content(p, gen, n))
                    if rnd.random() < 0.3:
                        f.flush()
                        os.fsync(f.fileno())
                files[p] = (p, gen, n)
            elif op < 0.45 and len(dirs) < 40:
                p = os.path.join(rnd.choice(dirs), f"d{ops}")
                os.mkdir(p)
                dirs.append(p)
            elif op < 0.55:
                p = rnd.choice(list(files))
                q = os.path.join(rnd.choice(dirs), f"r{ops}")
                os.rename(p, q)
                files[q] = files.pop(p)
            elif op < 0.65:
                p = rnd.choice(list(files))
                os.unlink(p)
                del files[p]
            else:
                p = rnd.choice(list(files))
                k, g, n = files[p]
                with open(p, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    got = f.read()
                if got != content(k, g, n):
                    die(f"op {ops}: {p} (generation {g}, {n} bytes) reads back wrong "
                        f"({len(got)} bytes)")
        except OSError as e:
            die(f"op {ops}: {e}")
        ops += 1
        if ops % 64 == 0:
            os.sync()
        worst = max(worst, time.monotonic() - t0)
    os.sync()
    for p, (k, g, n) in files.items():
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if f.read() != content(k, g, n):
                die(f"final check: {p} reads back wrong")
    print(f"tree: {ops} operations, {len(files)} files in {len(dirs)} directories, slowest "
          f"{worst * 1000:.0f} ms, 0 mismatches", flush=True)


def probe(path, stop):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    last = time.time()
    n = 0
    while not os.path.exists(stop):
        try:
            os.pwritev(fd, [buf], (n % 256) * 4096)
        except OSError as e:
            die(f"probe write {n}: {e}")
        now = time.time()
        if now - last > 0.02:
            print(f"gap {last:.3f} {now - last:.3f}", flush=True)
        last = now
        n += 1
    print(f"probe: {n} writes", flush=True)


if __name__ == "__main__":
    mode, target, stopfile = sys.argv[1:4]
    {"fsx": fsx, "tree": tree, "probe": probe}[mode](target, stopfile)

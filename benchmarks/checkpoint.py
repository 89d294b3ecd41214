"""uo.save of an Adam state beside safetensors.numpy.save_file of the same arrays, and
uo.load's memory: the issue's bars are "at least half the speed of save_file" and "loads
without a second copy".

    python benchmarks/checkpoint.py [--params 100_000_000] [--leaves 100] [--repeat 7]
                                    [--dir DIR]

A state of ``--params`` float32 parameters in ``--leaves`` tensors (Adam: two slots, 8 bytes
a parameter). Prints the median seconds of each writer and their ratio; uo.save syncs the
file and its directory (it must, to be atomic across a crash) where save_file does not, so
save_file followed by an fsync is shown too, the same durability. Loading runs in a fresh
process each, which reports how much its resident memory grew: the state's size once is
"no second copy".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import uniopt as uo


def state(n: int, leaves: int) -> tuple[uo.State, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    params = {f"layer{i:03d}": rng.random(n // leaves, dtype=np.float32) for i in range(leaves)}
    st = uo.setup(uo.adam(lr=1e-3), params)
    for slot in st.slots.values():
        for x in slot:
            rng.random(out=x, dtype=np.float32)
    return st, params


def timed(fns: list[object], repeat: int) -> list[float]:
    """The median seconds of each of ``fns``, run in turn ``repeat`` times (a disk's and its
    page cache's state drift between runs; taking turns spreads that over all of them)."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for times, fn in zip(out, fns, strict=True):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
    return [statistics.median(t) for t in out]


LOAD = """
import sys, time, numpy as np, uniopt as uo

def status(key):  # bytes, from Linux's /proc
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

n, leaves, path, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
params = {f"layer{i:03d}": np.ones(n // leaves, np.float32) for i in range(leaves)}
rule = uo.adam(lr=1e-3)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from here
before = status("VmRSS")
t = time.perf_counter()
if how == "uniopt":
    st = uo.load(path, like=(rule, params))
    nbytes = sum(x.nbytes for s in st.slots.values() for x in s)
else:
    from safetensors.numpy import load_file
    out = load_file(path)
    nbytes = sum(x.nbytes for x in out.values())
dt = time.perf_counter() - t
print(dt, status("VmHWM") - before, nbytes)
"""


def load(n: int, leaves: int, path: str, how: str) -> tuple[float, int, int]:
    out = subprocess.run([sys.executable, "-c", LOAD, str(n), str(leaves), path, how],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def save_speed(n: int, leaves: int, repeat: int, ours: str, theirs: str) -> None:
    from safetensors.numpy import save_file

    st, _ = state(n, leaves)
    arrays = {f"{k}/{i}": x for k, v in st.slots.items() for i, x in enumerate(v)}
    nbytes = sum(x.nbytes for x in arrays.values())

    def synced() -> None:
        save_file(arrays, theirs)
        fd = os.open(theirs, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    t_ours, t_theirs, t_synced = timed(
        [lambda: uo.save(ours, st), lambda: save_file(arrays, theirs), synced], repeat)
    print(f"Adam state of {n:,} float32 parameters in {leaves} tensors: {nbytes / 1e9:.2f} GB, "
          f"median of {repeat}")
    for label, t in (("uo.save (temp file, fsync, rename, fsync dir)", t_ours),
                     ("safetensors.numpy.save_file", t_theirs),
                     ("save_file + fsync", t_synced)):
        print(f"  {label:47s} {t:6.2f} s  {nbytes / t / 1e9:5.2f} GB/s")
    print(f"  speed of uo.save / save_file: {t_theirs / t_ours:.2f} "
          f"(/ save_file + fsync: {t_synced / t_ours:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--leaves", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        ours, theirs = os.path.join(d, "uniopt.safetensors"), os.path.join(d, "st.safetensors")
        save_speed(args.params, args.leaves, args.repeat, ours, theirs)
        for how, path in (("uniopt", ours), ("safetensors", theirs)):
            dt, grew, held = load(args.params, args.leaves, path, how)
            print(f"  load ({how:11s}) {dt:6.2f} s, peak resident memory grew {grew / 1e9:.2f} "
                  f"GB for {held / 1e9:.2f} GB of arrays ({grew / held:.2f}x)")


if __name__ == "__main__":
    main()

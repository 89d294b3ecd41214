"""8-bit state against float32 state: ``python benchmarks/q8.py [--cpu] [rounds] [rules...]``.

For each of the workloads W1-W3 of ``uniopt bench`` (one 16.8M tensor; 1,000 of 16K; ResNet-50's
161 tensors) and each rule (default adam), the in-place step of uniopt with
``setup(..., state_dtype="q8")`` and with float32 state (the compiled CPU loop both), the two
steps taken in turn in one process for ``rounds`` rounds (default 20), so that the machine's
load falls on both alike: each one's least and median time, and q8/float32 of each. ``--cpu``:
the process's CPU time in place of the wall clock (with ``NUMBA_NUM_THREADS=1``, one thread's
work, which other jobs on the machine move least).
"""

import statistics
import sys
import time

from uniopt.fast import cpu
from uniopt.tools import bench


def main(rounds: int = 20, rules: tuple[str, ...] = ("adam",), cpu_time: bool = False) -> None:
    cpu.COMPILE_AFTER = 0
    clock = time.process_time if cpu_time else time.perf_counter
    for wname in ("W1", "W2", "W3"):
        w = bench._Workload(bench.WORKLOADS[wname])
        for rule in rules:
            steps = {label: bench._uniopt(w, rule, dtype)
                     for label, dtype in (("float32", None), ("q8", "q8"))}
            if steps["q8"] is None:  # (a rule that refuses 8-bit state: uniopt bench says why)
                print(f"{wname} {rule}: 8-bit state is not offered for it", flush=True)
                continue
            times: dict[str, list[float]] = {label: [] for label in steps}
            for step in steps.values():
                assert step is not None
                step()
                step()
            for _ in range(rounds):
                for label, step in steps.items():
                    assert step is not None
                    t0 = clock()
                    step()
                    times[label].append(1e3 * (clock() - t0))
            f, q = times["float32"], times["q8"]
            print(f"{wname} {rule:6s} float32 {min(f):7.2f} / {statistics.median(f):7.2f} ms"
                  f"   q8 {min(q):7.2f} / {statistics.median(q):7.2f} ms   q8/float32 "
                  f"{min(q) / min(f):.2f}x / {statistics.median(q) / statistics.median(f):.2f}x"
                  " (least / median)", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    cpu_time = "--cpu" in args
    args = [a for a in args if a != "--cpu"]
    main(int(args[0]) if args else 20, tuple(args[1:]) or ("adam",), cpu_time)

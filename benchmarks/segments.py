"""Rules with per-leaf parts, compiled around them or not: ``python benchmarks/segments.py
[rounds] [cases...]``.

On NumPy float32 arrays, the in-place step with the compiled passes of the elementwise parts
around the per-leaf ones (``uniopt.fast.cpu.segmented``) and on the reference path (every part
with NumPy's operations, leaf by leaf: ``cpu.AVAILABLE = False``), the two taken in turn in one
process for ``rounds`` rounds (default 5), so that the machine's load falls on both alike: each
one's median, and reference/compiled. Workloads: S2, 50 matrices of 32 rows and 32 to 1,600
columns (1K-51K elements, evenly spaced: not the bench's S2); W2, 1,000 of 128 x 128; W4,
10,000 of 10 x 10. A case runs where its name contains one of ``cases``.
"""

import sys
import time
import warnings

import numpy as np

import uniopt as uo
from uniopt.fast import cpu

WORKLOADS = {
    "S2": [(32, 32 * (1 + i % 64)) for i in range(50)],
    "W2": [(128, 128)] * 1000,
    "W4": [(10, 10)] * 10000,
}
RULES = {
    "lamb": uo.lamb(lr=1e-3),  # Adam and decay; the trust ratio; the learning rate
    "clip-centralize-adamw": uo.chain(uo.clip_by_global_norm(1.0), uo.centralize(),
                                      uo.adamw(lr=1e-3, weight_decay=0.01)),
    "adafactor": uo.adafactor(),  # per-leaf parts only: the reference path both times
}


def main(rounds: int = 5, only: tuple[str, ...] = ()) -> None:
    cpu.COMPILE_AFTER = 0
    warnings.simplefilter("ignore")  # Adafactor's: no elementwise part to compile
    rng = np.random.default_rng(0)
    for rname, rule in RULES.items():
        for wname, shapes in WORKLOADS.items():
            name = f"{rname} {wname}"
            if only and not any(o in name for o in only):
                continue
            p = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            g = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            state = uo.update_(uo.setup(rule, p), p, g)  # compiles (or loads) the loops
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(rounds):
                for compiled in (True, False):
                    cpu.AVAILABLE = compiled
                    t = time.perf_counter()
                    state = uo.update_(state, p, g)
                    times[compiled].append(time.perf_counter() - t)
            cpu.AVAILABLE = True
            c, r = (1e3 * float(np.median(times[k])) for k in (True, False))
            print(f"{name:26s} compiled {c:8.1f} ms  reference {r:8.1f} ms  "
                  f"reference/compiled {r / c:5.2f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    rounds = int(args.pop(0)) if args and args[0].isdigit() else 5
    main(rounds, tuple(args))

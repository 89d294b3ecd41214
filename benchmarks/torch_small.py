"""``uniopt.torch`` against torch.optim's fused class on the small workloads, interleaved:
``uniopt bench``'s S1/S2 step functions (the same tensors, ``p.grad = g; opt.step()``, two
gradient sets in turn, as ``zero_grad()`` with ``set_to_none=True`` hands a step new tensors),
and ``uniopt.torch``'s step on the same gradient tensors every step (as with
``set_to_none=False``), run in alternating rounds in one process on one torch thread, so that a
noisy machine weighs on every row alike.

    python benchmarks/torch_small.py [--workloads S1,S2] [--rules sgd,adamw,adam]
                                     [--rounds 15] [--steps 300] [--thread-time]

Prints, per workload and rule, each row's median over rounds of a round's mean step (µs) and
its ratio to torch's fused step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from uniopt.fast import cpu
from uniopt.tools import bench


def _same_gradients(step: Callable[[], Any]) -> Callable[[], Any]:
    """The optimizer's own ``step`` of a bench step function, after one bench step has set
    the gradients: every later step sees the same gradient tensors."""
    step()
    cells = dict(zip(step.__code__.co_freevars,
                     (c.cell_contents for c in step.__closure__ or ()), strict=True))
    return cells["opt"].step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="S1,S2")
    ap.add_argument("--rules", default="sgd,adamw,adam")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=300)
    # this thread's CPU time: a machine shared with other work moves it less than the wall's
    ap.add_argument("--thread-time", action="store_true")
    a = ap.parse_args()
    clock = time.thread_time if a.thread_time else time.perf_counter
    torch.set_num_threads(1)
    # the steady step: small steps take the compiled loop at once (with a cold kernel cache
    # they would run the reference path for their first COMPILE_AFTER steps)
    cpu.COMPILE_AFTER = 0
    print(f"torch {torch.__version__}, one thread; µs per step, median over {a.rounds} rounds "
          "(ratio to torch fused)")
    for wname in a.workloads.split(","):
        w = bench._Workload(bench.WORKLOADS[wname])
        steps = max(1, a.steps if wname == "S1" else a.steps // 10)
        for rule in a.rules.split(","):
            same, new, fused_step = (bench._torch(w, rule, "uniopt.torch"),
                                     bench._torch(w, rule, "uniopt.torch"),
                                     bench._torch(w, rule, "fused"))
            if same is None or new is None or fused_step is None:
                print(f"{wname} {rule}: skipped (no such torch class or fused kernel)")
                continue
            rows: dict[str, Callable[[], Any]] = {
                "uniopt.torch, same gradients": _same_gradients(same),
                "uniopt.torch, new gradients": new,
                "torch fused, new gradients": fused_step}
            for step in rows.values():
                for _ in range(3 * steps):
                    step()
            means: dict[str, list[float]] = {label: [] for label in rows}
            for _ in range(a.rounds):
                for label, step in rows.items():
                    t = clock()
                    for _ in range(steps):
                        step()
                    means[label].append((clock() - t) / steps * 1e6)
            fused = statistics.median(means["torch fused, new gradients"])
            print(f"{wname} {rule}: " + "   ".join(
                f"{label} {statistics.median(xs):7.1f} ({statistics.median(xs) / fused:.2f}x)"
                for label, xs in means.items()), flush=True)


if __name__ == "__main__":
    main()

"""A ``uniopt.torch`` step under a torch ``lr_scheduler`` against torch's own, on the bench's
small workloads: the scheduler writes a new lr (OneCycleLR new betas too) into the group at
every step, which the group's rule reads rather than being made anew.

    python benchmarks/torch_scheduler.py [--rounds 7] [--steps 300] [--workloads S1,S2]
        [--rules adamw,sgd]

Prints, per workload, rule and scheduler (none, CosineAnnealingLR, OneCycleLR), the least over
rounds of each implementation's µs per step (the bench's ``p.grad = g; opt.step()`` loop, then
``scheduler.step()``; rounds alternate between implementations in one process), and
uniopt.torch over torch fused.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from uniopt.fast import cpu
from uniopt.tools import bench

SCHEDULERS: dict[str, Callable[[Any], Any] | None] = {
    "none": None,
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10**6),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2,
                                                                 total_steps=10**7),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workloads", default="S1,S2")
    ap.add_argument("--rules", default="adamw,sgd")
    a = ap.parse_args()
    # the steady step: small steps take the compiled loop at once (with a cold kernel cache
    # they would run the reference path for their first COMPILE_AFTER steps, most of a run)
    cpu.COMPILE_AFTER = 0
    print(f"{'workload':8} {'rule':6} {'scheduler':9} {'uniopt.torch':>13} {'torch fused':>12} "
          f"{'torch foreach':>14} {'ratio':>6}")
    for name in a.workloads.split(","):
        w = bench._Workload(bench.WORKLOADS[name])
        for rule in a.rules.split(","):
            for sched in SCHEDULERS:
                runs = {impl: bench._torch(w, rule, impl, SCHEDULERS[sched])
                        for impl in ("uniopt.torch", "fused", "foreach")}
                missing = [impl for impl, f in runs.items() if f is None]
                if missing:  # (torch has a fused kernel for few rules)
                    print(f"{name:8} {rule:6} skipped: torch has no {', '.join(missing)} {rule}")
                    break
                best = dict.fromkeys(runs, float("inf"))
                for f in runs.values():
                    for _ in range(a.steps // 3):
                        f()
                for _ in range(a.rounds):
                    for impl, f in runs.items():
                        t = time.perf_counter()
                        for _ in range(a.steps):
                            f()
                        best[impl] = min(best[impl], (time.perf_counter() - t) / a.steps * 1e6)
                print(f"{name:8} {rule:6} {sched:9} {best['uniopt.torch']:13.1f} "
                      f"{best['fused']:12.1f} {best['foreach']:14.1f} "
                      f"{best['uniopt.torch'] / best['fused']:6.2f}")


if __name__ == "__main__":
    main()

"""A masked AdamW step (no decay on biases and BatchNorm weights, by one glob) beside plain
AdamW, on ResNet-50's 161 tensors (the bench's W3), NumPy float32, in one process.

    python benchmarks/recipes.py [--steps 20]

Prints the median seconds per in-place step of each and their ratio (the issue's bar: the
recipe within 1.2x of the plain rule), and both as multiples of the memory floor measured
here as ``uniopt bench`` measures it (28 bytes per parameter: Adam reads p, g, m, v and
writes p, m, v).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import uniopt as uo
from uniopt.tools.bench import WORKLOADS, bandwidth


def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # a 1-D tensor of ResNet-50 is a bias or a BatchNorm weight: the leaves the recipe masks
    return {f"layer{i}.{'bias' if len(s) == 1 else 'weight'}":
            rng.standard_normal(s, dtype=np.float32) for i, s in enumerate(WORKLOADS["W3"])}


def per_step(rule: uo.Transform, steps: int) -> float:
    p = params()
    g = {k: np.full_like(v, 1e-3) for k, v in p.items()}
    state = uo.setup(rule, p)
    for _ in range(3):  # compile (or load) the loops, fault the slots in
        state = uo.update_(state, p, g)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state = uo.update_(state, p, g)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    plain = uo.adamw(lr=1e-3, weight_decay=1e-2)
    recipe = uo.partition({"decay": plain, "no_decay": uo.adam(lr=1e-3)},
                          uo.by_path({"*.bias": "no_decay", "*": "decay"}))
    t_plain, t_recipe = per_step(plain, args.steps), per_step(recipe, args.steps)
    n = sum(v.size for v in params().values())
    t_floor = 28 * n / bandwidth()
    print(f"W3 ({n:,} float32 parameters), seconds per step (x memory floor {t_floor:.4f} s)")
    print(f"  adamw            {t_plain:.4f} s  ({t_plain / t_floor:.2f}x floor)")
    print(f"  masked adamw     {t_recipe:.4f} s  ({t_recipe / t_floor:.2f}x floor)")
    print(f"  recipe / plain   {t_recipe / t_plain:.3f}")


if __name__ == "__main__":
    main()

"""The functional twin's steps (ZeRO's ``overlap_with_ddp=True``, DDP's fused step) beside the
class's own step over the same parameters, in one process, without communication.

    python benchmarks/functional.py [--tensors 40] [--size 4000000] [--buckets 4]
                                    [--repeats 20]

``tensors`` float32 parameters of ``size`` elements in all, stepped by ``uniopt.torch.AdamW``:
once by the class (``step()``), once by its twin a bucket at a time (``step(gradients)`` with
``None`` outside the bucket, ``buckets`` buckets, as ZeRO's hook steps a rank's share), once
parameter by parameter (``step_param``, as DDP's fused step), and torch's own twin
(``_FunctionalAdamW``) by bucket. Prints the median milliseconds per step of all the
parameters (CPU time, rows timed in turns) and each row's ratio to the class's step. A bucket's
step is the class's step of the bucket's parameters (they keep a step plan of their own), so
by bucket costs the class's step plus the fixed cost of a step per bucket (the compiled loop
wakes its thread pool once per step from 65,536 elements on); parameter by parameter, a step
per tensor.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import uniopt.torch as ut


def _median_ms(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """The median CPU milliseconds (this process's threads: steadier than the wall clock on a
    busy machine) of each step, timed in turns so that each meets the same load."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.process_time()
            step()
            times[name].append(time.process_time() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=40)
    parser.add_argument("--size", type=int, default=4_000_000)
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from torch.distributed.optim.utils import functional_optim_map

    gen = torch.Generator().manual_seed(0)
    n = args.size // args.tensors

    def fresh() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return ([torch.randn(n, generator=gen) for _ in range(args.tensors)],
                [torch.randn(n, generator=gen) for _ in range(args.tensors)])

    per = -(-args.tensors // args.buckets)
    buckets = [range(i, min(i + per, args.tensors)) for i in range(0, args.tensors, per)]

    def by_bucket(twin: object, grads: list[torch.Tensor]) -> Callable[[], None]:
        masks = [[g if i in b else None for i, g in enumerate(grads)] for b in buckets]

        def step() -> None:
            for m in masks:
                twin.step(m)  # type: ignore[attr-defined]
        return step

    steps = {}
    ps, gs = fresh()
    opt = ut.AdamW(ps, lr=1e-3)
    for p, g in zip(ps, gs, strict=True):
        p.grad = g
    steps["uniopt.torch.AdamW step()"] = opt.step

    ps, gs = fresh()
    twin = functional_optim_map[ut.AdamW](ps, lr=1e-3)
    steps[f"twin, {len(buckets)} buckets"] = by_bucket(twin, gs)

    ps_each, gs_each = fresh()
    twin_each = functional_optim_map[ut.AdamW](ps_each, lr=1e-3)

    def each() -> None:
        for p, g in zip(ps_each, gs_each, strict=True):
            twin_each.step_param(p, g)
    steps["twin, step_param each"] = each

    ps, gs = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's TorchScript twins are deprecated
        theirs = functional_optim_map[torch.optim.AdamW](ps, lr=1e-3)
    steps[f"torch's twin, {len(buckets)} buckets"] = by_bucket(theirs, gs)
    rows = _median_ms(steps, args.repeats)

    base = rows["uniopt.torch.AdamW step()"]
    print(f"{args.tensors} tensors, {args.size} float32 parameters, torch threads "
          f"{torch.get_num_threads()}; CPU milliseconds per step of every parameter")
    for name, ms in rows.items():
        print(f"  {name:34s} {ms:8.2f} ms  {ms / base:5.2f}x")


if __name__ == "__main__":
    main()

"""One step of ``uniopt.torch.Muon`` beside ``torch.optim.Muon`` on CPU, in one process.

    python benchmarks/muon.py [--n 24] [--size 1024] [--steps 3]

``n`` same-shaped ``size x size`` float32 matrices: uniopt orthogonalises them in one batched
matmul chain, in bfloat16 as torch; torch runs one chain per matrix. Prints the
median seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import uniopt.torch as ut


def per_step(cls: type, n: int, size: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(size, size, generator=gen)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(size, size, generator=gen)
    opt = cls(ps, lr=0.02)
    opt.step()  # the first step builds state (and uniopt's plan)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    print(f"{a.n} x ({a.size}, {a.size}) float32, {torch.get_num_threads()} threads")
    ours = per_step(ut.Muon, a.n, a.size, a.steps)
    theirs = per_step(torch.optim.Muon, a.n, a.size, a.steps)
    print(f"uniopt.torch.Muon  {ours:.3f} s/step")
    print(f"torch.optim.Muon   {theirs:.3f} s/step")
    print(f"torch / uniopt     {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()

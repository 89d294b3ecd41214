"""torch's compiled-optimizer recipe (``torch.compile`` of a function calling ``opt.step()``)
against the eager step, for ``uniopt.torch.AdamW`` and torch's own AdamW, on one torch thread,
in alternating rounds in one process (a noisy machine weighs on every row alike).

    python benchmarks/torch_compile.py [--rounds 15] [--steps 1000]
        [--workloads S1,MLP128,MLP256,MLP512,MLP1024,S2]

Prints, per workload, the min and median over rounds of the CPU time per step (µs: a round's
``time.thread_time``; torch and numba on one thread each) and compiled/eager. ``MLPn`` is an
MLP 20-n-n-3 (six tensors, as S1). Then, on S1, where the recipe's fixed cost goes: a
``torch.compiler.disable``'d no-op eager and compiled (dynamo's wrapper, the frame's guards, the
graph break), a compiled function of no graph (the wrapper alone), the eager step right after a
compiled no-op (the step's own slowdown after dynamo's code ran), the least a step inside the
graph costs (a custom op that computes nothing) and AdamW written in torch and traced whole;
and S1 in a training loop, where no step runs on caches its last call left warm.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable

import numba
import torch

import uniopt.torch as ut
from uniopt.tools import bench


def shapes(name: str) -> list[tuple[int, ...]]:
    if name.startswith("MLP"):
        n = int(name[3:])
        return [(n, 20), (n,), (n, n), (n,), (3, n), (3,)]
    return bench.WORKLOADS[name]


def optimizer(kind: str, shp: list[tuple[int, ...]]) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shp]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    if kind == "uniopt":
        return ut.AdamW(ps, lr=1e-3, weight_decay=1e-2)
    return torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=False)


def recipe(opt: torch.optim.Optimizer) -> Callable[[], object]:
    """torch's compiled-optimizer recipe, a code object of its own for each optimizer (dynamo
    keeps its compiled frames on the code object: a shared one would recompile for each)."""
    f = lambda: opt.step()  # noqa: E731
    return torch.compile(types.FunctionType(f.__code__.replace(), f.__globals__,
                                            closure=f.__closure__))


def compare(runs: dict[str, Callable[[], object]], rounds: int,
            steps: int) -> dict[str, list[float]]:
    for f in runs.values():
        for _ in range(20):  # compile, fault in (a graph's first few calls may take ms each)
            f()
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            t = time.thread_time()
            for _ in range(steps):
                f()
            out[k].append((time.thread_time() - t) / steps * 1e6)
    return out


def show(out: dict[str, list[float]]) -> None:
    for k, v in out.items():
        print(f"  {k:<50} min {min(v):8.1f}  median {statistics.median(v):8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="S1,MLP128,MLP256,MLP512,MLP1024,S2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1000)
    a = ap.parse_args()
    # one thread each (uniopt's loop runs on numba's threads from 65,536 elements on): CPU time
    # of this thread is then the step's, and no pool's spinning threads (OpenMP's, numba's,
    # inductor's kernels') weigh on the rows measured after them on a small machine
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, {a.rounds} rounds; CPU µs per step")
    for w in a.workloads.split(","):
        shp = shapes(w)
        runs: dict[str, Callable[[], object]] = {}
        for kind in ("uniopt", "torch for-loop"):
            for compiled in (False, True):
                opt = optimizer(kind, shp)
                runs[f"{kind} {'compiled' if compiled else 'eager'}"] = (
                    recipe(opt) if compiled else opt.step)
        n = sum(torch.Size(s).numel() for s in shp)
        print(f"{w}: {len(shp)} tensors, {n:,} parameters, AdamW")
        out = compare(runs, a.rounds, max(1, a.steps * 8_600 // max(n, 8_600)))
        show(out)
        for kind in ("uniopt", "torch for-loop"):
            e, c = out[f"{kind} eager"], out[f"{kind} compiled"]
            print(f"  {kind}: compiled/eager {statistics.median(c) / statistics.median(e):.2f} "
                  f"(of mins {min(c) / min(e):.2f}), compiled - eager "
                  f"{statistics.median(c) - statistics.median(e):+.1f} µs")
    s1(a.rounds, a.steps)


def s1(rounds: int, steps: int) -> None:
    print("S1: where the compiled recipe's fixed cost goes")
    opt = optimizer("uniopt", shapes("S1"))
    noop = torch.compiler.disable(lambda: None)
    compiled_noop = torch.compile(lambda: noop())
    step = opt.step

    def after_compiled_noop() -> None:
        compiled_noop()
        step()

    show(compare({
        "disable'd no-op, eager": noop,
        "disable'd no-op, compiled (wrapper+guards+break)": compiled_noop,
        "compiled function of no graph (wrapper)": torch.compile(lambda: None),
        "uniopt eager": step,
        "uniopt compiled": recipe(opt),
        "compiled no-op, then uniopt eager": after_compiled_noop,
        "in the graph instead: a custom op doing nothing": custom_op_floor(opt),
        "a hand-written AdamW traced whole (constants)": traced_adamw(opt),
    }, rounds, steps))
    print("S1 in a training loop (batch 32: forward, backward, step, zero_grad)")
    show(compare({name: loop(*how) for name, how in (
        ("no step", ("", "")),
        ("uniopt eager", ("uniopt", "")),
        ("uniopt, the step compiled (the recipe)", ("uniopt", "step")),
        ("uniopt, forward+backward compiled alone", ("uniopt", "model")),
        ("uniopt, the whole step compiled", ("uniopt", "all")),
        ("torch for-loop, the whole step compiled", ("torch for-loop", "all")))},
        rounds, max(1, steps // 4)))

def custom_op_floor(opt: torch.optim.Optimizer) -> Callable[[], object]:
    """The least a step in the graph costs: a ``torch.library.custom_op`` that mutates the
    parameters and AdamW's two slots and computes nothing, compiled (inductor)."""
    @torch.library.custom_op("uniopt_bench::nothing", mutates_args=("ps", "ms", "vs"))
    def nothing(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor],
                vs: list[torch.Tensor], lr: float) -> None:
        return None

    ps = [p for g in opt.param_groups for p in g["params"]]
    gs, ms, vs = ([torch.zeros_like(p) for p in ps] for _ in range(3))
    return torch.compile(lambda: nothing(ps, gs, ms, vs, 1e-3))


def traced_adamw(opt: torch.optim.Optimizer) -> Callable[[], object]:
    """AdamW written in torch and compiled whole (one graph, one fused loop): the step count a
    tensor, so no step recompiles, the hyperparameters constants of the graph."""
    ps = [p.detach() for g in opt.param_groups for p in g["params"]]
    gs = [p.grad for g in opt.param_groups for p in g["params"]]
    ms, vs = ([torch.zeros_like(p) for p in ps] for _ in range(2))
    count = torch.zeros(())

    def step(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, wd: float = 1e-2) -> None:
        count.add_(1)
        bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
        for p, g, m, v in zip(ps, gs, ms, vs, strict=True):
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(lr / bc1 * m / ((v / bc2).sqrt() + 1e-8))

    return torch.compile(step)


def loop(kind: str, compiled: str) -> Callable[[], None]:
    """A training step of S1's MLP with the ``kind`` optimizer (none: ""), eager or with
    ``compiled`` "step" (the recipe), "model" (forward and backward alone) or "all"."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 20, generator=g), torch.randn(32, 3, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 3))
    ps = list(model.parameters())
    opt = (ut.AdamW(ps, lr=1e-3, weight_decay=1e-2) if kind == "uniopt" else
           torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=False))
    step = recipe(opt) if compiled == "step" else opt.step if kind else (lambda: None)

    def forward_backward() -> None:
        torch.nn.functional.mse_loss(model(x), y).backward()

    fb = torch.compile(forward_backward) if compiled == "model" else forward_backward

    def it() -> None:
        fb()
        step()
        opt.zero_grad()

    return torch.compile(it) if compiled == "all" else it


if __name__ == "__main__":
    main()

"""Run by tests/test_distributed_ddp.py: one rank of a 2-process gloo group on CPU.

    python distributed_torch_worker.py SCENARIO RANK WORLD PORT

Every scenario trains a small float64 model under ``DistributedDataParallel``, each rank on its
own batches, and holds the parameters it ends with to a single-process run of the same
optimizer on the mean of the ranks' gradients (formed as DDP forms it: each divided by the world
size, then summed; both exact in float64 for two ranks, so the runs agree bit for bit). Prints
one JSON line of findings.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
from collections.abc import Callable
from typing import Any

STEPS = 3


def _classes() -> dict[str, tuple[Any, dict[str, Any], str]]:
    """Every ``uniopt.torch`` class: its arguments, and the parameters it takes ("all", or
    "matrices" for Muon)."""
    import uniopt.torch as ut

    return {
        "SGD": (ut.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, "all"),
        "Adagrad": (ut.Adagrad, {"lr": 0.05}, "all"),
        "RMSprop": (ut.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}, "all"),
        "Adadelta": (ut.Adadelta, {"lr": 1.0}, "all"),
        "Adam": (ut.Adam, {"lr": 0.01, "amsgrad": True}, "all"),
        "AdamW": (ut.AdamW, {"lr": 0.01, "weight_decay": 0.1}, "all"),
        "Adamax": (ut.Adamax, {"lr": 0.01}, "all"),
        "NAdam": (ut.NAdam, {"lr": 0.01}, "all"),
        "RAdam": (ut.RAdam, {"lr": 0.01}, "all"),
        "ASGD": (ut.ASGD, {"lr": 0.01}, "all"),
        "Rprop": (ut.Rprop, {"lr": 0.01}, "all"),
        "Adafactor": (ut.Adafactor, {"lr": 0.01}, "all"),
        "Muon": (ut.Muon, {"lr": 0.02}, "matrices"),
        "SparseAdam": (ut.SparseAdam, {"lr": 0.01}, "embedding"),
        "LBFGS": (ut.LBFGS, {"lr": 0.5, "max_iter": 1}, "all"),
    }


def _model(seed: int, sparse: bool = False) -> Any:
    import torch

    torch.manual_seed(seed)
    if sparse:
        return torch.nn.EmbeddingBag(12, 4, mode="sum", sparse=True).double()
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def _batch(step: int, rank: int, sparse: bool = False) -> Any:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    if sparse:
        return torch.randint(0, 12, (5, 3), generator=g)
    return torch.randn(8, 6, generator=g, dtype=torch.float64)


def _loss(model: Any, x: Any) -> Any:
    y = model(x)
    return (y**2).mean() + y.sum() * 0.1


def _chosen(model: Any, which: str) -> list[Any]:
    ps = list(model.parameters())
    return [p for p in ps if p.ndim == 2] if which == "matrices" else ps


def _needs_closure(opt: Any) -> bool:
    return type(opt).__name__ == "LBFGS"


def _reference(make: Callable[[list[Any]], Any], which: str, world: int, sparse: bool) -> Any:
    """One process: the mean of every rank's gradient, as DDP forms it, then the step."""
    import torch

    model = _model(0, sparse)
    opt = make(_chosen(model, which))
    for step in range(STEPS):

        def closure(step: int = step) -> Any:
            grads: list[Any] = [None] * len(list(model.parameters()))
            total = torch.zeros((), dtype=torch.float64)
            for rank in range(world):
                model.zero_grad()
                loss = _loss(model, _batch(step, rank, sparse))
                loss.backward()
                total = total + loss.detach() / world
                for i, p in enumerate(model.parameters()):
                    g = p.grad / world
                    grads[i] = g if grads[i] is None else grads[i] + g
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.coalesce() if g.is_sparse else g
            return total

        if _needs_closure(opt):
            opt.step(closure)
        else:
            closure()
            opt.step()
    return model


def _run(make: Callable[[list[Any]], Any], which: str, rank: int, sparse: bool,
         zero: Any = None) -> tuple[Any, Any]:
    """DDP on this rank (``zero``: a ZeroRedundancyOptimizer of ``make``'s class)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(0, sparse)
    ddp = DDP(model)
    opt = zero(_chosen(model, which)) if zero is not None else make(_chosen(model, which))
    for step in range(STEPS):
        x = _batch(step, rank, sparse)

        def closure(x: Any = x) -> Any:
            opt.zero_grad()
            loss = _loss(ddp, x)
            loss.backward()
            return loss

        if _needs_closure(getattr(opt, "optim", opt)):
            opt.step(closure)
        else:
            closure()
            opt.step()
    return model, opt


def _same(a: Any, b: Any) -> float:
    """The largest difference between two models' parameters (0.0: the same bits)."""
    import torch

    with torch.no_grad():
        return max(float((p - q).abs().max()) if not torch.equal(p, q) else 0.0
                   for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _state_bytes(opt: Any) -> int:
    import torch

    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for p, s in opt.state.items():
        # the step counters are bookkeeping, not optimizer state proper
        walk({k: v for k, v in s.items() if k != "step"} if isinstance(p, torch.Tensor) else s)
    return total


def classes(rank: int, world: int) -> dict[str, Any]:
    """Every class under DDP alone, and under ZeRO-1 over DDP (but L-BFGS: see the test)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import uniopt as uo
    from uniopt.memory import footprint

    declared = {"SGD": uo.sgd(lr=0.05, momentum=0.9), "RMSprop": uo.rmsprop(
        centered=True, momentum=0.5), "Adam": uo.adam(amsgrad=True), "AdamW": uo.adamw(),
        "Adafactor": uo.adafactor()}
    out: dict[str, Any] = {}
    for name, (cls, kw, which) in _classes().items():
        sparse = which == "embedding"

        def make(ps: list[Any], cls: Any = cls, kw: dict[str, Any] = kw) -> Any:
            return cls(ps, **kw)

        ref = _reference(make, which, world, sparse)
        model, _ = _run(make, which, rank, sparse)
        found: dict[str, Any] = {"ddp": _same(model, ref)}
        if name != "LBFGS":
            def zero(ps: list[Any], cls: Any = cls, kw: dict[str, Any] = kw) -> Any:
                return ZeroRedundancyOptimizer(ps, optimizer_class=cls, **kw)

            model, opt = _run(make, which, rank, sparse, zero)
            found["zero"] = _same(model, ref)
            found["local_params"] = sum(p.numel() for g in opt.optim.param_groups
                                        for p in g["params"])
            found["local_state_bytes"] = _state_bytes(opt.optim)
            found["all_params"] = sum(p.numel() for p in _chosen(model, which))
            if name in declared:
                # what uniopt.memory counts for this rank's share, in the params' float64
                shapes = [tuple(p.shape) for g in opt.optim.param_groups for p in g["params"]]
                found["footprint"] = footprint(declared[name], shapes,
                                               state_dtype="float64").state
                # and for the fullest rank, from every parameter's shape, as ZeRO shares them
                found["footprint zero1"] = footprint(
                    declared[name], [tuple(p.shape) for p in _chosen(model, which)],
                    world_size=world, strategy="zero1", param_dtype="float64").state
        out[name] = found
    return out


def recipe(rank: int, world: int) -> dict[str, Any]:
    """``uniopt.torch.Optimizer`` with a partition (no decay on vectors) and a masked rule,
    under ZeRO-1: labels and masks that read the leaf, which every rank can."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import uniopt as uo
    import uniopt.torch as ut

    rules = {
        "partition": uo.partition(
            {"decay": uo.adamw(lr=0.01, weight_decay=0.1),
             "no_decay": uo.adamw(lr=0.01, weight_decay=0.0)},
            lambda path, p: "no_decay" if p.ndim == 1 else "decay"),
        "masked": uo.chain(uo.masked(uo.weight_decay(1e-2), lambda path, p: p.ndim == 2),
                           uo.adam(lr=0.01)),
        # (a whole-tree part that steps each leaf alone: not refused as ZeRO's)
        "schedule_free": uo.schedule_free_adamw(lr=0.01, warmup_steps=2),
    }
    out: dict[str, Any] = {}
    for name, rule in rules.items():
        def make(ps: list[Any], rule: Any = rule) -> Any:
            return ut.Optimizer(ps, rule)

        def zero(ps: list[Any], rule: Any = rule) -> Any:
            return ZeroRedundancyOptimizer(ps, optimizer_class=ut.Optimizer, rule=rule)

        ref = _reference(make, "all", world, False)
        model, opt = _run(make, "all", rank, False, zero)
        out[name] = _same(model, ref)
        out[f"{name} resumed"] = _resumed(model, opt, zero, rank)
    out["whole group"] = _whole_group(rank, world)
    out["overlap"] = overlap(rank, world)
    return out


def _whole_group(rank: int, world: int) -> dict[str, Any]:
    """Rules with a part that reads every parameter of a group at once: under DDP alone, the
    one process's bits; as ZeRO-1's local optimizer, refused when ZeRO makes it (over a
    rank's share each rank computed such a part over its share alone), each error's text."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import uniopt as uo
    import uniopt.torch as ut

    clip = uo.chain(uo.clip_by_global_norm(0.1), uo.sgd(lr=0.1))
    out: dict[str, Any] = {}
    model, _ = _run(lambda ps: ut.Optimizer(ps, clip), "all", rank, False)
    out["ddp"] = _same(model, _reference(lambda ps: ut.Optimizer(ps, clip), "all", world, False))
    refused = {
        "clip": (ut.Optimizer, {"rule": clip}),
        "prodigy": (ut.Optimizer, {"rule": uo.prodigy()}),
        "skip_nonfinite": (ut.Optimizer, {"rule": uo.skip_nonfinite(uo.adam(lr=0.01))}),
        # (a combinator's member's norm: the partition itself routes by the leaf)
        "in a partition": (ut.Optimizer, {"rule": uo.partition(
            {"a": clip, "b": uo.adam(lr=0.01)}, lambda path, p: "a" if p.ndim == 2 else "b")}),
        "LBFGS": (ut.LBFGS, {"lr": 0.5}),
    }
    errors: dict[str, str | None] = {}
    for name, (cls, kw) in refused.items():
        try:
            ZeroRedundancyOptimizer(_chosen(_model(0), "all"), optimizer_class=cls, **kw)
            errors[name] = None
        except TypeError as e:
            errors[name] = str(e)
    out["zero"] = errors
    return out


def _resumed(model: Any, opt: Any, zero: Callable[[list[Any]], Any], rank: int) -> float:
    """ZeRO's state consolidated on rank 0, through a file read as plain data
    (``weights_only``), loaded into a fresh ZeRO optimizer on every rank: how far two more
    steps of it land from the run that never stopped (both on one batch, so every rank's
    gradients are the same without DDP)."""
    import io

    import torch
    import torch.distributed as dist

    opt.consolidate_state_dict(to=0)
    sd: list[Any] = [None]
    if rank == 0:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        sd = [torch.load(buf, weights_only=True)]
    dist.broadcast_object_list(sd, src=0)
    again = _model(0)
    again.load_state_dict(model.state_dict())
    resumed = zero(list(again.parameters()))
    resumed.load_state_dict(sd[0])
    for m, o in ((model, opt), (again, resumed)):
        for step in range(STEPS, STEPS + 2):
            o.zero_grad()
            _loss(m, _batch(step, 0)).backward()
            o.step()
    return _same(model, again)


OVERLAP_STEPS = 10
WARMUP = 2  # iterations in which ZeRO learns DDP's buckets and steps nothing (torch's docs)


def _overlap_reference(make: Callable[[list[Any]], Any], world: int, skip: int,
                       scheduler: Any = None) -> tuple[Any, Any]:
    """One process on the whole model, stepping on the mean gradient from iteration ``skip``
    on (the parameters do not move before it, so the earlier gradients are not needed); the
    model and the optimizer."""

    model = _model(0)
    opt = make(list(model.parameters()))
    sched = scheduler(opt) if scheduler is not None else None
    for step in range(skip, OVERLAP_STEPS):
        grads: list[Any] = [0.0] * len(list(model.parameters()))
        for rank in range(world):
            model.zero_grad()
            _loss(model, _batch(step, rank)).backward()
            grads = [a + p.grad / world for a, p in zip(grads, model.parameters(), strict=True)]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        opt.step()
        if sched is not None:
            sched.step()
    return model, opt


def _zero_overlap(cls: Any, kw: dict[str, Any], rank: int, interleaved: bool = False,
                  scheduler: Any = None, static_graph: bool = False,
                  shard_buckets: bool = False) -> tuple[Any, Any]:
    """ZeRO with ``overlap_with_ddp=True`` stepping in DDP's communication hook, DDP's
    gradients in buckets of a few parameters each (so a rank steps some of its parameters
    at a time); with ``shard_buckets``, in one bucket of every parameter, which ZeRO shares
    out between the ranks (each steps part of it)."""
    from unittest import mock

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import ddp_zero_hook
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(0)
    ddp = DDP(model, bucket_cap_mb=None if shard_buckets else 200 / 2**20,
              static_graph=static_graph)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls,
                                   overlap_with_ddp=True, **kw)
    hook = (ddp_zero_hook.hook_with_zero_step_interleaved if interleaved
            else ddp_zero_hook.hook_with_zero_step)
    # torch refuses gloo here ("may meet hangs"): with every collective issued in the same
    # order on both ranks, it does not; the test's time bound would catch it if it did
    with mock.patch.object(dist, "get_backend", return_value="nccl"):
        ddp.register_comm_hook(None, hook(allreduce_hook, ddp, zero,
                                          shard_buckets=shard_buckets))
    sched = scheduler(zero) if scheduler is not None else None
    for step in range(OVERLAP_STEPS):
        ddp.zero_grad()
        _loss(ddp, _batch(step, rank)).backward()  # the step runs in here
        if sched is not None and step >= WARMUP + static_graph:
            sched.step()
    return model, zero


def overlap(rank: int, world: int) -> dict[str, Any]:
    """ZeRO(overlap_with_ddp=True) and DDP's fused step with ``uniopt.torch`` classes, held to
    one process and to torch's own classes."""
    import torch

    import uniopt.torch as ut

    cases = {
        "AdamW": (ut.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
        "SGD": (ut.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
        "Adam": (ut.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    }
    out: dict[str, Any] = {}
    for name, (ucls, tcls, kw) in cases.items():
        def make(ps: list[Any], ucls: Any = ucls, kw: dict[str, Any] = kw) -> Any:
            return ucls(ps, **kw)

        ref, ref_opt = _overlap_reference(make, world, WARMUP)
        model, zero = _zero_overlap(ucls, kw, rank)
        theirs, _ = _zero_overlap(tcls, kw, rank)
        local = zero.optim.param_group["params"]
        out[name] = {
            "ref": _same(model, ref), "torch": _rel(model, theirs),
            "steps": sorted({int(zero.optim.state[p]["step"]) for p in local}),
            "local_params": len(local), "twin": type(zero.optim).__name__,
            "state": _consolidated(zero, ref_opt, rank),
        }

    def decay(opt: Any) -> Any:
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)

    kw = {"lr": 0.01, "weight_decay": 0.1}
    ref, _ = _overlap_reference(lambda ps: ut.AdamW(ps, **kw), world, WARMUP, decay)
    model, zero = _zero_overlap(ut.AdamW, kw, rank, scheduler=decay)
    out["scheduled"] = {"ref": _same(model, ref), "lr": zero.optim.param_group["lr"]}
    # DDP's static_graph (ZeRO waits one iteration more) and the hook's shard_buckets
    for name, opts in {"static_graph": {"static_graph": True},
                       "shard_buckets": {"shard_buckets": True}}.items():
        make = functools.partial(ut.AdamW, **kw)
        ref, _ = _overlap_reference(make, world, WARMUP + name.startswith("static"))
        model, zero = _zero_overlap(ut.AdamW, kw, rank, **opts)
        local = zero.optim.param_group["params"]
        out[name] = {"ref": _same(model, ref), "local_params": len(local),
                     "steps": sorted({int(zero.optim.state[p]["step"]) for p in local}),
                     "buckets": [sorted(r) for r in
                                 zero._overlap_info.assigned_ranks_per_bucket]}
    out["fused"] = _fused(rank, world)
    out["errors"] = _overlap_errors()
    return out


def _consolidated(zero: Any, ref: Any, rank: int) -> bool | None:
    """Whether ZeRO's state, gathered on rank 0 from the twins, is the one-process
    optimizer's, tensor for tensor (None on the other rank)."""
    import torch

    zero.consolidate_state_dict(to=0)
    if rank != 0:
        return None
    ours, theirs = zero.state_dict()["state"], ref.state_dict()["state"]
    return ours.keys() == theirs.keys() and all(
        ours[k].keys() == theirs[k].keys()
        and all(torch.equal(ours[k][n], theirs[k][n]) for n in ours[k]) for k in ours)


def _rel(a: Any, b: Any) -> float:
    """The largest relative difference between two models' parameters."""
    import torch

    with torch.no_grad():
        return max(float(((p - q).abs() / q.abs().clamp_min(1e-300)).max())
                   for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _fused(rank: int, world: int) -> float:
    """DDP's ``_register_fused_optim(uniopt.torch.AdamW, ...)``: each parameter stepped as its
    bucket is reduced, against one process stepping after backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import uniopt.torch as ut

    kw = {"lr": 0.01, "weight_decay": 0.1}
    model = _model(0)
    ddp = DDP(model, bucket_cap_mb=200 / 2**20)
    ddp._register_fused_optim(ut.AdamW, **kw)
    for step in range(OVERLAP_STEPS):
        ddp.zero_grad()
        _loss(ddp, _batch(step, rank)).backward()
    return _same(model, _overlap_reference(lambda ps: ut.AdamW(ps, **kw), world, 0)[0])


def _overlap_errors() -> dict[str, str | None]:
    """What a class that cannot step in DDP's hook says: at once under DDP's fused step; under
    ZeRO, when ZeRO builds its local optimizer (after DDP's buckets are rebuilt)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import uniopt.torch as ut

    out: dict[str, str | None] = {}
    try:
        DDP(_model(0))._register_fused_optim(ut.LBFGS, lr=0.5)
        out["fused"] = None
    except TypeError as e:
        out["fused"] = str(e)
    try:
        _zero_overlap(ut.SparseAdam, {"lr": 0.01}, rank)
        out["zero"] = None
    except TypeError as e:  # raised in DDP's hook at the 3rd iteration, out of backward()
        out["zero"] = str(e)
    return out


if __name__ == "__main__":
    import torch.distributed as dist

    import uniopt.torch  # noqa: F401  (before torch.distributed.optim: registered when it is)

    lazy = "torch.distributed.optim.utils" not in sys.modules

    scenario, rank, world, port = sys.argv[1], *map(int, sys.argv[2:5])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        print(json.dumps({"rank": rank, "lazy": lazy, **globals()[scenario](rank, world)}),
              flush=True)
        # the scenario's DDP models and ZeRO optimizers hold the group, some in reference
        # cycles: collected before it is destroyed. Left to the interpreter's exit, torch
        # 2.13's gloo teardown aborts the process ("terminate called without an active
        # exception", after its results) in about one run in four, with torch's own AdamW
        # under DDP and ZeRO too (examples/ddp_zero1.py: 4 of 16; none of 16 released first).
        # The barrier waits for every operation queued before it (DDP's and ZeRO's own, issued
        # asynchronously): no rank closes its connections while its peer may still use them
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()

"""uniopt.torch.AdamW on FSDP2 shards beside the same step unsharded on as many parameters as
one shard holds, and beside torch.optim.AdamW on the same shards.

    python benchmarks/distributed.py [--world 2] [--size 16800000] [--tensors 1]
                                     [--repeats 10] [--rounds 3] [--backend gloo] [--offload]

``world`` processes (spawned, one gloo or NCCL group) each hold FSDP2 shards of ``tensors``
float32 parameters of ``size`` elements in all (the default is ``uniopt bench``'s W1; its W2 is
``--size 16000000 --tensors 1000``). Each process
times, in turn and in step with the others (a barrier before each timing, so that every process
contends for memory alike): ``uniopt.torch.AdamW.step()`` on its shard and the same class on a
plain tensors of the shards' sizes (the unsharded step on ``size / world`` parameters), in turns
for ``rounds`` rounds (the median of each), then
torch's AdamW (foreach, and fused) on its shard, and DeepSpeed's ``DeepSpeedCPUAdam`` (where
``deepspeed`` is installed) on plain tensors of the shard's sizes. The optimizer step only:
the gradients are set once (two sets, alternated). Prints, on rank 0, the median wall and CPU
milliseconds per step (CPU: this process's threads, steadier on a busy machine) and each row's
ratios to the unsharded uniopt step; the sharded uniopt step should be within 1.2x of it (what
it adds is the plan's per-step look at each DTensor gradient, about a microsecond a tensor).

``--offload``: the parameters, gradients and state stay in CPU memory
(``CPUOffloadPolicy``), as FSDP2 does for models larger than the accelerators' memory; with
``--backend nccl`` the mesh is CUDA's (one GPU per process) and the step still runs on the CPU
shards, where torch's ``fused=True`` is its CPU kernel.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import uniopt.torch as ut


class _Flat(torch.nn.Module):
    """``tensors`` parameters of ``size // tensors`` elements each."""

    def __init__(self, size: int, tensors: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.ws = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(size // tensors, generator=gen))
             for _ in range(tensors)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((w * x).sum() for w in self.ws)  # type: ignore[return-value]


def _median_ms(step: Any, repeats: int) -> tuple[float, float]:
    """The median wall and CPU (this process's threads) milliseconds of ``step``."""
    for _ in range(2):
        step()
    times, cpu = [], []
    for _ in range(repeats):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1e3 * statistics.median(times), 1e3 * statistics.median(cpu)


def _timed(opt: Any, params: list[torch.Tensor], grads: list[list[torch.Tensor]],
           repeats: int) -> tuple[float, float]:
    k = [0]

    def step() -> None:
        k[0] ^= 1
        for p, g in zip(params, grads[k[0]], strict=True):
            p.grad = g
        opt.step()

    return _median_ms(step, repeats)


def _grads(model: torch.nn.Module, device: str) -> list[list[torch.Tensor]]:
    """Two sets of gradients laid out as FSDP2 leaves them (after a backward pass)."""
    out = []
    for seed in (1, 2):
        model.zero_grad()
        x = torch.randn(model.ws[0].shape, generator=torch.Generator().manual_seed(seed))
        model(x.to(device)).backward()
        out.append([p.grad for p in model.parameters()])
    model.zero_grad()
    return out


def _run(rank: int, world: int, port: int, size: int, tensors: int, repeats: int, rounds: int,
         backend: str, offload: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    mesh = init_device_mesh(device, (world,))
    kw: dict[str, Any] = {}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device == "cuda")
    rows: dict[str, tuple[float, float]] = {}

    def fsdp_model() -> torch.nn.Module:
        m = _Flat(size, tensors)
        if not offload:
            m = m.to(device)
        fully_shard(m, mesh=mesh, **kw)
        return m

    m = fsdp_model()
    grads = _grads(m, device)
    shards = [p.to_local() for p in m.parameters()]
    n = sum(s.numel() for s in shards)
    sharded = f"uniopt.torch.AdamW, FSDP2 ({shards[0].device.type} shards, {n:,} in all)"
    unsharded = f"uniopt.torch.AdamW, {tensors} plain tensor(s) of the shards' sizes"
    opt = ut.AdamW(m.parameters(), lr=1e-3)
    plain = [torch.nn.Parameter(s.detach().clone()) for s in shards]
    plain_grads = [[g.to_local().clone() for g in gs] for gs in grads]
    plain_opt = ut.AdamW(plain, lr=1e-3)
    # the two in turns, a few rounds (a machine's other work comes and goes): each one's median
    times: dict[str, list[tuple[float, float]]] = {sharded: [], unsharded: []}
    for _ in range(rounds):
        times[sharded].append(_timed(opt, list(m.parameters()), grads, repeats))
        times[unsharded].append(_timed(plain_opt, plain, plain_grads, repeats))
    rows.update({k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
                 for k, v in times.items()})
    for name, opts in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        m = fsdp_model()
        grads = _grads(m, device)
        try:
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3, **opts)
            rows[f"torch.optim.AdamW({name}), FSDP2"] = _timed(opt, list(m.parameters()),
                                                               grads, repeats)
        except (RuntimeError, NotImplementedError) as e:
            if rank == 0:
                print(f"torch.optim.AdamW({name}) on FSDP2 shards: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160]}")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]
    except ImportError:
        DeepSpeedCPUAdam = None
    if DeepSpeedCPUAdam is not None:
        ps = [torch.nn.Parameter(s.detach().clone()) for s in shards]
        # the same AdamW (its adamw_mode is on by default); it takes no DTensors
        ds = DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=1e-2)
        rows["DeepSpeedCPUAdam, plain tensors"] = _timed(ds, ps, plain_grads, repeats)
    if rank == 0:
        base = rows[unsharded]
        print(f"{world} processes, {backend}, {torch.get_num_threads()} threads each, "
              f"{size:,} float32 parameters in {tensors} tensor(s)"
              f"{', CPU offload' if offload else ''}; wall and CPU ms, ratios to the plain step")
        for name, (ms, cpu) in rows.items():
            print(f"  {name:<62} {ms:8.2f} {ms / base[0]:6.2f}x {cpu:8.2f} {cpu / base[1]:6.2f}x")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--size", type=int, default=16_800_000)
    ap.add_argument("--tensors", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--offload", action="store_true")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(a.world, port, a.size, a.tensors, a.repeats, a.rounds, a.backend,
                         a.offload),
             nprocs=a.world)


if __name__ == "__main__":
    main()

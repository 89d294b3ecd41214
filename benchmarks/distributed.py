"""uniopt.torch.AdamW on FSDP2 shards beside the same step unsharded on as many parameters as
one shard holds, and beside torch.optim.AdamW on the same shards.

    python benchmarks/distributed.py [--world 2] [--size 16800000] [--repeats 10]
                                     [--backend gloo] [--offload]

``world`` processes (spawned, one gloo or NCCL group) each hold an FSDP2 shard of one
float32 parameter of ``size`` elements (the default is ``uniopt bench``'s W1). Each process
times, in turn and in step with the others (a barrier before each timing, so that every process
contends for memory alike): ``uniopt.torch.AdamW.step()`` on its shard, the same class on a
plain tensor of the shard's size (the unsharded step on ``size / world`` parameters), and
torch's AdamW (foreach, and fused) on its shard. The optimizer step only: the gradients are
set once (two sets, alternated). Prints the median milliseconds per step on rank 0 and each
row's ratio to the unsharded uniopt step; the sharded uniopt step should be within 1.2x of it
(the difference is the plan's per-step checks of DTensor gradients, a few microseconds).

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
    def __init__(self, size: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(size, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


def _median_ms(step: Any, repeats: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _timed(opt: Any, params: list[torch.Tensor], grads: list[list[torch.Tensor]],
           repeats: int) -> float:
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
        x = torch.randn(model.w.shape, generator=torch.Generator().manual_seed(seed))
        model(x.to(device)).backward()
        out.append([p.grad for p in model.parameters()])
    model.zero_grad()
    return out


def _run(rank: int, world: int, port: int, size: int, repeats: int, backend: str,
         offload: bool) -> None:
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
    rows: dict[str, float] = {}

    def fsdp_model() -> torch.nn.Module:
        m = _Flat(size)
        if not offload:
            m = m.to(device)
        fully_shard(m, mesh=mesh, **kw)
        return m

    m = fsdp_model()
    grads = _grads(m, device)
    shard = m.w.to_local()
    where = f"{shard.device.type} shards of {shard.numel():,}"
    rows[f"uniopt.torch.AdamW, FSDP2 ({where})"] = _timed(
        ut.AdamW(m.parameters(), lr=1e-3), list(m.parameters()), grads, repeats)
    plain = torch.nn.Parameter(shard.detach().clone())
    plain_grads = [[g.to_local().clone()] for g, in grads]
    rows[f"uniopt.torch.AdamW, one tensor of {shard.numel():,}"] = _timed(
        ut.AdamW([plain], lr=1e-3), [plain], plain_grads, repeats)
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
        p = torch.nn.Parameter(shard.detach().clone())
        rows["DeepSpeedCPUAdam, one tensor"] = _timed(DeepSpeedCPUAdam([p], lr=1e-3), [p],
                                                      plain_grads, repeats)
    if rank == 0:
        base = rows[f"uniopt.torch.AdamW, one tensor of {shard.numel():,}"]
        print(f"{world} processes, {backend}, {torch.get_num_threads()} threads each, "
              f"{size:,} float32 parameters{', CPU offload' if offload else ''}")
        for name, ms in rows.items():
            print(f"  {name:<58} {ms:8.2f} ms  {ms / base:5.2f}x")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--size", type=int, default=16_800_000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--offload", action="store_true")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(a.world, port, a.size, a.repeats, a.backend, a.offload),
             nprocs=a.world)


if __name__ == "__main__":
    main()

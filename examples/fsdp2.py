"""uniopt on FSDP2: a small transformer trained with a uniopt recipe, then checkpointed.

    torchrun --nproc_per_node 2 examples/fsdp2.py          # gloo, on CPU
    torchrun --nproc_per_node 2 examples/fsdp2.py --cuda   # NCCL, one GPU per process
    torchrun --nproc_per_node 2 examples/fsdp2.py --offload
    torchrun --nproc_per_node 4 examples/fsdp2.py --hsdp   # a 2-D mesh: replicated x sharded

The optimizer is built on the sharded parameters (DTensors) exactly as on a plain model; each
rank steps its own shards, and the state comes out as DTensors laid out as the parameters, which
``torch.distributed.checkpoint`` saves (and reshards, when loaded on another number of ranks).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

import uniopt as uo
import uniopt.torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--hsdp", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--checkpoint", default="/tmp/uniopt_fsdp2_example")
    a = ap.parse_args()
    device = "cuda" if a.cuda else "cpu"
    if a.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if a.cuda else "gloo")
    world = dist.get_world_size()
    # HSDP: parameters sharded over the second dimension, replicated over the first
    mesh = (init_device_mesh(device, (2, world // 2), mesh_dim_names=("replicate", "shard"))
            if a.hsdp else init_device_mesh(device, (world,)))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(
        64, 4, dim_feedforward=128, dropout=0.0, batch_first=True) for _ in range(2)])
    if not a.offload:
        model = model.to(device)
    kw = {"offload_policy": CPUOffloadPolicy(pin_memory=a.cuda)} if a.offload else {}
    for layer in model:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)

    # any uniopt rule or recipe; the global norm is summed over every rank's shards
    opt = uniopt.torch.Optimizer(model.parameters(), uo.chain(
        uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-3, weight_decay=0.1)))

    gen = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data
    for step in range(a.steps):
        x = torch.randn(8, 16, 64, generator=gen).to(device)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        if dist.get_rank() == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    state = next(iter(opt.state.values()))
    if dist.get_rank() == 0:
        print({k: getattr(v, "placements", "plain") for k, v in state.items()})
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=a.checkpoint)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

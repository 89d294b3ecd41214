"""Data parallel training with ZeRO-1 and a uniopt optimizer.

    torchrun --nproc_per_node 2 examples/ddp_zero1.py [--recipe | --fused]

gloo on CPU, as here; the same code with NCCL on GPUs (``init_process_group("nccl")`` and the
model and batches on ``cuda:LOCAL_RANK``). Each rank keeps AdamW's moments for its share of the
parameters only (ZeRO stage 1); DDP averages the gradients, ZeRO broadcasts the updated shards.
With ``--fused``, no ZeRO: DDP steps each parameter as soon as its gradient bucket is reduced,
inside its communication hook (``_register_fused_optim``), and the loop has no ``step()``.
"""


import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import uniopt as uo
import uniopt.torch as ut

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))

fused = "--fused" in sys.argv
if fused:
    # uniopt.torch.AdamW's functional twin, stepped by DDP's hook (no optimizer to step here)
    model._register_fused_optim(ut.AdamW, lr=1e-2, weight_decay=0.1)
elif "--recipe" not in sys.argv:
    # a uniopt.torch class as ZeRO's local optimizer, with its own arguments
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ut.AdamW, lr=1e-2,
                                  weight_decay=0.1)
else:
    # a recipe: here no decay on vectors (labels read the leaf: ZeRO hands each rank its
    # share of the parameters without their names; a part that reads every parameter at
    # once, a global norm, is refused under ZeRO: docs/scaling-out.md)
    rule = uo.partition({"decay": uo.adamw(lr=1e-2, weight_decay=0.1),
                         "no_decay": uo.adamw(lr=1e-2)},
                        lambda path, p: "no_decay" if p.ndim == 1 else "decay")
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ut.Optimizer, rule=rule)

gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
w_true = torch.arange(16.0) / 16
for _ in range(200):
    x = torch.randn(64, 16, generator=gen)
    loss = ((model(x).squeeze(-1) - x @ w_true) ** 2).mean()
    model.zero_grad()
    loss.backward()  # with --fused, the step runs in here
    if not fused:
        opt.step()

if fused:
    where = "stepped in DDP's communication hook"
else:
    mine = torch.tensor([sum(p.numel() for g in opt.optim.param_groups for p in g["params"])])
    shares = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(shares, mine)
    where = f"parameters per rank's optimizer state: {[int(s) for s in shares]}"
if rank == 0:
    print(f"loss {loss.item():.4f}; {where}")
# DDP's reducer and ZeRO hold the group: released before it goes (left to the interpreter's
# exit, torch 2.13's gloo teardown aborted about one run in four, torch's own AdamW alike)
del model
if not fused:
    del opt
gc.collect()
dist.destroy_process_group()

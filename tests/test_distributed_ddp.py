"""``uniopt.torch`` under ``DistributedDataParallel`` and ZeRO-1
(``torch.distributed.optim.ZeroRedundancyOptimizer``): two gloo processes on CPU, each scenario
one spawned group (tests/distributed_torch_worker.py), held to a single-process run of the
same optimizer on the mean gradient. DDP divides each rank's gradient by the world size and
sums (both exact in float64 for two ranks), so the runs agree bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not built in", allow_module_level=True)

WORKER = Path(__file__).with_name("distributed_torch_worker.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _spawn(scenario: str, timeout: float = 240) -> list[dict[str, Any]]:
    """Run ``scenario`` on every rank of a fresh group; each rank's findings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(rank), str(WORLD),
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
             for rank in range(WORLD)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [o["rank"] for o in outs] == list(range(WORLD))
    return outs


@pytest.fixture(scope="module")
def recipes() -> list[dict[str, Any]]:
    return _spawn("recipe")


@pytest.mark.parametrize("name", ["partition", "masked"])
def test_zero1_of_a_recipe_equals_one_process(recipes: list[dict[str, Any]], name: str) -> None:
    """``ZeroRedundancyOptimizer(params, optimizer_class=uniopt.torch.Optimizer, rule=...)``
    with a partition (no decay on vectors) and a masked decay, over DDP: the same bits as one
    process. Labels and masks read the leaf: ZeRO hands each rank its share of a group's
    parameters without their names, so a rule by path would see positions."""
    for out in recipes:
        assert out[name] == 0.0, out


def test_overlap_with_ddp_needs_a_functional_optimizer(recipes: list[dict[str, Any]]) -> None:
    """``overlap_with_ddp=True`` steps inside DDP's communication hook, through a functional
    optimizer that torch maps from its own classes only (``functional_optim_map``): for
    ``uniopt.torch`` classes it raises, naming the class."""
    for out in recipes:
        assert out["overlap_error"] is not None
        assert "requires using a functional optimizer" in out["overlap_error"]
        assert "uniopt.torch" in out["overlap_error"]


@pytest.mark.slow
def test_every_class_under_ddp_and_zero1_equals_one_process() -> None:
    """Every ``uniopt.torch`` class, under DDP alone and as ZeRO-1's local optimizer: the
    parameters each rank ends with are the single-process run's, and each rank keeps state for
    its share of the parameters only. L-BFGS runs under DDP alone: its curvature pairs are dot
    products over every parameter, which ZeRO splits between ranks (torch's LBFGS alike)."""
    outs = _spawn("classes")
    names = set(outs[0]) - {"rank"}
    assert names == {"SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax",
                     "NAdam", "RAdam", "ASGD", "Rprop", "Adafactor", "Muon", "SparseAdam",
                     "LBFGS"}
    for name in names:
        # SparseAdam: the sparse all-reduce sums an index's entries in another order than one
        # process's coalesce, a last-bit difference of the gradient itself
        tol = 1e-15 if name == "SparseAdam" else 0.0
        for out in outs:
            assert out[name]["ddp"] <= tol, (name, out[name])
            if name != "LBFGS":
                assert out[name]["zero"] <= tol, (name, out[name])
        if name != "LBFGS":
            # each rank holds a share; together, every parameter once
            assert sum(o[name]["local_params"] for o in outs) == outs[0][name]["all_params"]
    for out in outs:  # AdamW: two float64 slots per parameter of the rank's share
        assert out["AdamW"]["local_state_bytes"] == 2 * 8 * out["AdamW"]["local_params"]
        # each rank's state is what uniopt.memory.footprint counts for its share
        for name in ("SGD", "RMSprop", "Adam", "AdamW", "Adafactor"):
            assert out[name]["local_state_bytes"] == out[name]["footprint"], (name, out[name])


@pytest.mark.slow
def test_the_torchrun_example_runs() -> None:
    """examples/ddp_zero1.py, docs/scaling-out.md's, under ``torchrun --nproc_per_node 2``."""
    example = WORKER.parents[1] / "examples" / "ddp_zero1.py"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(_free_port()), str(example)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("loss"))
    assert float(line.split()[1].rstrip(";")) < 0.05, line
    assert "per rank's optimizer state: [512, 65]" in line  # whole tensors, greedily by size


def test_names_that_do_not_match_the_parameters_are_refused() -> None:
    """A rank's share of a ZeRO group keeps every name of the group: a rule by path would
    name the wrong leaves, so the step refuses, saying why, and changes nothing."""
    import uniopt as uo
    import uniopt.torch as ut

    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    rule = uo.partition({"d": uo.adamw(lr=0.1)}, uo.by_path({"*": "d"}))
    opt = ut.Optimizer([{"params": [a, b], "param_names": ["x", "y", "z"]}], rule)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(ValueError, match="a param group has 2 parameters and 3 param_names"):
        opt.step()
    assert not a.any() and not b.any()

"""``uniopt.torch`` under ``DistributedDataParallel`` and ZeRO-1
(``torch.distributed.optim.ZeroRedundancyOptimizer``): two gloo processes on CPU, each scenario
one spawned group (tests/distributed_torch_worker.py), held to a single-process run of the
same optimizer on the mean gradient. DDP divides each rank's gradient by the world size and
sums (both exact in float64 for two ranks), so the runs agree bit for bit.
"""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize("name", ["partition", "masked", "schedule_free"])
def test_zero1_of_a_recipe_equals_one_process(recipes: list[dict[str, Any]], name: str) -> None:
    """``ZeroRedundancyOptimizer(params, optimizer_class=uniopt.torch.Optimizer, rule=...)``
    with a partition (no decay on vectors), a masked decay and schedule-free AdamW (a
    whole-tree part that steps each leaf alone), over DDP: the same bits as one process.
    Labels and masks read the leaf: ZeRO hands each rank its share of a group's parameters
    without their names, so a rule by path would see positions. Its state, consolidated and
    saved as plain data, resumes on both ranks bit for bit."""
    for out in recipes:
        assert out[name] == 0.0, out
        assert out[f"{name} resumed"] == 0.0, out


def test_zero1_refuses_a_rule_that_reads_every_parameter_of_a_group(
        recipes: list[dict[str, Any]]) -> None:
    """ZeRO-1 makes each rank's optimizer over that rank's share of the parameters: a global
    norm, Prodigy's estimate, skip_nonfinite's test of every gradient, a norm inside a
    partition's member, L-BFGS's dot products, each computed over the share alone (the
    clipped SGD's parameters 5e-3 off one process's after 3 steps, silently). Refused when ZeRO
    makes the optimizer, naming the part and what to use instead; under DDP alone the same
    clipped SGD is the one process's, bit for bit."""
    for out in recipes:
        found = out["whole group"]
        assert found["ddp"] == 0.0, found
        parts = {"clip": "clip_by_global_norm", "prodigy": "scale_by_prodigy",
                 "skip_nonfinite": "skip_nonfinite", "in a partition": "clip_by_global_norm",
                 "LBFGS": "lbfgs_step"}
        for name, part in parts.items():
            error = found["zero"][name]
            cls = "LBFGS" if name == "LBFGS" else "Optimizer"
            assert error is not None and error.startswith(
                f"uniopt.torch.{cls} as ZeroRedundancyOptimizer's optimizer_class on 2 ranks: "
                f"its rule's {part} reads every parameter of a group at once"), (name, error)
            assert "DistributedDataParallel without ZeRO" in error, error
            # FSDP2 sums a global norm over the ranks' shards; whole-tree parts it refuses too
            assert ("FSDP2" in error) == (part == "clip_by_global_norm"), error


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adam"])
def test_zero_overlapped_with_ddp_equals_one_process_and_torch(
        recipes: list[dict[str, Any]], name: str) -> None:
    """``ZeroRedundancyOptimizer(..., optimizer_class=uniopt.torch.X, overlap_with_ddp=True)``
    under ``hook_with_zero_step``, DDP's gradients in buckets of one or two parameters: each
    rank steps its parameters a bucket at a time, through the class's functional twin, inside
    the communication hook. After ZeRO's two warm-up iterations (no step while it learns DDP's
    buckets), the same bits as one process stepping the whole model on the mean gradient
    (float64, two ranks: the mean is exact); every local parameter counted 8 steps, its own;
    and torch's own class under the same setup (its TorchScript twin) to the float64 tolerance
    of the torch parity tests: SGD bit for bit, Adam and AdamW within an ulp or two, torch's
    CPU square root not being the correctly rounded one (docs/frameworks.md; the two classes
    on one process differ by as much)."""
    for out in recipes:
        found = out["overlap"][name]
        assert found["twin"] == f"Functional{name}"
        assert found["ref"] == 0.0, found
        assert found["torch"] <= (0.0 if name == "SGD" else 1e-12), found
        assert found["steps"] == [8], found
    # each rank holds a share: together, the model's four parameters once; gathered on rank 0
    # (ZeRO's consolidate_state_dict, through the twins' state_dict), the one process's state
    assert sum(o["overlap"][name]["local_params"] for o in recipes) == 4
    assert [o["overlap"][name]["state"] for o in recipes] == [True, None]
    # registered when torch.distributed.optim was imported, after uniopt.torch
    assert all(o["lazy"] for o in recipes)


def test_an_lr_scheduler_on_zero_reaches_the_functional_twin(
        recipes: list[dict[str, Any]]) -> None:
    """``ExponentialLR`` on the ZeRO optimizer: ZeRO copies its groups' values into the twin's
    ``param_group`` before each overlapped step, and the twin's group is the wrapped class's,
    so the run equals one process with the scheduler on its own optimizer, bit for bit; the
    last step ran at ``0.01 * 0.7**7``."""
    for out in recipes:
        found = out["overlap"]["scheduled"]
        assert found["ref"] == 0.0, found
        assert found["lr"] == pytest.approx(0.01 * 0.7**7, rel=1e-12)


def test_zero_overlap_with_static_graph_and_shard_buckets(
        recipes: list[dict[str, Any]]) -> None:
    """ZeRO overlapped with a ``DDP(static_graph=True)`` model (ZeRO learns the buckets one
    iteration later: 3 warm-up iterations, 7 steps of 10), and ``hook_with_zero_step(...,
    shard_buckets=True)`` over one bucket of all four parameters, which ZeRO splits between
    the ranks (three on one, one on the other: each rank's step hands the twin gradients for
    part of a bucket): uniopt.torch.AdamW's twin gives one process's bits in both."""
    static = [o["overlap"]["static_graph"] for o in recipes]
    shared = [o["overlap"]["shard_buckets"] for o in recipes]
    for found in static + shared:
        assert found["ref"] == 0.0, found
    assert all(f["steps"] == [7] for f in static), static
    assert all(f["steps"] == [8] for f in shared), shared
    assert all(f["buckets"] == [[0, 1]] for f in shared), shared  # one bucket, both ranks'
    assert sorted(f["local_params"] for f in shared) == [1, 3]


def test_ddp_fused_optimizer_equals_a_separate_step(recipes: list[dict[str, Any]]) -> None:
    """``ddp._register_fused_optim(uniopt.torch.AdamW, lr=...)``: DDP steps each parameter
    (``step_param``) as its bucket is reduced; the same bits as one process stepping after
    backward on the mean gradient."""
    for out in recipes:
        assert out["overlap"]["fused"] == 0.0


def test_a_class_that_cannot_overlap_says_why(recipes: list[dict[str, Any]]) -> None:
    """L-BFGS under DDP's fused step raises at registration; SparseAdam under ZeRO's overlap
    when ZeRO builds its local optimizer (the third iteration's backward): each naming the
    class and why."""
    for out in recipes:
        errors = out["overlap"]["errors"]
        assert errors["fused"] is not None and errors["zero"] is not None
        assert errors["fused"].startswith("uniopt.torch.LBFGS cannot be a functional optimizer")
        assert "closure" in errors["fused"]
        assert errors["zero"].startswith("uniopt.torch.SparseAdam cannot be a functional")
        assert "sparse gradients only" in errors["zero"]


@pytest.mark.slow
def test_every_class_under_ddp_and_zero1_equals_one_process() -> None:
    """Every ``uniopt.torch`` class, under DDP alone and as ZeRO-1's local optimizer: the
    parameters each rank ends with are the single-process run's, and each rank keeps state for
    its share of the parameters only. L-BFGS runs under DDP alone: its curvature pairs are dot
    products over every parameter, which ZeRO splits between ranks (torch's LBFGS alike)."""
    outs = _spawn("classes")
    names = set(outs[0]) - {"rank", "lazy"}
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
    for name in ("SGD", "RMSprop", "Adam", "AdamW", "Adafactor"):
        # and the fullest rank's is what it counts for strategy="zero1": ZeRO hands out whole
        # tensors (Adafactor's fullest rank in state holds the fewer parameters)
        assert max(o[name]["local_state_bytes"] for o in outs) == \
            outs[0][name]["footprint zero1"], (name, outs)


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


def test_a_bucket_step_moves_its_parameters_alone_each_with_its_own_count() -> None:
    """The functional twin steps the parameters handed a gradient, as the class steps them,
    and leaves the others, their state and their step counts as they are; the ``.grad`` it
    lends the class for the step is given back."""
    from torch.distributed.optim.utils import functional_optim_map

    import uniopt.torch as ut

    torch.manual_seed(0)
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    twin = functional_optim_map[ut.AdamW]([a, b], lr=0.1, weight_decay=0.1)
    a0, b0 = a.clone(), b.clone()
    twin.step([ga, None])
    assert torch.equal(b, b0) and b not in twin.state and a.grad is None
    alone = a0.clone()
    ref = ut.AdamW([alone], lr=0.1, weight_decay=0.1)
    alone.grad = ga
    ref.step()
    assert torch.equal(a, alone)
    twin.step([None, gb])
    twin.step([ga, gb])
    assert (int(twin.state[a]["step"]), int(twin.state[b]["step"])) == (2, 2)
    ref.step()
    assert torch.equal(a, alone)

    with pytest.raises(ValueError, match=r"functional uniopt.torch.AdamW.step: 1 gradients "
                                         r"for 2 parameters"):
        twin.step([ga])
    assert torch.equal(a, alone) and int(twin.state[a]["step"]) == 2


def test_every_class_is_registered_and_a_whole_group_rule_is_refused() -> None:
    """Each public ``uniopt.torch`` class maps to its own twin in torch's map; a rule with a
    part that sees every parameter at once (a global norm) is refused, saying why."""
    from torch.distributed.optim.utils import functional_optim_map

    import uniopt as uo
    import uniopt.torch as ut
    from uniopt.torch.functional import Functional

    for name in ut.__all__:
        twin = functional_optim_map[getattr(ut, name)]
        assert twin.optimizer_class is getattr(ut, name) and issubclass(twin, Functional)
    rule = uo.chain(uo.clip_by_global_norm(1.0), uo.adam(lr=0.1))
    with pytest.raises(TypeError, match=r"uniopt.torch.Optimizer cannot be a functional "
                                        r"optimizer .*clip_by_global_norm sees every parameter"):
        functional_optim_map[ut.Optimizer]([torch.zeros(2)], rule=rule)


# --- ZeRO-1 checkpoints, in one gloo process ------------------------------------------------


@pytest.fixture
def one_rank() -> Any:
    """A gloo group of this process alone: ZeRO's state dicts and loads run as on many ranks
    (the rank's share is every parameter)."""
    import gc

    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        gc.collect()  # the ZeRO optimizers hold the group
        dist.destroy_process_group()


def _zero_run(rule: Any, steps: range, model: Any = None, opt: Any = None) -> tuple[Any, Any]:
    """``steps`` steps of ``docs/scaling-out.md``'s recipe, ``ZeroRedundancyOptimizer(params,
    optimizer_class=uniopt.torch.Optimizer, rule=rule)`` (a fresh model and optimizer if not
    given)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import uniopt.torch as ut

    if model is None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 1)).double()
    if opt is None:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ut.Optimizer,
                                      rule=rule)
    for i in steps:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model, opt


def _saved(opt: Any) -> Any:
    """``opt``'s consolidated state dict through a file, read as plain data."""
    import io

    opt.consolidate_state_dict(to=0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _rules() -> dict[str, Any]:
    import uniopt as uo

    adamw = {"decay": uo.adamw(lr=1e-2, weight_decay=0.1), "no_decay": uo.adamw(lr=1e-2)}
    return {
        "docs' recipe": uo.partition(adamw, lambda path, p: "no_decay" if p.ndim == 1
                                     else "decay"),
        "by_path": uo.partition(adamw, uo.by_path({"*": "decay"})),
        "accumulate": uo.accumulate(uo.adam(lr=1e-2), 2),
        "elementwise": uo.adamw(lr=1e-2, weight_decay=0.1),
    }


def test_zero_recipe_state_dicts_are_plain_data(one_rank: None) -> None:
    """ZeRO copies its keywords, the rule too, into its param groups and the local
    optimizer's: the rule is not written there (a lambda label pickles not at all, and
    ``torch.load(weights_only=True)`` reads no rule), so the consolidated state dict and the
    local one are plain data."""
    import pickle

    for name, rule in _rules().items():
        _, opt = _zero_run(rule, range(1))
        sd = _saved(opt)  # raised (lambda: pickling; by_path: weights_only) before
        assert [g["rule"] for g in sd["param_groups"]] == [None], name
        pickle.dumps(opt.optim.state_dict())  # what consolidating sends from other ranks


def test_zero_resume_is_bit_for_bit(one_rank: None) -> None:
    """A consolidated ZeRO state dict loaded through ZeRO's ``load_state_dict`` (which writes
    each parameter's state into the local optimizer's itself) resumes the run bit for bit:
    with a combinator's group state too, into a fresh optimizer and into one that stepped on
    since (the loaded state, not the one it held, is stepped)."""
    for name, rule in _rules().items():
        model, opt = _zero_run(rule, range(3))
        sd, weights = _saved(opt), {k: v.clone() for k, v in model.state_dict().items()}
        _zero_run(rule, range(3, 6), model, opt)  # the run that never stopped
        again, resumed = _zero_run(rule, range(0))
        again.load_state_dict(weights)
        # (copies: ZeRO's load keeps a state dict's tensors on their device as they are)
        resumed.load_state_dict(copy.deepcopy(sd))
        _zero_run(rule, range(3, 6), again, resumed)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(),
                                                     strict=True)), name
        end = [p.clone() for p in model.parameters()]
        model.load_state_dict(weights)
        opt.load_state_dict(copy.deepcopy(sd))
        _zero_run(rule, range(3, 6), model, opt)
        assert all(map(torch.equal, model.parameters(), end)), name


def test_zero_group_state_of_another_layout_is_refused(one_rank: None) -> None:
    """A group's state is kept by the group's first parameter; found in another's (a state
    saved by a ZeRO of another world size), the step raises and changes nothing."""
    import uniopt as uo

    rule = uo.accumulate(uo.adam(lr=1e-2), 2)
    _, opt = _zero_run(rule, range(1))
    sd = _saved(opt)
    sd["state"][1] = {"uniopt.group": sd["state"][0].pop("uniopt.group")}
    model, fresh = _zero_run(rule, range(0))
    fresh.load_state_dict(sd)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 holds a group's state "
                                         r"\('uniopt.group'\), which the group's first"):
        _zero_run(rule, range(1), model, fresh)
    assert all(map(torch.equal, model.parameters(), before))


def test_zero_overlap_of_a_rule_saves_plain_data(one_rank: None) -> None:
    """The same with ``overlap_with_ddp=True``: the functional twin's group, which ZeRO copies
    into its own once it builds the twin, holds no rule either."""
    import importlib.util

    import uniopt as uo
    import uniopt.torch as ut

    spec = importlib.util.spec_from_file_location("distributed_torch_worker", WORKER)
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    _, zero = worker._zero_overlap(ut.Optimizer, {"rule": uo.adamw(lr=0.01)}, 0)
    assert [g["rule"] for g in _saved(zero)["param_groups"]] == [None]

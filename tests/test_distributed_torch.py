"""uniopt on torch.distributed: FSDP2 (``fully_shard``), tensor parallel and
``torch.distributed.checkpoint``, with gloo on this machine's CPU.

Each scenario is one group of processes (forked from a fresh interpreter running this file,
see :class:`Launcher`: the ranks inherit its imports and compiled loops), bounded in time,
which measures everything it checks and writes it to a JSON file per rank; the assertions
run here, in the test. Every rank trains on the same batch, so a sharded run computes
exactly the unsharded run's gradients (FSDP2 averages equal gradients: ``(g + g) / 2 = g``
in binary floating point), and a uniopt class on FSDP2 shards must equal the same class on
the whole model bit for bit: both run the same compiled loop over the same numbers, element
by element. Parts that need more than one element (a
global norm, Adafactor's factors, Muon's iteration, trust ratios) sum or gather across the
ranks; their results equal the unsharded run's to float32 rounding (see _ROUNDING).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import faulthandler
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import uniopt as uo  # noqa: E402
import uniopt.torch  # noqa: E402
from uniopt.fast import cpu  # noqa: E402

STEPS = 20
EPS32 = float(np.finfo(np.float32).eps)

# torch.optim's 15 classes, less the two FSDP2 cannot run: LBFGS evaluates a closure at trial
# points of one flat vector of every parameter (uniopt's is a whole-tree minimizer, refused on
# shards), and SparseAdam takes sparse gradients only, which FSDP2 never produces
SKIPPED = {
    "LBFGS": "a closure-driven minimizer over the flat vector of every parameter",
    "SparseAdam": "takes sparse gradients only; FSDP2's are dense DTensors",
}
# hyperparameters that use every slot of each class
CLASSES: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "Adagrad": dict(lr=0.05, lr_decay=1e-3),
    "RMSprop": dict(lr=1e-3, momentum=0.5, centered=True),
    "Adadelta": dict(lr=1.0),
    "Adam": dict(lr=1e-2, amsgrad=True),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adamax": dict(lr=1e-2),
    "NAdam": dict(lr=1e-2),
    "RAdam": dict(lr=1e-2),
    "ASGD": dict(lr=1e-2, t0=10.0),
    "Rprop": dict(lr=1e-3),
    "Adafactor": dict(lr=1e-2),
    "Muon": dict(lr=1e-2),  # on the matrices (torch's Muon takes nothing else)
}

# The bound on |sharded - unsharded| for parts that reduce across the ranks, as a multiple of
# eps32 times the tensor's largest magnitude after STEPS steps: a norm summed in another order
# differs in its last bits (each rank's partial sums, then their total), and a gathered tensor
# feeds the same operations as the whole one; so each step may round a handful of operations
# differently, and STEPS steps carry that forward: 4 ulps per step.
_ROUNDING = 4 * STEPS * EPS32


# --- launching ---------------------------------------------------------------------------------


def _compile_before_forking(*names: str) -> None:
    """The ranks are forked from the launcher, so a loop compiled there is every rank's: one
    step of each class ``names`` (and of 8-bit AdamW) on the unsharded models compiles the
    loops the ranks run, where each rank would compile the same code beside the others (twice
    or four times the CPU, on a machine whose cores the other test processes share). Each test
    asks for its own classes: with the suite's processes sharing this module's tests, one that
    asked for every class would compile (or wait for) loops its ranks never run."""
    old = cpu.MIN_LEAVES, cpu.MIN_SIZE
    cpu.MIN_LEAVES = cpu.MIN_SIZE = 0
    try:
        for name in names:
            m = _model("mlp")
            _train(m, getattr(uniopt.torch, name)(_params(m, name), **CLASSES[name]), "mlp", 1)
        m = _model("q8")
        _train(m, uniopt.torch.AdamW(m.parameters(), state_dtype="q8", **CLASSES["AdamW"]),
               "q8", 1)
    finally:
        cpu.MIN_LEAVES, cpu.MIN_SIZE = old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], world: int, port: int, out: str,
           args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    faulthandler.enable(all_threads=True)  # a rank that crashes says where, in the test's output
    torch.set_num_threads(1)  # the sharded and unsharded runs' matmuls alike, and 2 cores shared
    # every step on the compiled loop, sharded or not (small steps would take the reference
    # path in the test suite, see conftest)
    cpu.MIN_LEAVES = cpu.MIN_SIZE = 0
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


class Launcher:
    """Groups of ranks forked from a fresh interpreter that runs this file (:func:`_serve`),
    not from the test process: a fork copies only the forking thread, and a test process has
    others (JAX's, OpenMP's) whose half-copied state crashed a rank (SIGSEGV in a collective,
    once in some ten CI runs). One such launcher serves a test process's groups in turn, so
    its imports and compiled loops are paid for once."""

    DONE = "uniopt-launcher-done"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.lines = queue.Queue()

        def read(out: Any, lines: queue.Queue[str | None]) -> None:
            for line in out:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, args=(proc.stdout, self.lines), daemon=True).start()
        return proc

    def __call__(self, fn: Callable[..., Any], world: int, out: Path, *args: Any,
                 compiled: tuple[str, ...] = (), timeout: float = 240.0) -> list[Any]:
        """``fn(rank, world, *args)`` (``args`` JSON) on ``world`` processes in a gloo group;
        what each returns (JSON), by rank. ``compiled``: the classes whose loops the launcher
        compiles before it forks (:func:`_compile_before_forking`). Raises with the group's
        output where a rank failed; kills the launcher and every rank on timeout."""
        out.mkdir(parents=True, exist_ok=True)
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"fn": fn.__name__, "world": world, "out": str(out),
                                          "args": args, "compiled": compiled,
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        said: list[str] = []
        deadline = time.monotonic() + timeout + 60
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{fn.__name__} on {world} processes took over "
                                   f"{timeout} s") from None
            if line is None or line.startswith(self.DONE):
                break
            said.append(line)
        if line is None or line.split()[1] != "ok":
            raise RuntimeError(f"{fn.__name__} on {world} processes failed:\n"
                               + "".join(said)[-6000:])
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]

    def close(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()  # the launcher's loop ends
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # and any rank it left
        self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def launch() -> Iterator[Launcher]:
    launcher = Launcher()
    yield launcher
    launcher.close()


def _serve() -> None:
    """The launcher: the test suite's settings (conftest's), then for each group asked for on
    stdin, its loops compiled (once) and its ranks forked, bounded in time; a line saying how
    it ended after each."""
    import traceback

    import torch.multiprocessing as mp

    cpu.COMPILE_AFTER, cpu.PARALLEL_MIN = None, 1 << 62
    # no OpenMP workers to fork beside this thread: torch's pool, started by the first matmul
    # of the loops compiled here, is not fork-safe (a rank aborted, "double free or corruption",
    # once in some ten CI runs while the launcher held it); the ranks run on one thread anyway
    torch.set_num_threads(1)
    done: set[str] = set()
    for line in sys.stdin:
        spec = json.loads(line)
        try:
            todo = [n for n in spec["compiled"] if n not in done]
            if todo:
                _compile_before_forking(*todo)
                done.update(todo)
            fn, world = globals()[spec["fn"]], spec["world"]
            ctx = mp.start_processes(
                _entry, args=(fn, world, _free_port(), spec["out"], tuple(spec["args"])),
                nprocs=world, join=False, start_method="fork")
            deadline = time.monotonic() + spec["timeout"]
            try:
                while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{fn.__name__} on {world} processes took over "
                                           f"{spec['timeout']} s")
            finally:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                    p.join(5)
            status = "ok"
        except Exception:
            traceback.print_exc(file=sys.stdout)
            status = "failed"
        print(Launcher.DONE, status, flush=True)


# --- models and runs (in the processes) ----------------------------------------------------


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "q8":
        # on 2 ranks every shard a whole number of 8-bit blocks: 4096 and 2048 elements
        return torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(128, 32, bias=False))
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                            batch_first=True)


def _batch(kind: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    shape = {"mlp": (6, 8), "q8": (6, 64)}.get(kind, (3, 5, 16))
    return torch.randn(shape, generator=g)


def _functional_train(model: torch.nn.Module, rule: Any, kind: str, steps: int,
                      **setup: Any) -> None:
    """``steps`` steps of ``rule`` through the functional API on the tree of ``model``'s
    parameters, in place and pure in turns; a pure step's DTensors keep their placements."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    state = uo.setup(rule, params, **setup)
    for t in range(steps):
        model.zero_grad()
        model(_batch(kind, t)).pow(2).mean().backward()
        grads = {k: p.grad for k, p in params.items()}
        if t % 2:
            state = uo.update_(state, params, grads)
            continue
        state, new = uo.update(state, params, grads)
        with torch.no_grad():
            for k, p in params.items():
                if isinstance(p, DTensor):
                    assert isinstance(new[k], DTensor)
                    assert new[k].placements == p.placements
                p.copy_(new[k])


def _q8_functional(model: torch.nn.Module) -> None:
    """6 steps of ``uo.adamw`` with 8-bit state, in place and pure in turns."""
    _functional_train(model, uo.adamw(lr=1e-2, weight_decay=0.1), "q8", 6, state_dtype="q8")


def _fsdp(model: torch.nn.Module, mesh: Any, **kw: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    # one unit: one all-gather and one reduce-scatter a step (the parameters are sharded as
    # with one unit per layer; the test's time is FSDP2's hooks and collectives)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **kw)
    return model


def _params(model: torch.nn.Module, cls: str) -> list[torch.nn.Parameter]:
    ps = list(model.parameters())
    return [p for p in ps if p.ndim == 2] if cls == "Muon" else ps


def _train(model: torch.nn.Module, opt: Any, kind: str, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        opt.zero_grad()
        model(_batch(kind, t)).pow(2).mean().backward()
        opt.step()


def _full(model: torch.nn.Module) -> list[np.ndarray]:
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().numpy().copy()
            for p in model.parameters()]


def _diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The largest difference over the tensors, each relative to its largest magnitude."""
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)) for x, y in
               zip(a, b, strict=True))


def _placements(opt: Any) -> list[str]:
    """Each slot whose layout is not its parameter's (shaped as it) or replicated (else)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    bad = []
    for group in opt.param_groups:
        for p in group["params"]:
            for name, s in opt.state[p].items():
                if name == "step":
                    continue
                if not isinstance(s, DTensor):
                    bad.append(f"{name}: a {type(s).__name__}")
                elif name.endswith(".absmax"):  # 8-bit scales: a row per shard
                    want = tuple(Replicate() if isinstance(q, Replicate) else Shard(0)
                                 for q in p.placements)
                    if s.placements != want:
                        bad.append(f"{name}: {s.placements} for a parameter {p.placements}")
                elif s.shape == p.shape and s.placements != p.placements:
                    bad.append(f"{name}: {s.placements} for a parameter {p.placements}")
                elif s.shape != p.shape and any(not isinstance(q, Replicate)
                                                for q in s.placements):
                    bad.append(f"{name} (shape {tuple(s.shape)}): {s.placements}")
    return bad


def _classes(rank: int, world: int, kinds: list[str], names: list[str],
             with_torch: bool) -> dict[str, Any]:
    """Each class on FSDP2 shards vs the same class unsharded (on rank 0) and, with
    ``with_torch``, vs torch.optim's on the same FSDP2 model, STEPS steps of training."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for kind in kinds:
        base = _model(kind)
        for name in names:
            kw = CLASSES[name]
            m = _fsdp(copy.deepcopy(base), mesh)
            opt = getattr(uniopt.torch, name)(_params(m, name), **kw)
            _train(m, opt, kind, STEPS)
            ours = _full(m)
            # elementwise classes step their shards through the loop bound to their views
            row: dict[str, Any] = {"placements": _placements(opt), "bound": any(
                getattr(plan, "lane", None) is not None for plan in opt._plans.values())}
            if rank == 0:
                plain = copy.deepcopy(base)
                _train(plain, getattr(uniopt.torch, name)(_params(plain, name), **kw), kind,
                       STEPS)
                row["unsharded"] = _diff(ours, _full(plain))
            if with_torch:
                tm = _fsdp(copy.deepcopy(base), mesh)
                try:
                    _train(tm, getattr(torch.optim, name)(_params(tm, name), **kw), kind, STEPS)
                    row["torch"] = _diff(ours, _full(tm))
                except (RuntimeError, NotImplementedError) as e:  # torch's own, on DTensors
                    row["torch"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                if rank == 0:
                    tp = copy.deepcopy(base)
                    _train(tp, getattr(torch.optim, name)(_params(tp, name), **kw), kind, STEPS)
                    row["torch unsharded"] = _diff(ours, _full(tp))
            out[f"{kind}/{name}"] = row
            if kind == "mlp" and name == "Adafactor":
                out.setdefault("memory", {})[name] = [_state_bytes(opt),
                                                      _footprint(uo.adafactor(), base)]
    if "mlp" in kinds:
        # a rule with slots of other shapes (Shampoo's preconditioners), kept whole on each rank
        m = _fsdp(_model("mlp"), mesh)
        opt = uniopt.torch.Optimizer(m.parameters(), uo.shampoo(lr=1e-3))
        _train(m, opt, "mlp", 1)
        out.setdefault("memory", {})["Shampoo"] = [_state_bytes(opt),
                                                   _footprint(uo.shampoo(), _model("mlp"))]
    for name, rule in _FUNCTIONAL.items():  # uo.update_ on the tree of FSDP2's DTensors
        m = _fsdp(_model("mlp"), mesh)
        plain = _model("mlp")
        runs = []
        for model in (m, plain):
            params = {k: p for k, p in model.named_parameters() if name != "muon" or p.ndim == 2}
            state = uo.setup(rule, params)
            for t in range(10):
                model.zero_grad()
                model(_batch("mlp", t)).pow(2).mean().backward()
                state = uo.update_(state, params, {k: p.grad for k, p in params.items()})
            runs.append(_full(model))
        out[f"functional/{name}"] = {"placements": [], "unsharded": _diff(*runs)}
    # 8-bit state: each rank's shard in blocks of its own, which are the unsharded run's
    # blocks where every shard but the last holds a multiple of quant.BLOCK elements (the
    # shards of a Shard(0) layout are consecutive in the raveled tensor): so every block
    # quantises the same numbers, and the runs are equal bit for bit
    for name in ("AdamW", "functional AdamW", "unsharded state AdamW") if "mlp" in kinds else ():
        m, plain = _fsdp(_model("q8"), mesh), _model("q8")
        row = {}
        if name == "AdamW":
            opt = uniopt.torch.AdamW(m.parameters(), state_dtype="q8", **CLASSES["AdamW"])
            _train(m, opt, "q8", 10)
            _train(plain, uniopt.torch.AdamW(plain.parameters(), state_dtype="q8",
                                             **CLASSES["AdamW"]), "q8", 10)
            row["placements"] = _placements(opt)
        elif name.startswith("unsharded state"):
            # an unsharded run's state loaded on the shards: read whole, cut, quantised in
            # each shard's blocks (here the same blocks: the same codes and scales)
            opt_plain = uniopt.torch.AdamW(plain.parameters(), state_dtype="q8",
                                           **CLASSES["AdamW"])
            _train(plain, opt_plain, "q8", 5)
            m = _fsdp(copy.deepcopy(plain), mesh)
            opt = uniopt.torch.AdamW(m.parameters(), state_dtype="q8", **CLASSES["AdamW"])
            opt.load_state_dict(copy.deepcopy(opt_plain.state_dict()))
            _train(m, opt, "q8", 5, start=5)
            _train(plain, opt_plain, "q8", 5, start=5)
            row["placements"] = _placements(opt)
        else:
            _q8_functional(m)
            _q8_functional(plain)
            row["placements"] = []
        row["unsharded"] = _diff(_full(m), _full(plain))
        out[f"q8/{name}"] = row
    # FSDP2's CPU offload: parameters, gradients and state in CPU memory (here the mesh is the
    # CPU's too, so what is checked is the policy's code path, not a device's)
    from torch.distributed.fsdp import CPUOffloadPolicy

    m = _fsdp(_model("mlp"), mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    opt = uniopt.torch.AdamW(m.parameters(), **CLASSES["AdamW"])
    _train(m, opt, "mlp", 10)
    plain = _model("mlp")
    _train(plain, uniopt.torch.AdamW(plain.parameters(), **CLASSES["AdamW"]), "mlp", 10)
    out["mlp/offload AdamW"] = {"placements": _placements(opt),
                                "unsharded": _diff(_full(m), _full(plain))}
    # two param groups, each stepped after every group's checks: the checks see each shard as
    # part of its whole tensor, as the step does (Adafactor's factors are the whole matrix's)
    def two_groups(model: Any) -> Any:
        ps = list(model.parameters())
        return uniopt.torch.Adafactor([{"params": [p for p in ps if p.ndim == 2]},
                                       {"params": [p for p in ps if p.ndim != 2]}],
                                      **CLASSES["Adafactor"])

    m, plain = _fsdp(_model("mlp"), mesh), _model("mlp")
    opt = two_groups(m)
    _train(m, opt, "mlp", STEPS)
    _train(plain, two_groups(plain), "mlp", STEPS)
    out["mlp/two-groups Adafactor"] = {"placements": _placements(opt),
                                       "unsharded": _diff(_full(m), _full(plain))}
    for name, rule in _RECIPES.items():  # per-leaf parts in recipes, gathered whole
        m = _fsdp(_model("mlp"), mesh)
        opt = uniopt.torch.Optimizer(m.parameters(), rule)
        _train(m, opt, "mlp", STEPS)
        ours = _full(m)
        row = {"placements": _placements(opt)}
        if rank == 0:
            plain = _model("mlp")
            _train(plain, uniopt.torch.Optimizer(plain.parameters(), rule), "mlp", STEPS)
            row["unsharded"] = _diff(ours, _full(plain))
        out[f"mlp/{name}"] = row
    return out


_RECIPES = {
    "lamb": uo.lamb(lr=1e-2, weight_decay=0.01),
    "lars": uo.lars(lr=0.1, weight_decay=1e-3),
    "clip+adamw": uo.chain(uo.clip_by_global_norm(0.05), uo.adamw(lr=1e-2)),
    "clip_by_norm+sgd": uo.chain(uo.clip_by_norm(0.02), uo.sgd(lr=0.1, momentum=0.9)),
}
_FUNCTIONAL = {
    "clip+adamw": uo.chain(uo.clip_by_global_norm(0.05), uo.adamw(lr=1e-2)),
    "adafactor": uo.adafactor(lr=1e-2),
    "muon": uo.muon(lr=1e-2),
}
# elementwise all through: sharded equals unsharded bit for bit (the norms of the clipping
# recipes are summed in another order: float32 rounding)
_EXACT = set(CLASSES) - {"Adafactor", "Muon"}
# torch.optim's Muon iterates in bfloat16, as uniopt's does; a last-bit difference upstream can
# round a bfloat16 tie the other way, and Newton-Schulz carries it: within bfloat16's eps
_BF16 = 2.0**-7
# uniopt vs torch.optim in float32 after STEPS steps of training (test_parity_torch bounds it
# per step; here the trajectories also feed their differences back through the gradients):
# 8 ulps a step
_TORCH = 8 * STEPS * EPS32


def _state_bytes(opt: Any) -> int:
    """The bytes of this rank's state: its shards, and the slots it keeps whole (the step
    counters left out)."""
    from torch.distributed.tensor import DTensor

    return sum((v.to_local() if isinstance(v, DTensor) else v).numel() * v.element_size()
               for s in opt.state.values() for k, v in s.items()
               if k != "step" and isinstance(v, torch.Tensor))


def _footprint(rule: Any, model: torch.nn.Module) -> int:
    """What uniopt.memory.footprint counts for the fullest rank of the unsharded ``model``."""
    from uniopt.memory import footprint

    return footprint(rule, [tuple(p.shape) for p in model.parameters()],
                     world_size=dist.get_world_size(), strategy="fsdp2").state


def _check_classes(results: list[dict[str, Any]]) -> None:
    memory = [r.pop("memory", {}) for r in results]
    for name, (_, counted) in memory[0].items():
        # each rank's state is at most the fullest rank's, which footprint counts to the byte
        # (it counted Adafactor's and Shampoo's slots of other shapes from the shard's shape)
        assert max(m[name][0] for m in memory) == counted, (name, memory)
    for key, row in results[0].items():
        name = key.split("/")[1].split()[-1]
        for r in results:
            assert r[key]["placements"] == [], (key, r[key]["placements"])
            if "bound" in r[key] and name in ("SGD", "Adam", "AdamW", "RMSprop"):
                assert r[key]["bound"], key  # (a class's row; the functional rows have none)
        assert row["unsharded"] <= (0.0 if name in _EXACT else _ROUNDING), (key, row)
        theirs = row.get("torch")
        if name == "Muon" and theirs is not None:
            # torch's own Muon on FSDP2's DTensors multiplies the bfloat16 shards, summing
            # partial products across the ranks: on the transformer it lands 2% from its own
            # unsharded run, which uniopt's (on whole matrices, gathered) equals bit for bit
            assert row["torch unsharded"] <= _BF16, (key, row)
        elif isinstance(theirs, float):
            # where the problem amplifies rounding, uniopt and torch part ways unsharded as
            # well (attention's key bias: its gradient is rounding noise, about 1e-9, which
            # Adagrad and Adam normalise to steps of the learning rate's size); what sharding
            # must not change is how far they are apart
            assert theirs <= max(_TORCH, row["torch unsharded"]), (key, row)
        elif theirs is not None:
            # torch 2.13's Rprop and Adafactor write DTensors in place where the sharding would
            # change (index_put_, pow_ of a norm's Partial): they raise; uniopt's run
            assert name in ("Rprop", "Adafactor"), (key, theirs)


def test_fsdp2_classes(launch: Launcher, tmp_path: Path) -> None:
    """Every class of uniopt.torch (but LBFGS and SparseAdam, see SKIPPED) on an FSDP2 MLP,
    STEPS steps: the state laid out as the params (each slot shaped as its parameter a DTensor
    of its placements, Adafactor's factors replicated), and the params bit for bit those of
    the unsharded run for elementwise classes, to float32 rounding for Adafactor, Muon, LAMB,
    LARS and the clipping recipes (which sum or gather across the ranks). The fullest rank's
    state is uniopt.memory.footprint's count, for Adafactor and Shampoo."""
    _check_classes(launch(_classes, 2, tmp_path, ["mlp"], list(CLASSES), False,
                          compiled=tuple(CLASSES)))


@pytest.mark.slow
def test_fsdp2_transformer_and_torch(launch: Launcher, tmp_path: Path) -> None:
    """As :func:`test_fsdp2_classes` on a transformer block (the MLP is that test's), and each
    class against torch.optim's own on the same FSDP2 model, where torch's runs on DTensors
    (measured: as far apart as unsharded, to the last bit, for every elementwise class)."""
    _check_classes(launch(_classes, 2, tmp_path, ["transformer"], list(CLASSES), True,
                          compiled=tuple(CLASSES)))


# --- torch.distributed.checkpoint: saved on 2 ranks, loaded on 4 ---------------------------


# each DCP run: its class, and whether its optimizer state dict is flattened
# (flatten_optimizer_state_dict=True, torchtitan's setting: loaded by the keys of the live groups)
_DCP = {"AdamW": ("AdamW", False), "Adafactor": ("Adafactor", False),
        "AdamW flattened": ("AdamW", True)}


def _dcp(rank: int, world: int, path: str, save: bool) -> dict[str, Any]:
    """5 steps then a DCP save, then 5 more (``save``); or a load, then the same 5 more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for name, (cls, flat) in _DCP.items():
        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        m = _fsdp(_model("mlp"), mesh)
        opt = getattr(uniopt.torch, cls)(m.parameters(), **CLASSES[cls])
        where = os.path.join(path, name.replace(" ", "_"))
        if save:
            _train(m, opt, "mlp", 5)
            msd, osd = get_state_dict(m, opt, options=options)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=where)
        else:
            msd, osd = get_state_dict(m, opt, options=options)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=where)
            set_state_dict(m, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                           options=options)
        _train(m, opt, "mlp", 5, start=5)
        out[name] = {"params": [x.tolist() for x in _full(m)], "placements": _placements(opt),
                     "steps": sorted({int(st["step"]) for st in opt.state.values()})}
    out["q8"] = _dcp_q8(mesh, os.path.join(path, "q8"), save)
    return out


def _dcp_q8(mesh: Any, where: str, save: bool) -> dict[str, Any]:
    """8-bit state (a row of block scales per shard) through DCP: on the layout that saved it
    (``save``: 2 ranks) a load continues as the run that saved it; on another (4 ranks) the
    load is refused, the model and optimizer left as they were."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def made() -> tuple[torch.nn.Module, Any]:
        m = _fsdp(_model("mlp"), mesh)
        return m, uniopt.torch.AdamW(m.parameters(), state_dtype="q8", **CLASSES["AdamW"])

    def load(m: torch.nn.Module, opt: Any) -> None:
        msd, osd = get_state_dict(m, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=where)
        set_state_dict(m, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    m, opt = made()
    if save:
        _train(m, opt, "mlp", 5)
        msd, osd = get_state_dict(m, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=where)
        _train(m, opt, "mlp", 5, start=5)
        m2, opt2 = made()
        load(m2, opt2)
        _train(m2, opt2, "mlp", 5, start=5)
        return {"continued": _diff(_full(m2), _full(m)), "placements": _placements(opt2)}
    _train(m, opt, "mlp", 2)
    before = [t.to_local().clone() for t in [*m.parameters(), *(
        v for st in opt.state.values() for k, v in st.items() if k != "step")]]
    try:
        load(m, opt)
        error = "no error"
    except (CheckpointException, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    after = [t.to_local() for t in [*m.parameters(), *(
        v for st in opt.state.values() for k, v in st.items() if k != "step")]]
    return {"error": error, "unchanged": len(before) == len(after) and all(
        torch.equal(a, b) for a, b in zip(before, after, strict=True))}


def _four(rank: int, world: int, path: str) -> dict[str, Any]:
    """The file's scenarios on 4 ranks, in one group: the DCP load and the 2-D meshes."""
    return {"dcp": _dcp(rank, world, path, False), "mesh2d": _mesh2d(rank, world)}


@pytest.fixture(scope="module")
def four(launch: Launcher, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[list[Any], list[Any]]:
    """A DCP checkpoint saved by 2 ranks; then one group of 4 that loads it and runs the 2-D
    mesh scenarios. What each rank found, by rank: (the 2, the 4)."""
    tmp = tmp_path_factory.mktemp("four")
    saved = launch(_dcp, 2, tmp / "two", str(tmp / "ckpt"), True, compiled=("AdamW",))
    return saved, launch(_four, 4, tmp / "four", str(tmp / "ckpt"), compiled=("AdamW",))


def test_dcp_reshard(four: tuple[list[Any], list[Any]]) -> None:
    """A DCP checkpoint of FSDP2 shards (model and uniopt state) saved on 2 ranks and loaded on
    4 (resharded: the last layer's 3 rows leave one rank none) continues exactly as the run
    that saved it: the same params, bit for bit, the state laid out as the params; so does
    AdamW's with its state dict flattened (flatten_optimizer_state_dict=True, which looks up
    every key of the live groups: uniopt's AdamW held couple_lr there, a KeyError). 8-bit
    state continues bit for bit where loaded on the 2 ranks that saved it, and its load on
    4 is refused with nothing written."""
    saved, found = four
    loaded = [r["dcp"] for r in found]
    for r in saved:  # 8-bit state on the layout that saved it: bit for bit
        assert r["q8"] == {"continued": 0.0, "placements": []}, r["q8"]
    for r in loaded:  # on another: refused by DCP's planner (the scales' shape), every rank
        assert r["q8"]["unchanged"], r["q8"]
        assert "Size mismatch between saved torch.Size([2, 9]) and current: torch.Size([4, 9])" \
            in r["q8"]["error"] and ".exp_avg.absmax" in r["q8"]["error"], r["q8"]["error"]
    for name in _DCP:
        assert loaded[0][name]["params"] == saved[0][name]["params"], name
        assert all(r[name]["placements"] == [] for r in loaded), name
        assert loaded[0][name]["steps"] == saved[0][name]["steps"] == [10], name


# --- 2-D meshes (4 ranks): HSDP, and FSDP2 over tensor parallel --------------------------------


STEPS_2D = 10
# elementwise classes, a per-leaf rule (Adafactor: gathered whole, its factors replicated) and
# a global-norm chain: classes by name, recipes through uniopt.torch.Optimizer
_2D: dict[str, Any] = {
    "SGD": None, "AdamW": None, "Adam": None, "Adafactor": None,
    # SGD, not Adam: Adam's step does not change with the scale of its gradients (but by eps),
    # so a wrong clipping factor would hardly show
    "clip+sgd": uo.chain(uo.clip_by_global_norm(0.05), uo.sgd(lr=0.1, momentum=0.9)),
}
_2D_NORM = {"clip+sgd"}
# a global norm summed in another order (each rank's float64 sums of its shards, then theirs
# over each mesh dimension, against one float64 sum over each whole tensor) may differ in its
# last float64 bits; the clipping factor, then rounded to float32 in the update, may round
# the other way: an ulp of each element a step, carried forward
_ROUNDING_2D = 4 * STEPS_2D * EPS32


def _model_2d() -> torch.nn.Module:
    torch.manual_seed(0)
    # one output: FSDP2's first dimension leaves one rank of each pair an empty shard of the
    # last layer (a weight of one row, its bias of one element)
    return torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1))


def _opt_2d(name: str, params: Any) -> Any:
    rule = _2D[name]
    if rule is None:
        return getattr(uniopt.torch, name)(params, **CLASSES[name])
    return uniopt.torch.Optimizer(params, rule)


def _given(model: torch.nn.Module, step: int) -> None:
    """Gradients that do not depend on the model's layout: the same whole tensors, each rank
    given its shard of them, laid out as its parameter."""
    from torch.distributed.tensor import DTensor, Replicate

    for i, p in enumerate(model.parameters()):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            g = DTensor.from_local(g, mesh, [Replicate()] * mesh.ndim, run_check=False
                                   ).redistribute(mesh, p.placements)
        p.grad = g


def _grads_2d(model: torch.nn.Module, step: int, trained: bool) -> None:
    if trained:
        model(_batch("mlp", step)).pow(2).mean().backward()
    else:
        _given(model, step)


def _run_2d(model: torch.nn.Module, opt: Any, trained: bool) -> None:
    for t in range(STEPS_2D):
        opt.zero_grad()
        _grads_2d(model, t, trained)
        opt.step()


def _mesh2d(rank: int, world: int) -> dict[str, Any]:
    """Each of _2D on a (2, 2) mesh laid out two ways, against the same on the whole model:
    HSDP (``fully_shard`` on the 2-D mesh: replicated over its first dimension, sharded over
    its second), trained, every rank on the same batch (the same arithmetic as one process);
    and FSDP2 over tensor parallel (``ColwiseParallel``/``RowwiseParallel`` over the mesh's
    second dimension, ``fully_shard`` over its first; the LayerNorm, not tensor-parallel, on
    the first dimension's mesh alone), given the same whole gradients (tensor parallel's
    matrix products sum partial products in another order: its gradients are not one
    process's to the bit), and once trained."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    plan = {"1": ColwiseParallel(), "3": RowwiseParallel()}

    def hsdp() -> torch.nn.Module:
        return _fsdp(_model_2d(), mesh)

    def fsdp_tp() -> torch.nn.Module:
        return _fsdp(parallelize_module(_model_2d(), mesh["tp"], plan), mesh["dp"])

    out: dict[str, Any] = {}
    runs = [("hsdp", hsdp, True), ("fsdp+tp", fsdp_tp, False)]
    runs += [("fsdp+tp trained", fsdp_tp, True)]
    for layout, build, trained in runs:
        for name in _2D if layout != "fsdp+tp trained" else ["clip+sgd"]:
            m = build()
            opt = _opt_2d(name, m.parameters())
            _run_2d(m, opt, trained)
            plain = _model_2d()
            _run_2d(plain, _opt_2d(name, plain.parameters()), trained)
            out[f"{layout}/{name}"] = {"unsharded": _diff(_full(m), _full(plain)),
                                       "placements": _placements(opt)}
        out[f"{layout} layout"] = [[type(q).__name__ for q in p.placements]
                                   for p in m.parameters()]
    # 8-bit state on HSDP (replicated over "dp": each row of scales twice, the same): every
    # shard a whole number of blocks (4096 and 2048 elements), as in _classes
    m, plain = _fsdp(_model("q8"), mesh), _model("q8")
    opt = uniopt.torch.AdamW(m.parameters(), state_dtype="q8", **CLASSES["AdamW"])
    _train(m, opt, "q8", STEPS_2D)
    _train(plain, uniopt.torch.AdamW(plain.parameters(), state_dtype="q8", **CLASSES["AdamW"]),
           "q8", STEPS_2D)
    out["hsdp/q8 AdamW"] = {"unsharded": _diff(_full(m), _full(plain)),
                            "placements": _placements(opt)}
    # 8-bit state on FSDP2 over tensor parallel: each rank quantises its own shards, blocks of
    # their local elements, with no communication, so they step as a plain 8-bit AdamW of the
    # local tensors does (the shards here, some empty, are no whole numbers of blocks)
    m = fsdp_tp()
    opt = uniopt.torch.AdamW(m.parameters(), state_dtype="q8", **CLASSES["AdamW"])
    local = [torch.nn.Parameter(p.to_local().detach().clone()) for p in m.parameters()]
    ref = uniopt.torch.AdamW(local, state_dtype="q8", **CLASSES["AdamW"])
    for t in range(STEPS_2D):
        opt.zero_grad()
        _given(m, t)
        opt.step()
        for q, p in zip(local, m.parameters(), strict=True):
            q.grad = p.grad.to_local().clone()
        ref.step()
    out["fsdp+tp/q8 AdamW"] = {
        "params": all(torch.equal(p.to_local(), q) for p, q in zip(m.parameters(), local,
                                                                    strict=True)),
        "codes": all(torch.equal(opt.state[p][k].to_local(), ref.state[q][k])
                     for p, q in zip(m.parameters(), local, strict=True)
                     for k in ("exp_avg", "exp_avg_sq")),
        "sizes": sorted({q.numel() for q in local}), "placements": _placements(opt)}
    # the clipping is active in every run: the first step's global norm is above 0.05
    for trained in (True, False):
        plain = _model_2d()
        _grads_2d(plain, 0, trained)
        out[f"norm {'trained' if trained else 'given'}"] = float(torch.linalg.vector_norm(
            torch.cat([p.grad.ravel() for p in plain.parameters()])))
    return out


def test_2d_meshes(four: tuple[list[Any], list[Any]]) -> None:
    """HSDP and FSDP2 over tensor parallel on a (2, 2) mesh of 4 ranks: elementwise classes
    and Adafactor (per-leaf parts, gathered whole) equal the unsharded run bit for bit;
    ``clip_by_global_norm`` to float32 rounding (_ROUNDING_2D), its norm summed over each mesh
    dimension a leaf is split across and not over one it is replicated on (HSDP's first
    dimension, the RowwiseParallel bias's second, the LayerNorm's, on the first
    dimension's mesh alone): counted twice, the clipping factor would be off by up to
    sqrt(2) at the first step. FSDP2 over tensor parallel trained (its own gradients) within
    _ROUNDING_2D as well. The state is laid out as the parameters. 8-bit AdamW on FSDP2 over
    tensor parallel: each rank's shards step bit for bit as a plain 8-bit AdamW of them."""
    results = [r["mesh2d"] for r in four[1]]
    layouts = results[0]
    assert layouts["hsdp layout"] == [["Replicate", "Shard"]] * 6
    # the LayerNorm on the first dimension's mesh; the column-parallel Linear split over both
    # dimensions (FSDP2's strided shard of tensor parallel's rows), the row-parallel one's
    # weight too, its bias replicated over the second
    assert layouts["fsdp+tp layout"] == [
        ["Shard"], ["Shard"], ["_StridedShard", "Shard"], ["_StridedShard", "Shard"],
        ["Shard", "Shard"], ["Shard", "Replicate"]]
    sizes = set()
    for r in results:
        assert r.pop("norm trained") > 0.05 and r.pop("norm given") > 0.05
        q8 = r.pop("fsdp+tp/q8 AdamW")
        assert q8["params"] and q8["codes"] and q8["placements"] == [], q8
        sizes |= set(q8["sizes"])
        for key, row in r.items():
            if key.endswith("layout"):
                continue
            assert row["placements"] == [], (key, row)
            name = key.split("/")[1]
            bound = _ROUNDING_2D if name in _2D_NORM or "trained" in key else 0.0
            assert row["unsharded"] <= bound, (key, row)
    assert 0 in sizes and max(sizes) < 2048, sizes  # an empty shard; the others part blocks


# --- tensor parallel: a Linear pair, global-norm clipping --------------------------------------


def _tp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _tp(rank: int, world: int) -> dict[str, Any]:
    """A ColwiseParallel/RowwiseParallel pair (the second's bias replicated) stepped by
    ``uniopt.torch.Optimizer`` with a recipe that clips by the global norm, and by the
    functional API on the tree of its DTensors, vs the same on the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    out: dict[str, Any] = {}
    rules = {"clip+adamw": uo.chain(uo.clip_by_global_norm(0.05), uo.adamw(lr=1e-2)),
             "clip+lamb": uo.chain(uo.clip_by_global_norm(0.05), uo.lamb(lr=1e-2))}
    for name, rule in rules.items():
        tp = parallelize_module(_tp_model(), mesh, plan)
        opt = uniopt.torch.Optimizer(tp.parameters(), rule)
        _train(tp, opt, "mlp", 20)
        plain = _tp_model()
        _train(plain, uniopt.torch.Optimizer(plain.parameters(), rule), "mlp", 20)
        out[f"optimizer {name}"] = _diff(_full(tp), _full(plain))
        out[f"placements {name}"] = _placements(opt)

        # the functional API on the tree of DTensors, in place and pure
        tp = parallelize_module(_tp_model(), mesh, plan)
        plain = _tp_model()
        for model in (tp, plain):
            _functional_train(model, rule, "mlp", 20)
        out[f"functional {name}"] = _diff(_full(tp), _full(plain))

        # the second layer without gradients at the first step: the group steps its parameters
        # in two runs, one per count, whose global norm is one (each run stepped twice, by its
        # own norm, where the shards' norms were summed apart from the split's)
        tp = parallelize_module(_tp_model(), mesh, plan)
        plain = _tp_model()
        for model in (tp, plain):
            opt = uniopt.torch.Optimizer(model.parameters(), rule)
            for t in range(6):
                opt.zero_grad()
                model(_batch("mlp", t)).pow(2).mean().backward()
                if t == 0:
                    for q in list(model.parameters())[2:]:
                        q.grad = None
                opt.step()
        out[f"two counts {name}"] = _diff(_full(tp), _full(plain))
    # the clipping is active: the first step's global norm is above 0.05
    plain = _tp_model()
    plain(_batch("mlp", 0)).pow(2).mean().backward()
    out["norm"] = float(torch.linalg.vector_norm(torch.cat([p.grad.ravel()
                                                            for p in plain.parameters()])))
    return out


def test_tensor_parallel_clip(launch: Launcher, tmp_path: Path) -> None:
    """A tensor-parallel Linear pair with uo.clip_by_global_norm in a recipe equals the
    unsharded run: the norm sums each sharded leaf across the ranks and the replicated bias
    once (summed twice, the clipping factor would differ and the runs part at once); and with
    its parameters at two step counts, stepped in two runs that share the norm."""
    results = launch(_tp, 2, tmp_path)
    for r in results:
        assert r["norm"] > 0.05
        for key, v in r.items():
            if key.startswith("placements"):
                assert v == [], (key, v)
            elif key != "norm":
                assert v <= _ROUNDING, (key, v)


# --- what shards cannot do: refused, with nothing written -----------------------------------


def _errors(rank: int, world: int) -> dict[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, str] = {}
    m = _fsdp(_model("mlp"), mesh)
    m(_batch("mlp", 0)).pow(2).mean().backward()
    before = _full(m)
    params = dict(m.named_parameters())
    grads = {k: p.grad for k, p in params.items()}

    def closure() -> Any:
        return m(_batch("mlp", 0)).pow(2).mean()

    def swapped(a: Any) -> Any:
        """DTensor of 8-bit scales ``a`` with its rows swapped: the same shape, each rank
        given the other's shard's row, as a state saved with another placement would be."""
        return distribute_tensor(a.full_tensor().flip(0), a.device_mesh, a.placements)

    # an 8-bit AdamW's state dict (made by the functional API: a step would load the compiled
    # loop, a second of this group's time), the scales of the first parameter's exp_avg swapped
    q8 = uniopt.torch.AdamW(m.parameters(), state_dtype="q8")
    slots = uo.setup(uo.adamw(), list(m.parameters()), state_dtype="q8").slots
    q8_sd = {"param_groups": q8.state_dict()["param_groups"], "state": {
        i: {"step": torch.tensor(1.0), **{
            name + end: getattr(slots[f"scale_by_adam.{name}"][i], part)
            for name in ("exp_avg", "exp_avg_sq")
            for end, part in (("", "codes"), (".absmax", "absmax"))}}
        for i in range(len(params))}}
    q8_sd["state"][0]["exp_avg.absmax"] = swapped(q8_sd["state"][0]["exp_avg.absmax"])
    q8_state = uo.setup(uo.adamw(), params, state_dtype="q8")
    key = "scale_by_adam.exp_avg"
    first = q8_state.slots[key][0]
    q8_state.slots[key][0] = type(first)(first.codes, swapped(first.absmax))

    attempts: dict[str, Callable[[], Any]] = {
        "lbfgs": lambda: uniopt.torch.LBFGS(m.parameters()).step(closure),
        "partition": lambda: uniopt.torch.Optimizer(
            m.parameters(), uo.partition({"a": uo.sgd(lr=0.1)}, lambda path, x: "a")).step(),
        "functional partition": lambda: uo.update_(
            uo.setup(uo.partition({"a": uo.sgd(lr=0.1)}, lambda path, x: "a"), params),
            params, grads),
        "q8 other layout": lambda: q8.load_state_dict(q8_sd),
        "functional q8 other layout": lambda: uo.update_(q8_state, params, grads),
        "q8 lamb": lambda: uniopt.torch.Optimizer(m.parameters(), uo.lamb(),
                                                  state_dtype="q8").step(),
        "differentiable": lambda: uniopt.torch.AdamW(m.parameters(),
                                                     differentiable=True).step(),
        "plain grad": lambda: uo.update_(uo.setup(uo.adam(), params), params,
                                         {k: g.full_tensor() for k, g in grads.items()}),
        "partial": lambda: uo.update_(
            uo.setup(uo.adam(), [DTensor.from_local(torch.ones(2), mesh, [Partial()])]),
            [DTensor.from_local(torch.ones(2), mesh, [Partial()])],
            [DTensor.from_local(torch.ones(2), mesh, [Partial()])]),
    }
    folder = Path(tempfile.mkdtemp())
    attempts["uo.save"] = lambda: uo.save(folder / "opt.safetensors",
                                          uniopt.torch.AdamW(m.parameters()))
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "no error"
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    out["unchanged"] = str(_diff(_full(m), before) == 0.0 and not q8.state
                           and not any(folder.iterdir()))
    return out


def test_refused_on_shards(launch: Launcher, tmp_path: Path) -> None:
    """Whole-tree parts (L-BFGS, combinators), 8-bit state with per-leaf parts or scales of
    another layout, differentiable steps, a plain gradient for a DTensor parameter, a
    Partial parameter and ``uo.save`` of a sharded optimizer raise, naming the cause, and
    leave every parameter (and the 8-bit state) as it was, with no file written."""
    r = launch(_errors, 2, tmp_path)[0]
    assert r.pop("unchanged") == "True"
    want = {
        "lbfgs": "TypeError: uniopt: lbfgs has whole-tree parts",
        "partition": "TypeError: uniopt: partition has whole-tree parts",
        "functional partition": "TypeError: uniopt: partition has whole-tree parts",
        # 8-bit scales of another layout: a row per shard, each rank's of its own shard
        "q8 other layout": "ValueError: uniopt: AdamW.load_state_dict: the state of "
                           "parameter 0 (group 0, position 0): exp_avg.absmax; nothing was "
                           "loaded: 8-bit block scales of this rank's row for the shard at "
                           "offset, shape",
        "functional q8 other layout": "ValueError: uniopt: the state's scale_by_adam.exp_avg "
                                      "of params['0.bias']: 8-bit block scales of this "
                                      "rank's row",
        "q8 lamb": "ValueError: uniopt: state_dtype='q8' on DTensor (sharded) parameters "
                   "takes elementwise rules",
        "differentiable": "ValueError: uniopt.torch: differentiable=True",
        "plain grad": "TypeError: uniopt: a DTensor parameter of shape (16,) has a plain tensor",
        "partial": "ValueError: uniopt: params leaf 0 is a DTensor with placements (Partial",
        # one process's file cannot hold a rank's shards: DCP, with nothing written
        "uo.save": "CheckpointError: save: the optimizer's parameters or state are DTensors",
    }
    for name, start in want.items():
        assert r[name].startswith(start), (name, r[name])


if __name__ == "__main__":
    _serve()

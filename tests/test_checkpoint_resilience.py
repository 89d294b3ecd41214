"""Checkpoints under stress: a run resumed in a fresh process is the run that never stopped
(NumPy, torch, JAX; float32 and float64; the compiled loop and the reference path), a saving
process killed at random moments never leaves a checkpoint that does not load, and the loader
given mutated real checkpoints raises CheckpointError and nothing else.

The long versions run with the others (``slow``, as pyproject says); ``UNIOPT_KILLS`` and
``UNIOPT_FUZZ_EXAMPLES`` make them longer still.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uniopt as uo
from uniopt import checkpoint
from uniopt.checkpoint import CheckpointError

SRC = os.path.dirname(os.path.dirname(uo.__file__))

# What both processes run: the params, the gradients, the rules, a step.
COMMON = '''
import contextlib, numpy as np, uniopt as uo
from uniopt.fast import cpu
S = uo.schedules

RULES = {
    "adamw": lambda: uo.adamw(lr=S.warmup(2, S.cosine(1e-2, steps=20)), weight_decay=0.1),
    # a partition of an accumulating, NaN-skipping member and another: leaves "b.*"
    "recipe": lambda: uo.partition(
        {"decay": uo.adamw(lr=1e-2, weight_decay=0.1),
         "plain": uo.accumulate(uo.skip_nonfinite(uo.adam(lr=S.linear(1e-2, 1e-3, 10))), 2)},
        uo.by_path({"b.*": "plain", "*": "decay"})),
    # its leaf "m" has no gradient at the second step: the state counts steps per leaf
    "nesterov": lambda: uo.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adafactor": lambda: uo.adafactor(lr=1e-2),
    "ema": lambda: uo.chain(uo.adamw(lr=1e-2, weight_decay=0.1), uo.ema(0.9)),
}


def _every():
    """Every rule and block of uniopt's that takes its defaults and these params (vectors
    and a matrix), steps without a closure or a loss: by its type's name."""
    from uniopt import checkpoint
    out = {}
    for name, cls in sorted(checkpoint._own().items()):
        if not issubclass(cls, uo.Transform):
            continue
        try:
            rule = cls()
        except TypeError:
            continue
        parts = rule.flat_parts
        if any(isinstance(p, uo.Minimizer) or getattr(p, "reads_value", False)
               or (isinstance(p, uo.PerLeaf) and p.check_shape((8,))) for p in parts):
            continue
        out["every." + name] = cls
    return out


RULES.update(_every())


def library(lib, dtype):
    """(to array, namespace) for a library name and a dtype name."""
    if lib == "numpy":
        return (lambda a: np.asarray(a, dtype)), np
    if lib == "torch":
        import torch
        return (lambda a: torch.tensor(a, dtype=getattr(torch, dtype))), torch
    import jax.numpy as jnp
    return (lambda a: jnp.asarray(a, dtype)), jnp


def width(lib):
    """60 vectors and a matrix: wide enough for the compiled loop, where there is one; JAX,
    which compiles per leaf, gets 5."""
    return (2, 2) if lib.startswith("jax") else (40, 20)


def tree(lib, dtype, fill=None):
    arr, _ = library(lib.split("-")[0], dtype)
    rng = np.random.default_rng(0)
    def x(shape):
        return arr(rng.standard_normal(shape) if fill is None else np.full(shape, fill))
    nw, nb = width(lib)
    return {"w": [x(8) for _ in range(nw)], "b": [x(4) for _ in range(nb)], "m": x((6, 5))}


def grads(rule, lib, dtype, k):
    nw, nb = width(lib)
    arr, _ = library(lib.split("-")[0], dtype)
    rng = np.random.default_rng(100 + k)
    g = {"w": [rng.standard_normal(8) for _ in range(nw)],
         "b": [rng.standard_normal(4) for _ in range(nb)], "m": rng.standard_normal((6, 5))}
    if rule == "recipe" and k == 2:
        g["b"][-1][1] = np.nan  # skipped by the plain member
    out = {"w": [arr(v) for v in g["w"]], "b": [arr(v) for v in g["b"]], "m": arr(g["m"])}
    if rule == "nesterov" and k == 1:
        out["m"] = None
    return out


def steps(case, state, params, ks):
    rule, lib, dtype, path = case
    if lib == "jax-jit":
        import jax
        step = jax.jit(uo.update)
    else:
        step = uo.update
    saved = cpu.AVAILABLE
    cpu.AVAILABLE = saved and path == "fast"
    try:
        for k in ks:
            state, params = step(state, params, grads(rule, lib, dtype, k))
    finally:
        cpu.AVAILABLE = saved
    return state, params


def x64(case):
    if case[1].startswith("jax") and case[2] == "float64":
        import jax
        return jax.enable_x64(True)
    return contextlib.nullcontext()
'''

CASES = [  # (rule, library, dtype, path): each rule fast and on the reference path, each
    # library in float32 and float64
    *[(r, "numpy", "float32", "fast") for r in ("adamw", "recipe", "nesterov", "adafactor",
                                                "ema")],
    ("adamw", "numpy", "float64", "fast"),
    *[(r, "numpy", "float64", "reference") for r in ("adamw", "recipe", "nesterov")],
    *[(r, "torch", "float32", "fast") for r in ("adamw", "recipe", "nesterov")],
    ("adamw", "torch", "float64", "fast"),
    ("adamw", "torch", "float32", "reference"),
    *[(r, "jax-jit", d, "reference") for r, d in (("adamw", "float32"), ("recipe", "float32"),
                                                    ("recipe", "float64"))],
    *[(r, "jax", "float64", "reference") for r in ("nesterov", "ema")],
]
# and every rule and block, with its defaults, on NumPy (the reference path, which the compiled
# loop is held to bit for bit in test_fused, and torch's tensors to NumPy in test_backends)
_env: dict[str, Any] = {}
exec(COMMON, _env)
CASES += [(r, "numpy", "float64", "reference") for r in sorted(_env["RULES"])
          if r.startswith("every.")]

CHILD = COMMON + '''
import json, sys
cases, folder = json.loads(sys.argv[1]), sys.argv[2]
for i, case in enumerate(map(tuple, cases)):
    rule, lib, dtype, path = case
    with x64(case):
        like = tree(lib, dtype, fill=0.0)
        state, params = uo.load(f"{folder}/{i}.safetensors", like=like, params=True)
        before = cpu.STEPS
        state, params = steps(case, state, params, range(3, 7))
        uo.save(f"{folder}/{i}.out.safetensors", state, params=params)
        print(i, cpu.STEPS - before)
'''


def _host(x: Any) -> np.ndarray:
    return np.asarray(x.detach() if hasattr(x, "detach") else x)


def _same(a: Any, b: Any) -> bool:
    """Two states (or params) equal: every leaf's type, dtype, shape and bits."""
    pa, la, _ = checkpoint._flat(a)
    pb, lb, _ = checkpoint._flat(b)
    if pa != pb:
        return False
    for x, y in zip(la, lb, strict=True):
        if x is None or isinstance(x, (bool, int, float)):
            if type(x) is not type(y) or x != y:
                return False
        elif type(x) is not type(y) or _host(x).dtype != _host(y).dtype or \
                _host(x).tobytes() != _host(y).tobytes() or _host(x).shape != _host(y).shape:
            return False
    return True


# every case in one fresh process (an interpreter and uniopt's import, some 2 s, paid once, not
# once for each library): the NumPy cases first, every rule's too, before the process has
# imported torch or JAX; then torch's; then JAX's, the first to import it there
CASES.sort(key=lambda c: ("numpy", "torch", "jax").index(c[1].split("-")[0]))


def test_a_run_resumed_in_a_fresh_process_is_the_run_that_never_stopped(tmp_path: Any) -> None:
    """Three steps here, saved with the params; a new process loads them (the rule from the
    file), takes four more and saves; here four more without stopping: the same state and
    params, bit for bit, for every case."""
    for lib in ("torch", "jax"):
        pytest.importorskip(lib)
    cases = CASES
    env: dict[str, Any] = {}
    exec(COMMON, env)
    uninterrupted = []
    for i, case in enumerate(cases):
        rule, lib, dtype, path = case
        with env["x64"](case):
            params = env["tree"](lib, dtype)
            state = uo.setup(env["RULES"][rule](), params)
            state, params = env["steps"](case, state, params, range(3))
            uo.save(str(tmp_path / f"{i}.safetensors"), state, params=params)
            uninterrupted.append(env["steps"](case, state, params, range(3, 7)))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases), str(tmp_path)], capture_output=True,
        text=True, timeout=600, env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = dict(map(int, line.split()) for line in proc.stdout.split("\n") if line)
    differ = []
    for i, case in enumerate(cases):
        rule, lib, dtype, path = case
        with env["x64"](case):
            state, params = uninterrupted[i]
            back, p = uo.load(str(tmp_path / f"{i}.out.safetensors"), like=params, params=True)
            if not (_same(back, state) and _same(p, params) and
                    checkpoint.to_data(back.rule) == checkpoint.to_data(state.rule)):
                differ.append(case)
        if lib in ("numpy", "torch"):  # the path each case meant to take, it took
            assert (compiled[i] > 0) == (path == "fast" and rule != "adafactor"), (case,
                                                                                    compiled[i])
    assert not differ, differ
    if any(c[0] == "recipe" for c in cases):  # per-leaf counts went through
        assert any(s.counts is not None for s, _ in uninterrupted)


# --- SIGKILL during saves ----------------------------------------------------------------------

SPAWNER = '''
import os, sys, time, dataclasses, numpy as np, uniopt as uo

path = sys.argv[1]
rule = uo.adam(lr=uo.schedules.cosine(1e-3, steps=100))
params = {"a": np.zeros(200_000, np.float32), "b": [np.zeros((64, 64)), np.zeros(3)]}
state = uo.setup(rule, params)
arrays = [x for v in state.slots.values() for x in v] + uo.trainables(params)


def save(i):
    """The state whose step is i: every slot and param holds i too."""
    for x in arrays:
        x.fill(i)
    uo.save(path, dataclasses.replace(state, step=i), params=params)


t = time.perf_counter()
for i in range(3, -1, -1):
    save(i)
print((time.perf_counter() - t) / 4, flush=True)  # seconds a save takes
for line in sys.stdin:
    base = int(line)
    pid = os.fork()
    if pid == 0:  # the child saves, and saves, until it is killed
        print(os.getpid(), flush=True)
        i = base
        while True:
            i += 1
            save(i)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
'''


def _kills(tmp_path: Any, kills: int) -> tuple[int, int]:
    """Run the spawner; after each SIGKILL, the checkpoint loads and is one of the states that
    were saved. Returns (kills, kills that interrupted a save: left its temporary file)."""
    path = str(tmp_path / "ckpt.safetensors")
    proc = subprocess.Popen([sys.executable, "-c", SPAWNER, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1",
                                 "OPENBLAS_NUM_THREADS": "1"})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        window = 1.5 * float(proc.stdout.readline())  # kill anywhere in the first saves
        rule = uo.adam(lr=uo.schedules.cosine(1e-3, steps=100))
        like = {"a": np.zeros(200_000, np.float32), "b": [np.zeros((64, 64)), np.zeros(3)]}
        rng = random.Random(0)
        interrupted = 0
        for k in range(kills):
            proc.stdin.write(f"{(k + 1) * 1_000_000}\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            time.sleep(rng.uniform(0, window))
            os.kill(pid, signal.SIGKILL)
            assert proc.stdout.readline().strip() == "reaped"
            state, params = uo.load(path, like=(rule, like), params=True)
            i = state.step
            for x in [*(y for v in state.slots.values() for y in v), *uo.trainables(params)]:
                assert np.all(x == i), (k, i)
            temps = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
            interrupted += bool(temps)
            for f in temps:
                os.unlink(tmp_path / f)
        return kills, interrupted
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_a_save_killed_at_any_moment_leaves_a_whole_checkpoint(tmp_path: Any) -> None:
    kills, interrupted = _kills(tmp_path, 20)
    assert interrupted > 0  # some kills landed inside a save


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_two_hundred_kills(tmp_path: Any) -> None:
    kills, interrupted = _kills(tmp_path, int(os.environ.get("UNIOPT_KILLS", 200)))
    print(f"{kills} kills, {interrupted} inside a save")
    assert interrupted > 0


# --- fuzzing the loader ------------------------------------------------------------------------

def _seeds(folder: Any) -> list[tuple[bytes, Any]]:
    """Real checkpoints, each with what it loads into: a chain with schedules and params, a
    partition with accumulation and skipping (its members' states nested), per-leaf counts,
    and a uniopt.torch optimizer's state_dict."""
    out = []
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": [rng.standard_normal(2), None]}
    rules = [
        uo.chain(uo.clip_by_global_norm(1.0),
                 uo.adamw(lr=uo.schedules.warmup(2, uo.schedules.cosine(1e-2, steps=9)))),
        uo.partition({"a": uo.accumulate(uo.skip_nonfinite(uo.adam()), 2),
                      "c": uo.sgd(momentum=0.9)}, uo.by_path({"w": "a", "*": "c"})),
    ]
    for i, rule in enumerate(rules):
        state = uo.setup(rule, params)
        state, p = uo.update(state, params, {"w": np.ones((3, 4)), "b": [np.ones(2), None]})
        path = os.path.join(folder, f"seed{i}")
        uo.save(path, state, params=p)
        out.append((open(path, "rb").read(), (rule, params)))
    state = uo.setup(uo.adam(), params)
    state, _ = uo.update(state, params, {"w": np.ones((3, 4)), "b": [None, None]})
    uo.save(os.path.join(folder, "seed2"), state)
    out.append((open(os.path.join(folder, "seed2"), "rb").read(), params))
    torch = pytest.importorskip("torch")
    import uniopt.torch as ut

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = ut.AdamW(model.parameters(), lr=uo.schedules.cosine(1e-2, steps=9))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    uo.save(os.path.join(folder, "seed3"), opt)
    out.append((open(os.path.join(folder, "seed3"), "rb").read(), opt))
    return out


def _json_nodes(x: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(x, dict):
        out += [p for k, v in x.items() for p in _json_nodes(v, (*at, k))]
    elif isinstance(x, list):
        out += [p for i, v in enumerate(x) for p in _json_nodes(v, (*at, i))]
    return out


def _replace(x: Any, at: tuple[Any, ...], value: Any) -> Any:
    if not at:
        return value
    x[at[0]] = _replace(x[at[0]], at[1:], value)
    return x


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
              st.sampled_from(["$", "record", "tensor", "dict", "list", "F64", "I32", "BOOL",
                               "../x", "adam", "state", "scalar", "float", "nan", "namedtuple",
                               "slots/scale_by_adam.exp_avg/w"])),
    lambda kids: st.one_of(st.lists(kids, max_size=3),
                           st.dictionaries(st.sampled_from(["$", "type", "fields", "items",
                                                            "name", "value", "dtype"]),
                                           kids, max_size=3)),
    max_leaves=6)


@st.composite
def mutations(draw: Any, seeds: int) -> tuple[int, str, Any]:
    kind = draw(st.sampled_from(["bytes", "truncate", "length", "header", "structure"]))
    return draw(st.integers(0, seeds - 1)), kind, draw(st.randoms(use_true_random=False))


def _mutate(raw: bytes, kind: str, rnd: random.Random, value: Any) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    if kind == "bytes":  # flip a few bytes, most in the header
        out = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(min(len(out), 8 + n)) if rnd.random() < 0.9 else \
                rnd.randrange(len(out))
            out[at] = rnd.randrange(256)
        return bytes(out)
    if kind == "truncate":
        return raw[:rnd.randrange(len(raw))]
    if kind == "length":
        return rnd.choice([n + 1, n - 1, 0, 2**64 - 1, len(raw), rnd.randrange(2**64)]).to_bytes(
            8, "little") + raw[8:]
    header = json.loads(raw[8:8 + n])
    doc = json.loads(header["__metadata__"]["uniopt"])
    target = header if kind == "header" else doc
    node = rnd.choice(_json_nodes(target)[1:])
    old: Any = target
    for k in node:
        old = old[k]
    if isinstance(old, int) and not isinstance(old, bool) and rnd.random() < 0.5:
        value = rnd.choice([old + 1, old - 1, -old, old * 2**rnd.randint(1, 40), 0])
    target = _replace(target, node, value)
    if kind == "structure":
        header["__metadata__"]["uniopt"] = json.dumps(doc)
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + raw[8 + n:]


def _fuzz(tmp_path: Any, examples: int) -> int:
    seeds = _seeds(tmp_path)
    tried = [0]
    path = str(tmp_path / "fuzzed")

    def hang(*_: Any) -> None:
        raise TimeoutError("the loader hung on one input")

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutations(len(seeds)), JSON)
    def run(m: tuple[int, str, Any], value: Any) -> None:
        i, kind, rnd = m
        raw, like = seeds[i]
        data = _mutate(raw, kind, rnd, value)
        with open(path, "wb") as f:
            f.write(data)
        tried[0] += 1
        old = signal.signal(signal.SIGALRM, hang)
        signal.alarm(20)  # a hang detector only: each input takes milliseconds
        tracemalloc.start()
        try:
            uo.load(path, like=like)
        except CheckpointError:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        # memory bounded by the file's size (and the state like's params make), never by what
        # the file declares
        assert peak < 4_000_000 + 50 * len(data), (kind, peak)

    run()
    return tried[0]


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
def test_the_loader_raises_checkpoint_errors_only(tmp_path: Any) -> None:
    assert _fuzz(tmp_path, 150) >= 150


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
def test_the_loader_under_many_more_inputs(tmp_path: Any) -> None:
    tried = _fuzz(tmp_path, int(os.environ.get("UNIOPT_FUZZ_EXAMPLES", 500)))
    print(f"{tried} inputs tried")

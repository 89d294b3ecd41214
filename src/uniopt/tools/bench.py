"""``uniopt bench``: one optimizer step against the memory-bandwidth floor and against the peers.

An optimizer step is memory-bound: Adam reads p, g, m, v and writes p, m, v, 28 bytes per float32
parameter. The floor is that traffic divided by the bandwidth measured first, in this process,
with a fused 4-read/3-write kernel over large buffers. Every implementation then runs the same
workload in the same process (parameters as a plain list of separately allocated arrays,
gradients fresh each step) and is reported in ms per step (median over repeats) and as a ratio to
the floor. Peers that are not installed are skipped. Each runs as it does by default (thread
pools as they come); the bench pauses between implementations so that none starts while
another's threads still spin.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import importlib.util
import inspect
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import uniopt as uo

from .. import registry
from ..base import Elementwise, PerLeaf


def _resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 parameters)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def _small_cnn_shapes() -> list[tuple[int, ...]]:
    """50 tensors from 1K to 64K elements, sizes evenly spaced in log scale (a small CNN's)."""
    sizes = [round(1024 * 64 ** (i / 49)) for i in range(50)]
    return [(n // 16, 16) if n % 16 == 0 else (n,) for n in sizes]


WORKLOADS: dict[str, list[tuple[int, ...]]] = {
    # small models, where a step's fixed costs are most of it: an MLP 20-64-64-3, a small CNN
    "S1": [(64, 20), (64,), (64, 64), (64,), (3, 64), (3,)],
    "S2": _small_cnn_shapes(),
    "W1": [(16_800_000,)],
    "W2": [(16_000,)] * 1_000,
    "W3": _resnet50_shapes(),
    "W4": [(100,)] * 10_000,
}

# the rules with a peer row, built as their peers are below (the same numbers, the same blocks:
# adamw's decay, sgd's momentum); any other rule of the registry runs with its example's
# hyperparameters (uniopt.registry: the rule needs no more to be built)
PEER_SETTINGS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "sgd": {"lr": 1e-3, "momentum": 0.9},
    "rmsprop": {"lr": 1e-3},
    "adamax": {"lr": 1e-3},
    "nadam": {"lr": 1e-3},
    "radam": {"lr": 1e-3},
    "asgd": {"lr": 1e-3},
    "rprop": {"lr": 1e-3},
    "adagrad": {"lr": 1e-2},
    "adadelta": {"lr": 1.0},
    "adafactor": {"lr": 1e-2},
    "muon": {"lr": 1e-3},
}


def _rule(name: str) -> uo.Transform:
    e = registry.entry(name)
    return e.rule(**PEER_SETTINGS.get(name, e.example))


@functools.cache
def skip_reason(name: str) -> str | None:
    """Why the bench does not run registry rule ``name`` (it takes no step from gradients
    alone: it reads the loss, or evaluates it at trial points), found by a step on one small
    matrix (on the reference path: nothing is compiled for it), or None."""
    from ..fast import cpu

    params = [np.ones((2, 3), np.float32)]
    after, cpu.COMPILE_AFTER = cpu.COMPILE_AFTER, None
    try:
        uo.update_(uo.setup(_rule(name), params), params, [np.full((2, 3), 0.1, np.float32)])
    except (TypeError, ValueError) as e:
        return str(e).split("\n")[0]
    finally:
        cpu.COMPILE_AFTER = after
    return None


def no_floor(name: str) -> str | None:
    """Why registry rule ``name`` has no floor (a floor counts the arrays an elementwise step
    reads and writes; a part that sees a whole leaf or tree has other work), or None."""
    other = [p for p in _rule(name).flat_parts if not isinstance(p, Elementwise)]
    if not other:
        return None
    return "not every part is elementwise: " + ", ".join(f"{p.name} ({_kind(p)})"
                                                          for p in other)


def _kind(p: Any) -> str:
    return "per-leaf" if isinstance(p, PerLeaf) else "whole-tree"


def traffic(name: str) -> int:
    """Arrays read and written per parameter by an elementwise step (times the itemsize:
    bytes moved): p read and written, g read, each slot read and written."""
    return 3 + 2 * sum(len(p.slots) for p in _rule(name).flat_parts)


# every elementwise rule of the registry, with its traffic (the others run without a floor)
TRAFFIC = {n: traffic(n) for n in registry.names() if no_floor(n) is None}


_QUIET_S = 0.2


def _median_ms(step: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _interleaved(steps: dict[str, Callable[[], Any]], rounds: int, repeats: int,
                 warmup: int) -> dict[str, list[float]]:
    """Each step's median ms over ``repeats`` calls, in ``rounds`` rounds that take the steps
    in turn (a noisy machine weighs on each alike), after ``warmup`` calls of each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    out: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            out[label].append(_median_ms(step, repeats, warmup=0))
    return out


def bandwidth(n: int = 16_800_000, repeats: int = 10) -> float:
    """Bytes per second of a fused 4-read/3-write float32 pass, as Adam's step needs: the best
    of one thread and all threads (on some virtual machines one thread is the faster)."""
    import numba

    from .. import jitcache

    @jitcache.njit(parallel=True)
    def pass_(a: Any, b: Any, c: Any, d: Any) -> None:
        for i in numba.prange(a.size):
            x = a[i] + b[i]
            y = c[i] * d[i]
            a[i] = x
            c[i] = y + x
            d[i] = y

    bufs = [np.full(n, 0.5, np.float32) for _ in range(4)]
    threads = numba.get_num_threads()
    best = []
    for t in sorted({1, threads}):
        numba.set_num_threads(t)
        best.append(_median_ms(lambda: pass_(*bufs), repeats))
    numba.set_num_threads(threads)
    return 28 * n / (min(best) / 1e3)


def device_bandwidth(device: str, n: int = 16_800_000, repeats: int = 10) -> float:
    """Bytes per second that torch moves on ``device`` (an accelerator: ``"cuda"``...): the
    median of a copy of ``n`` float32 numbers, 8 bytes each, synchronised. A copy, not a fused
    4-read/3-write pass (torch has none to launch): the floor it gives is a copy's speed."""
    import torch

    src = torch.full((n,), 0.5, device=device)
    dst = torch.empty_like(src)
    sync = synchronizer(device)

    def copy() -> None:
        dst.copy_(src)
        sync()

    return 8 * n / (_median_ms(copy, repeats) / 1e3)


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for ``device``'s queued work (``torch.cuda.synchronize`` and the like; nothing
    on the CPU, whose operations return done)."""
    import torch

    kind = torch.device(device).type
    module = getattr(torch, kind, None)
    sync = getattr(module, "synchronize", None) if kind != "cpu" else None
    return (lambda: None) if sync is None else sync


# the implementations that take torch tensors, and so run on an accelerator (--device)
ON_DEVICE = ("torch for-loop", "torch foreach", "torch fused", "uniopt.torch",
             "uniopt.torch foreach")


class _Workload:
    """Parameters as separately allocated arrays; fresh gradients drawn from a pool each step.
    ``device``: where the torch implementations put their tensors."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0,
                 dtype: str = "float32", device: str = "cpu") -> None:
        rng = np.random.default_rng(seed)
        self.shapes = shapes
        self.device = device
        self.dtype = dtype  # of every implementation's arrays; NumPy has no bfloat16
        np_dtype = np.float16 if dtype == "float16" else np.float32
        self.params = [rng.standard_normal(s, dtype=np.float32).astype(np_dtype) for s in shapes]
        # two gradient sets, alternated, so every step sees other gradient arrays (as after a
        # backward pass) without timing the random number generator
        self.grads = [[self._grad(rng, s, np_dtype) for s in shapes] for _ in (0, 1)]
        self.size = sum(p.size for p in self.params)
        self.itemsize = 4 if dtype == "float32" else 2

    @staticmethod
    def _grad(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        z = rng.standard_normal(shape, dtype=np.float32)
        if dtype != np.float16:
            return (z * 1e-3).astype(dtype)
        # float16 holds no (1 - b2) g^2 of a gradient near 1e-3 (Adam's v stayed 0, and its
        # eps=1e-8 is 0 in float16: steps of 36 and NaNs), nor of any gradient near 0: here
        # every gradient is 0.05 or more in size
        return np.copysign(0.05 + 0.05 * np.abs(z), z).astype(dtype)


def _uniopt(w: _Workload, rule: str, state_dtype: str | None = None) -> Callable[[], Any] | None:
    if w.dtype == "bfloat16" or (state_dtype is not None and w.dtype != "float32"):
        return None
    made = _rule(rule)
    if state_dtype == "q8" and (made.tree_layout or any(
            getattr(part, "no_q8", None) or getattr(part, "exact_state", None)
            for part in made.flat_parts)):
        return None  # (no 8-bit state for this rule: acprop's, ftrl's, a whole-tree part's)
    params = [p.copy() for p in w.params]
    state = [uo.setup(made, params, state_dtype=state_dtype)]
    k = [0]

    def step() -> None:
        k[0] ^= 1
        state[0] = uo.update_(state[0], params, w.grads[k[0]])

    return step


def _uniopt_packed(w: _Workload, rule: str) -> Callable[[], Any] | None:
    """The user keeps parameters and gradients in one buffer each (views per tensor)."""
    if w.dtype == "bfloat16" or rule not in TRAFFIC:  # one buffer: another rule per leaf
        return None
    params = np.concatenate([p.ravel() for p in w.params])
    grads = [np.concatenate([g.ravel() for g in gs]) for gs in w.grads]
    state = [uo.setup(_rule(rule), [params])]
    k = [0]

    def step() -> None:
        k[0] ^= 1
        state[0] = uo.update_(state[0], [params], [grads[k[0]]])

    return step


def _numpy_per_tensor(w: _Workload, rule: str) -> Callable[[], Any] | None:
    if rule not in ("adam", "adamw") or w.dtype != "float32":
        return None
    params = [p.copy() for p in w.params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t, k = [0], [0]
    b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
    decay = 1 - lr * PEER_SETTINGS[rule].get("weight_decay", 0.0)

    def step() -> None:
        t[0] += 1
        k[0] ^= 1
        bc1, bc2 = 1 - b1 ** t[0], (1 - b2 ** t[0]) ** 0.5
        for p, g, mi, vi in zip(params, w.grads[k[0]], m, v, strict=True):
            if decay != 1:
                p *= decay
            mi *= b1
            mi += (1 - b1) * g
            vi *= b2
            vi += (1 - b2) * g * g
            p -= (lr / bc1) * mi / (np.sqrt(vi) / bc2 + eps)

    return step


def _numpy_flat(w: _Workload, rule: str, chunk: int | None) -> Callable[[], Any] | None:
    if rule not in ("adam", "adamw") or w.dtype != "float32":
        return None
    p = np.concatenate([x.ravel() for x in w.params])
    grads = [np.concatenate([g.ravel() for g in gs]) for gs in w.grads]
    m, v = np.zeros_like(p), np.zeros_like(p)
    t, k = [0], [0]
    b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
    decay = 1 - lr * PEER_SETTINGS[rule].get("weight_decay", 0.0)
    step_ = chunk or p.size
    tmp = np.empty(min(step_, p.size), np.float32)

    def step() -> None:
        t[0] += 1
        k[0] ^= 1
        g_all = grads[k[0]]
        bc1, bc2 = 1 - b1 ** t[0], (1 - b2 ** t[0]) ** 0.5
        for a in range(0, p.size, step_):
            s = slice(a, a + step_)
            g, mi, vi, pi = g_all[s], m[s], v[s], p[s]
            tt = tmp[: pi.size]
            if decay != 1:
                pi *= decay
            mi *= b1
            np.multiply(g, 1 - b1, out=tt)
            mi += tt
            vi *= b2
            np.multiply(g, g, out=tt)
            tt *= 1 - b2
            vi += tt
            np.sqrt(vi, out=tt)
            tt /= bc2
            tt += eps
            np.divide(mi, tt, out=tt)
            tt *= lr / bc1
            pi -= tt

    return step


def _torch(w: _Workload, rule: str, mode: str,
           scheduler: Callable[[Any], Any] | None = None) -> Callable[[], Any] | None:
    """torch.optim in ``mode`` (for-loop, foreach, fused), or ``uniopt.torch``'s class of the
    same name (``uniopt.torch foreach``: its multi-tensor path, which tensors off the CPU take
    by default): the same tensors, on ``w.device``, the same ``p.grad = g; opt.step()`` loop,
    synchronised with the device after each step. ``scheduler``: makes a torch lr_scheduler of
    the optimizer, stepped after it."""
    try:
        import torch
    except ImportError:
        return None
    optim: Any = torch.optim
    if mode.startswith("uniopt.torch"):
        optim = importlib.import_module("uniopt.torch")
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD,
           "rmsprop": optim.RMSprop, "adamax": optim.Adamax, "nadam": optim.NAdam,
           "radam": optim.RAdam, "asgd": optim.ASGD, "rprop": optim.Rprop,
           "adagrad": optim.Adagrad, "adadelta": optim.Adadelta,
           # (torch 2.5 and 2.9 brought these)
           "adafactor": getattr(optim, "Adafactor", None),
           "muon": getattr(optim, "Muon", None)}.get(rule)
    if cls is None:  # no torch class of these settings
        return None
    kw: dict[str, Any] = dict(PEER_SETTINGS[rule])
    takes = inspect.signature(cls).parameters
    if mode == "uniopt.torch":
        pass
    elif mode == "uniopt.torch foreach":
        if "foreach" not in takes:
            return None
        kw["foreach"] = True
    elif mode == "fused":
        if rule not in ("adam", "adamw", "sgd", "adagrad"):
            return None
        kw["fused"] = True
    elif "foreach" in takes:
        kw["foreach"] = mode == "foreach"
    elif mode == "foreach":  # Muon: one implementation, the for-loop
        return None
    dtype = getattr(torch, w.dtype)
    params = [torch.from_numpy(p.copy()).to(w.device, dtype) for p in w.params]
    grads = [[torch.from_numpy(g).to(w.device, dtype) for g in gs] for gs in w.grads]
    opt = cls(params, **kw)
    sched = None if scheduler is None else scheduler(opt)
    sync = synchronizer(w.device)
    k = [0]

    def step() -> None:
        k[0] ^= 1
        for p, g in zip(params, grads[k[0]], strict=True):
            p.grad = g
        opt.step()
        if sched is not None:
            sched.step()
        sync()

    return step


def optax_peer(rule: str) -> Any:
    """optax's transformation of ``rule`` with the bench's settings, or None: optax's NAdam and
    the others differ from torch's, or are missing (or optax is not installed)."""
    try:
        import optax
    except ImportError:
        return None
    # (optax's RMSprop by default decays by 0.9 and adds eps inside the root: here torch's)
    return {"adam": lambda: optax.adam(1e-3),
            "adamw": lambda: optax.adamw(1e-3, weight_decay=1e-2),
            "sgd": lambda: optax.sgd(1e-3, momentum=0.9),
            "rmsprop": lambda: optax.rmsprop(1e-3, decay=0.99, eps_in_sqrt=False),
            }.get(rule, lambda: None)()


def _optax(w: _Workload, rule: str) -> Callable[[], Any] | None:
    tx = optax_peer(rule)
    if tx is None:
        return None
    import jax
    import optax
    params = [jax.numpy.asarray(p, dtype=w.dtype) for p in w.params]
    grads = [[jax.numpy.asarray(g, dtype=w.dtype) for g in gs] for gs in w.grads]

    @jax.jit
    def update(params: Any, state: Any, grads: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update.__wrapped__, donate_argnums=(0, 1))  # type: ignore[attr-defined]
    return donated_steps(update, [params, tx.init(params)], grads, ready=0)


def donated_steps(update: Callable[..., Any], carry: list[Any], grads: list[Any],
                  ready: int) -> Callable[[], None]:
    """A step of jitted ``update(carry[0], carry[1], g)``, its two arguments donated and
    replaced by what it returns, on the two gradient sets in turn; it waits for
    ``carry[ready]``."""
    import jax

    k = [0]

    def step() -> None:
        k[0] ^= 1
        carry[0], carry[1] = update(carry[0], carry[1], grads[k[0]])
        jax.block_until_ready(carry[ready])

    return step


def _uniopt_jit(w: _Workload, rule: str) -> Callable[[], Any] | None:
    """``uniopt.update`` under ``jax.jit``, state and params donated as in the optax row."""
    try:
        import jax
    except ImportError:
        return None
    if rule in registry.names() and not registry.entry(rule).jit:
        return None  # (NAdam: its products of momenta are the host's, step by step)
    params = [jax.numpy.asarray(p, dtype=w.dtype) for p in w.params]
    grads = [[jax.numpy.asarray(g, dtype=w.dtype) for g in gs] for gs in w.grads]
    update = jax.jit(uo.update, donate_argnums=(0, 1))
    return donated_steps(update, [uo.setup(_rule(rule), params), params], grads, ready=1)


IMPLEMENTATIONS: dict[str, Callable[[_Workload, str], Callable[[], Any] | None]] = {
    "uniopt": _uniopt,
    "uniopt packed": _uniopt_packed,
    # the state in 8 bits (setup's state_dtype="q8"): its ratio to the floor is against the
    # float32 state's traffic, so beside "uniopt" it reads as the cost of quantising
    "uniopt q8": lambda w, r: _uniopt(w, r, "q8"),
    "torch for-loop": lambda w, r: _torch(w, r, "for-loop"),
    "torch foreach": lambda w, r: _torch(w, r, "foreach"),
    "torch fused": lambda w, r: _torch(w, r, "fused"),
    "uniopt.torch": lambda w, r: _torch(w, r, "uniopt.torch"),
    "uniopt.torch foreach": lambda w, r: _torch(w, r, "uniopt.torch foreach"),
    "optax + jit": _optax,
    "uniopt + jit": _uniopt_jit,
    "numpy per tensor": _numpy_per_tensor,
    "numpy flat": lambda w, r: _numpy_flat(w, r, None),
    "numpy flat 64K": lambda w, r: _numpy_flat(w, r, 1 << 16),
}


# the libraries an implementation's rows need beside NumPy (a row of one not installed is
# skipped as such, not as a rule it has no step for)
NEEDS = {"torch": ("torch",), "optax": ("jax", "optax"), "+ jit": ("jax",)}


def missing(impl: str) -> str | None:
    """The first library implementation ``impl`` needs that is not installed, or None."""
    for key, libs in NEEDS.items():
        if key in impl:
            for lib in libs:
                if importlib.util.find_spec(lib) is None:
                    return lib
    return None


@dataclasses.dataclass
class Row:
    workload: str
    rule: str
    implementation: str
    ms: float
    floor_ms: float | None  # None: a rule with parts that are not elementwise (no_floor)
    first_step_s: float

    @property
    def ratio(self) -> float | None:
        return None if self.floor_ms is None else self.ms / self.floor_ms


def run(
    workloads: list[str],
    rules: list[str],
    implementations: list[str],
    repeats: int,
    shapes: dict[str, list[tuple[int, ...]]] | None = None,
    progress: Callable[[str], None] = lambda s: None,
    slow: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[float, list[Row]]:
    """Bandwidth first, then every (workload, rule, implementation) in this process.
    ``device`` other than the CPU: the torch implementations (:data:`ON_DEVICE`) on it, against
    a copy's bandwidth there; the others are left out.

    optax + jit compiles for minutes on thousands of tensors (391 s on W4); it runs there only
    with ``slow=True``. A rule with parts that are not elementwise has no floor, and is skipped
    where a workload's shapes are not its own (Muon's matrices) with the error that says so.
    ``dtype``: float32, or float16/bfloat16 params and gradients (the implementations that have
    no such arrays are left out: NumPy has no bfloat16)."""
    from ..fast import cpu

    # a long run's steady state: small steps take the compiled loop from the first one, where a
    # short run keeps the reference path for its first COMPILE_AFTER of them (for this run: a
    # caller's later small steps count as before)
    after, cpu.COMPILE_AFTER = cpu.COMPILE_AFTER, 0
    try:
        return _run(workloads, rules, implementations, repeats, shapes, progress, slow, dtype,
                    device)
    finally:
        cpu.COMPILE_AFTER = after


def _run(workloads: list[str], rules: list[str], implementations: list[str], repeats: int,
         shapes: dict[str, list[tuple[int, ...]]] | None, progress: Callable[[str], None],
         slow: bool, dtype: str, device: str) -> tuple[float, list[Row]]:
    on_cpu = device == "cpu"
    if not on_cpu:
        for impl in implementations:
            if impl not in ON_DEVICE:
                progress(f"{impl}: left out (not torch tensors on {device})")
        implementations = [i for i in implementations if i in ON_DEVICE]
    bw = bandwidth() if on_cpu else device_bandwidth(device)
    progress(f"bandwidth floor: {bw / 1e9:.1f} GB/s"
             + ("" if on_cpu else f" (a copy on {device})"))
    all_shapes = {**WORKLOADS, **(shapes or {})}
    rows = []
    for wname in workloads:
        w = _Workload(all_shapes[wname], dtype=dtype, device=device)
        for rule in rules:
            why = skip_reason(rule)
            if why is not None:
                progress(f"{wname} {rule}: skipped ({why})")
                continue
            floor = (1e3 * w.size * TRAFFIC[rule] * w.itemsize / bw if rule in TRAFFIC
                     else None)
            for impl in implementations:
                if impl.endswith("+ jit") and len(w.shapes) > 2_000 and not slow:
                    progress(f"{wname} {rule} {impl}: skipped (minutes to compile; --slow)")
                    continue
                t0 = time.perf_counter()
                try:
                    step = IMPLEMENTATIONS[impl](w, rule)
                    if step is None:
                        lib = missing(impl)
                        progress(f"{wname} {rule} {impl}: skipped (" + (
                            f"{lib} is not installed" if lib else
                            f"{impl} has no {rule} step for {w.dtype} arrays here") + ")")
                        continue
                    step()
                except (TypeError, ValueError) as e:
                    if floor is not None:  # an elementwise rule takes every workload
                        raise
                    progress(f"{wname} {rule} {impl}: skipped ({str(e).splitlines()[0]})")
                    continue
                first = time.perf_counter() - t0
                ms = _median_ms(step, repeats)
                rows.append(Row(wname, rule, impl, ms, floor, first))
                progress(f"{wname} {rule} {impl}: {ms:.2f} ms"
                         + ("" if floor is None else f" ({ms / floor:.1f}x floor)"))
                del step
                gc.collect()
                # torch and numba each bring an OpenMP pool whose threads spin a while after
                # a parallel region: let them go quiet before the next implementation runs
                time.sleep(_QUIET_S)
    return bw, rows


def table(bw: float, rows: list[Row], device: str = "cpu",
          implementations: Sequence[str] = ()) -> str:
    """A column per implementation, in the order of ``implementations`` (those not named in
    it after them, as the rows first have them)."""
    impls = order(implementations, [r.implementation for r in rows])
    keys = list(dict.fromkeys((r.workload, r.rule) for r in rows))
    cell = {(r.workload, r.rule, r.implementation): r for r in rows}
    head = ["workload", "rule", "floor ms", *impls]
    lines = [head]
    for wname, rule in keys:
        floor = next(r.floor_ms for r in rows if (r.workload, r.rule) == (wname, rule))
        line = [wname, rule, "-" if floor is None else f"{floor:.3g}"]
        for impl in impls:
            r = cell.get((wname, rule, impl))
            line.append("-" if r is None else f"{r.ms:.3g}" if r.ratio is None
                        else f"{r.ms:.3g} ({r.ratio:.1f}x)")
        lines.append(line)
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    how = "fused 4-read/3-write float32 pass" if device == "cpu" else f"a copy on {device}"
    out = [f"bandwidth floor {bw / 1e9:.1f} GB/s ({how}); "
           f"ms per step, median; (ratio to floor; none for a rule whose parts are not all "
           f"elementwise); {os.cpu_count()} CPUs"]
    for i, line in enumerate(lines):
        out.append(" | ".join(x.rjust(wd) for x, wd in zip(line, widths, strict=True)))
        if i == 0:
            out.append("-+-".join("-" * wd for wd in widths))
    return "\n".join(out)


def order(implementations: Sequence[str], measured: Sequence[str]) -> list[str]:
    """The implementations ``measured`` (rows' names, repeated), each once, in the order of
    ``implementations`` (as asked: in the rows' order, one skipped for the first workload or
    rule came last), the others after them."""
    have = list(dict.fromkeys(measured))
    return [i for i in implementations if i in have] + [i for i in have
                                                          if i not in implementations]


def to_json(bw: float, rows: list[Row]) -> str:
    return json.dumps(
        {"bandwidth_bytes_per_s": bw,
         "rows": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in rows]},
        indent=2,
    )

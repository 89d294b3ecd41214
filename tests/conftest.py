"""The backend matrix (as array-api-extra's ``tests/main/conftest.py``): a test that asks for the
``backend`` fixture runs once on each array library uniopt supports, in each float dtype.

A :class:`Backend` turns NumPy arrays into its own and back, and says what its arrays are and
whether ``update_`` may write them. A library is imported only when a test asks for one of its
backends, and the test is skipped where the library is missing.

Fixtures live here; plain helpers (which path a step took, trees, bit-for-bit comparisons) in
``helpers.py``, which test files import by name: under ``--import-mode=importlib`` a test file
cannot import this module (pytest loads it under a name of its own choosing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys

# Test processes share the cores (pytest-xdist runs one per core): OpenBLAS's own threads on top
# made the small matrix products of the matrix rules (Kron, Muon, Shampoo) 3-4x slower. Read
# when NumPy loads OpenBLAS, so set before the import below; a value already set wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from uniopt import jitcache
from uniopt.fast import cpu

# XLA programs compiled in one run are reused by the next, as uniopt's compiled loops are: JAX's
# persistent compilation cache lives beside them, in $UNIOPT_CACHE_DIR (a fresh directory is a
# cold run of both). Set before any test module imports jax; a JAX_* variable already set wins.
_CACHE_ROOT = jitcache.root()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE_ROOT, "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _xla_classic_emitters() -> None:
    """XLA:CPU's classic emitters, not its fusion emitters (jaxlib 0.10's default), compile
    the suite's programs in about half the time: most are one step of a few small leaves or a
    single eager operation (23 ms each with the fusion emitters, 12 ms without on this
    project's machines), and compiling them cold was about a quarter of the suite's time. The
    two order some operations differently (the last bits of a norm, a mean, a few elementwise
    chains; docs/development.md has the measure): every assertion here holds under both, and
    the JAX mesh worker (tests/distributed_jax_worker.py) runs XLA's defaults, as a user does.
    Only on a jaxlib that has the flag (0.10 has it; XLA aborts on a flag it does not know),
    and not where the caller chose the emitters."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        jaxlib = tuple(int(x) for x in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if jaxlib >= (0, 10) and "xla_cpu_use_fusion_emitters" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_use_fusion_emitters=false".strip()


_xla_classic_emitters()


# uniopt compiles a loop for small steps too (at once where it is on disk, else after a rule's
# first COMPILE_AFTER of them); the suite's hundreds of small configurations would each compile
# one, to check what test_fused checks bit for bit, and which path a small step took would
# depend on the cache. Here small steps always keep the reference path (tests of the compiled
# loop on small trees lift this with the ``small_steps_compiled`` fixture).
cpu.COMPILE_AFTER = None
# The same goes for the thread-pool form of each loop (compiled at the first step of
# PARALLEL_MIN elements, costing as much again as the loop itself): here every compiled step
# runs on one thread. The two forms run the same chunks in the same code; test_fused.py sends
# steps to the pool and holds them to the one-thread run.
cpu.PARALLEL_MIN = 1 << 62


@pytest.fixture
def small_steps_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step takes the compiled loop, as it does outside the test suite."""
    monkeypatch.setattr(cpu, "MIN_LEAVES", 0)
    monkeypatch.setattr(cpu, "MIN_SIZE", 0)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # the test id
    np_dtype: type[np.floating]  # the dtype of the NumPy arrays it is fed and compared with
    dtype: Any  # the library's own dtype object
    array_type: type
    asarray: Callable[[np.ndarray], Any]  # a copy, in this library, on this backend's device
    to_numpy: Callable[[Any], np.ndarray]  # a copy
    # the phrase update_'s TypeError must contain, or None where update_ writes in place
    immutable: str | None = None
    # computes with NumPy's own ufuncs, so its results must be NumPy's to the bit
    numpy_arithmetic: bool = False
    # what the backend does to an array uniopt hands back before feeding it in again (read-only
    # NumPy makes it read-only, so every step's pure update sees read-only params and state)
    seal: Callable[[Any], None] = lambda x: None
    # wraps uniopt.update: jax.jit for the jitted JAX backends
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda f: f


def _numpy(dt: type[np.floating], read_only: bool) -> Backend:
    def seal(x: np.ndarray) -> None:
        x.flags.writeable = not read_only

    def asarray(a: np.ndarray) -> np.ndarray:
        out = np.array(a, dtype=dt)
        seal(out)
        return out

    return Backend(
        f"numpy{'-readonly' if read_only else ''}-{dt.__name__}",
        dt,
        np.dtype(dt),
        np.ndarray,
        asarray,
        np.array,
        immutable="read-only" if read_only else None,
        numpy_arithmetic=True,
        seal=seal,
    )


def _strict(dt: type[np.floating]) -> Backend:
    xs = pytest.importorskip("array_api_strict")
    # not the default device: an array made on the default one (a zeros() without device=)
    # and mixed with ours makes array-api-strict raise
    dev = xs.Device("device1")
    return Backend(
        f"array_api_strict-{dt.__name__}",
        dt,
        getattr(xs, dt.__name__),
        type(xs.asarray(0.0)),
        lambda a: xs.asarray(a, device=dev, copy=True),
        lambda x: np.array(np.from_dlpack(x)),
    )


def _torch(dt: type[np.floating]) -> Backend:
    torch = pytest.importorskip("torch")
    return Backend(
        f"torch-{dt.__name__}",
        dt,
        getattr(torch, dt.__name__),
        torch.Tensor,
        lambda a: torch.asarray(a, copy=True),
        lambda x: x.numpy().copy(),
    )


def _jax(dt: type[np.floating], jit: bool = False) -> Backend:
    jax = pytest.importorskip("jax")
    return Backend(
        f"jax{'-jit' if jit else ''}-{dt.__name__}",
        dt,
        np.dtype(dt),
        jax.Array,
        jax.numpy.asarray,
        np.array,
        "immutable",
        wrap=jax.jit if jit else (lambda f: f),
    )


BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy-float64": lambda: _numpy(np.float64, False),
    "numpy-float32": lambda: _numpy(np.float32, False),
    "numpy-readonly-float64": lambda: _numpy(np.float64, True),
    "array_api_strict-float64": lambda: _strict(np.float64),
    "array_api_strict-float32": lambda: _strict(np.float32),
    "torch-float64": lambda: _torch(np.float64),
    "torch-float32": lambda: _torch(np.float32),
    "jax-float64": lambda: _jax(np.float64),
    "jax-float32": lambda: _jax(np.float32),
    "jax-jit-float64": lambda: _jax(np.float64, jit=True),
    "jax-jit-float32": lambda: _jax(np.float32, jit=True),
}


def _freeze_modules() -> None:
    """The objects that imports made (the test modules, torch, JAX and the peers they import:
    over a million) live as long as the process: frozen out of the cyclic collector, which
    otherwise walks all of them at each full collection (a tenth of the suite's time). Frozen
    objects are still freed when nothing refers to them; only a cycle among them would stay."""
    gc.collect()
    gc.freeze()
    _FROZEN[0] = len(sys.modules)


_FROZEN = [0]  # how many modules were loaded at the last freeze


def pytest_collection_finish(session: pytest.Session) -> None:
    _freeze_modules()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """What a test imported beyond collection's modules frozen as theirs (above); and torch on
    one intra-op thread in every test, once a test module has imported it: the
    suite runs a process per core, and on its small tensors torch's second thread only waits
    for a core (a sqrt of 4,096 floats: 3 us on one thread, 0.2-1.2 ms on two of a busy 2-core
    machine). Elementwise results do not depend on the thread count. (Not at import: most test
    processes need torch, but the ones that do not should not pay for importing it.)"""
    if len(sys.modules) > _FROZEN[0] + 100:  # a test imported a library (dynamo, flax, ...)
        _freeze_modules()
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads") and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = BACKENDS[request.param]()
    with contextlib.ExitStack() as stack:
        if b.name in ("jax-float64", "jax-jit-float64"):
            # JAX makes float64 arrays only under x64; float32 runs under JAX's default config,
            # as its users run it
            stack.enter_context(pytest.importorskip("jax").enable_x64(True))
        yield b


@pytest.fixture(scope="module")
def jx() -> Iterator[Any]:
    """JAX with x64 on, for a module's peers under jit (optax at 1e-12)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    with jax.enable_x64(True):
        yield jax

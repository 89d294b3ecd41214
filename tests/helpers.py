"""Helpers shared by the test files: ``from helpers import ...``.

The tests run under ``--import-mode=importlib``, where a test file can import neither another
test file nor ``conftest`` (which is loaded under a name of pytest's choosing); pyproject's
``pythonpath = ["tests"]`` puts this directory on ``sys.path`` so this module can be imported
by name. Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from uniopt.fast import cpu

# --- which path a step takes ----------------------------------------------------------------------

# In the test suite (conftest: COMPILE_AFTER = None) a step over at least cpu.MIN_LEAVES leaves
# (or cpu.MIN_SIZE elements) runs the compiled CPU loop, a smaller one the reference path: a
# "wide" tree adds this many small leaves to take the first.
WIDE_LEAVES = 40
assert WIDE_LEAVES >= 16


@contextlib.contextmanager
def expect_compiled(steps: int) -> Iterator[None]:
    """Assert that the compiled loop ran exactly ``steps`` steps inside the block: 0 says that
    every step there took the reference path. (It counts whole steps in this process, from
    :data:`uniopt.fast.cpu.STEPS`; a step it declined, with or without a warning, is not one.)"""
    before = cpu.STEPS
    yield
    ran = cpu.STEPS - before
    assert ran == steps, f"the compiled loop ran {ran} steps here, expected {steps}"


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Run the block with the compiled loop switched off: every step takes the reference path,
    the ground truth the compiled loop is held to."""
    saved = cpu.AVAILABLE
    cpu.AVAILABLE = False
    try:
        yield
    finally:
        cpu.AVAILABLE = saved


def beside_reference(
    state: uo.State, params: Any, ref_state: uo.State, ref: Any, steps: int,
    grads: Callable[[int], Any], ref_grads: Callable[[Any], Any] = lambda g: g,
    after_reference: Callable[[uo.State, Any], None] = lambda s, r: None, pure: bool = True,
) -> tuple[uo.State, Any, uo.State]:
    """``steps`` steps on the compiled loop, pure and in place in turn (each one asserted to be
    the loop's, none declined with a warning), and beside each the same step in place on the
    reference path on ``ref`` (with ``ref_grads`` of the gradients, then ``after_reference``).
    Returns the compiled run's state and params, and the reference run's state.

    ``pure=False``: every step in place (the pure loop is another loop to compile, and its text
    differs from the in-place one's only in where it writes, alike for every rule)."""
    import warnings

    from uniopt.fast import FastPathUnavailable

    with warnings.catch_warnings(), expect_compiled(steps):
        warnings.simplefilter("error", FastPathUnavailable)
        for k in range(steps):
            g = grads(k)
            if k % 2 or not pure:
                state = uo.update_(state, params, g)
            else:
                state, params = uo.update(state, params, g)
            with reference_path():
                ref_state = uo.update_(ref_state, ref, ref_grads(g))
            after_reference(ref_state, ref)
    return state, params, ref_state


# --- trees, walked by hand (independent of uniopt's own tree code) -------------------------------


def map_tree(f: Callable[[Any], Any], tree: Any) -> Any:
    """``f`` of every leaf of a tree of dicts, lists, tuples, namedtuples and dataclasses, in the
    same structure; ``None`` stays ``None``. Dicts are walked in insertion order."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: map_tree(f, v) for k, v in tree.items()}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return type(tree)(
            **{x.name: map_tree(f, getattr(tree, x.name)) for x in dataclasses.fields(tree)}
        )
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tree(f, v) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(map_tree(f, v) for v in tree)
    return f(tree)


def copy_tree(tree: Any) -> Any:
    """A copy of a tree of NumPy arrays (new arrays, same values)."""
    return map_tree(lambda x: np.array(x, copy=True), tree)


def grads_like(rng: np.random.Generator, params: Any) -> Any:
    """A random gradient tree shaped like ``params``: standard normal, in each leaf's dtype."""
    return map_tree(lambda x: rng.normal(size=x.shape).astype(x.dtype), params)


def counting_jit(**jit_options: Any) -> tuple[Callable[..., Any], list[int]]:
    """``jax.jit(uo.update)`` and the list it appends to each time it traces (compiles)."""
    import jax

    traces: list[int] = []

    def step(state: uo.State, params: Any, grads: Any) -> Any:
        traces.append(1)
        return uo.update(state, params, grads)

    return jax.jit(step, **jit_options), traces


@contextlib.contextmanager
def compilations(name: str = "step") -> Iterator[list[str]]:
    """The XLA compilations of ``jax.jit`` functions named ``name`` in the context, from JAX's
    compile log: a step that traces once still compiles again where its second call's
    arguments are placed or typed otherwise than its first's (committed to a device, weakly
    typed, NumPy), which counting traces does not see."""
    import jax

    found: list[str] = []

    class Log(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(f"Compiling jit({name})"):
                found.append(record.getMessage())

    logger, handler = logging.getLogger("jax"), Log(logging.WARNING)
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield found
    finally:
        logger.removeHandler(handler)


def jitted_optax_step(tx: Any) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """``step(params, state, grads) -> (params, state)``: one step of the optax transformation
    ``tx``, its updates applied with ``optax.apply_updates``, under ``jax.jit``."""
    import jax
    import optax

    @jax.jit
    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


# --- comparisons --------------------------------------------------------------------------------


def rel_diff(a: Any, b: Any) -> float:
    """The largest difference of arrays ``a`` and ``b``, exact (in float64), relative to the
    largest magnitude in ``b`` or 1 where that is smaller: rounding errors are a few ulps of the
    operands, which share the array's scale, and absolute below 1."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(np.max(np.abs(a - b), initial=0.0))
    return diff / max(1.0, float(np.max(np.abs(b), initial=0.0)))


def scaled_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two runs' values of one tensor, stacked over steps (axis 0): after each step, the
    largest ``|a - b|`` over the tensor divided by the largest ``|b|`` reached so far. Rounding
    errors are a few ulps of the operands, which share the tensor's scale; an elementwise
    relative error would report cancellation in a small value as disagreement. A tensor that
    has been exactly 0 so far must match exactly. Complex values are compared by modulus."""
    n = len(a)
    wide = np.result_type(a.dtype, b.dtype, np.float64)
    a, b = a.astype(wide), b.astype(wide)
    diff = np.abs(a - b).reshape(n, -1).max(axis=1, initial=0.0)
    scale = np.maximum.accumulate(np.abs(b).reshape(n, -1).max(axis=1, initial=0.0))
    zero = np.where(diff > 0, np.inf, 0.0)
    return np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), zero)


def _bits(x: Any) -> np.ndarray:
    a = np.asarray(x.detach() if hasattr(x, "detach") else x)
    return np.ascontiguousarray(a).reshape(-1).view(f"u{a.dtype.itemsize}")


def assert_same(xs: list[Any], ys: list[Any]) -> None:
    """Two lists of arrays (NumPy or CPU tensors) with the same dtypes, shapes and bits (so
    -0.0 is not 0.0, and a NaN must be the same NaN)."""
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert x.dtype == y.dtype, i
        assert tuple(x.shape) == tuple(y.shape), i
        assert np.array_equal(_bits(x), _bits(y)), f"leaf {i} differs: {x} != {y}"


def assert_same_state(s1: uo.State, s2: uo.State) -> None:
    """The same step count and slots, every slot bit for bit (:func:`assert_same`)."""
    assert s1.step == s2.step
    assert sorted(s1.slots) == sorted(s2.slots)
    for k in s1.slots:
        assert_same(s1.slots[k], s2.slots[k])


def keras_on_jax() -> Any:
    """keras 3 on its JAX backend, or the test skipped: keras reads its backend once, at its
    first import, so the variable is set only for that import (and put back after it)."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    saved = os.environ.get("KERAS_BACKEND")
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "jax"
    try:
        import keras
    finally:
        if saved is None:
            os.environ.pop("KERAS_BACKEND", None)
        else:
            os.environ["KERAS_BACKEND"] = saved
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend")
    return keras

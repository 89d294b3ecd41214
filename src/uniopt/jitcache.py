"""Machine code numba compiled in an earlier process, loaded without numba's start-up.

Before numba loads a function's machine code from its cache, it imports the implementations of
everything it can compile (its target context's ``refresh``): about 150 modules, and
``scipy.linalg`` where SciPy is installed (numba looks for a BLAS). Loading uses none of them;
compiling does. On the 2-core machine of docs/speed.md that import was 0.24-0.31 s, or
0.42-0.46 s with SciPy, of a process's first step of 0.32-0.5 s with every loop cached.
uniopt's compiled functions load through :func:`cache_of` instead, which initialises only
numba's runtime (loaded code links to its functions) first. A function not in the cache is
compiled as numba compiles, importing them then.

A ufunc (:func:`vectorize`: the NumPy reference path's fused multiply-add) is loaded so too,
but numba builds its wrapper anew, in LLVM, at every load: that takes numba's lowering of
constants, installed first. numba is imported only when a function is made. Where a numba
release no longer has what this relies on (:func:`_quick_class` says what), its own cache is
used, as before."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


@functools.cache
def _quick_class() -> Any:
    """numba's function cache, loading without ``refresh``; None where this numba lacks the
    parts it is made of."""
    try:
        from numba.core.caching import FunctionCache
        from numba.core.runtime import rtsys
    except ImportError:
        return None
    if not all(hasattr(FunctionCache, name) for name in (
            "load_overload", "_load_overload", "_guard_against_spurious_io_errors")):
        return None

    class QuickCache(FunctionCache):
        def load_overload(self, sig: Any, target_context: Any) -> Any:
            rtsys.initialize(target_context)  # (once per process)
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)
            return None  # an I/O error, which the guard swallowed: compiled anew

    return QuickCache


def cache_of(py_func: Callable[..., Any]) -> Any:
    """The cache of ``py_func``'s machine code, as numba's ``enable_caching`` makes it, but
    loading without numba's start-up where it can."""
    from numba.core.caching import FunctionCache

    return (_quick_class() or FunctionCache)(py_func)


def quick(dispatcher: Any) -> Any:
    """``dispatcher`` (``numba.njit(cache=True)``'s), loading from its cache by
    :func:`cache_of`; one without a cache is left as it is."""
    from numba.core.caching import FunctionCache

    if type(getattr(dispatcher, "_cache", None)) is FunctionCache:
        dispatcher._cache = cache_of(dispatcher.py_func)
    return dispatcher


def cfunc(sig: Any, cache: bool = False, **options: Any) -> Callable[[Any], Any]:
    """``numba.cfunc(sig, cache=cache, **options)``, loading from its cache by
    :func:`cache_of`. (numba's decorator compiles, or loads, at once: the cache is set before
    that, as its own ``enable_caching`` sets it.)"""
    import numba

    if not cache:
        return numba.cfunc(sig, **options)
    from numba.core import sigutils
    from numba.core.ccallback import CFunc

    def make(fn: Callable[..., Any]) -> Any:
        res = CFunc(fn, sigutils.normalize_signature(sig), locals={}, options=options)
        res._cache = cache_of(fn)  # type: ignore[attr-defined]
        res.compile()
        return res

    return make



def vectorize(sigs: list[str], fn: Callable[..., Any]) -> Any:
    """``numba.vectorize(sigs, cache=True)(fn)`` (a ufunc of these signatures only), loading
    from its cache by :func:`cache_of`."""
    import numba

    try:
        return _quick_ufunc(sigs, fn)
    except Exception:  # (a numba whose wrapper needs more, or renamed what this uses)
        return numba.vectorize(sigs, cache=True)(fn)


def _quick_ufunc(sigs: list[str], fn: Callable[..., Any]) -> Any:
    if _quick_class() is None:
        raise LookupError("numba's own cache")
    import numba.cpython.numbers  # noqa: F401  (registers the lowering of int and float constants)
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.imputils import builtin_registry
    from numba.core.registry import cpu_target
    from numba.np.ufunc.dufunc import DUFunc

    with global_compiler_lock:  # (as numba's refresh installs registries: one thread at a time)
        # what the wrapper's code generation lowers (its loop's integer constants); a later
        # refresh installs the rest of the registry beside these
        cpu_target.target_context.install_registry(builtin_registry)
        ufunc = DUFunc(fn, cache=True)
        ufunc._dispatcher.cache = cache_of(fn)  # type: ignore[attr-defined]
        for sig in sigs:
            ufunc.add(sig)
        ufunc.disable_compile()
    return ufunc

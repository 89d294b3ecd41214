"""Machine code numba compiled in an earlier process, loaded without numba's start-up.

Before numba loads a function's machine code from its cache, it imports the implementations of
everything it can compile (its target context's ``refresh``): about 150 modules, and
``scipy.linalg`` where SciPy is installed (numba looks for a BLAS). Loading uses none of them;
compiling does. On the 2-core machine of docs/speed.md that import was 0.24-0.31 s, or
0.42-0.46 s with SciPy, of a process's first step of 0.32-0.5 s with every loop cached.
uniopt's compiled functions that Python calls (the loops, their drivers and check) load
through :func:`cache_of` instead, which initialises only numba's runtime (loaded code links to
its functions) first. A function not in the cache is compiled as numba compiles, importing
them then; the jitted helpers the drivers call are compiled into them. numba is imported only
when a function is made.

Not for ufuncs (``numba.vectorize``, the NumPy reference path's fused multiply-add): numba
builds a ufunc's wrapper anew whenever it loads one, and that building needs some of the
implementations. Installing those few first would put numba's registries out of the order its
start-up installs them in, and where two implement one signature the later wins: ``pow`` of
two floats was then lowered by ``mathimpl.pow_impl`` instead of ``numbers.real_power_impl``
in every later compile of the process. Loading without the start-up leaves numba's lowering
as its start-up makes it (the tests compare every function's implementation with a process
that ran it first). Where a numba release no longer has what this relies on
(:func:`_quick_class` says what), its own cache is used, as before. A ufunc (:func:`ufunc`)
loads after numba's start-up, its files read and written as the loops' are:

A cache file that cannot be read (truncated, or garbage) is a miss: numba compiles the function
and saves over it. One that cannot be written (a full disk) leaves the function uncached, with a
warning (:func:`uncached`)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@functools.cache
def _tolerant_class() -> Any:
    """numba's function cache, a damaged file a miss and one that cannot be written a warning;
    None where this numba lacks the parts it is made of."""
    try:
        from numba.core.caching import FunctionCache, IndexDataCacheFile
    except ImportError:
        return None
    if not hasattr(FunctionCache, "save_overload") or not all(
            hasattr(IndexDataCacheFile, name) for name in ("load", "_load_index", "save")):
        return None

    class Files(IndexDataCacheFile):
        # unpickling a damaged file raises any of several errors (UnpicklingError, EOFError,
        # ValueError...): a miss, which numba compiles and saves over (its save reads the index
        # first: that too)
        def _load_index(self) -> Any:
            try:
                return super()._load_index()
            except Exception:
                return {}

        def load(self, key: Any) -> Any:
            try:
                return super().load(key)
            except Exception:
                return None

        def save(self, key: Any, data: Any) -> None:
            # numba's save reads the index, takes the first free file name and writes both:
            # two processes saving at once (two kinds of CPU sharing a cache directory) both
            # took the same name, and one's index entry then pointed at the other's machine
            # code (AVX-512 code under a generic CPU's key)
            with locked(Path(self._index_path + ".lock")):
                super().save(key, data)

    class TolerantCache(FunctionCache):
        hint = "$UNIOPT_CACHE_DIR sets where uniopt caches its loops."

        def __init__(self, py_func: Any) -> None:
            super().__init__(py_func)
            self._cache_file.__class__ = Files  # (made by numba's constructor)

        def save_overload(self, sig: Any, data: Any) -> None:
            try:
                super().save_overload(sig, data)
            except OSError as e:  # a full disk, say: the compiled code runs all the same
                uncached(self._cache_path, e, self.hint)

    return TolerantCache


@functools.cache
def _quick_class() -> Any:
    """:func:`_tolerant_class`'s cache, loading without ``refresh``; None where this numba lacks
    the parts it is made of."""
    tolerant = _tolerant_class()
    try:
        from numba.core.runtime import rtsys
    except ImportError:
        return None
    if tolerant is None or not all(hasattr(tolerant, name) for name in (
            "load_overload", "_load_overload", "_guard_against_spurious_io_errors")):
        return None

    class QuickCache(tolerant):  # type: ignore[misc,valid-type]
        def load_overload(self, sig: Any, target_context: Any) -> Any:
            rtsys.initialize(target_context)  # (once per process)
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)
            return None  # an I/O error, which the guard swallowed: compiled anew

    return QuickCache


def ufunc(py_func: Callable[..., Any], signatures: list[str]) -> Any:
    """NumPy's ufunc of ``py_func`` compiled for ``signatures``, as ``numba.vectorize(signatures,
    cache=True)`` makes it (loading after numba's start-up: see above), but a damaged cache file
    a miss (:func:`_tolerant_class`). Where numba has no place to cache it, compiled in this
    process, with :func:`uncached`'s warning."""
    import numba
    from numba.np.ufunc.ufuncbuilder import UFuncBuilder

    hint = "$NUMBA_CACHE_DIR sets where numba caches it."
    made = _tolerant_class()
    if made is None:  # (numba's own cache, as numba.vectorize makes it)
        try:
            return numba.vectorize(signatures, cache=True)(py_func).ufunc
        except RuntimeError as e:
            uncached("numba's cache directories", e, hint)
            return numba.vectorize(signatures)(py_func).ufunc
    builder = UFuncBuilder(py_func)
    try:
        builder.nb_func.cache = made(py_func)  # (what numba's enable_caching sets)
        builder.nb_func.cache.hint = hint
    except RuntimeError as e:  # no place numba caches it in: compiled in this process
        # (numba builds a ufunc's cache itself, not in uniopt's directory: its own places)
        uncached("numba's cache directories", e, hint)
    for sig in signatures:
        builder.add(sig)
    return builder.build_ufunc()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on file ``path`` across processes (released by the system if its
    holder dies); where there is no ``fcntl`` (Windows) or the file cannot be opened, none."""
    try:
        import fcntl

        fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        fd = None
    try:
        if fd is not None:
            LOCK_FDS.add(fd)
            # a file system without locks (some network ones) raises: compile unlocked
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            LOCK_FDS.discard(fd)
            os.close(fd)  # closing releases the lock


# The descriptors of the locks held now. A lock is the open file's, which a fork shares with
# the child: a process forked while another thread compiled held that loop's lock until it
# exited, and any process then compiling or loading the loop waited for it (a child stepping
# the rule itself, for ever). A forked child closes them (uniopt.fast.cpu's ``_forked``); the
# parent's close then releases the lock.
LOCK_FDS: set[int] = set()


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def callers_level(*also: str) -> int:
    """The ``stacklevel`` of the first frame outside uniopt (and outside the directories
    ``also``: torch.optim's, whose ``__init__`` adds a uniopt optimizer's groups), for a warning
    raised by the function that calls this: the user's line, however deep the engine's call
    (a pure update's is deeper than an in-place one's, whose fixed level named engine.py)."""
    skip = (_PACKAGE + os.sep, *also)
    frame: Any = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
        # (importlib's frames, an import's, warnings passes over without counting them)
        while frame is not None and "importlib" in frame.f_code.co_filename and (
                "_bootstrap" in frame.f_code.co_filename):
            frame = frame.f_back
        level += 1
    return level


_warned: set[str] = set()


def uncached(where: Any, why: Any,
             hint: str = "$UNIOPT_CACHE_DIR sets where uniopt caches its loops.") -> None:
    """Warn, once per process (and ``hint``: how to give it a place, uniopt's or numba's), that
    compiled code could not be cached in ``where`` (``why``): it runs, but every process
    compiles it anew."""
    if hint not in _warned:
        _warned.add(hint)
        warnings.warn(f"uniopt: compiled code is not cached in {where} ({why}); it runs, but "
                      f"every process compiles it anew. {hint}", RuntimeWarning,
                      # (the user's line: an import's, or a step's, past numba's frames, which
                      # save what it compiled)
                      stacklevel=callers_level(_numba_dir()))


def _numba_dir() -> str:
    import numba

    return os.path.dirname(os.path.abspath(numba.__file__)) + os.sep


def root() -> str:
    """uniopt's cache directory: ``$UNIOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/uniopt`` or
    ``~/.cache/uniopt`` (a ``~`` in either is the home directory, as a shell would read it; a
    relative ``$XDG_CACHE_HOME`` is ignored, as the XDG specification says)."""
    given = os.environ.get("UNIOPT_CACHE_DIR")
    if given:
        return os.path.expanduser(given)
    xdg = os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "")
    return os.path.join(xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache"), "uniopt")


def _in_root(cache_class: Any) -> Any:
    """``cache_class`` keeping machine code in :func:`root`'s ``numba`` directory, for a
    function none of numba's own places can take; None where this numba's caching is not made
    as this expects (the locator of ``$NUMBA_CACHE_DIR``, a source file's, by its name)."""
    from numba.core import caching

    try:
        impl = cache_class._impl_class
        base = getattr(caching, "UserProvidedCacheLocator", None) or (
            caching._UserProvidedCacheLocator)  # type: ignore[attr-defined]  # (numba 0.62)

        class InRoot(base):  # type: ignore[misc,valid-type]
            def __init__(self, py_func: Any, py_file: str) -> None:
                self._py_file = py_file
                self._lineno = py_func.__code__.co_firstlineno
                self._cache_path = os.path.join(root(), "numba",
                                                self.get_suitable_cache_subpath(py_file))

            @classmethod
            def from_function(cls, py_func: Any, py_file: str) -> Any:
                # (the source file's locator's: the directory made and written to, else None;
                # not numba's own check that $NUMBA_CACHE_DIR is set)
                return super(base, cls).from_function(py_func, py_file)

        class Impl(impl):  # type: ignore[misc,valid-type]
            _locator_classes = [InRoot]

        return type(cache_class.__name__, (cache_class,), {"_impl_class": Impl})
    except (AttributeError, IndexError, TypeError):
        return None


def cache_of(py_func: Callable[..., Any]) -> Any:
    """The cache of ``py_func``'s machine code, as numba's ``enable_caching`` makes it, but
    loading without numba's start-up where it can. Where none of numba's places can be written
    (a package installed read-only, run without a writable home: numba's own decorator raised
    as the module was imported), in :func:`root`; where that cannot be written either, none
    (compiled in each process, with :func:`uncached`'s warning)."""
    from numba.core.caching import FunctionCache, NullCache

    made = _quick_class() or FunctionCache
    try:
        return made(py_func)
    except RuntimeError as e:  # numba's "no locator available"
        why: Any = e
    fallback = _in_root(made)
    if fallback is not None:
        try:
            return fallback(py_func)
        except RuntimeError as e:
            why = e
    uncached(os.path.join(root(), "numba"), why)
    return NullCache()


def njit(**options: Any) -> Callable[[Any], Any]:
    """``numba.njit(cache=True, **options)``, its cache :func:`cache_of`'s (numba's decorator,
    given ``cache=True``, makes its own cache as it is applied, and raises where it has no place
    for it: the import of the module that holds the function)."""
    import numba

    def make(fn: Callable[..., Any]) -> Any:
        dispatcher = numba.njit(**options)(fn)
        dispatcher._cache = cache_of(fn)  # (what numba's enable_caching sets)
        return dispatcher

    return make


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

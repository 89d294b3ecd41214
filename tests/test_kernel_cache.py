"""The compiled loops' cache on disk, and the thread pool, under threads, fork(), a full disk and
damaged files: each step runs, and gives the one-thread loop's bits."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import signal
import subprocess
import sys
import threading
import warnings
from typing import Any

import pytest
from numba.extending import intrinsic

from uniopt import jitcache, moments
from uniopt.fast import cpu

# a generated module as _imported takes them: one C function, cached as the loops are
_SRC = """
from uniopt.jitcache import cfunc


@cfunc("float64(float64)", cache=CACHE)
def walk(x):
    return x + 1.0
"""


def _imported(path: pathlib.Path) -> Any:
    try:
        return cpu._imported(_SRC, path).walk
    finally:
        sys.modules.pop(path.stem, None)


def _run(script: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by a Python process of its own session, and any child it forks killed
    with it where it runs past ``timeout`` (a hung pool)."""
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out\n{out}\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_threads_meeting_a_new_loop_write_its_file_each_under_a_name_of_its_own(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Two threads of one process (members of a population) write a loop new to the cache at
    once, where the file system has no locks (a lock makes them write in turn): neither's file
    is taken by the other's rename."""
    both = threading.Barrier(2, timeout=30)
    monkeypatch.setattr(cpu, "_locked", lambda path: contextlib.nullcontext())
    replace = os.replace

    def together(src: Any, dst: Any) -> None:
        if str(dst).endswith(".py"):  # (not numba's files)
            both.wait()  # each has written its file before either renames
        replace(src, dst)

    monkeypatch.setattr(os, "replace", together)
    path = tmp_path / "uniopt_test_threads.py"
    results: list[Any] = []

    def member() -> None:
        try:
            results.append(cpu._imported(_SRC, path).walk.ctypes(1.0))
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=member) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.modules.pop(path.stem, None)
    assert results == [2.0, 2.0]
    assert not list(tmp_path.glob("*.tmp"))


@intrinsic
def _doubled(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fadd(args[0], args[0])

    return x(x), codegen


def _doubling(xp: Any, c: Any, p: Any, g: Any) -> Any:
    return (_doubled(g),)


def test_the_cache_key_holds_the_intrinsics_the_loop_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An intrinsic's code generation is the loop's arithmetic: its source is in the key, where
    a kernel calls it and where the compiled moment helpers do (fma and lerp call
    fused_multiply_add)."""
    assert _doubled._defn in cpu._callees(_doubling, {})
    kernels = ((moments.lerp, 0, None),)
    key = cpu._digest(kernels, ())
    real = cpu.inspect.getsource

    def edited(obj: Any) -> str:
        return real(obj) + ("# edited\n" if obj is moments.fused_multiply_add._defn else "")

    monkeypatch.setattr(cpu.inspect, "getsource", edited)
    assert cpu._digest(kernels, ()) != key


# a step of the thread pool's size, its bits (the fork tests' children step it again)
_BITS = """
import hashlib, os
import numpy as np
import uniopt as uo
from uniopt.fast import cpu

def bits():
    params = [np.linspace(-1, 1, cpu.PARALLEL_MIN + 4464, dtype=np.float32)]
    state = uo.setup(uo.adamw(lr=1e-2), params)
    for _ in range(3):
        state = uo.update_(state, params, [np.cos(params[0])])
    return hashlib.sha1(params[0].tobytes()).hexdigest()
"""

_AFTER_THE_POOL = _BITS + """
mine = bits()  # on the pool
pid = os.fork()
if pid == 0:
    steps = cpu.STEPS
    os._exit(0 if bits() == mine and cpu.STEPS == steps + 3 else 3)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_child_forked_after_the_pool_steps_on_one_thread_to_the_same_bits() -> None:
    """fork() after a step on the thread pool (GNU OpenMP's does not survive it: the child was
    killed when it entered it, or a fork Pool's workers hung): the child's compiled steps run
    on one thread, to the parent's bits."""
    proc = _run(_AFTER_THE_POOL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0"], proc.stderr[-3000:]


_AFTER_TORCHS_THREADS = """
import torch

torch.set_num_threads(2)
a = torch.ones(400, 400)
(a @ a).sum()  # torch's OpenMP threads started; uniopt's pool never
""" + _BITS + """
pid = os.fork()
if pid == 0:
    os._exit(0 if bits() == MINE else 3)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_child_forked_after_torchs_threads_steps_on_one_thread() -> None:
    """fork() where the parent ran torch's OpenMP threads and never uniopt's pool (a
    DataLoader's workers after a forward pass): the child entered numba's pool and hung where
    torch.optim's step returns. A forked child's compiled steps run on one thread, to the bits
    the parent's pool gives."""
    pytest.importorskip("torch")
    mine = _run(_BITS + "print(bits())\n")
    assert mine.returncode == 0, mine.stderr[-3000:]
    proc = _run(_AFTER_TORCHS_THREADS.replace("MINE", repr(mine.stdout.split()[-1])),
                timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0"], proc.stderr[-3000:]


_TWO_THREADS = """
import hashlib, threading
import numpy as np
import uniopt as uo

def member(k, out):
    params = [np.linspace(-1, 1, 1 << 20, dtype=np.float32)]
    state = uo.setup(uo.adamw(lr=1e-3 * (k + 1)), params)
    for _ in range(30):
        state = uo.update_(state, params, [np.cos(params[0])])
    out[k] = hashlib.sha1(params[0].tobytes()).hexdigest()

alone, together = {}, {}
for k in range(2):  # (compiled here, on one thread)
    member(k, alone)
threads = [threading.Thread(target=member, args=(k, together)) for k in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(together == alone)
"""


def test_two_threads_stepping_on_the_pool_take_it_in_turn() -> None:
    """Two Python threads each stepping on the pool at once (its call releases the GIL): numba's
    workqueue threading layer, which takes one caller at a time, aborted the process."""
    proc = _run(_TWO_THREADS, NUMBA_THREADING_LAYER="workqueue")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True"]


def _no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# numba's own places for machine code all refused, as in a package installed read-only and run
# without a writable home (numba's decorator raised "no locator available" as uniopt imported)
_NOWHERE = """
import os, sys, warnings
# (no warning where $UNIOPT_CACHE_DIR takes the code; else each shown)
warnings.simplefilter("error" if len(sys.argv) < 2 else "always")
import numba.core.caching as caching

class Nowhere:
    @classmethod
    def from_function(cls, py_func, py_file):
        return None

caching.CompileResultCacheImpl._locator_classes = [Nowhere]
import numpy as np
import uniopt as uo
from uniopt.fast import cpu
cpu.COMPILE_AFTER = 0
params = [np.linspace(-1, 1, 100, dtype=np.float32)]
state = uo.setup(uo.adam(lr=0.1), params)
for _ in range(3):
    state = uo.update_(state, params, [np.cos(params[0])])
print(params[0].tobytes().hex()[:16], cpu._check.stats.cache_hits.get(cpu._check.signatures[0], 0))
if len(sys.argv) > 1:  # a reference-path step: NumPy's fused multiply-add, numba's ufunc
    cpu.COMPILE_AFTER = None
    small = [np.ones(3)]
    uo.update_(uo.setup(uo.sgd(lr=0.1, momentum=0.9), small), small, [np.ones(3)])
"""


def test_numbas_places_refused_keep_the_drivers_machine_code_in_the_cache_dir(
        tmp_path: pathlib.Path) -> None:
    """Where none of numba's places for machine code can be written (importing uniopt raised
    RuntimeError: no locator available), the compiled drivers are cached in
    ``$UNIOPT_CACHE_DIR/numba``, and the next process loads them; where that cannot be written
    either, they are compiled in each process, with one warning naming the directory."""
    def run(cache: pathlib.Path, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "UNIOPT_CACHE_DIR": str(cache)}
        return subprocess.run([sys.executable, "-c", _NOWHERE, *argv], env=env,
                              capture_output=True, text=True, timeout=600)

    first, second = run(tmp_path / "c"), run(tmp_path / "c")
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    assert first.stdout.split()[1] == "0" and second.stdout.split()[1] == "1"  # loaded
    assert first.stdout.split()[0] == second.stdout.split()[0]
    assert any((tmp_path / "c" / "numba").rglob("*.nbi"))
    (tmp_path / "file").write_text("")  # (a file: no directory can be made under it)
    uncached = run(tmp_path / "file", "warnings shown")
    assert uncached.returncode == 0, uncached.stderr
    assert uncached.stdout.split() == [first.stdout.split()[0], "0"]
    said = f"RuntimeWarning: uniopt: compiled code is not cached in {tmp_path / 'file'}"
    assert uncached.stderr.count(said) == 1, uncached.stderr
    # (the ufunc, which numba caches itself, says how to give numba a place)
    assert uncached.stderr.count("not cached in numba's cache directories") == 1
    assert "$NUMBA_CACHE_DIR sets where numba caches it." in uncached.stderr
    # (the user's line: the import, not uniopt's)
    line = _NOWHERE.splitlines().index("import uniopt as uo") + 1
    assert uncached.stderr.startswith(f"<string>:{line}: RuntimeWarning"), uncached.stderr


def test_a_full_disk_runs_the_loop_uncached_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Where the generated module, or numba's machine code, cannot be written: the loop runs
    compiled in memory, one warning names the directory, and no temporary file is left."""
    from numba.core.caching import IndexDataCacheFile

    monkeypatch.setattr(jitcache, "_warned", set())
    open_ = pathlib.Path.open

    def full(self: pathlib.Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            open_(self, mode).close()  # made, and then the disk is full
            _no_space()
        return open_(self, mode, *args, **kwargs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monkeypatch.context() as m:
            m.setattr(pathlib.Path, "open", full)
            assert _imported(tmp_path / "uniopt_test_full_py.py").ctypes(1.0) == 2.0
        with monkeypatch.context() as m:
            m.setattr(IndexDataCacheFile, "_dump", _no_space)
            walk = _imported(tmp_path / "uniopt_test_full_nb.py")
            assert walk.ctypes(1.0) == 2.0 and walk.cache_hits == 0
    (message,) = [str(w.message) for w in caught if str(w.message).startswith("uniopt:")]
    assert f"not cached in {tmp_path} (" in message and "$UNIOPT_CACHE_DIR" in message
    assert os.strerror(errno.ENOSPC) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # (the lock is made before the text)
        "__pycache__", "uniopt_test_full_nb.lock", "uniopt_test_full_nb.py",
        "uniopt_test_full_py.lock"]
    assert not [p for p in (tmp_path / "__pycache__").iterdir() if "tmp" in p.name]


def _truncated(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGE = {
    "py-truncated": ("uniopt_test_damaged.py", _truncated),
    "py-empty": ("uniopt_test_damaged.py", lambda p: p.write_bytes(b"")),
    "nbi-garbage": ("__pycache__/*.nbi", lambda p: p.write_bytes(os.urandom(500))),
    "nbi-empty": ("__pycache__/*.nbi", lambda p: p.write_bytes(b"")),
    "nbc-truncated": ("__pycache__/*.nbc", _truncated),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_file_is_compiled_anew_and_saved_over(
        damage: str, tmp_path: pathlib.Path) -> None:
    """A cache file cut short or overwritten (a process killed mid-write on a file system
    without atomic renames, a disk error) is a miss, compiled and saved over: the next import
    loads it again, where every later one failed."""
    path = tmp_path / "uniopt_test_damaged.py"
    assert _imported(path).cache_hits == 0
    assert _imported(path).cache_hits == 1
    pattern, spoil = DAMAGE[damage]
    (target,) = tmp_path.glob(pattern)
    spoil(target)
    assert _imported(path).ctypes(1.0) == 2.0
    assert _imported(path).cache_hits == 1


# a reference-path step, NumPy's fused multiply-add (numba's ufunc, in numba's cache); with
# UFUNC_LOADED set, numba's compiler is taken away: the ufunc must load from the cache
_UFUNC_STEP = """
import os
import numpy as np
import uniopt as uo
from uniopt.fast import cpu
if os.environ.get("UFUNC_LOADED"):
    import numba.core.compiler
    def compile_extra(*args, **kwargs):
        raise AssertionError("compiled")
    numba.core.compiler.compile_extra = compile_extra
cpu.COMPILE_AFTER = None
p = [np.array([1.0, 0.5, -2.0], np.float32)]
uo.update_(uo.setup(uo.adam(lr=0.1), p), p, [np.array([1.0, -3.0, 0.25], np.float32)])
print(p[0].tobytes().hex())
"""


@pytest.mark.parametrize("damage", ["nbi-garbage", "nbi-empty", "nbc-garbage"])
def test_a_damaged_cache_file_of_the_ufunc_is_compiled_anew_and_saved_over(
        damage: str, tmp_path: pathlib.Path) -> None:
    """The fused multiply-add's ufunc, which numba caches in its own places: a damaged file is a
    miss, compiled and saved over, and the next process loads it; every step raised (EOFError,
    UnpicklingError), in every later process."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba"), "UNIOPT_CACHE_DIR": str(tmp_path / "u")}
    want = "6766663f9a99193f666606c0"  # (torch.optim.Adam's, foreach=False: 0.90000004, ...)
    first = _run(_UFUNC_STEP, **env)
    assert first.returncode == 0 and first.stdout.split() == [want], first.stderr[-3000:]
    kind, how = damage.split("-")
    targets = list((tmp_path / "numba").rglob(f"*_fma_ufunc*.{kind}"))
    assert len(targets) == {"nbi": 1, "nbc": 2}[kind]  # (an index, and each signature's code)
    for target in targets:
        target.write_bytes(os.urandom(500) if how == "garbage" else b"")
    again = _run(_UFUNC_STEP, **env)
    assert again.returncode == 0 and again.stdout.split() == [want], again.stderr[-3000:]
    loaded = _run(_UFUNC_STEP, UFUNC_LOADED="1", **env)
    assert loaded.returncode == 0 and loaded.stdout.split() == [want], loaded.stderr[-3000:]


def test_a_cache_directory_that_cannot_be_written_is_named_in_a_warning(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """A read-only cache (a shared mount): every process compiles anew, and is told why."""
    monkeypatch.setattr(jitcache, "_warned", set())
    monkeypatch.setenv("UNIOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu.os, "access", lambda path, mode: False)  # (root writes anything)
    with pytest.warns(RuntimeWarning, match="UNIOPT_CACHE_DIR") as caught:
        assert cpu._cache_dir() is None
    assert f"not cached in {tmp_path / 'fused-'}" in str(caught[0].message)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_does_not_keep_a_compile_lock(tmp_path: pathlib.Path) -> None:
    # a lock is its open file's, which fork shares: a child forked while another thread
    # compiled held the loop's lock until it exited, and every process compiling or loading
    # that loop waited for it
    import fcntl
    import time

    path = tmp_path / "loop.lock"
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cpu._locked(path):
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (fork with threads, 3.12)
        pid = os.fork()
    if pid == 0:  # the child: holds nothing of uniopt's, lives on a while
        time.sleep(20)
        os._exit(0)
    try:
        release.set()
        holder.join(30)
        fd = os.open(path, os.O_RDWR)
        try:
            # (the child closes its copy as it starts, which may come later than this: a few
            # seconds' grace, where a child holding the lock holds it 20 s)
            deadline = time.monotonic() + 8
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the forked child holds the lock"
                    time.sleep(0.05)
        finally:
            os.close(fd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


_FULL_HELPERS = """
import errno, os, warnings
from numba.core.caching import IndexDataCacheFile
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
IndexDataCacheFile._dump = full
import numpy as np, uniopt as uo
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    p = [np.ones(200_000, np.float32) for _ in range(2)]
    for rule in (uo.adam(), uo.chain(uo.clip_by_global_norm(1.0), uo.sgd(lr=0.1))):
        state = uo.setup(rule, p)
        state = uo.update_(state, p, [np.ones_like(x) for x in p])
print(int(state.step), sum(str(w.message).startswith("uniopt: compiled code is not cached")
                           for w in caught))
"""


def test_a_full_disk_on_a_fresh_install_steps_uncached(tmp_path: pathlib.Path) -> None:
    # the drivers' callees (the chunk table, the pool's shares, the chunks' sums) were cached
    # by numba itself, whose save raised: the first large step was an OSError
    proc = _run(_FULL_HELPERS, UNIOPT_CACHE_DIR=str(tmp_path / "uniopt"),
                NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "1"]


def test_a_cache_dir_given_with_a_tilde_is_under_home(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: pathlib.Path) -> None:
    """``UNIOPT_CACHE_DIR='~/x'`` (quoted, so no shell expanded it) is the home's x, as
    ``XDG_CACHE_HOME='~/c'`` is; it was a directory named ``~`` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("UNIOPT_CACHE_DIR", "~/x")
    assert jitcache.root() == str(tmp_path / "x")
    monkeypatch.delenv("UNIOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/c")
    assert jitcache.root() == str(tmp_path / "c" / "uniopt")


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: pathlib.Path) -> None:
    """``XDG_CACHE_HOME=cache`` is not a directory under the working directory, which changes
    from run to run: the XDG specification has a relative one ignored, ``~/.cache`` taken."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("UNIOPT_CACHE_DIR", raising=False)
    for relative in ("cache", "./cache", ""):
        monkeypatch.setenv("XDG_CACHE_HOME", relative)
        assert jitcache.root() == str(tmp_path / ".cache" / "uniopt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert jitcache.root() == str(tmp_path / "c" / "uniopt")


def test_a_save_holds_the_index_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba's save reads a function's index, takes the first free data file's name and writes
    both, unlocked: two processes of two CPU kinds saving one function at once into a shared
    cache took the same name, and the generic CPU's index entry held the AVX-512 machine code
    the other wrote. uniopt's saves hold a lock on the index's lock file."""
    import fcntl

    from numba.core.caching import IndexDataCacheFile

    files = cpu._check._cache._cache_file
    seen = []

    def save(self: Any, key: Any, data: Any) -> None:
        fd = os.open(self._index_path + ".lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(key)
        finally:
            os.close(fd)

    monkeypatch.setattr(IndexDataCacheFile, "save", save)
    files.save("key", b"")
    assert seen == ["key"]
    fd = os.open(files._index_path + ".lock", os.O_RDWR)  # let go after it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


_OTHER_CPU = """
import numpy as np, uniopt as uo
from uniopt.fast import cpu, q8
assert not cpu.F16C and not q8.VBMI
few = cpu.MIN_LEAVES
rng = np.random.default_rng(0)
p = {"w": rng.standard_normal(300).astype(np.float16),
     "b": np.array([6e4, -6e4, 1e-7, -3e-8, 0.0, -0.0, np.inf, np.nan], np.float16)}
for rule in (uo.adamw(lr=1e-2),):
    ref, fast = dict(p), dict(p)
    s_ref, s_fast = uo.setup(rule, ref), uo.setup(rule, fast)
    for k in range(3):
        g = {k2: (v * 0.5 + np.float16(k)).astype(np.float16) for k2, v in p.items()}
        cpu.MIN_LEAVES, cpu.COMPILE_AFTER = few, None  # (two leaves: the reference path)
        s_ref, ref = uo.update(s_ref, ref, g)
        cpu.MIN_LEAVES = cpu.MIN_SIZE = cpu.COMPILE_AFTER = 0
        s_fast, fast = uo.update(s_fast, fast, g)
        assert s_fast.step == s_ref.step
    for k2 in p:
        assert fast[k2].view(np.uint16).tobytes() == ref[k2].view(np.uint16).tobytes(), k2
print("ok")
"""


def test_a_cpu_without_f16c_steps_16_bit_leaves_and_one_without_avx_takes_no_vbmi(
        tmp_path: pathlib.Path) -> None:
    """Without F16C (numba's NUMBA_CPU_NAME=generic, as portable images set it) LLVM called
    compiler-rt's half conversions, which numba does not link: 'LLVM ERROR: Symbol not found:
    __extendhfsf2', the process aborted at its first float16 step; now integer arithmetic, the
    same bits (checked against F16C's over every input once). And the 8-bit loops' VBMI IR was
    linked into a target numba had built without AVX (NUMBA_ENABLE_AVX=0), aborting LLVM at
    the first 8-bit step: the CPU's features are now numba's target's, not the host's."""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "UNIOPT_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _OTHER_CPU], env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-2000:]
    env = {**os.environ, "NUMBA_ENABLE_AVX": "0"}
    run = subprocess.run([sys.executable, "-c", "from uniopt.fast import q8; print(q8.VBMI)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr[-2000:]

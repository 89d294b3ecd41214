"""Sharded JAX parameters: a state laid out as its parameters, a jitted step that keeps the
layout, compiles once and gathers nothing, global and per-tensor norms reduced across shards;
and a two-process ``jax.distributed`` group on CPU.

JAX fixes its device count when it is imported (``XLA_FLAGS``), so each scenario runs in a
process of its own (tests/distributed_jax_worker.py), which prints its findings as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax")

WORKER = Path(__file__).with_name("distributed_jax_worker.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    # the worker imports this checkout's uniopt, whatever the caller's path
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)  # (the worker sets its own: XLA's default emitters, see conftest)
    return env


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _worst(got: dict[str, Any], want: dict[str, Any]) -> float:
    assert sorted(got) == sorted(want)
    return max(_rel(got[k], want[k]) for k in got)


@pytest.fixture(scope="module")
def mesh() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(WORKER), "mesh"], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    return out


def test_a_combinators_counters_beside_sharded_params_compile_once(
        mesh: dict[str, Any]) -> None:
    """skip_nonfinite's counters were made uncommitted beside params on the mesh: the donated
    jitted step compiled a second time at its second call."""
    run = mesh["skip"]["mesh"]
    assert (run["traces"], run["compiles"], run["cache"]) == (1, 1, 1)


def test_a_mesh_of_automatic_axes_keeps_one_cache_entry(mesh: dict[str, Any]) -> None:
    """On a mesh made with ``Mesh(...)`` (automatic axes) the state's own replicated arrays
    were set up spelled otherwise than jit hands them back: every rule's second jitted call
    was a second entry in jit's cache, and Adafactor's factors, set up whole, came back laid
    out as their matrix: a second compilation."""
    assert mesh["automatic"] == {**{f"{name}{d}": 1 for name in ("adam", "skip", "clip-adamw",
                                                                 "plateau", "adafactor")
                                    for d in ("", " donated")}, "mechanize eager": True}


@pytest.mark.parametrize("name", ["adamw-clip", "lamb", "lars"])
def test_a_sharded_step_keeps_the_layout_and_compiles_once(mesh: dict[str, Any],
                                                          name: str) -> None:
    """8 host devices, a (4, 2) mesh: the slots are set up with their parameter's sharding, the
    donated jitted step returns parameters and slots so, and compiles once over 100 (20) steps
    and an ``adjust``."""
    run = mesh[name]["mesh"]
    assert all(run["params_sharding_kept"].values()), run["params_sharding_kept"]
    for slot, kept in run["slots_sharding_kept"].items():
        assert all(kept), (slot, kept)
    # set up already laid out (trainables order: b, e, r, s, w)
    for slot, specs in run["slots_at_setup"].items():
        assert [x.replace("PartitionSpec", "P") for x in specs] == [
            "P('model',)", "P('data', None)", "P(None, None)", "P()", "P('data', 'model')"
        ], (slot, specs)
    assert run["donated"], "the donated parameters were copied, not reused"
    assert run["traces"] == 1
    assert run["compiles"] == 1
    assert run["cache"] == 1


@pytest.mark.parametrize("name", ["adamw-clip", "lamb", "lars"])
def test_a_sharded_step_gathers_nothing(mesh: dict[str, Any], name: str) -> None:
    """The compiled step's only collectives are all-reduces of scalars: the global norm's
    partial sums (clip_by_global_norm) or each leaf's norms (LAMB's and LARS's trust ratios);
    no parameter or slot is gathered, scattered or moved."""
    from distributed_jax_worker import scalar_shapes

    found = mesh[name]["mesh"]["collectives"]
    assert found, "the norms of sharded leaves need a reduction across shards"
    for op, shape in found:
        assert op == "all-reduce", (op, shape)
        assert scalar_shapes(shape), shape


def test_sharded_adamw_with_clipping_equals_the_unsharded_run(mesh: dict[str, Any]) -> None:
    """100 jitted steps of ``chain(clip_by_global_norm(1.0), adamw)`` on the mesh (x64) equal
    the same jitted step on one device, and the eager NumPy run, to 1e-12."""
    run = mesh["adamw-clip"]
    assert _worst(run["mesh"]["params"], run["one"]) <= 1e-12
    assert _worst(run["mesh"]["params"], run["numpy"]) <= 1e-12


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_sharded_trust_ratios_equal_the_unsharded_run(mesh: dict[str, Any], name: str) -> None:
    assert _worst(mesh[name]["mesh"]["params"], mesh[name]["numpy"]) <= 1e-12


@pytest.mark.parametrize("name", ["schedule-free", "adafactor"])
def test_state_of_other_shapes_than_sharded_leaves(mesh: dict[str, Any], name: str) -> None:
    """Schedule-free's whole-tree numbers beside a sharded first leaf, and Adafactor's row and
    column factors of sharded matrices, are set up replicated on the mesh; 6 jitted steps keep
    every slot's layout as set up, compile once, and equal the eager NumPy run."""
    assert "error" not in mesh[name], mesh[name]
    run = mesh[name]["mesh"]
    if name == "adafactor":  # w, e, r factored (trainables order b, e, r, s, w)
        for slot in ("row_var", "col_var"):
            specs = run["slots_at_setup"][f"scale_by_factored_rms.{slot}"]
            assert [x.replace("PartitionSpec", "P") for x in specs] == [
                "None", "P(None, None)", "P(None, None)", "None", "P(None, None)"], (slot, specs)
    for slot, kept in run["slots_kept_from_setup"].items():
        assert all(kept), (slot, kept)
    assert all(run["params_sharding_kept"].values()), run["params_sharding_kept"]
    assert (run["traces"], run["compiles"], run["cache"]) == (1, 1, 1)
    assert _worst(run["params"], mesh[name]["numpy"]) <= 1e-12


def test_other_rules_set_up_state_of_other_shapes_replicated(mesh: dict[str, Any]) -> None:
    """Every rule whose slots or whole-tree numbers differ in shape from their (sharded) leaves
    sets up on the mesh, those replicated over it."""
    for name, got in mesh["other-shapes"].items():
        assert isinstance(got, list), (name, got)
        count, replicated = got
        assert count and replicated, (name, got)


@pytest.mark.parametrize("name", ["galore", "kron"])
def test_whole_tree_arrays_of_their_own_shapes_are_replicated(mesh: dict[str, Any],
                                                             name: str) -> None:
    """GaLore's projectors and Kron's factors were made with their leaf's sharding, which does
    not divide their shapes (a raw IndivisibleError at set-up); replicated, 3 jitted steps on
    the mesh are the one-device run's."""
    got = mesh["beside-one-device"][name]
    assert isinstance(got, float), got
    assert got <= 1e-12, got


def test_galore_keeps_the_moments_of_leaves_it_does_not_project_as_their_leaf(
        mesh: dict[str, Any]) -> None:
    """GaLore's Adam moments of a leaf it does not project (a bias split as P('model'), a
    scalar) were set up replicated, like the low-rank moments; they are laid out as their leaf
    at set-up and after 3 jitted steps, as docs/scaling-out.md says of every slot."""
    assert mesh["galore-moments"] == [True] * 8


@pytest.mark.parametrize("name", ["muon", "shampoo", "soap", "sm3", "lbfgs"])
def test_matrix_and_tree_parts_step_on_an_explicit_mesh(mesh: dict[str, Any], name: str) -> None:
    """Rules whose parts contract split axes or mix layouts (Muon's and Shampoo's matrix
    products, SM3's per-axis maxima, L-BFGS's dot products of trees), on the explicit (4, 2)
    mesh: 4 jitted, donated steps compile once, keep every parameter's and slot's layout, and
    equal the eager NumPy run. (JAX refused them before: ``ShardingTypeError``.)"""
    run = mesh["explicit"][name]
    assert "error" not in run, run
    assert run["params_kept"] and run["slots_kept"], run
    assert run["compiles"] == 1, run
    assert run["diff"] <= 1e-12, run


@pytest.mark.parametrize("name", ["lbfgs-zoom", "backtracking"])
def test_line_searches_step_on_an_explicit_mesh(mesh: dict[str, Any], name: str) -> None:
    """L-BFGS with its zoom line search and a backtracking one, 10 jitted steps on the explicit
    (4, 2) mesh: the parameters keep their layout and equal the same steps on one device."""
    run = mesh["explicit"][name]
    assert "error" not in run, run
    assert run["mesh"]["kept"], run
    assert _worst(run["mesh"]["params"], run["one"]["params"]) <= 1e-12


def test_the_worker_reads_collectives_and_scalars() -> None:
    from distributed_jax_worker import collectives, scalar_shapes

    hlo = ("%all-reduce.4 = (f64[], f64[]) all-reduce(%a, %b), channel_id=3\n"
           "%all-gather = f32[16,8]{1,0} all-gather(%p), dimensions={0}\n"
           "%ar = f64[1]{0} all-reduce-start(%x)\n")
    assert collectives(hlo) == [("all-reduce", "(f64[], f64[])"), ("all-gather", "f32[16,8]{1,0}"),
                                ("all-reduce", "f64[1]{0}")]
    assert scalar_shapes("(f64[], f32[1]{0})") and scalar_shapes("f64[]")
    assert not scalar_shapes("f32[16,8]{1,0}") and not scalar_shapes("(f64[], f64[2]{0})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
def test_two_processes_of_jax_distributed_on_cpu() -> None:
    """Two processes, two CPU devices each, one mesh of four (gloo collectives): each process
    feeds its shards, and the clipped AdamW of 20 jitted steps equals the one-process run."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "process", str(rank), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env())
             for rank in range(2)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, out in enumerate(outs):
        assert out["rank"] == rank
        assert (out["processes"], out["devices"], out["local_devices"]) == (2, 4, 2)
        assert out["shards"] == 2  # this process's two of the four
        assert out["worst"] <= 1e-12, out
        assert out["cache"] == 1


@pytest.mark.slow
def test_the_mesh_example_runs() -> None:
    """examples/jax_mesh.py, docs/scaling-out.md's: trains, keeps the layout, compiles one step."""
    example = WORKER.parents[1] / "examples" / "jax_mesh.py"
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "w1 and its exp_avg: P('data', 'model') P('data', 'model')" in proc.stdout
    assert "compiled steps: 1" in proc.stdout


def test_8_bit_state_is_refused_for_a_sharded_leaf_and_runs_replicated(mesh: dict[str, Any]
                                                                       ) -> None:
    """``state_dtype="q8"``: a leaf split over the mesh is refused at set-up with a message
    naming it (its blocks of 2048 would cross the shards, and a jitted step on it fails inside
    JAX); a tree replicated over the mesh steps under jit as NumPy's compiled 8-bit step does,
    to float32 rounding (XLA may fuse other operations)."""
    said = mesh["q8-sharded"]
    assert said.startswith("setup: state_dtype='q8' is not offered for JAX arrays sharded over")
    assert "(params['b'] is laid out as NamedSharding(" in said, said  # the first split leaf
    assert mesh["q8-replicated"] <= 1e-6  # measured 4.8e-7 after 5 steps: a few float32 ulps


@pytest.mark.parametrize("where", ["replicated", "device 1"])
def test_8_bit_slots_are_set_up_where_the_step_hands_them_back(mesh: dict[str, Any],
                                                               where: str) -> None:
    """``state_dtype="q8"`` for params replicated over the mesh or committed to device 1: each
    slot's codes and scales are set up committed as their parameter (they were made
    uncommitted on the default device), and 5 jitted, donated steps compile once, keep one
    entry in jit's cache and keep that layout; the params equal NumPy's 8-bit run."""
    run = mesh["q8-placement"][where]
    assert run["placed"] and run["leaves"] == 20, run  # 5 leaves, 2 moments, codes and scales
    assert (run["compiles"], run["cache"]) == (1, 1), run
    assert run["kept"], run
    assert run["diff"] <= 1e-6, run

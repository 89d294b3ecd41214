"""uniopt.memory: the bytes a rule's state takes per rank, read from its declared slots, held to
the state that ``uo.setup`` and ``uniopt.torch`` actually build; and the memory table of the
docs' Scaling out page (docs/scaling-out.md) is ``memory.table()``. (The ZeRO-1 ranks' own
states are measured against it in tests/test_distributed_ddp.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from uniopt import memory
from uniopt.memory import Footprint, footprint, state_bytes

PAGE = Path(__file__).resolve().parents[1] / "docs" / "scaling-out.md"

# a long vector (three 8-bit blocks, the last one short), a matrix (Adafactor factors it), a
# scalar
PARAMS = {"v": (5000,), "m": (3, 4), "s": ()}
RULES = {
    "adamw": uo.adamw(lr=1e-3),
    "adam-amsgrad": uo.adam(lr=1e-3, amsgrad=True),
    "sgd-momentum": uo.sgd(lr=0.1, momentum=0.9),
    "adafactor": uo.adafactor(),
    "lion": uo.lion(lr=1e-4),
    "sgd": uo.sgd(lr=0.1),
}


def _tree(dtype: Any) -> dict[str, Any]:
    return {k: np.ones(s, dtype=dtype) for k, s in PARAMS.items()}


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("state_dtype", [None, "float64", "q8"])
def test_footprint_is_the_state_numpy_builds(name: str, state_dtype: str | None) -> None:
    params = _tree(np.float32)
    state = uo.setup(RULES[name], params, state_dtype=state_dtype)
    want = state_bytes(state)
    got = footprint(RULES[name], params, state_dtype=state_dtype or "float32")
    assert got.state == want
    assert got.params == got.grads == 4 * (5000 + 12 + 1)


def test_footprint_is_the_state_torch_builds() -> None:
    """uniopt.torch keeps AdamW's slots in the parameters' dtype (bfloat16 here), and a step
    counter beside them that the footprint leaves out."""
    torch = pytest.importorskip("torch")
    params = [torch.ones(s, dtype=torch.bfloat16, requires_grad=True) for s in PARAMS.values()]
    import uniopt.torch as ut

    opt = ut.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    measured = sum(v.numel() * v.element_size() for s in opt.state.values()
                   for k, v in s.items() if k != "step")
    assert measured == footprint(uo.adamw(), params, state_dtype="bfloat16").state
    assert measured == 2 * 2 * (5000 + 12 + 1)


def test_a_list_of_shapes_a_count_and_a_tree_agree() -> None:
    shapes = list(PARAMS.values())
    tree = _tree(np.float32)
    assert footprint(uo.adamw(), shapes) == footprint(uo.adamw(), tree)
    assert footprint(uo.adamw(), 5013) == footprint(uo.adamw(), [(5013,)])
    jax = pytest.importorskip("jax")
    structs = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in PARAMS.items()}
    assert footprint(uo.adamw(), structs) == footprint(uo.adamw(), tree)


def test_strategies_split_what_they_split() -> None:
    n, w = 8_000, 8
    ddp = footprint(uo.adamw(), n, world_size=w, strategy="ddp")
    zero = footprint(uo.adamw(), n, world_size=w, strategy="zero1")
    fsdp = footprint(uo.adamw(), n, world_size=w, strategy="fsdp2")
    assert ddp == Footprint(4 * n, 4 * n, 8 * n)
    assert zero == Footprint(4 * n, 4 * n, 8 * n // w)
    assert fsdp == Footprint(4 * n // w, 4 * n // w, 8 * n // w)
    assert fsdp.total == 16 * n // w
    # a first dimension that does not divide: the fullest rank has ceil(rows / w) rows; a
    # scalar is kept whole on every rank
    got = footprint(uo.sgd(lr=0.1, momentum=0.9), [(10, 3), ()], world_size=4,
                    strategy="fsdp2")
    assert got == Footprint(4 * (3 * 3 + 1), 4 * (3 * 3 + 1), 4 * (3 * 3 + 1))
    # 8-bit: the codes and one float32 scale per block of the rank's share
    q8 = footprint(uo.adamw(), 4096 * 3, world_size=3, strategy="zero1", state_dtype="q8")
    assert q8.state == 2 * (4096 + 4 * 2)


@pytest.mark.parametrize("page", [PAGE, PAGE.parents[1] / "README.md"], ids=lambda p: p.name)
def test_docs_memory_table_is_the_functions(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    found = re.search(r"<!-- memory:start -->\n(.*?)\n<!-- memory:end -->", text, re.S)
    assert found, f"{page.name} lacks the <!-- memory:start --> ... <!-- memory:end --> markers"
    assert found.group(1).strip() == memory.table(), (
        f"{page.name}'s memory table is stale: paste uniopt.memory.table() between its markers")


def test_the_table_reads_as_the_arithmetic_says() -> None:
    """AdamW at 7B on 8 ranks: 56 GB of float32 moments under DDP, 7 under ZeRO-1."""
    row = next(r for r in memory.table().splitlines() if r.startswith("| `adamw` | float32"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:8] == ["56 / 112", "7 / 63", "7 / 14"]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"strategy": "zero3"}, ValueError, "strategy must be one of"),
    ({"state_dtype": "int8"}, ValueError, "state_dtype must be None or one of"),
    ({"param_dtype": "q8"}, ValueError, "param_dtype must be None or one of"),
    ({"world_size": 0}, ValueError, "world_size must be an integer >= 1, got 0"),
    ({"world_size": 2.0}, ValueError, "world_size must be an integer >= 1, got 2.0"),
    ({"world_size": True}, ValueError, "world_size must be an integer >= 1, got True"),
])
def test_bad_options_are_named(kwargs: dict[str, Any], error: type[Exception],
                               message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        footprint(uo.adamw(), 10, **kwargs)


@pytest.mark.parametrize(("params", "message"), [
    (-1, "number of parameters must be >= 0, got -1"),
    ([(3, -2)], "a shape is a tuple of sizes >= 0, got (3, -2)"),
    ([(3, 2.5)], "a shape is a tuple of sizes >= 0, got (3, 2.5)"),
])
def test_bad_params_are_named(params: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        footprint(uo.adamw(), params)


def test_what_is_not_params_or_a_rule_is_refused() -> None:
    with pytest.raises(TypeError, match="params must be a number of parameters"):
        footprint(uo.adamw(), {"w": "not an array"})
    with pytest.raises(TypeError, match="expected a uniopt rule"):
        footprint("adamw", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(
            "footprint: a leaf of dtype int32 (shape (3,)) is no parameter uniopt trains")):
        footprint(uo.adamw(), {"w": np.zeros(3, np.int32)})


@pytest.mark.parametrize(("rule", "state_dtype", "param_dtype", "whose"), [
    (uo.asgd(), "q8", "float32", "asgd"),
    (uo.chain(uo.sgd(lr=0.1), uo.ema(0.9)), "q8", "float32", "chain's ema"),
    (uo.madgrad(), "q8", "float32", "madgrad"),
    (uo.madgrad(), "float32", "float64", "madgrad on float64 params"),
    (uo.acprop(), "q8", "float32", "acprop"),
])
def test_footprint_refuses_a_state_setup_refuses(rule: uo.Transform, state_dtype: str,
                                                 param_dtype: str, whose: str) -> None:
    """A footprint counted 8-bit slots for rules whose set-up refuses them (averages, rules
    that make the params from a slot, ACProp): the bytes of a state no run can make. It
    refuses them with set-up's own check, in set-up's words."""
    want = f"state_dtype={state_dtype!r} is not offered for {whose}: "
    with pytest.raises(ValueError, match=re.escape(f"footprint: {want}")):
        footprint(rule, [(10, 10)], state_dtype=state_dtype, param_dtype=param_dtype)
    with pytest.raises(ValueError, match=re.escape(f"setup: {want}")):
        uo.setup(rule, [np.zeros((10, 10), param_dtype)], state_dtype=state_dtype)
    footprint(rule, [(10, 10)], state_dtype=param_dtype, param_dtype=param_dtype)


def test_a_refusal_names_the_registry_rule_a_chain_holds() -> None:
    """uniopt.torch steps a maximizing group as chain(scale(-1), rule): a refusal named
    "chain's scale_by_asgd", a chain the user never wrote; it names the rule (a chain of
    blocks the user wrote is named with its block)."""
    p = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="not offered for asgd: "):
        uo.setup(uo.chain(uo.scale(-1.0), uo.asgd()), p, state_dtype="q8")
    with pytest.raises(ValueError, match="not offered for chain's ema: "):
        uo.setup(uo.chain(uo.sgd(lr=0.1), uo.ema(0.9)), p, state_dtype="q8")


def test_state_bytes_counts_the_states_of_whole_tree_parts() -> None:
    """A state's bytes are its slots' and its whole-tree parts' (Prodigy keeps four arrays per
    leaf there and no slot: it measured 0 bytes); the step counter is left out."""
    params = {"w": np.zeros((64, 96), np.float32), "b": np.zeros(96, np.float32)}
    n = 64 * 96 + 96
    prodigy = uo.setup(uo.prodigy(), params)
    assert state_bytes(prodigy) == 4 * n * 4 + 3 * 4  # exp_avg, exp_avg_sq, s, p0; d, d_max, num
    free = uo.setup(uo.schedule_free_adamw(lr=1e-3), params)
    assert state_bytes(free) == 2 * n * 4 + 2 * 4  # exp_avg_sq (a slot), z; weight_sum, lr_max
    assert state_bytes(uo.setup(uo.adam(), params)) == 2 * n * 4


# an MLP's shapes, as torch lays them out: (out, in) weights and their biases
MLP = [(96, 64), (96,), (40, 96), (40,)]


def test_fsdp2_keeps_a_slot_of_another_shape_whole_as_of_the_whole_tensor() -> None:
    """Under FSDP2 uniopt keeps a slot shaped otherwise than its parameter whole on every rank
    (Adafactor's factors, Shampoo's preconditioners, SM3's accumulators): they were counted
    from the shard's shape, 1184 bytes of Adafactor's state on the first of 2 ranks where it
    holds 1456 (measured in tests/test_distributed_torch.py). A slot shaped as its parameter
    is split as the parameter."""
    got = footprint(uo.adafactor(), MLP, world_size=2, strategy="fsdp2").state
    # the matrices' row and column factors whole, the vectors' variances split
    assert got == 4 * ((96 + 64) + 48 + (40 + 96) + 20) == 1456
    shampoo = footprint(uo.shampoo(), [(96, 64), (40, 96)], world_size=2, strategy="fsdp2")
    # its momentum split; two packed preconditioners (each axis's square) whole
    assert shampoo.state == 4 * (48 * 64 + 20 * 96 + 2 * (96**2 + 64**2 + 40**2 + 96**2))
    sm3 = footprint(uo.sm3(), [(96, 64)], world_size=2, strategy="fsdp2").state
    assert sm3 == 4 * (48 * 64 + (96 + 64))


def test_zero1_counts_the_fullest_rank_of_zeros_assignment() -> None:
    """ZeroRedundancyOptimizer hands each rank whole tensors (largest first, each to the rank
    with the fewest parameters so far): examples/ddp_zero1.py's model on 2 ranks gives 512
    and 65 parameters, and the state is the fullest rank's, from whole shapes (an even split
    counted 305 parameters' state, and Adafactor's factors of halves of matrices no rank
    holds). ZeRO's own ranks are held to it in tests/test_distributed_ddp.py."""
    shapes = [(32, 16), (32,), (1, 32), (1,)]
    assert footprint(uo.adamw(), shapes, world_size=2, strategy="zero1").state == 512 * 8
    # the fullest rank in state is not the one with the most parameters: (8, 6) alone on the
    # first rank keeps 8 + 6 factors; the second's (3, 8), (8,) and (3,) keep 3 + 8 + 8 + 3
    mlp = [(8, 6), (8,), (3, 8), (3,)]
    assert footprint(uo.adafactor(), mlp, world_size=2, strategy="zero1").state == 4 * 22
    # more ranks than tensors: one tensor each, the largest's state
    assert footprint(uo.adamw(), mlp, world_size=8, strategy="zero1").state == 48 * 8
    # Adafactor's factors of each whole matrix, on the rank that holds it
    got = footprint(uo.adafactor(), [(4096, 4096)] * 3, world_size=2, strategy="zero1")
    assert got.state == 2 * 4 * (4096 + 4096)
    # largest first, not in the model's order: (2,) alone, (1,) and (1,) together (in order,
    # the first rank would take (1,) and then (2,), 3 parameters)
    assert footprint(uo.adamw(), [(1,), (1,), (2,)], world_size=2, strategy="zero1").state \
        == 2 * 8
    # a count has no tensors: its even share
    assert footprint(uo.adamw(), 577, world_size=2, strategy="zero1").state == 289 * 8


def test_numpy_integers_are_counts_and_sizes() -> None:
    """np.prod's int64 was taken for a tree of one 0-d array (one parameter), and a shape of
    NumPy ints was refused as not "sizes >= 0"."""
    n = 4096 * 4096
    want = footprint(uo.adamw(), n)
    assert want.state == 8 * n
    assert footprint(uo.adamw(), np.prod((4096, 4096))) == want
    assert footprint(uo.adamw(), [(np.int64(4096), 4096)]) == want
    with pytest.raises(ValueError, match=re.escape("a shape is a tuple of sizes >= 0, got "
                                                   "(True, 3)")):
        footprint(uo.adamw(), [(True, 3)])


def test_a_tree_of_arrays_is_counted_in_its_dtypes() -> None:
    """A tree's dtypes were ignored for float32's: bfloat16 torch params counted 8,000 bytes
    of AdamW state where uo.setup makes 4,000, complex64 ones 8,000 where it makes 16,000."""
    torch = pytest.importorskip("torch")
    trees = [{"w": torch.zeros(1000, dtype=torch.bfloat16)}, {"w": np.zeros(1000, np.complex64)},
             {"w": np.zeros((10, 10), np.float64), "b": np.zeros(10, np.float32)}]
    for params in trees:
        held = sum(state_bytes(p) for p in params.values())
        got = footprint(uo.adamw(), params)
        assert (got.params, got.grads, got.state) == (
            held, held, state_bytes(uo.setup(uo.adamw(), params)))
    assert footprint(uo.adamw(), trees[0]).state == 4000
    assert footprint(uo.adamw(), trees[1]).state == 16000
    meta = {"w": torch.empty((10, 10), dtype=torch.bfloat16, device="meta")}
    assert footprint(uo.adamw(), meta) == Footprint(200, 200, 400)
    jax = pytest.importorskip("jax")
    structs = {"w": jax.ShapeDtypeStruct((1000,), jax.numpy.bfloat16)}
    assert footprint(uo.adamw(), structs) == footprint(uo.adamw(), trees[0])
    # given too, param_dtype must say what the arrays are
    assert footprint(uo.adamw(), trees[0], param_dtype="bfloat16").state == 4000
    with pytest.raises(ValueError, match=re.escape(
            "footprint: param_dtype='float32', but a leaf (shape (1000,)) is bfloat16")):
        footprint(uo.adamw(), trees[0], param_dtype="float32")
    # complex params keep their slots complex: no state dtype, as set-up refuses one
    for call in (lambda: footprint(uo.adamw(), trees[1], state_dtype="float32"),
                 lambda: uo.setup(uo.adamw(), trees[1], state_dtype="float32")):
        with pytest.raises(ValueError, match=re.escape(
                "state_dtype='float32' is for real params; these have complex leaves")):
            call()
    with pytest.raises(TypeError, match=re.escape(
            "footprint: adafactor takes real params only (the registry's Info.complex); a leaf "
            "of shape (10,) is complex")):
        footprint(uo.adafactor(), [(10,)], param_dtype="complex64")
    # a combinator's own refusal (mechanize's inner products are of real vectors): 384 bytes
    # were counted of a state set-up refuses
    for call in (lambda: footprint(uo.mechanize(uo.adam()), trees[1]),
                 lambda: uo.setup(uo.mechanize(uo.adam()), trees[1])):
        with pytest.raises(TypeError, match="mechanize takes real params only"):
            call()


@pytest.mark.parametrize("rule", [uo.ftrl(), uo.adamw()], ids=["ftrl", "adamw"])
def test_a_16_bit_state_is_that_of_16_bit_params(rule: uo.Transform) -> None:
    """bfloat16 slots for float32 params were counted, a state uo.setup makes for no rule (its
    state_dtype takes float32, float64 and q8; 16-bit slots are those of 16-bit params)."""
    with pytest.raises(ValueError, match=re.escape(
            "footprint: uo.setup keeps no bfloat16 state for float32 params")) as e:
        footprint(rule, 1000, state_dtype="bfloat16")
    # (what to pass for the count asked of: it said only what set-up keeps)
    assert str(e.value).endswith(
        "the slots of bfloat16 params are bfloat16: give param_dtype='bfloat16' for a count or "
        "a list of shapes (a tree of arrays is counted in its own dtypes))")
    with pytest.raises(ValueError, match="state_dtype must be 'float32', 'float64' or 'q8'"):
        uo.setup(rule, [np.zeros(1000, np.float32)], state_dtype="bfloat16")
    assert footprint(rule, 1000, state_dtype="bfloat16", param_dtype="bfloat16") == \
        footprint(rule, 1000, param_dtype="bfloat16")


def _measured(rule: uo.Transform, params: dict[str, Any], state_dtype: str | None) -> int:
    """The bytes of the arrays ``rule``'s state keeps for ``params``, the numbers it keeps for
    the whole tree (a few, the same for any tree) taken away: the state of ``params`` beside a
    copy of them, less that of the copy alone."""
    copy = {k + "_": v.copy() for k, v in params.items()}
    return (state_bytes(uo.setup(rule, {**params, **copy}, state_dtype=state_dtype))
            - state_bytes(uo.setup(rule, copy, state_dtype=state_dtype)))


# what footprint cannot count: state not declared per leaf (L-BFGS's history, made as it
# steps; SAM's base optimizer's state, through the optax protocol)
UNDECLARED = {"lbfgs", "sam"}


@pytest.mark.parametrize("state_dtype", [None, "float64"])
def test_every_registry_rule_is_counted_as_set_up(state_dtype: str | None) -> None:
    """Every rule of the registry, whole-tree parts included (Prodigy's moments,
    schedule-free's z, Kron's factors, GaLore's projectors...), counts the arrays uo.setup
    makes: the 17 with whole-tree parts were refused. (The numbers a whole-tree part keeps
    for the tree, a few bytes, are left out, as the step counter is.)"""
    from uniopt import registry

    counted = 0
    for name, entry in registry.entries().items():
        rule = entry.rule(**entry.info.example)
        for shapes in (PARAMS, {"m": (3, 4), "n": (6, 5)}):  # (Muon & co.: matrices alone)
            params = {k: np.ones(s, np.float32) for k, s in shapes.items()}
            try:
                uo.setup(rule, params, state_dtype=state_dtype)
            except (TypeError, ValueError):
                continue
            break
        else:
            raise AssertionError(f"{name} takes neither tree")
        if name in UNDECLARED:
            with pytest.raises(ValueError, match=rf"footprint: {name}'s whole-tree part \w+ does "
                                                 "not declare the arrays its state keeps"):
                footprint(rule, params, state_dtype=state_dtype)
            continue
        got = footprint(rule, params, state_dtype=state_dtype).state
        assert got == _measured(rule, params, state_dtype), name
        counted += 1
    assert counted == len(registry.entries()) - len(UNDECLARED)


def _labels(path: str, p: Any) -> str:
    return "m" if p.ndim == 2 else "v"


COMBINED = {
    "partition": uo.partition({"m": uo.adafactor(), "v": uo.prodigy()}, _labels),
    "partition with None": uo.partition({"m": uo.adamw(), "v": None}, _labels),
    "masked in a chain": uo.chain(uo.masked(uo.sgd(lr=0.1, momentum=0.9), "m"), uo.adam()),
    "freeze": uo.freeze(uo.adamw(), lambda path, p: p.ndim == 1),
    "accumulate": uo.accumulate(uo.adamw(), 4),
    "skip_nonfinite": uo.skip_nonfinite(uo.chain(uo.clip_by_global_norm(1.0), uo.lion())),
    "mechanize": uo.mechanize(uo.adamw()),
    "nested": uo.accumulate(uo.partition({"m": uo.schedule_free_adamw(), "v": uo.masked(
        uo.adamw(), lambda path, p: p.ndim == 1)}, _labels), 2),
    "reduce_on_plateau": uo.chain(uo.adamw(), uo.reduce_on_plateau()),
}


@pytest.mark.parametrize("name", COMBINED)
@pytest.mark.parametrize(("dtype", "state_dtype"), [("float32", None), ("float64", "float32"),
                                                    ("float32", "float64")])
def test_combinators_count_their_members_on_their_leaves(name: str, dtype: str,
                                                         state_dtype: str | None) -> None:
    """A combinator counts its own arrays (accumulate's mean, in the state dtype; Mechanic's
    copy of the params, in theirs) and each member's state on the leaves it takes; a list of
    shapes is routed by the same labels."""
    rule = COMBINED[name]
    params = {"m": np.ones((3, 4), dtype), "v": np.ones(5, dtype)}
    got = footprint(rule, params, state_dtype=state_dtype)
    assert got.state == _measured(rule, params, state_dtype)
    # a list of shapes: paths "0", "1", the labels read the leaves (here their ndim)
    if name != "masked in a chain":  # (its mask matches a path)
        assert footprint(rule, [(3, 4), (5,)], state_dtype=state_dtype, param_dtype=dtype) == got


@pytest.mark.parametrize(("rule", "kwargs", "message"), [
    (uo.prodigy(), {"strategy": "fsdp2", "world_size": 2},
     "footprint: strategy='fsdp2' (DTensor shards): prodigy has whole-tree parts "
     "(scale_by_prodigy), which see every leaf at once"),
    (uo.adafactor(), {"strategy": "fsdp2", "world_size": 2, "state_dtype": "q8"},
     "footprint: strategy='fsdp2' (DTensor shards): state_dtype='q8' on DTensor (sharded) "
     "parameters takes elementwise rules"),
    (uo.prodigy(), {"strategy": "zero1", "world_size": 2},
     "footprint: strategy='zero1' on 2 ranks: prodigy's scale_by_prodigy reads every "
     "parameter at once"),
    (uo.chain(uo.clip_by_global_norm(1.0), uo.adamw()), {"strategy": "zero1", "world_size": 2},
     "footprint: strategy='zero1' on 2 ranks: chain's clip_by_global_norm reads every "),
    (uo.prodigy(), {"state_dtype": "q8"},
     "footprint: state_dtype='q8' quantises per-leaf slots; prodigy has whole-tree parts"),
    (uo.muon(), {}, "footprint: muon: a leaf of shape (10,): "),
])
def test_what_no_run_makes_is_refused(rule: uo.Transform, kwargs: dict[str, Any],
                                      message: str) -> None:
    """What uniopt refuses on shards (whole-tree parts; 8-bit state with per-leaf parts),
    under ZeRO (a part that reads every parameter), in set-up (8-bit whole-tree state, a
    shape a part cannot step) footprint refuses: no run makes such a state. On one rank of
    ZeRO, or under DDP, they are counted."""
    with pytest.raises(ValueError, match=re.escape(message)):
        footprint(rule, [(10,)] if "muon" in message else [(4, 3), (3,)], **kwargs)
    if kwargs.get("strategy") == "zero1":
        footprint(rule, [(4, 3), (3,)], strategy="zero1", world_size=1)

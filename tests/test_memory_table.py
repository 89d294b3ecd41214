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
    ({"state_dtype": "int8"}, ValueError, "state_dtype must be one of"),
    ({"param_dtype": "q8"}, ValueError, "param_dtype must be one of"),
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
    rule = uo.partition({"a": uo.adamw()}, lambda path, p: "a")
    with pytest.raises(ValueError, match="partition has whole-tree parts .partition."):
        footprint(rule, 10)


@pytest.mark.parametrize(("rule", "state_dtype", "param_dtype", "part"), [
    (uo.asgd(), "q8", "float32", "scale_by_asgd"),
    (uo.chain(uo.sgd(lr=0.1), uo.ema(0.9)), "q8", "float32", "ema"),
    (uo.madgrad(), "q8", "float32", "scale_by_madgrad"),
    (uo.madgrad(), "float32", "float64", "scale_by_madgrad"),
    (uo.acprop(), "q8", "float32", "scale_by_acprop"),
])
def test_footprint_refuses_a_state_setup_refuses(rule: uo.Transform, state_dtype: str,
                                                 param_dtype: str, part: str) -> None:
    """A footprint counted 8-bit slots for rules whose set-up refuses them (averages, rules
    that make the params from a slot, ACProp): the bytes of a state no run can make."""
    with pytest.raises(ValueError, match=rf"footprint: uo.setup refuses state_dtype="
                                         rf"'{state_dtype}' for \w+ on {param_dtype} params "
                                         rf"\({part}: "):
        footprint(rule, [(10, 10)], state_dtype=state_dtype, param_dtype=param_dtype)
    with pytest.raises(ValueError, match="is not offered for"):
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

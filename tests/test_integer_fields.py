"""Integer fields (counts, periods, seeds) of every rule, block and combinator, and the fixed
``d0`` of D-Adaptation, validated by the one check each: a NumPy integer is the int it equals;
a float (even a whole one), a string, a bool or a schedule is the wrong type (TypeError); a
number out of range is the wrong value (ValueError). Each message names the field."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo


def _field(cls: Any, name: str, bad: tuple[int, ...]) -> tuple[Any, ...]:
    return (f"{cls.__name__}.{name}", lambda v: cls(**{name: v}),
            lambda t: getattr(t, name), bad)


SEED = (-1, 2**32)
FIELDS = [
    _field(uo.muon, "ns_steps", (-1, 100)),
    _field(uo.orthogonalize, "ns_steps", (-1, 100)),
    *(_field(c, n, (0,)) for c in (uo.lbfgs, uo.lbfgs_step)
      for n in ("max_iter", "history_size", "max_eval")),
    *(_field(c, "batch_size", (0, -2)) for c in (uo.dpsgd, uo.differentially_private_aggregate)),
    *(_field(c, "seed", SEED) for c in (uo.dpsgd, uo.differentially_private_aggregate,
                                        uo.noisy_sgd, uo.add_noise, uo.sophia_h,
                                        uo.scale_by_hutchinson_sophia, uo.kron,
                                        uo.scale_by_kron)),
    *(_field(c, n, (0,)) for c in (uo.sophia_h, uo.scale_by_hutchinson_sophia)
      for n in ("update_period", "num_samples")),
    *(_field(c, "memory_size", (0,)) for c in (uo.lbfgs_linesearch, uo.scale_by_lbfgs)),
    _field(uo.scale_by_schedule_free, "warmup_steps", (-1,)),
    _field(uo.scale_by_schedule_free, "lag", (-1,)),
    _field(uo.schedule_free_sgd, "warmup_steps", (-1,)),
    _field(uo.schedule_free_adamw, "warmup_steps", (-1,)),
    *(_field(c, n, (0,)) for c in (uo.galore, uo.scale_by_galore)
      for n in ("rank", "update_proj_gap")),
    *(_field(c, "min_dim_size_to_factor", (0,)) for c in (uo.adafactor,
                                                         uo.scale_by_factored_rms)),
    *(_field(c, n, (0,)) for c in (uo.soap, uo.scale_by_soap)
      for n in ("precondition_frequency", "max_precond_dim")),
    *(_field(c, n, (0,)) for c in (uo.shampoo, uo.scale_by_shampoo)
      for n in ("preconditioning_compute_steps", "block_size")),
    *(_field(c, "max_size_triangular", (0,)) for c in (uo.kron, uo.scale_by_kron)),
    *(_field(c, "min_ndim_triangular", (-1,)) for c in (uo.kron, uo.scale_by_kron)),
    _field(uo.reduce_on_plateau, "patience", (-1,)),
    _field(uo.reduce_on_plateau, "cooldown", (-1,)),
    _field(uo.reduce_on_plateau, "accumulation_size", (0,)),
    ("reduce_on_plateau.from_torch.patience", lambda v: uo.reduce_on_plateau.from_torch(
        0.1, patience=v), lambda t: t.patience - 1, (-1,)),
    _field(uo.scale_by_zoom_linesearch, "max_linesearch_steps", (0,)),
    _field(uo.scale_by_backtracking_linesearch, "max_backtracking_steps", (-1,)),
    _field(uo.polyak, "start", (-1,)),
    _field(uo.polyak, "every", (0,)),
    _field(uo.lookahead_sync, "k", (0,)),
    ("lookahead.k", lambda v: uo.lookahead(uo.sgd(), k=v), lambda t: t.transforms[-1].k, (0,)),
    ("skip_nonfinite.max_consecutive", lambda v: uo.skip_nonfinite(uo.sgd(), v),
     lambda t: t.max_consecutive, (-1,)),
    ("accumulate.every", lambda v: uo.accumulate(uo.sgd(), v), lambda t: t.every, (0, -3)),
]
IDS = [f[0] for f in FIELDS]


def _name(label: str) -> str:
    return label.rsplit(".", 1)[1]


@pytest.mark.parametrize(("label", "make", "read", "bad"), FIELDS, ids=IDS)
@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), np.uint8(3), np.array(3)],
                         ids=["int64", "int32", "uint8", "0-d"])
def test_a_numpy_integer_is_the_int_it_equals(label: str, make: Callable[[Any], Any],
                                              read: Callable[[Any], Any], bad: Any,
                                              value: Any) -> None:
    rule, plain = make(value), make(3)
    assert type(read(rule)) is int and read(rule) == 3
    assert rule == plain and repr(rule) == repr(plain)


@pytest.mark.parametrize(("label", "make", "read", "bad"), FIELDS, ids=IDS)
@pytest.mark.parametrize("value", [3.0, np.float64(3.0), "3", True, np.bool_(True),
                                   lambda step: 3],
                         ids=["float", "np.float64", "str", "bool", "np.bool_", "schedule"])
def test_a_float_a_string_a_bool_or_a_schedule_is_the_wrong_type(
        label: str, make: Callable[[Any], Any], read: Callable[[Any], Any], bad: Any,
        value: Any) -> None:
    if callable(value) and label == "accumulate.every":
        assert make(value).every is value  # (the one integer field that takes a schedule)
        return
    with pytest.raises(TypeError, match=rf"\b{_name(label)} must be an integer "):
        make(value)


@pytest.mark.parametrize(("label", "make", "read", "bad"), FIELDS, ids=IDS)
def test_an_integer_out_of_range_is_the_wrong_value(label: str, make: Callable[[Any], Any],
                                                    read: Callable[[Any], Any],
                                                    bad: tuple[int, ...]) -> None:
    for b in (*bad, *(np.int64(b) for b in bad)):  # (a NumPy one named as the int it is)
        with pytest.raises(ValueError, match=rf"\b{_name(label)} must be an integer .*, got "
                                             rf"{re.escape(repr(int(b)))}$"):
            make(b)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: uo.muon(ns_steps=2.5), r"muon: ns_steps must be an integer in \[0, 100\), got 2.5"),
    (lambda: uo.kron(seed=1.5), r"kron: seed must be an integer in \[0, 2\*\*32\), got 1.5"),
    (lambda: uo.dpsgd(batch_size=2.0), r"dpsgd: batch_size must be an integer >= 1, got 2.0"),
    (lambda: uo.shampoo(block_size="4"), r"shampoo: block_size must be an integer >= 1, got '4'"),
    (lambda: uo.accumulate(uo.sgd(), 2.0),
     r"accumulate: every must be an integer >= 1 or a schedule, got 2.0"),
    (lambda: uo.lbfgs(max_iter=lambda s: 3),
     r"lbfgs: max_iter must be an integer >= 1, not a schedule \(it takes none\), got <"),
])
def test_the_message_names_the_owner_the_field_and_the_value(make: Callable[[], Any],
                                                             message: str) -> None:
    with pytest.raises(TypeError, match=f"^{message}"):
        make()


def test_optional_counts_still_take_none() -> None:
    assert uo.lbfgs(max_eval=None).max_eval is None
    assert uo.shampoo(block_size=None).block_size is None


def test_a_numpy_batch_size_steps_as_the_int() -> None:
    p = {"w": np.array([1.0, 2.0])}
    per_example = {"w": np.array([[3.0, 4.0], [0.3, 0.4]])}
    out = []
    for batch in (2, np.int64(2)):
        rule = uo.dpsgd(0.1, noise_multiplier=0.0, batch_size=batch)
        out.append(uo.update(uo.setup(rule, p), p, rule.aggregate(per_example))[1]["w"])
    np.testing.assert_array_equal(out[0], out[1])


# --- d0, D-Adaptation's initial estimate: a fixed number, as prodigy's ---------------------------

PAIRS = [(uo.dadapt_adamw, uo.prodigy), (uo.scale_by_dadapt_adam, uo.scale_by_prodigy)]


@pytest.mark.parametrize(("dadapt", "prodigy"), PAIRS, ids=["rule", "block"])
@pytest.mark.parametrize("d0", [np.float32(1e-3), np.float64(1e-3), np.array(1e-3), 1, 1e-3])
def test_d0_takes_any_real_number_as_prodigy_does(dadapt: Any, prodigy: Any, d0: Any) -> None:
    for make in (dadapt, prodigy):
        rule = make(d0=d0)
        assert type(rule.d0) is float and rule.d0 == float(d0)
        assert rule == make(d0=float(d0))


@pytest.mark.parametrize(("dadapt", "prodigy"), PAIRS, ids=["rule", "block"])
@pytest.mark.parametrize(("d0", "error"), [
    (lambda step: 1e-6, TypeError), ("1e-6", TypeError), (True, TypeError),
    (0.0, ValueError), (-1e-6, ValueError), (math.inf, ValueError), (math.nan, ValueError),
])
def test_d0_is_refused_as_prodigy_refuses_it(dadapt: Any, prodigy: Any, d0: Any,
                                             error: type) -> None:
    messages = []
    for make in (dadapt, prodigy):
        with pytest.raises(error, match=r"\bd0 must be ") as e:
            make(d0=d0)
        messages.append(str(e.value).split(": ", 1)[1])
    assert messages[0] == messages[1]


def test_d0_under_optax_inject_hyperparams_is_taken_from_set_up() -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    ours = optax.inject_hyperparams(uo.dadapt_adamw)(lr=0.3, d0=1e-3)
    plain = uo.dadapt_adamw(lr=0.3, d0=1e-3)
    u, _ = jax.jit(ours.update)(g, ours.init(p), p)
    v, _ = jax.jit(plain.update)(g, plain.init(p), p)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(v["w"]))


def test_batch_size_under_optax_inject_hyperparams_is_taken_from_set_up() -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    opt = optax.inject_hyperparams(uo.dpsgd, static_args=("seed",))(
        lr=0.1, noise_multiplier=0.0, batch_size=2)
    u, _ = jax.jit(opt.update)(g, opt.init(p), p)
    np.testing.assert_allclose(np.asarray(u["w"]), -0.1 * np.asarray(g["w"]) / 2, rtol=1e-6)


def test_mechanize_num_betas_is_an_integer_field() -> None:
    assert uo.mechanize(uo.sgd(lr=0.1), num_betas=np.int64(3)).num_betas == 3
    with pytest.raises(TypeError, match=r"mechanize: num_betas must be an integer >= 1, got 3.0"):
        uo.mechanize(uo.sgd(lr=0.1), num_betas=3.0)
    with pytest.raises(ValueError, match=r"mechanize: num_betas must be an integer >= 1, got 0"):
        uo.mechanize(uo.sgd(lr=0.1), num_betas=0)


@pytest.mark.parametrize("make, kw", [
    (uo.schedule_free_adamw, {"lr": 0.02, "warmup_steps": 2}),
    (uo.muon, {"lr": 0.02}),
    (uo.soap, {"lr": 0.02}),
    (uo.noisy_sgd, {"lr": 0.02}),
])
def test_integer_fields_under_inject_hyperparams_and_jit(make: Any, kw: dict[str, Any]) -> None:
    """optax.inject_hyperparams hands every number back as an array, traced under jax.jit:
    the integer fields (taken as arrays since they are checked as integers) went traced into
    the rule's static skeleton (TracerBoolConversionError). They are the set-up rule's, as a
    static field's are; the jitted update is the eager one."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((4, 3), 0.1)}
    opt = optax.inject_hyperparams(make)(**kw)
    state = opt.init(params)
    eager, _ = opt.update(grads, state, params)
    jitted, _ = jax.jit(opt.update)(grads, state, params)
    np.testing.assert_allclose(np.asarray(jitted["w"]), np.asarray(eager["w"]), rtol=1e-6,
                               atol=1e-8)


@pytest.mark.parametrize("make, kw, static", [
    (uo.radam, {"lr": 0.02}, ("rectify_threshold",)),
    (uo.adafactor, {"lr": 0.02}, ("min_dim_size_to_factor",)),
    (uo.soap, {"lr": 0.02}, ("precondition_frequency", "max_precond_dim")),
    (uo.prodigy, {}, ("d0",)),
    (uo.noisy_sgd, {"lr": 0.02}, ("seed",)),
])
def test_a_jitted_init_names_the_settings_that_came_traced(
        make: Any, kw: dict[str, Any], static: tuple[str, ...]) -> None:
    """Under a jitted init optax.inject_hyperparams hands the settings fixed when a rule is
    made traced too (they failed deep in set-up: TracerBoolConversionError, or unhashable
    tracers); a TypeError names them and the static_args that let the jitted init run, whose
    state then steps as an eager init's."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    params = {"w": jnp.ones((4, 3)), "v": jnp.ones((3, 3))}
    grads = {k: jnp.full(v.shape, 0.1) for k, v in params.items()}
    names = ", ".join(f"{make.__name__}.{s}" for s in static)
    with pytest.raises(TypeError, match=re.escape(
            f"setup: {names} {'is' if len(static) == 1 else 'are'} fixed when the rule is made"
            ) + ".*" + re.escape(f"static_args=({', '.join(map(repr, static))},)")):
        jax.jit(optax.inject_hyperparams(make)(**kw).init)(params)
    opt = optax.inject_hyperparams(make, static_args=static)(**kw)
    jitted, _ = opt.update(grads, jax.jit(opt.init)(params), params)
    eager, _ = opt.update(grads, opt.init(params), params)
    for k in params:
        np.testing.assert_array_equal(np.asarray(jitted[k]), np.asarray(eager[k]))

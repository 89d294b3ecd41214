"""Conventions: translate() between frameworks' forms of a rule, the generated conventions page,
and no rule's default, in any convention, ascends."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import numpy as np
import pytest

import uniopt as uo
from uniopt import conventions, schedules
from uniopt.base import FRAMEWORKS

ROOT = Path(__file__).resolve().parents[1]
A = np.array([1.0, 2.0, 0.5, 4.0])  # f(x) = 0.5*sum(A*x^2)


def _run(rule, steps=30, x0=(1.0, -2.0, 0.5, 3.0), shape=None):
    """``steps`` updates of ``rule`` on the quadratic from ``x0``; the trajectory."""
    x = np.array(x0, dtype=np.float64)
    if shape is not None:
        x = np.resize(x, shape)
    a = np.resize(A, x.shape)
    p = {"x": x}
    state = uo.setup(rule, p)
    out = []
    for _ in range(steps):
        state = uo.update_(state, p, {"x": a * p["x"]})
        out.append(p["x"].copy())
    return np.array(out)


def _tables():
    return {n: c for n, c in conventions.rules().items() if c.conventions}


# --- translate -------------------------------------------------------------------------------

def test_identity_is_exact_for_every_convention_of_every_rule():
    assert "adagrad" in _tables()
    for name, cls in _tables().items():
        for fw in cls.conventions:
            try:
                rule = conventions.build(name, fw)
            except TypeError:  # a rule with a required hyperparameter
                continue
            tr = uo.translate(rule, target=fw)
            assert tr.exact and tr.rule == rule and tr.source == tr.target == fw, (name, fw)


def _translations():
    """Every ordered pair of every rule's conventions (a rule with a required hyperparameter
    other than lr left out): ``(name, source, target, source rule, translation)``."""
    for name, cls in _tables().items():
        for src, tgt in itertools.permutations(cls.conventions, 2):
            try:
                rule = conventions.build(name, src, lr=0.05)
            except TypeError:
                continue
            yield name, src, tgt, rule, uo.translate(rule, target=tgt)


def test_every_exact_translation_between_conventions_gives_the_same_steps():
    """Every ordered pair of every rule's conventions: the translated record keeps the source's
    values and, where it says it is exact, the two records take the same steps."""
    checked = 0
    for name, src, tgt, rule, tr in _translations():
        assert tr.rule.convention == tgt and tr.explanation, (name, src, tgt)
        assert tr.exact == (tr.conditions != "" and not tr.conditions.startswith("would")), \
            (name, src, tgt, tr)
        if tr.exact:
            np.testing.assert_allclose(_run(tr.rule), _run(rule), rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name}: {src} -> {tgt}")
            checked += 1
    assert checked >= 2  # adagrad: keras <-> optax at least


@pytest.mark.parametrize("lr", [0.05, schedules.cosine(0.05, 100)], ids=["number", "schedule"])
def test_the_printed_rule_builds_the_translated_rule(lr):
    """Every ordered pair of every rule's conventions: the rule ``uniopt translate`` prints,
    run with ``uniopt`` imported as ``uo``, is the translated record. It named no convention
    where the target was torch's, which is not the default of amsgrad, nadamw and ademamix
    (the call built optax's form), and wrote schedules by their bare names."""
    checked = 0
    for name, cls in _tables().items():
        for src, tgt in itertools.permutations(cls.conventions, 2):
            try:
                rule = conventions.build(name, src, lr=lr)
            except TypeError:
                continue
            tr = uo.translate(rule, target=tgt)
            assert eval(conventions.call(tr.rule), {"uo": uo}) == tr.rule, (name, src, tgt)
            checked += 1
    assert checked > 20


def test_every_call_the_page_shows_builds_its_conventions_rule() -> None:
    """The "in uniopt" column of docs/conventions.md: each call runs (a field it names bare is
    the caller's, optimistic_adam's lr as optax requires one) and builds that convention."""
    checked = 0
    for cls in _tables().values():
        for fw in cls.conventions:
            cell = conventions._uniopt_cell(cls, fw)
            built = eval(cell.strip("`"), {"uo": uo, "lr": 0.01})
            assert built == cls(**{"convention": fw, **({"lr": 0.01} if "(lr" in cell else {})})
            checked += 1
    assert checked > 60


def test_the_printed_rule_names_a_schedule_inside_a_tuple() -> None:
    rule = uo.adam(betas=(0.9, schedules.cosine(0.99, 10)), lr=schedules.cosine(0.1, 5))
    assert eval(conventions.call(rule), {"uo": uo}) == rule
    one = uo.translate(rule, target="keras").rule
    assert eval(conventions.call(one), {"uo": uo}) == one


def test_adamw_torch_to_flux_couple_false_is_exact_at_constant_lr_and_under_a_schedule():
    torch_rule = uo.adamw(lr=1e-2, weight_decay=0.5)
    tr = uo.translate(torch_rule, source="torch", target="flux", couple_lr=False)
    assert tr.exact and tr.rule.couple_lr is False
    assert tr.rule.lr == 1e-2 and tr.rule.weight_decay == pytest.approx(5e-3, rel=1e-15)
    np.testing.assert_allclose(_run(tr.rule), _run(torch_rule), rtol=1e-12)

    lr = schedules.cosine(1e-2, steps=30)
    torch_rule = uo.adamw(lr=lr, weight_decay=0.5)
    tr = uo.translate(torch_rule, target="flux", couple_lr=False)
    assert tr.exact and tr.rule.weight_decay == schedules.product(lr, 0.5)
    np.testing.assert_allclose(_run(tr.rule), _run(torch_rule), rtol=1e-12)
    back = uo.translate(tr.rule, source="flux", target="torch")  # the product is undone
    assert back.exact and back.rule == torch_rule


def test_adamw_torch_to_flux_is_optimisers_couple_true():
    """Optimisers.jl >= 0.4 AdamW defaults to couple=true, torch's form: the translation keeps
    every value; Flux's couple=false is reached by asking for it (the test above)."""
    torch_rule = uo.adamw(lr=1e-2, weight_decay=0.5)
    tr = uo.translate(torch_rule, target="flux")
    assert tr.exact and tr.conditions == "always" and "weight_decay" in tr.explanation
    assert tr.rule == dataclasses.replace(torch_rule, convention="flux") and tr.rule.couple_lr


def test_adamw_flux_to_torch_is_exact_only_at_constant_lr():
    flux = uo.adamw(convention="flux", lr=1e-2, weight_decay=5e-3, couple_lr=False)
    tr = uo.translate(flux, target="torch")
    assert tr.source == "flux" and tr.exact and tr.conditions == "constant lr"
    assert tr.rule.couple_lr and tr.rule.weight_decay == pytest.approx(0.5, rel=1e-15)
    np.testing.assert_allclose(_run(tr.rule), _run(flux), rtol=1e-12)
    scheduled = uo.adamw(convention="flux", lr=schedules.cosine(1e-2, steps=30),
                         weight_decay=5e-3, couple_lr=False)
    tr = uo.translate(scheduled, source="flux", target="torch")
    assert not tr.exact and "schedule" in tr.explanation


def test_a_record_is_its_own_convention_and_source_must_agree():
    """A record's ``convention`` is its source; an explicit ``source`` naming another framework
    raises (it would not apply that framework's defaults), saying how to build or relabel."""
    torch_record = uo.adamw(lr=1e-2, weight_decay=5e-3, couple_lr=False)  # no convention=
    assert uo.translate(torch_record, target="torch").source == "torch"
    with pytest.raises(ValueError, match="convention='torch', but source='flux'") as e:
        uo.translate(torch_record, source="flux", target="torch")
    assert "dataclasses.replace(rule, convention='flux')" in str(e.value)
    relabelled = dataclasses.replace(torch_record, convention="flux")
    assert relabelled.couple_lr is False and relabelled.weight_decay == 5e-3
    assert uo.translate(relabelled, source="flux", target="torch").conditions == "constant lr"
    # the trap the rule prevents: torch's adagrad(lr=0.1) is not keras's Adagrad(0.1)
    with pytest.raises(ValueError, match="uo.adagrad\\(convention='keras'"):
        uo.translate(uo.adagrad(lr=0.1), source="keras", target="torch")
    assert not uo.translate(uo.adagrad(convention="keras", lr=0.1), target="torch").exact


def test_adagrad_torch_to_keras_and_optax_eps_placement():
    tr = uo.translate(uo.adagrad(lr=0.1), target="optax")  # torch's eps=1e-10 outside the root
    assert not tr.exact and "eps = 0" in tr.conditions and "root" in tr.explanation
    # the source's values are kept, the target's option taken
    assert tr.rule.eps_in_sqrt and tr.rule.initial_accumulator_value == 0.0
    assert tr.rule.eps == 1e-10 and tr.rule.lr == 0.1
    exact = uo.translate(uo.adagrad(lr=0.1, eps=0.0), target="keras")
    assert exact.exact and exact.conditions == "eps = 0, no accumulator at 0; weight_decay = 0"
    # (keras decouples; a 0 gradient on a 0 accumulator: the root form steps 0, torch's NaN)
    torch_form, root_form = ([np.ones(2)] for _ in range(2))
    with np.errstate(invalid="ignore"):
        uo.update_(uo.setup(uo.adagrad(lr=0.1, eps=0.0), torch_form), torch_form,
                   [np.array([0.0, 1.0])])
    uo.update_(uo.setup(exact.rule, root_form), root_form, [np.array([0.0, 1.0])])
    assert np.isnan(torch_form[0][0]) and root_form[0][0] == 1.0
    np.testing.assert_allclose(_run(exact.rule), _run(uo.adagrad(lr=0.1, eps=0.0)), rtol=1e-12)
    back = uo.translate(uo.adagrad(convention="keras"), target="torch")
    assert not back.exact and back.rule.initial_accumulator_value == 0.1 and back.rule.lr == 1e-3


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_adagrad_lr_decay_with_either_eps_placement_is_the_documented_formula(eps_in_sqrt):
    """torch's lr_decay on the root form too (no framework has that pair; the formula does):
    ``p <- p - lr/(1+(t-1)*lr_decay) * g/sqrt(G + eps)``; keras's decoupled decay by ``lr``
    without ``lr_decay``."""
    lr, lr_decay, eps, wd, g0 = 0.1, 0.3, 1e-3, 0.05, 0.1
    rule = uo.adagrad(lr=lr, lr_decay=lr_decay, eps=eps, eps_in_sqrt=eps_in_sqrt,
                      initial_accumulator_value=g0, weight_decay=wd, decay_form="decoupled")
    x, acc, want = np.array([1.0, -2.0, 0.5, 3.0]), np.full(4, g0), []
    for t in range(1, 31):
        g = A * x
        x = x - lr * wd * x
        acc = acc + g * g
        den = np.sqrt(acc + eps) if eps_in_sqrt else np.sqrt(acc) + eps
        x = x - lr / (1 + (t - 1) * lr_decay) * g / den
        want.append(x)
    np.testing.assert_allclose(_run(rule), np.array(want), rtol=1e-12, atol=0)


def test_keras_epsilon_hat_is_torch_adam_with_an_eps_schedule():
    """keras's Adam, written from its formula, against uo.adam with the eps schedule
    translate() gives: eps = eps_hat / sqrt(1 - b2^t)."""
    lr, b1, b2, eps_hat = 1e-2, 0.9, 0.999, 0.5  # a large eps_hat: the forms differ visibly
    x = np.array([1.0, -2.0, 0.5, 3.0])
    m, v, keras = np.zeros(4), np.zeros(4), []
    for t in range(1, 31):
        g = A * x
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x = x - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps_hat)
        keras.append(x)
    eps = schedules.bias_correction(b2, -0.5, eps_hat)
    np.testing.assert_allclose(_run(uo.adam(lr=lr, eps=eps)), np.array(keras), rtol=1e-12)
    assert np.abs(_run(uo.adam(lr=lr, eps=eps_hat)) - keras).max() > 1e-3


def test_keras_epsilon_hat_translation():
    keras = uo.adam(convention="keras", lr=1e-2, eps=0.5)
    assert keras.eps_hat
    tr = uo.translate(keras, target="torch")
    assert tr.exact and tr.conditions.startswith("constant β₂") and not tr.rule.eps_hat
    assert tr.rule.eps == schedules.bias_correction(0.999, -0.5, 0.5)
    np.testing.assert_allclose(_run(tr.rule), _run(keras), rtol=1e-12)
    back = uo.translate(tr.rule, target="keras")  # eps*sqrt(1-b2^t) on the hat: the same steps
    assert back.exact and back.rule.eps_hat
    np.testing.assert_allclose(_run(back.rule), _run(keras), rtol=1e-12)


def test_sgd_momentum_torch_to_keras_exact_at_constant_lr_with_the_buffer_scaled():
    torch_rule = uo.sgd(lr=0.05, momentum=0.9, nesterov=True)
    tr = uo.translate(torch_rule, target="torch", momentum_form="keras")
    assert tr.exact and tr.conditions.startswith("constant lr") and "lr·b_torch" in tr.state
    np.testing.assert_allclose(_run(tr.rule), _run(torch_rule), rtol=1e-12)
    to_keras = uo.translate(torch_rule, target="keras")
    assert to_keras.exact and to_keras.rule.momentum_form == "keras"
    np.testing.assert_allclose(_run(to_keras.rule), _run(torch_rule), rtol=1e-12)
    scheduled = uo.sgd(lr=schedules.cosine(0.05, steps=30), momentum=0.9)
    assert not uo.translate(scheduled, target="torch", momentum_form="keras").exact


def test_sgd_dampening_has_no_counterpart_outside_torch():
    damped = uo.sgd(lr=0.05, momentum=0.9, dampening=0.5)
    for target in ("optax", "keras", "flux"):
        tr = uo.translate(damped, target=target)
        assert not tr.exact and tr.rule.dampening == 0.0 and "dampening" in tr.explanation
    assert np.abs(_run(uo.translate(damped, target="optax").rule) - _run(damped)).max() > 1e-3


def test_rmsprop_eps_placement_exact_only_at_eps_zero():
    assert not uo.translate(uo.rmsprop(), target="torch", eps_in_sqrt=True).exact
    rule = uo.rmsprop(lr=1e-2, eps=0.0)
    tr = uo.translate(rule, target="torch", eps_in_sqrt=True)
    assert tr.exact and tr.conditions == "eps = 0"
    np.testing.assert_allclose(_run(tr.rule), _run(rule), rtol=1e-12)
    momentum = uo.rmsprop(lr=1e-2, eps=0.0, momentum=0.9)
    tr = uo.translate(momentum, target="optax")  # eps inside, momentum after lr (Sutskever)
    assert tr.exact and tr.rule.momentum_form == "sutskever" and "constant lr" in tr.conditions
    np.testing.assert_allclose(_run(tr.rule), _run(momentum), rtol=1e-12)


def test_adagrad_flux_starts_at_eps():
    """Optimisers.jl's accumulator starts at eps: from it, initial_accumulator_value = eps is
    exact; into it, only a source that already starts at eps is."""
    flux = uo.adagrad(convention="flux", lr=0.05)
    tr = uo.translate(flux, target="torch")
    assert tr.exact and tr.rule.initial_accumulator_value == 1e-8 and not tr.rule.start_at_eps
    np.testing.assert_allclose(_run(tr.rule), _run(flux), rtol=1e-12)
    same = uo.adagrad(lr=0.05, eps=1e-8, initial_accumulator_value=1e-8)
    tr = uo.translate(same, target="flux")
    assert tr.exact and tr.conditions == ("initial_accumulator_value = eps; parameters not "
                                          "float16")
    assert tr.rule.start_at_eps and tr.rule.initial_accumulator_value == 0.0
    np.testing.assert_allclose(_run(tr.rule), _run(same), rtol=1e-12)
    keras = uo.adagrad(convention="keras", lr=0.05, eps=0.0)  # G from 0.1: flux cannot
    tr = uo.translate(keras, target="flux")
    assert not tr.exact and "initial_accumulator_value = eps" in tr.conditions
    assert tr.rule.start_at_eps and tr.rule.initial_accumulator_value == 0.0
    assert np.abs(_run(tr.rule) - _run(keras)).max() > 1e-3
    torch = uo.adagrad(lr=0.05, lr_decay=0.1)  # only torch has lr_decay
    tr = uo.translate(torch, target="keras")
    assert not tr.exact and tr.rule.lr_decay == 0.0 and "lr_decay = 0.0" in tr.conditions
    with pytest.raises(ValueError, match="must be a number"):
        uo.translate(uo.adagrad(eps=schedules.cosine(1e-8, steps=5)), target="flux")


def test_radam_is_exact_where_both_first_rectify_at_the_same_step():
    rule = uo.radam(lr=0.05)  # beta2 0.999: rho_5 = 4.99..., rho_6 = 5.99...
    tr = uo.translate(rule, target="optax")  # > 5 vs >= 5: both from t = 6
    assert tr.exact and "first rectified step: 6" in tr.conditions and not tr.rule.eps_hat
    np.testing.assert_allclose(_run(tr.rule), _run(rule), rtol=1e-12)
    tr = uo.translate(rule, target="flux")  # > 4 rectifies from t = 5
    assert not tr.exact and "6 vs 5" in tr.conditions and tr.rule.rectify_threshold == 4.0
    assert np.abs(_run(tr.rule) - _run(rule)).max() > 1e-6


def test_radam_with_a_b2_that_never_rectifies_translates():
    """rho_inf = 2/(1-b2) - 1 <= 5 (b2 <= 2/3): torch's and optax's RAdam never rectify. (For b2
    in (1/2, 2/3], b2**t stops at the least subnormal, and the search for the first rectified
    step never ended.)"""
    tr = uo.translate(uo.radam(lr=0.05, betas=(0.9, 0.6)), target="optax")
    assert tr.exact and "first rectified step: never" in tr.conditions
    # rho_inf = 4.71: Flux's rho_t > 4 from t = 8 (rho_7 = 3.99, rho_8 = 4.19), torch's never
    tr = uo.translate(uo.radam(lr=0.05, betas=(0.9, 0.65)), target="flux")
    assert not tr.exact and "never vs 8" in tr.conditions


def test_nadam_b2_in_root_and_keras_momentum_decay():
    flux = uo.nadam(convention="flux", lr=schedules.cosine(0.05, steps=30))
    tr = uo.translate(flux, target="optax")  # lr and eps over sqrt(b2)
    assert tr.exact and not tr.rule.b2_in_root
    np.testing.assert_allclose(_run(tr.rule), _run(flux), rtol=1e-12)
    tr = uo.translate(uo.nadam(lr=0.05), target="keras")  # keras: momentum_decay is always 1
    assert not tr.exact and tr.conditions == "would be exact with momentum_decay: " \
        "momentum_decay = 1.0" and tr.rule.momentum_decay == 1.0
    assert uo.translate(uo.nadam(lr=0.05, momentum_decay=1.0), target="keras").exact


def test_no_exact_translation_is_explained():
    tr = uo.translate(uo.nadam(), target="optax")
    assert not tr.exact and "no exact translation" in tr.explanation and "μ" in tr.explanation


def _continued(rule, state, p, steps):
    """``steps`` more updates of ``rule`` from ``state`` on the quadratic; the trajectory."""
    a, p, out = np.resize(A, p["x"].shape), {"x": p["x"].copy()}, []
    for _ in range(steps):
        state, p = uo.update(state, p, {"x": a * p["x"]})
        out.append(p["x"])
    return np.array(out)


def _carried(tr, rule, state, p):
    """``state`` of ``rule`` as a state of its translation ``tr.rule``: the step, and every
    slot and tree state under the key that holds it there (the translation's ``state`` names
    each that differs); the numbers as they are."""
    slots = {b: state.slots[a] for (a, _), (b, _) in zip(rule.slot_keys, tr.rule.slot_keys,
                                                          strict=True)}
    trees = {b: state.tree_states[a] for a, b in zip(rule.tree_layout, tr.rule.tree_layout,
                                                     strict=True)}
    return dataclasses.replace(uo.setup(tr.rule, p), step=state.step, slots=slots,
                               tree_states=trees)


def test_a_state_carried_mid_run_as_the_translation_says_steps_on_as_the_source():
    """Every exact translation between conventions, moved after 7 steps: the source's state
    under the target's keys (the translation names each one that differs) continues the
    source's run where the translation says nothing more of the state; where it says more (a
    buffer scaled by lr, a sum of weights rescaled) the state as it is does not."""
    said = 0
    for name, src, tgt, rule, tr in _translations():
        if not tr.exact:
            continue
        p = {"x": np.array([1.0, -2.0, 0.5, 3.0])}
        state = uo.setup(rule, p)
        for _ in range(7):
            state, p = uo.update(state, p, {"x": A * p["x"]})
        for (a, _), (b, _) in zip(rule.slot_keys, tr.rule.slot_keys, strict=True):
            assert a == b or f"{a} -> {b}" in tr.state, (name, src, tgt, tr.state)
        moved = _continued(tr.rule, _carried(tr, rule, state, p), p, 20)
        stayed = _continued(rule, state, p, 20)
        numbers = [c for c in tr.state.split("; ") if c
                   and not c.startswith(("slots:", "tree_states:"))
                   and not c.endswith(": the same")]
        if numbers:
            said += 1
            assert not np.allclose(moved, stayed, rtol=1e-12, atol=1e-15), (name, src, tgt)
        else:
            np.testing.assert_allclose(moved, stayed, rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name}: {src} -> {tgt}, {tr.state!r}")
    assert said >= 2  # SGD's buffer, schedule-free's sum of weights at least


def test_schedule_free_adamw_to_keras_mid_run_rescales_its_sum_of_weights():
    """Meta's schedule-free AdamW weighs each step by lr_max**2, keras's by 1: the tree state's
    running sum of the weights, rescaled as the translation says, continues the run exactly."""
    lr = 0.05
    rule = uo.schedule_free_adamw(lr=lr)
    tr = uo.translate(rule, target="keras")
    assert tr.exact and "weight_sum: times its lr_max**(0.0 - 2.0)" in tr.state
    p = {"x": np.array([1.0, -2.0, 0.5, 3.0])}
    state = uo.setup(rule, p)
    for _ in range(10):
        state, p = uo.update(state, p, {"x": A * p["x"]})
    carried = _carried(tr, rule, state, p)
    tree = carried.tree_states["scale_by_schedule_free"]
    rescaled = dataclasses.replace(carried, tree_states={"scale_by_schedule_free": {
        **tree, "weight_sum": tree["weight_sum"] * tree["lr_max"] ** (0.0 - 2.0)}})
    np.testing.assert_allclose(_continued(tr.rule, rescaled, p, 30),
                               _continued(rule, state, p, 30), rtol=1e-13, atol=1e-15)


def test_a_rule_name_is_built_in_the_source_convention():
    tr = uo.translate("adagrad", source="keras", target="optax")
    assert tr.exact and tr.rule == uo.adagrad(convention="optax", lr=1e-3)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"target": "tensorflow"}, "'tensorflow'"),
    ({"source": "caffe"}, "'caffe'"),
    ({"source": "keras"}, "convention='torch'"),  # the record says otherwise
    ({"target": "optax", "nope": 1}, "'nope'"),
    ({"target": "optax", "convention": "keras"}, "'convention'"),
    ({"rule": "radam", "target": "keras"}, "'keras'"),  # radam has no keras row
    ({"rule": "asgd", "target": "optax"}, "'optax'"),  # asgd has one form, no conventions
])
def test_unknown_frameworks_and_options_raise_naming_the_value(kwargs, named):
    rule = conventions.build(kwargs.pop("rule", "adagrad"))
    with pytest.raises(ValueError, match=named):
        uo.translate(rule, **kwargs)


def test_unknown_rules_raise_naming_the_value():
    with pytest.raises(ValueError, match="'adamz'"):
        uo.translate("adamz", target="optax")
    with pytest.raises(ValueError, match="uniopt rule"):
        uo.translate(uo.schedules.constant(1.0), target="optax")


# --- the page ---------------------------------------------------------------------------------

def test_the_committed_conventions_page_is_the_generated_one():
    page = conventions.page()
    assert "uo.adagrad(convention='keras')" in page and "## adamw" in page
    committed = (ROOT / "docs" / "conventions.md").read_text(encoding="utf-8")
    assert committed == page, (
        "docs/conventions.md is stale: regenerate it with "
        "`uniopt conventions --write docs/conventions.md` (python -m uniopt ...) and commit it")


def test_the_page_reproduces_every_convention_of_every_table():
    page = conventions.page()
    for name, cls in _tables().items():
        for fw in cls.conventions:
            if fw != "torch":
                assert re.search(rf"`uo\.{name}\((lr, )?convention={fw!r}\)`", page), (name, fw)
            assert fw in FRAMEWORKS


# --- no default ascends -----------------------------------------------------------------------

def _defaults():
    """Every rule uniopt exports, in every convention of its table, built from its defaults."""
    out = []
    for name, cls in sorted(vars(uo).items()):
        if not (isinstance(cls, type) and issubclass(cls, uo.Rule)) or cls is uo.Rule:
            continue
        for fw in cls.conventions or [None]:
            out.append(pytest.param(cls, fw, id=f"{name}-{fw or 'torch'}"))
    return out


@pytest.mark.parametrize(("cls", "fw"), _defaults())
def test_no_default_ascends(cls, fw):
    try:
        rule = cls(convention=fw) if fw else cls()
    except TypeError as e:
        pytest.skip(f"{cls.__name__} has no default for a required hyperparameter: {e}")
    if any(isinstance(p, uo.Minimizer) for p in rule.flat_parts):
        pytest.skip(f"{cls.__name__} is stepped with minimize_step (a closure)")
    if any(getattr(p, "reads_value", False) for p in rule.flat_parts):
        pytest.skip(f"{cls.__name__} reads the loss of each step (value=)")
    shape = (3, 4) if cls is uo.muon else None  # muon orthogonalizes matrices
    x = _run(rule, steps=100, shape=shape)
    x0 = np.resize(np.array([1.0, -2.0, 0.5, 3.0]), x.shape[1:])
    loss = lambda x: 0.5 * float(np.sum(np.resize(A, x.shape) * x * x))  # noqa: E731
    assert np.all(np.isfinite(x[-1])) and loss(x[-1]) < loss(x0), (cls.__name__, fw)


def test_optax_adadelta_default_ascends():
    """The contrast (CONVENTIONS.md): optax 0.2.8's adadelta() with its default learning rate
    returns updates with the gradient's sign. If optax fixes it, this fails: say so in
    CONVENTIONS.md and the page."""
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    tx = optax.adadelta()
    x = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    a = jnp.asarray(A)
    state = tx.init(x)
    start = float(0.5 * jnp.sum(a * x * x))
    for _ in range(5):  # it ascends from the first step
        updates, state = tx.update(a * x, state, x)
        x = optax.apply_updates(x, updates)
    assert float(0.5 * jnp.sum(a * x * x)) > start


# Optimisers.jl's _eps: float16 parameters take max(Float16(1e-7), Float16(eps)), 0 staying 0
FLOOR16 = ["adam", "optimistic_adam", "adamax", "nadam", "radam", "rmsprop", "adagrad",
           "adadelta"]


def _float16_run(rule: uo.Transform, lib: str) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = [(40, 3), (7,)]  # the first leaf large enough for the compiled loop
    ps = [rng.standard_normal(s).astype(np.float16) for s in shapes]
    gs = [[(1e-3 * rng.standard_normal(s)).astype(np.float16) for s in shapes]
          for _ in range(4)]
    if lib == "torch":
        torch = pytest.importorskip("torch")
        ps = [torch.tensor(p) for p in ps]
        gs = [[torch.tensor(g) for g in step] for step in gs]
    elif lib == "jax":
        jnp = pytest.importorskip("jax.numpy")
        ps = [jnp.asarray(p) for p in ps]
        gs = [[jnp.asarray(g) for g in step] for step in gs]
    state = uo.setup(rule, ps)
    for g in gs:
        state, ps = uo.update(state, ps, g)
    return [np.asarray(p, dtype=np.float32) for p in ps]


@pytest.mark.parametrize("name", FLOOR16)
@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
def test_flux_float16_eps_floor(name: str, lib: str) -> None:
    """convention="flux" on float16 parameters steps as the same rule with eps = 2^-23
    (Float16(1e-7)) given outright; eps_floor16=False as eps = Float16(1e-8) = 0 would."""
    make = getattr(uo, name)
    kw = {"lr": 1e-3} if name == "optimistic_adam" else {}
    floored = _float16_run(make(convention="flux", eps=1e-8, **kw), lib)
    if name == "adagrad":  # its accumulator starts at eps as given (Optimisers.jl's onevalue)
        kw = {"start_at_eps": False, "initial_accumulator_value": 1e-8}
    explicit = _float16_run(make(convention="flux", eps=2.0**-23, eps_floor16=False, **kw), lib)
    for a, b in zip(floored, explicit, strict=True):
        np.testing.assert_array_equal(a, b)
    plain = {"lr": 1e-3} if name == "optimistic_adam" else {}
    assert make(convention="flux").eps_floor16 and not make(**plain).eps_floor16


def test_a_part_keeps_its_float16_floor_under_jit() -> None:
    """A part given ``eps_floor16`` itself, in a chain built by hand, keeps the floor where
    ``jax.jit`` rebuilds it from the state's leaves: the jitted steps are the NumPy ones, bit
    for bit. ``by_dtype`` was set beside the fields at construction, which the rebuild skips:
    the floor went silently (0.978 for 0.9873 after 3 steps)."""
    jax = pytest.importorskip("jax")
    rule = uo.chain(uo.scale_by_adam(eps=1e-8, eps_floor16=True), uo.scale_by_lr(1e-2))
    g = np.array([2e-7, 5e-6, 1e-3], np.float16)
    pn, pj = [np.ones(3, np.float16)], [jax.numpy.ones(3, jax.numpy.float16)]
    sn, sj = uo.setup(rule, pn), uo.setup(rule, pj)
    step = jax.jit(uo.update)
    for _ in range(3):
        sn, pn = uo.update(sn, pn, [g])
        sj, pj = step(sj, pj, [jax.numpy.asarray(g)])
    np.testing.assert_array_equal(np.asarray(pj[0]), pn[0])
    assert sj.rule.transforms[0].by_dtype


def test_eps_floor16_leaves_other_dtypes_and_zero_alone() -> None:
    part = uo.scale_by_adam(eps=1e-8, eps_floor16=True)
    c = part.coeffs(0)
    assert part.for_dtype(c, np.dtype("float32")) is c
    assert part.for_dtype(c, np.dtype("float16")).eps == 2.0**-23
    assert part.for_dtype(c, "torch.float16").eps == 2.0**-23
    big = uo.scale_by_adam(eps=1e-3, eps_floor16=True)
    assert big.for_dtype(big.coeffs(0), np.dtype("float16")).eps == float(np.float16(1e-3))
    zero = uo.scale_by_adam(eps=0.0, eps_floor16=True)
    assert zero.for_dtype(zero.coeffs(0), np.dtype("float16")).eps == 0.0
    off = uo.scale_by_adam(eps=1e-8)
    assert off.for_dtype(off.coeffs(0), np.dtype("float16")).eps == 1e-8
    assert not uo.adamw(convention="flux").parts()[0].by_dtype  # Optimisers.jl's AdamW: T(eps)


def test_switches_must_be_bools() -> None:
    with pytest.raises(ValueError, match="eps_floor16 must be True or False, got 'yes'"):
        uo.adam(eps_floor16="yes")
    with pytest.raises(ValueError, match="nesterov must be True or False, got 1"):
        uo.sgd(momentum=0.9, nesterov=1)


def test_nesterov_without_momentum_in_the_target_translates():
    """Nesterov where the target's momentum is 0 (Optimisers.jl's RMSProp has none; keras's SGD
    takes nesterov=True at momentum 0): the target steps without it (building it raised that
    Nesterov needs momentum); exact where the source's momentum was 0 too."""
    tr = uo.translate(conventions.build("sgd", "keras", nesterov=True), target="torch")
    assert tr.exact and tr.rule == uo.sgd(lr=0.01)
    np.testing.assert_allclose(_run(tr.rule), _run(conventions.build("sgd", "keras",
                                                                      nesterov=True)),
                               rtol=1e-15)
    tr = uo.translate(conventions.build("rmsprop", "optax", lr=0.01, momentum=0.9,
                                        nesterov=True), target="flux")
    assert not tr.exact and "momentum" in tr.conditions and not tr.rule.nesterov


def test_an_unknown_hyperparameter_is_named_with_the_closest():
    with pytest.raises(ValueError, match=r"adam has no hyperparameter 'betas1'; did you mean "
                                         r"'betas'\?"):
        conventions.build("adam", "optax", betas1=0.9)


@pytest.mark.parametrize(("name", "options"), [
    ("rmsprop", {"nesterov": True, "momentum": 0.9}),
    ("rmsprop", {"initial_scale": 0.1}),
    ("rmsprop", {"bias_correction": True}),
    ("adam", {"eps_root": 1e-3}),
    ("adamw", {"eps_root": 1e-3}),
])
@pytest.mark.parametrize("target", ["torch", "keras"])
def test_an_option_only_optax_has_is_not_exact_elsewhere(name, options, target):
    """optax's rmsprop has Nesterov, an initial accumulator and a bias correction, optax's
    Adam an eps_root; torch's and keras's optimizers have none of them. A translation of a
    source that sets one said "exact" (the printed uniopt rule kept it: no setting of the
    target's own optimizer reproduces the source)."""
    tr = uo.translate(conventions.build(name, "optax", **options), target=target)
    assert not tr.exact, tr
    field = next(k for k in options if k != "momentum")
    assert f"{field} = " in tr.conditions and "only optax's" in tr.explanation


@pytest.mark.parametrize(("rule", "option", "given", "targets"), [
    (uo.adafactor(convention="optax"), "param_scale", False, True),
    (uo.adam(convention="optax"), "eps_root", 1e-8, 0.0),
    (uo.adam(convention="optax", eps_root=1e-8), "eps_root", 1e-8, 0.0),
])
def test_an_option_given_over_a_value_the_target_fixes_names_the_targets(rule, option, given,
                                                                         targets):
    """An option that sets a value the target's optimizer fixes (torch's Adafactor always
    scales by the parameter's rms, torch's Adam has no eps_root) said the target's was the
    value given ("torch's is always False"); the source holding it too said exact."""
    tr = uo.translate(rule, target="torch", **{option: given})
    assert not tr.exact and getattr(tr.rule, option) == given
    assert f"torch's is always {targets!r}, and {option}={given!r} given overrides it" in (
        tr.explanation)
    assert f"{option} = {targets!r}" in tr.conditions


@pytest.mark.parametrize("name", ["adam", "nadam"])
def test_keras_decoupled_decay_to_torch_is_torchs_decoupled_weight_decay(name):
    """keras decays decoupled, ``p −= lr·λ·p`` before the step; torch's Adam and NAdam take that
    form too (``decoupled_weight_decay=True``). The translation keeps it and is exact (it
    forced torch's default L2 term and said no translation was exact) and steps as the source;
    NAdam's (whose eps needs no schedule) as ``torch.optim.NAdam`` so set."""
    source = conventions.build(name, "keras", lr=0.01, eps=1e-3, weight_decay=0.1)
    tr = uo.translate(source, target="torch")
    assert tr.exact, tr
    np.testing.assert_allclose(_run(tr.rule, 100), _run(source, 100), rtol=1e-12, atol=1e-15)
    if name == "adam":  # (its exact form puts eps in a schedule, which torch's Adam lacks)
        return
    torch = pytest.importorskip("torch")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # (torch's per-parameter mu in its default dtype)
    try:
        x = torch.tensor([1.0, -2.0, 0.5, 3.0], requires_grad=True)
        opt = torch.optim.NAdam([x], lr=0.01, eps=1e-3, weight_decay=0.1,
                                momentum_decay=tr.rule.momentum_decay,
                                decoupled_weight_decay=True)
        theirs = []
        for _ in range(100):
            x.grad = torch.from_numpy(A) * x.detach()
            opt.step()
            theirs.append(x.detach().numpy().copy())
    finally:
        torch.set_default_dtype(dtype)
    np.testing.assert_allclose(_run(tr.rule, 100), np.array(theirs), rtol=1e-12)


@pytest.mark.parametrize(("name", "source", "target"), [
    ("nadam", "optax", "torch"), ("nadam", "optax", "keras"), ("nadam", "flux", "torch"),
    ("nadam", "flux", "keras"), ("nadamw", "optax", "torch")])
def test_an_eps_root_the_target_has_not_is_said_not_exact(name, source, target):
    """torch's and keras's NAdam (the dozat momenta) take no eps_root: a translation into
    them sets it to 0 and says so (it raised the dozat form's own check)."""
    rule = getattr(uo, name)(convention=source, eps_root=1e-8)
    tr = uo.translate(rule, target=target)
    assert tr.rule.eps_root == 0.0 and not tr.exact
    assert "eps_root = 0.0" in tr.conditions
    assert uo.translate(getattr(uo, name)(convention=source), target=target).rule.eps_root == 0


def test_options_exact_under_their_conditions_say_so():
    """ademamix's decay forms agree without decay; schedule-free's lagged lr agrees at a
    constant lr without warm-up (the same steps: the test above runs them)."""
    cases = [(uo.ademamix(convention="optax", weight_decay=0.0), "torch", True),
             (uo.ademamix(convention="optax", weight_decay=0.1), "torch", False),
             (uo.schedule_free_sgd(lr=0.1), "optax", True),
             (uo.schedule_free_adamw(lr=schedules.cosine(0.1, 10)), "optax", False),
             (uo.schedule_free_adamw(warmup_steps=5), "optax", False)]
    for rule, target, exact in cases:
        tr = uo.translate(rule, target=target)
        assert tr.exact == exact, (rule, tr)
        if exact:
            np.testing.assert_allclose(_run(tr.rule), _run(rule), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_as_tensorflow_1_and_stable_baselines3_write_it(momentum: float) -> None:
    """TensorFlow 1's RMSProp (Stable-Baselines3's RMSpropTFLike, A2C's default) starts its
    accumulator at 1 and takes eps inside the root: ms = a ms + (1-a) g², mom = m mom +
    lr g/sqrt(ms + eps), p -= mom; written here from that definition, 50 steps."""
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(5) for _ in range(50)]
    lr, alpha, eps = 7e-4, 0.99, 1e-5
    p = rng.standard_normal(5)
    ms, mom, want = np.ones(5), np.zeros(5), p.copy()
    for g in grads:
        ms = alpha * ms + (1 - alpha) * g * g
        mom = momentum * mom + lr * g / np.sqrt(ms + eps)
        want = want - mom
    rule = uo.rmsprop(lr=lr, alpha=alpha, eps=eps, momentum=momentum, eps_in_sqrt=True,
                      initial_scale=1.0)
    params = [p.copy()]
    state = uo.setup(rule, params)
    for g in grads:
        state = uo.update_(state, params, [g])
    np.testing.assert_allclose(params[0], want, rtol=1e-14, atol=0)


# --- every rule, every option ------------------------------------------------------------------

def _built(name: str, fw: str | None = None, **hyper):
    """``conventions.build``, with a learning rate where the rule requires one (optimistic_adam,
    as optax)."""
    try:
        return conventions.build(name, fw, **hyper)
    except TypeError:
        return conventions.build(name, fw, lr=0.01, **hyper)


def test_every_rule_prints_its_call_and_its_translations() -> None:
    """Every rule of the registry: ``call`` writes it (it read the ``convention`` field of a rule
    without one: KeyError for lamb, ftrl and the other 34), a translation into each of its
    frameworks prints, and a rule with one form says so for every framework (a translation of
    it printed a KeyError, and named torch's form, which lamb, ftrl and yogi are not)."""
    checked = 0
    for name, cls in conventions.rules().items():
        rule = _built(name)
        assert conventions.call(rule).startswith(f"uo.{name}("), name
        if not cls.conventions:
            assert "convention=" not in conventions.call(rule)
            for fw in FRAMEWORKS:
                with pytest.raises(ValueError, match=rf"^translate: {name} has one form, no "
                                                     rf"conventions .*: no '{fw}' convention"):
                    uo.translate(rule, target=fw)
                with pytest.raises(ValueError, match=rf"^{name} has one form, no conventions"):
                    conventions.build(name, fw)
            continue
        for fw in cls.conventions:
            text = str(uo.translate(rule, target=fw))
            assert text.startswith(f"{name}: {rule.convention} -> {fw}\n"), text
            checked += 1
    assert checked > 60


def test_a_rule_name_without_a_source_is_its_default_conventions() -> None:
    """``translate("lion", target="keras")`` builds ``uo.lion()``, the paper's (it built torch's,
    which lion has not: ValueError)."""
    tr = uo.translate("lion", target="keras")
    assert tr.source == "paper" and tr.exact and tr.rule == uo.lion(convention="keras", lr=1e-4)
    assert uo.translate("ademamix", target="torch").source == "optax"
    assert conventions.build("lion") == uo.lion()


@pytest.mark.parametrize(("rule", "target", "field", "value"), [
    (uo.adam(convention="optax", eps_root=1e-3), "flux", "eps_root", 0.0),
    (uo.adamw(convention="optax", eps_root=1e-3), "flux", "eps_root", 0.0),
    (uo.nadam(convention="optax", eps_root=1e-3), "flux", "eps_root", 0.0),
    (uo.radam(convention="optax", eps_root=1e-3), "torch", "eps_root", 0.0),
    (uo.radam(convention="optax", eps_root=1e-3), "flux", "eps_root", 0.0),
    (uo.amsgrad(eps_root=1e-3), "torch", "eps_root", 0.0),
    (uo.ademamix(eps_root=1e-3), "torch", "eps_root", 0.0),
    (uo.adamw(amsgrad=True, weight_decay=0.1), "flux", "amsgrad", False),
    (uo.adamw(amsgrad=True, weight_decay=0.1), "optax", "amsgrad", False),
    (uo.adafactor(param_scale=False, convention="optax"), "keras", "param_scale", True),
    (uo.adopt(nesterov=True), "torch", "nesterov", False),
    (uo.prodigy(decouple=False, weight_decay=0.1), "optax", "decouple", True),
    (uo.prodigy(growth_rate=1.02), "optax", "growth_rate", None),
    (uo.schedule_free_sgd(r=0.5), "optax", "r", 0.0),
    (uo.schedule_free_adamw(r=0.5), "keras", "r", 0.0),
])
def test_a_hyperparameter_the_target_has_not_is_said_not_exact(rule, target, field, value):
    """Optimisers.jl's Adam, AdamW and NAdam and torch's RAdam take no eps_root; optax's and
    Optimisers.jl's AdamW no AMSGrad; ...: the translation sets the target's value and says it
    is not exact (it kept the source's and said exact, a record no setting of the target's own
    optimizer reproduces)."""
    tr = uo.translate(rule, target=target)
    assert not tr.exact and getattr(tr.rule, field) == value, tr
    assert f"{field}: {field} = {value!r}" in tr.conditions, tr.conditions


def test_lions_decay_without_lr_is_keras_and_optaxs_at_a_constant_lr() -> None:
    """keras's and optax's Lion decay by lr·weight_decay; lion_pytorch's
    ``decoupled_weight_decay`` (couple_lr=False) by weight_decay alone. The translation
    rescales the decay, exact at a constant lr (it kept couple_lr=False, which neither has)."""
    source = uo.lion(lr=0.01, weight_decay=0.1, couple_lr=False)
    for target in ("keras", "optax"):
        tr = uo.translate(source, target=target)
        assert tr.rule.couple_lr and tr.rule.weight_decay == pytest.approx(10.0), tr
        assert tr.exact and tr.conditions == "constant lr", tr
        np.testing.assert_allclose(_run(tr.rule), _run(source), rtol=1e-12, atol=1e-15)
    tr = uo.translate(uo.lion(lr=schedules.cosine(0.01, 30), weight_decay=0.1, couple_lr=False),
                      target="keras")
    assert not tr.exact and "λ/lr(t)" in tr.explanation
    back = uo.translate(tr.rule, target="paper", couple_lr=False)  # (a product schedule)
    assert not back.rule.couple_lr and back.exact


def test_every_option_is_the_targets_own_or_said_not_to_be() -> None:
    """Every option (a flag or a name) of every rule with conventions, in each of its
    frameworks: a row sets it, the framework offers either value (EITHER), FIXED holds it at
    the one it has, or an OPTIONS entry moves the rule across it. An option none of them
    names is its default in the target (lion's couple_lr and AdamW's amsgrad were kept into
    keras, optax and Optimisers.jl, which have neither)."""
    missing = []
    for name, cls in _tables().items():
        in_rows = {k for row in cls.conventions.values() for k in row}
        for k in conventions._fields(cls):
            if not conventions._is_option(cls, k) or k in in_rows:
                continue
            for fw in cls.conventions:
                if not (k in conventions.EITHER.get((name, fw), ())
                        or k in conventions.FIXED.get(name, {}).get(fw, {})
                        or (name, k) in conventions._OPTION_OF):
                    missing.append((name, k, fw))
    assert missing == []


def _variants(cls, source: str):
    """The source's own record, and each field moved off its value there: a flag flipped, a
    name to another row's, a number halved (0 to 0.01; an integer + 1, 0 to 3)."""
    yield {}
    row = cls.conventions.get(source, {})
    for k, f in conventions._fields(cls).items():
        d = row.get(k, conventions._default(f))
        if k == "convention" or isinstance(d, uo.base.ByFields):
            continue
        if isinstance(d, bool):
            values = [not d]
        elif isinstance(d, str):
            values = sorted({r[k] for r in cls.conventions.values()
                             if isinstance(r.get(k), str)} - {d})
        elif isinstance(d, int):
            values = [d + 1 if d else 3]
        elif isinstance(d, float):
            values = [d * 0.5 if d else 0.01]
        else:
            values = []
        for v in values:
            yield {k: v}


@pytest.mark.slow  # 670 exact translations, 30 steps each
def test_every_exact_translation_of_every_option_gives_the_same_steps() -> None:
    """Every ordered pair of every rule's conventions, from the source's record and from each
    record with one field moved: where the translation says exact, 30 steps of it are the
    source's."""
    checked = 0
    for name, cls in _tables().items():
        shape = (3, 4) if name in ("adafactor", "muon") else None
        for src in cls.conventions:
            for moved in _variants(cls, src):
                try:
                    rule = conventions.build(name, src, **{"lr": 0.05, **moved})
                except (TypeError, ValueError):  # (a value the source refuses)
                    continue
                steps = None
                for tgt in cls.conventions:
                    tr = uo.translate(rule, target=tgt)
                    if tgt == src or not tr.exact:
                        continue
                    if steps is None:
                        steps = _run(rule, shape=shape)
                    np.testing.assert_allclose(_run(tr.rule, shape=shape), steps, rtol=1e-12,
                                               atol=1e-15,
                                               err_msg=f"{name}: {src} -> {tgt}, {moved}")
                    checked += 1
    assert checked > 600


def test_the_optimisers_jl_remark_is_sgds_only() -> None:
    """The state line names Optimisers.jl's Nesterov buffer for SGD, whose sutskever form is
    Optimisers.jl's, not for optax's RMSprop with Nesterov."""
    for rule, target in [(uo.rmsprop(lr=0.01, momentum=0.9, nesterov=True, convention="optax"),
                          "torch"),
                         (uo.rmsprop(lr=0.01, momentum=0.9, nesterov=True), "optax")]:
        state = uo.translate(rule, target=target).state
        assert "buffer:" in state and "Optimisers.jl" not in state, state
    assert "Optimisers.jl's Nesterov stores −v" in uo.translate(
        uo.sgd(0.01, momentum=0.9, nesterov=True), target="flux").state


def test_nesterov_asked_of_a_target_without_momentum_says_what_it_became() -> None:
    """``translate("sgd", "flux", "torch", nesterov=True)``: Descent has no momentum, so the
    target steps without Nesterov, and the explanation says so (it said "True in torch" of a
    rule with nesterov=False, and not exact)."""
    tr = uo.translate("sgd", "flux", "torch", nesterov=True)
    assert tr.rule == uo.sgd(lr=0.1) and tr.exact, tr
    assert "nesterov=True asked of torch, whose momentum here is 0" in tr.explanation
    assert "nesterov=False" in tr.explanation and "True in torch" not in tr.explanation

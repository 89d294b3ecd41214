"""adabelief, yogi, amsgrad, adamaxw and nadamw against optax (under ``jax.jit``, x64) and,
where torch has the algorithm (AMSGrad, NAdamW), against torch.optim in float64.

Both sides run free for 300 steps in float64, each computing its gradient at its own
parameters, so a wrong step anywhere shows in every later one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from free_run import (
    LR_SCHEDULE,
    TOL,
    grad_at,
    optax_schedule,
    run_optax,
    run_ours,
    run_torch,
    start_of,
    worst_of,
)
from helpers import rel_diff


def _hp(seed: int) -> dict[str, float]:
    """Random valid hyperparameters: betas far from 1 and large eps, so the moments' forms and
    eps's placement decide the result."""
    rng = np.random.default_rng(2000 + seed)
    return dict(lr=float(rng.uniform(1e-3, 3e-2)), b1=float(rng.uniform(0.5, 0.95)),
                b2=float(rng.uniform(0.8, 0.999)), eps=float(10 ** rng.uniform(-8, -2)),
                eps_root=float(rng.choice([0.0, 10 ** rng.uniform(-8, -3)])),
                wd=float(rng.uniform(0.0, 0.5)))


# --- against optax -----------------------------------------------------------------------------


def _pair(name: str, optax: Any, lr: Any, their_lr: Any, h: dict[str, float]) -> tuple[Any, Any]:
    """Our rule and optax's, with the hyperparameters ``h``."""
    betas, b = (h["b1"], h["b2"]), dict(b1=h["b1"], b2=h["b2"])
    eps, root, wd = h["eps"], h["eps_root"], h["wd"]
    if name == "adabelief":
        return (uo.adabelief(lr, betas=betas, eps=eps, eps_root=root),
                optax.adabelief(their_lr, **b, eps=eps, eps_root=root))
    if name == "adabelief_nesterov":
        return (uo.adabelief(lr, betas=betas, eps=eps, eps_root=root, nesterov=True),
                optax.adabelief(their_lr, **b, eps=eps, eps_root=root, nesterov=True))
    if name == "yogi":  # optax.yogi passes neither eps_root nor the initial value
        return (uo.yogi(lr, betas=betas, eps=eps), optax.yogi(their_lr, **b, eps=eps))
    if name == "amsgrad":
        return (uo.amsgrad(lr, betas=betas, eps=eps, eps_root=root),
                optax.amsgrad(their_lr, **b, eps=eps, eps_root=root))
    if name == "amsgrad_nu":  # optax's bias_correction_nu=False
        return (uo.amsgrad(lr, betas=betas, eps=eps, eps_root=root, amsgrad_max="raw_uncorrected"),
                optax.amsgrad(their_lr, **b, eps=eps, eps_root=root, bias_correction_nu=False))
    if name == "adamaxw":
        return (uo.adamaxw(lr, betas=betas, eps=eps, weight_decay=wd),
                optax.adamaxw(their_lr, **b, eps=eps, weight_decay=wd))
    assert name == "nadamw"
    return (uo.nadamw(lr, betas=betas, eps=eps, eps_root=root, weight_decay=wd),
            optax.nadamw(their_lr, **b, eps=eps, eps_root=root, weight_decay=wd))


NAMES = ["adabelief", "adabelief_nesterov", "yogi", "amsgrad", "amsgrad_nu", "adamaxw", "nadamw"]


def _defaults(name: str, optax: Any, lr: Any, their_lr: Any) -> tuple[Any, Any]:
    """Our rule and optax's with optax's defaults (AdaBelief's eps and eps_root 1e-16, Yogi's
    eps 1e-3 and moments from 1e-6, AdamaxW's and NAdamW's weight_decay 1e-4)."""
    ours = {"adabelief": uo.adabelief, "adabelief_nesterov": uo.adabelief, "yogi": uo.yogi,
            "amsgrad": uo.amsgrad, "amsgrad_nu": uo.amsgrad, "adamaxw": uo.adamaxw,
            "nadamw": uo.nadamw}[name]
    theirs = getattr(optax, name.removesuffix("_nesterov").removesuffix("_nu"))
    if name == "amsgrad_nu":
        return (ours(lr, amsgrad_max="raw_uncorrected"),
                theirs(their_lr, bias_correction_nu=False))
    if name.endswith("_nesterov"):
        return ours(lr, nesterov=True), theirs(their_lr, nesterov=True)
    return ours(lr), theirs(their_lr)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_matches_optax(jx: Any, name: str) -> None:
    """Two random hyperparameter sets at a constant lr, and optax's defaults under the cosine
    schedule."""
    optax = pytest.importorskip("optax")
    for seed in (0, 1):
        h = _hp(seed)
        ours, theirs = _pair(name, optax, h["lr"], h["lr"], h)
        err = worst_of(run_ours(ours, seed), run_optax(jx, theirs, seed))
        assert err < TOL, (name, h, err)
    ours, theirs = _defaults(name, optax, LR_SCHEDULE, optax_schedule(optax))
    err = worst_of(run_ours(ours, 2), run_optax(jx, theirs, 2))
    assert err < TOL, (name, err)


@pytest.mark.slow
def test_a_different_form_is_caught(jx: Any) -> None:
    """The comparison sees the forms these rules exist for: torch's AMSGrad maximum (of the
    raw v), Yogi's moments from 0, AdaBelief without eps_root, NAdamW without Nesterov."""
    optax = pytest.importorskip("optax")
    h = _hp(4)
    b = dict(b1=h["b1"], b2=h["b2"])
    cases = [
        (uo.amsgrad(0.01, convention="torch"), optax.amsgrad(0.01)),
        (uo.amsgrad(0.01), optax.amsgrad(0.01, bias_correction_nu=False)),
        (uo.yogi(0.01, initial_accumulator_value=0.0), optax.yogi(0.01)),
        (uo.adabelief(0.01, eps=1e-3, eps_root=1e-4),
         optax.adabelief(0.01, eps=1e-3 + 1e-4**0.5, eps_root=0.0)),
        (uo.nadamw(0.01, betas=(h["b1"], h["b2"])), optax.adamw(0.01, **b)),
    ]
    for ours, theirs in cases:  # 60 steps show it
        assert worst_of(run_ours(ours, 4, 60), run_optax(jx, theirs, 4, 60)) > 1e-9, ours


@pytest.mark.slow
def test_adamaxw_mask_is_a_partition(jx: Any) -> None:
    """optax's ``mask`` on the decay: ``uo.partition`` of a decayed and an undecayed record."""
    optax = pytest.importorskip("optax")
    mask = {k: k != "x1" for k in ("x0", "x1", "x2")}
    ours = uo.partition({"decay": uo.adamaxw(0.02, weight_decay=0.3),
                         "plain": uo.adamaxw(0.02, weight_decay=0.0)},
                        {k: "decay" if v else "plain" for k, v in mask.items()})
    theirs = optax.adamaxw(0.02, weight_decay=0.3, mask=mask)
    assert worst_of(run_ours(ours, 5), run_optax(jx, theirs, 5)) < TOL


# --- against torch ------------------------------------------------------------------------------


@pytest.mark.slow
def test_amsgrad_torch_convention_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    h = _hp(6)
    ours = uo.amsgrad(h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], convention="torch")
    theirs = run_torch(lambda ps: torch.optim.Adam(ps, lr=h["lr"], betas=(h["b1"], h["b2"]),
                                                eps=h["eps"], amsgrad=True), 6)
    assert worst_of(run_ours(ours, 6), theirs) < TOL


@pytest.mark.slow
def test_nadamw_torch_convention_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    h = _hp(7)
    kw = dict(lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], weight_decay=h["wd"])
    ours = uo.nadamw(**kw, momentum_decay=0.01, convention="torch")
    # torch keeps NAdam's product of momenta in a tensor of its default dtype: float64 here,
    # as ours (uniopt.nadam's scalar_dtype="float32" follows torch's float32 default)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = run_torch(lambda ps: torch.optim.NAdam(ps, **kw, momentum_decay=0.01,
                                                     decoupled_weight_decay=True), 7)
    finally:
        torch.set_default_dtype(saved)
    assert worst_of(run_ours(ours, 7), theirs) < TOL


def test_defaults_per_convention() -> None:
    assert uo.amsgrad().amsgrad_max == "corrected"
    assert uo.amsgrad(convention="torch").amsgrad_max == "raw"
    assert uo.nadamw(convention="torch").lr == 2e-3
    assert uo.nadamw(convention="torch").momentum_schedule == "dozat"
    assert uo.nadamw().weight_decay == uo.adamaxw().weight_decay == 1e-4
    assert (uo.yogi().eps, uo.yogi().initial_accumulator_value) == (1e-3, 1e-6)
    assert (uo.adabelief().eps, uo.adabelief().eps_root) == (1e-16, 1e-16)


# --- the other array libraries, the in-place update ---------------------------------------------


RULES = {
    "adabelief": lambda: uo.adabelief(0.01, eps=1e-6, eps_root=1e-8, nesterov=True),
    "yogi": lambda: uo.yogi(0.01, betas=(0.8, 0.9)),
    "amsgrad": lambda: uo.amsgrad(0.01, eps_root=1e-6),
    "adamaxw": lambda: uo.adamaxw(0.01, weight_decay=0.3),
    "nadamw": lambda: uo.nadamw(0.01, weight_decay=0.3),
    "nadamw_torch": lambda: uo.nadamw(0.01, weight_decay=0.3, convention="torch"),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_torch_jax_and_in_place_match_numpy(jx: Any, name: str) -> None:
    torch = pytest.importorskip("torch")
    jnp = jx.numpy
    rule = RULES[name]()
    params, noises = start_of(8)
    ref = run_ours(rule, 8)[:20]
    runs: dict[str, Any] = {
        "torch": {k: torch.tensor(v) for k, v in params.items()},
        "jax": {k: jnp.asarray(v) for k, v in params.items()},
        "in_place": {k: v.copy() for k, v in params.items()},
    }
    for label, p in runs.items():
        if label == "jax" and name == "nadamw_torch":
            continue  # NAdam's momentum products are computed on the host from a Python step
        state = uo.setup(rule, p)
        for i, noise in enumerate(noises[:20]):
            g = {k: grad_at(np.asarray(v), noise[k]) for k, v in p.items()}
            if label == "in_place":
                state = uo.update_(state, p, g)
            else:
                as_lib = torch.tensor if label == "torch" else jnp.asarray
                state, p = uo.update(state, p, {k: as_lib(v) for k, v in g.items()})
            assert max(rel_diff(np.asarray(p[k]), ref[i][k]) for k in p) < TOL, (label, i)


# --- bad hyperparameters ------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: uo.adabelief(lr=-1.0), r"^adabelief: lr must be >= 0, got -1\.0$"),
    (lambda: uo.adabelief(betas=(0.9, 1.0)),
     r"^adabelief: betas\[1\] must be in \[0, 1\), got 1\.0$"),
    (lambda: uo.adabelief(eps_root=-1e-16), r"^adabelief: eps_root must be >= 0, got -1e-16$"),
    (lambda: uo.yogi(eps=-1e-3), r"^yogi: eps must be >= 0, got -0\.001$"),
    (lambda: uo.yogi(initial_accumulator_value=-1.0),
     r"^yogi: initial_accumulator_value must be >= 0, got -1\.0$"),
    (lambda: uo.amsgrad(amsgrad_max="uncorrected"),
     r"^amsgrad: amsgrad_max must be one of 'corrected', 'raw', 'raw_uncorrected', "
     r"got 'uncorrected'$"),
    (lambda: uo.amsgrad(convention="keras"),
     r"^amsgrad: convention must be one of 'optax', 'torch', got 'keras'$"),
    (lambda: uo.adamaxw(weight_decay=-0.1), r"^adamaxw: weight_decay must be >= 0, got -0\.1$"),
    (lambda: uo.nadamw(momentum_schedule="linear"),
     r"^nadamw: momentum_schedule must be one of 'dozat', 'constant', got 'linear'$"),
    (lambda: uo.nadamw(eps_root=1e-8, convention="torch"),
     r"^nadamw: eps_root is an option of momentum_schedule='constant', got eps_root=1e-08 "
     r"with 'dozat'$"),
    (lambda: uo.nadamw(momentum_decay=-1.0), r"^nadamw: momentum_decay must be >= 0, got -1\.0$"),
])
def test_bad_hyperparameters_are_named(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()

"""docs/coming-from/optimisers-jl.md's rows against Optimisers.jl's rules, written here from the
formulas of its ``src/rules.jl`` (Julia does not run here), for the rules whose flux form no
``formula:Optimisers.*`` registry test holds already: 200 float64 steps each side, every
gradient taken at that side's own params, to 1e-12 relative.

Each peer is ``(init(x) -> state, apply(state, x, g) -> (state, delta))``; ``x <- x - delta``, and
a delta of None moves nothing (``AccumGrad`` between its updates).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import uniopt as uo
from helpers import rel_diff

Peer = tuple[Callable[[np.ndarray], Any], Callable[[Any, np.ndarray, np.ndarray], Any]]
SHAPES = [(7,), (4, 5), (3, 2, 2)]


def descent(eta: float) -> Peer:
    return (lambda x: None), (lambda s, x, g: (s, g * eta))


def nesterov(eta: float, rho: float) -> Peer:
    def apply(v: Any, x: Any, g: Any) -> Any:  # the old velocity in the step, then the new
        return rho * v - eta * g, -(rho**2) * v + (1 + rho) * eta * g
    return np.zeros_like, apply


def rprop(eta: float, ell: tuple[float, float], gamma: tuple[float, float]) -> Peer:
    def apply(s: Any, x: Any, g: Any) -> Any:
        prev, step = s
        prod = prev * g
        step = np.where(prod > 0, np.minimum(step * ell[1], gamma[1]),
                        np.where(prod < 0, np.maximum(step * ell[0], gamma[0]), step))
        prev = np.where(prod < 0, 0.0, g)
        return (prev, step), step * np.sign(prev)
    return (lambda x: (np.zeros_like(x), np.full_like(x, eta))), apply


def amsgrad(eta: float, beta: tuple[float, float], eps: float) -> Peer:
    def apply(s: Any, x: Any, g: Any) -> Any:  # every moment starts at eps
        m, v, vh = s
        m = beta[0] * m + (1 - beta[0]) * g
        v = beta[1] * v + (1 - beta[1]) * g**2
        vh = np.maximum(vh, v)
        return (m, v, vh), eta * m / (np.sqrt(vh) + eps)
    return (lambda x: tuple(np.full_like(x, eps) for _ in range(3))), apply


def adabelief(eta: float, beta: tuple[float, float], eps: float) -> Peer:
    def apply(s: Any, x: Any, g: Any) -> Any:
        m, st, bt = s
        m = beta[0] * m + (1 - beta[0]) * g
        st = beta[1] * st + (1 - beta[1]) * (g - m) ** 2 + eps
        d = eta * m / (1 - bt[0]) / (np.sqrt(st / (1 - bt[1])) + eps)
        return (m, st, (bt[0] * beta[0], bt[1] * beta[1])), d
    return (lambda x: (np.zeros_like(x), np.zeros_like(x), beta)), apply


def lion(eta: float, beta: tuple[float, float]) -> Peer:
    def apply(m: Any, x: Any, g: Any) -> Any:  # beta[1] weighs the gradient, as rules.jl has it
        m = beta[1] * g + (1 - beta[1]) * m
        return m, eta * np.sign((beta[1] - beta[0]) * g + beta[0] * m)
    return np.zeros_like, apply


def decay(lam: float) -> Peer:
    return (lambda x: None), (lambda s, x, g: (s, g + lam * x))


def sign_decay(lam: float) -> Peer:
    return (lambda x: None), (lambda s, x, g: (s, g + lam * np.sign(x)))


def clip_grad(delta: float) -> Peer:
    return (lambda x: None), (lambda s, x, g: (s, np.clip(g, -delta, delta)))


def clip_norm(omega: float) -> Peer:
    return (lambda x: None), (lambda s, x, g: (s, g * min(omega / np.linalg.norm(g), 1.0)))


def momentum(eta: float, rho: float) -> Peer:
    def apply(v: Any, x: Any, g: Any) -> Any:
        v = rho * v + eta * g
        return v, v
    return np.zeros_like, apply


def accum(n: int) -> Peer:
    def apply(s: Any, x: Any, g: Any) -> Any:
        acc, c = s
        acc = g / n if c == 1 else acc + g / n
        return ((acc, 1), acc) if c == n else ((acc, c + 1), None)
    return (lambda x: (np.zeros_like(x), 1)), apply


def chain(*peers: Peer) -> Peer:
    def apply(states: Any, x: Any, g: Any) -> Any:
        new = []
        for (_, step), st in zip(peers, states, strict=True):
            if g is None:  # (an accumulation between its updates: the rest wait)
                new.append(st)
                continue
            st, g = step(st, x, g)
            new.append(st)
        return new, g
    return (lambda x: [init(x) for init, _ in peers]), apply


F32 = float(np.float32(0.1))  # Descent's default, the Float32 literal 0.1f0, in float64
ROWS: dict[str, tuple[Peer, uo.Transform]] = {
    "Descent()": (descent(F32), uo.sgd(lr=F32, convention="flux")),
    "Nesterov()": (nesterov(1e-3, 0.9), uo.sgd(momentum=0.9, nesterov=True, convention="flux")),
    "Nesterov(0.01, 0.8)": (nesterov(0.01, 0.8),
                            uo.sgd(0.01, momentum=0.8, nesterov=True, convention="flux")),
    "Rprop()": (rprop(1e-3, (0.5, 1.2), (1e-6, 50.0)), uo.rprop(lr=1e-3, clamp_kept=False)),
    "Rprop(0.1, Γ=(1e-3, 0.05))": (rprop(0.1, (0.5, 1.2), (1e-3, 0.05)),
                                   uo.rprop(lr=0.1, step_sizes=(1e-3, 0.05), clamp_kept=False)),
    "AMSGrad()": (amsgrad(1e-3, (0.9, 0.999), 1e-8), uo.adam(amsgrad=True, convention="flux")),
    "AdaBelief()": (adabelief(1e-3, (0.9, 0.999), 1e-16), uo.adabelief(1e-3)),
    # (its one ϵ is optax's eps_root and eps both: eps alone was 0.037 off after 20 steps)
    "AdaBelief(0.01, (0.8, 0.99), 1e-3)": (
        adabelief(0.01, (0.8, 0.99), 1e-3),
        uo.adabelief(0.01, betas=(0.8, 0.99), eps=1e-3, eps_root=1e-3)),
    "Lion()": (lion(1e-3, (0.9, 0.999)),
               uo.lion(lr=1e-3, betas=(0.9 * (1 - 0.999) / 0.999, 1 - 0.999))),
    "Lion(0.01, (0.9, 0.99))": (lion(0.01, (0.9, 0.99)),
                                uo.lion(lr=0.01, betas=(0.9 * 0.01 / 0.99, 0.01))),
    "OptimiserChain(WeightDecay(), Momentum())": (
        chain(decay(5e-4), momentum(0.01, 0.9)),
        uo.chain(uo.weight_decay(5e-4), uo.sgd(momentum=0.9, convention="flux"))),
    "OptimiserChain(Momentum(), SignDecay())": (
        chain(momentum(0.01, 0.9), sign_decay(1e-3)),
        uo.chain(uo.sgd(momentum=0.9, convention="flux"), uo.sign_decay(1e-3))),
    "OptimiserChain(ClipGrad(0.3), Descent())": (
        chain(clip_grad(0.3), descent(F32)),
        uo.chain(uo.clip(0.3), uo.sgd(lr=F32, convention="flux"))),
    "OptimiserChain(ClipNorm(0.5), Momentum())": (
        chain(clip_norm(0.5), momentum(0.01, 0.9)),
        uo.chain(uo.clip_by_norm(0.5), uo.sgd(momentum=0.9, convention="flux"))),
    "OptimiserChain(AccumGrad(3), Momentum())": (
        chain(accum(3), momentum(0.01, 0.9)),
        uo.accumulate(uo.sgd(momentum=0.9, convention="flux"), 3)),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_the_rows_rule_is_optimisers_jls(row: str) -> None:
    (init, apply), rule = ROWS[row]
    rng = np.random.default_rng(len(row))
    start = [rng.standard_normal(s) for s in SHAPES]
    noises = [[0.3 * rng.standard_normal(s) for s in SHAPES] for _ in range(200)]
    ours, theirs = [x.copy() for x in start], [x.copy() for x in start]
    state, peer = uo.setup(rule, ours), [init(x) for x in theirs]
    for noise in noises:
        state, ours = uo.update(state, ours, [np.tanh(x) / 2 + n for x, n in
                                              zip(ours, noise, strict=True)])
        for i, (x, n) in enumerate(zip(theirs, noise, strict=True)):
            peer[i], delta = apply(peer[i], x, np.tanh(x) / 2 + n)
            if delta is not None:
                theirs[i] = x - delta
    for a, b in zip(ours, theirs, strict=True):
        assert rel_diff(a, b) <= 1e-12, row


def test_the_papers_lion_is_not_optimisers_jls() -> None:
    """``uo.lion(betas=(0.9, 0.999))`` is the paper's rule, not ``Lion(β = (0.9, 0.999))``."""
    (init, apply), _ = ROWS["Lion()"]
    x = np.linspace(-1, 1, 9)
    state, ours = uo.setup(uo.lion(lr=1e-3, betas=(0.9, 0.999)), [x.copy()]), [x.copy()]
    peer, theirs = init(x), x.copy()
    for k in range(20):
        g = np.cos(x * (k + 1))
        state, ours = uo.update(state, ours, [g])
        peer, delta = apply(peer, theirs, g)
        theirs = theirs - delta
    assert rel_diff(ours[0], theirs) > 1e-6


def test_sign_decay_is_the_l1_subgradient_and_refuses_a_negative_strength() -> None:
    p = [np.array([2.0, 0.0, -0.5, np.nan])]
    _, [new] = uo.update(uo.setup(uo.sign_decay(0.1), p), p, [np.zeros(4)])
    np.testing.assert_array_equal(new[:3], [1.9, 0.0, -0.4])
    assert np.isnan(new[3])
    with pytest.raises(ValueError, match=r"sign_decay: wd must be >= 0, got -0.1"):
        uo.sign_decay(-0.1)


def test_every_row_of_the_page_is_held_here_or_by_a_formula_test() -> None:
    """Each Optimisers.jl rule docs/coming-from/optimisers-jl.md maps is one ROWS holds, or one
    whose flux form a registry entry's ``formula:Optimisers.*`` test holds (MixedPrecision has
    no counterpart to hold; OptimiserChain is every chain above)."""
    from pathlib import Path

    from uniopt import registry

    page = (Path(__file__).resolve().parents[1] / "docs" / "coming-from"
            / "optimisers-jl.md").read_text(encoding="utf-8")
    table = page[page.index("Every rule Optimisers.jl exports"):]
    mapped = {n for line in table.splitlines() if line.startswith("| `")
              for n in re.findall(r"`?(\w+)\(|`(\w+)`", line.split(" | ")[0])
              for n in n if n}
    held = {n for key in ROWS for n in re.findall(r"(\w+)\(", key)}
    held |= {r.split("formula:Optimisers.")[1] for e in registry.entries().values()
             for r in e.references if r.startswith("formula:Optimisers.")}
    assert mapped - held - {"MixedPrecision", "OptimiserChain"} == set()

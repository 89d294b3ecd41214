"""Conventions: how each framework writes each rule, and :func:`translate` between them.

Everything here is data read by the code and by the docs alike: each rule's own ``conventions``
table (framework -> the options and defaults that reproduce it, see :class:`uniopt.Rule`),
:data:`FORMULAS` (each framework's update, as its sources write it), :data:`OPTIONS` (for each
option that tells two conventions apart: how to move a rule across it, and when that is exact),
:data:`FIXED` (hyperparameters a framework's optimizer does not have, and the value it always
uses) and :data:`NO_EXACT` (why some forms have no exact translation at all). :func:`page` renders
``docs/conventions.md`` from them (``uniopt conventions --write docs/conventions.md``).

"Exact" means the same arithmetic: the two records give the same parameters step after step,
up to the order of floating-point rounding, under the stated conditions.

>>> import uniopt as uo
>>> tr = uo.translate(uo.adamw(lr=1e-3, weight_decay=1e-2), source="torch", target="flux")
>>> tr.rule.couple_lr, tr.exact  # Optimisers.jl >= 0.4 AdamW: couple=true, torch's form
(True, True)
>>> tr = uo.translate(uo.adamw(lr=1e-3, weight_decay=1e-2), target="flux", couple_lr=False)
>>> tr.rule.couple_lr, tr.rule.lr, round(tr.rule.weight_decay, 12), tr.exact
(False, 0.001, 1e-05, True)
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import pkgutil
import re
from collections.abc import Callable
from typing import Any

from . import rules as _rules_package
from . import schedules
from .base import FRAMEWORKS, Rule
from .hyper import did_you_mean
from .schedules import bias_correction, product

__all__ = [
    "FORMULAS",
    "NO_EXACT",
    "FIXED",
    "OPTIONS",
    "Translation",
    "build",
    "call",
    "page",
    "rules",
    "translate",
]

FRAMEWORK_NAMES = {
    "torch": "PyTorch (torch.optim)",
    "optax": "optax",
    "keras": "keras 3",
    "flux": "Optimisers.jl / Flux",
    "paper": "the paper",
}

# Each framework's update as its own sources write it (CONVENTIONS.md, checked against torch 2.13,
# optax 0.2.8, keras 3, Optimisers.jl 0.4.8). m, v: moments; m̂, v̂: bias-corrected; t from 1.
FORMULAS: dict[str, dict[str, str]] = {
    "sgd": {
        "torch": "b = μb + (1−dampening)g (b = g at t=1); p −= lr·b; Nesterov p −= lr·(g + μb)",
        "optax": "t = g + μt (Nesterov g + μt); p −= lr·t",
        "keras": "m = μm − lr·g; p += m; Nesterov p += μm − lr·g",
        "flux": "Momentum: v = ρv + ηg; p −= v. Nesterov: Δ = −ρ²v + (1+ρ)ηg; v = ρv − ηg",
    },
    "rmsprop": {
        "torch": "v = αv + (1−α)g²; d = g/(√v + ε); momentum b = μb + d; p −= lr·b",
        "optax": "v = ρv + (1−ρ)g²; d = g/√(v + ε) (eps_in_sqrt); momentum after lr: "
                 "t = lr·d + μt",
        "keras": "v = ρv + (1−ρ)g²; d = g/√(v + ε); momentum m = μm + lr·d; p −= m",
        "flux": "v = ρv + (1−ρ)g²; p −= η·g/(√v + ε)",
    },
    "adagrad": {
        "torch": "G = G₀ + Σg² (G₀ = 0); p −= lr/(1+(t−1)·lr_decay) · g/(√G + ε)",
        "optax": "G = G₀ + Σg² (G₀ = 0.1); p −= lr·g/√(G + ε) where G > 0, else 0",
        "keras": "G = G₀ + Σg² (G₀ = 0.1); p −= lr·g/√(G + ε) (at G = ε = 0 keras's 0/0 is "
                 "NaN; uniopt's keras convention steps 0 there, as optax)",
        "flux": "G = ε + Σg²; p −= η·g/(√G + ε)",
    },
    "adadelta": {
        "torch": "v = ρv + (1−ρ)g²; d = √(u+ε)/√(v+ε)·g; u = ρu + (1−ρ)d²; p −= lr·d",
        "optax": "as torch; default lr None (adadelta() with it ascends, optax 0.2.8)",
        "keras": "as torch, defaults lr 1e-3, ρ 0.95, ε 1e-7",
        "flux": "as torch without lr (η = 1), ε 1e-8",
    },
    "adam": {
        "torch": "p −= lr·m̂/(√v̂ + ε); AMSGrad: max of raw v, then corrected",
        "optax": "p −= lr·m̂/(√(v̂ + eps_root) + ε); AMSGrad: max of corrected v̂",
        "keras": "p −= lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε̂) (epsilon hat)",
        "flux": "p −= η·m̂/(√v̂ + ε); AMSGrad: moments start at ε, no bias correction",
    },
    "adamw": {
        "torch": "p *= 1 − lr·λ; then Adam",
        "optax": "p −= lr·(Adam + λp)",
        "keras": "p −= p·λ·lr; then Adam (epsilon hat)",
        "flux": "couple=true: p −= η·(Adam + λp); couple=false: p −= η·Adam + λp",
        "paper": "p −= η_t·(α·Adam + λp)",
    },
    "adamax": {
        "torch": "u = max(β₂u, |g| + ε); p −= lr/(1−β₁ᵗ) · m/u",
        "optax": "u = max(β₂u, |g| + ε); p −= lr/(1−β₁ᵗ) · m/u",
        "keras": "u = max(β₂u, |g|); p −= lr/(1−β₁ᵗ) · m/(u + ε)",
        "flux": "u = max(β₂u, |g|); p −= η/(1−β₁ᵗ) · m/(u + ε)",
    },
    "nadam": {
        "torch": "μ_t = β₁(1 − ½·0.96^{tψ}), products of μ; ψ = momentum_decay 4e-3",
        "optax": "constant-β₁ Dozat form, no β₂ factor",
        "keras": "μ_t = β₁(1 − ½·0.96^t) (no ψ)",
        "flux": "β₂ inside v̂: √(β₂·v̂)",
    },
    "radam": {
        "torch": "rectify while ρ_t > 5, else p −= lr·m̂",
        "optax": "rectify while ρ_t ≥ 5",
        "flux": "rectify while ρ_t > 4",
    },
    "muon": {
        "torch": "b = μb + (1−μ)g; O = NS(b), Nesterov NS((1−μ)g + μb), X₀ = X/max(‖X‖_F, ε); "
                 "p −= lr·√max(1, A/B)·O + lr·λp (A×B = out×in)",
        "optax": "b = μb + (1−μ)g; O = NS(b/(1−μᵗ)), Nesterov NS(μb/(1−μᵗ⁺¹) + (1−μ)g/(1−μᵗ)), "
                 "X₀ = X/(‖X‖_F + ε); p −= lr·(√max(1, B/A)·O + λp) (A×B = in×out); "
                 "non-2-D leaves: AdamW",
        "keras": "m = μm + g; O = NS(m), Nesterov NS(g + μm), X₀ = X/(‖X‖_F + 10⁻⁷); "
                 "p −= lr·λp; p −= lr·0.2·√max(A, B)·O; non-2-D, embeddings: AdamW",
    },
    "adafactor": {
        "torch": "v = lerp(v, g², t^−0.8) (R, C of 2-D+ leaves); U = g/√max(v̂, ε₁²), clipped "
                 "to RMS d; p ·= 1 − lr·λ; p −= max(ε₂, rms p)·min(lr, 1/√t)·U",
        "optax": "v from g² + 1e-30, factored if the 2nd-largest dim ≥ 128 (two largest axes); "
                 "U = g/√v̂ clipped to RMS 1; p −= lr·max(1e-3, rms p)·U + λp (no relative "
                 "step; momentum optional)",
        "keras": "v from g² + ε₁, last two axes factored; U = g/√v̂ clipped to RMS d; "
                 "p −= lr·λ·p; p −= max(ε₂, rms p)·min(lr, 1/√t)·U",
    },
    "adopt": {
        "torch": "pytorch_optimizer.ADOPT: v = g² at t=1 (no step); then "
                 "m = lerp(m, clip(g/max(√v, ε), ±t^¼), 1−β₁); p −= lr·m; v = β₂v + (1−β₂)g² "
                 "(t counted from 1 with the first step)",
        "optax": "contrib.adopt: the same with the bound count^¼, count from 0 (1 at the first "
                 "step that moves)",
    },
    "ademamix": {
        "torch": "pytorch_optimizer.AdEMAMix: g += wd·p; p −= lr·(m̂₁ + α_t·m₂)/(√v̂ + ε), "
                 "m₂ = β₃_t·m₂ + (1−β₃_t)·g; warm-ups over t_alpha_beta3 steps, t from 1",
        "optax": "contrib.ademamix: p −= lr·((m̂₁ + α·m₂)/(√(v̂ + ε̄) + ε) + wd·p); b3, alpha "
                 "schedules of the count (from 0)",
    },
    "optimistic_adam": {
        "optax": "v2: p −= η_t·((α+β)·r_t − β·r_{t−1}); v1: u = −lr·r_t − o·(r_t − r_{t−1})",
        "flux": "OAdam: term = η·m̂/(√v̂+ε); Δ = 2·term − term_prev (term_prev starts at 0)",
    },
    "adan": {
        "paper": "d = g − g_prev; m = b₁m + (1−b₁)g; v = b₂v + (1−b₂)d; "
                 "n = b₃n + (1−b₃)(g + b₂d)²; p = (p − lr·(m̂ + b₂v̂)/(√n̂ + ε))/(1 + lr·λ)",
        "optax": "as the paper with (1−b₂) for b₂ in both (optax PR 1715); √(n̂ + eps_root) + ε; "
                 "p −= lr·(… + λp)",
    },
    "rprop": {
        "torch": "s = clamp(s·η₊ or s·η₋ by sign(g·g_prev); kept but clamped where 0); "
                 "p −= s·sign(g), 0 where the sign flipped",
        "optax": "s clamped only where it grew or shrank; p −= the previous update's step, 0 "
                 "where the sign flips now (one update late, the first 0: optax PR 1725)",
    },
    "schedule_free_sgd": {
        "torch": "schedulefree: z −= lr_t·d; x = (1−c)x + c·z; y = βx + (1−β)z; the weights and "
                 "the z step read lr_t (warm-up included) at update t",
        "optax": "contrib.schedule_free_sgd: the z step reads the schedule at t − 1, the weights "
                 "at t",
    },
    "schedule_free_adamw": {
        "torch": "schedulefree: d = g/(√(v/(1−β₂ᵗ)) + ε) + λy; z −= lr_t·d; x, y as SGD's",
        "optax": "contrib.schedule_free_adamw: the z step reads the schedule at t − 1, the "
                 "weights at t",
        "paper": "AdamWScheduleFreePaper: d = g/(√v + ε) + λy; lr_t·√(1−β₂ᵗ) in the step, the "
                 "decay and the weights",
        "keras": "ScheduleFreeAdamW: the average weighs every step alike, c_t = 1/t",
    },
    "prodigy": {
        "torch": "prodigyopt: dlr = d·lr (no bias correction); d = max over d̂ (growth_rate)",
        "optax": "contrib.prodigy: dlr = d·lr·√(1−β₂ᵗ)/(1−β₁ᵗ); d = max(d, d̂)",
    },
}

# Hyperparameters a framework's own optimizer does not have: its rule always uses the value given
# here. A translation into that framework sets it (through the field's OPTIONS entry where there
# is one); a source value other than it is not exact.
FIXED: dict[str, dict[str, dict[str, Any]]] = {
    "sgd": {fw: {"dampening": 0.0} for fw in ("optax", "keras", "flux")},
    "rmsprop": {
        "torch": {"nesterov": False, "initial_scale": 0.0, "bias_correction": False},
        "keras": {"nesterov": False, "initial_scale": 0.0, "bias_correction": False},
        "flux": {"momentum": 0.0, "nesterov": False, "initial_scale": 0.0,
                 "bias_correction": False},
    },
    "adagrad": {fw: {"lr_decay": 0.0} for fw in ("optax", "keras", "flux")},
    "adadelta": {"flux": {"lr": 1.0}},
    "adafactor": {fw: {"param_scale": True} for fw in ("torch", "keras")},
    "nadam": {"keras": {"momentum_decay": 1.0, "eps_root": 0.0}, "torch": {"eps_root": 0.0},
              "flux": {"eps_root": 0.0}},
    "nadamw": {"torch": {"eps_root": 0.0}},
    "radam": {"torch": {"rectify_threshold": 5.0, "eps_root": 0.0},
              "optax": {"rectify_threshold": 5.0},
              "flux": {"rectify_threshold": 4.0, "eps_root": 0.0}},
    "optimistic_adam": {"flux": {"alpha": 1.0, "beta": 1.0}},
    "muon": {"keras": {"eps": 1e-7, "adaptive": False}, "torch": {"adaptive": False}},
    "adam": {fw: {"eps_root": 0.0} for fw in ("torch", "keras", "flux")},
    "adamw": {"torch": {"eps_root": 0.0}, "keras": {"eps_root": 0.0},
              "optax": {"amsgrad": False},
              **{fw: {"eps_root": 0.0, "amsgrad": False} for fw in ("flux", "paper")}},
    "amsgrad": {"torch": {"eps_root": 0.0}},
    "ademamix": {"torch": {"eps_root": 0.0}},
    "adan": {"paper": {"eps_root": 0.0}},
    "adopt": {"torch": {"nesterov": False}},
    "lion": {fw: {"couple_lr": True} for fw in ("optax", "keras")},
    "prodigy": {"optax": {"decouple": True, "growth_rate": None}},
    "schedule_free_adamw": {"keras": {"weight_lr_power": 0.0, "weight_decay": 0.0, "r": 0.0},
                            "optax": {"r": 0.0}},
    "schedule_free_sgd": {"optax": {"r": 0.0}},
}

# Options a framework's own optimizer offers in either form (torch's Adam and NAdam take
# ``decoupled_weight_decay=True``): a translation into it keeps the source's. An option (a flag
# or a name) that a rule's ``conventions`` rows do not set is its field default in every
# framework not listed here for it, as a row's unset option is: a new option takes the target's
# default (and says so) until it is listed.
EITHER: dict[tuple[str, str], frozenset[str]] = {
    ("adam", "torch"): frozenset({"decay_form", "amsgrad"}),
    ("nadam", "torch"): frozenset({"decoupled_weight_decay", "scalar_dtype"}),
    **{("adam", fw): frozenset({"amsgrad"}) for fw in ("optax", "keras", "flux")},
    **{("adamw", fw): frozenset({"amsgrad"}) for fw in ("torch", "keras")},
    ("adafactor", "optax"): frozenset({"param_scale"}),
    ("adopt", "optax"): frozenset({"use_clipping", "nesterov", "decay_form"}),
    ("adopt", "torch"): frozenset({"use_clipping", "decay_form"}),  # (clip_lambda=None)
    ("lion", "paper"): frozenset({"couple_lr"}),  # lion_pytorch's decoupled_weight_decay
    ("muon", "optax"): frozenset({"nesterov", "adaptive"}),
    **{("muon", fw): frozenset({"nesterov"}) for fw in ("torch", "keras")},
    # (the rounding of torch's float32 product of the momenta, not a form)
    **{("nadam", fw): frozenset({"scalar_dtype"}) for fw in ("optax", "keras", "flux")},
    ("prodigy", "torch"): frozenset({"decouple", "safeguard_warmup"}),
    ("prodigy", "optax"): frozenset({"safeguard_warmup"}),
    ("radam", "torch"): frozenset({"decoupled_weight_decay"}),
    **{("rmsprop", fw): frozenset({"centered"}) for fw in ("torch", "keras", "flux")},
    ("rmsprop", "optax"): frozenset({"centered", "nesterov", "bias_correction"}),
    **{("sgd", fw): frozenset({"nesterov"}) for fw in ("torch", "optax", "keras", "flux")},
}

FIXED_WHY: dict[tuple[str, str], str] = {
    ("sgd", "dampening"): "optax's trace, keras's SGD and Optimisers.jl's Momentum have no "
                          "dampening",
    ("rmsprop", "momentum"): "Optimisers.jl's RMSProp has no momentum",
    ("rmsprop", "nesterov"): "only optax's rmsprop has Nesterov momentum",
    ("rmsprop", "initial_scale"): "only optax's rmsprop starts its accumulator elsewhere "
                                   "than 0 (as TensorFlow 1's and Stable-Baselines3's "
                                   "RMSpropTFLike do, at 1: initial_scale=1.0, "
                                   "eps_in_sqrt=True)",
    ("rmsprop", "bias_correction"): "only optax's rmsprop corrects its accumulator's bias",
    ("adam", "eps_root"): "only optax's Adam adds eps_root under the root",
    ("adamw", "eps_root"): "only optax's AdamW adds eps_root under the root",
    ("radam", "eps_root"): "only optax's RAdam adds eps_root under the root",
    ("amsgrad", "eps_root"): "torch's Adam(amsgrad=True) adds no eps_root under the root",
    ("ademamix", "eps_root"): "pytorch-optimizer's AdEMAMix adds no eps_root under the root",
    ("adan", "eps_root"): "the paper's Adan adds no eps_root under the root",
    ("adamw", "amsgrad"): "optax.adamw, Optimisers.jl's AdamW and the paper's AdamW have no "
                          "AMSGrad (optax's and Optimisers.jl's AMSGrad, without decay, are "
                          "uo.adam(convention=..., amsgrad=True))",
    ("adafactor", "param_scale"): "torch's and keras's Adafactor always scale the step by "
                                  "max(ε₂, rms p) (optax's multiply_by_parameter_scale=False "
                                  "alone does not)",
    ("adopt", "nesterov"): "pytorch-optimizer's ADOPT has no Nesterov step (optax's alone)",
    ("muon", "adaptive"): "only optax's muon scales O by ⟨m, O⟩ (adaptive)",
    ("prodigy", "decouple"): "optax's prodigy decays decoupled only",
    ("prodigy", "growth_rate"): "optax's prodigy has no growth_rate: d grows without a limit",
    ("schedule_free_adamw", "weight_decay"): "keras's ScheduleFreeAdamW decays y before the "
                                             "step (its base optimizer's decay, outside the "
                                             "schedule-free arithmetic), not as this rule's "
                                             "weight_decay does",
    ("schedule_free_adamw", "r"): "the schedule-free averages of optax and keras have no r "
                                  "(Meta's weight t^r·lr_max^power at r = 0)",
    ("schedule_free_sgd", "r"): "optax's schedule-free average has no r (Meta's weight "
                                "t^r·lr_max^power at r = 0)",
    ("adagrad", "lr_decay"): "only torch's Adagrad has lr_decay (elsewhere give lr the schedule "
                             "lr/(1 + (t−1)·lr_decay))",
    ("adadelta", "lr"): "Optimisers.jl's AdaDelta has no learning rate (η = 1)",
    ("nadam", "eps_root"): "torch's, keras's and Optimisers.jl's NAdam add no eps_root under "
                           "the root (optax's alone does)",
    ("nadamw", "eps_root"): "torch's NAdam (the dozat momenta) adds no eps_root under the root",
    ("nadam", "momentum_decay"): "keras 3's Nadam has no momentum_decay: its μ_t uses 0.96^t, "
                                 "momentum_decay = 1",
    ("radam", "rectify_threshold"): "each framework's RAdam rectifies from its own threshold",
    ("schedule_free_adamw", "weight_lr_power"): "keras's ScheduleFreeAdamW weighs every step "
                                                "alike in its average",
    ("muon", "eps"): "keras's Muon normalises by ‖X‖_F + 1e-7, a constant (its epsilon is "
                     "AdamW's)",
    ("optimistic_adam", "alpha"): "Optimisers.jl's OAdam steps 2·term − term_prev: alpha = beta "
                                  "= 1",
    ("optimistic_adam", "beta"): "Optimisers.jl's OAdam steps 2·term − term_prev: alpha = beta "
                                 "= 1",
}

# Why some rules cannot be moved exactly between some frameworks' forms (added to the
# explanation of an inexact translation).
NO_EXACT: dict[str, str] = {
    "muon": (
        "Newton–Schulz is blind to its input's scale, so the momentum forms differ only in how "
        "far ε reaches (ε clamped vs added, a buffer over 1−μ for keras's sum), except optax's "
        "Nesterov bias correction, which weighs g against b differently in the first steps; "
        "the shape scalings agree on square matrices only (√max(1, A/B) of torch's out×in "
        "weights, √max(1, B/A) of optax's in×out kernels, 0.2·√max(A, B) in keras): uniopt "
        "records no exact translation between them"
    ),
    "nadam": (
        "torch and keras 3 use Dozat's momentum schedule μ_t = β₁(1 − ½·0.96^{tψ}) and its "
        "products (momentum_schedule='dozat'; keras ψ = 1), optax and Optimisers.jl a constant "
        "β₁ (momentum_schedule='constant'): no choice of hyperparameters of one gives the "
        "other's μ sequence (torch vs optax differ 1.7e-2 after 20 steps)"
    ),
    "optimistic_adam": (
        "uniopt's optimistic_adam is optax's optimistic_adam_v2 (v1 at constant values is v2 "
        "with lr=1, alpha=lr, beta=optimism); Optimisers.jl's OAdam starts the previous term at "
        "0 (first_prev='zero': its first step is 2·term) and has no Nesterov moment "
        "(nesterov=False): neither is reproducible by the other form's hyperparameters"
    ),
}


@dataclasses.dataclass(frozen=True)
class _Step:
    """What moving one option costs: exact or not, when, why, and the state's translation."""

    exact: bool
    conditions: str = ""
    explanation: str = ""
    state: str = ""


@dataclasses.dataclass(frozen=True)
class Option:
    """How to move rules across one option that tells conventions apart.

    ``apply(rule, hyper, old, new)`` changes ``hyper`` (the target's fields, the source's
    values to start with) so the target reproduces ``rule`` and says whether it is exact."""

    rules: tuple[str, ...]
    field: str
    summary: str
    apply: Callable[[Rule, dict[str, Any], Any, Any], _Step]


def _number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _times(a: Any, b: Any) -> Any:
    return float(a * b) if _number(a) and _number(b) else product(a, b)


# who decays by lr·weight_decay (couple_lr=True), who by weight_decay alone (False)
_COUPLED = {"adamw": ("torch's AdamW", "Flux's couple=false", "torch's"),
            "lion": ("keras's and optax's Lion",
                     "lion_pytorch's decoupled_weight_decay (couple_lr=False)", "their")}


def _couple_lr(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    lr, wd = rule.lr, rule.weight_decay  # type: ignore[attr-defined]
    coupled, free, whose = _COUPLED[rule.name]
    if old and not new:  # the coupled decay -> couple_lr=False
        hyper["weight_decay"] = _times(lr, wd)
        return _Step(
            True, "always (with an lr schedule, weight_decay becomes the schedule "
            "lr(t)·weight_decay)",
            f"{coupled} decays by lr·weight_decay per step (p *= 1 − lr·λ); {free} decays "
            "by its λ alone, so lr stays and λ = lr·weight_decay",
        )
    if isinstance(wd, product) and lr in wd.factors:
        rest = list(wd.factors)
        rest.remove(lr)
        hyper["weight_decay"] = rest[0] if len(rest) == 1 else product(*rest)
        return _Step(True, "always (weight_decay was lr(t)·λ)",
                     f"{free} decays by λ = lr·weight_decay: {whose} weight_decay is λ/lr")
    why = (f"{free} decays by λ per step, {coupled} by lr·weight_decay, so {whose} "
           "weight_decay = λ/lr")
    if _number(lr) and lr != 0:
        hyper["weight_decay"] = wd / lr if _number(wd) else product(wd, 1.0 / lr)
        return _Step(True, "constant lr", why)
    if _number(lr) and _number(wd) and wd == 0:
        hyper["weight_decay"] = 0.0
        return _Step(True, "always (no decay)", why)
    if _number(lr):
        return _Step(False, explanation=why + f"; at lr = 0 {whose} decay vanishes, λ does not")
    return _Step(False, explanation=(
        why + f"; with an lr schedule {whose} decay follows lr(t) and λ does not, so no "
        "constant weight_decay reproduces it: keep couple_lr=False, or give weight_decay the "
        "schedule λ/lr(t)"))


def _eps_in_sqrt(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    eps = rule.eps  # type: ignore[attr-defined]
    src, tgt = ("√(v + ε)", "√v + ε") if old else ("√v + ε", "√(v + ε)")
    why = (f"the source divides by {src}, the target by {tgt}: eps inside vs outside the root. "
           "They agree only when eps = 0; for eps > 0 no eps of the other form gives the same "
           "step for every v (keeping eps, the steps differ where v is not ≫ eps², most at the "
           "first steps and for small gradients; and at eps = 0, where an accumulator is still "
           "0, torch's form divides 0 by 0)")
    if rule.name == "adagrad":  # (optax's form steps 0 there, as optax's scale_by_rss)
        return _Step(_number(eps) and eps == 0, "eps = 0, no accumulator at 0", why + (
            "; Adagrad's root form steps 0 where its accumulator is 0 (optax's), torch's "
            "form NaN: a gradient 0 from the start differs"))
    return _Step(_number(eps) and eps == 0, "eps = 0", why)


def _momentum_form(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    mu = rule.momentum  # type: ignore[attr-defined]
    if _number(mu) and mu == 0:
        return _Step(True, "always (momentum = 0: no buffer)", "without momentum the forms agree")
    inside = {"keras", "sutskever"}
    if {old, new} <= inside:
        return _Step(True, "always", "keras's and Sutskever's forms differ in the buffer's sign",
                     "buffer: keras m = −(Sutskever/Flux v)")
    lr = rule.lr  # type: ignore[attr-defined]
    why = ("torch keeps lr out of the buffer (b = μb + g; p −= lr·b), keras and Sutskever/Flux "
           "put it in (v = μv + lr·g; p −= v), so v = lr·b while lr is constant; under an lr "
           "schedule the old velocity keeps the old lr and no hyperparameters of one form "
           "reproduce the other")
    lr_form = new if old == "torch" else old
    sign = "−" if lr_form == "keras" else ""
    state = (f"buffer: {lr_form} {'m' if lr_form == 'keras' else 'v'} = {sign}lr·b_torch"
             if old == "torch" else f"buffer: b_torch = {sign}(the {old} buffer)/lr")
    if lr_form == "sutskever" and rule.name == "sgd" and getattr(rule, "nesterov", False):
        state += " (Optimisers.jl's Nesterov stores −v)"
    damp = getattr(rule, "dampening", 0.0)
    if not (_number(damp) and damp == 0):
        return _Step(False, explanation=why + "; keras and Flux have no dampening", state=state)
    return _Step(_number(lr), "constant lr" + (", dampening = 0" if hasattr(rule, "dampening")
                                                else ""), why, state)


def _eps_hat(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    eps, b2 = rule.eps, rule.betas[1]  # type: ignore[attr-defined]
    why = ("eps on the uncorrected root (keras's epsilon hat, torch's RAdam), lr·√(1−β₂ᵗ)/(1−β₁ᵗ)"
           " · m/(√v + ε̂), is lr·m̂/(√v̂ + ε) with ε = ε̂/√(1−β₂ᵗ): eps becomes the schedule "
           "schedules.bias_correction(β₂, ∓0.5, eps)")
    if not _number(b2) or not isinstance(old, bool) or not isinstance(new, bool):
        return _Step(False, explanation=why + "; with a β₂ schedule, ε̂/√(1 − β₂(t)ᵗ) is a "
                     "function of the schedule that uo.schedules has no record for (a record "
                     "is saved with the state): not translated")
    power = -0.5 if old else 0.5
    hyper["eps"] = (bias_correction(b2, power, eps) if _number(eps)
                    else product(eps, bias_correction(b2, power)))
    return _Step(True, "constant β₂ (eps becomes a schedule)", why)


def _amsgrad_max(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    if not getattr(rule, "amsgrad", False):
        return _Step(True, "always (amsgrad off)", "the option acts only with amsgrad")
    return _Step(False, explanation=(
        "torch and keras take the max of the raw v and then bias-correct, optax the max of the "
        "corrected v̂ = v/(1−β₂ᵗ); since the correction shrinks with t the two maxima follow "
        "different histories (5.8e-3 apart after 20 steps) and no hyperparameter aligns them"))


def _moments_init(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    if not getattr(rule, "amsgrad", False):
        return _Step(True, "always (amsgrad off)", "the option acts only with amsgrad")
    return _Step(False, explanation=(
        "Optimisers.jl starts the moments at ε, the others at 0: the first steps differ, by an "
        "amount that fades as β^t, and no hyperparameter of the zero start reproduces it"))


def _eps_in_max(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    eps = rule.eps  # type: ignore[attr-defined]
    return _Step(_number(eps) and eps == 0, "eps = 0", (
        "torch and optax take u = max(β₂u, |g| + ε) and divide by u; keras and Optimisers.jl "
        "take u = max(β₂u, |g|) and divide by u + ε: they agree only when ε = 0"))


def _start_at_eps(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    eps, g0 = rule.eps, rule.initial_accumulator_value  # type: ignore[attr-defined]
    if not new:  # Optimisers.jl's G₀ = ε is initial_accumulator_value = ε
        hyper["initial_accumulator_value"] = float(eps)
        return _Step(True, "always", "Optimisers.jl starts the accumulator at eps: "
                     "initial_accumulator_value = eps", "accumulator: the same")
    if not _number(eps):
        raise ValueError(f"translate: {rule.name}'s start_at_eps (Optimisers.jl's AdaGrad) "
                         f"starts the accumulator at eps, which must be a number; got {eps!r}")
    hyper["initial_accumulator_value"] = 0.0
    why = (f"Optimisers.jl starts the accumulator at eps, the source at "
           f"initial_accumulator_value={g0!r}, which Optimisers.jl cannot set")
    if g0 == eps:
        return _Step(True, "initial_accumulator_value = eps", why + ", here equal to eps")
    return _Step(False, "initial_accumulator_value = eps", why + " (eps = "
                 f"{eps!r}): the steps differ, most at the first ones")


def _first_rectified(b2: float, threshold: float, strict: bool) -> int | None:
    """The first step t whose ρ_t passes RAdam's test (ρ_t rises with t towards ρ∞)."""
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    if not (rho_inf > threshold if strict else rho_inf >= threshold):
        # never: and the loop below would not end, b2**t stopping at the least subnormal
        # (which times a b2 above 1/2 rounds back to itself)
        return None
    t, power = 1, b2
    while True:  # (rho_t reaches rho_inf in floats, at the latest where b2**t stops)
        rho_t = rho_inf - 2.0 * t * power / (1.0 - power)
        if rho_t > threshold if strict else rho_t >= threshold:
            return t
        t, power = t + 1, power * b2


def _rectify(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    b2 = rule.betas[1]  # type: ignore[attr-defined]
    src = (rule.rectify_threshold, rule.rectify_strict)  # type: ignore[attr-defined]
    tgt = (hyper["rectify_threshold"], hyper["rectify_strict"])
    test = lambda th, strict: f"ρ_t {'>' if strict else '≥'} {th:g}"  # noqa: E731
    why = (f"the source rectifies while {test(*src)}, the target while {test(*tgt)}; ρ_t rises "
           "with t, so they agree exactly when both take their first rectified step at the "
           "same t")
    if not _number(b2):
        return _Step(False, explanation=why + "; with a β₂ schedule uniopt cannot tell")
    a, b = _first_rectified(b2, *src), _first_rectified(b2, *tgt)
    if a == b:
        return _Step(True, f"β₂ = {b2!r} (first rectified step: {a or 'never'})", why)
    return _Step(False, f"the same first rectified step (here {a or 'never'} vs {b or 'never'})",
                 why + f": here the source first rectifies at t = {a or 'never'}, the target "
                 f"at t = {b or 'never'}, and the steps between differ")


def _sqrt_b2_scaled(x: Any, c: float) -> Any:
    return x * c if _number(x) else product(x, c)


def _b2_in_root(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    b2 = rule.betas[1]  # type: ignore[attr-defined]
    why = ("Optimisers.jl divides by √(β₂·v̂ + eps_root) + ε = √β₂·(√(v̂ + eps_root/β₂) + ε/√β₂): "
           "its step is the other form's with lr, eps divided by √β₂ and eps_root by β₂")
    if not _number(b2):
        return _Step(False, explanation=why + "; with a β₂ schedule the factor changes every step "
                     "and is not translated")
    r = float(b2) ** 0.5 if new else 1.0 / float(b2) ** 0.5
    for k, c in (("lr", r), ("eps", r), ("eps_root", r * r)):
        # (from the target's values: a fixed eps_root of 0 stays 0)
        hyper[k] = _sqrt_b2_scaled(hyper[k], c)
    return _Step(True, "constant β₂ (lr, eps, eps_root rescaled)", why)


def _remember_lr(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    lr = rule.lr  # type: ignore[attr-defined]
    return _Step(_number(lr), "constant lr", (
        "Optimisers.jl remembers the previous term with its own step's lr (term = η·r), optax "
        "multiplies both terms by the current lr: the same while lr is constant"))


def _eps_floor16(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    return _Step(True, "parameters not float16", (
        "Optimisers.jl raises eps to max(Float16(1e-7), Float16(eps)) for float16 parameters "
        "only (its _eps); every other dtype takes eps as it is"))


def _decay_form(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    wd = rule.weight_decay  # type: ignore[attr-defined]
    if _number(wd) and wd == 0:
        return _Step(True, "weight_decay = 0", "without decay the forms agree")
    why = ("torch's L2 term adds weight_decay·p to the gradient, which then passes through the "
           "rule's momentum or statistics; keras (every optimizer) and torch's AdamW-style "
           "decoupled decay take p −= lr·weight_decay·p before the step and leave the gradient "
           "alone")
    mu = getattr(rule, "momentum", None)
    if rule.name == "sgd" and _number(mu) and mu == 0:
        return _Step(True, "momentum = 0", why + "; plain SGD's step is linear in the gradient, "
                     "so the two are one update, p −= lr·(g + weight_decay·p)")
    return _Step(False, "weight_decay = 0" + (", or momentum = 0" if rule.name == "sgd" else ""),
                 why + ": no weight_decay of one form reproduces the other")


def _lagged_step_lr(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    lr, warm = rule.lr, rule.warmup_steps  # type: ignore[attr-defined]
    return _Step(_number(lr) and warm == 0, "constant lr, warmup_steps = 0", (
        "optax's base optimizer reads the learning rate (and its warm-up) at its own count "
        "t − 1, Meta's at t: the z step lags the weights by one step of the schedule, the "
        "same numbers while the learning rate is constant"))


def _weight_lr_power(rule: Rule, hyper: dict[str, Any], old: Any, new: Any) -> _Step:
    lr, warm = rule.lr, rule.warmup_steps  # type: ignore[attr-defined]
    # the tree state's weight_sum is the running sum of the weights, each lr_max**power: a run
    # moved mid-way carries it rescaled (the ratio of each step's weight to it is unchanged)
    return _Step(_number(lr) and warm == 0, "constant lr, warmup_steps = 0", (
        "the average weighs step t by the largest lr_t so far to the power weight_lr_power "
        f"({old!r} here, {new!r} there): the same weights, 1/t each, while that largest lr is "
        "the same at every step"), f"weight_sum: times its lr_max**({new!r} - {old!r})")


OPTIONS: tuple[Option, ...] = (
    Option(("adamw",), "couple_lr", "torch's coupled decay ↔ Flux couple=false: exact (λ = "
           "lr·weight_decay, a product schedule under an lr schedule); back to torch exact at "
           "constant lr", _couple_lr),
    Option(("lion",), "couple_lr", "keras's and optax's decay by lr·weight_decay ↔ "
           "lion_pytorch's decoupled_weight_decay (couple_lr=False), by weight_decay alone: "
           "exact (λ = lr·weight_decay, a product schedule under an lr schedule); back exact "
           "at constant lr", _couple_lr),
    Option(("adagrad", "rmsprop"), "eps_in_sqrt", "eps outside ↔ inside the root: exact only "
           "when eps = 0", _eps_in_sqrt),
    Option(("adagrad",), "start_at_eps", "accumulator from eps (Optimisers.jl) ↔ from "
           "initial_accumulator_value: to it exact (initial_accumulator_value = eps), from it "
           "exact only when initial_accumulator_value = eps", _start_at_eps),
    Option(("sgd", "rmsprop"), "momentum_form", "lr outside (torch) ↔ inside the buffer (keras, "
           "Sutskever/Flux): exact at constant lr, the buffer scaled by lr", _momentum_form),
    Option(("adam", "adamw", "radam"), "eps_hat", "eps on the uncorrected √v (keras's epsilon "
           "hat; torch's RAdam) ↔ on √v̂: exact with eps as the schedule ε̂/√(1−β₂ᵗ) (or "
           "ε·√(1−β₂ᵗ))", _eps_hat),
    Option(("adam", "adamw"), "amsgrad_max", "max of raw v ↔ of corrected v̂ ↔ uncorrected: "
           "exact only without amsgrad", _amsgrad_max),
    Option(("adam", "adamw"), "moments_init", "AMSGrad moments from 0 ↔ from ε: exact only "
           "without amsgrad", _moments_init),
    Option(("adamax",), "eps_in_max", "eps inside ↔ outside the max: exact only when eps = 0",
           _eps_in_max),
    Option(("nadam",), "b2_in_root", "√(β₂·v̂) (Optimisers.jl) ↔ √v̂: exact at constant β₂, "
           "lr and eps scaled by √β₂ (eps_root by β₂)", _b2_in_root),
    Option(("radam",), "rectify_threshold", "where rectification starts (torch ρ_t > 5, optax "
           "ρ_t ≥ 5, Optimisers.jl ρ_t > 4): exact when both first rectify at the same step",
           _rectify),
    Option(("radam",), "rectify_strict", "> ↔ ≥ the threshold: see rectify_threshold",
           _rectify),
    Option(("adadelta", "adagrad", "adam", "adamax", "rmsprop"), "decay_form",
           "torch's L2 term g + λp ↔ keras's decoupled p −= lr·λ·p before the step: exact only "
           "when λ = 0", _decay_form),
    Option(("sgd",), "decay_form", "torch's L2 term g + λp ↔ keras's decoupled p −= lr·λ·p "
           "before the step: exact when λ = 0 or without momentum", _decay_form),
    Option(("ademamix",), "decay_form", "pytorch-optimizer's L2 term g + λp ↔ optax's "
           "decoupled p −= lr·(u + λp): exact only when λ = 0", _decay_form),
    Option(("schedule_free_sgd", "schedule_free_adamw"), "lagged_step_lr", "the z step's lr "
           "at t (Meta's) ↔ at t − 1 (optax's): exact at a constant lr without warm-up",
           _lagged_step_lr),
    Option(("schedule_free_adamw",), "weight_lr_power", "averaging weights lr_max^q (Meta's "
           "q = 2) ↔ equal (keras's q = 0): exact at a constant lr without warm-up",
           _weight_lr_power),
    Option(("nadam", "radam"), "decoupled_weight_decay", "L2 term ↔ decoupled p *= 1 − lr·λ "
           "(NAdamW, keras; torch's RAdam): exact only when λ = 0", _decay_form),
    Option(("adadelta", "adagrad", "adam", "adamax", "nadam", "optimistic_adam", "radam",
            "rmsprop"), "eps_floor16", "Optimisers.jl's float16 eps floor (max(Float16(1e-7), "
           "Float16(eps)) on float16 parameters) ↔ eps as given: exact for other dtypes",
           _eps_floor16),
    Option(("optimistic_adam",), "remember_lr", "the previous term with its own lr ↔ the "
           "current lr: exact at constant lr", _remember_lr),
)
_OPTION_OF = {(r, o.field): o for o in OPTIONS for r in o.rules}


@dataclasses.dataclass(frozen=True)
class Translation:
    """A rule moved from one framework's convention to another's.

    ``rule``: the target's record (``convention=target`` where the rule has conventions);
    ``exact``: whether it reproduces the source's parameters step for step (up to rounding
    order); ``conditions``: when it is exact; ``explanation``: why, or why not; ``state``: how
    the optimizer state maps across, where it differs."""

    rule: Rule
    source: str
    target: str
    exact: bool
    conditions: str
    explanation: str
    state: str = ""

    def __str__(self) -> str:
        lines = [
            f"{self.rule.name}: {self.source} -> {self.target}",
            f"  rule:        {call(self.rule)}",
            f"  exact:       {'yes' if self.exact else 'no'}",
            f"  conditions:  {self.conditions or '-'}",
            f"  explanation: {self.explanation}",
        ]
        if self.state:
            lines.append(f"  state:       {self.state}")
        return "\n".join(lines)


def rules() -> dict[str, type[Rule]]:
    """Every rule class of :mod:`uniopt.rules`, by name (the names ``uniopt`` exports)."""
    for m in pkgutil.iter_modules(_rules_package.__path__):
        importlib.import_module(f"{_rules_package.__name__}.{m.name}")
    found: dict[str, type[Rule]] = {}

    def walk(cls: type[Rule]) -> None:
        for sub in cls.__subclasses__():
            if sub.__module__.startswith(_rules_package.__name__ + "."):
                found.setdefault(sub.__name__, sub)
            walk(sub)

    walk(Rule)
    return dict(sorted(found.items()))


def translatable() -> list[str]:
    """The rules with conventions, by name: those :func:`translate` rewrites (a rule of one
    form has nothing to translate)."""
    return [name for name, cls in rules().items() if _table(cls)]


def _table(cls: type[Rule]) -> dict[str, dict[str, Any]]:
    return dict(getattr(cls, "conventions", None) or {})


def _fields(cls: type[Rule]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_option(cls: type[Rule], name: str) -> bool:
    """An option tells conventions apart by form (a flag or a name), not by a value."""
    f = _fields(cls).get(name)
    return f is not None and name != "convention" and isinstance(_default(f), (bool, str))


def _framework(value: Any, what: str) -> str:
    if value not in FRAMEWORKS:
        raise ValueError(f"translate: {what} must be one of {', '.join(map(repr, FRAMEWORKS))}, "
                         f"got {value!r}")
    return str(value)


def _rule_class(name: Any) -> type[Rule]:
    known = rules()
    if name not in known:
        raise ValueError(f"unknown rule {name!r}; choose from {', '.join(known)}")
    return known[name]


def build(name: str, framework: str | None = None, **hyper: Any) -> Rule:
    """The rule ``name`` as ``framework`` writes it: ``uniopt.<name>(convention=framework,
    **hyper)``; without ``framework``, ``uniopt.<name>(**hyper)``: its default convention, or
    the one form of a rule without conventions (which names no framework)."""
    cls = _rule_class(name)
    if framework is not None:
        framework = _framework(framework, "framework")
    unknown = [k for k in hyper if k not in _fields(cls) or k == "convention"]
    if unknown:
        known = [k for k in _fields(cls) if k != "convention"]
        raise ValueError(f"{name} has no hyperparameter {unknown[0]!r}"
                         f"{did_you_mean(unknown[0], known)}")
    table = _table(cls)
    if framework is None:
        return cls(**hyper)
    if framework in table:
        return cls(**{"convention": framework, **hyper})
    if not table:
        raise ValueError(f"{_one_form(cls)}: no {framework!r} convention to build")
    raise ValueError(f"{name} has no {framework!r} convention in this uniopt (it has "
                     f"{', '.join(map(repr, table))})")


def _one_form(cls: type[Rule]) -> str:
    """How a message names the form of a rule without a ``conventions`` table."""
    refs = [r for r in (cls.info.references if cls.info else ()) if not r.startswith("formula")]
    held = f"; its parity tests hold it to {', '.join(refs)}" if refs else ""
    return (f"{cls.__name__} has one form, no conventions (uo.{cls.__name__}(...), as its "
            f"docstring writes it{held})")


def _is_fixed(cls: type[Rule], framework: str, name: str) -> bool:
    return name in FIXED.get(cls.__name__, {}).get(framework, {})


def translate(rule: Rule | str, source: str | None = None, target: str = "torch",
              **options: Any) -> Translation:
    """``rule`` written in ``source``'s convention, rewritten in ``target``'s.

    ``rule`` is a uniopt rule record or a rule's name (then built with ``source``'s
    defaults, the rule's default convention's when ``source`` is omitted: ``uo.<name>()``). A
    rule with one form (no ``conventions`` table: ``lamb``, ``ftrl``, ...) has nothing to
    translate: ``ValueError``. A record's ``convention`` field *is* its source: ``source``,
    when given, must name the same framework, and a record built without ``convention=`` is
    its rule's default's (``uo.<name>().convention``: torch's for most, optax's for
    ``amsgrad`` and ``nadamw``, the paper's for ``lion``). A different ``source`` raises
    ``ValueError`` rather than relabel the record, because the record's values are the
    source's whole arithmetic: ``uo.translate(uo.adagrad(lr=0.1), source="keras", ...)``
    holds torch's accumulator and eps placement, not keras's ``Adagrad(0.1)``; build that one
    with ``uo.adagrad(convention="keras", lr=0.1)`` (or ``translate("adagrad", "keras",
    ...)``), and relabel a record on purpose with ``dataclasses.replace(rule,
    convention=...)``.

    The target record keeps every value of the source and takes the target's options (from
    the rule's ``conventions`` table, the target's fixed values in :data:`FIXED`, and
    ``options``, which fix target options by name, e.g. ``couple_lr=False`` for Flux's
    ``AdamW(couple=false)``; an option no row sets is its default in the target unless
    :data:`EITHER` says the target offers both; one given over a value :data:`FIXED` holds
    for the target is taken, and the translation is not exact, saying the target's value);
    each field that changes goes through its
    :data:`OPTIONS` entry, which adjusts the hyperparameters and says whether the result is
    exact. A changed field without one is not exact.

    >>> import uniopt as uo
    >>> tr = uo.translate(uo.adagrad(eps=0.0), target="keras")
    >>> tr.exact, tr.conditions, tr.rule.eps_in_sqrt, tr.rule.lr
    (True, 'eps = 0, no accumulator at 0; weight_decay = 0', True, 0.01)
    >>> tr = uo.translate(uo.adamw(lr=1e-3, weight_decay=1e-2), target="flux", couple_lr=False)
    >>> tr.rule.couple_lr, round(tr.rule.weight_decay, 12), tr.exact
    (False, 1e-05, True)
    """
    if isinstance(rule, str):
        rule = build(rule, None if source is None else _framework(source, "source"))
    if not isinstance(rule, Rule):
        raise ValueError(f"translate: rule must be a uniopt rule or a rule's name, got {rule!r}")
    cls, name = type(rule), rule.name
    fields = _fields(cls)
    table = _table(cls)
    target = _framework(target, "target")
    if source is not None:
        source = _framework(source, "source")
    if not table:
        raise ValueError(f"translate: {_one_form(cls)}: no {target!r} convention to "
                         "translate it into")
    labelled = str(rule.convention)  # type: ignore[attr-defined]
    if source is None:
        source = labelled
    if labelled != source:
        raise ValueError(
            f"translate: the rule says convention={labelled!r}, but source={source!r}: a "
            f"record's values are its convention's; build it as {source}'s with "
            f"uo.{name}(convention={source!r}, ...), or relabel it with "
            f"dataclasses.replace(rule, convention={source!r})")
    bad = [k for k in options if k not in fields or k == "convention"]
    if bad:
        raise ValueError(f"translate: {name} has no option {bad[0]!r}")
    forms = table
    if source not in forms:
        raise ValueError(f"translate: {name} has no {source!r} convention (source); it has "
                         f"{', '.join(map(repr, sorted(forms)))}")
    if target not in forms:
        raise ValueError(f"translate: {name} has no {target!r} convention (target); it has "
                         f"{', '.join(map(repr, sorted(forms)))}")
    if source == target and not options:
        return Translation(rule, source, target, True, "always", "the same convention")

    # every option: those the rows set first (the explanation's order), then the others, which
    # are their defaults in a framework that EITHER does not name
    keys = dict.fromkeys(k for k in [*(k for r in forms.values() for k in r), *fields]
                         if _is_option(cls, k))
    either = EITHER.get((name, target), frozenset())
    wanted = {k: getattr(rule, k) if k in either else forms[target].get(k, _default(fields[k]))
              for k in keys}
    wanted.update(FIXED.get(name, {}).get(target, {}))
    wanted.update(options)

    hyper = {k: v for k, v in rule.fields().items() if k != "convention"}
    hyper.update(wanted)  # the target's whole form first: each option step sees it
    steps: list[tuple[str, _Step]] = []
    applied: set[int] = set()
    fixed = FIXED.get(name, {}).get(target, {})
    for k, new in wanted.items():
        old = getattr(rule, k)
        if k in options and k in fixed and not _same(new, fixed[k]):
            # an option given over a value the target does not have: the record takes it, and
            # the target's own optimizer is not what it steps
            steps.append((k, _Step(False, f"{k} = {fixed[k]!r}", (
                f"{FIXED_WHY.get((name, k), f'{target} has no {k}')}: {target}'s is always "
                f"{fixed[k]!r}, and {k}={new!r} given overrides it (the source's "
                f"{old!r})"))))
            continue
        if _same(old, new):
            continue
        opt = _OPTION_OF.get((name, k))
        if opt is not None:
            if id(opt.apply) in applied:  # one step for options moved together (radam's)
                continue
            applied.add(id(opt.apply))
            steps.append((k, opt.apply(rule, hyper, old, new)))
        elif _is_fixed(cls, target, k):
            steps.append((k, _Step(False, f"{k} = {new!r}", (
                f"{FIXED_WHY.get((name, k), f'{target} has no {k}')}: {target}'s is always "
                f"{new!r}, the source's {old!r}"))))
        else:
            extra = f" ({NO_EXACT[name]})" if name in NO_EXACT else ""
            steps.append((k, _Step(False, explanation=(
                f"{k}={old!r} in {source} and {new!r} in {target}: uniopt knows no exact "
                f"translation between them{extra}"))))
    if "convention" in fields:
        hyper["convention"] = target
    if hyper.get("nesterov") and hyper.get("momentum") == 0:
        # Nesterov's look-ahead without momentum is none (keras's SGD takes it so); where the
        # target fixed momentum at 0, that step above says what is lost
        hyper["nesterov"] = False
        steps = [(k, _Step(True, "momentum = 0", (
            f"nesterov=True asked of {target}, whose momentum here is 0: Nesterov's look-ahead "
            "without momentum is none, so the rule steps without it (nesterov=False)"))
            if k == "nesterov" else s) for k, s in steps]
    out = cls(**hyper)
    if not steps:
        rows = (table.get(source, {}), table.get(target, {}))
        differ = sorted(k for k in {**rows[0], **rows[1]} if not _is_option(cls, k)
                        and not _same(*(r.get(k, _default(fields[k])) for r in rows)))
        why = (f"{source} and {target} write {name} alike; their defaults differ "
               f"({', '.join(dict.fromkeys(differ))}) and the translation keeps the source's "
               "values" if differ else f"{source} and {target} write {name} alike")
        return Translation(out, source, target, True, "always", why)
    exact = all(s.exact for _, s in steps)
    conditions = "; ".join(dict.fromkeys(s.conditions for _, s in steps if s.conditions))
    explanation = "; ".join(f"{k}: {s.explanation}" for k, s in steps)
    if not exact:
        explanation = "no exact translation: " + explanation
        conditions = "; ".join(f"{k}: {s.conditions}" for k, s in steps
                               if not s.exact and s.conditions)
        conditions = f"would be exact with {conditions}" if conditions else ""
    state = "; ".join([*(s.state for _, s in steps if s.state), *_renamed(rule, out)])
    return Translation(out, source, target, exact, conditions, explanation, state)


def _renamed(a: Rule, b: Rule) -> list[str]:
    """How the state's keys of rule ``a`` map to those of its translation ``b``, where they
    differ (another part holds a slot: keras's ``scale_by_adam_eps_hat`` for Adam's moments):
    a state carried across goes under the new keys (:func:`uniopt.save` files are keyed so)."""
    out = []
    for what, xs, ys in (("slots", [k for k, _ in a.slot_keys], [k for k, _ in b.slot_keys]),
                         ("tree_states", list(a.tree_layout), list(b.tree_layout))):
        if xs == ys:
            continue
        if len(xs) == len(ys):  # (the same slots in the same order, under another part)
            out.append(f"{what}: " + ", ".join(f"{x} -> {y}" for x, y in zip(xs, ys, strict=True)
                                               if x != y))
        else:
            out.append(f"{what}: {', '.join(xs) or 'none'} here, {', '.join(ys) or 'none'} there")
    return out


def _value(v: Any) -> str:
    """``v`` as the printed call writes it: a schedule (nested ones too) by the name it has
    under ``uniopt`` (``uo.step_power``) or ``uniopt.schedules``, so the call runs as printed
    with ``uniopt`` imported as ``uo``."""
    if isinstance(v, tuple):  # (betas with a schedule inside)
        inside = ", ".join(map(_value, v))
        return f"({inside},)" if len(v) == 1 else f"({inside})"
    text = repr(v)
    if isinstance(v, schedules._Record):  # (whose repr holds numbers and records only)
        # uniopt.schedules' own, else a rule module's, which uniopt exports (uo.step_power)
        text = re.sub(r"(?<![\w.])([A-Za-z_]\w*)\(", lambda m: (
            f"uo.schedules.{m[1]}(" if isinstance(getattr(schedules, m[1], None), type)
            else f"uo.{m[1]}("), text)
    return text


def call(rule: Rule) -> str:
    """The call that builds ``rule``: ``uo.<name>(...)`` with the fields that differ from its
    convention's defaults (every field without a default)."""
    cls = type(rule)
    fields = _fields(cls)
    conv = getattr(rule, "convention", None) if "convention" in fields else None
    row = _table(cls).get(conv or "", {})
    # (where the rule's own default is another framework's, torch's is named too)
    args = [f"convention={conv!r}"] if conv is not None \
        and conv != _default(fields["convention"]) else []
    for k, f in fields.items():
        if k == "convention":
            continue
        v, d = getattr(rule, k), row.get(k, _default(f))
        if d is dataclasses.MISSING or not _same(v, d):
            args.append(f"{k}={_value(v)}")
    return f"uo.{rule.name}({', '.join(args)})"


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b) or (_number(a) and _number(b) and a == b)
    except Exception:
        return False


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _options_cell(cls: type[Rule], fw: str) -> str:
    table = _table(cls)
    if fw in table:
        return ", ".join(f"`{k}={_value(v)}`" for k, v in table[fw].items()) or "the field defaults"
    return "the field defaults" if fw == "torch" and not table else "—"


def _uniopt_cell(cls: type[Rule], fw: str) -> str:
    name, table, fields = cls.__name__, _table(cls), _fields(cls)
    # a field with no default that the convention does not set is named: the caller gives it
    # (optimistic_adam's lr, as optax requires one)
    needed = [k for k, f in fields.items() if f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING and k not in table.get(fw, {})]
    if fw in table:  # torch's needs no argument where it is the rule's default
        plain = fw == "torch" == _default(fields["convention"])
        args = needed + ([] if plain else [f"convention={fw!r}"])
        return f"`uo.{name}({', '.join(args)})`"
    if fw == "torch" and not table:
        return f"`uo.{name}({', '.join(needed)})`"
    return "— (no convention yet)"


def page() -> str:
    """``docs/conventions.md``: for each rule and framework, its update, the options and
    defaults that reproduce it, the uniopt call; and how translations between them behave."""
    out = [
        "# Conventions: one rule, several frameworks",
        "",
        "<!-- Generated from uniopt.conventions (the rules' `conventions` tables, FORMULAS, "
        "OPTIONS, FIXED, NO_EXACT): do not edit; run "
        "`uniopt conventions --write docs/conventions.md`. -->",
        "",
        "A rule's `convention=` names a framework; the rule then takes that framework's options "
        "and defaults for the fields the caller leaves out (a field given keeps its value). "
        "`uo.translate(rule, source, target)` rewrites a rule written in one framework's "
        "convention into another's and says whether the two give the same parameters step for "
        "step, under which conditions, and why; `uniopt translate` does it from the command "
        "line. Frameworks: "
        + ", ".join(f"`{k}` ({v})" for k, v in FRAMEWORK_NAMES.items()) + ".",
        "",
        "Each framework's update is written as its own sources write it; `t` counts from 1, "
        "`m̂`, `v̂` are bias-corrected, every rule subtracts its step.",
        "",
    ]
    known = rules()
    plain = []
    for name, cls in known.items():
        table, forms = _table(cls), FORMULAS.get(name, {})
        frameworks = [fw for fw in FRAMEWORKS if fw in table or fw in forms]
        if frameworks == ["torch"] or not frameworks:
            plain.append(name)
            continue
        out += [f"## {name}", "", "| framework | update | options and defaults | in uniopt |",
                "|---|---|---|---|"]
        for fw in frameworks:
            out.append(f"| {fw} | {_cell(forms.get(fw, '—'))} | {_options_cell(cls, fw)} | "
                       f"{_uniopt_cell(cls, fw)} |")
        notes = [f"- `{o.field}`: {o.summary}." for o in OPTIONS if name in o.rules
                 and o.field in _fields(cls)]
        fixed: dict[tuple[str, Any], list[str]] = {}
        for fw, row in FIXED.get(name, {}).items():
            for k, v in row.items():
                if k in _fields(cls) and (name, k) not in _OPTION_OF:
                    fixed.setdefault((k, v), []).append(fw)
        notes += [f"- `{k}` is always `{_value(v)}` in {', '.join(fws)}: "
                  f"{FIXED_WHY.get((name, k), 'the framework has no such hyperparameter')}; "
                  "another source value is not exact." for (k, v), fws in fixed.items()]
        if name in NO_EXACT:
            notes.append(f"- No exact translation: {NO_EXACT[name]}.")
        if notes:
            out += ["", "Translations:", "", *notes]
        out.append("")
    if plain:
        out += ["## Rules with one form", "",
                ", ".join(f"`{n}`" for n in plain) + ": no second framework's form is recorded; "
                "`uo.<name>()` is the one its docstring and `uniopt rules <name>` name: torch's "
                "where torch has the rule, else optax's, keras's (`ftrl`) or the authors' "
                "implementation. They take no `convention=`, and `uo.translate` (`uniopt "
                "translate`) has nothing to translate them into: it raises `ValueError`, "
                "saying so.", ""]
    pending = [f"`{r}.{o.field}`" for o in OPTIONS for r in o.rules
               if r in known and o.field not in _fields(known[r])]
    if pending:
        out += ["## Translations waiting for their option", "",
                "These are written in `uniopt.conventions.OPTIONS` and apply once the rule has "
                "the option: " + ", ".join(pending) + ".", ""]
    out += ["## Checking a migration", "",
            "Run the old and the new optimizer side by side on the same gradients. For rules "
            "without a square root (SGD, momentum, weight decay) compare the parameters with "
            "`torch.equal` after every step. For rules with one (Adam, RMSprop, Adagrad, ...) "
            "last-bit differences are expected: torch's CPU `sqrt` is not correctly rounded "
            "(on about 16% of float32 values it is an ulp from IEEE's) and uniopt's is. How "
            "many elements they reach grows with the roots a rule takes and carries: after "
            "20 float32 steps (lr 0.01, random data, against torch 2.13's for-loop) about 3% "
            "for Adam and AdamW, as many as between torch's own fused and for-loop Adam, 6% "
            "for NAdam, 7% for Adadelta, 18% for RMSprop and a third for centered RMSprop with "
            "momentum. Compare in float64 instead, where the two stay a few units in the last "
            "place apart: a larger difference is a wrong convention or hyperparameter. One "
            "exception: a learning rate (or `betas`) given to torch as a float32 tensor, "
            "`lr=torch.tensor(0.01)`, from which torch computes some numbers in float32 "
            "(Adagrad's decayed lr, Adam's step size) where uniopt computes them in double from "
            "the tensor's value: 1e-8 to 1e-7 relative in float64 after a few steps "
            "([PyTorch](torch.md)). Give torch a float (or a float64 tensor) for the "
            "comparison.", ""]
    return "\n".join(out)

"""pytorch-optimizer's preconditioned SGD classes, run by uniopt's rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ..base import Transform
from ..rules.kron import kron, psgd_update_probability
from . import combined, plans
from .optimizer import Optimizer, plain

# the group keys (pytorch-optimizer's names, then uniopt's own) and the rule's fields
_KRON_KEYS = {
    "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
    "weight_decouple": "weight_decouple",
    "pre_conditioner_update_probability": "preconditioner_update_probability",
    "max_size_triangular": "max_size_triangular", "min_ndim_triangular": "min_ndim_triangular",
    "memory_save_mode": "memory_save_mode",
    "momentum_into_precondition_update": "momentum_into_precondition_update",
    "precondition_lr": "precond_lr", "precondition_init_scale": "precond_init_scale",
    "balance_prob": "balance_prob", "seed": "seed",
}
_DTYPE_KEYS = ("mu_dtype", "precondition_dtype")


class Kron(Optimizer):
    """Kron (:func:`uniopt.kron`) with ``pytorch_optimizer.Kron``'s constructor, defaults and
    group keys (``pre_conditioner_update_probability``: a number, a schedule, or None for
    :class:`uniopt.psgd_update_probability`; ``precondition_lr`` and
    ``precondition_init_scale``, fixed at 0.1 and 1 in pytorch-optimizer, are keyword
    arguments here); every key may differ between param groups. ``step(closure=None)`` as
    torch's.

    The probes come from a torch generator in the optimizer's state seeded with ``seed``
    (saved by ``state_dict``), not torch's global one: with one param group,
    ``torch.manual_seed(seed)`` before pytorch-optimizer's first step makes its probes these
    (where nothing else draws from the global generator between its steps). The balancing
    draws come from NumPy's PCG64 seeded with ``seed``, pytorch-optimizer's from
    ``np.random.random()``.

    Differences from pytorch-optimizer, on purpose:

    * Each param group is stepped as one tree with its own state: its own update counter,
      probes and balancing draws, its own ``pre_conditioner_update_probability`` and
      ``balance_prob``. pytorch-optimizer decides for all groups with the first group's
      probability and one counter and draws once for all; with equal values in every group
      the decisions agree, and the probes do where the groups' are drawn in order from one
      generator (tests/test_rules_kron.py does so).
    * The factors and the momentum are kept in the parameter's dtype, and the triangular
      solves run in it: ``mu_dtype`` and ``precondition_dtype`` take None (the default
      here; pytorch-optimizer's ``precondition_dtype`` is float32) or the dtype of every
      parameter of the group, and refuse others.
    * A parameter without a gradient is an error, raised before any group is written (the
      group is one tree: set zeros), where pytorch-optimizer leaves it out of the step.
    * The group's state is kept under ``state["uniopt.group<i>"]`` (``momentum_buffer``,
      ``Q``, the counter and the generators under ``scale_by_kron``), so a state dict does
      not load into pytorch-optimizer's class, nor its into this one.

    >>> import torch, uniopt.torch
    >>> w = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    >>> opt = uniopt.torch.Kron([w], lr=0.1, pre_conditioner_update_probability=0.0)
    >>> w.grad = torch.full((2, 2), 4.0, dtype=torch.float64)
    >>> opt.step()
    >>> w.detach()  # P stays I: the gradient, its rms brought down to 1.1
    tensor([[0.8900, 0.8900],
            [0.8900, 0.8900]], dtype=torch.float64)
    """

    # its probes are torch's draws: the group's state (torch's generator in it) is made for the
    # tensors themselves, by the step and by load_state_dict's check
    _group_tensors = True

    def __init__(self, params: ParamsT, lr: Any = 1e-3, momentum: Any = 0.9,
                 weight_decay: Any = 0.0, weight_decouple: bool = True,
                 pre_conditioner_update_probability: Any = None,
                 max_size_triangular: int = 8192, min_ndim_triangular: int = 2,
                 memory_save_mode: str | None = None,
                 momentum_into_precondition_update: bool = True,
                 mu_dtype: torch.dtype | None = None,
                 precondition_dtype: torch.dtype | None = None, balance_prob: float = 0.01,
                 maximize: bool = False, *, precondition_lr: Any = 0.1,
                 precondition_init_scale: float = 1.0, seed: int = 0) -> None:
        values = {
            "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "pre_conditioner_update_probability": pre_conditioner_update_probability,
            "max_size_triangular": max_size_triangular,
            "min_ndim_triangular": min_ndim_triangular, "memory_save_mode": memory_save_mode,
            "momentum_into_precondition_update": momentum_into_precondition_update,
            "precondition_lr": precondition_lr,
            "precondition_init_scale": precondition_init_scale, "balance_prob": balance_prob,
            "seed": seed, "mu_dtype": mu_dtype, "precondition_dtype": precondition_dtype,
        }
        self.rule = self._kron(values)
        self._keys = (*_KRON_KEYS, *_DTYPE_KEYS)
        self._init(params, {**values, "maximize": maximize})

    @staticmethod
    def _kron(group: dict[str, Any]) -> kron:
        fields = {field: plain(group[key]) for key, field in _KRON_KEYS.items()}
        if fields["preconditioner_update_probability"] is None:
            fields["preconditioner_update_probability"] = psgd_update_probability()
        return kron(**fields)

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        rule = self._kron(group)
        for key in _DTYPE_KEYS:
            # (a saved group, checked before a load, holds no tensors)
            dtype, ps = group[key], group.get("params", [])
            ps = [ps] if isinstance(ps, torch.Tensor) else ps
            # (model.named_parameters(): a group not yet split into params and param_names)
            ps = [p[1] if isinstance(p, tuple) else p for p in ps]
            odd = [p.dtype for p in ps if dtype not in (None, p.dtype)]
            if odd:
                raise ValueError(
                    f"uniopt.torch.Kron: {key}={dtype}: uniopt keeps the momentum and the "
                    f"factors in the parameter's dtype ({odd[0]}); pass None")
        return rule

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._keys = (*_KRON_KEYS, *_DTYPE_KEYS)

    def _live_keys(self, group: dict[str, Any]) -> frozenset[str]:
        hyper = self.rule.hyperparameters()
        return frozenset(k for k, f in _KRON_KEYS.items() if f in hyper)

    @property
    def _name(self) -> str:
        return "uniopt.torch.Kron"

    @property
    def _combined_rule(self) -> bool:
        return True  # each group keeps one State: the factors' fit and its draws are the tree's

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rules = [self._rule(group)[0] for group in self.param_groups]
        for gi, (group, rule) in enumerate(zip(self.param_groups, rules, strict=True)):
            plans.refuse(rule, gi, group, [True] * len(group["params"]),
                         plans.recorded(self.defaults))
        combined.check_orders(self)  # (before any group steps)
        combined.every_gradient(
            self, "Kron", "a group steps as one tree, every parameter with a gradient (set "
            "zeros), where pytorch-optimizer leaves them out")
        with torch.no_grad():
            for gi, group in enumerate(self.param_groups):
                # the tensors themselves: the probes are torch's draws
                combined.step(self, gi, group, rules[gi], tensors=self._group_tensors)
        return loss

"""torch.optim's classes, each a uniopt rule record behind torch's constructor.

A class declares its rule and torch's parameter order; its constructor is made from them: the
defaults of the hyperparameters are the rule record's field defaults, those of torch's other
options come from :data:`TORCH_FLAGS`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..base import Transform
from ..rules.adadelta import adadelta
from ..rules.adafactor import adafactor
from ..rules.adagrad import adagrad
from ..rules.adam import adam, adamw
from ..rules.matrix import muon
from ..rules.rmsprop import rmsprop
from ..rules.sgd import sgd
from . import plans
from .optimizer import Optimizer, plain

# torch's options that are not hyperparameters of a rule, with torch's defaults: kept in the
# param groups so that states load into torch; foreach, fused and capturable change nothing
TORCH_FLAGS: dict[str, Any] = {
    "maximize": False,
    "foreach": None,
    "differentiable": False,  # True is rejected
    "fused": None,
    "capturable": False,
    "decoupled_weight_decay": False,  # Adam: runs adamw
}


class _Named(Optimizer):
    """A torch.optim class: the group's values are fields of one uniopt rule record."""

    # torch's constructor parameters after ``params``, with "*" where the keyword-only ones begin
    _torch_params: ClassVar[tuple[str, ...]]
    _fixed: ClassVar[dict[str, Any]] = {}  # group values the class sets, not its caller
    # the rule with every block that keeps state on, where ``rule`` lacks some: the names a
    # loaded state may hold
    _all_slots: ClassVar[Transform | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_torch_params" in vars(cls):
            fields = {f.name: f.default for f in dataclasses.fields(cls.rule) if f.init}
            cls._keys = tuple(n for n in cls._torch_params if n in fields)
            cls.__init__ = _constructor(cls, {**TORCH_FLAGS, **fields})  # type: ignore[method-assign]

    def _init(self, params: Any, defaults: dict[str, Any]) -> None:
        super()._init(params, {**defaults, **self._fixed})

    @property
    def _name(self) -> str:
        return type(self).__name__

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.update(self._fixed)

    def _base_rule(self, group: dict[str, Any]) -> Transform:
        return self.rule

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        values = {k: plain(group[k]) for k in self._keys}
        return dataclasses.replace(self._base_rule(group), **values)

    def _slot_names(self, rule: Transform) -> plans.SlotNames:
        """(uniopt key, state name) of each slot of ``rule``: the state name is the slot's
        name on its block, which is torch's."""
        return list(rule.slot_keys)

    def _known_slots(self, rule: Transform) -> set[str]:
        return {s for _, s in (self._all_slots or self.rule).slot_keys}


def _constructor(cls: type[_Named], defaults: dict[str, Any]) -> Any:
    """``cls.__init__`` with torch's signature: it takes ``params`` and ``cls._torch_params``
    with their ``defaults`` and makes them the optimizer's defaults."""
    P = inspect.Parameter
    names = cls._torch_params
    star = names.index("*") if "*" in names else len(names)
    parameters = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    parameters += [P(n, P.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in names[:star]]
    parameters += [P(n, P.KEYWORD_ONLY, default=defaults[n]) for n in names[star + 1:]]
    # uniopt's own: slots in float32 for float16/bfloat16 params (see Optimizer)
    parameters.append(P("state_dtype", P.KEYWORD_ONLY, default=None))
    signature = inspect.Signature(parameters)

    def __init__(self: _Named, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:  # as Python words it
            raise TypeError(f"{__init__.__qualname__}() {e}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        self._init(values.pop("params"), values)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


class SGD(_Named):
    """``torch.optim.SGD``, run by :func:`uniopt.sgd`; sparse gradients as torch takes them."""

    rule = sgd()
    _torch_params = ("lr", "momentum", "dampening", "weight_decay", "nesterov",
                     "*", "maximize", "foreach", "differentiable", "fused")
    _all_slots = sgd(momentum=0.5)
    _sparse = "dense"


class Adagrad(_Named):
    """``torch.optim.Adagrad``, run by :func:`uniopt.adagrad`. As torch's, it sets up every
    parameter's state at construction; sparse gradients update only the rows present."""

    rule = adagrad()
    _torch_params = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps",
                     "foreach", "*", "maximize", "differentiable", "fused")
    _sparse = "rows"

    def _init(self, params: Any, defaults: dict[str, Any]) -> None:
        super()._init(params, defaults)
        for gi, group in enumerate(self.param_groups):
            rule, _ = self._rule(group)
            steps = self._steps_for(gi, group["params"])
            names = self._slot_names(rule)
            for i, p in enumerate(group["params"]):
                plans.ensure_state(self.state, p, rule, names, steps, i, plans.spec(p),
                                   group.get("state_dtype"))


class RMSprop(_Named):
    """``torch.optim.RMSprop``, run by :func:`uniopt.rmsprop`."""

    rule = rmsprop()
    _torch_params = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "capturable",
                     "foreach", "maximize", "differentiable")
    _all_slots = rmsprop(momentum=0.5, centered=True)
    _sparse_error = "RMSprop does not support sparse gradients"


class Adadelta(_Named):
    """``torch.optim.Adadelta``, run by :func:`uniopt.adadelta`."""

    rule = adadelta()
    _torch_params = ("lr", "rho", "eps", "weight_decay", "foreach",
                     "*", "capturable", "maximize", "differentiable")
    _sparse_error = "Adadelta does not support sparse gradients"


class Adam(_Named):
    """``torch.optim.Adam``, run by :func:`uniopt.adam` (``decoupled_weight_decay=True``:
    :func:`uniopt.adamw`, as torch)."""

    rule: Transform = adam()  # AdamW's is adamw
    _torch_params = ("lr", "betas", "eps", "weight_decay", "amsgrad", "*", "foreach", "maximize",
                     "capturable", "differentiable", "fused", "decoupled_weight_decay")
    _all_slots = adam(amsgrad=True)
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _base_rule(self, group: dict[str, Any]) -> Transform:
        return adamw() if group.get("decoupled_weight_decay") else self.rule


class AdamW(Adam):
    """``torch.optim.AdamW``, run by :func:`uniopt.adamw`, plus ``couple_lr``: ``False`` makes
    the decay independent of the learning rate, ``p <- p - lr*A - weight_decay*p`` (Flux's
    form; see the README)."""

    rule = adamw()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "amsgrad", "*", "maximize", "foreach",
                     "capturable", "differentiable", "fused", "couple_lr")
    _fixed = {"decoupled_weight_decay": True}  # as torch's AdamW


def _check_params(cls_name: str, param_group: Any,
                  why: Callable[[torch.Tensor], str | None]) -> None:
    """Raise, naming the parameter, where ``why`` finds one of the group's parameters that the
    class cannot update (before torch's ``add_param_group`` adds anything)."""
    params = param_group.get("params") if isinstance(param_group, dict) else None
    if isinstance(params, torch.Tensor):
        params = [params]
    elif params is not None and not isinstance(params, (list, tuple, set)):
        param_group["params"] = params = list(params)  # as torch: read a generator once
    for j, q in enumerate(params or ()):
        t = q[1] if isinstance(q, tuple) else q
        reason = why(t) if isinstance(t, torch.Tensor) else None
        if reason:
            raise ValueError(f"{cls_name}: parameter {j} of this group {reason}")


def _complex(t: torch.Tensor) -> str | None:
    return f"is complex ({t.dtype}), which it does not support" if t.is_complex() else None


class Adafactor(_Named):
    """``torch.optim.Adafactor``, run by :func:`uniopt.adafactor`: ``row_var`` and ``col_var``
    for parameters of two or more dimensions, ``variance`` for the others, as torch keeps
    them. Complex parameters are rejected when added (torch: at the step)."""

    rule = adafactor()
    _torch_params = ("lr", "beta2_decay", "eps", "d", "weight_decay", "*", "foreach", "maximize")
    _sparse_error = "Adafactor does not support sparse gradients"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_params(self._name, param_group, _complex)
        super().add_param_group(param_group)


def _not_matrix(t: torch.Tensor) -> str | None:
    if t.ndim != 2:
        return (f"has shape {tuple(t.shape)}; Muon updates 2-D parameters only (give biases "
                "and embeddings to another optimizer, e.g. AdamW)")
    return _complex(t)


class Muon(_Named):
    """``torch.optim.Muon``, run by :func:`uniopt.muon`; same-shaped matrices of a group are
    orthogonalised in one batched matmul chain. As torch's, it rejects a parameter that is not
    a matrix when it is added. The Newton-Schulz iteration runs in the parameter's dtype
    (torch's rounds it to bfloat16), so steps differ from torch's by that rounding."""

    rule = muon()
    _torch_params = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                     "ns_steps", "adjust_lr_fn")
    _sparse_error = "Muon does not support sparse gradients"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_params(self._name, param_group, _not_matrix)
        super().add_param_group(param_group)

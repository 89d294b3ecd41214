"""torch.optim's classes, each a uniopt rule record behind torch's constructor.

A class declares its rule and torch's parameter order; its constructor is made from them: the
defaults of the hyperparameters are the rule record's field defaults, those of torch's other
options come from :data:`TORCH_FLAGS`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch

from ..base import Transform
from ..hyper import resolve
from ..rules.adadelta import adadelta
from ..rules.adagrad import adagrad
from ..rules.adam import adam, adamw
from ..rules.adam_variants import adamax, mu_product, nadam, radam
from ..rules.asgd import asgd, asgd_eta, asgd_mu
from ..rules.rmsprop import rmsprop
from ..rules.rprop import rprop
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


class Adamax(_Named):
    """``torch.optim.Adamax``, run by :func:`uniopt.adamax`."""

    rule = adamax()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "foreach",
                     "*", "maximize", "differentiable", "capturable")


class RAdam(_Named):
    """``torch.optim.RAdam``, run by :func:`uniopt.radam`."""

    rule = radam()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay",
                     "*", "foreach", "maximize", "capturable", "differentiable")


class Rprop(_Named):
    """``torch.optim.Rprop``, run by :func:`uniopt.rprop`. As torch's, a parameter's step sizes
    start at the group's ``lr`` when its state is made; later values of ``lr`` change nothing."""

    rule = rprop()
    _torch_params = ("lr", "etas", "step_sizes",
                     "*", "capturable", "foreach", "maximize", "differentiable")


class _Derived(_Named):
    """A class whose torch twin keeps per-parameter numbers that uniopt derives from the step
    count: they are written into ``state_dict()`` as torch's 0-d tensors, worked out from the
    group's values at the parameter's step, and dropped on loading (the step count gives them
    back), so states load both ways."""

    _derived: ClassVar[tuple[str, ...]]

    def _scalars(self, group: dict[str, Any], step: int) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state = sd["state"]
        for group in sd["param_groups"]:
            for k in group["params"]:
                st = state.get(k)
                if not st or "step" not in st:
                    continue
                step = int(st["step"])
                values = {n: resolve(plain(v), step) for n, v in group.items() if n != "params"}
                extra = {n: torch.tensor(x, dtype=dtype)
                         for n, x in self._scalars(values, step).items()}
                state[k] = {**st, **extra}  # a new dict: the optimizer's own stays as it is
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; the numbers uniopt derives from the step count
        (``_derived``) are read from it, not kept."""
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict):
            state = {k: {n: v for n, v in st.items() if n not in self._derived}
                     if isinstance(st, dict) else st for k, st in state_dict["state"].items()}
            state_dict = {**state_dict, "state": state}
        super().load_state_dict(state_dict)


class NAdam(_Derived):
    """``torch.optim.NAdam``, run by :func:`uniopt.nadam`. torch's ``state["mu_product"]`` is
    derived from the step count and the group's ``betas[0]`` and ``momentum_decay``
    (:func:`uniopt.rules.adam_variants.mu_product`): it appears in ``state_dict()`` and is
    dropped on loading, which differs from torch only where those two changed mid-run."""

    rule = nadam()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "momentum_decay",
                     "decoupled_weight_decay",
                     "*", "foreach", "maximize", "capturable", "differentiable")
    _derived = ("mu_product",)

    def _scalars(self, group: dict[str, Any], step: int) -> dict[str, float]:
        b1, psi = group["betas"][0], group["momentum_decay"]
        return {"mu_product": mu_product(b1, psi, step, exact=True)}


class ASGD(_Derived):
    """``torch.optim.ASGD``, run by :func:`uniopt.asgd`; the average is ``state[p]["ax"]``.
    torch's ``state["eta"]`` and ``state["mu"]`` are derived from the step count and the group's
    values (:func:`uniopt.rules.asgd.asgd_eta`, :func:`~uniopt.rules.asgd.asgd_mu`): they appear
    in ``state_dict()`` and are dropped on loading. torch computes ``eta`` at the end of a step
    from that step's ``lr``; here the step's own ``lr`` is used, which differs only where ``lr``
    changes (a scheduler): by one step of lag."""

    rule = asgd()
    _torch_params = ("lr", "lambd", "alpha", "t0", "weight_decay", "foreach", "maximize",
                     "differentiable", "capturable")
    _derived = ("eta", "mu")

    def _scalars(self, group: dict[str, Any], step: int) -> dict[str, float]:
        return {"eta": asgd_eta(group["lr"], group["lambd"], group["alpha"], step),
                "mu": asgd_mu(group["t0"], step)}

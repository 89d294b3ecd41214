"""torch.optim's classes, each a uniopt rule record behind torch's constructor.

A class declares its rule and torch's parameter order; its constructor is made from them: the
defaults of the hyperparameters are the rule record's field defaults, those of torch's other
options come from :data:`TORCH_FLAGS`.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch

from ..base import Transform
from ..engine import flat_list_def, minimize_step_
from ..hyper import resolve, round_scalar
from ..rules.adadelta import adadelta
from ..rules.adafactor import adafactor
from ..rules.adagrad import adagrad
from ..rules.adam import adam, adamw
from ..rules.adam_variants import (
    adamax,
    derivable,
    mu_product,
    nadam,
    nadam_mu,
    radam,
    times_mu,
)
from ..rules.asgd import asgd, asgd_eta, asgd_mu
from ..rules.matrix import muon
from ..rules.quasi_newton import lbfgs
from ..rules.rmsprop import rmsprop
from ..rules.rprop import rprop
from ..rules.sgd import sgd
from ..rules.sparse_adam import sparse_adam
from ..state import State
from . import plans
from .optimizer import Optimizer, field, plain
from .state_dict import NAMED_SLOTS, check_group_keys

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

    # a hyperparameter's value: a number, a tensor of one element, or a uniopt schedule
    Hyper = float | torch.Tensor | Callable[[Any], Any]

# torch's options that are not hyperparameters of a rule, with torch's defaults: kept in the
# param groups so that states load into torch; fused changes nothing, foreach=True and
# capturable=True take the multi-tensor path on every device (plans.multi_tensor)
TORCH_FLAGS: dict[str, Any] = {
    "maximize": False,
    "foreach": None,
    "differentiable": False,  # True: the step runs on the reference path, under autograd
    "fused": None,
    "capturable": False,
    "decoupled_weight_decay": False,  # Adam: runs adamw
}


# torch's checks of its constructor's values, in torch's order and words: (value, test,
# message). A schedule, which torch has not, is not a number to test: uniopt checks its values
# at every step.
Check = tuple[str, Callable[[Any], bool], str]


def _at_least_0(name: str, words: str = "") -> Check:
    return (name, lambda v: 0.0 <= v, f"Invalid {words or name + ' value'}: {{}}")


LR = _at_least_0("lr", "learning rate")
EPS = _at_least_0("eps", "epsilon value")
WEIGHT_DECAY = _at_least_0("weight_decay")
BETAS = tuple(
    (f"betas[{i}]", lambda v: 0.0 <= v < 1.0, f"Invalid beta parameter at index {i}: {{}}")
    for i in (0, 1)
)


def _value(values: dict[str, Any], name: str) -> Any:
    if name.endswith("]"):
        name, i = name[:-1].split("[")
        return values[name][int(i)]
    return values[name]


def _torch_class(name: str) -> type:
    """torch.optim's class ``name``, which the class of that name here also is (frameworks ask
    ``isinstance(opt, torch.optim.AdamW)``), or ``object`` on a torch without it (Adafactor
    came in 2.5, Muon in 2.9)."""
    return cast(type, getattr(torch.optim, name, object))


class _Named(Optimizer):
    """A torch.optim class: the group's values are fields of one uniopt rule record."""

    # torch's constructor parameters after ``params``, with "*" where the keyword-only ones begin
    _torch_params: ClassVar[tuple[str, ...]]
    _fixed: ClassVar[dict[str, Any]] = {}  # group values the class sets, not its caller
    # the rule with every block that keeps state on, where ``rule`` lacks some: the names a
    # loaded state may hold
    _all_slots: ClassVar[Transform | None] = None
    _checks: ClassVar[tuple[Check, ...]] = ()
    # torch's Adam and AdamW: tensor lr and betas only with capturable or without foreach
    _tensor_betas: ClassVar[bool] = False
    # rule fields kept in the groups that are no constructor parameter (set by ``_fixed``, or
    # by the class's ``step``: SophiaG's ``bs``)
    _group_only: ClassVar[tuple[str, ...]] = ()
    # torch's defaults where they are not the rule's field defaults as written: its int 0s
    # (a repr, a logged config or a signature shows them; the class's own, not inherited)
    _torch_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        slots = cls._all_slots or vars(cls).get("rule")
        if slots is not None:  # (a loaded state holding them is this class's, not a wrapper's)
            NAMED_SLOTS.update(s for _, s in slots.slot_keys)
        if "_torch_params" in vars(cls):
            fields = {f.name: f.default for f in dataclasses.fields(cls.rule) if f.init}
            cls._keys = (*(n for n in cls._torch_params if n in fields), *cls._group_only)
            own = vars(cls).get("_torch_defaults", {})
            cls.__init__ = _constructor(  # type: ignore[method-assign]
                cls, {**TORCH_FLAGS, **fields, **own})

    def _init(self, params: Any, defaults: dict[str, Any]) -> None:
        self._torch_checks(defaults)
        if self._tensor_betas and isinstance(defaults.get("betas"),
                                             (tuple, list, np.ndarray, torch.Tensor)):
            # as torch's Adam keeps them: a tuple (of a list, an array's or a tensor's
            # elements), a tensor of one element made 0-d
            defaults["betas"] = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim()
                                      else b for b in defaults["betas"])
        super()._init(params, {**defaults, **self._fixed})
        if defaults.get("fused"):  # after the params, as torch
            if defaults.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if defaults.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
            # as torch's fused classes: GradScaler hands the step its scale and inf flag
            # (Optimizer._amp_skips), so float16 gradients need no unscale_ before it
            self._step_supports_amp_scaling = True

    def _torch_checks(self, values: dict[str, Any]) -> None:
        """torch's checks of the constructor's values, before anything else is looked at (the
        params included), raising torch's errors; uniopt's own follow where torch has none."""
        lr, Tensor = values.get("lr"), torch.Tensor
        foreach_only = values.get("foreach") and not values.get("capturable")
        if isinstance(lr, Tensor):
            if self._tensor_betas and foreach_only:
                raise ValueError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        for name, ok, message in self._checks:
            v = _value(values, name)
            if not callable(v) and not ok(v):
                raise ValueError(message.format(v))
        if self._tensor_betas:
            tensors = [isinstance(b, Tensor) for b in values["betas"]]
            # (torch's test: an int 0 or a np.float32 is refused too; a uniopt schedule, which
            # torch has not, is let through)
            if not (all(tensors) or all(isinstance(b, float) for b in values["betas"])
                    or any(map(callable, values["betas"]))):
                raise ValueError("betas must be either both floats or both Tensors")
            for i, b in enumerate(values["betas"]):
                if isinstance(b, Tensor):
                    if foreach_only:
                        raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                                         "capturable=False and foreach=True")
                    if b.numel() != 1:
                        raise ValueError(f"Tensor betas[{i}] must be 1-element")

    @property
    def _name(self) -> str:
        return type(self).__name__

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.update(self._fixed)

    def _base_rule(self, group: dict[str, Any]) -> Transform:
        return self.rule

    def _live_keys(self, group: dict[str, Any]) -> frozenset[str]:
        if group.get("capturable"):
            return frozenset()
        return frozenset(self._keys) & self.rule.hyperparameters().keys()

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        values = {k: field(group, k) for k in self._keys}
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


class SGD(_Named, torch.optim.SGD):
    """``torch.optim.SGD``, run by :func:`uniopt.sgd`; sparse gradients as torch takes them."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.001, momentum: Hyper = 0,
                     dampening: Hyper = 0, weight_decay: Hyper = 0, nesterov: bool = False, *,
                     maximize: bool = False, foreach: bool | None = None,
                     differentiable: bool = False, fused: bool | None = None,
                     state_dtype: str | None = None) -> None: ...

    rule = sgd()
    _torch_params = ("lr", "momentum", "dampening", "weight_decay", "nesterov",
                     "*", "maximize", "foreach", "differentiable", "fused")
    _torch_defaults = {"momentum": 0, "dampening": 0, "weight_decay": 0}
    _all_slots = sgd(momentum=0.5)
    _sparse = "dense"
    _fused_sparse_error = "`_fused_sgd` does not support sparse gradients"
    # (torch's SGD adds the dense decay term to the sparse gradient, which torch refuses so)
    _sparse_decay_error = "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
    _checks = (LR, _at_least_0("momentum"), WEIGHT_DECAY)

    def _torch_checks(self, values: dict[str, Any]) -> None:
        super()._torch_checks(values)
        m, d = values["momentum"], values["dampening"]
        if values["nesterov"] and not (callable(m) or callable(d)) and (m <= 0 or d != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        # torch checks Nesterov's pair at construction only; a param group's own momentum 0
        # skips the momentum, Nesterov's look-ahead with it (dampening the rule computes)
        m = group.get("momentum")
        if group.get("nesterov") and isinstance(m, (int, float)) and m == 0:
            group = {**group, "nesterov": False}
        return super()._build_rule(group)


class Adagrad(_Named, torch.optim.Adagrad):
    """``torch.optim.Adagrad``, run by :func:`uniopt.adagrad`. As torch's, it sets up every
    parameter's state at construction, each sum from the constructor's
    ``initial_accumulator_value`` (a param group's own is kept in the group and never read, a
    group added later's too); sparse gradients update only the rows present."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.01, lr_decay: Hyper = 0,
                     weight_decay: Hyper = 0, initial_accumulator_value: Hyper = 0,
                     eps: Hyper = 1e-10, foreach: bool | None = None, *, maximize: bool = False,
                     differentiable: bool = False, fused: bool | None = None,
                     state_dtype: str | None = None) -> None: ...

    rule = adagrad()
    _torch_params = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps",
                     "foreach", "*", "maximize", "differentiable", "fused")
    _torch_defaults = {"lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0}
    _sparse = "rows"
    _fused_sparse_error = "`fused` does not support sparse grad or complex param"
    _unread_keys = frozenset({"initial_accumulator_value"})
    _checks = (LR, _at_least_0("lr_decay"), WEIGHT_DECAY,
               _at_least_0("initial_accumulator_value"), EPS)

    def _init(self, params: Any, defaults: dict[str, Any]) -> None:
        super()._init(params, defaults)
        for gi, group in enumerate(self.param_groups):
            rule, _ = self._rule(group)
            steps = self._steps_for(gi, group["params"])
            names = self._slot_names(rule)
            for i, p in enumerate(group["params"]):
                plans.ensure_state(self.state, p, rule, names, steps, i, plans.spec(p),
                                   group.get("state_dtype"))

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        # torch fills every sum with the constructor's value (its __init__, and _init_group
        # for a group added later, read self.defaults): a group's own is kept, never read
        return super()._build_rule(
            {**group, "initial_accumulator_value": self.defaults["initial_accumulator_value"]})

    def share_memory(self) -> None:
        """Every parameter's sum of squares in shared memory, for ``torch.multiprocessing``
        workers (Hogwild), as torch's Adagrad."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()


class RMSprop(_Named, torch.optim.RMSprop):
    """``torch.optim.RMSprop``, run by :func:`uniopt.rmsprop`."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.01, alpha: Hyper = 0.99,
                     eps: Hyper = 1e-08, weight_decay: Hyper = 0, momentum: Hyper = 0,
                     centered: bool = False, capturable: bool = False, foreach: bool | None = None,
                     maximize: bool = False, differentiable: bool = False, *,
                     state_dtype: str | None = None) -> None: ...

    rule = rmsprop()
    _torch_params = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "capturable",
                     "foreach", "maximize", "differentiable")
    _torch_defaults = {"weight_decay": 0, "momentum": 0}
    _all_slots = rmsprop(momentum=0.5, centered=True)
    _sparse_error = "RMSprop does not support sparse gradients"
    _checks = (LR, EPS, _at_least_0("momentum"), WEIGHT_DECAY, _at_least_0("alpha"))


class Adadelta(_Named, torch.optim.Adadelta):
    """``torch.optim.Adadelta``, run by :func:`uniopt.adadelta`."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 1.0, rho: Hyper = 0.9, eps: Hyper = 1e-06,
                     weight_decay: Hyper = 0, foreach: bool | None = None, *,
                     capturable: bool = False, maximize: bool = False,
                     differentiable: bool = False, state_dtype: str | None = None) -> None: ...

    rule = adadelta()
    _torch_params = ("lr", "rho", "eps", "weight_decay", "foreach",
                     "*", "capturable", "maximize", "differentiable")
    _torch_defaults = {"weight_decay": 0}
    _sparse_error = "Adadelta does not support sparse gradients"
    _checks = (LR, ("rho", lambda v: 0.0 <= v <= 1.0, "Invalid rho value: {}"), EPS, WEIGHT_DECAY)


class Adam(_Named, torch.optim.Adam):
    """``torch.optim.Adam``, run by :func:`uniopt.adam` (``decoupled_weight_decay=True``:
    :func:`uniopt.adamw`, as torch)."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.001,
                     betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-08,
                     weight_decay: Hyper = 0, amsgrad: bool = False, *,
                     foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                     differentiable: bool = False, fused: bool | None = None,
                     decoupled_weight_decay: bool = False,
                     state_dtype: str | None = None) -> None: ...

    rule: Transform = adam()  # AdamW's is adamw
    _torch_params = ("lr", "betas", "eps", "weight_decay", "amsgrad", "*", "foreach", "maximize",
                     "capturable", "differentiable", "fused", "decoupled_weight_decay")
    _torch_defaults = {"weight_decay": 0}
    _all_slots = adam(amsgrad=True)
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
    _checks = (LR, EPS, *BETAS, WEIGHT_DECAY)
    _tensor_betas = True

    def _base_rule(self, group: dict[str, Any]) -> Transform:
        return adamw() if group.get("decoupled_weight_decay") else self.rule


class AdamW(Adam, torch.optim.AdamW):
    """``torch.optim.AdamW``, run by :func:`uniopt.adamw`, plus ``couple_lr``: ``False`` makes
    the decay independent of the learning rate, ``p <- p - lr*A - weight_decay*p`` (Flux's
    form; see the docs' Weight decay page, docs/weight-decay.md). A group holds ``couple_lr``
    only where it is not ``True``: its keys and its state dict's are torch's (see
    docs/torch.md)."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.001,
                     betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-08,
                     weight_decay: Hyper = 0.01, amsgrad: bool = False, *, maximize: bool = False,
                     foreach: bool | None = None, capturable: bool = False,
                     differentiable: bool = False, fused: bool | None = None,
                     couple_lr: bool = True, state_dtype: str | None = None) -> None: ...

    rule = adamw()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "amsgrad", "*", "maximize", "foreach",
                     "capturable", "differentiable", "fused", "couple_lr")
    _fixed = {"decoupled_weight_decay": True}  # as torch's AdamW
    _absent_defaults = {"couple_lr": True}


class SparseAdam(_Named, torch.optim.SparseAdam):
    """``torch.optim.SparseAdam``, run by :func:`uniopt.sparse_adam`: sparse gradients only;
    the moments and the parameter change only at the entries the gradient holds (gathered,
    duplicates summed, as torch). The state's ``step`` is an int, as torch's."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.001,
                     betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-08,
                     maximize: bool = False, *, state_dtype: str | None = None) -> None: ...

    rule = sparse_adam(skip_zeros=False)  # the entries handed over are exactly those present
    _torch_params = ("lr", "betas", "eps", "maximize")
    _sparse = "rows"

    _checks = (("lr", lambda v: 0.0 < v, "Invalid learning rate: {}"),
               ("eps", lambda v: 0.0 < v, "Invalid epsilon value: {}"), *BETAS)

    def _init(self, params: Any, defaults: dict[str, Any]) -> None:
        super()._init(params, defaults)
        where = [[gi, j] for gi, g in enumerate(self.param_groups)
                 for j, p in enumerate(g["params"])]
        sparse = [w for w in where if self.param_groups[w[0]]["params"][w[1]].is_sparse]
        if sparse:
            raise ValueError(
                f"Sparse params at indices {sparse}: SparseAdam requires dense parameter tensors"
            )
        complex_ = [w for w in where if self.param_groups[w[0]]["params"][w[1]].is_complex()]
        if complex_:
            raise ValueError(f"Complex params at indices {complex_}: SparseAdam does not "
                             "support complex parameters")

    def _prepare(self, gi: int, group: dict[str, Any]) -> Any:
        for p in group["params"]:
            if p.grad is not None and not p.grad.is_sparse:
                raise RuntimeError(
                    "SparseAdam does not support dense gradients, please consider Adam instead"
                )
        return super()._prepare(gi, group)

    def _state_dict(self) -> dict[str, Any]:
        sd = super()._state_dict()
        sd["state"] = {k: {**st, "step": int(st["step"])}
                       if isinstance(st, dict) and "step" in st else st
                       for k, st in sd["state"].items()}
        return sd


# LBFGS's state, under torch's names, kept in the state of the first parameter
_LBFGS_KEYS = ("func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
               "prev_flat_grad", "prev_loss", "al")


class LBFGS(_Named, torch.optim.LBFGS):
    """``torch.optim.LBFGS``, run by :func:`uniopt.lbfgs` through
    :func:`uniopt.minimize_step_`: one parameter group, ``step(closure)`` with the closure
    required; the state (``old_dirs``, ``old_stps``, ``ro``, ``d``, ``t``, ``H_diag``,
    ``prev_flat_grad``, ``prev_loss``, ``al``, ``n_iter``, ``func_evals``) is torch's, in the
    state of the first parameter. Complex parameters count as their real and imaginary
    parts, and sparse gradients as dense, as in torch."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 1, max_iter: int = 20,
                     max_eval: int | None = None, tolerance_grad: Hyper = 1e-07,
                     tolerance_change: Hyper = 1e-09, history_size: int = 100,
                     line_search_fn: str | None = None, *,
                     state_dtype: str | None = None) -> None: ...

    rule = lbfgs()
    _runs = (lbfgs, "torch.optim.LBFGS's arguments; step(closure), the closure calling "
             "backward() and returning the loss")
    _torch_params = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change",
                     "history_size", "line_search_fn")
    _torch_defaults = {"lr": 1}

    _checks = (LR,)

    def _init(self, params: Any, defaults: dict[str, Any]) -> None:
        if callable(defaults["lr"]):  # its steps are not counted: a schedule has no step
            raise TypeError(f"LBFGS: lr must be a number or a 1-element tensor, got "
                            f"{defaults['lr']!r}")
        if defaults["max_eval"] is None:
            defaults = {**defaults, "max_eval": defaults["max_iter"] * 5 // 4}
        super()._init(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._lbfgs_attrs()

    def _lbfgs_attrs(self) -> None:
        # torch's: code reads the state as opt.state[opt._params[0]] (its n_iter, func_evals),
        # and torch's own helpers (_gather_flat_grad, _numel) read them
        self._params = self.param_groups[0]["params"]
        self._numel_cache = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if len(self.param_groups) == 1:  # (torch's copy lacks them: its __getstate__ drops them)
            self._lbfgs_attrs()

    def _step(self, closure: Any = None) -> Any:
        if closure is None:
            raise TypeError(
                "LBFGS.step needs a closure that clears the gradients, computes the loss, "
                "calls backward() and returns the loss: opt.step(closure)"
            )
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        group = self.param_groups[0]
        rule, _ = self._rule(group)
        ps = group["params"]
        leaves = [plans.real(p.detach()) for p in ps]
        st = self.state[ps[0]]
        held = st.get("al")
        if held is not None and len(held) != group["history_size"]:
            # (torch's two-loop recursion fills a list as long as the first step's history:
            # a larger size raises an IndexError there, after writing the params, once the
            # history outgrows it; a smaller one below the history held is never trimmed to,
            # and the history grows until it does the same)
            raise ValueError(f"LBFGS: history_size is {len(held)} in the state and "
                             f"{group['history_size']!r} in the param group: it cannot change "
                             "mid-run; make a new optimizer (or load a state of that size)")
        # the parameter's own dict is the engine's state, written as the step goes: a closure
        # reads n_iter and func_evals there mid-step, as torch's (put back if the step fails)
        fresh = [k for k in ("func_evals", "n_iter") if k not in st]
        st.update(dict.fromkeys(fresh, 0))
        state = State(rule, 0, {}, flat_list_def(len(ps)), None, {rule.tree_layout[0]: st})

        def evaluate(_: Any) -> tuple[Any, list[torch.Tensor]]:
            with torch.enable_grad():
                loss = closure()
            return loss, [_flat_grad(p, q) for p, q in zip(ps, leaves, strict=True)]

        try:
            with torch.no_grad():
                new, loss = minimize_step_(state, leaves, evaluate)
        except BaseException:
            for k in fresh:
                st.pop(k, None)
            raise
        st.update(new.tree_states[rule.tree_layout[0]])
        return loss

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` after checking that the state is an LBFGS state of as
        many parameters, its history as long as theirs; nothing changes on an error."""
        where = "LBFGS.load_state_dict"
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or len(groups) != 1 or "state" not in state_dict:
            raise ValueError(f"{where}: expected the state_dict of an LBFGS (one parameter "
                             "group); nothing was loaded")
        ps = self.param_groups[0]["params"]
        if len(groups[0]["params"]) != len(ps):
            raise ValueError(f"{where}: the state has {len(groups[0]['params'])} parameters, "
                             f"this optimizer {len(ps)}; nothing was loaded")
        n = sum(plans.real(p).numel() for p in ps)
        ids = set(groups[0]["params"])
        for k, st in state_dict["state"].items():
            if k not in ids:
                continue  # (a key of no parameter, kept as it is, as torch keeps it)
            if not isinstance(st, dict):
                raise TypeError(f"{where}: the state of parameter {k!r} is a "
                                f"{type(st).__name__}, not a dict; nothing was loaded")
            extra = sorted(set(st) - set(_LBFGS_KEYS))
            if extra:
                raise ValueError(f"{where}: the state of parameter {k} has {extra}, which "
                                 "LBFGS does not keep; nothing was loaded")
            vectors = [st.get("d"), st.get("prev_flat_grad"), *st.get("old_dirs", ()),
                       *st.get("old_stps", ())]
            for v in vectors:
                if v is not None and (not isinstance(v, torch.Tensor) or v.numel() != n):
                    raise ValueError(f"{where}: the state of parameter {k} holds a vector of "
                                     f"{getattr(v, 'shape', v)}, these parameters have {n} "
                                     "elements; nothing was loaded")
        check_group_keys(where, 0, groups[0], self.defaults)
        torch.optim.Optimizer.load_state_dict(self, state_dict)


def _flat_grad(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``p``'s gradient as the engine sees ``p`` (0 where it has none; dense; complex as real)."""
    g = p.grad
    if g is None:
        return torch.zeros_like(like)
    if g.is_sparse:
        g = g.to_dense()
    return plans.real(g.detach())


def _refuse_complex(name: str, group: dict[str, Any]) -> None:
    """torch's error for a complex parameter with a gradient, at the step."""
    if any(p.grad is not None and p.is_complex() for p in group["params"]):
        raise RuntimeError(f"{name} does not support complex parameters")


class Adafactor(_Named, _torch_class("Adafactor")):  # type: ignore[misc]
    """``torch.optim.Adafactor``, run by :func:`uniopt.adafactor`: ``row_var`` and ``col_var``
    for parameters of two or more dimensions, ``variance`` for the others, as torch keeps
    them."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.01, beta2_decay: Hyper = -0.8,
                     eps: tuple[float | None, float] = (None, 0.001), d: Hyper = 1.0,
                     weight_decay: Hyper = 0.0, *, foreach: bool | None = None,
                     maximize: bool = False, state_dtype: str | None = None) -> None: ...

    rule = adafactor()
    _torch_params = ("lr", "beta2_decay", "eps", "d", "weight_decay", "*", "foreach", "maximize")
    _sparse_error = "Adafactor does not support sparse gradients"
    _checks = (
        ("lr", lambda v: 0.0 <= v, "Learning rate should be >= 0 but is: {}"),
        ("beta2_decay", lambda v: 0.0 >= v, "beta2_decay should be <= 0 but is: {}"),
        ("eps[0]", lambda v: v is None or 0.0 <= v, "epsilon1 should be >= 0 but is: {}"),
        ("eps[1]", lambda v: 0.0 <= v, "epsilon2 should be >= 0 but is: {}"),
        ("d", lambda v: 1.0 <= v, "Clipping threshold d should be >= 1 but is: {}"),
        ("weight_decay", lambda v: 0.0 <= v, "weight_decay should be >= 0 but is: {}"),
    )

    def _prepare(self, gi: int, group: dict[str, Any]) -> Any:
        _refuse_complex("Adafactor", group)
        return super()._prepare(gi, group)


class Muon(_Named, _torch_class("Muon")):  # type: ignore[misc]
    """``torch.optim.Muon``, run by :func:`uniopt.muon`; same-shaped matrices of a group are
    orthogonalised in one batched matmul chain. As torch's, it takes 2-D parameters only
    (checked when a group is added, too); the Newton-Schulz iteration runs in bfloat16, as
    torch's does."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.001, weight_decay: Hyper = 0.1,
                     momentum: Hyper = 0.95, nesterov: bool = True,
                     ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
                     eps: Hyper = 1e-07, ns_steps: int = 5, adjust_lr_fn: str | None = None, *,
                     state_dtype: str | None = None) -> None: ...

    rule = muon(ns_dtype="bfloat16")
    _torch_params = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                     "ns_steps", "adjust_lr_fn")
    _sparse_error = "Muon does not support sparse gradients"
    _checks = (
        ("lr", lambda v: 0.0 <= v, "Learning rate should be >= 0 but is: {}"),
        ("momentum", lambda v: 0.0 <= v, "momentum should be >= 0 but is: {}"),
        ("weight_decay", lambda v: 0.0 <= v, "weight decay should be >= 0 but is: {}"),
        ("adjust_lr_fn", lambda v: v in (None, "original", "match_rms_adamw"),
         "Adjust learning rate function {} is not supported"),
    )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, list, tuple, set)):
            param_group["params"] = params = list(params)  # as torch: read a generator once
        for q in [params] if isinstance(params, torch.Tensor) else params or ():
            t = q[1] if isinstance(q, tuple) else q
            if isinstance(t, torch.Tensor) and t.ndim != 2:
                raise ValueError("Muon only supports 2D parameters whereas we found a parameter "
                                 f"with size: {t.size()}")
        super().add_param_group(param_group)

    def _prepare(self, gi: int, group: dict[str, Any]) -> Any:
        _refuse_complex("Muon", group)
        return super()._prepare(gi, group)


class Adamax(_Named, torch.optim.Adamax):
    """``torch.optim.Adamax``, run by :func:`uniopt.adamax`."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.002,
                     betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-08,
                     weight_decay: Hyper = 0, foreach: bool | None = None, *,
                     maximize: bool = False, differentiable: bool = False,
                     capturable: bool = False, state_dtype: str | None = None) -> None: ...

    rule = adamax()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "foreach",
                     "*", "maximize", "differentiable", "capturable")
    _torch_defaults = {"weight_decay": 0}
    _checks = (LR, EPS, *BETAS, WEIGHT_DECAY)


class RAdam(_Named, torch.optim.RAdam):
    """``torch.optim.RAdam``, run by :func:`uniopt.radam`."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.001,
                     betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-08,
                     weight_decay: Hyper = 0, decoupled_weight_decay: bool = False, *,
                     foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                     differentiable: bool = False, state_dtype: str | None = None) -> None: ...

    rule = radam()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay",
                     "*", "foreach", "maximize", "capturable", "differentiable")
    _torch_defaults = {"weight_decay": 0}
    _checks = (LR, EPS, *BETAS, WEIGHT_DECAY)


class Rprop(_Named, torch.optim.Rprop):
    """``torch.optim.Rprop``, run by :func:`uniopt.rprop`. As torch's, a parameter's step sizes
    start at the group's ``lr`` when its state is made; later values of ``lr`` change nothing.
    A loaded group without ``lr`` (each of its parameters with its state) makes a state with
    the constructor's, where torch's step raises a KeyError."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.01,
                     etas: tuple[Hyper, Hyper] = (0.5, 1.2),
                     step_sizes: tuple[Hyper, Hyper] = (1e-06, 50), *, capturable: bool = False,
                     foreach: bool | None = None, maximize: bool = False,
                     differentiable: bool = False, state_dtype: str | None = None) -> None: ...

    rule = rprop()
    _torch_params = ("lr", "etas", "step_sizes",
                     "*", "capturable", "foreach", "maximize", "differentiable")
    _state_keys = frozenset({"lr"})
    _checks = (LR,)

    def _torch_checks(self, values: dict[str, Any]) -> None:
        super()._torch_checks(values)
        etas = values["etas"]
        if not any(map(callable, etas)) and not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")


def _scalar_dtype() -> str:
    """The dtype of torch's 0-d state tensors (ASGD's eta and mu, NAdam's mu_product): its
    default dtype, float64 only where set so."""
    return "float64" if torch.get_default_dtype() == torch.float64 else "float32"


# the key under which a group handed to _build_rule holds the numbers a run's step takes (see
# _Derived._carrying: a maximize group's rule is a chain, built anew): no torch group has it
_CARRIED = "uniopt.carried"


def _number(v: Any) -> Any:
    """A group value as the host number the kept numbers are computed from (a tensor that
    requires grad, differentiable=True: its value; the numbers are kept as numbers)."""
    if isinstance(v, tuple):
        return tuple(map(_number, v))
    return v.item() if isinstance(v, torch.Tensor) else v


# a run of a step under way: its positions in the group (a slice: all), its step count, the
# values it steps with, the numbers it takes and the dtype they are held in
_Stepping = tuple[Any, int, dict[str, Any], tuple[float, ...], str]

# the dtypes torch holds the numbers in, by the code a record keeps beside them (0: its
# default dtype, _scalar_dtype; another, a half dtype, is not followed)
_HELD = {32.0: "float32", 64.0: "float64"}


def _code(dtype: Any) -> float:
    """The code of torch dtype ``dtype`` in ``_HELD`` (0.0: none)."""
    return {torch.float32: 32.0, torch.float64: 64.0}.get(dtype, 0.0)


@dataclasses.dataclass
class _Carried:
    """torch's per-parameter numbers of one group, by position in ``params``: ``values[i]`` as
    torch held them after parameter ``i``'s ``counts[i]``-th step, then the code of the dtype
    it holds them in (``_HELD``: a load casts them to the parameter's). Where ``counts[i]`` is
    not the parameter's step count (-1: never known) they are derived from it."""

    params: list[torch.Tensor]
    values: Any  # (len(params), numbers) float64 array
    counts: Any  # float64 array

    @classmethod
    def new(cls, params: list[torch.Tensor], width: int) -> _Carried:
        return cls(params, np.zeros((len(params), width)), np.full(len(params), -1.0))


class _Derived(_Named):
    """A class whose torch twin keeps per-parameter numbers from one step to the next, each
    computed from the group's values at that parameter's own steps (ASGD's ``eta`` and ``mu``,
    NAdam's ``mu_product``). uniopt keeps them per parameter too, beside the state, so that a
    value a scheduler changed, a parameter that skipped steps, and a loaded state step as in
    torch; ``state_dict()`` writes them as torch's 0-d tensors, ``load_state_dict`` reads them
    (a state without them: derived from the step count and the group's values, as are those
    of a parameter whose state was replaced). Parameters at one step count with other numbers
    step in runs of their own. Only numbers the step count does not give reach a rule (the
    field ``_carried``), so with constant values the group's rule, and the compiled loop bound
    to it, stay the same from step to step (a new rule each step cost a small model's step
    some 200 us)."""

    _derived: ClassVar[tuple[str, ...]]  # torch's names of the numbers, in their order
    _carried: ClassVar[str]  # the rule field that takes them: tuples (step count, *numbers)
    _uses: ClassVar[tuple[str, ...]]  # the group values they are computed from

    def _derive(self, values: dict[str, Any], step: int) -> tuple[float, ...]:
        """The numbers after ``step`` steps, each of them with ``values``."""
        raise NotImplementedError

    def _advance(self, values: dict[str, Any], step: int, old: tuple[float, ...],
                 dtype: str) -> tuple[float, ...]:
        """The numbers after the step from ``step`` steps, which took ``values``, from
        ``old``, those before it, held in ``dtype``."""
        raise NotImplementedError

    # whether a step's arithmetic on the numbers is in the dtype torch holds them in (NAdam's
    # mu_product *= mu), so that numbers a load cast to a float64 parameter's dtype step in it
    _steps_held: ClassVar[bool] = False

    def _derivable(self, values: dict[str, Any], step: int, numbers: tuple[float, ...]) -> bool:
        """Whether a rule of ``values`` steps from ``step`` as ``numbers`` make it."""
        return numbers == self._derive(values, step)

    def _values_at(self, group: dict[str, Any], step: int) -> dict[str, Any]:
        values = {}
        for k in self._uses:
            v = group[k]  # (a float as it is: at every step, a fair part of its cost)
            values[k] = v if type(v) is float else _number(resolve(plain(v), step))
        return values

    def _records(self) -> dict[int, _Carried]:
        """Each group's numbers, by its index (pickled with the optimizer, as torch's state)."""
        return vars(self).setdefault("_carried_numbers", {})

    def _record(self, gi: int, params: list[torch.Tensor]) -> _Carried:
        """Group ``gi``'s numbers for ``params``, a list the record then holds (a plan's: never
        changed; a parameter's numbers follow it to its new position)."""
        records = self._records()
        rec = records.get(gi)
        if rec is not None and rec.params is params:
            return rec
        if rec is None or not (len(rec.params) == len(params)
                               and all(map(operator.is_, rec.params, params))):
            new = _Carried.new(params, len(self._derived) + 1)
            kept = self._kept()
            for j, p in enumerate(params):
                found = kept.get(id(p))
                if found is not None:
                    new.values[j], new.counts[j] = found
            if rec is not None:  # (a parameter it held may have moved to a later group)
                vars(self).setdefault("_retired", []).append(rec)
            rec = new
        rec.params = params
        records[gi] = rec
        return rec

    def _kept(self) -> dict[int, tuple[Any, float]]:
        """Each parameter's numbers and their step count as the groups' records keep them, by
        the parameter's id (a group popped or a parameter moved to another group changes its
        group's index; a record left from before the move may hold it too, at an older
        count: the latest wins)."""
        best: dict[int, tuple[Any, float]] = dict(vars(self).get("_written", {}))
        for key, (ref, values, count) in vars(self).get("_parked", {}).items():
            if ref() is not None and (key not in best or count > best[key][1]):
                best[key] = (values, count)
        for rec in [*self._records().values(), *vars(self).get("_retired", ())]:
            for i, q in enumerate(rec.params):
                held = best.get(id(q))
                if held is None or rec.counts[i] > held[1]:
                    best[id(q)] = (rec.values[i], float(rec.counts[i]))  # (read, not kept)
        return best

    def _numbers(self, rec: _Carried, i: int, group: dict[str, Any],
                 step: int) -> tuple[float, ...]:
        """Parameter ``i``'s numbers at ``step`` steps: as kept, else derived (and kept)."""
        if rec.counts[i] != step:  # (derived as the default dtype holds them)
            rec.values[i] = (*self._derive(self._values_at(group, step), step), 0.0)
            rec.counts[i] = step
        return tuple(rec.values[i, :-1].tolist())

    @staticmethod
    def _held(rec: _Carried, i: int) -> str:
        """The dtype torch holds parameter ``i``'s numbers in."""
        return _HELD.get(float(rec.values[i, -1]), _scalar_dtype())

    def _run_tags(self, gi: int, group: dict[str, Any], has: list[bool]) -> list[Any] | None:
        ps = group["params"]
        rec = self._record(gi, list(ps))
        return [(*self._numbers(rec, i, group, plans.state_step(self.state.get(p, {}))),
                 self._steps_held and self._held(rec, i))
                if h else None for i, (p, h) in enumerate(zip(ps, has, strict=True))]

    def _run_rules(self, gi: int, plan: plans.Plan, rule: Transform) -> list[Transform] | None:
        group = plan.group
        rec = self._record(gi, plan.params)
        steps = plan.run_steps()
        # None: the step count gives the numbers; else the dtype the step holds them in and
        # (step count, *numbers)
        fields: list[tuple[str, tuple[Any, ...]] | None] = []
        stepping: list[_Stepping] = []  # what _step advances each run's numbers from
        default = _scalar_dtype()
        for run, step in zip(plan.runs, steps, strict=True):
            first, at = (0, slice(None)) if run.idx is None else (int(run.idx[0]), run.idx)
            numbers = self._numbers(rec, first, group, step)
            values = self._values_at(group, step)
            held = self._held(rec, first)
            stepping.append((at, step, values, numbers, held))
            dtype = held if self._steps_held else default
            fields.append(None if dtype == default and self._derivable(values, step, numbers)
                          else (dtype, (step, *numbers)))
        self._stepping()[gi] = (rec, stepping)
        if not any(fields):
            return None
        by_step = {f[1][0]: f for f in fields if f is not None}
        dtypes = {default if f is None else f[0] for f in fields}
        if len(dtypes) == 1 and all(
                by_step.get(step) == f for step, f in zip(steps, fields, strict=True)):
            # no two runs at one step count take other numbers, nor hold them in another dtype
            # (a run that derives its numbers, in the default one): one rule serves them all
            return [self._carrying(group, rule, tuple(sorted(f[1] for f in by_step.values())),
                                   dtypes.pop())]
        made = {f: self._carrying(group, rule, (f[1],), f[0]) for f in set(fields) if f}
        return [rule if f is None else made[f] for f in fields]

    def _carrying(self, group: dict[str, Any], rule: Transform, carried: Any,
                  dtype: str) -> Transform:
        """The group's ``rule`` taking the numbers ``carried``, held in ``dtype``."""
        if group.get("maximize"):  # a chain: built anew (a third of the time more)
            return self._group_rule({**group, _CARRIED: (carried, dtype)})
        return dataclasses.replace(cast(Any, rule), scalar_dtype=dtype,
                                   **{self._carried: carried})

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        carried, dtype = group.get(_CARRIED, (None, _scalar_dtype()))
        rule = dataclasses.replace(cast(Any, super()._build_rule(group)), scalar_dtype=dtype)
        return rule if carried is None else dataclasses.replace(rule, **{self._carried: carried})

    def _stepping(self) -> dict[int, tuple[_Carried, list[_Stepping]]]:
        """Each group's record and runs in the step under way (see :meth:`_run_rules`)."""
        return vars(self).setdefault("_stepping_runs", {})

    def _adopt_written(self) -> None:
        """Numbers a caller wrote into a parameter's state itself, not through
        ``load_state_dict`` (``ZeroRedundancyOptimizer.load_state_dict`` writes each saved
        state there): kept for the parameter at its state's step count, and taken out of the
        state, as a load takes them. Looked for once the state has changed (it counts its
        changes)."""
        state = self.state
        if plans.unchanged(vars(self).get("_written_seen"), state):
            return
        found: dict[int, tuple[Any, float]] = {}
        holding = [st for st in state.values()
                   if isinstance(st, dict) and any(n in st for n in self._derived)]
        # (every number read, and refused if it is none, before any is taken out)
        for i, (p, st) in enumerate(state.items()):
            if isinstance(st, dict) and all(n in st for n in self._derived):
                # (torch steps on with the tensors written, in their dtype)
                code = _code(getattr(st[self._derived[0]], "dtype", None))
                dtype = _HELD.get(code, _scalar_dtype())
                found[id(p)] = (np.array([*(self._loaded_number(i, n, st[n], dtype, written=True)
                                            for n in self._derived), code]),
                                float(plans.state_step(st)))
        for st in holding:
            for n in self._derived:
                st.pop(n, None)
        vars(self)["_written_seen"] = plans.seen_as(state)  # (the pops count no change)
        if not found:
            return
        vars(self).setdefault("_written", {}).update(found)
        for rec in self._records().values():
            for j, q in enumerate(rec.params):
                if id(q) in found:
                    rec.values[j], rec.counts[j] = found[id(q)]

    def _step(self, closure: Any = None) -> Any:
        self._adopt_written()
        stepping = self._stepping()
        stepping.clear()
        try:
            loss = super()._step(closure)
        finally:
            self._park(vars(self).pop("_retired", ()))
        for rec, runs in stepping.values():
            for at, step, values, numbers, held in runs:
                rec.values[at, :-1] = self._advance(values, step, numbers, held)
                rec.counts[at] = step + 1
        stepping.clear()
        return loss

    def _park(self, retired: list[_Carried]) -> None:
        """The numbers of parameters that left every group (a group popped, its ``params``
        replaced), kept for the parameter's return, as torch's state keeps them: numbers
        derived from the group's values at its return would be another run's where a scheduler
        changed them meanwhile. By the parameter's id and a weak reference to it (a parameter
        that is gone keeps nothing, and its id may be another's)."""
        parked = vars(self).get("_parked")
        if parked:
            for key in [k for k, (ref, _, _) in parked.items() if ref() is None]:
                del parked[key]
        if not retired:  # (a step whose groups kept their parameters: the common one)
            return
        parked = vars(self).setdefault("_parked", {})
        held = {id(q) for rec in self._records().values() for q in rec.params}
        for rec in retired:
            for i, q in enumerate(rec.params):
                count = float(rec.counts[i])
                old = parked.get(id(q))
                # (a count below 0: numbers never known for it, derived when it steps)
                if id(q) not in held and count >= 0 and (old is None or count > old[2]):
                    parked[id(q)] = (weakref.ref(q), rec.values[i].copy(), count)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_carried_numbers": self._records()}

    def _state_dict(self) -> dict[str, Any]:
        sd = super()._state_dict()
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state = sd["state"]
        held = self._kept()
        for saved, group in zip(sd["param_groups"], self.param_groups, strict=True):
            for k, p in zip(saved["params"], group["params"], strict=True):
                st = state.get(k)
                if not st or "step" not in st:
                    continue
                step = int(st["step"])
                kept = held.get(id(p))
                at = dtype  # (in the dtype torch holds them in: a load's, the parameter's)
                if kept is not None and kept[1] == step:
                    numbers = tuple(kept[0][:-1].tolist())
                    at = {32.0: torch.float32, 64.0: torch.float64}.get(float(kept[0][-1]), dtype)
                else:
                    numbers = self._derive(self._values_at(group, step), step)
                extra = {n: torch.tensor(x, dtype=at)
                         for n, x in zip(self._derived, numbers, strict=True)}
                state[k] = {**st, **extra}  # a new dict: the optimizer's own stays as it is
        return sd

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; the numbers of ``_derived`` are kept per parameter,
        beside its state (a parameter's state without them: derived from its step count), in
        the dtype torch casts them to: the parameter's (a complex one's: as saved)."""
        kept: dict[Any, tuple[Any, ...]] = {}
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict):
            state = {}
            for k, st in state_dict["state"].items():
                if isinstance(st, dict):
                    if all(n in st for n in self._derived):
                        # (each read, and refused if it is none, before anything is loaded)
                        for n in self._derived:
                            self._loaded_number(k, n, st[n], "float64")
                        kept[k] = tuple(st[n] for n in self._derived)
                    st = {n: v for n, v in st.items() if n not in self._derived}
                state[k] = st
            state_dict = {**state_dict, "state": state}
        super()._load_state_dict(state_dict)
        records = self._records()
        records.clear()
        for gi, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups,
                                                strict=True)):
            rec = records[gi] = _Carried.new(list(group["params"]), len(self._derived) + 1)
            for j, (k, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                if k in kept:
                    saved_as = getattr(kept[k][0], "dtype", None)
                    code = _code(p.dtype if p.is_floating_point() else saved_as)
                    dtype = _HELD.get(code, _scalar_dtype())
                    rec.values[j] = (*(self._loaded_number(k, n, x, dtype) for n, x in
                                       zip(self._derived, kept[k], strict=True)), code)
                    rec.counts[j] = plans.state_step(self.state.get(p, {}))

    def _loaded_number(self, k: Any, name: str, x: Any, dtype: str,
                       written: bool = False) -> float:
        """A loaded state's number, as torch keeps it, in ``dtype``; ``written``: one written
        into the state by hand (:meth:`_adopt_written`), refused in the words of the step that
        found it."""
        if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex():
            x = x.item()
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            if written:
                raise ValueError(f"{self._name}.step: the state of parameter {k} holds "
                                 f"{name} {x!r}, not a number; nothing was stepped")
            raise ValueError(f"{self._name}.load_state_dict: the state of parameter {k} has "
                             f"{name} {x!r}, not a number; nothing was loaded")
        return float(round_scalar(float(x), dtype))


class NAdam(_Derived, torch.optim.NAdam):
    """``torch.optim.NAdam``, run by :func:`uniopt.nadam`. torch's ``state["mu_product"]``, the
    product of each step's own momentum (a ``betas[0]`` that a scheduler cycles, OneCycleLR's,
    multiplied in at each step as it was), is kept per parameter (see :class:`_Derived`) and
    reaches the rule as its ``past_product``
    (:class:`uniopt.rules.adam_variants.scale_by_nadam`) where the step count does not give it
    (:func:`uniopt.rules.adam_variants.mu_product`)."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.002,
                     betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-08,
                     weight_decay: Hyper = 0, momentum_decay: Hyper = 0.004,
                     decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                     maximize: bool = False, capturable: bool = False,
                     differentiable: bool = False, state_dtype: str | None = None) -> None: ...

    rule = nadam()
    _torch_params = ("lr", "betas", "eps", "weight_decay", "momentum_decay",
                     "decoupled_weight_decay",
                     "*", "foreach", "maximize", "capturable", "differentiable")
    _torch_defaults = {"weight_decay": 0}
    _derived = ("mu_product",)
    _carried = "past_product"
    _uses = ("betas", "momentum_decay")
    _checks = (LR, EPS, *BETAS, WEIGHT_DECAY, _at_least_0("momentum_decay"))

    def _derive(self, values: dict[str, Any], step: int) -> tuple[float, ...]:
        return (mu_product(values["betas"][0], values["momentum_decay"], step, exact=True,
                           dtype=_scalar_dtype()),)

    def _advance(self, values: dict[str, Any], step: int, old: tuple[float, ...],
                 dtype: str) -> tuple[float, ...]:
        mu = nadam_mu(values["betas"][0], values["momentum_decay"], float(step + 1))
        return (times_mu(old[0], mu, dtype),)

    _steps_held = True

    def _derivable(self, values: dict[str, Any], step: int, numbers: tuple[float, ...]) -> bool:
        # (a product negligible next to 1 changes no coefficient: no new rule for it)
        return derivable(values["betas"][0], values["momentum_decay"], step, numbers[0],
                         _scalar_dtype())


class ASGD(_Derived, torch.optim.ASGD):
    """``torch.optim.ASGD``, run by :func:`uniopt.asgd`; the average is ``state[p]["ax"]``.
    torch's ``state["eta"]`` and ``state["mu"]``, which it computes at the end of a
    parameter's step from that step's ``lr``, ``lambd``, ``alpha`` and ``t0`` for the
    parameter's next step (a scheduler's change shows one step later), are kept per parameter
    (see :class:`_Derived`) and reach the rule as its ``past_eta_mu``
    (:class:`uniopt.rules.asgd.scale_by_asgd`) where the step count does not give them
    (:func:`uniopt.rules.asgd.asgd_eta`, :func:`~uniopt.rules.asgd.asgd_mu`)."""

    if TYPE_CHECKING:  # (the constructor _constructor makes, for type checkers)
        def __init__(self, params: ParamsT, lr: Hyper = 0.01, lambd: Hyper = 0.0001,
                     alpha: Hyper = 0.75, t0: Hyper = 1000000.0, weight_decay: Hyper = 0,
                     foreach: bool | None = None, maximize: bool = False,
                     differentiable: bool = False, capturable: bool = False, *,
                     state_dtype: str | None = None) -> None: ...

    rule = asgd()
    _torch_params = ("lr", "lambd", "alpha", "t0", "weight_decay", "foreach", "maximize",
                     "differentiable", "capturable")
    _torch_defaults = {"weight_decay": 0}
    _derived = ("eta", "mu")
    _carried = "past_eta_mu"
    _uses = ("lr", "lambd", "alpha", "t0")
    _checks = (LR, WEIGHT_DECAY)

    def _derive(self, values: dict[str, Any], step: int) -> tuple[float, ...]:
        dt = _scalar_dtype()
        # (the numbers a step makes are those the next step is checked against: made once)
        key = (step, dt, *values.values())
        last = vars(self).get("_last_derived")
        if last is not None and last[0] == key:
            return last[1]
        numbers = (round_scalar(asgd_eta(values["lr"], values["lambd"], values["alpha"], step),
                                dt),
                   round_scalar(asgd_mu(values["t0"], step), dt))  # (step 0: lr and 1, torch's)
        self._last_derived = (key, numbers)
        return numbers

    def _advance(self, values: dict[str, Any], step: int, old: tuple[float, ...],
                 dtype: str) -> tuple[float, ...]:
        # (torch computes them in its default dtype, and copies them into its state's tensors:
        # a float64 one holds them as they are)
        return self._derive(values, step + 1)

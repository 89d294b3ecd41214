"""The :class:`Optimizer` core: construction, param groups, the rule of a group, the step."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import operator
import os
import sys
import threading
import types
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, overload

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import ParamsT

from .. import backend, fast
from ..base import (
    Combinator,
    Elementwise,
    Minimizer,
    Transform,
    WholeTree,
    chain,
    declared,
    every_leaf_parts,
    global_norm,
    members,
    reads_loss,
)
from ..checkpoint import plain_schedules, schedules_from_plain
from ..engine import (
    LEAF_NAMES,
    SlotsChanged,
    adjusted_by_names,
    check_state_dtype,
    check_step,
    resolve,
)
from ..hyper import DeviceNumber, carries_derivative, has_schedule
from ..interop import dtensor
from ..state import State
from ..transforms.average import Averaging, find_average, read_average
from ..transforms.plateau import reduce_on_plateau
from ..transforms.scale import scale
from . import combined, plans
from .state_dict import check_loadable, renamed

_GRAD = operator.attrgetter("grad")

# why torch.compile leaves the step alone: dynamo cannot trace the compiled loop (numba
# machine code writing NumPy views of the tensors), and tracing the Python around it would
# guard on each step's coefficients and recompile every step. The break costs dynamo's wrapper
# a call (about 10 us); the step as an op in the graph costs more (a custom op of a small
# model's 24 tensors, computing nothing, takes longer compiled than its whole eager step):
# benchmarks/torch_compile.py, docs/torch.md

# the group's flags that change its rule (decoupled_weight_decay: torch's Adam becomes AdamW;
# capturable: the rule holds every number, see _live_keys; dynamo's _set_capturable writes it)
_RULE_FLAGS = ("maximize", "decoupled_weight_decay", "differentiable", "capturable")


def plain(v: Any) -> Any:
    """A group value as a rule field: one-element tensors as numbers (kept where differentiation
    follows them: reverse mode's requires_grad, a torch.func transform's, forward mode's dual;
    a differentiable step differentiates with respect to them), lists as tuples."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not carries_derivative(v):
        return v.item()
    if isinstance(v, (tuple, list)):
        return tuple(plain(x) for x in v)
    if isinstance(v, _NUMPY_NUMBER):  # (np.cos of a schedule, a LambdaLR factor's product)
        return v.item()
    if isinstance(v, np.ndarray) and v.dtype.kind in "fiub" and v.ndim <= 1:
        # (a 0-d array, which torch's classes take as a number or flag; a vector of betas)
        return v.item() if v.ndim == 0 else tuple(v.tolist())
    return v


def _on_device(v: Any) -> Any:
    """A one-element tensor as a number the step reads where it is (:func:`field`)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not carries_derivative(v):
        return DeviceNumber(v.reshape(1), 0)
    return plain(v)


def field(group: dict[str, Any], key: str) -> Any:
    """A group's value ``key`` as a rule field: :func:`plain`, but in a ``capturable`` group a
    one-element tensor is a :class:`~uniopt.hyper.DeviceNumber` of it, which each step reads
    where it is, on the device: a captured graph replays with the value a scheduler writes into
    the tensor, and nothing is read back to the host."""
    v = group[key]
    if not (group.get("capturable") and plans.multi_tensor(group)):
        return plain(v)  # (a capturable group of 8-bit state takes the compiled loop)
    if isinstance(v, (tuple, list)):
        return tuple(map(_on_device, v))
    return _on_device(v)


def _not_one_element(v: Any) -> torch.Tensor | None:
    """A tensor of other than one element in a group's value (a tuple's element), or None."""
    for x in v if isinstance(v, (tuple, list)) else (v,):
        if isinstance(x, torch.Tensor) and x.numel() != 1:
            return x
    return None


def _read_on_device(v: Any) -> bool:
    """Whether a field's value (a tuple's element) is a number read on the device."""
    return any(isinstance(x, DeviceNumber) for x in (v if isinstance(v, tuple) else (v,)))


def _key(group: dict[str, Any], key: str) -> Any:
    """What a group's cached rule is keyed by for value ``key``: :func:`field`'s value, a
    tensor read on the device by the identity of the group's tensor (the rule reads it at each
    step)."""
    v, raw = field(group, key), group[key]
    if isinstance(v, tuple):
        return tuple(("tensor", id(r)) if isinstance(x, DeviceNumber) else x
                     for x, r in zip(v, raw, strict=True))
    return ("tensor", id(raw)) if isinstance(v, DeviceNumber) else v


def _in_place(v: Any, k: Any) -> bool:
    """Whether group value ``v`` (keyed ``k`` by :func:`_key`) may change in place: a tensor, a
    NumPy array or a list, also inside a tuple (``betas`` of two tensors), whose group is then
    compared by value at every step. A tensor a capturable group's rule holds is compared by
    identity (the step reads it)."""
    if isinstance(v, tuple):
        ks = k if isinstance(k, tuple) and len(k) == len(v) else (None,) * len(v)
        return any(map(_in_place, v, ks))
    return isinstance(v, (list, np.ndarray)) or (
        isinstance(v, torch.Tensor) and not (isinstance(k, tuple) and k[:1] == ("tensor",)))


def hyperparameter_keys(rule: Transform) -> dict[str, Any]:
    """The hyperparameters of ``rule`` by the names :func:`uniopt.adjust` takes: a name alone
    where one member of a chain has it, ``"<position>.<name>"`` where several do."""
    found = members(rule)
    count = Counter(n for _, t in found for n in t.hyperparameters())
    keys = {}
    for path, t in found:
        for n, v in t.hyperparameters().items():
            keys[n if count[n] == 1 else ".".join((*map(str, path), n))] = v
    return keys


def _warn_unread(opt: Optimizer, gi: int, group: dict[str, Any]) -> None:
    """Warn where group ``gi`` of a ``uniopt.torch.Optimizer`` holds a hyperparameter of
    torch's optimizers that its rule does not have (Adan's ``betas`` written torch's way, where
    uniopt's adan reads ``b1``, ``b2``, ``b3``; a ``weight_decay`` beside a rule without one;
    an ``lr`` a scheduler drives, beside a rule without one): torch keeps such a key, and so
    does this group, but nothing reads it. Other keys (timm's ``lr_scale``) are a scheduler's."""
    unread = [k for k in group if k not in opt.defaults and k in _torch_hyperparameters()]
    if unread:
        warnings.warn(
            f"uniopt.torch.Optimizer: param group {gi} holds {unread}, which "
            f"{opt.rule.name} does not read (its hyperparameters: "
            f"{', '.join(opt._keys) or 'none'}); the group keeps them, unread",
            stacklevel=fast.callers_level(os.path.dirname(torch.optim.__file__) + os.sep))


# the uniopt.torch classes made to run a rule that Optimizer refuses, by the rule's class: the
# class's name and what its step takes
_RUNNERS: dict[type, tuple[str, str]] = {}


@functools.cache
def _torch_hyperparameters() -> frozenset[str]:
    """The names torch.optim's optimizers take for their numbers (not their flags)."""
    flags = {"self", "params", "defaults", "foreach", "maximize", "capturable",
             "differentiable", "fused"}
    return frozenset(
        name for cls in vars(torch.optim).values()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
        for name in inspect.signature(cls.__init__).parameters if name not in flags)


def _tree_parts(rule: Transform) -> list[WholeTree]:
    return [p for p in rule.flat_parts if isinstance(p, WholeTree)]


# how many callers up ZeroRedundancyOptimizer's _init_local_optimizer may be from
# Optimizer._init: a named class's constructor and _init methods, a caller's factory
_ZERO_DEPTH = 8


def _zero_world() -> int | None:
    """The world size of the ZeroRedundancyOptimizer (not overlapped with DDP) that is making
    this optimizer as its local one, over this rank's share of the parameters; None where no
    ZeRO is (its ``_init_local_optimizer`` among the callers of :meth:`Optimizer._init`).
    torch passes the local optimizer nothing that says so."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:  # (no ZeRO in this process: a look-up, then nothing)
        return None
    cls = getattr(zero, "ZeroRedundancyOptimizer", None)
    code = getattr(getattr(cls, "_init_local_optimizer", None), "__code__", None)
    if cls is None or code is None:  # (another torch's)
        return None
    frame: types.FrameType | None = sys._getframe(2)  # (the caller of Optimizer._init)
    for _ in range(_ZERO_DEPTH):
        if frame is None:
            return None
        if frame.f_code is code:
            made = frame.f_locals.get("self")
            # (torch's own attributes, read so that a torch without them makes no optimizer
            # fail; overlapped with DDP, its functional twin refuses such rules itself)
            world = getattr(made, "world_size", None)
            if (not isinstance(made, cls) or getattr(made, "_overlap_with_ddp", False)
                    or not isinstance(world, int)):
                return None
            return world
        frame = frame.f_back
    return None


def _scheduled(rule: Transform) -> bool:
    """Whether a part of ``rule`` holds a schedule: then each step's values are checked
    before anything is written."""
    return any(
        has_schedule(v) for part in rule.flat_parts for v in part.hyperparameters().values()
    )


class _GroupRule(NamedTuple):
    """A group's rule as last built, and what it was built from."""

    group: dict[str, Any]
    raw: list[Any]  # the group's watched values, the objects themselves
    rule: Transform
    scheduled: bool
    by_value: bool  # a watched value may change in place (a tensor, a list): compare values
    key: tuple[Any, ...]  # the values, as numbers
    form: tuple[Any, ...]  # the key with each number that may be read live as whether it is 0
    # the positions in the key (and in raw) of the numbers the rule reads from the group at each
    # step (:class:`_GroupNumber`), and how many steps in a row they have stayed the same
    # objects since (one element, counted in place; a step that raised starts it again, see
    # Optimizer._unsteady); None: the rule holds every number
    read: frozenset[int] = frozenset()
    steady: list[int] | None = None


# a rule reading its group's numbers at each step that has seen them unchanged this many steps
# in a row is made holding them again: resolving them costs a small model's step about a third
# (a learning rate that a StepLR or ReduceLROnPlateau changed, now and then)
STEADY = 64

# the plans a group keeps for other sets of its parameters with a gradient than the last step's,
# for as many steps of the group with one set in a row
SPARE_PLANS, SPARE_AGE = 4, 16


@dataclasses.dataclass
class _Spares:
    """A group's plans set aside, by the set of its parameters that had a gradient."""

    group: dict[str, Any]  # (whose they are: a group popped since leaves them to another)
    kept: dict[tuple[bool, ...], plans.Plan] = dataclasses.field(default_factory=dict)
    age: int = 0  # the group's steps with one set since one was last set aside


class _GroupNumber:
    """A number of a param group as the group's rule reads it: at each step, the value the
    group holds then. A torch ``lr_scheduler`` writes a new learning rate (and OneCycleLR new
    betas) into the group at every step; a rule made for each value costs a small model's step
    ten times over, so while only such numbers change the rule reads them, resolved and checked
    at each step as a schedule's values are (the numbers' kind and which are 0 are the rule's
    cache key: a change there makes the rule anew)."""

    __slots__ = ("group", "key", "index", "source")

    def __init__(self, group: dict[str, Any], key: str, index: int | None, gi: int) -> None:
        self.group, self.key, self.index = group, key, index
        # (how a bad value's message names where it is)
        self.source = f"the value param group {gi} holds"

    def __call__(self, step: Any) -> Any:
        v = self.group[self.key]
        v = v if self.index is None else v[self.index]
        return v.item() if isinstance(v, torch.Tensor) else v  # (a tensor lr: its number)

    def __repr__(self) -> str:
        return f"group[{self.key!r}]" + ("" if self.index is None else f"[{self.index}]")



def _readers(group: dict[str, Any], key: str, gi: int) -> Any:
    """What reads ``group[key]`` (a number, or a tuple of them) at each step; ``gi``: the
    group's index."""
    v = group[key]
    if type(v) is tuple:
        return tuple(_GroupNumber(group, key, i, gi) for i in range(len(v)))
    return _GroupNumber(group, key, None, gi)


def _only_read(raw: list[Any], hit: _GroupRule) -> bool:
    """Whether the group's values ``raw`` differ from those ``hit`` was made from only in
    numbers its rule reads at each step, each still of its form (see :func:`_form`)."""
    for i, (a, b) in enumerate(zip(raw, hit.raw, strict=True)):
        if a is b:
            continue
        if i not in hit.read:
            return False
        if type(a) is float and type(b) is float:  # (a scheduler's lr: every step)
            if (a == 0) != (b == 0):
                return False
        elif _form(a) != _form(b):
            return False
    return True


# NumPy's scalars a scheduler may write (np.float64 is a float; np.float32 and the integers
# are not), as numbers; not np.bool_
_NUMPY_NUMBER = (np.floating, np.integer)


def _is_number(v: Any) -> bool:
    """A plain number (no bool: a flag is no hyperparameter's value), NumPy's included."""
    return type(v) is float or type(v) is int or isinstance(v, _NUMPY_NUMBER)


def _form(v: Any) -> Any:
    """What a live number's key is (whether it is 0, which may decide a block), or None where
    ``v`` is not one a rule reads live (a tensor, a schedule, a list, which may change in place)."""
    if _is_number(v):
        return ("number", v == 0)
    if type(v) is tuple and v and all(map(_is_number, v)):
        return ("numbers", *(x == 0 for x in v))
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad:
        # (a tensor lr a scheduler fills, or LeanRL's copy_ of an annealed one, at each step:
        # read then, as a number written into the group is; the rule was made anew each step)
        return ("tensor", v.item() == 0)
    return None


def _no_recorded_combinator(rule: Transform) -> str:
    """Why a rule that runs other rules is not stepped recorded, naming the first such part."""
    part = next(p for p in rule.flat_parts if isinstance(p, Combinator))
    return (f"uniopt.torch.Optimizer: differentiable=True is not offered for {part.name}, which "
            "runs other rules (accumulate, partition, masked, ...): its members step outside "
            "autograd; to differentiate through it, step it with uniopt.update inside "
            "uniopt.backend.tracked()")


def _group_list(gi: int) -> str:
    """Group ``gi``'s list of parameters as a user names it, where a step has several groups
    (the engine's messages name a parameter by its index in it)."""
    return f"param_groups[{gi}]['params']"


class _Job(NamedTuple):
    """A group's step, checked: nothing is written before every group has one."""

    gi: int
    group: dict[str, Any]
    rule: Transform
    grads: list[Any]
    has: list[bool]
    sparse: list[bool] | None  # None: the plan's fast path took the gradients unlooked-at
    plan: plans.Plan | None  # None: to be built
    # the gradients as the engine gets them (views, addresses), where the fast path took them
    views: list[Any] | backend.Addressed | None
    # a scheduled rule resolved at each step count its plan's runs are at (checked here, before
    # anything is written; the step then reuses it), or None
    resolved: dict[int, Any] | None = None


class Optimizer(torch.optim.Optimizer):
    """Any uniopt rule or chain as a :class:`torch.optim.Optimizer`.

    The param groups hold the rule's hyperparameters under the names :func:`uniopt.adjust`
    takes (``lr``, ``betas``, ``weight_decay``...; ``"1.lr"`` where two members of a chain share
    a name), plus ``maximize``; a group may override any of them, and writing a number (or a
    schedule) into ``group["lr"]`` takes effect at the next step, which is how torch's
    schedulers drive it. Slots are stored under uniopt's keys (``"scale_by_adam.exp_avg"``).
    ``differentiable=True`` records each step in autograd (torch.optim's flag): a meta-learning
    loop, or torch.func's ``grad``/``jvp``, differentiates through it, with respect to a tensor
    lr or to the parameters before the step; a rule that runs other rules (``accumulate``,
    ``partition``) is refused there. ``sparse_rows=True`` takes sparse gradients
    (``nn.Embedding(sparse=True)``) for an elementwise rule: each steps only the rows it holds
    (duplicates summed), the other rows keeping their values and state, as torch's sparse
    Adagrad and TensorFlow's sparse FTRL do (the step count is the parameter's, as torch's
    SparseAdam keeps it); a group's weight decay is refused with them, as torch refuses it.
    As ZeRO-1's local optimizer (``ZeroRedundancyOptimizer(..., optimizer_class=...)``, over
    each rank's share of the parameters) a rule with a part that reads every parameter of a
    group at once (a global norm, Prodigy's estimate, ``skip_nonfinite``) is refused, with a
    ``TypeError`` naming it: each rank would compute it over its share alone (see
    docs/scaling-out.md).

    >>> import torch, uniopt as uo, uniopt.torch
    >>> lr = torch.tensor(0.1, requires_grad=True)
    >>> p = torch.ones(2, requires_grad=True).clone()
    >>> opt = uniopt.torch.Optimizer([p], uo.sgd(lr=lr), differentiable=True)
    >>> p.grad = torch.tensor([1.0, 2.0])
    >>> opt.step()
    >>> torch.autograd.grad(p.sum(), lr)  # d(sum(p - lr*g))/dlr = -sum(g)
    (tensor(-3.),)
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = uniopt.torch.Optimizer([w], uo.chain(uo.weight_decay(0.5), uo.sgd(lr=0.1)))
    >>> w.grad = torch.tensor([1.0, -1.0])
    >>> opt.step()
    >>> w.detach()
    tensor([0.8500, 1.0500])
    """

    # "rows", "dense", or None (sparse gradients rejected): a class's, or Optimizer(sparse_rows=)
    _sparse: str | None = None
    _sparse_error: str = ""
    # torch's refusals of sparse gradients with fused=True, and with a weight decay
    _fused_sparse_error: ClassVar[str] = "`fused` does not support sparse gradients"
    _sparse_decay_error: ClassVar[str] = "weight_decay option is not compatible with sparse " \
        "gradients"

    rule: Transform
    _keys: tuple[str, ...]  # the group keys that are the rule's hyperparameters
    # group keys of uniopt's own, beyond torch's, that a group holds only where the
    # constructor was given another value than this default, or the group one of its own (as
    # state_dtype): a group without one is this default, whatever the constructor had. So a
    # class's groups have its torch class's keys
    # (torch.distributed.checkpoint loads by the loading optimizer's keys: into the state dict
    # it makes, and a flattened one, flatten_optimizer_state_dict=True, by its live groups'
    # keys) and state_dict() saves the groups as they are
    _absent_defaults: ClassVar[dict[str, Any]] = {}
    # hyperparameters torch's class reads only when it makes a parameter's state, from the
    # group (Rprop's lr, where its step sizes start), and those it never reads from a group
    # (Adagrad's initial_accumulator_value: the constructor's): a loaded group may lack them,
    # the first where each of its parameters has its state, as torch loads such a group and
    # steps it (see check_group_keys); the load gives it the constructor's, as every key a
    # loaded group lacks (__setstate__)
    _state_keys: ClassVar[frozenset[str]] = frozenset()
    _unread_keys: ClassVar[frozenset[str]] = frozenset()

    # the step's extra arguments (its parts' Part.step_args) this class hands a rule: the
    # closure's loss; a class made for a rule that reads another (SophiaH's hvp=) adds it
    _step_args: ClassVar[frozenset[str]] = frozenset({"value"})
    # a class made to run a rule this one refuses (its class, and what its step takes), named
    # where this one refuses it
    _runs: ClassVar[tuple[type, str] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_runs" in vars(cls) and cls._runs is not None:
            _RUNNERS[cls._runs[0]] = (f"uniopt.torch.{cls.__name__}", cls._runs[1])

    def __init__(self, params: ParamsT, rule: Transform, *, maximize: bool = False,
                 state_dtype: str | None = None, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False,
                 sparse_rows: bool = False) -> None:
        if not isinstance(rule, Transform):
            raise TypeError(
                f"uniopt.torch.Optimizer: expected a uniopt rule or chain, got {rule!r}"
            )
        if sparse_rows:
            # a row's step must be the step of its elements alone: no norm or other reduction
            # over a leaf or the tree (it would see the rows present only)
            across = [p.name for p in rule.flat_parts
                      if not isinstance(p, Elementwise) or p.needs_norm]
            if across:
                raise TypeError(
                    f"uniopt.torch.Optimizer: sparse_rows=True steps the rows a sparse gradient "
                    f"holds element by element; {rule.name}'s {across[0]} is not elementwise")
            if any(getattr(p, "skip_zeros", False) for p in rule.flat_parts):
                # (sparse_adam's default, for dense gradients, where a 0 marks an absent entry)
                warnings.warn(
                    f"uniopt.torch.Optimizer: {rule.name} skips zero entries (skip_zeros=True), "
                    "and under sparse_rows=True skips them in the rows a gradient holds too, "
                    "where torch's SparseAdam steps every entry a sparse gradient stores: pass "
                    "skip_zeros=False for torch's numbers (uniopt.torch.SparseAdam does)",
                    stacklevel=2)
            self._sparse = "rows"
        else:
            self._sparse_error = (
                "uniopt.torch.Optimizer does not support sparse gradients unless made with "
                "sparse_rows=True (an elementwise rule, stepping the rows a gradient holds)")
        if differentiable and any(map(isinstance, rule.flat_parts, itertools.repeat(Combinator))):
            raise TypeError(_no_recorded_combinator(rule))
        unrun = self._unrun(rule)
        if unrun:
            raise TypeError(unrun)
        if any(isinstance(p, reduce_on_plateau) for p in rule.flat_parts):
            raise TypeError(
                "uniopt.torch.Optimizer: reduce_on_plateau reads the loss, which step() does "
                "not take; use torch.optim.lr_scheduler.ReduceLROnPlateau on this optimizer"
            )
        jax_only = [name for name, p in zip(rule.tree_layout, _tree_parts(rule), strict=True)
                    if p.libraries is not None and "torch" not in p.libraries]
        if jax_only:
            raise TypeError(
                "uniopt.torch.Optimizer: the rule holds an optax transformation "
                f"({', '.join(jax_only)}), which runs on JAX or NumPy arrays, not tensors"
            )
        self.rule = rule
        values = hyperparameter_keys(rule)
        self._keys = tuple(values)
        # the multi-tensor options only where asked for, so groups stay as they were
        options = {k: v for k, v in (("foreach", foreach), ("capturable", capturable),
                                     ("differentiable", differentiable)) if v}
        self._init(params, {**values, "maximize": maximize, "state_dtype": state_dtype,
                            **options})

    def _unrun(self, rule: Transform) -> str | None:
        """Why this class's step cannot run ``rule``, from what its members' parts declare (a
        rule's, or a part's in a chain or a combinator): a part that evaluates the objective at
        trial points (a :class:`~uniopt.base.Minimizer`), or a step argument
        (:attr:`~uniopt.base.Part.step_args`) that this step does not hand it; or None."""
        for _, m in members(rule):
            args = declared(m, "step_args")
            lacking = [a for a in args if a not in self._step_args]
            trials = any(isinstance(p, Minimizer) for p in m.flat_parts)
            if not (trials or lacking):
                continue
            what = ("evaluates the closure at trial points" if trials else
                    f"takes {', '.join(f'{a}=' for a in lacking)} at each step, which "
                    f"{self._name}.step does not hand it")
            # (a class made for the rule runs it alone: not inside a partition or a chain)
            runner = _RUNNERS.get(type(m)) if m is rule else None
            if runner is not None:
                return f"{self._name}: {m.name} {what}; use {runner[0]} ({runner[1]})"
            how = ("uo.minimize_step_(state, params, closure), the closure taking the params and "
                   "returning (loss, grads)" if trials else
                   f"uo.update_(state, params, grads, "
                   f"{', '.join(f'{a}=...' for a in args)})")
            return (f"{self._name}: {m.name} {what}, and no uniopt.torch class runs it: step it "
                    f"with the functional API on the parameters' tensors, state = "
                    f"uo.setup(rule, params), then {how}")
        return None

    # --- construction ----------------------------------------------------------------------

    def _init(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        world = _zero_world()
        if world is not None and world > 1:
            self._refuse_zero_share(world)
        self._reset_caches()
        if defaults.get("state_dtype") is None:  # only where asked for: torch's groups otherwise
            defaults = {k: v for k, v in defaults.items() if k != "state_dtype"}
        # (by identity: the defaults are bools, and a tensor's == is no bool)
        defaults = {k: v for k, v in defaults.items()
                    if k not in self._absent_defaults or v is not self._absent_defaults[k]}
        # (torch's base, by name: a named class is also its torch class, whose own __init__
        # and __setstate__ come next in its order and must not run)
        torch.optim.Optimizer.__init__(self, params, defaults)
        self.state = plans.Versioned(dict, self.state)

    def _refuse_zero_share(self, world: int) -> None:
        """Raise where this optimizer's rule reads every parameter of a group at once: ZeRO
        makes it over this rank's share of the parameters, and each rank would compute such a
        part over its share alone, silently."""
        parts = every_leaf_parts(self.rule)
        if not parts:
            return
        names = ", ".join(dict.fromkeys(p.name for p in parts))
        norms = all(map(global_norm, parts))
        cls = type(self)
        who = (f"uniopt.torch.{cls.__qualname__}" if cls.__module__.startswith("uniopt.torch")
               else f"{cls.__module__}.{cls.__qualname__}")
        raise TypeError(
            f"{who} as ZeroRedundancyOptimizer's optimizer_class on {world} ranks: its "
            f"rule's {names} reads every parameter of a group at once, and ZeRO makes each "
            "rank's optimizer over that rank's share of the parameters, over which each rank "
            "would compute it alone (other numbers than one process's); use "
            "DistributedDataParallel without ZeRO (every rank steps every parameter)"
            + (", FSDP2 (fully_shard), whose step sums a global norm over every rank's shards,"
               if norms else "")
            + " or a rule without such parts")

    def _reset_caches(self) -> None:
        self._plans: dict[int, plans.Plan] = {}
        # each group's plans for other sets of parameters with a gradient, by that set (a
        # run that alternates them: two adapters trained on alternate batches), each checked
        # as the group's plan is before it steps again
        self._spare_plans: dict[int, _Spares] = {}
        # the small steps the groups' rules have made on the reference path, by loop, counted
        # together (uniopt.fast.cpu.COMPILE_AFTER): a group's step is small, 100 groups' are not
        self._small_steps: dict[Any, int] = {}
        self._rules: dict[int, _GroupRule] = {}  # by id(group)
        self._steps: dict[int, plans.Steps] = {}
        # each group's parameters in the order its whole-tree states were made for (the last
        # plan's, or the load's), by id(group): see _follow
        self._orders: dict[int, tuple[dict[str, Any], tuple[torch.Tensor, ...]]] = {}

    @property
    def _combined_rule(self) -> bool:
        """Whether the rule runs other rules: each group then keeps one State, stepped whole
        (uniopt.torch.combined)."""
        # (once per rule: every step asks)
        rule = self.rule
        known = vars(self).get("_combined_of")
        if known is None or known[0] is not rule:
            known = self._combined_of = (
                rule, any(map(isinstance, rule.flat_parts, itertools.repeat(Combinator))))
        return known[1]

    @property
    def _name(self) -> str:
        return "uniopt.torch.Optimizer"

    def __getstate__(self) -> dict[str, Any]:
        out = super().__getstate__()
        if "rule" in vars(self):  # a named class's rule is its class's
            out["rule"] = self.rule
        for key in ("_sparse", "_sparse_error"):  # Optimizer(sparse_rows=...)'s choice
            if key in vars(self):
                out[key] = vars(self)[key]
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = state.get("defaults", vars(self).get("defaults", {}))
        had = "differentiable" in defaults
        torch.optim.Optimizer.__setstate__(self, state)
        if not had:  # torch adds it to every optimizer's defaults; its classes without it lack it
            self.defaults.pop("differentiable", None)
        if not isinstance(self.state, plans.Versioned):  # load_state_dict sets a new one
            self.state = plans.Versioned(dict, self.state)
        if "rule" in state:
            self._keys = tuple(hyperparameter_keys(self.rule))
        self._reset_caches()
        # (a loaded state is in the order of the groups' params now)
        self._orders = {id(g): (g, tuple(g["params"])) for g in self.param_groups}
        for group in self.param_groups:  # keys an older state may lack, as torch fills them
            for k, v in self.defaults.items():
                if k not in self._absent_defaults:  # (one lacking is its own default)
                    group.setdefault(k, v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking that the group's values build a valid
        rule; nothing changes on an error. A parameter listed twice warns as torch does and is
        kept once (torch's for-loop would update it twice per step)."""
        if isinstance(param_group, dict):
            params = param_group.get("params")
            if params is not None and not isinstance(params, (torch.Tensor, set, list, tuple)):
                param_group["params"] = list(params)  # as torch: read a generator once
            values = self._filled({**self.defaults, **param_group})
            try:
                self._group_rule(values)
            except SlotsChanged as e:
                raise ValueError(self._slots_changed(len(self.param_groups), values, e)) from None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _drop_rule(group)
        if self._name == "uniopt.torch.Optimizer":  # (a named class takes torch's keys alone)
            _warn_unread(self, len(self.param_groups) - 1, group)
        given = {k: v for k, v in group.items() if k != "params" and _holds_schedule(v)}
        if given:  # (the group itself is held: its id stays its own)
            vars(self).setdefault("_schedules_given", {})[id(group)] = (group, given)
        ps = group["params"]
        if len({id(p) for p in ps}) != len(ps):
            keep = [i for i, p in enumerate(ps) if all(q is not p for q in ps[:i])]
            group["params"] = [ps[i] for i in keep]
            if "param_names" in group:
                group["param_names"] = [group["param_names"][i] for i in keep]

    # --- the rule of a group ---------------------------------------------------------------

    def _group_rule(self, group: dict[str, Any]) -> Transform:
        """The rule a group's values make (raises on invalid values)."""
        group = self._filled(group)  # (AdamW's couple_lr, absent at its default)
        # (a str: a NumPy dtype equals its name, and went on to fail as an attribute name)
        sd = group.get("state_dtype")
        if not (sd is None or isinstance(sd, str) and sd in ("float32", "float64", "q8")):
            raise ValueError(
                f"{self._name}: state_dtype must be None, 'float32', 'float64' or 'q8', got "
                f"{group['state_dtype']!r}"
            )
        if any(map(_read_on_device, (field(group, k) for k in self._keys))):
            # a value read on the device is not checked there: checked here by its value now
            # (a host read, when the rule is made)
            self._build_rule({**group, "capturable": False})
        rule = self._build_rule(group)
        if group.get("state_dtype") == "q8":
            # refused here, where torch checks a group's values, not at the first step: 8 bits
            # are refused for a rule whatever its params (float32 state is refused on float64
            # params, which a step looks at: a model may change dtype after construction)
            # (the params are not looked at for 8 bits, only whether there are any: a
            # scheduled group makes its rule again at every step)
            check_state_dtype(rule, "q8", group.get("params", []), who=self._name)
        return chain(scale(-1.0), rule) if group.get("maximize") else rule

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        values = {k: field(group, k) for k in self._keys}
        return adjusted_by_names(State(self.rule, 0, {}, None), values, named=False).rule

    def _rule(self, group: dict[str, Any]) -> tuple[Transform, bool]:
        """The group's rule and whether it holds a schedule, cached by the group's values: the
        same objects as last step (a tensor's value is read again: it may have been written in
        place), or else equal values."""
        if group.get("rule") is not None:  # ZeRO's, of a group added or loaded since
            _drop_rule(group)
        raw = list(map(group.get, self._watched))
        hit = self._rules.get(id(group))
        if hit is not None and hit.group is not group:
            hit = None
        if hit is not None and not hit.by_value:
            if all(map(operator.is_, raw, hit.raw)):
                if hit.steady is None:
                    return hit.rule, hit.scheduled
                hit.steady[0] += 1
                if hit.steady[0] < STEADY:
                    return hit.rule, hit.scheduled
                hit = None  # numbers that stopped changing: a rule holding them again
            elif hit.steady is not None and _only_read(raw, hit):
                hit.raw[:] = raw  # (the rule reads the new values)
                hit.steady[0] = 0
                return hit.rule, hit.scheduled
        # (read, not written into the group: a key it lacks is its default, see
        # _absent_defaults)
        values = self._filled(group)
        for k, v in zip(self._keys, raw, strict=False):
            bad = _not_one_element(v)
            if bad is not None:  # (before the key: comparing such tensors raises of itself)
                raise ValueError(f"{self._name}: param group's {k} must be a number or a "
                                 f"1-element tensor, got a tensor of shape "
                                 f"{tuple(bad.shape)}: {bad!r}")
        # (the state dtype too: a value written after a step is checked as the rule's are)
        key = (*(_key(values, k) for k in self._keys),
               *(bool(group.get(f)) for f in _RULE_FLAGS), group.get("state_dtype"))
        eligible = self._live_keys(group)
        form = tuple(_form(r) or v if k in eligible else v
                     for k, r, v in zip(self._keys, raw, key, strict=False)
                     ) + key[len(self._keys):]
        read: frozenset[int] = frozenset()
        steady = None
        if hit is not None and hit.key == key:
            rule, scheduled, steady, read = hit.rule, hit.scheduled, hit.steady, hit.read
        elif hit is not None and hit.form == form:
            # only numbers changed (a torch lr_scheduler's): a rule that reads them, and those
            # it read already, from the group at each step
            read = hit.read | {i for i, (a, b) in enumerate(zip(key, hit.key, strict=True))
                               if a != b}
            if read == hit.read:  # (another number, equal, written where none is read)
                rule = hit.rule
            else:
                gi = next(i for i, g in enumerate(self.param_groups) if g is group)
                readers = {self._keys[i]: _readers(group, self._keys[i], gi) for i in read}
                rule = self._group_rule({**values, **readers})
            scheduled, steady = True, [0]
        else:
            try:
                rule = self._group_rule(values)
            except (ValueError, TypeError) as e:
                at = next((i for i, g in enumerate(self.param_groups) if g is group), None)
                if isinstance(e, SlotsChanged) and at is not None:
                    raise ValueError(self._slots_changed(at, values, e)) from None
                if type(e) not in (ValueError, TypeError):
                    raise  # (a subclass may take other arguments than a message)
                # a value written into a group since; a message that names a group already (a
                # lr's or betas', read where it is) is left as it is
                if at is None or "param group" in str(e):
                    raise
                raise type(e)(f"{e} (the value param group {at} holds)") from None
            scheduled = _scheduled(rule)
        by_value = any(map(_in_place, raw, key))
        if id(group) not in self._rules and len(self._rules) >= len(self.param_groups):
            self._forget_removed_groups()  # (a new group where the cache has one too many)
        self._rules[id(group)] = _GroupRule(group, raw, rule, scheduled, by_value, key, form,
                                            read, steady)
        rule.memo.setdefault("cpu-small-shared", self._small_steps)
        return rule, scheduled

    def _slots_changed(self, gi: int, group: dict[str, Any], e: SlotsChanged) -> str:
        """:func:`uniopt.adjust`'s refusal of a group's values that add or drop a slot, in the
        group's words: which keys, and the slots."""
        made = State(self.rule, 0, {}, None)
        # (a key of _absent_defaults a group or the defaults lack: its default)
        group, defaults = self._filled(group), self._filled(self.defaults)
        keys = []
        for k in self._keys:
            try:
                adjusted_by_names(made, {k: field(group, k)}, named=False)
            except SlotsChanged:
                keys.append(k)
            except (ValueError, TypeError):
                pass
        made_with = ", ".join(repr(defaults[k]) for k in keys)
        which = (" and ".join(f"{k!r} = {group[k]!r}" for k in keys)
                 + f" (the optimizer was made with {made_with})" if keys else "values")

        def slots(layout: Any) -> set[str]:
            return {f"{part}.{s}" for part, names in layout for s in names}

        added, dropped = slots(e.after) - slots(e.before), slots(e.before) - slots(e.after)
        change = " and ".join(f"{verb} the state slot{'s' * (len(ss) > 1)} {', '.join(sorted(ss))}"
                              for verb, ss in (("adds", added), ("drops", dropped)) if ss)
        names = " and ".join(keys) or "them"
        fix = (f"write {names} as a schedule, uniopt.schedules.constant({group[keys[0]]!r}), "
               "which keeps the slot (and state_dict() saves, where a lambda would not pickle)"
               if dropped and keys else
               f"make it with {names} non-zero or a schedule (a function of the step), which "
               "keeps the slot whatever number the group holds")
        return (f"{self._name}: param group {gi}'s {which} {change or 'changes the state slots'}"
                f", and {self.rule.name}'s slots are fixed when the optimizer is made: {fix}, "
                "or make a new optimizer")

    def _forget_removed_groups(self) -> None:
        """Drop what is cached for groups no longer in ``param_groups`` (``param_groups.pop()``,
        ``clear()`` then ``add_param_group``, as a search or a model rebuilt each epoch does):
        each cache held its group, and the group its parameters, for the optimizer's life
        (8 MB an epoch of a 4 MB model, weights and gradients)."""
        live = {id(g): g for g in self.param_groups}
        for k in [k for k, hit in self._rules.items() if live.get(k) is not hit.group]:
            del self._rules[k]
        for k in [k for k, (g, _) in self._orders.items() if live.get(k) is not g]:
            del self._orders[k]
        given = vars(self).get("_schedules_given")
        if given:
            for k in [k for k in given if k not in live]:
                del given[k]
        n = len(self.param_groups)
        for cache in (self._plans, self._steps, self._spare_plans):
            for gi in [gi for gi in cache if gi >= n]:
                del cache[gi]

    def _filled(self, group: dict[str, Any]) -> dict[str, Any]:
        """``group``, or where it lacks keys of :attr:`_absent_defaults`, a copy with their
        defaults: the values its rule is made of."""
        absent = self._absent_defaults
        if not absent or absent.keys() <= group.keys():
            return group
        return {**absent, **group}

    def _live_keys(self, group: dict[str, Any]) -> frozenset[str]:
        """The group keys whose plain numbers the group's rule may read at each step (see
        :class:`_GroupNumber`): hyperparameters that take a schedule. No key in a capturable
        group, whose numbers a captured graph holds."""
        return frozenset() if group.get("capturable") else frozenset(self._keys)

    @property
    def _watched(self) -> tuple[str, ...]:
        # (made once per tuple of keys: every step reads it)
        keys = self._keys
        made = vars(self).get("_watched_of")
        if made is None or made[0] is not keys:
            made = self._watched_of = (keys, (*keys, *_RULE_FLAGS, "state_dtype"))
        return made[1]

    def _slot_names(self, rule: Transform) -> plans.SlotNames:
        """(uniopt key, state name) of each slot of ``rule``: here the key names both."""
        return [(key, key) for key, _ in rule.slot_keys]

    def _known_slots(self, rule: Transform) -> set[str]:
        """The state names a loaded state of a parameter whose group has ``rule`` may hold
        (the first parameter of a group also the states of its whole-tree parts)."""
        return {name for _, name in self._slot_names(rule)} | set(rule.tree_layout)

    # --- the step --------------------------------------------------------------------------

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], Any]) -> Any: ...

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """One update of every parameter that has a gradient; with ``closure``, the loss it
        returns (evaluated first, with gradients enabled). Every check runs before any
        parameter or state is written. Step hooks and the profiler see it as torch's own.
        Under ``torch.compile`` it runs as it does eagerly (one graph break, no recompiles)."""
        if torch.compiler.is_compiling():
            # dynamo, tracing: a break into the untraced step (the eager step does not pay for
            # torch.compiler.disable's wrapper, about 1 us, on every call)
            return _UNTRACED_STEP(self, *args, **kwargs)
        # one step at a time: two threads stepping one optimizer refilled the lists a pool
        # run was reading by address, a crash (torch's loops race, without one); here, so
        # that every class's own step (LBFGS's, Sophia-H's, NAdam's derived numbers after it)
        # is inside it
        with self.__dict__.get("_step_lock") or self._new_step_lock():
            try:
                if (
                    self._optimizer_step_pre_hooks
                    or self._optimizer_step_post_hooks
                    or _torch_optimizer._global_optimizer_pre_hooks
                    or _torch_optimizer._global_optimizer_post_hooks
                    or torch.autograd._profiler_enabled()
                ):
                    # the hooks see the call's arguments as torch's do, as they were given: a
                    # closure by keyword is in their kwargs, where a pre-hook may replace it
                    return _HOOKED_STEP(self, *args, **kwargs)
                return self._step(*args, **kwargs)
            except BaseException as e:
                self._unsteady()
                if isinstance(e, TypeError):
                    _misnamed_call(self, args, kwargs)
                raise

    # (its signature as torch's: a caller may look for the closure parameter)
    step.__signature__ = inspect.signature(  # type: ignore[attr-defined]
        lambda self, closure=None: None)

    # torch wraps every subclass's step in its hooks and a profiler label, which costs about
    # 10 us a step when there is neither (a small model's whole step is a few times that):
    # step above takes torch's wrapper only where a hook or the profiler is there to see it
    step.hooked = True  # type: ignore[attr-defined]

    def _unsteady(self) -> None:
        """A step that raised counts no step of the numbers' run (:data:`STEADY`): their rule
        is not made holding them after that many refused steps, ending a refusal by itself."""
        for hit in self._rules.values():
            if hit.steady is not None:
                hit.steady[0] = 0

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        if vars(self).get("_in_eval"):
            raise RuntimeError(
                f"{self._name}: a step after optimizer.eval(), whose parameters hold the "
                "evaluation weights: call optimizer.train() first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if (vars(self).get("found_inf") is not None or vars(self).get("grad_scale") is not None
                ) and self._amp_skips():
            return loss
        # torch.no_grad() without its context manager's Python frames (a small step's cost)
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        if len(self._rules) > len(self.param_groups):  # (a group removed: param_groups.pop())
            self._forget_removed_groups()
        try:
            if self._combined_rule:
                if plans.recorded(self.defaults):
                    # (the optimizer's flag set since: its members step NumPy views, unrecorded)
                    raise RuntimeError(_no_recorded_combinator(self.rule))
                combined.adopt(self)
                rules = [self._rule(group)[0] for group in self.param_groups]
                has = [[p.grad is not None for p in group["params"]]
                       for group in self.param_groups]
                for gi, (group, rule) in enumerate(zip(self.param_groups, rules, strict=True)):
                    # (every group's refusals before any group steps, as _prepare's)
                    plans.refuse(rule, gi, group, has[gi], plans.recorded(self.defaults),
                                 given=bool(self.defaults.get("capturable")))
                self._check_apart([(gi, group, h) for gi, (group, h)
                                   in enumerate(zip(self.param_groups, has, strict=True))])
                prepared = [combined.prepare(self, gi, group, rule) for gi, (group, rule)
                            in enumerate(zip(self.param_groups, rules, strict=True))]
                if len(prepared) > 1:
                    for gi, (state, ps, gs) in enumerate(prepared):
                        # (every group's engine checks before the first group writes)
                        names = LEAF_NAMES.set(None if isinstance(ps, dict) else
                                               [f"{_group_list(gi)}[{j}]"
                                                for j in range(len(ps))])
                        try:
                            check_step(state, ps, gs)
                        finally:
                            LEAF_NAMES.reset(names)
                for gi, (group, rule, made) in enumerate(zip(self.param_groups, rules, prepared,
                                                             strict=True)):
                    combined.step(self, gi, group, rule, prepared=made,
                                  **self._loss_for(rule, loss))
                combined.adopted(self)
                return loss
            jobs = [self._prepare(gi, group) for gi, group in enumerate(self.param_groups)]
            # (a rule known to read no loss makes no call here: a small step's cost)
            extras = [{} if job.rule.memo.get("reads_loss", False) is None
                      else self._loss_for(job.rule, loss, plans.recorded(self.defaults))
                      for job in jobs]
            if len(jobs) == 1:  # (a small step's cost: no lists of one)
                job = jobs[0]
                if job.plan is None:
                    self._check_builds(jobs)
                plan = job.plan or self._build(job)
                views = job.views
                if views is None and len(plan.runs) > 1:
                    # gradients the fast path did not take, stepped run by run: each run's
                    # engine checks before the first writes (one run's are its own)
                    views = plan.check(job.rule, job.grads,
                                       self._run_rules(job.gi, plan, job.rule))
                plan.run(job.rule, job.grads, views, self._run_rules(job.gi, plan, job.rule),
                         job.resolved, extras[0])
                return loss
            if any(job.plan is None for job in jobs):
                self._check_builds(jobs)
            built = [job.plan or self._build(job) for job in jobs]
            wheres = [_group_list(job.gi) for job in jobs]
            for job, plan, where in zip(jobs, built, wheres, strict=True):
                if job.views is None:  # (as above, and before any group writes)
                    # (its views are not kept: a gradient copied to its parameter's layout is
                    # copied again when its group steps, after the groups before it, as a
                    # gradient that views another group's parameter reads it then in torch)
                    plan.check(job.rule, job.grads, self._run_rules(job.gi, plan, job.rule),
                               where)
            for job, plan, extra, where in zip(jobs, built, extras, wheres, strict=True):
                plan.run(job.rule, job.grads, job.views,
                         self._run_rules(job.gi, plan, job.rule), job.resolved, extra, where)
        finally:
            torch._C._set_grad_enabled(enabled)
        return loss

    def _new_step_lock(self) -> Any:
        """The lock of this optimizer's steps, made at its first (the dict's setdefault: one
        for two threads that both step first; a copied or unpickled optimizer makes its own,
        as torch's __getstate__ keeps only the groups and the state)."""
        return self.__dict__.setdefault("_step_lock", threading.RLock())

    def _build(self, job: _Job) -> plans.Plan:
        """A new plan for a group (:func:`plans.build`), kept for its later steps."""
        assert job.sparse is not None  # _prepare looked at every gradient
        plan = self._plans[job.gi] = plans.build(
            job.group, job.rule, self._slot_names(job.rule), job.has, job.sparse,
            self._sparse == "rows", self.state, self._steps_for(job.gi, job.group["params"]),
            self._run_tags(job.gi, job.group, job.has), plans.recorded(self.defaults))
        return plan

    def _check_builds(self, jobs: list[_Job]) -> None:
        """What a step that makes plans checks over every group before any group's plan (and
        state) is made: a state dtype a group's rule refuses, and parameters that overlap."""
        for job in jobs:
            if job.plan is None:
                check_state_dtype(job.rule, job.group.get("state_dtype"), [
                    p for p, h in zip(job.group["params"], job.has, strict=True)
                    if h and not p.is_complex()], who=self._name)
        self._check_apart([(job.gi, job.group, job.has) for job in jobs])

    def _check_apart(self, groups: list[tuple[int, dict[str, Any], list[bool]]]) -> None:
        """Refuse two parameters this step updates whose memory overlaps (two Parameters over
        one storage, one a slice of the other): torch's loops step them one after the other,
        where one pass over a group steps both from the same old values and the second write
        loses the first's update. Refused as :func:`uniopt.update_` refuses such a tree, before
        anything is written; looked at, over every group at once, at a step that makes a
        group's plan (its first, and after a parameter's memory or gradients changed), and at
        every step of a rule that runs other rules (partition...), not at every step."""
        ps = [p for _, group, has in groups
              for p, h in zip(group["params"], has, strict=True) if h]
        names = [f"{_group_list(gi)}[{i}]"
                 for gi, _, has in groups for i, h in enumerate(has) if h]
        for name, p in zip(names, ps, strict=True):
            if (p.layout == torch.strided and not dtensor.is_dtensor(p) and not p.is_contiguous()
                    and backend.repeats(p)):
                # (as_strided rows that overlap: one pass steps a shared element once, from its
                # old value, where torch's loops step it once per place)
                raise ValueError(
                    f"{self._name}: {name}'s elements overlap in memory (shape "
                    f"{tuple(p.shape)}, strides {p.stride()}): torch's loops step a shared "
                    "element once for each place it has, uniopt once; give it memory of its own")
        pair = backend.overlapping(ps, storages=True) if len(ps) > 1 else None
        if pair is None:
            return
        i, j = pair
        raise ValueError(
            f"{self._name}: {names[j]} shares memory with {names[i]} (two parameters over one "
            "storage): torch's loops step them in turn, uniopt steps both from their values "
            "before the step, which would lose one's update; a tied weight is one parameter "
            "(give it once), or give each its own memory")

    def _amp_skips(self) -> bool:
        """A step under ``torch.amp.GradScaler`` where the optimizer scales for itself (a
        ``fused=True`` class, as torch's fused ones): GradScaler sets ``found_inf`` (any
        non-finite gradient: the step changes nothing, step counts included) and
        ``grad_scale`` (the gradients are divided by it in place, as torch's fused kernels
        leave them). Whether the step is skipped."""
        found_inf = vars(self).get("found_inf")
        if found_inf is not None and bool(found_inf):
            return True
        scale = vars(self).get("grad_scale")
        if scale is None:
            return False
        by_device: dict[Any, list[torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad)
        with torch.no_grad():
            for device, grads in by_device.items():
                torch._foreach_div_(grads, scale.to(device))
        return False

    def _loss_for(self, rule: Transform, loss: Any, recorded: bool = False) -> dict[str, Any]:
        """The step's loss for a rule whose parts read it (Polyak's step size, Momo's), as
        ``value=``: the closure's, a number; in a recorded step (``recorded``) a tensor loss
        as it is, whose derivative the step then carries."""
        memo = rule.memo  # (asked at every step: once per rule)
        reads = memo.get("reads_loss", False)
        if reads is False:
            reads = memo["reads_loss"] = reads_loss(rule)
        if reads is None:
            return {}
        if loss is None:
            raise TypeError(f"{self._name}: {reads} reads the loss of each step: call "
                            "step(closure), the closure returning the loss")
        if recorded and isinstance(loss, torch.Tensor):
            if loss.numel() == 1 and loss.dim():
                # one number, as the unrecorded step's float() takes it (a loss of shape (1,)),
                # in autograd's graph (the step runs without grad: a view made there has none)
                with torch.enable_grad():
                    loss = loss.reshape(())
            return {"value": loss}
        return {"value": float(loss.detach() if isinstance(loss, torch.Tensor) else loss)}

    def _prepare(self, gi: int, group: dict[str, Any]) -> _Job:
        """Everything that can fail, without writing anything."""
        rule, scheduled = self._rule(group)
        ps = group["params"]
        grads = list(map(_GRAD, ps))
        has = list(map(operator.is_not, grads, itertools.repeat(None)))
        plan = self._plans.get(gi)
        if plan is not None and plan.has != has:
            plan = self._swap_plan(gi, group, plan, has)
        elif gi in self._spare_plans:
            self._age_spares(gi, group)
        recorded = plans.recorded(self.defaults)
        if plan is not None and not plan.still_valid(self.state, group, ps, has, rule.layout,
                                                     recorded):
            plan = None
        views = None if plan is None else plan.fast_grads(grads)
        if views is None and plan is not None and plan.fast and (
                plan.reshaped() or any(plans.WRAPPED(g) for g in grads if g is not None)):
            # (only where a fast plan's views did not fit the gradients: no per-tensor look
            # otherwise; a group off the fast path, on a device, foreach, with sparse gradients
            # or a complex or non-contiguous parameter, still refuses such a cut, named as a
            # gradient of another shape, nothing written; gradients of a torch.func transform,
            # which a new plan refuses)
            plan = None
        sparse = None
        if plan is None:
            if rule.tree_layout:
                self._follow(group, rule)
            plans.refuse(rule, gi, group, has, recorded, self.state,
                         given=bool(self.defaults.get("capturable")))
            if group.get("fused"):
                _check_fused(ps, has)
        if views is None:  # a new plan always comes this way
            sparse = [g is not None and g.layout != torch.strided for g in grads]
            if any(sparse):
                self._check_sparse(group, grads)
                if plans.is_q8(group):
                    raise ValueError(f"{self._name}: sparse gradients with state_dtype='q8': "
                                     "the rows of an 8-bit slot share their block's scale")
            if plan is not None and plan.sparse != sparse:
                plan = None
        given = vars(self).get("_schedules_given")
        if given and id(group) in given and given[id(group)][0] is group:
            _check_not_replaced(self._name, gi, group, given[id(group)][1])
        if scheduled:
            if "initial_lr" in group and callable(group.get("lr")):
                raise TypeError(
                    f"{self._name}: param group {gi}'s lr is the uniopt schedule "
                    f"{group['lr']!r} and a torch lr_scheduler drives it too (the group "
                    "holds the 'initial_lr' one sets): drive it with one of them; where no "
                    "scheduler is attached (the key came with a loaded state_dict of a run "
                    f"that had one), delete it: param_groups[{gi}].pop('initial_lr')"
                )
            if plan is not None:
                counts = plan.counts()
            else:
                counts = {plans.state_step(self.state.get(q, {}))
                          for q, h in zip(ps, has, strict=True) if h}
            resolved = {s: resolve(rule, s) for s in sorted(counts)}
            return _Job(gi, group, rule, grads, has, sparse, plan, views, resolved)
        return _Job(gi, group, rule, grads, has, sparse, plan, views)

    def _follow(self, group: dict[str, Any], rule: Transform) -> None:
        """The group's whole-tree states put in the order of its params now, where they were
        reordered since the states were made (:func:`plans.follow`), checked where a plan is
        made: a reorder makes one (and no plan is set aside for such a group, whose every
        parameter has a gradient at every step)."""
        ps = group["params"]
        made = self._orders.get(id(group))
        if made is not None and made[0] is group and not (
                len(made[1]) == len(ps) and all(map(operator.is_, ps, made[1]))):
            plans.follow(rule, made[1], ps, self.state)
        self._orders[id(group)] = (group, tuple(ps))

    def _swap_plan(self, gi: int, group: dict[str, Any], plan: plans.Plan, has: list[bool]
                   ) -> plans.Plan | None:
        """Group ``gi``'s plan for the parameters ``has`` says have a gradient, kept from a step
        that had them (None: none kept, a new one is made), ``plan`` kept in its place: where
        the set changes at every step, remaking the plan cost more than torch's whole step
        (some 300 us for a dozen tensors). A kept plan is checked as any plan is. Only plans of
        this ``group`` are kept (one of a group popped since holds its parameters and state),
        and not for a class whose runs are split by what each parameter carries (NAdam,
        ASGD)."""
        del self._plans[gi]
        spares = self._spare_plans.get(gi)
        if spares is not None and spares.group is not group:
            del self._spare_plans[gi]
            spares = None
        if plan.group is not group or type(self)._run_tags is not Optimizer._run_tags:
            # (NAdam's, ASGD's: runs split by the numbers each parameter carries, as they were
            # when the plan was made; a new plan splits them as they are now)
            return None
        if spares is None:
            spares = self._spare_plans[gi] = _Spares(group)
        kept = spares.kept
        kept[tuple(plan.has)] = plan
        found = kept.pop(tuple(has), None)
        while len(kept) > SPARE_PLANS:
            del kept[next(iter(kept))]  # (the least recently set aside)
        spares.age = 0
        if found is not None:
            self._plans[gi] = found
        return found

    def _age_spares(self, gi: int, group: dict[str, Any]) -> None:
        """Group ``gi`` (``group``) stepped with the set of parameters of its last step: after
        :data:`SPARE_AGE` such steps in a row, its plans set aside are let go (with the views
        they hold of parameters and slots that may have been replaced since: a set of
        parameters that stopped training, an adapter trained in a first stage only); at once
        where they are another group's (one popped since, whose place this group took)."""
        spares = self._spare_plans[gi]
        spares.age += 1
        if spares.age > SPARE_AGE or spares.group is not group:
            del self._spare_plans[gi]

    def _run_tags(self, gi: int, group: dict[str, Any], has: list[bool]) -> list[Any] | None:
        """Per parameter of group ``gi``, what its run must share besides its step count (see
        :func:`plans.build`); None: nothing."""
        return None

    def _run_rules(self, gi: int, plan: plans.Plan, rule: Transform) -> list[Transform] | None:
        """The rule of each run of group ``gi``'s step (see :meth:`plans.Plan.run`); None: the
        group's ``rule`` for each."""
        return None

    def _check_sparse(self, group: dict[str, Any], grads: list[Any]) -> None:
        decay_checked = False
        for i, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
            if g is None or g.layout == torch.strided:
                continue
            if self._sparse is None:
                raise RuntimeError(
                    self._sparse_error or f"{self._name} does not support sparse gradients"
                )
            if g.layout != torch.sparse_coo:
                raise RuntimeError(f"{self._name} does not support {g.layout} gradients")
            if group.get("fused"):
                raise RuntimeError(self._fused_sparse_error)
            if not decay_checked:  # (the group's, once)
                # (any member's decay: "weight_decay", "1.weight_decay", a decay block's "wd")
                for key, wd in group.items():
                    if key.rsplit(".", 1)[-1] in ("weight_decay", "wd") and (
                            callable(wd) or plain(wd) != 0):
                        raise RuntimeError(self._sparse_decay_error)
                decay_checked = True
            index = g._indices() if self._sparse == "rows" else None
            if index is not None and index.numel() and (
                    bool((index < 0).any()) or bool((index >= torch.tensor(
                        p.shape[:index.shape[0]], device=index.device)[:, None]).any())):
                # (the rows are gathered and written back after the dense runs have stepped:
                # caught here, before anything is written; torch's own gather would raise late)
                raise IndexError(
                    f"{self._name}: the sparse gradient of param {i} of its group holds an index "
                    f"outside its shape {tuple(p.shape)}")
            if self._sparse == "rows" and plans.recorded(self.defaults):
                # the rows are gathered and written back in place, outside autograd: a step
                # that differentiable=True asks to record would go unrecorded, silently
                raise RuntimeError(
                    f"{self._name}: differentiable=True with sparse gradients is not offered "
                    "(a step of the gradient's rows is not recorded in autograd); use dense "
                    "gradients, or differentiable=False"
                )

    def _steps_for(self, gi: int, ps: list[torch.Tensor]) -> plans.Steps:
        steps = self._steps.get(gi)
        if steps is None or not steps.of(ps):
            steps = self._steps[gi] = plans.Steps.new(ps)
        return steps

    # --- averaged weights --------------------------------------------------------------------

    def averaged(self, name: str | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """The averaged weights the rule keeps (:func:`uniopt.ema`, :func:`uniopt.polyak`,
        :func:`uniopt.lookahead`'s slow weights), as :func:`uniopt.averaged` reads them: each
        parameter mapped to a new tensor of its dtype holding its average (one not updated
        yet: a copy of itself, where every average starts). ``name`` picks one of several
        averaging parts by its state name.

        >>> import torch, uniopt as uo, uniopt.torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = uniopt.torch.Optimizer([w], uo.chain(uo.sgd(lr=1.0), uo.polyak()))
        >>> for g in (1.0, 3.0):
        ...     w.grad = torch.full((2,), g)
        ...     opt.step()
        >>> w.detach(), opt.averaged()[w]
        (tensor([-4., -4.]), tensor([-2.5000, -2.5000]))
        """
        out = {}
        if self._combined_rule:
            combined.adopt(self)
        for gi, group in enumerate(self.param_groups):
            rule = self._rule(group)[0]
            if self._combined_rule:
                out.update(combined.averaged(self, gi, group, rule, name))
                continue
            part, key = find_average(rule, name)
            slot = dict(self._slot_names(rule))[key]
            for p in group["params"]:
                st = self.state.get(p, {})
                if slot not in st:
                    out[p] = p.detach().clone()
                    continue
                step = plans.state_step(st)
                resolved = part.at(step)
                assert isinstance(resolved, Averaging)
                out[p] = read_average(resolved, st[slot], p.detach(), step)
        return out

    def eval_weights(self) -> dict[torch.Tensor, torch.Tensor]:
        """The weights to evaluate a schedule-free rule at (:func:`uniopt.schedule_free_eval`,
        ``x = (y - (1 - beta) z) / beta``): each parameter a schedule-free part steps mapped to
        a new tensor; none for a rule without one. The parameters hold ``y``, but after
        :meth:`eval`, ``x`` itself."""
        training = {gi for gi, g in enumerate(self.param_groups) if g.get("train_mode", True)}
        out = self._swap_weights(back=False, gis=training)
        if len(training) < len(self.param_groups):  # (copies of the x these groups hold)
            held = self._swap_weights(back=True, gis=set(range(len(self.param_groups))) - training)
            out.update({p: p.detach().clone() for p in held})
        return out

    def _swap_weights(self, back: bool, gis: set[int] | None) -> dict[torch.Tensor, Any]:
        """:meth:`eval_weights`, of groups ``gis`` (None: all); ``back``: from the evaluation
        weights the parameters hold, their training weights ``beta*x + (1 - beta)*z``."""
        from ..rules.schedule_free import _eval_weights

        out: dict[torch.Tensor, torch.Tensor] = {}
        if self._combined_rule:
            combined.adopt(self)
        for gi, group in enumerate(self.param_groups):
            if gis is not None and gi not in gis:
                continue
            rule = self._rule(group)[0]
            if self._combined_rule:
                out.update(combined.eval_weights(self, gi, group, rule, back))
                continue
            ps = group["params"]
            if not ps or not rule.tree_layout:
                continue
            st = self.state.get(ps[0], {})
            trees = {k: st[k] for k in rule.tree_layout if k in st}
            if len(trees) != len(rule.tree_layout):  # (before the first step: x = y)
                continue
            with torch.no_grad():
                xs = _eval_weights(State(rule, plans.state_step(st), {}, None, None, trees),
                                   None, [p.detach() for p in ps], back)
            if xs is not None:
                out.update({p: x.clone() for p, x in zip(ps, xs, strict=True)
                            if x is not None})
        return out

    def eval(self) -> None:
        """schedulefree's ``optimizer.eval()``: the parameters take the evaluation weights
        (:meth:`eval_weights`) until :meth:`train` gives them back theirs, and a step in
        between raises. The mode is each group's ``train_mode``, as schedulefree keeps it, so
        a checkpoint saved in between (the HF Trainer saves after evaluating) resumes: its
        :meth:`train` computes ``y`` from the loaded ``x`` and ``z``; where nothing has written
        the parameters since, ``y`` comes back bit for bit (held meanwhile: a copy of those
        parameters). Nothing for a rule without a schedule-free part, so a loop that calls
        these (the HF Trainer, accelerate) runs any rule."""
        gis = {gi for gi, g in enumerate(self.param_groups) if g.get("train_mode", True)}
        xs = self._swap_weights(back=False, gis=gis) if gis else {}
        if not xs:
            return
        held = vars(self).setdefault("_train_weights", {})
        moved = {id(p) for p in xs}
        with torch.no_grad():
            for p, x in xs.items():
                y = p.detach().clone()
                p.copy_(x)
                held[p] = (y, p._version)
        for gi in gis:  # (the groups it moved: a rule without schedule-free parts keeps none)
            if any(id(p) in moved for p in self.param_groups[gi]["params"]):
                self.param_groups[gi]["train_mode"] = False
        self._in_eval = True

    def train(self) -> None:
        """schedulefree's ``optimizer.train()``: the parameters the training weights ``y``
        again (nothing where :meth:`eval` was not called)."""
        gis = {gi for gi, g in enumerate(self.param_groups) if g.get("train_mode") is False}
        held = vars(self).pop("_train_weights", None) or {}
        self._in_eval = False
        if not gis:
            return
        ys = self._swap_weights(back=True, gis=gis)
        with torch.no_grad():
            for p, y in ys.items():
                kept = held.get(p)
                # (the copy where nothing wrote the parameter since: y to the bit)
                p.copy_(kept[0] if kept is not None and kept[1] == p._version else y)
        for gi in gis:
            self.param_groups[gi]["train_mode"] = True

    # --- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` (:meth:`_state_dict`), its hooks run around the whole of it
        as torch runs them around its own: a post-hook sees the dict as returned, and may
        return another."""
        for pre in list(self._optimizer_state_dict_pre_hooks.values()):
            pre(self)
        with _hooks_held(self, "_optimizer_state_dict_pre_hooks",
                         "_optimizer_state_dict_post_hooks"):
            sd = self._state_dict()
        for post in list(self._optimizer_state_dict_post_hooks.values()):
            out = post(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (:meth:`_load_state_dict`), its pre-hooks run first on a
        shallow copy, as torch's are (a pre-hook may rename slots or merge groups before
        anything is checked), its post-hooks last."""
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for pre in list(self._optimizer_load_state_dict_pre_hooks.values()):
            out = pre(self, state_dict)
            if out is not None:
                state_dict = out
        with _hooks_held(self, "_optimizer_load_state_dict_pre_hooks",
                         "_optimizer_load_state_dict_post_hooks"):
            self._load_state_dict(state_dict)
        for post in list(self._optimizer_load_state_dict_post_hooks.values()):
            post(self)

    def _state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with each uniopt schedule in a group written as plain data
        (its type's name and fields), so that ``torch.load(..., weights_only=True)`` reads it.
        A rule that runs other rules keeps one state per group: it is written in the state of
        the group's first parameter, under ``"uniopt.group"``, the others' states empty, so
        that ``state`` is keyed by parameter, each one there (as ``torch.distributed.checkpoint``
        requires)."""
        if self._combined_rule:
            combined.adopt(self)
            combined.check_orders(self)
        elif self.rule.tree_layout:
            for group in self.param_groups:
                self._follow(group, self.rule)  # (saved in the order of the params now)
        left_out = self._removed_with_step_only()
        if left_out:
            # (torch's state_dict gives every tensor key of the state its place in the groups;
            # it reads self.state, so it is swapped for the filtered one, under the step lock:
            # a step in another thread would write its state into the throwaway)
            with self.__dict__.get("_step_lock") or self._new_step_lock():
                held = self.state
                self.state = defaultdict(dict, {k: v for k, v in held.items()
                                                if id(k) not in left_out})
                try:
                    sd = super().state_dict()
                finally:
                    self.state = held
        else:
            sd = super().state_dict()
        # (each group's keys as it holds them: a flattened DCP state dict is loaded by the
        # live groups' keys)
        groups = [{k: plain_schedules(v) for k, v in g.items()} for g in sd["param_groups"]]
        return {**sd, "state": _group_states_out(_q8_copies(sd["state"], groups), groups),
                "param_groups": groups}

    def _removed_with_step_only(self) -> set[int]:
        """The ids of the tensors that key ``self.state`` but are in no group (a group popped,
        its ``params`` replaced, after they stepped) and whose state is a ``step`` alone, which
        uniopt keeps for every class: torch's SGD keeps nothing for them, and its state dict,
        which has no place for a parameter in no group, leaves them out. Raise for one whose
        state holds more (torch's ``state_dict`` raises a bare ``KeyError``), and for any where
        the rule keeps a state over its group's parameters (Prodigy's, kept by the first
        one), which spans it: saved, it would not load."""
        placed = {id(p) for group in self.param_groups for p in group["params"]}
        spans = bool(self.rule.tree_layout)
        out = set()
        for k, st in self.state.items():
            if not isinstance(k, torch.Tensor) or id(k) in placed:
                continue
            if not spans and isinstance(st, dict) and st.keys() <= {"step"}:
                out.add(id(k))
                continue
            held = sorted(map(str, st)) if isinstance(st, dict) else type(st).__name__
            fix = ("put it back in its group, or start that group anew (del opt.state[q] for "
                   "every parameter q of the group: its state, kept by its first parameter, "
                   "spans them)" if spans else
                   "delete its state (del opt.state[p]), or put it back in a group")
            raise ValueError(
                f"{self._name}.state_dict: a tensor of shape {tuple(k.shape)} and dtype "
                f"{k.dtype}, in no param group (removed from its group after a step), has "
                f"state {held} in opt.state, and a state dict keeps a parameter's state by its "
                f"place in the groups: {fix}")
        return out

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (a state saved by the torch class of the same name loads
        here, and the reverse), after checking that the groups, their sizes, the slots and their
        shapes match this optimizer's parameters; nothing changes on an error."""
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            # (a key of _absent_defaults a group lacks stays out: that default, whatever this
            # optimizer's constructor was given)
            groups = _torch_filled(type(self), [
                {k: schedules_from_plain(v) for k, v in g.items()}
                if isinstance(g, dict) else g for g in state_dict["param_groups"]])
            state_dict = {**state_dict, "param_groups": groups}
            if isinstance(state_dict.get("state"), dict):
                state_dict["state"] = _group_states_in(state_dict["state"], groups)
        check_loadable(self, state_dict)
        differ = renamed(self, state_dict)
        if differ:
            warnings.warn(differ, stacklevel=fast.callers_level(
                os.path.dirname(torch.optim.__file__) + os.sep))
        for gi, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups,
                                                strict=True)):
            entry = state_dict["state"].get(combined.KEY.format(gi))
            if entry is not None:
                values = {**group, **{k: v for k, v in saved.items() if k != "params"}}
                try:
                    combined.check_entry(self, gi, values, self._group_rule(
                        {k: v for k, v in values.items() if k != "params"}), entry,
                        f"{self._name}.load_state_dict")
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{e}; nothing was loaded") from None
        super().load_state_dict(state_dict)
        # (schedulefree's mode comes with the groups; copies held by an eval() before the load
        # are of other parameters' values)
        vars(self).pop("_train_weights", None)
        self._in_eval = any(g.get("train_mode") is False for g in self.param_groups)
        self._restore_state_dtypes(state_dict)
        self._restore_tree_dtypes(state_dict)
        vars(self).pop("_combined", None)  # (states of the groups before, of other tensors)
        combined.owned(self)
        # a step saved as a number (torch before 1.12; a NumPy scalar too) made a 0-d tensor,
        # as torch's classes make it on load (their __setstate__), in torch's dtype for it
        for st in self.state.values():
            if isinstance(st, dict) and isinstance(st.get("step"), (int, float, np.number)):
                st["step"] = torch.tensor(float(st["step"]), dtype=plans.step_dtype())
            elif isinstance(st, dict) and "step" not in st and "momentum_buffer" in st:
                # torch's SGD (and Muon) keep no step, their buffer meaning one: the count the
                # next step would take, there now for a reader of state[p]["step"] and for a
                # state_dict saved before that step
                st["step"] = torch.tensor(float(plans.state_step(st)), dtype=plans.step_dtype())

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch's load casts a float parameter's state to its dtype. Where the group keeps
        its state in another (``state_dtype``), the saved tensors are put back as saved
        (copies, on the parameter's device): an 8-bit slot's codes and scales, and float32 or
        float64 slots of 16-bit or float32 parameters (cut to the parameter's dtype, a resumed
        run left the one that never stopped)."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            if group.get("state_dtype") is None:
                continue
            for k, p in zip(saved["params"], group["params"], strict=True):
                st, loaded = state_dict["state"].get(k, {}), self.state.get(p)
                if loaded is None:
                    continue
                for name, v in st.items():
                    # (8-bit slots: codes and scales both copied, whatever torch's load did
                    # with them, so a kept state dict is never half shared with the run)
                    if (name != "step" and isinstance(v, torch.Tensor) and name in loaded
                            and (loaded[name].dtype != v.dtype or plans.is_q8(group))):
                        loaded[name] = v.to(p.device, copy=True)

    def _restore_tree_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch's load casts the whole state of a group's first parameter, where whole-tree
        parts keep theirs, to that parameter's dtype: put back in the dtypes a live run keeps
        them in (:func:`plans.cast_trees`), from the saved tensors."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            ps = group["params"]
            if not ps:
                continue
            st = state_dict["state"].get(saved["params"][0])
            if isinstance(st, dict):
                plans.cast_trees(self._rule(group)[0], ps, self.state, st,
                                 group.get("state_dtype"))


def _q8_copies(state: dict[Any, Any], groups: list[dict[str, Any]]) -> dict[Any, Any]:
    """``state`` with the 8-bit slots of DTensor parameters copied: torch.distributed.checkpoint
    loads into the tensors of a state dict in place, and a load refused afterwards (scales of
    another layout, :func:`uniopt.interop.dtensor.check_q8`) must leave the optimizer's own
    as they were; ``load_state_dict`` puts the loaded copies in."""
    q8 = {k for g in groups if plans.is_q8(g) for k in g["params"]}
    return {k: {n: v.clone() if dtensor.is_dtensor(v) and n != "step" else v
                for n, v in st.items()} if k in q8 else st for k, st in state.items()}


_GROUP = combined.GROUP


def _drop_rule(group: dict[str, Any]) -> None:
    """``ZeroRedundancyOptimizer(params, optimizer_class=Optimizer, rule=...)`` copies its
    keywords, ``rule`` among them, into each of its param groups and so into ours, and copies
    ours back into its own after building us and after each step: ``None`` there keeps its
    ``state_dict()`` plain data (a rule may hold a lambda, which pickles not at all, and
    ``torch.load(weights_only=True)`` reads no rule). A group's rule is the optimizer's."""
    if "rule" in group:
        group["rule"] = None


def _group_states_out(state: dict[Any, Any], groups: list[dict[str, Any]]) -> dict[Any, Any]:
    """``state`` with each group's one state (uniopt.torch.combined) moved into its first
    parameter's, and an empty one for each other parameter of the group."""
    state = dict(state)
    for gi, g in enumerate(groups):
        if combined.KEY.format(gi) in state and g["params"]:
            first, *others = g["params"]
            state[first] = {**state.get(first, {}), _GROUP: state.pop(combined.KEY.format(gi))}
            for k in others:
                state.setdefault(k, {})
    return state


def _group_states_in(state: dict[Any, Any], groups: list[Any]) -> dict[Any, Any]:
    """The inverse of :func:`_group_states_out` (a state saved before it loads as it is)."""
    state = dict(state)
    for gi, g in enumerate(groups):
        ps = g.get("params") if isinstance(g, dict) else None
        if not isinstance(ps, list) or not ps:
            continue
        st = state.get(ps[0])
        if isinstance(st, dict) and _GROUP in st:
            # new containers: the entry may be this optimizer's own, its numbers replaced in
            # place (torch.distributed.checkpoint loads so), which its cache would not notice
            state[combined.KEY.format(gi)] = combined.containers(st[_GROUP])
            rest = {k: v for k, v in st.items() if k != _GROUP}
            if rest:
                state[ps[0]] = rest
            else:
                del state[ps[0]]
    return state


def _holds_schedule(v: Any) -> bool:
    """Whether a group's value is, or holds (``betas``, a tuple or a list), a schedule."""
    return has_schedule(tuple(v) if isinstance(v, list) else v)


def _check_not_replaced(name: str, gi: int, group: dict[str, Any],
                        given: dict[str, Any]) -> None:
    """A torch scheduler that writes a group's values over a uniopt schedule given there
    (OneCycleLR the lr, known by the ``max_lr`` it keeps in the group; OneCycleLR and CyclicLR
    with ``cycle_momentum``, their default, the lr and the momentum or ``betas``, by the
    ``max_momentum`` they keep): an error naming both, as for the schedulers that scale the
    value (those fail on its arithmetic). A value the user wrote over it by hand is the user's
    (a StepLR made after it drives it). CyclicLR with ``cycle_momentum=False`` leaves nothing
    in the group to tell its lr from one written by hand."""
    driven = (["lr"] if "max_lr" in group or "max_momentum" in group else []) + (
        ["momentum", "betas"] if "max_momentum" in group else [])
    for key in driven:
        if key in given and not _holds_schedule(group.get(key)):
            raise TypeError(
                f"{name}: param group {gi}'s {key} was the uniopt schedule {given[key]!r}, and a "
                f"torch lr_scheduler wrote {group.get(key)!r} over it: a param group's value is "
                "driven by a uniopt schedule or by a torch lr_scheduler, not both; give the group "
                "a number for the torch scheduler, or drop the scheduler")


def _torch_filled(cls: type, groups: list[Any]) -> list[Any]:
    """Saved ``groups`` as the torch class ``cls`` derives from makes them on load: its
    ``__setstate__`` fills in keys older releases did not save (RMSprop's ``momentum`` 0, the
    flags) and sets some outright (AdamW's ``decoupled_weight_decay``). Run on a scratch object
    of that class, found in ``vars`` (the class's own, not one it inherits); the groups as they
    are where ``cls`` has no torch class of its own (``uniopt.torch.Optimizer``)."""
    # (torch.optim.Adafactor's and Muon's module is "torch.optim" itself)
    base = next((c for c in cls.__mro__ if c.__module__.split(".")[:2] == ["torch", "optim"]
                 and c is not torch.optim.Optimizer), None)
    if base is None or "__setstate__" not in vars(base) or not all(
            isinstance(g, dict) for g in groups):
        return groups
    scratch: Any = object.__new__(base)
    # (torch's Optimizer.__setstate__ would wrap the torch class's step in its profiling hook)
    scratch._patch_step_function = lambda: None
    filled = [dict(g) for g in groups]
    try:
        vars(base)["__setstate__"](scratch, {"param_groups": filled, "state": {},
                                            "defaults": {}})
    except Exception:  # (a group malformed otherwise: check_loadable names it)
        return groups
    return filled


@contextlib.contextmanager
def _hooks_held(opt: Optimizer, *names: str) -> Any:
    """``opt``'s hooks of ``names`` kept from torch's own ``state_dict``/``load_state_dict``
    while this class's call runs (which runs them around it)."""
    held = {name: getattr(opt, name) for name in names}
    for name, hooks in held.items():
        setattr(opt, name, type(hooks)())
    try:
        yield
    finally:
        for name, hooks in held.items():
            setattr(opt, name, hooks)


# where torch has fused kernels (torch.utils._foreach_utils)
_FUSED_DEVICES = ("mps", "cuda", "xpu", "hpu", "cpu", "mtia")


def _check_fused(ps: list[torch.Tensor], has: list[bool]) -> None:
    """torch refuses ``fused=True`` for a parameter that is not a floating point tensor on a
    device with fused kernels, with this error, at its first step."""
    devices = [*_FUSED_DEVICES, torch._C._get_privateuse1_backend_name()]
    for p, h in zip(ps, has, strict=True):
        if h and not (p.device.type in devices and torch.is_floating_point(p)):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of "
                f"supported devices: {devices} but {p.dtype} and {p.device.type}"
            )


# torch.compiler.disable in the lazy form torch.optim marks its own methods with: dynamo is
# imported at the first traced step, not with uniopt.torch (about 1.5 s of a 4 s import). What
# it costs: dynamo's explanation of the break names this function as one it skips, without a
# reason of ours (docs/torch.md gives it). (A private name of torch's: where a release drops
# it, the public decorator, which imports dynamo with uniopt.torch.)
@getattr(torch, "_disable_dynamo", None) or torch.compiler.disable
def _UNTRACED_STEP(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
    return self.step(*args, **kwargs)


def _misnamed_call(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise torch's words where a step's arguments do not fit it: Python named the private
    ``_step`` the call reached (``Optimizer._step() got an unexpected keyword argument``), torch
    the class's ``step`` (``Adam.step() ...``). Run only once a TypeError was raised."""
    sig = inspect.signature(opt._step)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        said = str(e)
        if said == "too many positional arguments":  # (inspect's words: Python's, self counted)
            kinds = [q for q in sig.parameters.values() if q.kind is q.POSITIONAL_OR_KEYWORD]
            least = 1 + sum(q.default is q.empty for q in kinds)
            said = (f"takes {'from ' + str(least) + ' to ' if least <= len(kinds) else ''}"
                    f"{1 + len(kinds)} positional arguments but {1 + len(args)} were given")
        raise TypeError(f"{type(opt).__name__}.step() {said}") from None


def _HOOKED_STEP(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
    """The step in torch's own wrapper (hooks, then the profiler's label and entry point),
    made once per class around a function named as the class's step: torch's message for a
    pre-hook's bad return names it (``<function Adam.step at ...>``)."""
    cls = type(self)
    hooked = _HOOKED.get(cls)
    if hooked is None:
        # the arguments as the pre-hooks left them (SophiaG's bs too): the class's own _step
        # (LBFGS has another) takes them
        def step(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
            return self._step(*args, **kwargs)

        step.__qualname__, step.__module__ = f"{cls.__name__}.step", cls.__module__
        hooked = _HOOKED[cls] = torch.optim.Optimizer.profile_hook_step(step)
    return hooked(self, *args, **kwargs)


_HOOKED: dict[type, Any] = {}

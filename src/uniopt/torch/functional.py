"""``uniopt.torch``'s classes as the functional optimizers of torch.distributed's overlapped steps.

``ZeroRedundancyOptimizer(..., overlap_with_ddp=True)`` under DDP's ``hook_with_zero_step``
(or ``hook_with_zero_step_interleaved``) and ``DistributedDataParallel._register_fused_optim``
step inside DDP's communication hook, a bucket of gradients at a time, through the "functional"
twin that ``torch.distributed.optim.utils.functional_optim_map`` maps an optimizer class to.
:class:`Functional` is that twin for every class here, written once: it wraps an instance of
the class over the rank's parameters, so the numbers, the compiled CPU loop and the state are
the class's own. Each class is mapped to a subclass that names it (``Functional.of``).

A bucket's step hands gradients for some of the parameters and ``None`` for the others: those
with a gradient step, so each parameter keeps its own step count (``state[p]["step"]``), as
torch's functional optimizers do. Each set of parameters stepped together (a bucket's share,
one parameter under DDP's fused step) is stepped by an instance of the class of its own that
shares the one state, so that its step plan, built once, is not rebuilt for every bucket.

The twin's ``param_group`` is the wrapped optimizer's one group: ZeRO writes its own groups'
values into it before each step, so an LR scheduler on the ZeRO optimizer reaches it (torch's
own twins read the constructor's values instead). Its ``state_dict()`` is the wrapped
optimizer's, so ZeRO's ``consolidate_state_dict`` gathers the class's state.

The classes that cannot step this way raise, naming the class and why, when the twin is made:
those whose step needs a closure (``LBFGS``, ``SophiaH``), ``SparseAdam`` (sparse gradients
only; DDP's buckets are dense), and a rule with a part that sees every parameter of a group at
once (a global norm, a line search, a combinator such as :func:`uniopt.partition`), which a
bucket's share would change.

Registration is lazy: importing ``torch.distributed.optim`` compiles torch's TorchScript twins
(about half a second), which a process that never overlaps should not pay. The classes are
registered when torch imports ``torch.distributed.optim.utils``, or at once where it already
has.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch

from ..base import WholeTree
from .hessian import SophiaH
from .named import LBFGS, SparseAdam
from .optimizer import Optimizer, global_norm

# why a class's step cannot be a functional one
_CANNOT = {
    LBFGS: "its step evaluates a closure (the loss at trial points), which an overlapped "
           "step inside DDP's communication hook does not have",
    SophiaH: "its step takes Hessian-vector products through a closure, which an overlapped "
             "step inside DDP's communication hook does not have",
    SparseAdam: "it takes sparse gradients only, and DDP's gradient buckets are dense",
}


def _whole_group(part: Any) -> bool:
    """Whether ``part`` cannot step a bucket's share of a group: a global norm, any whole-tree
    part, a combinator whatever its own step reads (a share would change its members' leaves,
    bucket by bucket)."""
    return global_norm(part) or isinstance(part, WholeTree)


def why_not(optimizer: Optimizer) -> str | None:
    """Why ``optimizer`` cannot step a bucket of its parameters at a time, or None."""
    for cls, why in _CANNOT.items():
        if isinstance(optimizer, cls):
            return why
    whole = [p.name for p in optimizer.rule.flat_parts if _whole_group(p)]
    if whole:
        return (f"its rule's {', '.join(whole)} sees every parameter of a group at once, and an "
                "overlapped step hands it one DDP bucket's")
    return None


def _public_name(cls: type) -> str:
    if cls.__module__.startswith(f"{__package__}."):
        return f"{__package__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class Functional:
    """The functional optimizer of ``optimizer_class`` (a ``uniopt.torch`` class), with the
    interface torch.distributed's overlapped steps call: the constructor
    ``(params, *args, _allow_empty_param_list=False, **kwargs)``, ``param_group`` (the
    parameters and the hyperparameters), ``step(gradients)`` (one gradient or ``None`` per
    parameter) and ``step_param(param, grad)``. ``optim`` is the wrapped optimizer: its
    ``state``, ``state_dict()`` and ``load_state_dict()`` are this one's.
    """

    optimizer_class: ClassVar[type[Optimizer]] = Optimizer

    def __init__(self, params: Sequence[torch.Tensor], *args: Any,
                 _allow_empty_param_list: bool = False, **kwargs: Any) -> None:
        params = list(params)
        name = _public_name(self.optimizer_class)
        if not params and not _allow_empty_param_list:
            raise ValueError(f"functional {name}: optimizer got an empty parameter list")
        # one group, which may start empty (DDP's fused step adds parameters as it meets them)
        self.optim = self.optimizer_class([{"params": params}], *args, **kwargs)
        if "rule" in kwargs:
            # ZeRO's groups hold its keywords, the rule too, and take ours once we are built:
            # None there keeps its state_dict() plain data (see optimizer._drop_rule)
            self.optim.param_groups[0]["rule"] = None
        why = why_not(self.optim)
        if why is not None:
            raise TypeError(f"{name} cannot be a functional optimizer of an overlapped "
                            f"DDP or ZeRO step: {why}")
        self._args, self._kwargs = args, kwargs
        self._index = {id(p): i for i, p in enumerate(params)}
        self._subsets: dict[tuple[int, ...], Optimizer] = {}

    @classmethod
    def of(cls, optimizer_class: type[Optimizer]) -> type[Functional]:
        """The functional optimizer of ``optimizer_class``, one class per class."""
        twin = _TWINS.get(optimizer_class)
        if twin is None:
            twin = _TWINS[optimizer_class] = type(
                f"Functional{optimizer_class.__name__}", (cls,),
                {"optimizer_class": optimizer_class, "__module__": __name__,
                 "__doc__": f"The functional form of ``{_public_name(optimizer_class)}``."})
        return twin

    @property
    def param_group(self) -> dict[str, Any]:
        return self.optim.param_groups[0]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim.param_groups

    @property
    def state(self) -> Any:
        return self.optim.state

    def state_dict(self) -> dict[str, Any]:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optim.load_state_dict(state_dict)

    def step(self, gradients: Sequence[torch.Tensor | None]) -> None:
        """One step of the parameters whose gradient is not ``None``; the others, their state
        and their step counts are left as they are."""
        params = self.param_group["params"]
        if len(gradients) != len(params):
            raise ValueError(f"functional {_public_name(self.optimizer_class)}.step: "
                             f"{len(gradients)} gradients for {len(params)} parameters")
        idx = tuple(i for i, g in enumerate(gradients) if g is not None)
        self._step(idx, [g for g in gradients if g is not None])

    def step_param(self, param: torch.Tensor, grad: torch.Tensor | None) -> None:
        """One step of ``param`` alone (DDP's ``_register_fused_optim`` calls it for each
        parameter as its bucket is reduced); a parameter met for the first time joins the
        group."""
        i = self._index.get(id(param))
        if i is None:
            i = self._index[id(param)] = len(self.param_group["params"])
            self.param_group["params"] = [*self.param_group["params"], param]
        if grad is not None:
            self._step((i,), [grad])

    def _step(self, idx: tuple[int, ...], grads: list[torch.Tensor]) -> None:
        if not idx:
            return
        params = self.param_group["params"]
        opt = self.optim if len(idx) == len(params) else self._subset(idx)
        ps = [params[i] for i in idx]
        # the class reads gradients from .grad: lent for the step, then given back (DDP's
        # reducer keeps its own references to the gradients it writes)
        held = [p.grad for p in ps]
        try:
            for p, g in zip(ps, grads, strict=True):
                p.grad = g
            opt.step()
        finally:
            for p, g in zip(ps, held, strict=True):
                p.grad = g

    def _subset(self, idx: tuple[int, ...]) -> Optimizer:
        """The class over the parameters at ``idx`` alone, with this one's state and its
        group's values: a bucket steps the same parameters every iteration, and an optimizer
        of its own keeps its step plan (one over every parameter would rebuild its plan for
        each bucket, the set of parameters with a gradient changed)."""
        sub = self._subsets.get(idx)
        if sub is None:
            params = self.param_group["params"]
            sub = self._subsets[idx] = self.optimizer_class(
                [{"params": [params[i] for i in idx]}], *self._args, **self._kwargs)
        sub.param_groups[0].update(
            (k, v) for k, v in self.param_group.items() if k != "params")
        sub.state = self.optim.state  # one state, keyed by parameter (a load may replace it)
        return sub


_TWINS: dict[type[Optimizer], type[Functional]] = {}


def _classes() -> list[type[Optimizer]]:
    """Every public class of ``uniopt.torch`` (imported by the time this runs)."""
    package = sys.modules[__package__]
    return [c for c in map(vars(package).get, package.__all__)
            if isinstance(c, type) and issubclass(c, Optimizer)]


_UTILS = "torch.distributed.optim.utils"


def register(utils: ModuleType) -> None:
    """Map every ``uniopt.torch`` class to its functional optimizer in torch's map (those that
    cannot step so too: their twin's constructor says why, where torch would say only that
    there is none)."""
    for cls in _classes():
        utils.register_functional_optim(cls, Functional.of(cls))


class _Loader(importlib.abc.Loader):
    """Runs torch's module, then registers the classes in it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register(module)


class _OnImport(importlib.abc.MetaPathFinder):
    """Finds ``torch.distributed.optim.utils`` as the other finders do, with :class:`_Loader`;
    once."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _UTILS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now where torch.distributed.optim is imported, else when it is."""
    if not torch.distributed.is_available():
        return
    utils = sys.modules.get(_UTILS)
    if utils is not None:
        register(utils)
    elif not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport())

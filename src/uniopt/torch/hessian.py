"""Optimizers whose step reads Hessian estimates: Hessian-vector products taken by autograd from
a closure (SophiaH), or the Gauss-Newton-Bartlett estimate folded in by the caller (SophiaG)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, overload

import torch
from torch.optim.optimizer import ParamsT

from ..hyper import POSITIVE, check
from ..rules.sophia import scale_by_sophia_g, sophia_g
from ..rules.sophia_h import sophia_h
from ..tree import flatten_leaves
from . import combined, plans
from .named import BETAS, LR, WEIGHT_DECAY, _Named, _scalar_dtype
from .optimizer import Optimizer, plain


class SophiaH(Optimizer):
    """Sophia-H (:func:`uniopt.sophia_h`) with ``pytorch_optimizer.SophiaH``'s constructor
    (``p`` is the clip threshold, ``hessian_distribution`` the probes' distribution) and
    ``step(closure)``: the closure clears the gradients, computes the loss, calls
    ``loss.backward(create_graph=True)`` and returns the loss; on the steps that refresh the
    Hessian estimate (0, k, 2k, ...) ``H z`` is ``torch.autograd.grad(grads, params,
    grad_outputs=z)``, as pytorch-optimizer takes it.

    The probes come from a generator in the optimizer's state seeded with ``seed`` (saved by
    ``state_dict``), not torch's global one: ``torch.manual_seed(seed)`` before
    pytorch-optimizer's first step makes its probes these (with one param group, and where
    nothing else draws from torch's global generator between its steps). Each param group
    draws its own probes; the state of a group is kept under ``state["uniopt.group<i>"]``
    (momentum ``ema_momentum.momentum_buffer``, ``h`` and the generator under
    ``scale_by_hutchinson_sophia``), so a state dict does not load into pytorch-optimizer's
    class, nor its into this one. The group keys are the rule's names (``b1``, ``b2``,
    ``clip_threshold``).

    >>> import torch, uniopt.torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    >>> opt = uniopt.torch.SophiaH([w], lr=0.1, p=1.0, hessian_distribution="rademacher")
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = 2 * w[0] ** 2 + 50 * w[1] ** 2
    ...     loss.backward(create_graph=True)
    ...     return loss
    >>> float(opt.step(closure))
    52.0
    >>> w.detach()  # m = 0.04 g, h = 0.01 diag(H): clipped at p = 1
    tensor([0.9000, 0.9000], dtype=torch.float64)
    """

    # its probes are torch's draws: the group's state (torch's generator in it) is made for the
    # tensors themselves, by the step and by load_state_dict's check
    _group_tensors = True
    _step_args = frozenset({"value", "hvp"})
    _runs = (sophia_h, "pytorch-optimizer's arguments; step(closure), the closure calling "
             "loss.backward(create_graph=True) and returning the loss")

    def __init__(self, params: ParamsT, lr: Any = 6e-2, betas: tuple[Any, Any] = (0.96, 0.99),
                 weight_decay: Any = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, p: Any = 1e-2, update_period: int = 10,
                 num_samples: int = 1, hessian_distribution: str = "gaussian",
                 eps: Any = 1e-12, *, seed: int = 0, maximize: bool = False) -> None:
        rule = sophia_h(lr=lr, b1=betas[0], b2=betas[1], weight_decay=weight_decay,
                        weight_decouple=weight_decouple, fixed_decay=fixed_decay,
                        clip_threshold=p, update_period=update_period,
                        num_samples=num_samples, distribution=hessian_distribution, eps=eps,
                        seed=seed)
        super().__init__(params, rule, maximize=maximize)

    @property
    def _name(self) -> str:
        return "uniopt.torch.SophiaH"

    @property
    def _combined_rule(self) -> bool:
        return True  # each group keeps one State: the generator's and h are the whole tree's

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise TypeError(
                "SophiaH.step needs a closure that clears the gradients, computes the loss, "
                "calls loss.backward(create_graph=True) and returns the loss: "
                "opt.step(closure)")
        with torch.enable_grad():
            loss = closure()
        rules = [self._rule(group)[0] for group in self.param_groups]
        for gi, (group, rule) in enumerate(zip(self.param_groups, rules, strict=True)):
            plans.refuse(rule, gi, group, [True] * len(group["params"]),
                         plans.recorded(self.defaults),
                         given=bool(self.defaults.get("capturable")))
        combined.check_orders(self)  # (before any group steps)
        combined.every_gradient(
            self, "SophiaH", "a group steps as one tree, its Hessian estimate over every "
            "parameter (give them zeros in the closure, or leave them out of the optimizer), "
            "where pytorch-optimizer leaves them out")
        # whether backward made any gradient a function of the params: where none did, the
        # first group to refresh its estimate says so, before any group has stepped
        anywhere = any(p.grad is not None and p.grad.requires_grad
                       for group in self.param_groups for p in group["params"])
        with torch.no_grad():
            for gi, (group, rule) in enumerate(zip(self.param_groups, rules, strict=True)):
                combined.step(self, gi, group, rule, tensors=self._group_tensors,
                              hvp=_hvp(combined._tree(group, group["params"]), anywhere))
        return loss


def _hvp(params: Any, anywhere: bool = True) -> Callable[[Any], list[torch.Tensor]]:
    """``v -> H v`` for the gradients of ``params`` taken with ``create_graph=True`` (a
    tree of vectors ``v`` ordered as the tree of ``params``); ``anywhere``: whether some
    gradient of the optimizer's has a graph (a group of linear leaves then has ``H v = 0``, as
    a linear leaf among others in one group)."""
    ps = flatten_leaves(params)[0]

    def hvp(v: Any) -> list[torch.Tensor]:
        vs = flatten_leaves(v)[0]
        graphed = [i for i, p in enumerate(ps) if p.grad is not None and p.grad.requires_grad]
        if not graphed and anywhere:
            return [torch.zeros_like(x) for x in vs]
        if not graphed:
            raise RuntimeError(
                "SophiaH: the gradients carry no graph to differentiate: call "
                "loss.backward(create_graph=True) in the closure")
        with torch.enable_grad():
            hv = torch.autograd.grad([ps[i].grad for i in graphed], ps,
                                     grad_outputs=[vs[i] for i in graphed],
                                     retain_graph=True, allow_unused=True)
        # a gradient that is no function of the params (a linear leaf) has H v = 0 there
        return [torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs, strict=True)]

    return hvp


_ABSENT = object()  # (a group without the key)


class SophiaG(_Named):
    """Sophia-G (:func:`uniopt.sophia_g`) with its authors' ``SophiaG`` constructor
    (github.com/Liuhong99/Sophia: ``lr``, ``betas``, ``rho``, ``weight_decay``, ``maximize``,
    ``capturable``), ``update_hessian()`` and ``step(closure=None, bs=5120)``; state
    ``exp_avg`` and ``hessian`` per parameter, as theirs. Their training loop, every ``k``
    steps after the step: the loss at labels sampled from the model's own predictions,
    backward, ``update_hessian()`` (which folds ``p.grad * p.grad`` into ``hessian``), then
    ``zero_grad()``. ``bs`` (the examples that loss averaged over) is kept in each group.

    >>> import torch, uniopt.torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    >>> opt = uniopt.torch.SophiaG([w], lr=0.1, rho=1.0, weight_decay=0.0)
    >>> w.grad = torch.tensor([2.0, 20.0], dtype=torch.float64)  # at sampled labels
    >>> opt.update_hessian()
    >>> w.grad = torch.tensor([2.0, -4.0], dtype=torch.float64)
    >>> opt.step(bs=1)
    >>> w.detach()
    tensor([ 0.9000, -1.9965], dtype=torch.float64)
    """

    rule = sophia_g()
    _torch_params = ("lr", "betas", "rho", "weight_decay", "*", "maximize", "capturable")
    _group_only = ("bs",)
    _fixed = {"bs": 5120}
    _sparse_error = "SophiaG does not support sparse gradients"
    _checks = (LR, *BETAS, ("rho", lambda v: 0.0 <= v, "Invalid rho parameter at index 1: {}"),
               WEIGHT_DECAY)

    @overload
    def step(self, closure: None = None, bs: Any = 5120) -> None: ...

    @overload
    def step(self, closure: Callable[[], Any], bs: Any = 5120) -> Any: ...

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """One update of every parameter that has a gradient, ``bs`` the examples the Hessian
        estimate's sampled loss averaged over (theirs: an argument of every step)."""
        # the base class's step: the hooks see the call's arguments as given, and _step takes
        # them as the pre-hooks left them (torch's wrapper of a subclass's step does so)
        return super().step(*args, **kwargs)

    step.__signature__ = inspect.signature(  # type: ignore[attr-defined]
        lambda self, closure=None, bs=5120: None)
    step.hooked = True  # type: ignore[attr-defined]  # (the base class's step runs the hooks)

    def _step(self, closure: Callable[[], Any] | None = None, bs: Any = 5120) -> Any:
        check("SophiaG", "step(bs=...)", bs, POSITIVE)
        held = [group.get("bs", _ABSENT) for group in self.param_groups]
        for group in self.param_groups:
            group["bs"] = bs
        try:
            return super()._step(closure)
        except BaseException:
            # a refused step leaves the groups as they were (their bs in a state dict too)
            for group, was in zip(self.param_groups, held, strict=True):
                if was is _ABSENT:
                    group.pop("bs", None)
                else:
                    group["bs"] = was
            raise

    @torch.no_grad()
    def update_hessian(self) -> None:
        """``hessian <- b2*hessian + (1-b2)*grad*grad`` for every parameter with a gradient,
        ``b2`` the group's (at the parameter's step, for a schedule), as theirs: call it after
        the backward of the loss at sampled labels. A parameter's state is made here where it
        has none yet."""
        # every check over every group first: a refusal writes no estimate
        todo: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            if group.get("state_dtype") is not None:
                raise ValueError("SophiaG.update_hessian: the Hessian estimate is kept in the "
                                 "params' dtype only (state_dtype=None), got state_dtype="
                                 f"{group['state_dtype']!r}")
            part = next(q for q in self._rule(group)[0].flat_parts
                        if isinstance(q, scale_by_sophia_g))
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise RuntimeError(self._sparse_error)
                if p.is_complex():
                    raise TypeError("SophiaG.update_hessian: complex parameters are not taken")
                todo.append((part, p, g))
        for part, p, g in todo:
            st = self.state[p]
            if "hessian" not in st:
                st.setdefault("step", torch.tensor(0.0, dtype=getattr(torch, _scalar_dtype())))
                for name in ("exp_avg", "hessian"):
                    st.setdefault(name, torch.zeros_like(p))
            now = part.at(plans.state_step(st))
            assert isinstance(now, scale_by_sophia_g)
            st["hessian"].mul_(plain(now.b2)).addcmul_(g, g, value=now.one_minus("b2"))

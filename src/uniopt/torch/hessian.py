"""Optimizers whose step reads Hessian-vector products, taken by autograd from a closure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ..rules.sophia_h import sophia_h
from ..tree import flatten
from . import combined
from .optimizer import Optimizer


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
        with torch.no_grad():
            for gi, group in enumerate(self.param_groups):
                rule = self._rule(group)[0]
                combined.step(self, gi, group, rule, tensors=True,
                              hvp=_hvp(combined._tree(group, group["params"])))
        return loss


def _hvp(params: Any) -> Callable[[Any], list[torch.Tensor]]:
    """``v -> H v`` for the gradients of ``params`` taken with ``create_graph=True`` (a
    tree of vectors ``v`` ordered as the tree of ``params``)."""
    ps = flatten(params)[0]

    def hvp(v: Any) -> list[torch.Tensor]:
        vs = flatten(v)[0]
        graphed = [i for i, p in enumerate(ps) if p.grad is not None and p.grad.requires_grad]
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

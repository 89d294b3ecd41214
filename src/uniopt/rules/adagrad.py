"""Adagrad (Duchi et al., 2011), with torch's and optax's placements of eps and
Optimisers.jl's start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, hyper, on_host, static, unpaired
from ..moments import fma, select
from ..transforms.decay import check_decay_form, decayed


class AdagradCoeffs(NamedTuple):
    clr: Any  # lr / (1 + (t - 1) lr_decay)
    eps: Any


class RssCoeffs(NamedTuple):
    clr: Any
    eps: Any
    one: Any  # the denominator where G = 0 (so u = 0): eps = 0 never divides 0 by 0


@dataclass(frozen=True)
class scale_by_adagrad(Elementwise):
    """``G <- G + u^2``; ``u <- lr/(1 + t*lr_decay) * u/(sqrt(G) + eps)`` (torch's Adagrad)."""

    lr: Any = hyper(1e-2, NONNEG)
    lr_decay: Any = hyper(0.0, NONNEG)
    eps: Any = hyper(1e-10, NONNEG)
    initial_accumulator_value: float = static(0.0, NONNEG)
    start_at_eps: bool = False  # G starts at eps instead (Optimisers.jl's AdaGrad)
    eps_floor16: bool = False
    slots: ClassVar[tuple[str, ...]] = ("sum",)
    makes_step: ClassVar[bool] = True  # its lr is applied here

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        if not self.start_at_eps:
            return (xp.full_like(p, self.initial_accumulator_value),)
        return (xp.full_like(p, float(on_host(unpaired(self.eps)))),)

    def steady(self) -> int | None:
        return None if self.lr_decay else 0

    def coeffs(self, step: int) -> Any:
        return AdagradCoeffs(clr=self.lr / (1.0 + step * self.lr_decay), eps=self.eps)

    @staticmethod
    def kernel(xp, c, p, u, acc):  # torch's addcmul_(g, g) and addcdiv_(g, std, value=-clr)
        acc = fma(u, u, acc)
        return (c.clr * u) / (xp.sqrt(acc) + c.eps), acc


@dataclass(frozen=True)
class scale_by_rss(scale_by_adagrad):
    """optax's Adagrad direction: ``G <- G + u^2``; ``u <- clr * u/sqrt(G + eps)`` where
    ``G > 0``, else 0 (then ``u`` is 0 too), so ``eps = 0`` never divides 0 by 0."""

    def steady(self) -> int | None:
        return None if self.lr_decay else 0

    def coeffs(self, step: int) -> Any:
        return RssCoeffs(clr=self.lr / (1.0 + step * self.lr_decay), eps=self.eps, one=1.0)

    @staticmethod
    def kernel(xp, c, p, u, acc):
        acc = acc + u * u
        return c.clr * (u / select(xp, acc > 0, xp.sqrt(acc + c.eps), c.one)), acc


@dataclass(frozen=True)
class adagrad(Rule):
    r"""Adagrad (Duchi et al., 2011) as torch writes it.

    ``g <- g + weight_decay*p``; ``G <- G + g^2``; ``p <- p - lr/(1+(t-1)*lr_decay) *
    g/(sqrt(G) + eps)``, ``G`` starting at ``initial_accumulator_value``; t counts from 1:

    $$
    G_t = G_{t-1} + g_t^2, \qquad
    p_t = p_{t-1} - \frac{\mathrm{lr}}{1 + (t - 1)\,\mathrm{lr\_decay}}\,
    \frac{g_t}{\sqrt{G_t} + \epsilon}
    $$

    Options (the ``convention`` sets them, and the defaults, for the fields not given):

    - ``eps_in_sqrt=True``: optax's and keras's placement, ``g/sqrt(G + eps)`` (0 where
      ``G = 0``); with ``initial_accumulator_value=0.1, eps=1e-7`` it is ``optax.adagrad``.
    - ``start_at_eps=True``: ``G`` starts at ``eps`` (Optimisers.jl's ``AdaGrad``), which must
      then be a number, with ``initial_accumulator_value`` left at 0.
    - ``decay_form="decoupled"``: keras's weight decay, ``p <- p - lr*weight_decay*p`` (``lr``
      without ``lr_decay``) before the step, in place of torch's ``"l2"`` term.

    Conventions: ``"torch"`` (lr 1e-2, G from 0, eps 1e-10 outside the root); ``"optax"``: G
    from 0.1, eps 1e-7 inside (optax requires a learning rate, ours keeps 1e-2); ``"keras"``:
    lr 1e-3, G from 0.1, eps 1e-7 inside, decoupled decay; ``"flux"``: lr 0.1, G from eps, eps
    1e-8 outside.
    """

    lr: Any = hyper(1e-2, NONNEG)
    lr_decay: Any = hyper(0.0, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    initial_accumulator_value: float = static(0.0, NONNEG)
    eps: Any = hyper(1e-10, NONNEG)
    eps_in_sqrt: bool = False
    start_at_eps: bool = False
    decay_form: str = "l2"
    eps_floor16: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"initial_accumulator_value": 0.1, "eps": 1e-7, "eps_in_sqrt": True},
        "keras": {"lr": 1e-3, "initial_accumulator_value": 0.1, "eps": 1e-7,
                  "eps_in_sqrt": True, "decay_form": "decoupled"},
        "flux": {"lr": 0.1, "eps": 1e-8, "start_at_eps": True,
                 "eps_floor16": True},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adaptive",
        paper="Duchi et al. (2011)",
        references=(
            "torch.optim.Adagrad",
            "optax.adagrad",
            "keras.optimizers.Adagrad",
            "formula:Optimisers.AdaGrad",
        ),
        example={"lr": 1.0},
        budget=2000,
    )

    def check(self) -> None:
        check_decay_form(self.name, self.decay_form)
        if self.start_at_eps and (callable(self.eps) or self.initial_accumulator_value != 0):
            raise ValueError(
                f"{self.name}: start_at_eps=True starts the accumulator at eps, which must be "
                f"a number, with initial_accumulator_value 0; got eps={self.eps!r}, "
                f"initial_accumulator_value={self.initial_accumulator_value!r}"
            )

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_rss if self.eps_in_sqrt else scale_by_adagrad
        step = direction(lr=self.lr, lr_decay=self.lr_decay, eps=self.eps,
                         initial_accumulator_value=self.initial_accumulator_value,
                         start_at_eps=self.start_at_eps, eps_floor16=self.eps_floor16)
        return decayed((step,), self.lr, self.weight_decay, self.decay_form,
                       self.on("weight_decay"))

"""ACProp (Zhuang et al., 2021): AdaBelief's centred second moment, read one step late."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT_OPEN, hyper
from ..moments import bias_correction, ema_sq, lerp
from ..transforms.decay import weight_decay
from ..transforms.mask import frozen_mask, masked_by
from ..transforms.scale import scale_by_lr


class AcpropCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    eps_root: Any
    bc2: Any  # 1 - b2^(t-1), the previous update's correction (1 - b2 at the first)
    later: Any  # 0 at the first update, else 1
    first: Any  # 1 at the first update, else 0: the denominator is then 1 + eps
    eps: Any


def _previous(step: Any) -> Any:
    """The number, counted as ``step`` counts, of the update before this one; the first update
    reads the first's own (optax: ``t = count`` where ``count > 0``, else 1)."""
    if isinstance(step, int):
        return max(step, 1) - 1
    import array_api_compat as aac

    return aac.array_namespace(step).maximum(step, 1) - 1


@dataclass(frozen=True)
class scale_by_acprop(Elementwise):
    """ACProp's direction, optax's ``contrib.scale_by_acprop``: the gradient over the root of
    the centred second moment kept up to the *previous* step (asynchronous: the update does
    not see its own gradient in its denominator):

    ``u <- u/(sqrt(s/(1-b2^(t-1))) + eps)`` with the old ``s`` (the first update:
    ``u/(1 + eps)``); then ``s <- b2*s + (1-b2)*(u - m)^2 + eps_root`` with the old ``m``, and
    ``m <- b1*m + (1-b1)*u``. ``m`` centres ``s`` only; the numerator is the raw gradient."""

    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-16, NONNEG)
    eps_root: Any = hyper(1e-16, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_var")
    # the raw gradient over the root of s plus an eps of 1e-16: an s that 8 bits round to 0
    # (1e-8 of its block's largest) makes a step of g/1e-16
    no_q8: ClassVar[str | None] = (
        "its step divides the raw gradient by the root of exp_avg_var plus an eps of 1e-16, "
        "and 8 bits round the small values of exp_avg_var to 0")

    def coeffs(self, step: Any) -> AcpropCoeffs:
        c2 = self.one_minus("b2")
        first, later = step == 0, step != 0
        return AcpropCoeffs(one_minus_b1=self.one_minus("b1"), b2=self.b2, one_minus_b2=c2,
                            eps_root=self.eps_root,
                            bc2=bias_correction(self.b2, c2, _previous(step)),
                            later=later * 1.0, first=first * 1.0, eps=self.eps)

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_var):
        # at the first update s is 0, so s/bc2*0 + 1 is exactly optax's forced 1
        s_hat = exp_avg_var / c.bc2 * c.later + c.first
        out = u / (xp.sqrt(s_hat) + c.eps)
        s = ema_sq(exp_avg_var, u - exp_avg, c.b2, c.one_minus_b2) + c.eps_root
        return out, lerp(exp_avg, u, c.one_minus_b1), s


@dataclass(frozen=True)
class acprop(Rule):
    r"""ACProp (Zhuang et al., 2021) as ``optax.contrib.acprop``:
    ``p <- p - lr*(g/(sqrt(s_hat_{t-1}) + eps) + weight_decay*p)`` with ``s`` AdaBelief's
    centred second moment, ``s <- b2*s + (1-b2)*(g - m_{t-1})^2 + eps_root``, bias-corrected
    and read one step late (:class:`scale_by_acprop`; the first update is ``g/(1 + eps)``).
    At step ``t`` (from 1), with ``lambda = weight_decay``:

    $$
    \begin{aligned}
    p_t &= p_{t-1} - \mathrm{lr} \left(\frac{g_t}{\sqrt{s_{t-1} / (1 - \beta_2^{t-1})}
    + \epsilon} + \lambda\, p_{t-1}\right)
    \quad \left(t = 1\!: \frac{g_1}{1 + \epsilon}\right) \\
    s_t &= \beta_2 s_{t-1} + (1 - \beta_2)\, (g_t - m_{t-1})^2 + \epsilon_{root}, \qquad
    m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, g_t
    \end{aligned}
    $$

    Options, with optax's names and defaults: ``b1``, ``b2``, ``eps`` and ``eps_root`` (both
    1e-16; ``eps_root`` accumulates in ``s``, as in optax), ``weight_decay`` (coupled to the
    learning rate, after the direction: optax's ``add_decayed_weights``), ``mask`` (the leaves
    to decay: a tree of bools, not globs, or a function of the params, as optax's). optax
    requires a learning rate; ``lr`` here defaults to 1e-3. Matches optax 0.2.8 to rounding.
    """

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-16, NONNEG)
    eps_root: Any = hyper(1e-16, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    mask: Any = None

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Zhuang et al. (2021)",
        references=("optax.contrib.acprop",),
        example={"lr": 0.01, "b2": 0.9},
        budget=1000,
    )

    def check(self) -> None:
        object.__setattr__(self, "mask", frozen_mask(self.name, "mask", self.mask))

    def parts(self) -> tuple[Transform, ...]:
        direction = scale_by_acprop(b1=self.b1, b2=self.b2, eps=self.eps,
                                    eps_root=self.eps_root)
        decay = ((masked_by(weight_decay(wd=self.weight_decay), self.mask),)
                 if self.on("weight_decay") else ())
        return (direction, *decay, scale_by_lr(lr=self.lr))

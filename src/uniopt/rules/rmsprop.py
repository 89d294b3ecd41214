"""RMSprop (Hinton, 2012) as torch writes it, and as optax, keras and Optimisers.jl do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, UNIT, hyper, static
from ..moments import bias_correction, ema_sq, fma, lerp
from ..transforms.decay import check_decay_form, decayed
from ..transforms.momentum import check_momentum_form, check_nesterov, sutskever_trace, trace
from ..transforms.scale import scale_by_lr


class RmsCoeffs(NamedTuple):
    alpha: Any
    one_minus_alpha: Any
    eps: Any
    lr: Any
    bc: Any  # 1 - alpha^t with bias_correction (optax's), else 1: v_hat = v/bc, exactly v at 1


@dataclass(frozen=True)
class scale_by_rms(Elementwise):
    """``v <- alpha*v + (1-alpha)*u^2``; ``u <- lr*u/(sqrt(v) + eps)`` (eps outside the root),
    ``lr`` the ``folded_lr`` (1: the direction alone) rounded in as torch's ``addcdiv``
    does: ``(lr*u)/den``. ``bias_correction``: ``v`` (centered: and ``gbar``) divided by
    ``1 - alpha^t`` first, as optax's ``bias_correction=True``."""

    alpha: Any = hyper(0.99, UNIT)
    eps: Any = hyper(1e-8, NONNEG)
    folded_lr: Any = hyper(1.0, NONNEG)
    initial_scale: float = static(0.0, NONNEG)  # where v starts (optax's initial_scale)
    eps_floor16: bool = False
    bias_correction: bool = False
    slots: ClassVar[tuple[str, ...]] = ("square_avg",)

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return (xp.full_like(p, self.initial_scale), *super().init_slots(p, xp)[1:])

    def steady(self) -> int | None:
        return None if self.bias_correction else 0

    def coeffs(self, step: int) -> RmsCoeffs:
        c = self.one_minus("alpha")
        return RmsCoeffs(alpha=self.alpha, one_minus_alpha=c, eps=self.eps, lr=self.folded_lr,
                         bc=bias_correction(self.alpha, c, step) if self.bias_correction else 1.0)

    @staticmethod
    def kernel(xp, c, p, u, square_avg):
        square_avg = ema_sq(square_avg, u, c.alpha, c.one_minus_alpha)
        return (c.lr * u) / (xp.sqrt(square_avg / c.bc) + c.eps), square_avg


@dataclass(frozen=True)
class scale_by_centered_rms(scale_by_rms):
    """As :class:`scale_by_rms` with the variance ``v - gbar^2``, ``gbar`` the mean of ``u``."""

    slots: ClassVar[tuple[str, ...]] = ("square_avg", "grad_avg")

    @staticmethod
    def kernel(xp, c, p, u, square_avg, grad_avg):
        square_avg = ema_sq(square_avg, u, c.alpha, c.one_minus_alpha)
        grad_avg = lerp(grad_avg, u, c.one_minus_alpha)
        # torch's square_avg.addcmul(grad_avg, grad_avg, value=-1): one fused multiply-add
        mean = grad_avg / c.bc
        den = xp.sqrt(fma(-mean, mean, square_avg / c.bc)) + c.eps
        return (c.lr * u) / den, square_avg, grad_avg


@dataclass(frozen=True)
class scale_by_rms_in_sqrt(scale_by_rms):
    """As :class:`scale_by_rms` with eps inside the root, ``u <- u/sqrt(v + eps)`` (optax's
    ``eps_in_sqrt=True``, keras, TensorFlow)."""

    @staticmethod
    def kernel(xp, c, p, u, square_avg):
        square_avg = ema_sq(square_avg, u, c.alpha, c.one_minus_alpha)
        return (c.lr * u) / xp.sqrt(square_avg / c.bc + c.eps), square_avg


@dataclass(frozen=True)
class scale_by_centered_rms_in_sqrt(scale_by_centered_rms):
    """As :class:`scale_by_centered_rms` with eps inside the root, ``sqrt(v - gbar^2 + eps)``
    (optax's ``eps_in_sqrt=True``, keras)."""

    @staticmethod
    def kernel(xp, c, p, u, square_avg, grad_avg):
        square_avg = ema_sq(square_avg, u, c.alpha, c.one_minus_alpha)
        grad_avg = lerp(grad_avg, u, c.one_minus_alpha)
        mean = grad_avg / c.bc
        den = xp.sqrt(fma(-mean, mean, square_avg / c.bc) + c.eps)
        return (c.lr * u) / den, square_avg, grad_avg


@dataclass(frozen=True)
class rmsprop(Rule):
    r"""RMSprop (Hinton, 2012) as torch writes it: eps outside the square root.

    ``g <- g + weight_decay*p``; ``v <- alpha*v + (1-alpha)*g^2``; ``d = g/(sqrt(v) + eps)``
    (centered: ``sqrt(v - gbar^2)``); with momentum ``b <- momentum*b + d``, ``d <- b``;
    ``p <- p - lr*d``. With ``mu = momentum``, ``lambda = weight_decay``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1}, \qquad
    v_t = \alpha\, v_{t-1} + (1 - \alpha)\, g_t^2 \\
    d_t &= \frac{g_t}{\sqrt{v_t} + \epsilon} \quad
    \text{(centered: } \sqrt{v_t - \bar g_t^2}\text{, }
    \bar g_t = \alpha\, \bar g_{t-1} + (1 - \alpha)\, g_t) \\
    b_t &= \mu\, b_{t-1} + d_t, \qquad p_t = p_{t-1} - \mathrm{lr}\, b_t
    \quad (\mu = 0\text{: } p_t = p_{t-1} - \mathrm{lr}\, d_t)
    \end{aligned}
    $$

    Options (the ``convention`` sets them, and the defaults, for the fields not given):

    - ``eps_in_sqrt=True``: ``d = g/sqrt(v + eps)`` (centered ``sqrt(v - gbar^2 + eps)``), as
      optax (its default), keras and TensorFlow; torch and Optimisers.jl add eps to the root.
    - ``momentum_form="sutskever"``: the learning rate inside the buffer,
      ``b <- momentum*b + lr*d``, ``p <- p - b``: keras's, and optax's (its ``trace`` after
      ``scale_by_learning_rate``); ``"torch"``: ``b <- momentum*b + d``, ``p <- p - lr*b``.
      They differ under a schedule only.
    - ``initial_scale``: where ``v`` starts (optax's; 0 elsewhere).
    - ``nesterov=True``: Nesterov momentum, ``d + momentum*b`` after the buffer (optax's
      ``nesterov``; in the sutskever form ``lr*d + momentum*b``); needs ``momentum > 0``, but
      in the optax convention, where momentum 0 is plain RMSprop, as optax's.
    - ``bias_correction=True``: ``v`` (centered: and ``gbar``) divided by ``1 - alpha^t``
      before the root (optax's ``bias_correction``; with ``initial_scale`` 0 and eps
      outside the root, Adam with ``b1 = 0``).
    - ``decay_form="decoupled"``: keras's weight decay, ``p <- p - lr*weight_decay*p`` before
      the step, in place of torch's ``"l2"`` term.

    Conventions: ``"torch"`` (lr 1e-2, alpha 0.99, eps 1e-8); ``"optax"``, ``optax.rmsprop``:
    alpha 0.9, eps 1e-8, eps in the root, sutskever momentum; optax requires a learning rate,
    ours keeps torch's 1e-2;
    ``"keras"``: lr 1e-3, alpha (keras's ``rho``) 0.9, eps 1e-7, eps in the root, sutskever
    momentum, decoupled decay; ``"flux"``, Optimisers.jl's ``RMSProp``: lr 1e-3, alpha 0.9,
    eps 1e-8 outside the root (it has no momentum; ``centered`` is its ``centred``).
    """

    lr: Any = hyper(1e-2, NONNEG)
    alpha: Any = hyper(0.99, UNIT)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    momentum: Any = hyper(0.0, NONNEG)
    centered: bool = False
    eps_in_sqrt: bool = False
    momentum_form: str = "torch"
    initial_scale: float = static(0.0, NONNEG)
    nesterov: bool = False
    bias_correction: bool = False
    decay_form: str = "l2"
    eps_floor16: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"alpha": 0.9, "eps_in_sqrt": True, "momentum_form": "sutskever"},
        "keras": {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7, "eps_in_sqrt": True,
                  "momentum_form": "sutskever", "decay_form": "decoupled"},
        "flux": {"lr": 1e-3, "alpha": 0.9,
                 "eps_floor16": True},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "momentum")

    info: ClassVar[Info] = Info(
        family="adaptive",
        paper="Tieleman & Hinton (2012)",
        references=(
            "torch.optim.RMSprop",
            "optax.rmsprop",
            "keras.optimizers.RMSprop",
            "formula:Optimisers.RMSProp",
        ),
        example={"lr": 0.01},
        budget=1000,
    )

    def check(self) -> None:
        check_momentum_form(self.name, self.momentum_form, ("torch", "sutskever"))
        check_decay_form(self.name, self.decay_form)
        if not (self.convention == "optax" and not callable(self.momentum)
                and self.momentum == 0):  # (optax's nesterov=True with momentum 0: no momentum)
            check_nesterov(self.name, self.nesterov, self.momentum, self.kept("momentum"))

    def parts(self) -> tuple[Transform, ...]:
        rms = ((scale_by_centered_rms_in_sqrt if self.eps_in_sqrt else scale_by_centered_rms)
               if self.centered else
               (scale_by_rms_in_sqrt if self.eps_in_sqrt else scale_by_rms))
        steps: tuple[Transform, ...]
        if not self.on("momentum"):  # torch's p.addcdiv_(g, den, value=-lr)
            steps = (rms(alpha=self.alpha, eps=self.eps, folded_lr=self.lr,
                         initial_scale=self.initial_scale, eps_floor16=self.eps_floor16,
                         bias_correction=self.bias_correction),)
        else:
            direction = rms(alpha=self.alpha, eps=self.eps, initial_scale=self.initial_scale,
                            eps_floor16=self.eps_floor16, bias_correction=self.bias_correction)
            steps = ((direction, sutskever_trace(lr=self.lr, momentum=self.momentum,
                                                 nesterov=self.nesterov))
                     if self.momentum_form == "sutskever" else
                     (direction, trace(momentum=self.momentum, nesterov=self.nesterov,
                                       hold=self.convention != "optax"),
                      scale_by_lr(lr=self.lr)))
        return decayed(steps, self.lr, self.weight_decay, self.decay_form, self.on("weight_decay"))

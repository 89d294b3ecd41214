"""Averaged stochastic gradient descent (Polyak & Juditsky, 1992) as torch.optim writes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import namespace
from ..base import Elementwise, Info, Rule, Transform
from ..hyper import NONNEG, _traced, check_real, check_scalar_dtype, hyper, round_scalar
from ..moments import fma, select
from ..transforms.decay import weight_decay


def asgd_eta(lr: float, lambd: float, alpha: float, step: int) -> float:
    """The step size after ``step`` updates: ``lr/(1 + lambd*lr*step)^alpha`` (torch's
    ``eta``, which it stores after each update)."""
    return lr / ((1 + lambd * lr * step) ** alpha)


def asgd_mu(t0: float, step: int) -> float:
    """The averaging weight after ``step`` updates: ``1/max(1, step - t0)`` (torch's ``mu``)."""
    # (traced where either is, or where a concrete JAX step is taken into a trace: a state
    # closed over by a jitted function)
    since = step - t0
    if _traced(since):  # jax.jit
        return 1 / namespace(since).maximum(1.0, since)
    return 1 / max(1, since)


def _check_eta_lr(t: Any) -> None:
    object.__setattr__(t, "eta_lr", check_real(t.name, "eta_lr", t.eta_lr, NONNEG, none=""))


def _check_past_eta_mu(owner: str, past: Any) -> None:
    def triple(x: Any) -> bool:
        return (isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], int)
                and not isinstance(x[0], bool) and x[0] >= 0
                and all(isinstance(v, float) for v in x[1:]))

    if past is not None and not (isinstance(past, tuple) and all(map(triple, past))):
        raise ValueError(f"{owner}: past_eta_mu must be None or triples (step count, eta, mu), "
                         f"got {past!r}")


def asgd_param(c: Any, p: Any, u: Any) -> Any:
    """torch's ``p.mul_(1 - lambd*eta).add_(g, alpha=-eta)``: the decay, then one fused
    multiply-add."""
    return fma(-c.eta, u, p * c.keep)


class AsgdCoeffs(NamedTuple):
    eta: Any
    lambd_eta: Any  # the decay of p, lambd*eta
    keep: Any  # 1 - lambd*eta (torch's p.mul_), in double on the host
    mu: Any
    average: Any  # mu != 1 (torch's test): else the average is the iterate itself


@dataclass(frozen=True)
class scale_by_asgd(Elementwise):
    """ASGD's step and average: ``u <- lambd*eta*p + eta*u`` (``p <- p*(1 - lambd*eta) -
    eta*g``), then ``ax <- ax + mu*(p - u - ax)`` (``ax <- p - u`` while ``mu = 1``), with
    ``eta`` and ``mu`` of :func:`asgd_eta` and :func:`asgd_mu` at the step count. ``ax``
    averages the iterate this block makes: place it last in a chain. ``eta_lr``: the ``lr``
    that ``eta`` is computed from after the first step (torch's: the previous step's); None:
    this step's ``lr``. ``past_eta_mu``, triples ``(n, eta, mu)`` of torch's
    ``state["eta"]`` and ``state["mu"]`` after update ``n`` (computed from that step's values),
    makes step ``n + 1`` take them as they are (``uniopt.torch.ASGD`` passes them; a step with
    none derives its own). ``scalar_dtype="float32"``: ``eta`` and ``mu`` rounded to float32,
    as torch keeps them (0-d tensors of its default dtype) and steps even float64 params with
    them."""

    lr: Any = hyper(1e-2, NONNEG)
    lambd: Any = hyper(1e-4, NONNEG)
    alpha: Any = hyper(0.75, NONNEG)
    t0: Any = hyper(1e6, NONNEG)
    eta_lr: float | None = None
    past_eta_mu: tuple[tuple[int, float, float], ...] | None = None
    scalar_dtype: str = "float64"
    slots: ClassVar[tuple[str, ...]] = ("ax",)
    # (as uo.ema's and uo.polyak's averages: 8-bit codes round its small moves away)
    no_q8: ClassVar[str | None] = (
        "its slot ax holds averaged weights that move by a small step at each update, which "
        "8-bit codes round away (the average stops moving)")
    makes_step: ClassVar[bool] = True
    uses_params: ClassVar[bool] = True  # the decay lambd*eta*p and the average read p

    def check(self) -> None:
        _check_eta_lr(self)
        _check_past_eta_mu(self.name, self.past_eta_mu)
        check_scalar_dtype(self.name, self.scalar_dtype)

    def coeffs(self, step: int) -> AsgdCoeffs:
        past = None
        if self.past_eta_mu:
            if _traced(step):
                raise TypeError(f"{self.name}: past_eta_mu is looked up by the step count on "
                                "the host; it cannot be traced (jax.jit), nor the count be "
                                "an array of a transform (jax.vmap): run it eagerly, outside "
                                "them")
            past = next((em for n, *em in self.past_eta_mu if n == step), None)
        if past is not None:
            eta, mu = past
        else:
            if self.eta_lr is None:
                lr = self.lr
            elif _traced(step):  # (jax.jit: the first step's lr picked on the device)
                lr = namespace(step).where(step == 0, self.lr, self.eta_lr)
            else:
                lr = self.lr if step == 0 else self.eta_lr
            eta = round_scalar(asgd_eta(lr, self.lambd, self.alpha, step), self.scalar_dtype)
            mu = round_scalar(asgd_mu(self.t0, step), self.scalar_dtype)
        lambd_eta = self.lambd * eta
        return AsgdCoeffs(eta=eta, lambd_eta=lambd_eta, keep=1.0 - lambd_eta, mu=mu,
                          average=mu != 1)

    @staticmethod
    def kernel(xp, c, p, u, ax):
        new = asgd_param(c, p, u)  # the parameter the step writes, which ax averages
        return p - new, select(xp, c.average, ax + (new - ax) * c.mu, new)

    @staticmethod
    def finish(xp, c, p, u, ax):
        return asgd_param(c, p, u)


@dataclass(frozen=True)
class asgd(Rule):
    r"""Averaged SGD (Polyak & Juditsky, 1992) as torch writes it. At update ``t`` (from 1),
    with ``lambda = weight_decay`` and ``lambd``, ``alpha``, ``t0`` the fields of those names:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    \eta_t &= \frac{\mathrm{lr}}{\left(1 + \mathrm{lambd}\cdot\mathrm{lr}\,(t - 1)\right)^\alpha},
    \qquad \mu_t = \frac{1}{\max(1,\ t - 1 - t_0)} \\
    p_t &= (1 - \mathrm{lambd}\cdot\eta_t)\, p_{t-1} - \eta_t\, g_t \\
    \bar x_t &= \begin{cases} p_t & \mu_t = 1 \\
    \bar x_{t-1} + \mu_t\, (p_t - \bar x_{t-1}) & \text{otherwise} \end{cases}
    \end{aligned}
    $$

    ``g <- g + weight_decay*p``; ``p <- p*(1 - lambd*eta_t) - eta_t*g`` with
    ``eta_t = lr/(1 + lambd*lr*(t-1))^alpha``; the averaged iterate ``ax`` (slot ``ax``) follows
    ``p`` until update ``t0 + 1``, then averages it with weight ``mu_t = 1/(t - 1 - t0)``. The
    parameters are the SGD iterate; read the average from the state. Under schedules, a step
    uses its own values; torch computes ``eta`` and ``mu`` at the end of the step before, from
    that step's (one step of lag where ``lr``, ``lambd``, ``alpha`` or ``t0`` change):
    ``eta_lr`` (see :class:`scale_by_asgd`) gives a step that ``lr``; ``past_eta_mu`` gives it
    torch's numbers themselves, as ``uniopt.torch.ASGD`` does; ``scalar_dtype`` rounds them as
    torch does (its float32 ``eta`` and ``mu``).
    """

    lr: Any = hyper(1e-2, NONNEG)
    lambd: Any = hyper(1e-4, NONNEG)
    alpha: Any = hyper(0.75, NONNEG)
    t0: Any = hyper(1e6, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    eta_lr: float | None = None
    past_eta_mu: tuple[tuple[int, float, float], ...] | None = None  # see scale_by_asgd
    scalar_dtype: str = "float64"

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="sgd",
        paper="Polyak & Juditsky (1992)",
        references=("torch.optim.ASGD",),
        example={"lr": 0.002},
        budget=1000,
    )

    def check(self) -> None:
        _check_eta_lr(self)
        _check_past_eta_mu(self.name, self.past_eta_mu)
        check_scalar_dtype(self.name, self.scalar_dtype)

    def parts(self) -> tuple[Transform, ...]:
        return (
            *([weight_decay(wd=self.weight_decay)] if self.on("weight_decay") else []),
            scale_by_asgd(lr=self.lr, lambd=self.lambd, alpha=self.alpha, t0=self.t0,
                          eta_lr=self.eta_lr, past_eta_mu=self.past_eta_mu,
                          scalar_dtype=self.scalar_dtype),
        )

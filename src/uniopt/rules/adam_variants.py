"""Adam's variants as torch.optim has them: Adamax, NAdam, RAdam.

Each direction block applies the learning rate itself, folded into the step-dependent
coefficient as torch folds it (``lr/(1 - b1^t)``, NAdam's ``lr*(1 - mu_t)/(1 - prod mu)``), so a
kernel rounds in torch's order: ``addcdiv`` as ``(value*num)/den``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import namespace
from ..base import Elementwise, Info, Rule, Transform
from ..hyper import (
    NONNEG,
    UNIT_OPEN,
    Interval,
    _traced,
    check_real,
    check_scalar_dtype,
    hyper,
    round_scalar,
)
from ..moments import bias_correction, ema_sq, fma, lerp, select
from ..schedules import join
from ..transforms.decay import check_decay_form, decayed, decoupled_weight_decay, weight_decay
from ..transforms.scale import scale_by_lr
from .adam import AdamCoeffs, _choice, scale_by_adam


def _decayed(direction: Elementwise, lr: Any, wd: Any, decoupled: bool, on: bool) -> tuple[
        Transform, ...]:
    """``direction`` with torch's decay: L2 before it, or decoupled ``p *= 1 - lr*wd``."""
    if not on:
        return (direction,)
    if decoupled:
        return (direction, decoupled_weight_decay(lr=lr, wd=wd))
    return (weight_decay(wd=wd), direction)


# --- Adamax --------------------------------------------------------------------------------------


class AdamaxCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    eps: Any
    clr: Any  # lr / (1 - b1^t)


@dataclass(frozen=True)
class scale_by_adamax(Elementwise):
    """Adamax's step: ``m <- b1*m + (1-b1)*u``, ``n <- max(b2*n, |u| + eps)``,
    ``u <- lr/(1 - b1^t) * m/n`` (eps inside the maximum, as torch and optax)."""

    lr: Any = hyper(2e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_floor16: bool = False
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_inf")
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: int) -> AdamaxCoeffs:
        c1 = self.one_minus("b1")
        return AdamaxCoeffs(one_minus_b1=c1, b2=self.b2, eps=self.eps,
                            clr=self.lr / bias_correction(self.b1, c1, step))

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_inf):
        m = lerp(exp_avg, u, c.one_minus_b1)
        n = xp.maximum(exp_inf * c.b2, xp.maximum(u, -u) + c.eps)
        return (c.clr * m) / n, m, n


@dataclass(frozen=True)
class scale_by_adamax_eps_out(scale_by_adamax):
    """Adamax with eps outside the maximum, as keras and Optimisers.jl write it:
    ``n <- max(b2*n, |u|)``, ``u <- lr/(1 - b1^t) * m/(n + eps)``."""

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_inf):
        m = lerp(exp_avg, u, c.one_minus_b1)
        n = xp.maximum(exp_inf * c.b2, xp.maximum(u, -u))
        return (c.clr * m) / (n + c.eps), m, n


@dataclass(frozen=True)
class adamax(Rule):
    r"""Adamax (Kingma & Ba, 2015, section 7.1) as torch writes it: Adam with the infinity norm.

    ``g <- g + weight_decay*p``; ``m <- b1*m + (1-b1)*g``; ``n <- max(b2*n, |g| + eps)``;
    ``p <- p - lr/(1 - b1^t) * m/n``. At step ``t`` (from 1), with ``(b1, b2) = betas`` and
    ``lambda = weight_decay``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    n_t = \max\left(\beta_2 n_{t-1},\ |g_t| + \epsilon\right) \\
    p_t &= p_{t-1} - \frac{\mathrm{lr}}{1 - \beta_1^t}\, \frac{m_t}{n_t}
    \end{aligned}
    $$

    Options: ``eps_in_max``: ``True``, eps inside the maximum (torch, optax); ``False``,
    ``n <- max(b2*n, |g|)`` and ``m/(n + eps)`` (keras, Optimisers.jl:
    :class:`scale_by_adamax_eps_out`). ``decay_form``: ``"l2"`` (torch's, above);
    ``"decoupled"``: keras's ``p <- p - lr*weight_decay*p`` before the step.

    Conventions: ``"torch"`` (lr 2e-3); ``"optax"`` (lr 1e-3, where optax requires one);
    ``"keras"`` (lr 1e-3, eps 1e-7, ``eps_in_max=False``, decoupled decay); ``"flux"``
    (Optimisers.jl ``AdaMax``: lr 1e-3, ``eps_in_max=False``).
    """

    lr: Any = hyper(2e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    eps_in_max: bool = True
    decay_form: str = "l2"
    eps_floor16: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"lr": 1e-3},
        "keras": {"lr": 1e-3, "eps": 1e-7, "eps_in_max": False, "decay_form": "decoupled"},
        "flux": {"lr": 1e-3, "eps_in_max": False,
                 "eps_floor16": True},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Kingma & Ba (2015), section 7",
        references=(
            "torch.optim.Adamax",
            "optax.adamax",
            "keras.optimizers.Adamax",
            "formula:Optimisers.AdaMax",
        ),
        example={"lr": 1.0},
        budget=1000,
    )

    def check(self) -> None:
        check_decay_form(self.name, self.decay_form)

    def parts(self) -> tuple[Transform, ...]:
        block = scale_by_adamax if self.eps_in_max else scale_by_adamax_eps_out
        direction = block(lr=self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                          eps_floor16=self.eps_floor16)
        return decayed((direction,), self.lr, self.weight_decay, self.decay_form,
                       self.on("weight_decay"))


# --- NAdam ---------------------------------------------------------------------------------------


def nadam_mu(b1: float, psi: float, t: float) -> float:
    """NAdam's momentum at update ``t``: ``b1*(1 - 0.5*0.96^(t*psi))`` (Dozat's schedule)."""
    return b1 * (1.0 - 0.5 * (0.96 ** (t * psi)))


# Below this, 1 - x is 1.0 in double: the product of the mus no longer changes a coefficient.
_NEGLIGIBLE = 2.0**-60
_PRODUCTS: dict[tuple[float, float, str], array] = {}
_ONE = array("d", [1.0])  # the empty product


def times_mu(product: float, mu: float, dtype: str) -> float:
    """torch's ``mu_product *= mu``: in double, or on a float32 tensor (its default dtype),
    ``mu`` rounded to float32 and the product rounded once."""
    return round_scalar(product * round_scalar(mu, dtype), dtype)


def mu_product(b1: float, psi: float, t: int, exact: bool = False,
               dtype: str = "float64") -> float:
    """``mu_1 * ... * mu_t``, multiplied in order as torch's ``mu_product`` tensor accumulates
    it (in ``dtype``, see :func:`times_mu`). Kept per ``(b1, psi)`` until it is negligible next
    to 1 (at most about ``40/(1-b1)`` numbers), so a step costs no loop over its history; past
    that the last kept value is returned, which changes no coefficient, unless ``exact`` (for
    torch's state)."""
    # (the key's numbers as floats: a torch param group may hold a NumPy or JAX 0-d array,
    # which is no key, and equals its float)
    b1, psi = float(b1), float(psi)
    prods = _PRODUCTS.get((b1, psi, dtype), _ONE)
    if len(prods) <= t and prods[-1] >= _NEGLIGIBLE:
        # extended in a copy (to twice its length: copies cost O(1) a step), then published
        # whole: another thread never sees, or appends to, a half-written list
        more = array("d", prods)
        while len(more) <= max(t, 2 * len(prods)) and more[-1] >= _NEGLIGIBLE:
            more.append(times_mu(more[-1], nadam_mu(b1, psi, float(len(more))), dtype))
        if len(_PRODUCTS) >= 16:  # a schedule of b1 makes a new pair every step
            _PRODUCTS.clear()
        _PRODUCTS[(b1, psi, dtype)] = prods = more
    if t < len(prods):
        return prods[t]
    x = prods[-1]
    for i in range(len(prods), t + 1 if exact else 0):
        nxt = times_mu(x, nadam_mu(b1, psi, float(i)), dtype)
        if nxt == x:
            # underflowed to 0 or to the least subnormal, where a momentum no smaller (they
            # grow with i, below 1) leaves it (a loop to a step of 1e7 took seconds, at every
            # step of torch's float32 count stalled at 2**24)
            break
        x = nxt
    return x


def derivable(b1: float, psi: float, t: int, product: float, dtype: str) -> bool:
    """Whether ``product``, the momenta's product after ``t`` steps, gives the coefficients
    :func:`mu_product` derives for ``(b1, psi)``: equal to it, or both negligible next to 1."""
    derived = mu_product(b1, psi, t, dtype=dtype)
    return product == derived or (product < _NEGLIGIBLE and derived < _NEGLIGIBLE)


def _check_past_product(owner: str, past: Any) -> None:
    def pair(x: Any) -> bool:
        return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], int)
                and not isinstance(x[0], bool) and x[0] >= 0 and isinstance(x[1], float))

    if past is not None and not (isinstance(past, tuple) and all(map(pair, past))):
        raise ValueError(f"{owner}: past_product must be None or pairs (step count, product), "
                         f"got {past!r}")


class NadamCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    bc2: Any  # 1 - b2^t
    eps: Any
    g_scale: Any  # lr*(1 - mu_t)/(1 - mu_1...mu_t)
    m_scale: Any  # lr*mu_{t+1}/(1 - mu_1...mu_{t+1})
    decays: Any  # decoupled weight decay on: lr*wd*p joins the update
    lr_wd: Any
    keep: Any  # 1 - lr*wd: torch's p.mul_ before its two addcdiv_


@dataclass(frozen=True)
class scale_by_nadam(Elementwise):
    """NAdam's step (Dozat, 2016), torch's form: with Adam's ``m`` and ``v``,
    ``u <- lr*(1-mu_t)/(1-P_t) * u/d + lr*mu_{t+1}/(1-P_{t+1}) * m/d``,
    ``d = sqrt(v/(1-b2^t)) + eps``, ``mu_t = b1*(1 - 0.5*0.96^(t*momentum_decay))``,
    ``P_t = mu_1*...*mu_t``. ``P_t`` is derived from the step count, for the values of ``b1``
    and ``momentum_decay`` at this step; ``past_product``, pairs ``(n, P_n)`` of the product
    of the momenta of the first ``n`` steps as they were (torch's ``mu_product``, which
    multiplies in each step's own ``b1``), makes step ``n + 1`` take ``P_n * mu_{n+1}``
    (``uniopt.torch.NAdam`` passes them; a step with no pair derives its product).
    ``decoupled_wd``: torch's decoupled decay, ``p <- p*(1 - lr*decoupled_wd)`` before the
    step (here, so the parameter is rounded in torch's order). ``scalar_dtype="float32"``:
    the product kept as torch keeps it, in a float32 tensor (:func:`times_mu`)."""

    lr: Any = hyper(2e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    momentum_decay: Any = hyper(4e-3, NONNEG)
    past_product: tuple[tuple[int, float], ...] | None = None
    decoupled_wd: Any = hyper(0.0, NONNEG)
    scalar_dtype: str = "float64"
    eps_floor16: bool = False
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def check(self) -> None:
        _check_past_product(self.name, self.past_product)
        check_scalar_dtype(self.name, self.scalar_dtype)

    def coeffs(self, step: int) -> NadamCoeffs:
        if any(map(_traced, (step, self.b1, self.momentum_decay))):
            raise TypeError(
                f"{self.name}: the product of NAdam's momenta is computed on the host, step by "
                "step; it cannot be traced (jax.jit), nor its step count or b1 be arrays of a "
                "transform (jax.vmap, jax.grad): run it eagerly, outside them, or take NAdam "
                "with convention='optax' (uo.nadamw too), which traces"
            )
        t, psi = int(step) + 1, self.momentum_decay
        mu, mu_next = nadam_mu(self.b1, psi, float(t)), nadam_mu(self.b1, psi, float(t + 1))
        past = dict(self.past_product or ()).get(t - 1)
        dt = self.scalar_dtype
        prod = mu_product(self.b1, psi, t, dtype=dt) if past is None else times_mu(past, mu, dt)
        lr_wd = self.lr * self.decoupled_wd
        return NadamCoeffs(
            one_minus_b1=self.one_minus("b1"), b2=self.b2, one_minus_b2=self.one_minus("b2"),
            bc2=1.0 - self.b2**t, eps=self.eps,
            g_scale=self.lr * (1.0 - mu) / (1.0 - prod),
            m_scale=self.lr * mu_next / (1.0 - prod * mu_next),
            decays=lr_wd != 0, lr_wd=lr_wd, keep=1.0 - lr_wd,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        d = xp.sqrt(v / c.bc2) + c.eps
        step = (c.g_scale * u) / d + (c.m_scale * m) / d
        return select(xp, c.decays, fma(c.lr_wd, p, step), step), m, v

    @staticmethod
    def finish(xp, c, p, u, exp_avg, exp_avg_sq):  # last: torch's two addcdiv_, each rounded
        d = xp.sqrt(exp_avg_sq / c.bc2) + c.eps
        return (p * c.keep - (c.g_scale * u) / d) - (c.m_scale * exp_avg) / d


@dataclass(frozen=True)
class scale_by_adam_b2_in_root(scale_by_adam):
    """:class:`scale_by_adam` with ``b2`` inside the root, ``sqrt(b2*v_hat + eps_root)``:
    Optimisers.jl's ``NAdam`` (with ``nesterov=True``)."""

    def coeffs(self, step: int) -> AdamCoeffs:
        c = super().coeffs(step)
        return c._replace(sqrt_bc2=c.sqrt_bc2 / self.b2**0.5, eps_root_bc2=c.eps_root_bc2 / self.b2)


MOMENTUM_SCHEDULES = ("dozat", "constant")


@dataclass(frozen=True)
class nadam(Rule):
    r"""NAdam (Dozat, 2016) as torch writes it: :class:`scale_by_nadam`, with
    ``g <- g + weight_decay*p`` before it, or with ``decoupled_weight_decay=True``
    ``p <- p*(1 - lr*weight_decay)`` beside it (NAdamW). At step ``t`` (from 1), with
    ``(b1, b2) = betas``, ``psi = momentum_decay``, ``lambda = weight_decay`` and
    ``P_t = mu_1*...*mu_t`` (the products of the momenta):

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1}
    \quad \text{(or } p_{t-1} \leftarrow (1 - \mathrm{lr}\,\lambda)\, p_{t-1}
    \text{ with decoupled_weight_decay)} \\
    \mu_t &= \beta_1 \left(1 - \tfrac{1}{2}\, 0.96^{t\psi}\right), \qquad
    P_t = \prod_{i=1}^{t} \mu_i \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2, \qquad
    d_t = \sqrt{\frac{v_t}{1 - \beta_2^t}} + \epsilon \\
    p_t &= p_{t-1} - \mathrm{lr} \left(\frac{1 - \mu_t}{1 - P_t}\, \frac{g_t}{d_t}
    + \frac{\mu_{t+1}}{1 - P_{t+1}}\, \frac{m_t}{d_t}\right)
    \end{aligned}
    $$

    The momentum ``m`` is Adam's, with ``b1`` (not ``mu_t``), as torch keeps it. Under a
    schedule of ``betas[0]`` or ``momentum_decay``, ``P_t`` here is the product of the momenta
    at this step's values, derived from the count: torch multiplies in each step's own
    (``mu_product``), and so does ``uniopt.torch.NAdam``, which passes them as
    ``past_product``; the two differ from the first step where the value moves (1e-3 of the
    step after 10 steps of ``linear(0.5, 0.95, 8)``).

    Options:

    - ``momentum_schedule``: ``"dozat"``: ``mu_t = b1*(1 - 0.5*0.96^(t*momentum_decay))`` and
      the products of the mus (torch; keras 3 is ``momentum_decay=1``, ``0.96^t``);
      ``"constant"``: ``mu_t = b1``, i.e. ``m_hat = b1*m/(1-b1^(t+1)) + (1-b1)*g/(1-b1^t)``
      over ``sqrt(v_hat + eps_root) + eps`` (optax's ``nadam``, ``adam(nesterov=True)``).
    - ``b2_in_root``: ``sqrt(b2*v_hat) + eps`` in the denominator (Optimisers.jl; with
      ``"constant"``).
    - ``eps_root``: optax's eps inside the root (with ``"constant"``).

    Conventions: ``"torch"`` (lr 2e-3, momentum_decay 4e-3); ``"optax"`` (``"constant"``;
    optax requires a learning rate, ours keeps 2e-3); ``"keras"`` (lr 1e-3, eps 1e-7,
    ``momentum_decay=1``, ``decoupled_weight_decay``: keras's ``p <- p - p*wd*lr`` before the
    step is torch's NAdamW up to rounding); ``"flux"`` (Optimisers.jl ``NAdam``: lr 1e-3,
    ``"constant"``, ``b2_in_root``).
    """

    lr: Any = hyper(2e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    momentum_decay: Any = hyper(4e-3, NONNEG)
    decoupled_weight_decay: bool = False
    past_product: tuple[tuple[int, float], ...] | None = None  # see scale_by_nadam
    scalar_dtype: str = "float64"  # see scale_by_nadam
    momentum_schedule: str = "dozat"
    b2_in_root: bool = False
    eps_root: Any = hyper(0.0, NONNEG)
    eps_floor16: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"momentum_schedule": "constant"},
        "keras": {"lr": 1e-3, "eps": 1e-7, "momentum_decay": 1.0,
                  "decoupled_weight_decay": True},
        "flux": {"lr": 1e-3, "momentum_schedule": "constant", "b2_in_root": True,
                 "eps_floor16": True},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "eps_root")

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Dozat (2016)",
        references=(
            "torch.optim.NAdam",
            "optax.nadam",
            "keras.optimizers.Nadam",
            "formula:Optimisers.NAdam",
        ),
        example={"lr": 0.03},
        budget=1000,
        jit=False,  # the product of the momenta is multiplied on the host, step by step
    )

    def check(self) -> None:
        _check_past_product(self.name, self.past_product)
        check_scalar_dtype(self.name, self.scalar_dtype)
        _choice(self.name, "momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        # (eps_root by its value, as nadamw's)
        if self.momentum_schedule == "dozat" and (self.b2_in_root or self.nonzero("eps_root")):
            raise ValueError(f"{self.name}: b2_in_root and eps_root are options of "
                             "momentum_schedule='constant', got momentum_schedule='dozat'")

    def parts(self) -> tuple[Transform, ...]:
        if self.momentum_schedule == "constant":
            block = scale_by_adam_b2_in_root if self.b2_in_root else scale_by_adam
            steps = (block(b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                           eps_root=self.eps_root, nesterov=True,
                           eps_floor16=self.eps_floor16), scale_by_lr(lr=self.lr))
            if not self.on("weight_decay"):
                return steps
            if self.decoupled_weight_decay:
                return (*steps, decoupled_weight_decay(lr=self.lr, wd=self.weight_decay))
            return (weight_decay(wd=self.weight_decay), *steps)
        decoupled = self.decoupled_weight_decay and self.on("weight_decay")
        direction = scale_by_nadam(lr=self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                                   eps_floor16=self.eps_floor16,
                                   momentum_decay=self.momentum_decay,
                                   past_product=self.past_product,
                                   decoupled_wd=self.weight_decay if decoupled else 0.0,
                                   scalar_dtype=self.scalar_dtype)
        if decoupled:  # in the block: p*(1 - lr*wd) first, then its two steps, as torch
            return (direction,)
        return _decayed(direction, self.lr, self.weight_decay, False, self.on("weight_decay"))


# --- RAdam ---------------------------------------------------------------------------------------


def _ratio(rho_t: Any, rho_inf: Any) -> Any:
    """RAdam's variance rectification ``r_t**2``, taken where ``rho_t`` is above its threshold:
    1 where ``rho_t`` has reached ``rho_inf`` (the formula's own value there, to the bit, and
    its limit where both are 4 and it reads 0/0: a threshold of 4 taken at ``rho_t >= 4``)."""
    if isinstance(rho_t, float) and rho_t == rho_inf:  # (a host number: no 0/0 to divide)
        return 1.0
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    return ratio if isinstance(rho_t, float) else namespace(ratio).where(rho_t == rho_inf, 1.0,
                                                                        ratio)


class RadamCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    bc1: Any  # 1 - b1^t
    lr: Any
    sqrt_bc2: Any  # sqrt(1 - b2^t)
    eps: Any
    rect: Any  # the variance rectification r_t (0 while rho_t <= 5)
    rectify: Any  # rho_t > 5: the adaptive step, else the momentum step
    one: Any  # 1 in the computation's precision (a literal 1.0 would be a double)


@dataclass(frozen=True)
class scale_by_radam(Elementwise):
    """RAdam's step (Liu et al., 2020), torch's form: with Adam's ``m`` and ``v`` and
    ``m_hat = m/(1 - b1^t)``, ``u <- m_hat*lr * sqrt(1-b2^t)/(sqrt(v) + eps) * r_t`` while
    ``rho_t > 5``, else ``u <- m_hat*lr``; ``rho_inf = 2/(1-b2) - 1``,
    ``rho_t = rho_inf - 2t*b2^t/(1-b2^t)``,
    ``r_t = sqrt((rho_t-4)(rho_t-2)rho_inf / ((rho_inf-4)(rho_inf-2)rho_t))``."""

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_floor16: bool = False
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def coeffs(self, step: int) -> RadamCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        traced = [x for x in (step, self.b1, self.b2) if _traced(x)]
        t = step + 1 if traced else int(step) + 1
        bc2 = bias_correction(self.b2, c2, t - 1)
        # torch's b2^t on the host; traced (jax.jit), from the complement as bias_correction's
        b2t = self.b2**t if not traced else 1.0 - bc2
        rho_inf = 2.0 / c2 - 1.0
        rho_t = rho_inf - 2.0 * t * b2t / bc2
        rectify = rho_t > 5.0
        if traced:
            xp = namespace(traced[0])
            rect = xp.where(rectify, xp.sqrt(xp.maximum(_ratio(rho_t, rho_inf), 0.0)), 0.0)
        else:
            # (the ratio only where it is taken: b2 = 0.6 makes rho_inf 4, its denominator 0,
            # and rho_t never above 5, torch's momentum step at every step)
            rect = _ratio(rho_t, rho_inf)**0.5 if rectify else 0.0  # torch's pow, not sqrt
        return RadamCoeffs(
            one_minus_b1=c1, b2=self.b2, one_minus_b2=c2, bc1=bias_correction(self.b1, c1, t - 1),
            lr=self.lr, sqrt_bc2=bc2**0.5, eps=self.eps, rect=rect, rectify=rectify, one=1.0,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        step = (m / c.bc1) * c.lr
        # torch's number / tensor is the tensor's reciprocal times the number: two roundings
        adaptive = step * ((c.one / (xp.sqrt(v) + c.eps)) * c.sqrt_bc2) * c.rect
        return select(xp, c.rectify, adaptive, step), m, v


class RectifiedCoeffs(NamedTuple):
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    bc1: Any  # 1 - b1^t
    lr: Any
    bc2: Any  # 1 - b2^t
    eps_root: Any
    eps: Any  # on the corrected root: eps/sqrt(1 - b2^t) where eps_hat
    rect: Any
    rectify: Any


@dataclass(frozen=True)
class scale_by_rectified_adam(Elementwise):
    """RAdam's step with its conventions as options: ``m_hat*lr*r_t/(sqrt(v_hat + eps_root)
    + eps)`` where ``rho_t > threshold`` (``>=`` unless ``strict``), else ``m_hat*lr``;
    ``eps_hat``: eps on the uncorrected root, ``sqrt(v) + eps`` (torch's placement).
    :class:`scale_by_radam` is torch's (threshold 5, strict, eps_hat) in torch's order."""

    lr: Any = hyper(1e-3, NONNEG)
    b1: Any = hyper(0.9, UNIT_OPEN)
    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    eps_root: Any = hyper(0.0, NONNEG)
    threshold: float = 5.0
    strict: bool = True
    eps_hat: bool = True
    eps_floor16: bool = False
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    makes_step: ClassVar[bool] = True

    def check(self) -> None:
        # (below 4 the rectification's ratio is negative, or 0/0 where rho_inf is 4, at a
        # rho_t the threshold lets through: radam's rectify_threshold is held to it too)
        object.__setattr__(self, "threshold", check_real(
            self.name, "threshold", self.threshold, Interval(4.0),
            why=" (r_t is real where rho_t >= 4)"))

    def coeffs(self, step: int) -> RectifiedCoeffs:
        c1, c2 = self.one_minus("b1"), self.one_minus("b2")
        traced = [x for x in (step, self.b1, self.b2) if _traced(x)]
        t = step + 1 if traced else int(step) + 1
        bc2 = bias_correction(self.b2, c2, t - 1)
        rho_inf = 2.0 / c2 - 1.0
        rho_t = rho_inf - 2.0 * t * (1.0 - bc2) / bc2
        rectify = rho_t > self.threshold if self.strict else rho_t >= self.threshold
        if traced:
            xp = namespace(traced[0])
            rect = xp.where(rectify, xp.sqrt(xp.maximum(_ratio(rho_t, rho_inf), 0.0)), 0.0)
        else:
            rect = _ratio(rho_t, rho_inf)**0.5 if rectify else 0.0  # torch's pow, not sqrt
        return RectifiedCoeffs(
            one_minus_b1=c1, b2=self.b2, one_minus_b2=c2, bc1=bias_correction(self.b1, c1, t - 1),
            lr=self.lr, bc2=bc2, eps_root=self.eps_root,
            eps=self.eps / bc2**0.5 if self.eps_hat else self.eps, rect=rect, rectify=rectify,
        )

    @staticmethod
    def kernel(xp, c, p, u, exp_avg, exp_avg_sq):
        m = lerp(exp_avg, u, c.one_minus_b1)
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        step = (m / c.bc1) * c.lr
        adaptive = step * c.rect / (xp.sqrt(v / c.bc2 + c.eps_root) + c.eps)
        return select(xp, c.rectify, adaptive, step), m, v


@dataclass(frozen=True)
class radam(Rule):
    r"""RAdam (Liu et al., 2020) as torch writes it: :class:`scale_by_radam`, with
    ``g <- g + weight_decay*p`` before it, or with ``decoupled_weight_decay=True``
    ``p <- p*(1 - lr*weight_decay)`` beside it. At step ``t`` (from 1), with
    ``(b1, b2) = betas`` and ``lambda = weight_decay``:

    $$
    \begin{aligned}
    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2, \qquad
    \hat m_t = \frac{m_t}{1 - \beta_1^t} \\
    \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
    \rho_t = \rho_\infty - \frac{2 t\, \beta_2^t}{1 - \beta_2^t}, \qquad
    r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\, \rho_\infty}
    {(\rho_\infty - 4)(\rho_\infty - 2)\, \rho_t}} \\
    p_t &= p_{t-1} - \mathrm{lr}\, \hat m_t \cdot
    \begin{cases}
    r_t\, \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\
    1 & \text{otherwise (momentum SGD)}
    \end{cases}
    \end{aligned}
    $$

    Options (:class:`scale_by_rectified_adam` where they are not torch's):

    - ``rectify_threshold``: the adaptive step is taken while ``rho_t`` exceeds it (5;
      Optimisers.jl 4).
    - ``rectify_strict``: ``rho_t > threshold`` (torch, Optimisers.jl), else ``>=`` (optax).
    - ``eps_hat``: ``True``, eps on the uncorrected root, ``sqrt(1-b2^t)/(sqrt(v) + eps)``
      (torch); ``False``, ``1/(sqrt(v_hat + eps_root) + eps)`` (optax, Optimisers.jl).
    - ``eps_root``: optax's eps inside the root (moving it to or from 0 with :func:`uniopt.adjust`
      is refused: see docs/jax.md).

    Conventions: ``"torch"``; ``"optax"`` (``>= 5``, eps on ``v_hat``; optax requires a learning
    rate, ours keeps 1e-3; its ``nesterov=True`` has no counterpart here); ``"flux"``
    (Optimisers.jl ``RAdam``: ``> 4``, eps on ``v_hat``).
    """

    lr: Any = hyper(1e-3, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    decoupled_weight_decay: bool = False
    rectify_threshold: float = 5.0
    rectify_strict: bool = True
    eps_hat: bool = True
    eps_root: Any = hyper(0.0, NONNEG)
    eps_floor16: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"rectify_strict": False, "eps_hat": False},
        "flux": {"rectify_threshold": 4.0, "eps_hat": False,
                 "eps_floor16": True},
    }

    optional: ClassVar[tuple[str, ...]] = ("weight_decay", "eps_root")

    info: ClassVar[Info] = Info(
        family="adam",
        paper="Liu et al. (2020)",
        references=("torch.optim.RAdam", "optax.radam", "formula:Optimisers.RAdam"),
        # the first steps, before the rectification, are momentum SGD: small ones
        example={"lr": join([1e-4, 0.1], boundaries=[5])},
        budget=1000,
    )

    def check(self) -> None:
        # r_t = sqrt((rho_t - 4)(rho_t - 2)...): real, for a step taken, where rho_t >= 4
        object.__setattr__(self, "rectify_threshold", check_real(
            self.name, "rectify_threshold", self.rectify_threshold, Interval(4.0),
            why=" (r_t is real where rho_t >= 4)"))

    def parts(self) -> tuple[Transform, ...]:
        b1, b2 = self.betas
        # (torch's form is a block of its own, in torch's operation order: an eps_root that is
        # on, a schedule's too, takes the general one, so adjust cannot move it to or from 0)
        torch_form = (self.rectify_threshold == 5.0 and self.rectify_strict and self.eps_hat
                      and not self.on("eps_root"))
        direction = (
            scale_by_radam(lr=self.lr, b1=b1, b2=b2, eps=self.eps,
                           eps_floor16=self.eps_floor16) if torch_form else
            scale_by_rectified_adam(lr=self.lr, b1=b1, b2=b2, eps=self.eps,
                                    eps_floor16=self.eps_floor16,
                                    eps_root=self.eps_root, threshold=self.rectify_threshold,
                                    strict=self.rectify_strict, eps_hat=self.eps_hat)
        )
        return _decayed(direction, self.lr, self.weight_decay, self.decoupled_weight_decay,
                        self.on("weight_decay"))

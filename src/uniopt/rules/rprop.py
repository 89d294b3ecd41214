"""Resilient backpropagation (Riedmiller & Braun, 1993) as torch.optim and optax write it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..backend import is_torch
from ..base import Elementwise, Info, Rule, Transform
from ..hyper import (
    NONNEG,
    DeviceNumber,
    Interval,
    carries_derivative,
    hyper,
    resolve,
    unpaired,
)
from ..moments import select


class RpropCoeffs(NamedTuple):
    etaminus: Any
    etaplus: Any
    lo: Any  # step_sizes: the clamp of the step size
    hi: Any
    zero: Any
    clamp_kept: Any  # clamp the step size where it is kept (the sign product is 0): torch
    remember_step: Any  # the memory is the signed step (optax), not the gradient (torch)
    stale: Any  # hand out the memory's step from before this update (optax 0.2.8)
    nan_skips: Any  # a NaN sign is 0, as torch's CPU sign of NaN (the entry is not moved)


REMEMBER = ("gradient", "step")


def _check(owner: str, etas: Any, step_sizes: Any, remember: Any = "gradient",
           stale: bool = False) -> None:
    if remember not in REMEMBER:
        raise ValueError(f"{owner}: remember must be one of {', '.join(map(repr, REMEMBER))}, "
                         f"got {remember!r}")
    if stale and remember != "step":
        raise ValueError(f"{owner}: stale_update=True hands out the remembered step: it needs "
                         f"remember='step', got remember={remember!r}")
    if not any(map(callable, etas)) and not 0.0 < etas[0] < 1.0 < etas[1]:
        raise ValueError(f"{owner}: etas must satisfy 0 < etas[0] < 1 < etas[1], got {etas!r}")
    if not any(map(callable, step_sizes)) and step_sizes[0] > step_sizes[1]:
        raise ValueError(
            f"{owner}: step_sizes must be (min, max) with min <= max, got {step_sizes!r}")


@dataclass(frozen=True)
class scale_by_rprop(Elementwise):
    """Rprop's step: where ``u`` keeps the sign of ``prev``, the step size ``s`` grows by
    ``etas[1]``; where it flips, ``s`` shrinks by ``etas[0]`` and ``u`` counts as 0; ``s`` is
    clamped to ``step_sizes``; ``u <- sign(u)*s``; ``prev <- u`` (0 where it flipped).
    ``s`` starts at ``lr`` (its value at step 0: later values change nothing, as in torch).

    ``clamp_kept=False``: where the sign product is 0 (the first update, a zero gradient)
    ``s`` is kept as it is, not clamped (optax); ``remember="step"``: ``prev`` holds the
    signed step ``sign(u)*s`` (0 where it flipped) instead of the gradient (optax); only the
    sign of ``prev`` is read, so this differs only where a product underflows to 0.
    ``stale_update=True`` (needs ``remember="step"``): the update handed out is the step
    remembered from the previous update, 0 where the sign flips now, as optax 0.2.8's
    ``scale_by_rprop`` emits it (its first update is 0). ``nan_skips=True``: a NaN gradient
    entry's sign counts as 0, as torch's CPU ``sign`` of NaN is: the entry keeps its step size
    and does not move (torch's Rprop); else it turns NaN (optax's)."""

    lr: Any = hyper(1e-2, NONNEG)
    etas: tuple[Any, Any] = hyper((0.5, 1.2), Interval(0.0, lo_open=True))
    step_sizes: tuple[Any, Any] = hyper((1e-6, 50), NONNEG)
    clamp_kept: bool = True
    remember: str = "gradient"
    stale_update: bool = False
    nan_skips: bool = False
    slots: ClassVar[tuple[str, ...]] = ("prev", "step_size")
    makes_step: ClassVar[bool] = True

    def check(self) -> None:
        _check(self.name, self.etas, self.step_sizes, self.remember, self.stale_update)

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        lr = unpaired(resolve(self.lr, 0))
        if isinstance(lr, DeviceNumber) and is_torch(lr.array):
            # torch's full_like takes a Python number: a tensor read on the device (a capturable
            # group's) is read on the host once, here, where the state is made
            lr = float(lr)
        elif carries_derivative(lr):
            # (a recorded step's lr that a derivative follows: full_like would read its value,
            # the step sizes then a constant to it, as torch's own under torch.func.jvp)
            return xp.zeros_like(p), xp.zeros_like(p) + lr
        return xp.zeros_like(p), xp.full_like(p, lr)

    def coeffs(self, step: int) -> RpropCoeffs:
        return RpropCoeffs(etaminus=self.etas[0], etaplus=self.etas[1], lo=self.step_sizes[0],
                           hi=self.step_sizes[1], zero=0.0, clamp_kept=self.clamp_kept,
                           remember_step=self.remember == "step", stale=self.stale_update,
                           nan_skips=self.nan_skips)

    @staticmethod
    def kernel(xp, c, p, u, prev, step_size):
        agree = u * prev
        # agree == 0 keeps s. A NaN product (a NaN gradient, or an infinite one against a
        # memory of 0) is neither > 0 nor < 0: torch's CPU sign of it is 0, which keeps s
        # (nan_skips); optax's clip(s * where(agree > 0, eta+, eta-)) shrinks it. Chosen by
        # comparisons alone, never by a NaN value (the multi-tensor path's select keeps one).
        # The step size depends on the product as torch's does under autograd, with derivative
        # 0 (its sign: torch's of NaN is 0)
        still = agree == 0
        shrunk = step_size * c.etaminus
        kept = step_size + xp.sign(agree) * c.zero
        s = select(xp, agree > 0, step_size * c.etaplus, select(
            xp, agree < 0, shrunk, select(xp, still, kept,
                                          select(xp, c.nan_skips, step_size, shrunk))))
        clamped = xp.minimum(xp.maximum(s, c.lo), c.hi)
        s = select(xp, c.clamp_kept, clamped, select(xp, still, s, clamped))
        g = select(xp, agree < 0, s * c.zero, u)
        out = select(xp, g > 0, s, select(xp, g < 0, -s,
                                          select(xp, c.nan_skips, s * c.zero, g * c.zero)))
        late = select(xp, agree < 0, s * c.zero, prev)
        return select(xp, c.stale, late, out), select(xp, c.remember_step, out, g), s


@dataclass(frozen=True)
class rprop(Rule):
    r"""Rprop (Riedmiller & Braun, 1993) as torch writes it: :class:`scale_by_rprop`, each
    element moving by its own step size against the sign of its gradient; ``lr`` is the initial
    step size (read at set-up, as torch reads it: a schedule's value at step 0; later values,
    or an ``adjust``, change nothing). Elementwise, with ``(eta-, eta+) = etas``,
    ``(s_min, s_max) = step_sizes``, ``s_0 = lr`` and ``h_0 = 0`` (``h`` the remembered gradient):

    $$
    \begin{aligned}
    s_t &= \operatorname{clip}\left(\begin{cases}
    \eta_+\, s_{t-1} & g_t h_{t-1} > 0 \\
    \eta_-\, s_{t-1} & g_t h_{t-1} < 0 \\
    s_{t-1} & g_t h_{t-1} = 0
    \end{cases},\ s_{\min},\ s_{\max}\right) \\
    h_t &= \begin{cases} 0 & g_t h_{t-1} < 0 \\ g_t & \text{otherwise} \end{cases} \\
    p_t &= p_{t-1} - \operatorname{sign}(h_t)\, s_t
    \end{aligned}
    $$

    Options (``convention=`` sets them):

    - ``clamp_kept``: torch clamps the step size to ``step_sizes`` at every update, also where
      the sign product is 0 (so the first step is ``lr`` clamped); ``False``: optax clamps
      only a step size it grew or shrank, so the first step is ``lr`` itself, even outside
      ``step_sizes``, and an element whose gradient is 0 keeps its step size unclamped.
    - ``remember``: ``"gradient"`` (torch: the last gradient, 0 where the sign flipped) or
      ``"step"`` (optax: the last signed step); only the sign is read, so they differ only
      where the product of a tiny gradient and the memory underflows to 0.
    - ``stale_update``: optax 0.2.8 hands out the step computed at the *previous* update
      (zeroed where the gradient's sign flips now), not this update's, so its first update
      is 0 and each later one lags a step: a slip, reported in optax pull request 1725
      (open). Needs ``remember="step"``.

    Conventions: ``"torch"``; ``"optax"`` (``optax.rprop(learning_rate, eta_minus, eta_plus,
    min_step_size, max_step_size)`` is ``rprop(lr, etas=(eta_minus, eta_plus),
    step_sizes=(min_step_size, max_step_size), convention="optax")``; the same defaults).
    Otherwise they agree: a flip shrinks the step size and skips the element's update for that
    step, and the next update sees no previous sign there.
    """

    lr: Any = hyper(1e-2, NONNEG)
    etas: tuple[Any, Any] = hyper((0.5, 1.2), Interval(0.0, lo_open=True))
    step_sizes: tuple[Any, Any] = hyper((1e-6, 50), NONNEG)
    clamp_kept: bool = True
    remember: str = "gradient"
    stale_update: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"clamp_kept": False, "remember": "step", "stale_update": True},
    }

    info: ClassVar[Info] = Info(
        family="sign",
        paper="Riedmiller & Braun (1993)",
        references=("torch.optim.Rprop", "optax.rprop"),
        example={"lr": 0.001},
        budget=500,
    )

    def check(self) -> None:
        _check(self.name, self.etas, self.step_sizes, self.remember, self.stale_update)

    def parts(self) -> tuple[Transform, ...]:
        return (scale_by_rprop(lr=self.lr, etas=self.etas, step_sizes=self.step_sizes,
                               clamp_kept=self.clamp_kept, remember=self.remember,
                               stale_update=self.stale_update,
                               nan_skips=self.convention == "torch"),)

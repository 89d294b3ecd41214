"""FTRL-Proximal (McMahan et al., 2013) as keras and TensorFlow write it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ..base import Elementwise, Info, PerLeaf, Rule, Transform
from ..hyper import NONNEG, POSITIVE, Interval, hyper, static


class FtrlCoeffs(NamedTuple):
    lr: Any
    shrink: Any  # 2*l2_shrinkage_regularization_strength
    l1: Any
    l2: Any  # 2*(l2_regularization_strength + beta/(2*lr)): the quadratic's constant term


class FtrlPowerCoeffs(NamedTuple):
    lr: Any
    shrink: Any
    l1: Any
    l2: Any
    power: Any  # -learning_rate_power


def _linear(c: Any, p: Any, u: Any, old_root: Any, new_root: Any, linear: Any) -> Any:
    """keras's linear term: ``z + (g + shrink*p) - (n^k - n_old^k)/lr * p``."""
    return linear + ((u + c.shrink * p) - ((new_root - old_root) / c.lr) * p)


def _solve(xp: Any, c: Any, linear: Any, new_root: Any) -> Any:
    """The new parameter: ``(clip(z, -l1, l1) - z)/(n^k/lr + l2)``, 0 where ``|z| <= l1``."""
    return (xp.minimum(xp.maximum(linear, -c.l1), c.l1) - linear) / (new_root / c.lr + c.l2)


@dataclass(frozen=True)
class _Ftrl:
    """The fields, slots and numbers FTRL's two forms share."""

    lr: Any = hyper(1e-3, POSITIVE)
    initial_accumulator_value: float = static(0.1, NONNEG)
    l1_regularization_strength: Any = hyper(0.0, NONNEG)
    l2_regularization_strength: Any = hyper(0.0, NONNEG)
    l2_shrinkage_regularization_strength: Any = hyper(0.0, NONNEG)
    beta: Any = hyper(0.0, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("accumulator", "linear")
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    # the parameter is set from the linear slot: the params keep only the state's precision
    exact_state: ClassVar[str | None] = (
        "it sets the parameter from its linear slot, so the params would keep only the "
        "state's precision")

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return (xp.full_like(p, self.initial_accumulator_value), xp.zeros_like(p))

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: Any) -> FtrlCoeffs:
        l2 = self.l2_regularization_strength + self.beta / (2.0 * self.lr)
        return FtrlCoeffs(lr=self.lr, shrink=2.0 * self.l2_shrinkage_regularization_strength,
                          l1=self.l1_regularization_strength, l2=2.0 * l2)


@dataclass(frozen=True)
class scale_by_ftrl(_Ftrl, Elementwise):
    """FTRL-Proximal's step at keras's default ``learning_rate_power=-0.5`` (a square root, as
    exact on the compiled loop as on the reference path). The parameter is *set*, not moved:
    ``n <- n + g^2``; ``z <- z + g + shrink*p - (sqrt(n) - sqrt(n_old))/lr * p``;
    ``p <- (clip(z, -l1, l1) - z)/(sqrt(n)/lr + l2)``. Its update is ``p - p_new``; last in a
    rule it writes ``p_new`` itself (``finish``)."""

    @staticmethod
    def kernel(xp, c, p, u, acc, linear):
        new_acc = acc + u * u
        root = xp.sqrt(new_acc)
        linear = _linear(c, p, u, xp.sqrt(acc), root, linear)
        return p - _solve(xp, c, linear, root), new_acc, linear

    @staticmethod
    def finish(xp, c, p, u, acc, linear):
        # last: keras's assign of the new parameter, from the kernel's new slots
        return _solve(xp, c, linear, xp.sqrt(acc))


@dataclass(frozen=True)
class scale_by_ftrl_power(_Ftrl, PerLeaf):
    """:class:`scale_by_ftrl` with any ``learning_rate_power`` ``-k`` (``n^k`` in place of
    ``sqrt(n)``). A per-leaf part, though elementwise in its arithmetic: a power other than a
    square root is rounded differently by the compiled loop (LLVM's ``pow``) and by each array
    library, so it keeps the reference path, the ground truth."""

    learning_rate_power: float = static(-0.5, Interval(None, 0.0))

    def steady(self) -> int | None:
        return 0

    def coeffs(self, step: Any) -> FtrlPowerCoeffs:  # type: ignore[override]
        return FtrlPowerCoeffs(*super().coeffs(step), power=-float(self.learning_rate_power))

    @staticmethod
    def finish(xp: Any, c: Any, p: Any, u: Any, acc: Any, linear: Any) -> tuple[Any, ...]:
        # last: keras's assign of the new parameter
        new_acc = acc + u * u
        root = new_acc ** c.power
        linear = _linear(c, p, u, acc ** c.power, root, linear)
        return _solve(xp, c, linear, root), new_acc, linear

    @staticmethod
    def apply(xp: Any, c: Any, p: Any, u: Any, acc: Any, linear: Any) -> tuple[Any, ...]:
        p_new, acc, linear = scale_by_ftrl_power.finish(xp, c, p, u, acc, linear)
        return p - p_new, acc, linear


@dataclass(frozen=True)
class ftrl(Rule):
    r"""FTRL-Proximal (McMahan et al., 2013), "Follow The Regularized Leader", as
    ``keras.optimizers.Ftrl`` (TensorFlow's ``ApplyFtrlV2``) writes it: the optimizer of
    large sparse linear models (click-through prediction), whose L1 term sets weights to
    exactly 0.

    Per element, with ``n`` the accumulator (from ``initial_accumulator_value``), ``z`` the
    linear term (from 0), ``k = -learning_rate_power``, ``lambda_1``, ``lambda_2`` and
    ``lambda_s`` the L1, L2 and L2-shrinkage strengths:

    $$
    \begin{aligned}
    n_t &= n_{t-1} + g_t^2, \qquad
    \sigma_t = \frac{n_t^{k} - n_{t-1}^{k}}{\mathrm{lr}} \\
    z_t &= z_{t-1} + g_t + 2\lambda_s\, p_{t-1} - \sigma_t\, p_{t-1} \\
    p_t &= \frac{\operatorname{clip}(z_t, -\lambda_1, \lambda_1) - z_t}
    {n_t^{k}/\mathrm{lr} + 2\lambda_2 + \beta/\mathrm{lr}}
    \end{aligned}
    $$

    so ``p_t`` is 0 wherever ``|z_t| <= lambda_1``. The shrinkage term enters the linear
    term only, not the accumulator (TensorFlow's V2 form). The parameter is set, not moved by
    an update: the rule's update is ``p_{t-1} - p_t``, and the step writes ``p_t`` itself.

    Defaults are keras's (lr 1e-3, ``initial_accumulator_value`` 0.1, ``learning_rate_power``
    -0.5, every strength and ``beta`` 0; fields named as keras's but ``lr``). At
    ``learning_rate_power=-0.5`` the powers are square roots and the rule is elementwise
    (:class:`scale_by_ftrl`, the compiled loop); any other power runs per leaf
    (:class:`scale_by_ftrl_power`, the reference path). keras's base-optimizer
    ``weight_decay=`` (a decay of the parameter before this step) is not offered: FTRL's own
    strengths regularise it.
    """

    lr: Any = hyper(1e-3, POSITIVE)
    learning_rate_power: float = static(-0.5, Interval(None, 0.0))
    initial_accumulator_value: float = static(0.1, NONNEG)
    l1_regularization_strength: Any = hyper(0.0, NONNEG)
    l2_regularization_strength: Any = hyper(0.0, NONNEG)
    l2_shrinkage_regularization_strength: Any = hyper(0.0, NONNEG)
    beta: Any = hyper(0.0, NONNEG)

    info: ClassVar[Info] = Info(
        family="adaptive",
        paper="McMahan et al. (2013)",
        references=("keras.optimizers.Ftrl",),
        example={"lr": 1.0, "beta": 1.0},
        budget=2000,
    )

    def parts(self) -> tuple[Transform, ...]:
        shared = {k: getattr(self, k) for k in (
            "lr", "initial_accumulator_value", "l1_regularization_strength",
            "l2_regularization_strength", "l2_shrinkage_regularization_strength", "beta")}
        if self.learning_rate_power == -0.5:
            return (scale_by_ftrl(**shared),)
        return (scale_by_ftrl_power(learning_rate_power=self.learning_rate_power, **shared),)

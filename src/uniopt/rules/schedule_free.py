"""Schedule-free SGD and AdamW (Defazio et al., 2024, "The Road Less Scheduled").

The params hold ``y``, where the gradients are taken; the state holds ``z`` (the base
optimizer's iterate) and the scalars of the averaging weights. The averaged iterate ``x``, the
one to evaluate, is not stored: ``x = (y - (1 - beta) z) / beta`` (:func:`schedule_free_eval`).

The averaging weight of each step depends on the running maximum of the learning rate, a
number carried from step to step, so the part that mixes ``y`` and ``z`` is a whole-tree part
(:class:`scale_by_schedule_free`) with that number in its tree state; what comes before it (the
weight decay, AdamW's second moment) stays elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import array_api_compat as aac
import numpy as np

from .. import backend
from ..base import Combinator, Elementwise, Info, Rule, Transform, WholeTree
from ..hyper import NONNEG, UNIT_OPEN, Interval, check_integer, hyper, on_host, resolve
from ..moments import bias_correction, ema_sq
from ..state import State
from ..transforms.decay import weight_decay
from ..tree import flatten_leaves, unflatten
from .rmsprop import scale_by_rms

OPEN_UNIT = Interval(0.0, 1.0, lo_open=True, hi_open=True)  # beta = 0 would divide by zero


def scalar_like(leaves: list[Any], value: Any) -> Any:
    """``value`` (a number, or a list of them) as an array of the leaves' library and device
    in their widest float dtype, float32 at least: the whole-tree scalars of a state (a
    weight sum, a step size estimate), which bfloat16 could not accumulate (a sum of 1e-6
    steps stalls at 8 bits)."""
    first = leaves[0] if leaves else np.zeros(0)
    xp = backend.namespace(first)
    reals = [xp.real(xp.zeros((), dtype=x.dtype)).dtype for x in leaves] + [xp.float32]
    dtype = max(reals, key=lambda d: xp.finfo(d).bits)
    return backend.number(xp, value, dtype, first)


def as_dtype(x: Any, like: Any) -> Any:
    """A whole-tree scalar ``x`` (a number, or a 0-d array) in the dtype of leaf ``like``, so
    that NumPy does not widen a float32 leaf by a float64 scalar."""
    if isinstance(x, (int, float)):
        return x
    xp = backend.namespace(like)
    return xp.astype(x, like.dtype) if x.dtype != like.dtype else x


def kept(xp: Any, x: Any, like: Any) -> Any:
    """A whole-tree scalar as its state keeps it: a 0-d array of ``like``'s dtype (NumPy's
    arithmetic on 0-d arrays hands back NumPy scalars, which a checkpoint would store as
    numbers). A tensor stays in autograd's graph only in a recorded step (``tracked()``): a
    state made from params that require grad (DoG's first distance) kept their graph, and
    torch 2.13's ``asarray`` warned that it now keeps it."""
    if backend.is_torch(x):
        return (x if backend.is_tracked() else x.detach()).to(dtype=like.dtype,
                                                                device=like.device)
    return xp.asarray(x, dtype=like.dtype, device=backend.device(like))


def arrays(xs: list[Any], old: list[Any]) -> list[Any]:
    """New per-leaf state as arrays in the dtypes of the ``old``: NumPy's arithmetic on a 0-d
    leaf hands back a NumPy scalar, and a step computed in a wider ``state_dtype`` than the
    state's would widen it (and recompile a jitted step)."""
    out = []
    for x, o in zip(xs, old, strict=True):
        x = np.asarray(x) if isinstance(x, np.generic) else x
        out.append(x if x.dtype == o.dtype else backend.namespace(o).astype(x, o.dtype))
    return out


def _ramp(step: Any, warmup: int) -> Any:
    """Meta's warm-up factor for the update numbered ``step + 1``: ``min((step + 1)/W, 1)``."""
    if warmup == 0:
        return 1.0
    t = (step + 1.0) / warmup  # a float first: int32 / int is float32 in JAX
    if isinstance(t, float):
        return min(t, 1.0)
    return aac.array_namespace(t).minimum(t, 1.0)


@dataclass(frozen=True)
class _next_step:
    """The schedule ``lr`` read one step ahead: optax's ``schedule_free`` reads its learning
    rate at its own count (1, 2, ...) for the weights, while the base optimizer inside reads
    it at its count (0, 1, ...) for the step."""

    schedule: Any

    def __call__(self, step: Any) -> Any:
        # (through resolve, as the lr itself is read: a uniopt schedule takes a JAX count as the
        # default float, where int32 + 1 made its arithmetic float32 under x64)
        return resolve(self.schedule, step + 1)


class ScheduleFreeCoeffs(NamedTuple):
    lr: Any  # the z step's learning rate, warm-up included
    weight_lr: Any  # the learning rate the averaging weight is made from
    momentum: Any  # beta: y = beta*x + (1 - beta)*z
    poly: Any  # (t + 1)**r, the polynomial weighting of update t + 1
    weight_lr_power: Any


@dataclass(frozen=True)
class scale_by_schedule_free(WholeTree):
    """The schedule-free step around the direction ``d`` it is given (the gradient, plus
    weight decay; AdamW's normalised gradient):

    ``z <- z - lr*d``; ``lr_max <- max(lr_max, weight_lr)``;
    ``w = (t+1)**r * lr_max**weight_lr_power``; ``W <- W + w``; ``c = w/W`` (0 while ``W`` is
    0); ``y <- (1 - c)*y + c*z_old - lr*(1 - beta*(1 - c))*d``, which is
    ``x <- (1 - c)*x + c*z``, ``y = beta*x + (1 - beta)*z`` with ``x`` eliminated (the form of
    Meta's ``SGDScheduleFree``). ``lr`` and ``weight_lr`` are multiplied by the warm-up factor
    ``min((t + 1 - lag)/warmup_steps, 1)`` and ``min((t + 1)/warmup_steps, 1)``, and both by
    ``sqrt(1 - b2^t)`` (``b2 = 0``: 1; Meta's ``AdamWScheduleFreePaper``).

    The tree state: ``z`` (one array per leaf), ``weight_sum`` and ``lr_max`` (0-d, the widest
    float dtype of the params).
    """

    real_only = True

    lr: Any = hyper(1.0, NONNEG)
    weight_lr: Any = hyper(1.0, NONNEG)
    momentum: Any = hyper(0.9, OPEN_UNIT)
    r: Any = hyper(0.0, NONNEG)
    weight_lr_power: Any = hyper(2.0, NONNEG)
    b2: Any = hyper(0.0, UNIT_OPEN)
    warmup_steps: int = 0
    lag: int = 0

    like_params: ClassVar[tuple[str, ...]] = ("z",)
    reads_every_leaf = False  # (z per leaf; the weights of the lr and the step count alone)
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True

    def check(self) -> None:
        for name in ("warmup_steps", "lag"):
            object.__setattr__(self, name, check_integer(self.name, name, getattr(self, name)))

    def coeffs(self, step: Any) -> ScheduleFreeCoeffs:
        # AdamWScheduleFreePaper folds Adam's sqrt(1 - b2^t) into the learning rate (b2 = 0:
        # no factor, the other forms)
        bc2 = bias_correction(self.b2, self.one_minus("b2"), step) ** 0.5
        return ScheduleFreeCoeffs(
            lr=self.lr * bc2 * _ramp(step - self.lag, self.warmup_steps),
            weight_lr=self.weight_lr * bc2 * _ramp(step, self.warmup_steps),
            momentum=self.momentum, poly=(step + 1.0) ** self.r,
            weight_lr_power=self.weight_lr_power)

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return (tuple(shape),) * len(self.like_params)

    def init_tree(self, params: Any) -> dict[str, Any]:
        leaves, _ = flatten_leaves(params)
        return {"z": [backend.detached_copy(p) for p in leaves],
                "weight_sum": scalar_like(leaves, 0.0), "lr_max": scalar_like(leaves, 0.0)}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any,
                   **extra: Any) -> tuple[Any, Any]:
        ds, treedef = flatten_leaves(u)
        ys, _ = flatten_leaves(params)
        total, lr_max = state["weight_sum"], state["lr_max"]
        xp = backend.namespace(total)
        lr_max = xp.maximum(lr_max, xp.asarray(c.weight_lr, dtype=lr_max.dtype,
                                               device=backend.device(lr_max)))
        weight = c.poly * lr_max ** c.weight_lr_power
        total = total + weight
        # w/W, and 0 before any weight (Meta catches the ZeroDivisionError, optax its NaN)
        ck = weight / xp.where(total > 0, total, xp.ones_like(total))
        step_scale = c.lr * (1.0 - c.momentum * (1.0 - ck))
        out, zs = [], []
        for d, y, z in zip(ds, ys, state["z"], strict=True):
            out.append(as_dtype(ck, y) * (y - z) + as_dtype(step_scale, y) * d)
            zs.append(z - c.lr * d)
        return unflatten(treedef, out), {"z": arrays(zs, state["z"]),
                                         "weight_sum": kept(xp, total, lr_max),
                                         "lr_max": kept(xp, lr_max, lr_max)}


class RmsCoeffs(NamedTuple):
    b2: Any
    one_minus_b2: Any
    bc2: Any  # 1 - b2**t
    eps: Any


@dataclass(frozen=True)
class scale_by_bias_corrected_rms(Elementwise):
    """``v <- b2*v + (1-b2)*u^2``; ``u <- u / (sqrt(v/(1 - b2^t)) + eps)``: Adam's
    denominator without its first moment (schedule-free AdamW's, optax's ``scale_by_rms(...,
    eps_in_sqrt=False, bias_correction=True)``)."""

    b2: Any = hyper(0.999, UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    slots: ClassVar[tuple[str, ...]] = ("exp_avg_sq",)

    def coeffs(self, step: Any) -> RmsCoeffs:
        c2 = self.one_minus("b2")
        return RmsCoeffs(b2=self.b2, one_minus_b2=c2, bc2=bias_correction(self.b2, c2, step),
                         eps=self.eps)

    @staticmethod
    def kernel(xp, c, p, u, exp_avg_sq):
        v = ema_sq(exp_avg_sq, u, c.b2, c.one_minus_b2)
        return u / (xp.sqrt(v / c.bc2) + c.eps), v


def _check_options(rule: Any) -> None:
    if not isinstance(rule.lagged_step_lr, bool):
        raise ValueError(f"{rule.name}: lagged_step_lr must be True or False, got "
                         f"{rule.lagged_step_lr!r}")
    object.__setattr__(rule, "warmup_steps",
                       check_integer(rule.name, "warmup_steps", rule.warmup_steps))
    scheduled = callable(rule.lr)
    if scheduled and rule.lagged_step_lr and rule.warmup_steps:
        raise ValueError(f"{rule.name}: with lagged_step_lr (optax's form), warmup_steps is "
                         "optax's warmup_constant_schedule of a constant learning rate; put the "
                         "warm-up in the lr schedule instead")


def _schedule_free(rule: Any, momentum: Any, b2: Any = 0.0) -> scale_by_schedule_free:
    optax = rule.lagged_step_lr
    weight_lr = _next_step(rule.lr) if optax and callable(rule.lr) else rule.lr
    return scale_by_schedule_free(lr=rule.lr, weight_lr=weight_lr, momentum=momentum, r=rule.r,
                                  weight_lr_power=rule.weight_lr_power, b2=b2,
                                  warmup_steps=rule.warmup_steps, lag=int(optax))


_CONVENTIONS_DOC = """
    Option ``lagged_step_lr``: False (Meta's ``schedulefree`` package, the authors' PyTorch
    code): update ``t`` (from 1) steps ``z`` with ``lr_t*min(t/warmup_steps, 1)`` and weights
    the average with the running maximum of that same value. True (optax's
    ``contrib.schedule_free_*``): the base optimizer inside reads the learning rate (and
    optax's ``warmup_constant_schedule``) at its own count ``t - 1``, the weights at ``t``: the
    ``z`` step lags the weights by one step of the schedule (its first step under warm-up is
    0). The same arithmetic at a constant learning rate without warm-up. optax has no ``r``.
    optax's ``warmup_constant_schedule`` computes in float32 even under x64 (its int32 count):
    with ``warmup_steps`` the two are 1e-10 to 1e-8 relative apart in float64; uniopt's ramp is
    in the params' precision.

    Conventions: ``"torch"`` (Meta's), ``"optax"`` (``lagged_step_lr=True``).
"""


@dataclass(frozen=True)
class schedule_free_sgd(Rule):
    r"""Schedule-free SGD (Defazio et al., 2024): with ``d = g + weight_decay*y`` (``y`` the
    params, where the gradient is taken),

    ``z <- z - lr_t*d``; ``x <- (1 - c_t)*x + c_t*z``; ``y <- momentum*x + (1 - momentum)*z``;

    ``c_t = w_t / sum(w_1..w_t)``, ``w_t = t**r * max(lr_1..lr_t)**weight_lr_power``, and
    ``lr_t = lr * min(t/warmup_steps, 1)`` (see :class:`scale_by_schedule_free`). At update
    ``t`` (from 1), with ``beta = momentum``, ``lambda = weight_decay``, ``W = warmup_steps``
    and ``q = weight_lr_power`` (``x_0 = y_0 = z_0``, the initial params):

    $$
    \begin{aligned}
    d_t &= g_t + \lambda\, y_{t-1}, \qquad
    \gamma_t = \mathrm{lr}_t \min\left(\tfrac{t}{W}, 1\right) \\
    z_t &= z_{t-1} - \gamma_t\, d_t \\
    w_t &= t^{\,r} \left(\max_{i \le t} \gamma_i\right)^{q}, \qquad
    c_t = \frac{w_t}{\sum_{i=1}^{t} w_i} \\
    x_t &= (1 - c_t)\, x_{t-1} + c_t\, z_t, \qquad
    y_t = \beta\, x_t + (1 - \beta)\, z_t
    \end{aligned}
    $$

    The params hold ``y``, stepped without ``x`` as
    ``y_t = (1 - c_t) y_{t-1} + c_t z_{t-1} - gamma_t (1 - beta (1 - c_t)) d_t``. ``x``, the
    weights to evaluate, is read with :func:`schedule_free_eval` (the params always hold
    ``y``: there is no train/eval mode switch to call).

    Defaults are Meta's ``schedulefree.SGDScheduleFree`` (lr 1.0, momentum 0.9); ``optax``:
    ``optax.contrib.schedule_free_sgd(learning_rate, warmup_steps, b1=momentum,
    weight_decay, weight_lr_power)``.

    A schedule of ``momentum`` is taken as Meta's form takes a changed momentum: the step
    above with each update's own ``beta``, which is the recurrence of ``x`` and ``y`` only
    while ``beta`` is constant (with ``x`` eliminated, a new ``beta`` does not re-mix the
    ``y`` already made); :func:`schedule_free_eval` reads ``x`` with the ``beta`` of the
    update that made ``y``, as Meta's ``eval()`` does (the rule's ``beta`` at that step: after
    :func:`uniopt.adjust` of ``momentum``, the new one before the next update too, as Meta's
    ``eval()`` reads the group's ``momentum`` as it is then).
    """

    lr: Any = hyper(1.0, NONNEG)
    momentum: Any = hyper(0.9, OPEN_UNIT)
    weight_decay: Any = hyper(0.0, NONNEG)
    warmup_steps: int = 0
    r: Any = hyper(0.0, NONNEG)
    weight_lr_power: Any = hyper(2.0, NONNEG)
    lagged_step_lr: bool = False
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {"torch": {},
                                                         "optax": {"lagged_step_lr": True}}
    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="schedule-free",
        paper="Defazio et al. (2024)",
        references=("schedulefree.SGDScheduleFreeReference", "schedulefree.SGDScheduleFree",
                    "optax.contrib.schedule_free_sgd"),
        example={"lr": 2e-3},
        budget=3000,  # the params hold y, which settles no faster than its average x
        complex=False,
    )

    def check(self) -> None:
        _check_options(self)

    def parts(self) -> tuple[Transform, ...]:
        decay = (weight_decay(wd=self.weight_decay),) if self.on("weight_decay") else ()
        return (*decay, _schedule_free(self, self.momentum))


@dataclass(frozen=True)
class schedule_free_adamw(Rule):
    r"""Schedule-free AdamW (Defazio et al., 2024): :class:`schedule_free_sgd` with the
    direction ``d = g/(sqrt(v/(1 - b2^t)) + eps) + weight_decay*y``,
    ``v <- b2*v + (1-b2)*g^2`` (:class:`scale_by_bias_corrected_rms`), and ``betas[0]`` as the
    interpolation ``beta``. The decay is taken at ``y`` and scaled by ``lr_t`` (Meta's
    ``decay_at_z=False``, optax's ``add_decayed_weights`` before the learning rate). At update
    ``t`` (from 1), with ``(beta, b2) = betas``, ``lambda = weight_decay``,
    ``W = warmup_steps`` and ``q = weight_lr_power``:

    $$
    \begin{aligned}
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2, \qquad
    d_t = \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda\, y_{t-1} \\
    \gamma_t &= \mathrm{lr}_t \min\left(\tfrac{t}{W}, 1\right), \qquad
    z_t = z_{t-1} - \gamma_t\, d_t \\
    w_t &= t^{\,r} \left(\max_{i \le t} \gamma_i\right)^{q}, \qquad
    c_t = \frac{w_t}{\sum_{i=1}^{t} w_i} \\
    x_t &= (1 - c_t)\, x_{t-1} + c_t\, z_t, \qquad
    y_t = \beta\, x_t + (1 - \beta)\, z_t
    \end{aligned}
    $$

    Defaults are Meta's ``schedulefree.AdamWScheduleFree`` (lr 0.0025, betas (0.9, 0.999),
    eps 1e-8), the same as ``optax.contrib.schedule_free_adamw``'s.

    Option ``bias_correction``: ``"root"`` (above), or ``"lr"``, Meta's
    ``AdamWScheduleFreePaper``, the form of the paper's experiments (before schedulefree 1.3):
    ``d = g/(sqrt(v) + eps) + weight_decay*y`` (no correction under the root) and ``lr_t``
    times ``sqrt(1 - b2^t)``, in the ``z`` step, the decay and the averaging weights alike
    (convention ``"paper"``).

    Convention ``"keras"``: ``keras.optimizers.ScheduleFreeAdamW``, ``weight_lr_power=0``:
    every step weighs alike in the average, ``c_t = 1/t``, under warm-up too. keras recovers
    ``x`` from ``y`` and ``z`` at each step where this keeps ``x``'s terms apart: 2e-14
    relative apart after 300 steps in float64. Its ``weight_decay=``, a decay of ``y`` before
    the step, is not this rule's ``weight_decay``: the keras convention refuses a decay.
    """

    lr: Any = hyper(0.0025, NONNEG)
    betas: tuple[Any, Any] = hyper((0.9, 0.999), UNIT_OPEN)
    eps: Any = hyper(1e-8, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    warmup_steps: int = 0
    r: Any = hyper(0.0, NONNEG)
    weight_lr_power: Any = hyper(2.0, NONNEG)
    lagged_step_lr: bool = False
    bias_correction: str = "root"
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {}, "optax": {"lagged_step_lr": True}, "paper": {"bias_correction": "lr"},
        "keras": {"weight_lr_power": 0.0}}
    optional: ClassVar[tuple[str, ...]] = ("weight_decay",)

    info: ClassVar[Info] = Info(
        family="schedule-free",
        paper="Defazio et al. (2024)",
        references=("schedulefree.AdamWScheduleFreeReference", "schedulefree.AdamWScheduleFree",
                    "schedulefree.AdamWScheduleFreePaper",
                    "optax.contrib.schedule_free_adamw", "keras.optimizers.ScheduleFreeAdamW"),
        example={"lr": 0.05, "betas": (0.95, 0.999)},
        budget=3000,
        complex=False,
    )

    def check(self) -> None:
        _check_options(self)
        wd = self.weight_decay
        if self.convention == "keras" and (callable(wd) or float(on_host(wd)) != 0.0):
            raise ValueError(
                "schedule_free_adamw(convention='keras'): keras's weight_decay decays y before "
                "the step (a base-optimizer decay outside the schedule-free arithmetic), which "
                f"this rule's weight_decay is not; got weight_decay={self.weight_decay!r}: "
                "leave it 0, or use convention='torch' for the decay inside the z step")
        if self.bias_correction not in ("root", "lr"):
            raise ValueError(f"{self.name}: bias_correction must be 'root' or 'lr', got "
                             f"{self.bias_correction!r}")
        b1 = self.betas[0]
        if not callable(b1) and not 0.0 < on_host(b1) < 1.0:
            raise ValueError(f"{self.name}: betas[0] must be in (0, 1) (y = beta*x + "
                             f"(1 - beta)*z; 0 would make x unrecoverable), got {b1!r}")

    def parts(self) -> tuple[Transform, ...]:
        decay = (weight_decay(wd=self.weight_decay),) if self.on("weight_decay") else ()
        if self.bias_correction == "lr":
            return (scale_by_rms(alpha=self.betas[1], eps=self.eps), *decay,
                    _schedule_free(self, self.betas[0], b2=self.betas[1]))
        return (scale_by_bias_corrected_rms(b2=self.betas[1], eps=self.eps), *decay,
                _schedule_free(self, self.betas[0]))


for _rule in (schedule_free_sgd, schedule_free_adamw):
    _rule.__doc__ = (_rule.__doc__ or "") + _CONVENTIONS_DOC


def schedule_free_eval(state: State, params: Any) -> Any:
    """The weights to evaluate a schedule-free rule at, ``x = (y - (1 - beta)*z)/beta``, from
    the params ``y`` and the state's ``z``: a tree shaped like ``params`` of new arrays (a copy
    of the params for leaves a schedule-free rule does not step, inside :func:`uniopt.masked`
    or :func:`uniopt.partition`).

    Meta's ``optimizer.eval()`` puts these in the model (and ``train()`` takes them out);
    ``optax.contrib.schedule_free_eval_params(state, params)`` returns them, as this does.
    The params themselves always hold ``y``: there is no mode to switch.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.array([1.0])}
    >>> state = uo.setup(uo.schedule_free_sgd(lr=0.5, momentum=0.5), p)
    >>> for _ in range(2):
    ...     state, p = uo.update(state, p, {"w": np.array([1.0])})
    >>> p["w"], uo.schedule_free_eval(state, p)["w"]
    (array([0.125]), array([0.25]))
    """
    if not isinstance(state, State):
        raise TypeError(f"schedule_free_eval: expected a uniopt State, got "
                        f"{type(state).__name__}")
    leaves, treedef = flatten_leaves(params)
    if treedef != state.treedef:
        raise ValueError(
            "schedule_free_eval: params do not have the tree structure this state was set up "
            f"for: state has {state.treedef}, params are {treedef}")
    out = _eval_weights(state, treedef, leaves)
    if out is None:
        raise ValueError(f"schedule_free_eval: {state.rule.name} is not a schedule-free rule "
                         "(uo.schedule_free_sgd, uo.schedule_free_adamw) and runs none")
    return unflatten(treedef, [backend.detached_copy(p) if x is None else x
                              for x, p in zip(out, leaves, strict=True)])


def _eval_weights(state: State, treedef: Any, leaves: list[Any],
                  back: bool = False) -> list[Any] | None:
    """Each leaf's x (None where no schedule-free part steps it), from ``state`` or from the
    states of the rules it runs; None if there is none. ``back``: the leaves are x, and
    their y, ``beta*x + (1 - beta)*z``, comes out (schedulefree's ``train()`` after its
    ``eval()``)."""
    for part, keys in state.rule.keyed_parts:
        if isinstance(part, scale_by_schedule_free):
            # the momentum that made y: the last update's, at step - 1 (before any, y = z
            # and any momentum gives x = z)
            step = state.step - 1
            step = max(step, 0) if isinstance(step, int) else backend.namespace(step).maximum(
                step, 0)
            beta = part.at(step).momentum  # type: ignore[attr-defined]
            out = []
            for y, z in zip(leaves, state.tree_states[keys[0]]["z"], strict=True):
                x = beta * y + (1.0 - beta) * z if back else (y - (1.0 - beta) * z) / beta
                out.append(x if x.dtype == y.dtype
                           else backend.namespace(y).astype(x, y.dtype))
            return out
    found: list[Any] = [None] * len(leaves)
    any_found = False
    for part, keys in state.rule.keyed_parts:
        if not isinstance(part, Combinator):
            continue
        for member, idx in part.leaves_of(treedef, leaves).items():
            sub = state.tree_states[keys[0]][member]
            got = _eval_weights(sub, sub.treedef, [leaves[i] for i in idx], back)
            if got is not None:
                any_found = True
                for i, x in zip(idx, got, strict=True):
                    found[i] = x
    return found if any_found else None

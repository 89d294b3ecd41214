"""Scaling the updates down when the loss stops improving."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat as aac
import numpy as np
import optree

from .. import backend
from ..base import WholeTree
from ..hyper import NONNEG, UNIT, Interval, check_integer, static
from ..tree import NAMESPACE, trainables

# when an evaluation moves the scale the updates are multiplied by: from the update given its
# value on (optax's), or from the next one (torch's scheduler.step(loss) after opt.step())
TIMINGS = ("optax", "torch")


@dataclass(frozen=True)
class reduce_on_plateau(WholeTree):
    """Multiplies the updates by ``scale``, which starts at 1 and is multiplied by ``factor``
    each time the loss has not improved for ``patience`` evaluations (optax's
    ``contrib.reduce_on_plateau``; torch's ``ReduceLROnPlateau`` through :meth:`from_torch`).

    It reads the loss of each update: ``uo.update(state, params, grads, value=loss)``, or
    ``value=loss`` in the optax protocol (inside ``optax.chain``, wrap it in
    :func:`uniopt.to_optax`). The mean of ``accumulation_size`` consecutive values is one
    evaluation ``m``; it improves on the best so far if ``m < (1 - rtol)*best - atol``
    (``mode="max"``: ``m > (1 + rtol)*best + atol``) and becomes the best; otherwise the plateau
    count grows, and on reaching ``patience`` it restarts and
    ``scale <- max(factor*scale, min_scale)`` (unless that lowers it by ``eps`` or less). The
    ``cooldown`` evaluations after a reduction count no plateau. Each update is multiplied by
    the scale its own evaluation left (``timing="optax"``), or with ``timing="torch"`` by the
    scale before it, the evaluation moving the next update's (torch's loop: ``opt.step()`` at
    the learning rate as it is, then ``scheduler.step(loss)``; :meth:`from_torch` sets it).
    ``rtol`` is at most 1 with ``mode="min"`` (above, ``(1 - rtol)*best`` is never beaten).
    The state (``scale``, ``best_value``, the counts, the accumulated mean) is the part's tree
    state: it checkpoints and goes through ``jax.jit`` with the rest of the state.

    >>> import numpy as np, uniopt as uo
    >>> opt = uo.chain(uo.sgd(lr=0.1), uo.reduce_on_plateau(factor=0.5, patience=2))
    >>> state, p = uo.setup(opt, [np.ones(1)]), [np.ones(1)]
    >>> for loss in [3.0, 2.0, 2.0, 2.0]:
    ...     state, p = uo.update(state, p, [np.ones(1)], value=loss)
    >>> float(state.tree_states["reduce_on_plateau"]["scale"])
    0.5
    """

    factor: float = static(0.1, Interval(0.0, 1.0, lo_open=True, hi_open=True))
    patience: int = 10
    rtol: float = static(1e-4, NONNEG)
    atol: float = static(0.0, NONNEG)
    cooldown: int = 0
    accumulation_size: int = 1
    min_scale: float = static(0.0, UNIT)
    eps: float = static(0.0, NONNEG)
    mode: str = "min"
    timing: str = "optax"

    reads_value: ClassVar[bool] = True
    step_args: ClassVar[tuple[str, ...]] = ("value",)

    def check(self) -> None:
        for name, least in (("patience", 0), ("cooldown", 0), ("accumulation_size", 1)):
            object.__setattr__(self, name, check_integer(self.name, name, getattr(self, name),
                                                         least))
        if self.mode not in ("min", "max"):
            raise ValueError(f"{self.name}: mode must be 'min' or 'max', got {self.mode!r}")
        if self.mode == "min" and self.rtol > 1:  # (optax's range; "max" takes any)
            raise ValueError(f"{self.name}: rtol must be in [0, 1] with mode='min', got "
                             f"{self.rtol!r}")
        if self.timing not in TIMINGS:
            raise ValueError(f"{self.name}: timing must be one of {TIMINGS}, got "
                             f"{self.timing!r}")

    @classmethod
    def from_torch(cls, lr: float, *, mode: str = "min", factor: float = 0.1,
                   patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                   cooldown: int = 0, min_lr: float = 0.0,
                   eps: float = 1e-8) -> reduce_on_plateau:
        """torch's ``ReduceLROnPlateau(optimizer, mode, factor, patience, threshold,
        threshold_mode, cooldown, min_lr, eps)`` for an optimizer of learning rate ``lr``, as a
        scale: the learning rates ``lr * scale`` are torch's, each applied to the update torch
        applies it to (``timing="torch"``: the loss given with an update moves the next one's,
        as ``scheduler.step(loss)`` after ``opt.step()``). torch reduces after *more than*
        ``patience`` evaluations without improvement (``patience + 1`` here); ``threshold`` is
        ``rtol`` (``threshold_mode="rel"``) or ``atol`` (``"abs"``); ``min_lr`` and ``eps``
        (torch skips a reduction of the learning rate by ``eps`` or less) are ``lr`` times
        ``min_scale`` and ``eps`` here. Its arguments are checked in its words. A negative
        ``threshold`` (a worse loss would count as an improvement) or ``eps``, which torch
        takes, is refused; so is a ``threshold`` of 1 or more with ``mode="min"`` and
        ``threshold_mode="rel"``, where no positive loss beats ``best*(1 - threshold)`` and
        torch cuts the learning rate every ``patience + 1`` steps whatever such losses.
        Otherwise one above 1 is torch's (with ``mode="max"``, ``rtol`` above 1)."""
        name = cls.__name__

        def number(arg: str, v: Any, ok: Callable[[Any], bool], says: str) -> None:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(v):
                raise ValueError(f"{name}: {arg} must be {says}, got {v!r}")

        patience = check_integer(name, "patience", patience, 0)
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"{name}: threshold_mode must be 'rel' or 'abs', got "
                             f"{threshold_mode!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"{name}: mode must be 'min' or 'max', got {mode!r}")
        number("lr", lr, lambda v: 0 < v < math.inf, "the optimizer's learning rate, a number > 0")
        rel = threshold_mode == "rel"
        if rel and mode == "min":
            number("threshold", threshold, lambda v: 0 <= v < 1,
                   "in [0, 1) with mode='min' and threshold_mode='rel'")
        else:
            number("threshold", threshold, lambda v: 0 <= v < math.inf, "a number >= 0")
        number("min_lr", min_lr, lambda v: 0 <= v <= lr, f"in [0, lr={lr!r}]")
        number("eps", eps, lambda v: 0 <= v < math.inf, "a number >= 0")
        return cls(factor=factor, patience=patience + 1, rtol=threshold if rel else 0.0,
                   atol=0.0 if rel else threshold, cooldown=cooldown, min_scale=min_lr / lr,
                   eps=eps / lr, mode=mode, timing="torch")

    def state_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return ()

    def init_tree(self, params: Any) -> dict[str, Any]:
        arrays = [x for x in trainables(params) if backend.is_array(x)]
        xp: Any = backend.namespace(arrays[0]) if arrays else aac.array_namespace(np.zeros(0))
        # as optax: the scale in the params' narrowest float type, the losses in the widest
        reals = sorted({xp.real(xp.zeros((), dtype=x.dtype)).dtype for x in arrays},
                       key=lambda d: xp.finfo(d).bits) or [xp.float64]

        def number(v: Any, dtype: Any) -> Any:
            if not arrays:
                return xp.asarray(v, dtype=dtype)
            return backend.number(xp, v, dtype, arrays[0])

        best = math.inf if self.mode == "min" else -math.inf
        return {"scale": number(1.0, reals[0]), "best_value": number(best, reals[-1]),
                "plateau_count": number(0, xp.int32), "cooldown_count": number(0, xp.int32),
                "count": number(0, xp.int32), "avg_value": number(0.0, reals[-1])}

    def apply_tree(self, c: Any, u: Any, state: Any, params: Any, value: Any = None,
                   **extra: Any) -> tuple[Any, dict[str, Any]]:
        if value is None:
            raise TypeError(
                f"{self.name} reads the loss: pass it as uo.update(state, params, grads, "
                "value=loss), or as tx.update(grads, state, params, value=loss) (in an "
                "optax.chain, wrap the uniopt transform in uo.to_optax to have it passed on)"
            )
        s = state
        xp = backend.namespace(s["scale"])
        loss = backend.number(xp, value, s["avg_value"].dtype, s["avg_value"])
        if tuple(loss.shape) != ():
            raise ValueError(f"{self.name}: value must be one number (the loss), got an array "
                             f"of shape {tuple(loss.shape)}")
        count = s["count"] + 1
        # the counts in the losses' type: NumPy would widen float32 by int32 to float64
        seen, n = (xp.astype(c, loss.dtype) for c in (s["count"], count))
        mean = (seen * s["avg_value"] + loss) / n
        best = s["best_value"]
        if self.mode == "min":
            improved = mean < (1.0 - self.rtol) * best - self.atol
        else:
            improved = mean > (1.0 + self.rtol) * best + self.atol
        zero = xp.zeros_like(count)  # the counts' type (int32), whatever the library's default
        plateau = xp.where(improved, zero, s["plateau_count"] + 1)
        cooling = s["cooldown_count"] > 0
        cut = xp.logical_and(xp.logical_not(cooling), plateau == self.patience)
        cut_scale = xp.maximum(s["scale"] * self.factor,
                               backend.number(xp, self.min_scale, s["scale"].dtype, s["scale"]))
        lower = xp.logical_and(cut, s["scale"] - cut_scale > self.eps)
        scale = xp.where(lower, cut_scale, s["scale"])
        evaluated = {
            "scale": scale,
            "best_value": xp.where(improved, mean, best),
            "plateau_count": xp.where(xp.logical_or(cooling, cut), zero, plateau),
            "cooldown_count": xp.where(cooling, s["cooldown_count"] - 1,
                                       xp.where(cut, zero + self.cooldown, zero)),
            "count": zero,
            "avg_value": xp.zeros_like(mean),
        }
        # an evaluation every accumulation_size values; between them only the mean moves
        due = count == self.accumulation_size
        waiting = {**s, "count": count, "avg_value": mean}
        new = {k: xp.where(due, v, waiting[k]) for k, v in evaluated.items()}
        factor = new["scale"] if self.timing == "optax" else s["scale"]
        return optree.tree_map(lambda x: x * factor, u, namespace=NAMESPACE), new

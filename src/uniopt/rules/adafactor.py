"""Adafactor (Shazeer & Stern, 2018) in torch's form: a factored second moment."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import backend
from ..backend import is_torch, namespace
from ..base import Info, PerLeaf, Rule, Transform
from ..hyper import NONNEG, POSITIVE, Interval, check_integer, check_real, hyper
from ..moments import fma, lerp
from ..transforms.scale import leaf_norm


def _leaf_axes(x: Any) -> tuple[int, ...]:
    """The axes of each leaf in a batch (all but the leading one)."""
    return tuple(range(1, x.ndim))


def _norm(xp: Any, x: Any, axis: int) -> Any:
    """The 2-norm along ``axis``, kept: torch's ``norm(x, dim=axis, keepdim=True)`` on torch
    tensors (its own reduction, as its Adafactor takes it), ``sqrt(sum(x*x))`` elsewhere."""
    if is_torch(x):
        import torch

        return torch.linalg.vector_norm(x, dim=axis, keepdim=True)
    return xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))


def _mean_sq(xp: Any, g: Any, axis: int) -> Any:
    """The mean of ``g^2`` along ``axis`` in torch's order: ``norm(g, dim).square_().div_(n)``
    (its Adafactor never forms ``g*g`` for a matrix)."""
    r = _norm(xp, g, axis)
    return r * r / g.shape[axis]


def _rsqrt(xp: Any, x: Any) -> Any:
    """``1/sqrt(x)``: torch's CPU ``rsqrt`` is that, an IEEE square root and a division (two
    roundings), on its vectorised and scalar paths alike."""
    if is_torch(x):
        import torch

        return torch.rsqrt(x)
    return 1 / xp.sqrt(x)


def _leaf_norms(xp: Any, x: Any) -> Any:
    """Each leaf's 2-norm: on torch tensors a list of Python floats, each leaf's own
    ``norm(2).item()`` as torch's for-loop takes it (one reduction per leaf: a reduction over
    the batch may split its sums elsewhere); on other arrays, and in a recorded step (whose
    derivative a number would cut, or inside a torch.func transform: ``jvp``'s, ``vmap``'s),
    shaped ``(batch, 1, ...)``."""
    if is_torch(x) and not backend.keeps_torch_numbers():
        return [float(x[b].norm(2)) for b in range(x.shape[0])]
    if is_torch(x) and x.ndim > 1:
        # (torch's own reduction, as the numbers above take it: the recorded step's values are
        # the unrecorded one's; its derivative at a leaf of zeros is 0)
        import torch

        return torch.linalg.vector_norm(x, dim=_leaf_axes(x), keepdim=True)
    return leaf_norm(xp, x)


def _larger(xp: Any, floor: Any, x: Any) -> Any:
    """Python's ``max(floor, x)``: ``x`` where it is larger (not NaN), else ``floor``."""
    if isinstance(x, float):
        return max(floor, x)
    return xp.where(x > floor, x, floor)


def _wide(xp: Any, x: Any) -> Any:
    """``x`` in float64, as torch's ``.item()`` arithmetic is on the host, where the library
    has it (JAX only with x64; there ``x`` as it is)."""
    if backend.is_jax(x):
        return x
    return xp.astype(x, backend.widest_float(xp, x))


EPS_FORMS = ("clamp", "add")
FACTORED_AXES = ("last", "largest")
DECAY_FORMS = ("decoupled", "decoupled_first", "independent")


def _check_forms(t: Any) -> None:
    if t.eps_form not in EPS_FORMS:
        raise ValueError(f"{t.name}: eps_form must be one of "
                         f"{', '.join(map(repr, EPS_FORMS))}, got {t.eps_form!r}")
    if t.factored_axes not in FACTORED_AXES:
        raise ValueError(f"{t.name}: factored_axes must be one of "
                         f"{', '.join(map(repr, FACTORED_AXES))}, got {t.factored_axes!r}")
    object.__setattr__(t, "min_dim_size_to_factor", check_integer(
        t.name, "min_dim_size_to_factor", t.min_dim_size_to_factor, 1))


class FactoredCoeffs(NamedTuple):
    weight: Any  # t^beta2_decay: the weight of this step's squares in the moving averages
    eps1: Any  # floor of the variance estimate's root (None: the dtype's machine epsilon)
    d: Any  # clipping threshold of the update's RMS
    clip: bool  # whether to clip here (adafactor clips in its last part, as torch)
    add: bool  # eps_form="add": eps1 added to g^2, no floors (optax, keras)


@dataclass(frozen=True)
class scale_by_factored_rms(PerLeaf):
    """Adafactor's direction: ``u <- g / sqrt(v_hat)``, clipped to RMS ``d``.

    A leaf of two or more dimensions keeps the row and column means of ``g^2`` over its last
    two axes, ``R <- lerp(R, mean_cols(g^2), w)``, ``C <- lerp(C, mean_rows(g^2), w)``, and
    estimates ``v_hat = R C / max(mean(R), eps1)``; a smaller leaf keeps ``v <- lerp(v, g^2,
    w)`` whole. ``w = t^beta2_decay``; ``u <- rsqrt(max(v_hat, eps1^2)) g``, then
    ``u <- u / max(1, rms(u)/d)`` (``clip=False``: no clipping). Each mean of ``g^2`` is
    ``norm(g)^2 / n`` along its axis, as torch rounds it.

    On DTensor shards (FSDP2, tensor parallel) each leaf's gradient, parameter and slots shaped
    as it are all-gathered whole on every rank, the factors computed there (kept whole,
    replicated) and each rank keeps its shard of the update (:mod:`uniopt.interop.dtensor`)."""

    real_only = True

    beta2_decay: Any = hyper(-0.8, Interval(None, 0.0))
    eps1: float | None = None
    d: Any = hyper(1.0, POSITIVE)
    clip: bool = True
    eps_form: str = "clamp"
    min_dim_size_to_factor: int = 1
    factored_axes: str = "last"
    slots: ClassVar[tuple[str, ...]] = ("row_var", "col_var", "variance")
    batched: ClassVar[bool] = True

    def check(self) -> None:
        _check_forms(self)
        object.__setattr__(self, "eps1", check_real(self.name, "eps1", self.eps1, NONNEG,
                                                    none="the dtype's machine epsilon"))

    def _factors(self, shape: tuple[int, ...]) -> bool:
        # optax factors a leaf when its second-largest dimension reaches the threshold
        return len(shape) >= 2 and sorted(shape)[-2] >= self.min_dim_size_to_factor

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        if self.factored_axes == "largest" and len(shape) > 2 and self._factors(shape):
            top = {int(a) for a in np.argsort(shape)[-2:]}  # optax's choice of the two axes
            if top != {len(shape) - 2, len(shape) - 1}:
                return (f"factored_axes='largest' (optax) factors axes {sorted(top)} of this "
                        "leaf; uniopt factors the last two axes only, so optax's statistics "
                        "for it are not offered")
        return None

    def slot_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, ...]:
        if not self._factors(shape):
            return None, None, tuple(shape)
        return (*shape[:-1], 1), (*shape[:-2], 1, shape[-1]), None

    def coeffs(self, step: Any) -> FactoredCoeffs:
        # torch's step_float**beta2_decay: the step a float
        return FactoredCoeffs(weight=(step + 1.0) ** self.beta2_decay, eps1=self.eps1,
                              d=self.d, clip=self.clip, add=self.eps_form == "add")

    @staticmethod
    def apply(xp, c, p, u, row_var, col_var, variance):
        eps1 = float(xp.finfo(u.dtype).eps) if c.eps1 is None else c.eps1
        if c.add:  # optax's, keras's: v from g^2 + eps1, v_hat unfloored
            sq = u * u + eps1
            if variance is None:
                row_var = lerp(row_var, xp.mean(sq, axis=-1, keepdims=True), c.weight)
                col_var = lerp(col_var, xp.mean(sq, axis=-2, keepdims=True), c.weight)
                v_hat = row_var * col_var / xp.mean(row_var, axis=-2, keepdims=True)
            else:
                v_hat = variance = lerp(variance, sq, c.weight)
            u = _rsqrt(xp, v_hat) * u
        elif variance is None:
            row_var = lerp(row_var, _mean_sq(xp, u, -1), c.weight)
            col_var = lerp(col_var, _mean_sq(xp, u, -2), c.weight)
            # torch's row_var @ col_var: an outer product, each element one rounded product
            v_hat = row_var * col_var / xp.clip(
                xp.mean(row_var, axis=-2, keepdims=True), min=eps1)
            u = _rsqrt(xp, xp.clip(v_hat, min=eps1 * eps1)) * u
        else:
            v_hat = variance = lerp(variance, u * u, c.weight)
            u = _rsqrt(xp, xp.clip(v_hat, min=eps1 * eps1)) * u
        if c.clip:
            n = math.prod(u.shape[1:]) or 1  # (an empty leaf: nothing to clip)
            u = u / xp.clip(_leaf_norms_array(xp, u) / (n**0.5 * c.d), min=1.0)
        return u, row_var, col_var, variance


def _leaf_norms_array(xp: Any, x: Any) -> Any:
    """:func:`_leaf_norms` as an array shaped ``(batch, 1, ...)`` on every library."""
    norms = _leaf_norms(xp, x)
    if isinstance(norms, list):
        return xp.reshape(xp.asarray(norms, dtype=x.dtype, device=backend.device(x)),
                          (-1,) + (1,) * (x.ndim - 1))
    return norms


class RelativeStep(NamedTuple):
    rho: Any  # min(lr, 1/sqrt(t))
    eps2: Any  # floor of a parameter's RMS
    lr_wd: Any  # decoupled decay, scaled by lr (not by rho), as torch
    keep: Any  # 1 - lr*weight_decay: torch's factor of the decay, in Python's double
    d: Any  # clipping threshold of the update's RMS
    clip: bool  # whether to clip it (False: d is not read)
    scale: bool  # whether alpha has the factor max(eps2, rms(p))
    seen: Any  # the factor on rms(p): keep where p is decayed before its scale is read


@dataclass(frozen=True)
class scale_by_param_scale(PerLeaf):
    """Adafactor's step size, relative to each parameter's scale, and decoupled decay:
    ``u <- max(eps2, rms(p)) * min(lr, 1/sqrt(t)) * u / max(1, rms(u)/d) + lr*weight_decay*p``
    (``clip=True``; by default no clipping here).

    Last in a rule, it writes the parameter in torch's order: ``alpha = max(eps2, rms(p)) rho``
    and ``denom = max(1, rms(u)/d)`` as torch's Python floats (each leaf's norms, its
    ``.item()``), ``p <- p (1 - lr*weight_decay)``, then ``p <- p + (-alpha/denom) u`` with one
    rounding (torch's ``p.add_(u, alpha=-alpha/denom)``)."""

    lr: Any = hyper(1e-2, NONNEG)
    eps2: Any = hyper(1e-3, NONNEG)
    weight_decay: Any = hyper(0.0, NONNEG)
    d: Any = hyper(1.0, POSITIVE)
    clip: bool = False
    relative_step: bool = True
    param_scale: bool = True
    decay_form: str = "decoupled"
    uses_params: ClassVar[bool] = True
    makes_step: ClassVar[bool] = True
    batched: ClassVar[bool] = True

    def coeffs(self, step: Any) -> RelativeStep:
        decay = 1 / (step + 1.0) ** 0.5  # torch's 1 / (step_float**0.5)
        if not self.relative_step:
            rho = self.lr
        elif isinstance(decay, float) and isinstance(self.lr, float):
            rho = min(self.lr, decay)
        else:  # traced by jax.jit
            rho = namespace(decay if not isinstance(decay, float) else self.lr).minimum(
                self.lr, decay)
        lr_wd = (self.weight_decay if self.decay_form == "independent"
                 else self.lr * self.weight_decay)
        seen = 1 - lr_wd if self.decay_form == "decoupled_first" else 1.0
        return RelativeStep(rho=rho, eps2=self.eps2, lr_wd=lr_wd, keep=1 - lr_wd, d=self.d,
                            clip=self.clip, scale=self.param_scale, seen=seen)

    def check(self) -> None:
        if self.decay_form not in DECAY_FORMS:
            raise ValueError(f"{self.name}: decay_form must be one of "
                             f"{', '.join(map(repr, DECAY_FORMS))}, got {self.decay_form!r}")

    @staticmethod
    def _scales(xp: Any, c: RelativeStep, p: Any, u: Any) -> Any:
        """Each leaf's ``alpha/denom``: Python floats on torch tensors, as torch computes them;
        elsewhere an array shaped ``(batch, 1, ...)``, in float64 where the library has it."""
        # torch's numel() ** 0.5 (an empty leaf's RMS reads as 0: it scales no element)
        root_n = math.prod(p.shape[1:]) ** 0.5 or 1.0
        pn = _leaf_norms(xp, p)
        if isinstance(pn, list):
            alphas = [(_larger(xp, c.eps2, c.seen * a / root_n) if c.scale else 1.0) * c.rho
                      for a in pn]
            if not c.clip:
                return alphas
            return [a / _larger(xp, 1.0, b / (root_n * c.d))
                    for a, b in zip(alphas, _leaf_norms(xp, u), strict=True)]
        alpha = (_larger(xp, c.eps2, c.seen * _wide(xp, pn) / root_n) if c.scale
                 else _wide(xp, xp.ones_like(pn))) * c.rho
        if not c.clip:
            return alpha
        return alpha / _larger(xp, 1.0, _wide(xp, _leaf_norms(xp, u)) / (root_n * c.d))

    @staticmethod
    def apply(xp, c, p, u):
        s = scale_by_param_scale._scales(xp, c, p, u)
        if isinstance(s, list):
            s = xp.reshape(xp.asarray(s, dtype=xp.float64, device=backend.device(p)),
                           (-1,) + (1,) * (p.ndim - 1))
        return (xp.astype(s, u.dtype) * u + c.lr_wd * p,)

    @staticmethod
    def finish(xp, c, p, u):
        s = scale_by_param_scale._scales(xp, c, p, u)
        decays = not (isinstance(c.lr_wd, (int, float)) and c.lr_wd == 0)
        if isinstance(s, list):  # torch: leaf by leaf, its scalar alpha rounded by add_
            import torch

            return (torch.stack([
                torch.add(p[b] * c.keep if decays else p[b], u[b], alpha=-s[b])
                for b in range(p.shape[0])]),)
        return (fma(xp.astype(-s, u.dtype), u, p * c.keep if decays else p),)


@dataclass(frozen=True)
class adafactor(Rule):
    r"""Adafactor (Shazeer & Stern, 2018) as torch 2.13's ``Adafactor`` writes it.

    ``p <- p - max(eps2, rms(p)) min(lr, 1/sqrt(t)) U - lr*weight_decay*p`` with ``U`` the
    clipped, factored direction of :class:`scale_by_factored_rms` (row and column statistics
    for leaves of two or more dimensions, over their last two axes). ``eps = (eps1, eps2)``;
    ``eps1=None`` is the parameter dtype's machine epsilon. At step ``t`` (from 1), with
    ``lambda = weight_decay``, for a matrix leaf ``G = g_t`` (``R`` its row statistics, ``C``
    its column statistics; a smaller leaf keeps ``V_t = (1 - w_t) V_{t-1} + w_t G^2`` whole):

    $$
    \begin{aligned}
    w_t &= t^{\,\text{beta2_decay}} \\
    R_t &= (1 - w_t)\, R_{t-1} + w_t \operatorname{mean}_{\text{cols}}(G^2), \qquad
    C_t = (1 - w_t)\, C_{t-1} + w_t \operatorname{mean}_{\text{rows}}(G^2) \\
    \hat V_t &= \frac{R_t C_t}{\max(\operatorname{mean}(R_t),\ \epsilon_1)}, \qquad
    U_t = \frac{G}{\sqrt{\max(\hat V_t,\ \epsilon_1^2)}} \\
    \alpha_t &= \max\left(\epsilon_2, \operatorname{rms}(p_{t-1})\right)
    \min\left(\mathrm{lr}, \frac{1}{\sqrt t}\right) \\
    p_t &= (1 - \mathrm{lr}\,\lambda)\, p_{t-1}
    - \frac{\alpha_t}{\max\left(1, \operatorname{rms}(U_t)/d\right)}\, U_t
    \end{aligned}
    $$

    It rounds as torch's for-loop (``foreach=False``): each mean of ``g^2`` is torch's
    ``norm(g, dim)^2 / n``, the moving averages its ``lerp``, ``rsqrt`` an IEEE root and a
    division; ``alpha``, ``rho`` and the clipping's ``denom`` are its Python floats from each
    leaf's norms; the decay ``p (1 - lr*weight_decay)`` comes first and the step is one fused
    ``p + (-alpha/denom) U``. On torch tensors the norms and means are torch's own reductions,
    so ``uniopt.torch.Adafactor`` is torch's bits at every step (torch's square root is not
    used). On NumPy the reductions are NumPy's pairwise sums, which need not add in torch's
    order: a norm may differ in its last bit, and with it a step. (torch takes ``eps1=None``
    from the first parameter of a group for all; here each leaf's own dtype.)

    Options (the ``convention`` sets them, and the defaults, for the fields not given):

    - ``eps_form="clamp"``: ``v_hat`` floored at ``eps1^2`` and ``mean(R)`` at ``eps1`` (torch);
      ``"add"``: ``eps1`` added to ``g^2`` before the averages, nothing floored (optax, keras).
    - ``relative_step=True``: ``rho = min(lr, 1/sqrt(t))`` (torch, keras); ``False``: ``lr``.
    - ``param_scale=True``: the step has the factor ``max(eps2, rms(p))`` (optax's
      ``multiply_by_parameter_scale``); ``False``: no factor, ``eps2`` unread.
    - ``decay_form="decoupled"``: ``p (1 - lr*weight_decay)``, the parameter scale read from
      ``p`` before it (torch); ``"decoupled_first"``: the same factor applied first, so the
      scale is read from the decayed ``p`` (keras, whose ``apply`` decays every variable
      before its ``update_step``); ``"independent"``: ``p (1 - weight_decay)`` (optax's
      ``weight_decay_rate``).
    - ``min_dim_size_to_factor=1``: a leaf is factored when it has two or more dimensions and
      its second-largest dimension is at least this (optax 128; its ``factored=False`` is a
      threshold above every dimension).
    - ``factored_axes="last"``: the last two axes (torch, keras); ``"largest"`` (optax) the
      two largest, offered only where they are the last two: another leaf is refused at set-up.

    Conventions: ``"torch"`` (the defaults above); ``"optax"``, ``optax.adafactor``: lr 1.0
    (its ``learning_rate=None``), eps ``(1e-30, 1e-3)`` added, no relative step, independent
    decay, factored from 128 over the largest axes (its ``momentum``, ``decay_offset``,
    ``weight_decay_mask`` and ``dtype_momentum`` are not offered, nor its float32 ``t`` in
    ``1 - t^-decay_rate``: ours is the parameters' dtype); ``"keras"``,
    ``keras.optimizers.Adafactor``: lr 1e-3, eps ``(1e-30, 1e-3)`` added (``epsilon_1``,
    ``epsilon_2``), ``beta_2_decay`` and ``clip_threshold`` as ``beta2_decay`` and ``d``; keras's
    ``relative_step=False`` changes nothing in keras 3.15 (it takes ``min(lr, 1/sqrt(t))``
    again for ``rho``), so its row keeps ``relative_step=True``. optax's ``decay_rate`` is
    ``-beta2_decay``, its ``clipping_threshold`` ``d`` (its ``None``, no clipping, is not
    offered; any ``d > 0`` is, where torch asks ``d >= 1``: ``uniopt.torch.Adafactor`` keeps
    torch's check). keras computes in float32 where it can: on its JAX backend ``ops.mean``
    of a float64 array runs in float32 (keras 3.15's ``result_type(float64, float32)`` is
    float32), on its NumPy backend the optimizer's ``velocity`` and the squares are float32;
    with that one mean computed in float64, keras's 100-step trajectories equal ours to
    1e-15.

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.ones((2, 3))}
    >>> state = uo.setup(uo.adafactor(), p)
    >>> sorted(k for k, v in state.slots.items() if v[0] is not None)
    ['scale_by_factored_rms.col_var', 'scale_by_factored_rms.row_var']
    >>> state, p = uo.update(state, p, {"w": np.full((2, 3), 0.5)})
    >>> p["w"][0, 0]  # rms(p) * lr * g/|g|: 1 - 0.01
    np.float64(0.99)
    """

    lr: Any = hyper(1e-2, NONNEG)
    beta2_decay: Any = hyper(-0.8, Interval(None, 0.0))
    eps: tuple[Any, Any] = (None, 1e-3)
    d: Any = hyper(1.0, POSITIVE)
    weight_decay: Any = hyper(0.0, NONNEG)
    eps_form: str = "clamp"
    relative_step: bool = True
    param_scale: bool = True
    decay_form: str = "decoupled"
    min_dim_size_to_factor: int = 1
    factored_axes: str = "last"
    convention: str = "torch"

    conventions: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {},
        "optax": {"lr": 1.0, "eps": (1e-30, 1e-3), "eps_form": "add", "relative_step": False,
                  "decay_form": "independent", "min_dim_size_to_factor": 128,
                  "factored_axes": "largest"},
        "keras": {"lr": 1e-3, "eps": (1e-30, 1e-3), "eps_form": "add",
                  "decay_form": "decoupled_first"},
    }

    info: ClassVar[Info] = Info(
        family="factored",
        paper="Shazeer & Stern (2018)",
        references=("torch.optim.Adafactor", "optax.adafactor", "keras.optimizers.Adafactor"),
        example={"lr": 0.03},
        budget=2000,
        complex=False,
    )

    def check(self) -> None:
        _check_forms(self)
        if self.decay_form not in DECAY_FORMS:
            raise ValueError(f"{self.name}: decay_form must be one of "
                             f"{', '.join(map(repr, DECAY_FORMS))}, got {self.decay_form!r}")
        for flag in ("relative_step", "param_scale"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{self.name}: {flag} must be True or False, "
                                 f"got {getattr(self, flag)!r}")
        if self.convention == "keras" and not self.relative_step:
            # what a port of keras's Adafactor(relative_step=False) writes: keras never
            # produces these numbers
            raise ValueError(f"{self.name}: relative_step=False is not keras's: keras 3 takes "
                             "min(lr, 1/sqrt(t)) whatever its relative_step says; leave it out "
                             "to reproduce keras, or use convention='optax' for lr alone")
        eps = self.eps
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"{self.name}: eps must be a pair (eps1, eps2), got {eps!r}")
        object.__setattr__(self, "eps", tuple(
            check_real(self.name, f"eps[{i}]", e, NONNEG, none="" if i == 0 else None)
            for i, e in enumerate(eps)))

    def parts(self) -> tuple[Transform, ...]:
        return (
            # torch clips in its last step (one scalar, -alpha/denom, for the fused add)
            scale_by_factored_rms(beta2_decay=self.beta2_decay, eps1=self.eps[0], d=self.d,
                                  clip=False, eps_form=self.eps_form,
                                  min_dim_size_to_factor=self.min_dim_size_to_factor,
                                  factored_axes=self.factored_axes),
            scale_by_param_scale(lr=self.lr, eps2=self.eps[1], weight_decay=self.weight_decay,
                                 d=self.d, clip=True, relative_step=self.relative_step,
                                 param_scale=self.param_scale, decay_form=self.decay_form),
        )

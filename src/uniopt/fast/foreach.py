"""The multi-tensor strategy: torch tensors off the CPU, a step in a number of device operations
that does not grow with the number of tensors.

On a GPU every tensor operation is a kernel launch; the reference path runs each part's kernel
on each tensor, some twenty launches per tensor for Adam. Here the rule's own kernels (the
functions the reference path runs, unchanged) run once per set of tensors that share a device
and a dtype, on :class:`Lists`: a list of tensors whose arithmetic, ``xp.sqrt``,
``xp.maximum``... and the shared helpers of :mod:`uniopt.moments` (``fma``, ``lerp``) are each
one ``torch._foreach_*`` call over the whole list, the mechanism torch's own ``foreach``
optimizers use. The new params and slots are written with one ``torch._foreach_copy_`` each.

Why ``_foreach`` and not a generated Triton kernel per chain, or ``torch._foreach_map`` under
``torch.compile``: it needs no compiler and runs wherever torch runs (CUDA, ROCm, XPU, MPS, and
on CPU, where the tests hold it to the reference path with no GPU at hand); each ``_foreach``
op on the CPU is torch's per-tensor op, so there it equals the reference path bit for bit, and
on a GPU it is the same arithmetic in the same order (torch's GPU ``tensor / number`` multiplies
by the reciprocal, its ``_foreach_div`` divides: a last-bit difference). The cost is one pass
over memory per operation where a fused kernel makes one per step; a Triton strategy could be
added after this one, generating its kernel from the same functions.

Value-dependent choices (``select(xp, u > 0, a, b)``: Rprop, optax's Adagrad) become 0/1
masks (``sign`` of the difference, clamped) and ``lerp(b, a, mask)``: exact wherever both
branches are finite. torch's ``sign`` of a NaN is 0, so a NaN compares as 0 does: false for
``>`` and ``<`` (as in the reference path), but true for ``>=``, ``<=`` and ``==`` (which no
kernel uses on values).

A step whose counter is a 0-d tensor on the params' device (``capturable``: what a CUDA graph
replays) computes its coefficients on that device, from the rule's own ``coeffs``, and hands
them to the ``.Tensor`` forms of the ``_foreach`` ops: nothing is read back to the host. A
rule whose ``coeffs`` needs the host (a Python branch on the step) is refused with an error that
names its part.

float16 and bfloat16 params compute in float32, as on the reference path and the compiled
loop, their slots kept in their dtype or in float32 (``state_dtype="float32"``): each 16-bit
list is widened into float32 temporaries made of one allocation (viewed as each tensor: a view
is no device operation, but costs the host about a microsecond a tensor) by one converting
``torch._foreach_copy_``, and written back, rounded once to the nearest, by another. The
numbers are the reference path's bit for bit, and torch's fused Adam's way of computing (in
float32) rather than its foreach Adam's (each operation rounded to bfloat16).

Not taken here (the reference path runs them, after a one-time warning): per-leaf and
whole-tree parts, parts that need a norm (``clip_by_global_norm``), and slots kept in a dtype
other than the params' or their compute dtype's.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import backend
from ..base import Elementwise, members
from ..hyper import has_schedule
from ..moments import Batch
from .options import FORCED

aten = torch.ops.aten
Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]  # what the _foreach ops take and give
Number = (int, float, bool)

# steps run by this strategy in this process (tests assert that it ran)
STEPS = 0

@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Steps in this context take the multi-tensor path for torch tensors on every device, the
    CPU included (where the compiled loop takes them otherwise): ``uniopt.torch``'s
    ``foreach=True``, and how the tests hold this path to the reference path without a GPU."""
    token = FORCED.set(True)
    try:
        yield
    finally:
        FORCED.reset(token)


def _scalar(x: Any) -> bool:
    return isinstance(x, Number) or (hasattr(x, "dtype") and not isinstance(x, torch.Tensor)
                                     and getattr(x, "ndim", 1) == 0)


class Lists(Batch):
    """Same-device, same-dtype tensors computed as one operand: every operation is one
    ``torch._foreach_*`` call. The other operand may be another :class:`Lists` of the same
    length, a number, or a 0-d tensor (a coefficient computed on the device)."""

    __slots__ = ("ts",)
    __array_priority__ = 1000  # NumPy scalars hand their operators to ours

    def __init__(self, ts: Tensors) -> None:
        self.ts = ts

    def __len__(self) -> int:
        return len(self.ts)

    def _binary(self, other: Any, name: str) -> Lists:
        fn = getattr(torch, f"_foreach_{name}")
        if isinstance(other, Lists):
            return Lists(fn(self.ts, other.ts))
        if isinstance(other, torch.Tensor):
            # named: torch's binding would pick the Scalar overload for a 0-d tensor and read
            # it on the host (a synchronisation)
            return Lists(getattr(aten, f"_foreach_{name}").Tensor(self.ts, other))
        if _scalar(other):
            return Lists(fn(self.ts, float(other)))
        return NotImplemented

    def __add__(self, other: Any) -> Lists:
        return self._binary(other, "add")

    __radd__ = __add__

    def __sub__(self, other: Any) -> Lists:
        if isinstance(other, torch.Tensor):  # no .Tensor form of _foreach_sub: x + (-1)*t
            return Lists(aten._foreach_add.Tensor(self.ts, other, alpha=-1))
        return self._binary(other, "sub")

    def __rsub__(self, other: Any) -> Lists:
        return (-self)._binary(other, "add")  # s + (-x) is s - x exactly

    def __mul__(self, other: Any) -> Lists:
        return self._binary(other, "mul")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Lists:
        return self._binary(other, "div")

    def __rtruediv__(self, other: Any) -> Lists:
        # torch's number / tensor: the tensor's reciprocal times the number
        return Lists(torch._foreach_reciprocal(self.ts))._binary(other, "mul")

    def __neg__(self) -> Lists:
        return Lists(torch._foreach_neg(self.ts))

    def __pos__(self) -> Lists:
        return self

    def __abs__(self) -> Lists:
        return Lists(torch._foreach_abs(self.ts))

    def __pow__(self, other: Any) -> Lists:
        if isinstance(other, torch.Tensor):
            return NotImplemented
        return Lists(torch._foreach_pow(self.ts, other.ts if isinstance(other, Lists)
                                        else float(other)))

    # comparisons are 0/1 masks of the lists' dtype, from the sign of the difference (a NaN
    # has sign 0 in torch: it compares as 0 does, see the module's docstring)
    def _sign_of_difference(self, other: Any) -> Lists:
        d = self if _scalar(other) and float(other) == 0 else self - other
        return Lists(torch._foreach_sign(d.ts))

    def __gt__(self, other: Any) -> Lists:
        return Lists(torch._foreach_clamp_min(self._sign_of_difference(other).ts, 0.0))

    def __lt__(self, other: Any) -> Lists:
        return Lists(torch._foreach_clamp_min((-self._sign_of_difference(other)).ts, 0.0))

    def __ge__(self, other: Any) -> Lists:
        return 1.0 - (self < other)

    def __le__(self, other: Any) -> Lists:
        return 1.0 - (self > other)

    def __ne__(self, other: Any) -> Lists:  # type: ignore[override]
        return abs(self._sign_of_difference(other))

    def __eq__(self, other: Any) -> Lists:  # type: ignore[override]
        return 1.0 - (self != other)

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        raise TypeError("uniopt: a kernel branched on the values of its arrays; use "
                        "uniopt.moments.select")

    # --- the shared helpers' fused forms (uniopt.moments) ------------------------------------

    def fma(self, a: Any, b: Any) -> Lists:
        """``self + a*b``, as torch's ``add(self, b, alpha=a)`` / ``addcmul(self, a, b)``."""
        if not isinstance(b, Lists):
            return NotImplemented
        if isinstance(a, Lists):
            return Lists(torch._foreach_addcmul(self.ts, a.ts, b.ts))
        if isinstance(a, torch.Tensor):  # addcmul(self, a, b) with a 0-d a: a*b, then the sum
            return self + b * a
        return Lists(torch._foreach_add(self.ts, b.ts, alpha=float(a)))

    def lerp(self, end: Any, w: Any) -> Lists:
        """``self + w (end - self)``, as torch's ``lerp``."""
        if isinstance(end, Lists) and isinstance(w, Lists):
            return Lists(torch._foreach_lerp(self.ts, end.ts, w.ts))
        if isinstance(end, Lists) and _scalar(w):
            return Lists(torch._foreach_lerp(self.ts, end.ts, float(w)))
        return self + w * (end - self)  # a weight on the device: lerp's formula, two roundings


class Namespace:
    """The ``xp`` a kernel sees on :class:`Lists`: the functions kernels may call."""

    __name__ = "uniopt.fast.foreach"

    @staticmethod
    def sqrt(x: Lists) -> Lists:
        return Lists(torch._foreach_sqrt(x.ts))

    @staticmethod
    def abs(x: Lists) -> Lists:
        return Lists(torch._foreach_abs(x.ts))

    @staticmethod
    def sign(x: Lists) -> Lists:
        return Lists(torch._foreach_sign(x.ts))

    @staticmethod
    def maximum(a: Any, b: Any) -> Lists:
        return _extremum(a, b, "maximum")

    @staticmethod
    def minimum(a: Any, b: Any) -> Lists:
        return _extremum(a, b, "minimum")

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        """``a`` where ``cond`` else ``b`` (``cond``: a 0/1 mask list, or a 0-d tensor on the
        device), exact wherever both are finite."""
        if isinstance(cond, Lists):
            like = cond
            return Lists(torch._foreach_lerp(_full(b, like).ts, _full(a, like).ts, cond.ts))
        if isinstance(cond, torch.Tensor):
            w = cond.to(_dtype_of(a, b))
            return a * w + b * (1 - w)  # a*1 + b*0 is a, a*0 + b*1 is b
        raise TypeError(f"uniopt.fast.foreach: where's condition is a {type(cond).__name__}")


def _dtype_of(*xs: Any) -> torch.dtype:
    for x in xs:
        if isinstance(x, Lists):
            return x.ts[0].dtype
    return torch.get_default_dtype()


def _full(x: Any, like: Lists) -> Lists:
    """``x`` as a list shaped as ``like`` (a 0/1 mask): itself where it is a list."""
    if isinstance(x, Lists):
        return x
    return Lists(torch._foreach_mul(like.ts, 0.0)) + x  # 0*mask + x is x


def _extremum(a: Any, b: Any, name: str) -> Lists:
    if not isinstance(a, Lists):
        a, b = b, a
    if isinstance(b, Lists):
        return Lists(getattr(torch, f"_foreach_{name}")(a.ts, b.ts))
    if isinstance(b, torch.Tensor):
        raise TypeError(f"uniopt.fast.foreach: {name} with a coefficient on the device "
                        "(torch has no such _foreach form)")
    return Lists(getattr(torch, f"_foreach_{name}")(a.ts, float(b)))


XP = Namespace()

_FLOATS = (torch.float32, torch.float64)
# params of these dtypes compute in float32 (the engine's _compute_dtype)
_NARROW = (torch.float16, torch.bfloat16)


class _NoSync(TorchDispatchMode):
    """Fails on a read of a tensor's value by the host (``.item()``, ``bool(t)``, ``float(t)``,
    a Python branch on a tensor)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func is aten._local_scalar_dense.default:
            raise _HostRead()
        return func(*args, **(kwargs or {}))


class _HostRead(RuntimeError):
    pass


def check_capturable(rule: Any, at: torch.Tensor) -> None:
    """Raise where a part of ``rule`` computes its coefficients at step tensor ``at`` on the
    host, reading a number back: its step cannot be captured in a graph."""
    # (by the names the user gave: a rule's parts hold them folded, adamw's lr as folded_lr)
    scheduled = [k for _, m in members(rule) for k, v in m.hyperparameters().items()
                 if has_schedule(v)]
    if scheduled:
        # (its value is checked against the part's ranges on the host at every step)
        raise TypeError(
            f"uniopt: {rule.name}'s {scheduled[0]} is a uniopt schedule, whose value is "
            "read on the host at each step to be checked, so the step cannot be captured "
            "in a graph (capturable=True); give a number, or a tensor lr that a torch "
            "lr_scheduler drives, as torch's capturable optimizers take it")
    for part in rule.flat_parts:  # each on its own: the error names the part
        try:
            with _NoSync():
                part.at(at).coeffs(at)
        except _HostRead:
            raise TypeError(
                f"uniopt: {rule.name}'s part {part.name} computes its coefficients on the host "
                "(a Python branch on the step, or a number read from it), so its step cannot "
                "be captured in a graph (capturable=True); the rules whose coefficients are "
                "arithmetic on the step (Adam, AdamW, SGD, ...) can"
            ) from None


def capturable(rule: Any) -> bool:
    """Whether :func:`check_capturable` lets ``rule`` step with its count on the device (kept
    in the rule's memo, where a step that passed it notes so too)."""
    ok = rule.memo.get("foreach-device")
    if ok is None:
        try:
            check_capturable(rule, torch.ones((), dtype=torch.float64))
            ok = True
        except TypeError:
            ok = False
        rule.memo["foreach-device"] = ok
    return bool(ok)


def _resolved(resolve: Callable[[], Any], memo: dict[Any, Any] | None) -> Any:
    """The resolved plan. With the step counter a tensor on the device, checked (once per
    rule) to compute its coefficients without reading anything back to the host."""
    args: tuple[Any, ...] = getattr(resolve, "args", ())
    if (len(args) < 2 or not isinstance(args[1], torch.Tensor)
            or (memo is not None and memo.get("foreach-device"))):
        return resolve()
    check_capturable(*args[:2])
    if memo is not None:
        memo["foreach-device"] = True
    return resolve()


def _group(params: list[Any]) -> dict[tuple[Any, Any], list[int]]:
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return groups


_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")


def _matches(xs: list[Any], params: list[Any], slot: bool = False) -> bool:
    """Whether every ``xs[i]`` is a dense tensor laid out as ``params[i]``, of its dtype (a
    ``slot`` of a 16-bit parameter: or of float32, its compute dtype): the engine's reference
    path says what is wrong otherwise."""
    if len(xs) != len(params) or not all(isinstance(x, torch.Tensor) for x in xs):
        return False
    dtypes = list(map(_DTYPE, xs))
    expected = list(map(_DTYPE, params))
    if dtypes != expected and not (slot and all(
            d == e or (d == torch.float32 and e in _NARROW)
            for d, e in zip(dtypes, expected, strict=True))):
        return False
    return (list(map(_SHAPE, xs)) == list(map(_SHAPE, params))
            and list(map(_DEVICE, xs)) == list(map(_DEVICE, params))
            and all(x.layout == torch.strided for x in xs))


def step(
    resolve: Callable[[], list[tuple[Any, Any, tuple[str, ...]]]],
    params: list[Any],
    grads: list[Any],
    slots: dict[str, list[Any]],
    inplace: bool,
    memo: dict[Any, Any] | None = None,
    per_leaf: Any = None,
) -> tuple[list[Any], dict[str, list[Any]]] | str | None:
    """The engine's strategy entry (see :mod:`uniopt.fast`): one step over torch tensors off
    the CPU (on the CPU too in :func:`forced`); None where these are not such tensors, a
    reason where it declined, having written nothing. (``per_leaf``: unused; tensors with
    per-leaf parts take the reference path.)"""
    first = params[0]
    if not isinstance(first, torch.Tensor):
        return None
    if first.device.type == "cpu" and not FORCED.get():
        return None  # the compiled loop's
    if not _matches(params, params) or not _matches(grads, params):
        return None
    if any(not _matches(v, params, slot=True) for v in slots.values()):
        return None
    if any(p.is_complex() for p in params):
        return None  # the engine takes complex params as pairs of reals, and comes back
    dtypes = set(map(_DTYPE, params))
    if not dtypes <= {*_FLOATS, *_NARROW}:
        return None  # (integers: the engine's reference path says why not)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        ctx: contextlib.AbstractContextManager[Any] = torch.no_grad()
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        plan = _resolved(resolve, memo)
        for part, _, _ in plan:
            if not isinstance(part, Elementwise):
                return "a part that is not elementwise (per-leaf parts run on the reference path)"
            if part.needs_norm:
                return (f"{part.name} needs a norm of the updates (computed in float64 on the "
                        "reference path)")
        new_params: list[Any] = list(params)
        new_slots = {k: list(v) for k, v in slots.items()}
        for (_, dtype), idx in _group(params).items():
            def pick(xs: list[Any], idx: list[int] = idx) -> list[Any]:
                return xs if len(idx) == len(xs) else [xs[i] for i in idx]

            run = _run_wide if dtype in _NARROW else _run
            p_out, s_out = run(plan, Lists(pick(params)), Lists(pick(grads)),
                               {k: Lists(pick(v)) for k, v in slots.items()}, dtype, inplace)
            if not inplace:
                for j, i in enumerate(idx):
                    new_params[i] = backend.like_leaf(p_out.ts[j], params[i])
                    for k, v in s_out.items():
                        new_slots[k][i] = v.ts[j]
    global STEPS
    STEPS += 1
    if inplace:
        return params, slots
    return new_params, new_slots


def _kernels(plan: list[tuple[Any, Any, tuple[str, ...]]], p: Lists, u: Lists,
             slots: dict[str, Lists], stored: Any) -> tuple[Lists, dict[str, Lists]]:
    """Every part's kernel on lists of one device and dtype (the params' ``stored`` dtype, or
    float32 for 16-bit ones): the new params and the slots the kernels made."""
    compute = p.ts[0].dtype
    new: dict[str, Lists] = {}
    last = len(plan) - 1
    p_new = None
    for j, (part, c, keys) in enumerate(plan):
        if part.by_dtype:  # the stored dtype, as the engine gives it (16-bit: computed wider)
            c = part.for_dtype(c, stored)
        c = _on(c, p.ts[0].device, compute)
        ins = [new.get(k, slots[k]) for k in keys]
        out = part.kernel(XP, c, p, u, *ins)
        outs = [_as_lists(o, p) for o in out]
        if j == last and part.finish is not None:
            p_new = _as_lists(part.finish(XP, c, p, u, *outs[1:]), p)
        u = outs[0]
        new.update(zip(keys, outs[1:], strict=True))
    return (p - u if p_new is None else p_new), new


def _write(p: Lists, slots: dict[str, Lists], p_new: Lists, new: dict[str, Lists],
           read: dict[str, Lists]) -> None:
    """The new params and slots into the old ones, in place (``read``: the slot lists the
    kernels read, the old ones or their float32 copies), each rounded once to its dtype."""
    # a new slot that is the old value of an array written here (a parameter, another slot)
    # is copied first: the reference path computes every value before any write
    written = [p, *(slots[k] for k, s in new.items() if s is not read[k])]
    for k, s in new.items():
        if s is not read[k] and any(s is w for w in written):
            new[k] = Lists(torch._foreach_mul(s.ts, 1.0))
    torch._foreach_copy_(p.ts, p_new.ts)
    for k, s in new.items():
        if s is not read[k]:
            torch._foreach_copy_(slots[k].ts, s.ts)


def _run(plan: list[tuple[Any, Any, tuple[str, ...]]], p: Lists, u: Lists,
         slots: dict[str, Lists], dtype: Any, inplace: bool) -> tuple[Lists, dict[str, Lists]]:
    """Every part's kernel, then the writes, for one set of tensors of one device and dtype."""
    p_new, new = _kernels(plan, p, u, slots, dtype)
    if inplace:
        _write(p, slots, p_new, new, slots)
        return p, slots
    # a pure step hands back no array it was given (a slot a kernel kept, a gradient kept)
    inputs = (p, u, *slots.values())
    fresh = {k: Lists(torch._foreach_mul(s.ts, 1.0)) if any(s is x for x in inputs) else s
             for k, s in new.items()}
    return p_new, {**slots, **fresh}


def _run_wide(plan: list[tuple[Any, Any, tuple[str, ...]]], p: Lists, u: Lists,
              slots: dict[str, Lists], dtype: Any, inplace: bool
              ) -> tuple[Lists, dict[str, Lists]]:
    """:func:`_run` for 16-bit params: the kernels on float32 copies of the params, the
    gradients and the 16-bit slots (float32 slots as they are), the results rounded once
    into the params' and the slots' dtypes."""
    wide = {k: s if s.ts[0].dtype == torch.float32 else _converted(s, torch.float32)
            for k, s in slots.items()}
    p_new, new = _kernels(plan, _converted(p, torch.float32), _converted(u, torch.float32),
                          wide, dtype)
    if inplace:
        _write(p, slots, p_new, new, wide)
        return p, slots
    # fresh arrays in the stored dtypes; a float32 slot handed back as it was given is copied
    given = (u, *slots.values())
    out = {k: (_converted(s, slots[k].ts[0].dtype) if slots[k].ts[0].dtype != torch.float32
               else Lists(torch._foreach_mul(s.ts, 1.0)) if any(s is x for x in given) else s)
           for k, s in new.items()}
    return _converted(p_new, dtype), {**slots, **out}


def _converted(x: Lists, dtype: Any) -> Lists:
    """New tensors shaped as ``x``'s, of ``dtype``, holding its values (rounded to nearest):
    one allocation for them all, viewed as each tensor, and one ``_foreach_copy_``."""
    flat = torch.empty(sum(map(torch.Tensor.numel, x.ts)), dtype=dtype, device=x.ts[0].device)
    ts = torch._utils._unflatten_dense_tensors(flat, list(x.ts))
    torch._foreach_copy_(ts, x.ts)
    return Lists(ts)


def _on(c: Any, device: Any, dtype: Any) -> Any:
    """Coefficients computed on a device (from a step counted there), on the lists' device and
    in their dtype: torch rounds a Python number to that dtype alike, and its ``.Tensor`` forms
    want it."""
    def moved(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        return x if x.dtype == dtype and x.device == device else x.to(device, dtype)

    if not any(isinstance(x, torch.Tensor) for x in c):
        return c
    values = list(map(moved, c))
    return type(c)(*values) if hasattr(c, "_fields") else tuple(values)


def _as_lists(x: Any, like: Lists) -> Lists:
    if isinstance(x, Lists):
        return x
    return Lists(torch._foreach_mul(like.ts, 0.0)) + x  # a kernel's constant output



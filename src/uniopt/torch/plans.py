"""A param group's step plan: which parameters each engine call updates, and what it is handed.

A plan is built when anything about its group changes and re-checked by identity at every step
(the parameters, their storage, which have gradients, their state dicts and slots). CPU float
tensors reach the engine as NumPy views of their memory, made once per plan for parameters and
slots, so the compiled loop writes them in place; other tensors reach it as they are. Gradients,
new tensors at every step (``zero_grad()``'s default), reach it by the addresses of their memory
(:func:`addresses`: a few C calls per tensor where a view costs about 0.8 us); bfloat16 ones as
views (:func:`uniopt.backend.numpy_views`). A small group knows the last step's gradients
again while they are the same tensors, holding them weakly (:class:`SeenGrads`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import weakref
from collections import defaultdict
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from .. import backend, fast, quant
from ..base import Combinator, Elementwise, Minimizer, Transform, WholeTree
from ..engine import (
    LEAF_NAMES,
    NO_RECORDED_Q8,
    _real_only,
    check_state_dtype,
    check_step,
    fixed_parts,
    flat_list_def,
    global_norm_parts,
    resolve,
    setup,
    shared_norms,
    tree_leaves,
    update_,
)
from ..interop import dtensor
from ..state import State

_DATA_PTR = torch.Tensor.data_ptr
# whether a tensor is a torch.func transform's wrapper (no memory of its own)
WRAPPED = torch._C._functorch.is_functorch_wrapped_tensor
_STRIDE = torch.Tensor.stride
_NUMEL = torch.Tensor.numel
_CONTIGUOUS = torch.Tensor.is_contiguous
# a tensor's TensorImpl, by address: how a plan knows the last step's gradients again without
# a reference to them (torch.utils.swap_tensors, as Module.to() calls it under
# swap_module_params_on_conversion, refuses a tensor that has a weak one)
_IMPL = operator.attrgetter("_cdata")
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
# what a gradient must be to go by address, read in one C call: its class (a subclass's
# data_ptr may not be its memory), dtype, whether on the CPU, and shape
_KIND = operator.attrgetter("__class__", "dtype", "is_cpu", "shape")

# a plan of fewer gradients than this takes their views: checking a tensor and taking its
# address costs about 0.37 us where a view costs 0.56, but the checks cost some 2 us a step
# where the views cost 1.2 (measured on a step's fast_grads: equal at about 5 tensors)
ADDRESS_MIN = 6

# the dtypes whose gradients reach the compiled loop by address (backend.Addressed), with
# their NumPy views' dtypes; bfloat16's views are of its bits, made as views
_ADDRESSED = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
              torch.float16: np.dtype(np.float16)}

# a plan whose gradients hold at most this many elements knows the last step's gradients
# again (:class:`SeenGrads`), where their checks (about 0.6 us per tensor) are a fair part of
# the step; a bigger model's step is its arithmetic. It keeps their NumPy views, which hold
# them, only up to KEEP_VIEWS elements: 128 KB of float32, under the C allocator's threshold
# for memory of its own (a larger gradient held past zero_grad() makes the next backward's
# new gradient fresh memory, page by page)
KEEP_GRADS = 1 << 20
KEEP_VIEWS = 1 << 15
# nor of more gradients than this: each is looked at by its TensorImpl at every step (when
# each was held by a weak reference, 10,000 of those a step also set off the garbage
# collector's passes: W4's step took 13-14 ms without them, 14-15 with)
KEEP_TENSORS = 256

# how the engine sees a parameter: ("np", None) a NumPy view, ("np", perm) a NumPy view of the
# parameter permuted into memory order, ("torch", None) the tensor itself, ("tracked", None) the
# tensor itself in a step autograd records (differentiable=True)
Spec = tuple[str, tuple[int, ...] | None]
PLAIN: Spec = ("np", None)
TRACKED: Spec = ("tracked", None)

# (uniopt key, state name) of each slot of a rule
SlotNames = list[tuple[str, str]]

# with state_dtype="q8" a slot is two tensors in the parameter's state: its codes under the
# slot's name (int8 or uint8, shaped as the parameter) and its block scales under this suffix
ABSMAX = ".absmax"


def is_q8(group: dict[str, Any]) -> bool:
    return group.get("state_dtype") == "q8"


class Versioned(defaultdict[Any, Any]):
    """torch's ``Optimizer.state`` (a defaultdict of per-parameter dicts) counting its own
    changes, so a step tells in one comparison that no parameter's dict was replaced or
    removed: looking each one up would hash every tensor, in Python (``Tensor.__hash__``)."""

    version = 0

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, key: Any, value: Any) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._changed()
        super().__delitem__(key)

    def __ior__(self, other: Any) -> Versioned:  # type: ignore[misc]
        self._changed()
        super().update(other)
        return self

    def __missing__(self, key: Any) -> Any:
        self._changed()
        return super().__missing__(key)


def _versioned_method(name: str) -> Any:
    def method(self: Versioned, *args: Any, **kwargs: Any) -> Any:
        self._changed()
        return getattr(defaultdict, name)(self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in ("clear", "pop", "popitem", "setdefault", "update"):
    setattr(Versioned, _name, _versioned_method(_name))


def seen_as(state: Any) -> tuple[Any, int | None]:
    """A note of ``state`` as it is now, for :func:`unchanged`: the state and its count of
    changes (None where it counts none)."""
    return state, getattr(state, "version", None)


def unchanged(seen: tuple[Any, int | None] | None, state: Any) -> bool:
    """Whether ``state`` is the one ``seen`` (:func:`seen_as`) noted, with nothing replaced or
    removed since; never for a state that does not count its changes."""
    return (seen is not None and seen[0] is state and seen[1] is not None
            and seen[1] == getattr(state, "version", None))


def real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as torch's optimizers treat them: real and imaginary parts as pairs."""
    return torch.view_as_real(t) if t.is_complex() else t


# dtypes whose CPU tensors the engine sees as NumPy views (bfloat16: of its bits, which only the
# compiled loop reads; see build)
_VIEWED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def spec(p: torch.Tensor) -> Spec:
    """How the engine sees parameter ``p``: a NumPy view (CPU float32/float64/float16, and
    bfloat16 as its bits; dense), in memory order if its strides are permuted (channels_last),
    or else the tensor itself."""
    t = real(dtensor.local(p).detach())  # a DTensor: its local shard
    if t.device.type == "cpu" and t.dtype in _VIEWED:
        if t.is_contiguous():
            return PLAIN
        strides = t.stride()
        perm = tuple(sorted(range(t.dim()), key=lambda d: -strides[d]))
        if t.permute(perm).is_contiguous():
            return ("np", perm)
    return ("torch", None)


def _view(t: torch.Tensor, spec: Spec) -> Any:
    """What the engine gets for ``t`` (a parameter or a slot laid out as its parameter)."""
    if spec == TRACKED:
        # made with autograd on, as the step that writes through it runs: a view made without
        # it may not be written in place where autograd records (torch refuses the copy)
        with torch.enable_grad():
            return real(t)
    t = real(dtensor.local(t).detach())
    kind, perm = spec
    if kind == "torch":
        return t
    if perm is not None:
        t = t.permute(perm).view(-1)
    return backend.unpinned_view(t)


def _slot_view(t: torch.Tensor | None, spec: Spec) -> Any:
    """:func:`_view` of a slot; None where the parameter keeps no such slot."""
    return None if t is None else _view(t, spec)


def _q8_view(st: dict[str, Any], name: str, spec: Spec, p: torch.Tensor) -> Any:
    """The engine's 8-bit slot ``name`` of parameter ``p``'s state ``st``; None where it keeps
    none. A DTensor's: its local codes, and its scales in this rank's row."""
    codes = st.get(name)
    if codes is None:
        return None
    absmax = st[name + ABSMAX]
    if dtensor.is_dtensor(absmax):
        absmax = dtensor.local_scales(absmax, p)
    return quant.Q8(_view(codes, spec), _view(absmax, spec))


def _grad_view(g: torch.Tensor, p: torch.Tensor, spec: Spec) -> Any:
    """The engine's view of gradient ``g`` of ``p``, laid out as ``p``'s view (copied when it is
    laid out otherwise); a sparse ``g`` made dense, a ZeroTensor zeros."""
    if g.layout == torch.sparse_coo:
        g = g.coalesce().to_dense()
    if spec == TRACKED:
        with torch.enable_grad():  # recorded: the step's result depends on it
            return real(g)
    if spec[0] == "torch" and not (g.requires_grad or g.is_complex() or g.is_conj()
                                   or g.is_neg()):
        return g  # as it is: a detach would be a device operation per tensor
    g = real(g.detach().resolve_conj().resolve_neg())
    kind, perm = spec
    if kind == "torch":
        return g
    if g._is_zerotensor():  # no memory to view
        g = torch.zeros(g.shape, dtype=g.dtype)
    if perm is None:
        return backend.numpy_view(g if g.is_contiguous() else g.contiguous())
    pr = real(dtensor.local(p).detach())
    if g.stride() != pr.stride():
        g = torch.empty_like(pr).copy_(g)
    return backend.numpy_view(g.permute(perm).view(-1))


def follow(rule: Transform, before: tuple[torch.Tensor, ...], ps: list[torch.Tensor],
           state: MutableMapping[Any, Any]) -> None:
    """The states of ``rule``'s whole-tree parts, made for the group's parameters in the order
    ``before``, put in the order of ``ps`` where that is a reordering of them (kept by the
    first parameter, their per-leaf lists in its order), as torch's state keyed by parameter
    follows a reorder: stepped as they were, each parameter took another's moments (two
    swapped after the first: silently; the first moved: refused)."""
    if len(before) != len(ps) or {*map(id, before)} != {*map(id, ps)}:
        return  # (one added or removed: refused, a state over the group cannot take it)
    held = state.get(before[0])
    if not held:
        return
    at = {id(p): i for i, p in enumerate(before)}
    order = [at[id(p)] for p in ps]
    moved = {}
    for part, keys in rule.keyed_parts:
        if not isinstance(part, WholeTree) or isinstance(part, Minimizer):
            continue  # (L-BFGS's state is flat vectors of every parameter, as torch's is)
        tree = held.get(keys[0])
        if isinstance(tree, dict):
            # (every list of such a state is one entry per leaf: Prodigy's p0, Kron's Q,
            # GaLore's projectors; an optax transformation's, which keeps other containers,
            # steps no tensors; a noise draw's generator is no dict)
            moved[keys[0]] = {k: [v[i] for i in order]
                              if isinstance(v, list) and len(v) == len(order) else v
                              for k, v in tree.items()}
    if not moved:
        return
    for k in moved:
        del held[k]
    if ps[0] not in state:
        state[ps[0]] = {}
    state[ps[0]].update(moved)


def _refuse_tree_of_others(rule: Transform, gi: int, ps: list[torch.Tensor],
                           state: Mapping[Any, Any], count: int) -> None:
    """Raise where the state of a part over the group's parameters (kept by the first one)
    was made for other parameters: the first removed from ``params`` (or the params
    reordered), so that the next one started the state afresh, Prodigy's estimate of d at
    d0 again; or another removed, and the step failed in ``zip()``, after the groups before
    had stepped."""
    held = state.get(ps[0], {})
    for part, keys in rule.keyed_parts:
        if not (isinstance(part, WholeTree) and not isinstance(part, Minimizer)
                and (part.like_params or part.uses_params)):
            continue
        tree = held.get(keys[0])
        if tree is None and count:
            keeper = next((i for i, p in enumerate(ps) if keys[0] in state.get(p, {})), None)
            raise ValueError(
                f"parameter 0 of param group {gi} has taken {count} steps but holds no state "
                f"of {rule.name}'s {part.name}, which the group's first parameter keeps "
                + (f"(parameter {keeper} holds it: the params were reordered)" if keeper
                   else "(the parameter that held it was removed from the group's params)")
                + f": that state spans the group's parameters as they were; put it back, or "
                f"{_ANEW}")
        made = next((len(tree[e]) for e in part.like_params if isinstance(tree, dict)
                     and isinstance(tree.get(e), list)), None)
        if made is not None and made != len(ps):
            raise ValueError(
                f"param group {gi} has {len(ps)} parameter(s), but the state of {rule.name}'s "
                f"{part.name} (kept by its first parameter) spans {made}: one removed from "
                f"the group's params since; put it back, or {_ANEW}")


_ANEW = ("start the whole group anew (every one of its parameters' entries removed from "
         "optimizer.state)")


def refuse(rule: Transform, gi: int, group: dict[str, Any], has: list[bool],
           recorded: bool, state: Mapping[Any, Any] | None = None, given: bool = True) -> None:
    """Raise what a new plan of group ``gi`` (``has``: which parameters step) is refused for,
    before any group steps (called for every group first): a complex parameter with a rule
    that takes real params only (the engine sees the real pairs, so its own refusal at set-up
    never runs) or in an 8-bit group; a parameter or gradient of a torch.func transform in an
    unrecorded group; a parameter without a gradient where a whole-tree part needs every one;
    a recorded 8-bit step; and ``capturable=True`` for parameters off the CPU where the rule
    computes its numbers on the host (``given``: whether the optimizer was made with it); with
    ``state`` (the optimizer's), parameters at different step counts where such a part's state
    spans the group. ``recorded``: whether autograd records the step (:func:`recorded`)."""
    at = next((i for i, p in enumerate(group["params"]) if has[i] and p.is_complex()), None)
    if at is not None:
        real = _real_only(rule)
        if real is not None:
            raise TypeError(f"{real}; parameter {at} of param group {gi} is complex")
    if not recorded:
        lifted = next((f"{what} {i}" for i, p in enumerate(group["params"]) if has[i]
                       for what, t in (("parameter", p), ("the gradient of parameter", p.grad))
                       if t is not None and WRAPPED(t)), None)
        if lifted is not None:
            # (torch's own classes step such a tensor unrecorded, under grad or jvp a
            # derivative of 0)
            raise RuntimeError(
                f"{lifted} of param group {gi} is a tensor of a torch.func transform (grad, jvp, "
                "vmap...), without memory the compiled step could write and whose derivative "
                "an unrecorded step would lose; make the optimizer with differentiable=True, "
                "which steps such tensors themselves")
    # (a combinator that is the whole rule hands a parameter without a gradient to its member
    # as None, which steps it as a rule alone does: a frozen layer under a partition)
    alone = len(rule.flat_parts) == 1 and isinstance(rule.flat_parts[0], Combinator)
    # (parts that see the group's parameters at once: a state over them, Prodigy's, or a
    # number made of them all, Polyak's step size, a noise draw; a minimizer, L-BFGS's, steps
    # the group itself)
    spans = [part for part, _ in rule.keyed_parts
             if isinstance(part, WholeTree) and not isinstance(part, Minimizer)]
    wholes = [part for part in spans if part.like_params or part.uses_params
              or type(part).check_tree is not WholeTree.check_tree]
    missing = [i for i, h in enumerate(has) if not h]
    if wholes and missing and not alone:
        # (such a part keeps an array per parameter, or reads every parameter, beside the
        # gradients it is handed: a parameter without one failed in zip(), mid-step)
        raise ValueError(
            f"parameter(s) {missing} of param group {gi} have no gradient: {rule.name}'s "
            f"{wholes[0].name} steps the group's parameters together (a state or a norm over "
            "every one of them); give each a gradient, or put those without one in a group of "
            "their own")
    if spans and state is not None and not alone:
        # (a step splits a group into runs by count, and each run stepped such a part anew:
        # a state over every parameter handed to each run, the first writing its parameters
        # before the second failed; a Polyak step size of each run's own gradients)
        by_count: dict[int, list[int]] = {}
        for i, (p, h) in enumerate(zip(group["params"], has, strict=True)):
            if h:
                by_count.setdefault(state_step(state.get(p, {})), []).append(i)
        if len(by_count) > 1:
            said = "; ".join(f"{c} by parameter(s) {ix}" for c, ix in by_count.items())
            raise ValueError(
                f"the parameters of param group {gi} have taken different numbers of steps "
                f"({said}: one appended to the group's params, one's state reset, or one "
                f"without a gradient at an earlier step): {rule.name}'s {spans[0].name} steps "
                "the group's parameters together; give each a gradient at every step, new "
                f"parameters a group of their own (add_param_group), or {_ANEW}")
        if wholes and by_count:
            _refuse_tree_of_others(rule, gi, group["params"], state, next(iter(by_count)))
    if at is not None and is_q8(group):  # (a KeyError for its absent scales, mid-plan)
        raise ValueError(
            f"parameter {at} of param group {gi} is complex: state_dtype='q8' keeps the state "
            "of real parameters in 8 bits; put complex parameters in a group of their own, "
            "without it")
    sd = group.get("state_dtype")
    if at is not None and sd in ("float32", "float64"):
        odd = next((i for i, p in enumerate(group["params"]) if has[i] and p.is_complex()
                    and p.real.dtype != getattr(torch, sd)), None)
        if odd is not None:  # (its slots are made complex, the step's state of real ones)
            raise ValueError(
                f"parameter {odd} of param group {gi} is complex "
                f"({group['params'][odd].dtype}): state_dtype={sd!r} keeps the state of real "
                "parameters in another dtype, as the functional API's set-up takes it for real "
                "params only; put complex parameters in a group of their own, without it")
    if recorded and is_q8(group):
        raise ValueError(f"param group {gi}: {NO_RECORDED_Q8}")
    if group.get("capturable") and (recorded or multi_tensor(group)) and any(
            h and p.device.type != "cpu" for p, h in zip(group["params"], has, strict=True)):
        # (here, before any state is made, where the multi-tensor path's own check came after;
        # the recorded step takes no such path. On the CPU no graph is captured: a rule that
        # cannot count there steps with the host's count, see Plan._calls)
        from ..fast.foreach import check_capturable

        try:
            check_capturable(rule, torch.ones(()))
        except TypeError as e:
            raise TypeError(f"{e} (param group {gi})" if given else
                            f"{e}. Param group {gi} {_SET_CAPTURABLE}") from None


# why a group holds capturable=True that its optimizer was not made with, and what to do
_SET_CAPTURABLE = (
    "holds capturable=True, which the optimizer was not made with: torch.compile writes it "
    "into every param group (dynamo's _set_capturable) when a compiled function writes a "
    "group value (group['lr'] = ...) and calls opt.step(); write group values outside the "
    "compiled function (a scheduler's step() is fine), and set group['capturable'] = False")


def multi_tensor(group: dict[str, Any]) -> bool:
    """Whether the group asks for the multi-tensor path on every device (``foreach=True``, or
    ``capturable=True``, which counts its steps on the device): CPU tensors then take it too
    (:mod:`uniopt.fast.foreach`) instead of the compiled loop. Not with slots of 8 bits or in
    another dtype than the params' compute dtype (``state_dtype``: float32 for float16/bfloat16
    params), which that path leaves to the others."""
    return (bool(group.get("foreach") or group.get("capturable"))
            and group.get("state_dtype") in (None, "float32"))


def step_dtype() -> torch.dtype:
    """torch's dtype for ``state["step"]`` (``torch.optim.optimizer._get_scalar_dtype``): its
    default dtype, float64 only where set so."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def state_step(st: dict[str, Any]) -> int:
    """Updates applied to a parameter, from its state (torch's SGD keeps no step: a momentum
    buffer means at least one)."""
    s = st.get("step")
    if s is None:
        return 1 if any(isinstance(v, torch.Tensor) for v in st.values()) else 0
    return int(s)


@dataclasses.dataclass
class Steps:
    """The step counts of one group's parameters: ``state[p]["step"]`` is ``views[i]``, a 0-d
    view into ``buf``, so one NumPy operation on ``np`` counts a step for a whole run."""

    params: list[torch.Tensor]
    buf: torch.Tensor
    np: Any
    views: list[torch.Tensor]
    one: Any  # 1 as an array of np's dtype: added without a conversion, half a NumPy add's cost

    @classmethod
    def new(cls, params: list[torch.Tensor]) -> Steps:
        # the optimizer's own counts, outside any torch.func transform the step is made in
        # (which would wrap them, without memory to view): nothing differentiates a count
        with torch._C._DisableFuncTorch():
            buf = torch.zeros(len(params), dtype=step_dtype())
            counts = backend.numpy_view(buf)
            return cls(list(params), buf, counts, list(buf.unbind()),
                       np.ones((), counts.dtype))

    def rebased(self) -> Steps:
        """The NumPy view made anew where the buffer's memory moved (``share_memory_()`` of a
        count moves its whole storage's, and frees the old)."""
        if self.np.ctypes.data != self.buf.data_ptr():
            self.np = backend.numpy_view(self.buf)
        return self

    def holds(self, i: int) -> bool:
        """Whether ``views[i]`` still views its place in the buffer: a tensor's ``.data``
        assigned (``optimizer_to``'s ``t.data = t.data.to(device)``, and back) keeps the
        tensor, with memory of its own."""
        view = self.views[i]
        return (view.data_ptr() == self.buf.data_ptr() + i * self.buf.element_size()
                and view.dtype == self.buf.dtype)

    def relink(self, i: int) -> torch.Tensor:
        """``views[i]`` viewing its place in the buffer again (the same tensor: one a user
        holds, as torch's step tensor, shows the counts that follow)."""
        view = self.views[i]
        if not self.holds(i):
            with torch._C._DisableFuncTorch():
                view.data = self.buf[i]
        return view

    def of(self, ps: list[torch.Tensor]) -> bool:
        """Whether these are the counts of parameters ``ps``."""
        return len(ps) == len(self.params) and all(map(operator.is_, ps, self.params))

    def count(self, idx: Any) -> None:
        """One more step for the parameters at ``idx`` (None: every one)."""
        self.add(idx)
        backend.mark_written([self.buf])

    def add(self, idx: Any) -> None:
        """:meth:`count`, leaving the buffer for the caller to mark written."""
        if idx is None:
            np.add(self.np, self.one, out=self.np)
        else:
            self.np[idx] += 1

    def set(self, i: int, n: int) -> None:
        """Parameter ``i`` has had ``n`` steps (its state came from elsewhere)."""
        self.np[i] = n
        backend.mark_written([self.buf])


def _recording(on: bool) -> contextlib.AbstractContextManager[Any]:
    """Where a recorded step's state is made (``on``): inside ``tracked()`` with grad enabled,
    so that a state that starts as the parameters (schedule-free's z) or as the lr (Rprop's
    step sizes) carries their derivatives; elsewhere nothing."""
    stack = contextlib.ExitStack()
    if on:
        stack.enter_context(backend.tracked())
        stack.enter_context(torch.enable_grad())
    return stack


def ensure_state(state: MutableMapping[Any, dict[str, Any]], p: torch.Tensor, rule: Transform,
                 names: SlotNames, steps: Steps, i: int, spec: Spec | None,
                 state_dtype: str | None = None) -> dict[str, Any]:
    """``state[p]`` with its step in the group's buffer, every slot of ``rule`` (missing ones
    as the rule initialises them), dense, laid out as ``p``, and in ``state_dtype`` where the
    group asks for one (a state loaded in the params' dtype is widened)."""
    created = p not in state
    st = state[p]
    # a slot a parameter of this shape does not keep (Adafactor's variance of a matrix) is
    # absent from its state, as in torch's
    shapes = rule.slot_shapes_of(tuple(real(p).shape))
    names = [(key, name) for key, name in names if shapes[key] is not None]
    q8 = state_dtype == "q8" and not p.is_complex()
    missing = [(key, name) for key, name in names if name not in st]
    if missing:
        sd = None if p.is_complex() else state_dtype
        # (a recorded step's, made under _recording, from a copy of the parameter: what its
        # making saves for the derivative is not then stepped in place)
        made_of = real(p).clone() if spec == TRACKED else real(p.detach())
        try:
            fresh = setup(rule, [made_of], state_dtype=sd).slots
        except (ValueError, TypeError):
            if created:  # (a refused set-up leaves the optimizer's state as it was)
                del state[p]
            raise
    if st.get("step") is not steps.rebased().views[i] or not steps.holds(i):
        # (a count replaced, or its tensor's memory: read, then counted in the buffer again)
        steps.set(i, state_step(st))
        st["step"] = steps.relink(i)
    if missing:
        for key, name in missing:
            s = fresh[key][0]
            if isinstance(s, quant.Q8):
                st[name], st[name + ABSMAX] = s.codes, s.absmax
            else:
                # a complex tensor of its own, as torch's slots are (not a view of the real
                # pairs: a view made here, without autograd, may not be written where a
                # differentiable step records)
                st[name] = torch.view_as_complex(s).clone() if p.is_complex() else s
    if q8:
        for key, name in names:
            _q8_slot(st, key, name, p)
        return st
    for key, name in names:
        absmax = st.get(name + ABSMAX)
        if absmax is not None:  # an 8-bit slot of a group whose state_dtype is another now
            q = _codes(key, st[name], absmax)
            if dtensor.is_dtensor(p):  # (this rank's codes and its row of scales)
                q = dtensor.local_q8(q, p)
            x = quant.dequantise(backend.namespace(q.codes),
                                 quant.Q8(q.codes, q.absmax.to(torch.float32)))
            # (written once made: a failure leaves the 8-bit slot whole)
            st[name] = dtensor.Spec.of(p).wrap(x) if dtensor.is_dtensor(p) else x
            del st[name + ABSMAX]
    for key, name in names:
        s = st[name]
        shape = tuple((real(s) if s.is_complex() else s).shape)
        want = shapes[key]
        assert want is not None  # (names keeps the slots this shape has)
        if s.layout == torch.strided and shape != tuple(want):
            # (a parameter reshaped in place, its .data assigned: the copy below would raise
            # torch's broadcast error, naming nothing)
            raise ValueError(f"param {i} of its group has shape {tuple(p.shape)}, but its "
                             f"state's {name!r} has shape {tuple(s.shape)}: this state was set "
                             "up for another parameter")
    if dtensor.is_dtensor(p):
        _dtensor_slots(st, p, names, shapes)
    # the group's state dtype, else the parameter's: a parameter whose dtype changed after its
    # state was made (model.to(torch.float64) after a step) has its state cast, as
    # load_state_dict casts a loaded one (torch's policy for floating state)
    wanted = getattr(torch, state_dtype) if state_dtype and not p.is_complex() else p.dtype
    for _, name in names:
        s = st[name]
        if s.layout != torch.strided:  # torch's SGD keeps a sparse buffer for sparse grads
            s = s.to_dense()
        if s.dtype != wanted and (s.is_floating_point() or s.is_complex()):
            s = s.to(wanted)
        ls, lp = dtensor.local(s), dtensor.local(p)  # a DTensor's shard is what is viewed
        if spec == PLAIN and not ls.is_contiguous():
            s = s.contiguous()
        elif spec is not None and spec[0] == "np" and ls.stride() != real(lp).stride():
            # laid out as p, so one view walks both
            s = torch.empty_like(p, dtype=s.dtype).copy_(s)
        st[name] = s
    return st


def cast_trees(rule: Transform, ps: list[torch.Tensor], state: Any,
               saved: dict[str, Any] | None = None, state_dtype: str | None = None) -> None:
    """The float tensors of the states of ``rule``'s whole-tree parts in ``st`` (the state of
    the group's first parameter, ``ps[0]``) in the dtypes a set-up for the parameters as they
    are now gives them (made on the meta device: no memory): an entry per leaf in its leaf's
    dtype (Prodigy's ``p0``), the 0-d scalars in the widest, float32 at least (its ``d``). For
    a group of float32 or float64 parameters of one dtype this is the cast of torch's
    ``load_state_dict``, so a parameter whose dtype changed (``model.to(torch.float64)``
    after some steps) steps on as a state saved then and loaded would; a state as its set-up
    made it changes nothing. ``saved``: the state dict's entry that ``st`` was loaded from
    (torch cast the whole of it to the first parameter's dtype: a float64 leaf's entry cut to
    a float32 first parameter's, a bfloat16 model's scalars to bfloat16, a count made float):
    what differs is put back from it, other dtypes as saved. Only what changes is replaced.
    ``state_dtype``: the group's, which widens the entries as set-up does
    (:func:`uniopt.engine.tree_leaves`)."""
    st = state.get(ps[0])
    if st is None:
        return
    # (the dtypes it was last cast for, kept by the optimizer's state: a set-up on the meta
    # device costs some 50 us a leaf, at every plan made, where nothing changed; by weak
    # reference, and the state by its id: a group dropped, its state is let go)
    memo = vars(state).setdefault("tree_dtypes", {}) if isinstance(state, Versioned) else {}
    dtypes = (*map(_DTYPE, ps), state_dtype)
    seen = memo.get(id(ps[0]))
    if (saved is None and seen is not None and seen[0]() is ps[0] and seen[1] == id(st)
            and seen[2] == dtypes):
        return
    for k in [k for k, v in memo.items() if v[0]() is None]:
        del memo[k]
    memo[id(ps[0])] = (weakref.ref(ps[0]), id(st), dtypes)
    metas = None
    for part, keys in rule.keyed_parts:
        if not isinstance(part, WholeTree) or keys[0] not in st:
            continue
        src = None if saved is None else saved.get(keys[0])
        if saved is not None and src is None:
            continue
        if metas is None:
            metas = tree_leaves([torch.empty(real(p).shape, dtype=real(p).dtype,
                                             device="meta") for p in ps], state_dtype)
        try:
            like = part.init_tree(metas)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            # (a part that cannot set up on the meta device keeps its dtypes)
            continue
        tree = st[keys[0]]
        new = _cast_tree(tree, src, like)
        if new is not tree:
            st[keys[0]] = new


def _cast_tree(x: Any, src: Any, like: Any, key: Any = None) -> Any:
    """:func:`cast_trees` of one tree state ``x`` (``src``: what it was loaded from, None:
    nothing; ``like``: its set-up on the meta device): ``x`` itself where nothing changes, or
    where its structure is not ``like``'s."""
    if isinstance(x, torch.Tensor):
        base = x if src is None else src
        if not (isinstance(base, torch.Tensor) and isinstance(like, torch.Tensor)):
            return x
        want = (like.dtype if key != "step" and base.is_floating_point()
                and like.is_floating_point() else base.dtype)
        return x if x.dtype == want else base.to(x.device, want, copy=src is not None)
    if type(x) in (list, tuple, dict):
        if type(like) is not type(x) or len(like) != len(x) or src is not None and (
                type(src) is not type(x) or len(src) != len(x)):
            return x
        if type(x) is dict:
            if like.keys() != x.keys() or src is not None and src.keys() != x.keys():
                return x
            new = {k: _cast_tree(v, None if src is None else src[k], like[k], k)
                   for k, v in x.items()}
            return x if all(map(operator.is_, new.values(), x.values())) else new
        items = [_cast_tree(v, None if src is None else src[i], like[i])
                 for i, v in enumerate(x)]
        return x if all(map(operator.is_, items, x)) else type(x)(items)
    return x


def _dtensor_slots(st: dict[str, Any], p: Any, names: SlotNames,
                   shapes: Mapping[str, tuple[int, ...] | None]) -> None:
    """The slots of DTensor parameter ``p`` as DTensors: laid out as ``p`` where shaped as it
    (a whole tensor loaded from an unsharded state: this rank's shard of it), else whole and
    replicated on its mesh (Adafactor's factors), so that torch.distributed.checkpoint saves
    and reshards them."""
    shape = tuple(p.shape)
    for key, name in names:
        s = st.get(name)
        if s is None or dtensor.is_dtensor(s):
            continue
        st[name] = (dtensor.sharded_like(s, p) if shapes[key] == shape
                    else dtensor.replicated(s.to(dtensor.local(p).device), p))


def _q8_slot(st: dict[str, Any], key: str, name: str, p: torch.Tensor) -> None:
    """Slot ``name`` of parameter ``p``'s state ``st`` as 8-bit codes and scales, contiguous.
    torch's ``load_state_dict`` casts a float parameter's state to its dtype: codes come back
    as floats (integers: cast back), and a slot without scales is a float state (quantised).
    A DTensor ``p``'s slot is each rank's shard quantised (:func:`uniopt.interop.dtensor.
    quantised`); one loaded whole (an unsharded state) is read whole and cut to this rank's
    shard first; one loaded as DTensors must be of this rank's layout (else: raises)."""
    signed = key.rsplit(".", 1)[-1] not in quant.NONNEGATIVE
    codes, absmax = st[name], st.get(name + ABSMAX)
    if dtensor.is_dtensor(p):
        if dtensor.is_dtensor(codes) and absmax is not None:
            dtensor.check_q8(absmax, p, f"the state's {name}")
        else:
            x = codes.to(torch.float32) if absmax is None else quant.dequantise(
                backend.namespace(codes), _codes(key, codes, absmax))
            q = dtensor.quantised(backend.namespace(dtensor.local(p)),
                                  x if dtensor.is_dtensor(x) else dtensor.sharded_like(x, p),
                                  p, signed)
            codes, absmax = q.codes, q.absmax
    elif absmax is None:
        q = quant.quantise(backend.namespace(codes), codes.to(torch.float32), signed)
        codes, absmax = q.codes, q.absmax
    codes = codes.to(torch.int8 if signed else torch.uint8)
    absmax = absmax.to(torch.float32)
    st[name], st[name + ABSMAX] = codes.contiguous(), absmax.contiguous()


def _codes(key: str, codes: torch.Tensor, absmax: Any) -> quant.Q8:
    """Slot ``key``'s 8-bit codes in their integer type (torch's load casts a state to its
    parameter's float dtype) beside their block scales."""
    signed = key.rsplit(".", 1)[-1] not in quant.NONNEGATIVE
    return quant.Q8(codes.to(torch.int8 if signed else torch.uint8), absmax)


def addresses(grads: list[Any], expect: list[tuple[Any, ...]], dtype: torch.dtype,
              nonempty: Any, table: Any, address: int) -> backend.Addressed | None:
    """Gradients ``grads`` by the addresses of their memory, where each is a plain tensor
    (``torch.Tensor`` itself: no subclass's ``data_ptr``), of ``dtype``, on the CPU, of its
    parameter's shape (``expect``: each one's ``(torch.Tensor, dtype, True, shape)``, as
    :data:`_KIND` reads a tensor), dense and contiguous, without a negative bit, and with
    memory where it has elements (``nonempty``: not a ZeroTensor); else None. C calls only, a
    few per tensor: the per-tensor cost of a step of 10,000 gradients. (Each tensor's kind is
    compared as it is read: a list of 10,000 tuples would set off the garbage collector.)
    The addresses are written to ``table`` (the plan's own, at ``address``, negated), which
    only the latest :class:`~uniopt.backend.Addressed` made of it reads."""
    try:
        if not (all(map(operator.eq, map(_KIND, grads), expect))
                and all(map(torch.Tensor.is_contiguous, grads))
                and not any(map(torch.Tensor.is_neg, grads))):
            return None
        ptrs = list(map(_DATA_PTR, grads))
    except (RuntimeError, TypeError):  # a tensor without storage (functorch's, a lazy one)
        return None
    if 0 in ptrs and nonempty[np.equal(ptrs, 0)].any():
        return None
    table[:] = ptrs
    return backend.Addressed(grads, table, _ADDRESSED[dtype], address)


@dataclasses.dataclass
class SeenGrads:
    """The gradients of a plan's last step and what the engine got for them, reused while
    each gradient is the same tensor, at the same address, of the same shape: with
    ``zero_grad(set_to_none=False)`` backward accumulates into the same tensors every step.
    Their values may have changed (the views show them); their version counters need no
    check. A tensor whose memory was replaced (``set_``, ``.data =``, a resized storage) has
    another address, another shape or another layout, and is looked at anew.

    The gradients are not held (known by :data:`_IMPL`), so ``zero_grad()``'s default
    (``set_to_none=True``) frees them as it does after torch.optim's step and the next backward
    reuses their memory: holding them made a 670K-parameter MLP's forward and backward about 7%
    slower, every gradient in new memory. Gradients that went by address are found again in the
    plan's table (``views`` None), which only a new set of addresses refills; NumPy views hold
    their tensors' memory, so a plan keeps views only of gradients small enough to cost nothing
    held (:data:`KEEP_VIEWS`). A view or an address never outlives the memory it reads. A new
    gradient made where a freed one's TensorImpl was, of its memory, shape and layout, is its
    parameter's, of the parameter's dtype and device as torch holds every gradient: what the
    plan knew of the old one holds for it."""

    impls: list[int]  # each gradient's TensorImpl (_IMPL)
    views: list[Any] | None  # None: by address, the plan's table
    # the gradients' strides when their views were made, or None where each was contiguous
    # (and must still be: a gradient transposed where it is, ``g.t_()``, keeps its address)
    strides: list[Any] | None
    # where the views read and their shapes, found when first needed: a step whose gradients
    # are new tensors (zero_grad's default) pays for no more than the identity check
    ptrs: list[int] | None = None
    shapes: list[Any] | None = None

    def views_of(self, grads: list[torch.Tensor], plan: Plan
                 ) -> list[Any] | backend.Addressed | None:
        if list(map(_IMPL, grads)) != self.impls:
            return None
        views = self.views
        if self.ptrs is None:
            if views is None:
                self.ptrs = plan.table.tolist()
            else:
                self.ptrs = [v.ctypes.data for v in views]
                self.shapes = list(map(_SHAPE, views))
        assert self.shapes is not None
        if (list(map(_DATA_PTR, grads)) != self.ptrs
                or not all(map(operator.eq, map(_SHAPE, grads), self.shapes))
                or (not all(map(_CONTIGUOUS, grads)) if self.strides is None
                    else list(map(_STRIDE, grads)) != self.strides)):
            return None
        if views is None:
            assert plan.address is not None
            return backend.Addressed(grads, plan.table, _ADDRESSED[plan.address],
                                     plan.table_address)
        return views


@dataclasses.dataclass
class Run:
    """Parameters of one group that share a step count, a kind of view and a tag (see
    :func:`build`): one engine call."""

    pos: list[int] | None  # positions in the plan's ``sel`` (None: all of them)
    idx: Any  # their indices in the group, for the step buffer (None: the whole group)
    params: list[Any]
    slots: dict[str, list[Any]]
    # what a step marks written, in one call: the step buffer and, where written through NumPy
    # views, the parameters (a graph may have saved them; slots are the optimizer's own)
    written: list[torch.Tensor]
    # capturable=True: the run's step count on its parameters' device, counted there by the
    # step (a captured graph reads and advances it); the host's count follows step() calls
    # (on the CPU, a rule that cannot count there steps with the host's, which this follows)
    device_step: torch.Tensor | None = None


@dataclasses.dataclass
class Plan:
    """What a group's step needs, built when anything about it changes."""

    group: dict[str, Any]
    plist: list[torch.Tensor]
    params: list[torch.Tensor]
    has: list[bool]
    ptrs: list[Any] | None  # _ptrs
    wide: list[int]  # which parameters have two axes or more, as built
    strided: bool  # some parameter was not contiguous when the plan was built
    state: MutableMapping[Any, dict[str, Any]]
    layout: Any
    names: SlotNames
    sel: list[int]  # indices of the parameters the runs update (with a dense gradient)
    sel_params: list[torch.Tensor]
    specs: list[Spec]  # per entry of sel
    fast: bool  # every entry of sel is a plain NumPy view: gradients via numpy_views
    states: list[dict[str, Any]]
    # what the views are of, looked up in the states at each step: each state dict and slot
    # name (step included) beside the tensor it held when the plan was built (None: none),
    # in one flat list; then those with memory of their own and where it was (not DTensors,
    # checked by identity only): a slot whose storage was swapped (``set_``, ``resize_``) is
    # viewed anew, never written through a view of freed memory
    checks: tuple[list[dict[str, Any]], list[str], list[torch.Tensor | None]]
    addressed: tuple[list[torch.Tensor], list[int]]
    runs: list[Run]
    rows: list[int]  # parameters with sparse gradients updated row by row
    sparse: list[bool]
    steps: Steps
    tracked: bool  # differentiable=True: autograd records the step
    multi: bool  # foreach=True or capturable=True: the multi-tensor path on every device
    flags: tuple[Any, Any]  # the group's foreach and capturable when the plan was built
    # the parameters are DTensors: which arrays of the runs are shards of which (None: none)
    sharding: dtensor.Sharding | None = None
    # the ids of the runs' views that are complex parameters' real pairs (None: none), for
    # the parts that see them as complex numbers (backend.PAIRS)
    pairs: frozenset[int] | None = None
    counts_seen: bytes = b""  # the step buffer's bytes when they were last known consistent
    state_dtype: str | None = None  # the group's, as the engine's State takes it
    keep_grads: bool = False  # the last step's gradients are known again (SeenGrads)
    keep_views: bool = False  # and their views kept, where they are small (KEEP_VIEWS)
    seen: SeenGrads | None = None
    # the first gradient of the last step that went by address (its _IMPL): only where the
    # next step's is the same tensor (zero_grad(set_to_none=False)) are its gradients kept as
    # SeenGrads; new gradients at every step (zero_grad()'s default) would make and drop them
    # at every step, about 2 us on a 6-tensor model, for nothing
    first: int | None = None  # (its _IMPL)
    # the dtype of every parameter of sel where their gradients go by address (None: as views)
    address: torch.dtype | None = None
    shapes: list[Any] = dataclasses.field(default_factory=list)  # of the parameters of sel
    nonempty: Any = None  # which parameters of sel have elements
    expect: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)  # (addresses)
    # the gradients' addresses, refilled at each step that takes them by address, and where
    # that table is (negated, as backend.Addressed holds it)
    table: Any = None
    table_address: int = 0
    treedefs: list[Any] = dataclasses.field(default_factory=list)  # each run's flat list
    state_version: int | None = None  # the state's version when its dicts were last checked
    # one engine call on NumPy views (a DTensor's: of its local shard; no multi-tensor path,
    # autograd, 8 bits or whole-tree parts): after a step the compiled loop ran, its loop bound
    # to the views (fast.cpu.Bound), which this plan's checks keep valid; False: not bound
    bindable: bool = False
    lane: Any = None

    def still_valid(self, state: Any, group: dict[str, Any], ps: Any, has: list[bool],
                    layout: Any, recorded: bool) -> bool:
        if not (
            self.group is group
            and self.plist is ps
            and len(ps) == len(self.params)
            and self.state is state
            and self.layout == layout
            and self.has == has
            and self.tracked == recorded
            and self.flags == (group.get("foreach"), group.get("capturable"))
            and self.state_dtype == group.get("state_dtype")
            and all(map(operator.is_, ps, self.params))
            and (self.ptrs is None
                 or _ptrs(ps, self.sharding is not None, self.wide, self.strided) == self.ptrs)
        ):
            return False
        version = getattr(state, "version", None)
        if version is None or version != self.state_version:
            sts: list[Any] = list(map(state.get, self.sel_params))
            if not all(map(operator.is_, sts, self.states)):
                return False
            self.state_version = version
        dicts, names, tensors = self.checks
        if not all(map(operator.is_, map(dict.get, dicts, names), tensors)):
            return False
        held, ptrs = self.addressed
        if list(map(_DATA_PTR, held)) != ptrs:
            return False
        # the counts as this plan left them (one compare of bytes), else still one per run
        counts = self.steps.np.tobytes()
        if counts == self.counts_seen:
            return True
        steps = self.steps.np
        for run in self.runs:
            v = steps if run.idx is None else steps[run.idx]
            if v.min() != v.max():
                return False
        self.counts_seen = counts
        return True

    def reshaped(self) -> bool:
        """Whether a parameter's shape is not the one its view was made with: one cut or
        reshaped where it is (``p.data = p.data[:2]``) keeps its address, and its gradients
        then have another shape than the view."""
        xs = dtensor.locals_of(self.sel_params) if self.sharding is not None else self.sel_params
        return list(map(_SHAPE, xs)) != self.shapes

    def run_steps(self) -> list[int]:
        steps = self.steps.np
        return [int(steps[0] if run.idx is None else steps[run.idx[0]]) for run in self.runs]

    def counts(self) -> set[int]:
        """The step counts this plan's parameters are at."""
        if not self.rows:  # (a scheduled group's every step: no generator where none is read)
            return set(self.run_steps())
        return {*self.run_steps(), *(int(self.steps.np[i]) for i in self.rows)}

    def fast_grads(self, grads: list[Any]) -> list[Any] | backend.Addressed | None:
        """What the engine gets for the gradients where every parameter is a plain NumPy view:
        their addresses (:func:`addresses`), or else their NumPy views; None where a gradient
        has no view (on another device, sparse...). A strided gradient needs no check here:
        the compiled path declines it and the engine's reference path runs the step (after a
        warning that says why)."""
        if not self.fast:
            return None
        sel = grads if len(self.sel) == len(grads) else [grads[i] for i in self.sel]
        if self.sharding is not None:
            # their local shards; one to be redistributed (communication) goes through run
            local = dtensor.same_layout_locals(sel, self.sel_params)
            if local is None:
                return None
            sel = local
        seen = self.seen
        if seen is not None:
            views = seen.views_of(sel, self)
            if views is not None:
                return views
            self.seen = None  # the old gradients are let go now, not at the end of this step
        if self.address is not None:
            found = addresses(sel, self.expect, self.address, self.nonempty, self.table,
                              self.table_address)
            if found is not None:
                if self.keep_grads and sel:
                    first = self.first
                    if first == _IMPL(sel[0]):
                        self.seen = SeenGrads(list(map(_IMPL, sel)), None, None,
                                              shapes=self.shapes)  # (contiguous, as taken)
                    else:
                        self.first = _IMPL(sel[0])
                return found
        if sel and sel[0].dtype == torch.bfloat16 and not all(map(_CONTIGUOUS, sel)):
            # (the compiled loop would decline a strided gradient's view, and bfloat16 bits have
            # no reference path: run's views lay it out as its parameter, a copy)
            return None
        try:
            made = backend.numpy_views([sel])
        except RuntimeError:  # (a tensor without memory: a torch.func transform's wrapper)
            return None
        if made is None or list(map(_SHAPE, sel)) != self.shapes:
            # (another shape: a parameter cut or reshaped where it is, which the caller's
            # reshaped() finds, or a wrong gradient, which the engine names)
            return None
        if self.keep_views:
            self.seen = SeenGrads(list(map(_IMPL, sel)), made[0],
                                  None if all(map(_CONTIGUOUS, sel)) else list(map(_STRIDE, sel)))
        return made[0]

    def _views(self, grads: list[Any]) -> list[Any]:
        """The engine's views of the gradients, where the fast path did not take them."""
        gs = [grads[i] for i in self.sel]
        if gs and self.first is None:  # (a new plan's: its next step may keep them)
            self.first = _IMPL(gs[0])
        if self.sharding is not None:
            gs = dtensor.local_grads(gs, self.sel_params)
        for k, (g, p) in enumerate(zip(gs, self.sel_params, strict=True)):
            if g.dtype != p.dtype:
                # (here, not after the views: a bfloat16 view holds its bits, and the engine
                # then named uint16, or the compiled loop's reason)
                raise ValueError(
                    f"gradient for params[{self.sel[k]}] of its group has dtype {g.dtype}, its "
                    f"parameter {p.dtype} (torch's p.grad_dtype lets them differ; uniopt steps "
                    "a gradient of its parameter's dtype: p.grad = p.grad.to(p.dtype))")
        return [_grad_view(g, p, spec)
                for g, p, spec in zip(gs, self.sel_params, self.specs, strict=True)]

    def _names(self, run: Run, where: str) -> list[str]:
        """A run's parameters by their index in the group (``where``: the group's list, as
        the user names it)."""
        sel = self.sel
        return [f"{where}[{sel[k]}]" for k in (range(len(sel)) if run.pos is None else run.pos)]

    def _calls(self, rule: Transform, views: Any, rules: list[Transform] | None
               ) -> list[tuple[Any, ...]]:
        calls = []
        for r, (run, step, treedef) in enumerate(zip(self.runs, self.run_steps(),
                                                     self.treedefs, strict=True)):
            leaves: Any = (views if run.pos is None else views.take(run.pos)
                           if isinstance(views, backend.Addressed)
                           else [views[k] for k in run.pos])
            at = (step if run.device_step is None or (
                run.device_step.is_cpu and not _on_device(rule)) else run.device_step)
            calls.append((run, rule if rules is None else rules[r], at, treedef, leaves))
        return calls

    def check(self, rule: Transform, grads: list[Any], rules: list[Transform] | None = None,
              where: str = "params") -> list[Any]:
        """Every run's engine checks of a step whose gradients the fast path did not take,
        nothing written: a bad gradient of a later run, or of a later group, is refused before
        an earlier one steps. The gradients' views, for :meth:`run`."""
        if rules is not None and len(rules) == 1:
            rule, rules = rules[0], None
        views = self._views(grads)
        trees = self._tree_states(rule) if rule.tree_layout else {}
        # as run's engine calls see them: DTensor shards as their whole tensors' parts, and a
        # recorded step's derivatives inside tracked()
        shards = backend.SHARDED.set(self.sharding)
        pairs = backend.PAIRS.set(self.pairs)
        try:
            with _recording(self.tracked):
                for run, r, at, treedef, leaves in self._calls(rule, views, rules):
                    names = LEAF_NAMES.set(self._names(run, where))
                    try:
                        check_step(State(r, at, run.slots, treedef, self.state_dtype, trees),
                                   run.params, leaves)
                    finally:
                        LEAF_NAMES.reset(names)
        finally:
            backend.PAIRS.reset(pairs)
            backend.SHARDED.reset(shards)
        return views

    def run(self, rule: Transform, grads: list[Any],
            views: list[Any] | backend.Addressed | None,
            rules: list[Transform] | None = None,
            resolved: dict[int, Any] | None = None, extra: dict[str, Any] | None = None,
            where: str = "params") -> None:
        """One step: an engine call per run, then the parameters with sparse gradients.
        ``rules``: one per run, where runs that share a step count differ in their numbers
        (None: ``rule`` for each). ``resolved``: ``rule`` resolved at some step counts (a
        scheduled rule, resolved by the checks before the step), or None. ``extra``: the
        step's extra arguments (``value=``, the loss, for a rule that reads it). ``where``:
        how the user names the group's list of parameters, for the engine's messages."""
        extra = extra or {}
        if rules is not None:
            resolved = None  # of the group's rule, not of these
            if len(rules) == 1:
                rule, rules = rules[0], None  # bound to the compiled loop as a group's rule is
        if views is None:
            views = self._views(grads)
        # (bound to a rule's loops: a group whose rule changed, say nesterov=True, binds anew)
        lane = self.lane
        if lane is not None and lane.memo is rule.memo and not extra:
            run = self.runs[0]
            at: Any
            if resolved is not None and len(resolved) == 1:  # (at the run's one count)
                [at] = resolved.values()
            else:
                step = int(self.steps.np[0 if run.idx is None else run.idx[0]])
                at = None if resolved is None else resolved.get(step)
                if at is None:
                    # (a fixed rule's parts are the lane's own: it takes the count)
                    at = step if lane.fixed is not None else resolve(rule, step)
            if lane(at, views, self.keep_views):
                self.steps.add(run.idx)
                torch._C._increment_version(run.written)  # (backend.mark_written's call)
                self._after(rule, grads)
                return
        ran = fast.cpu.STEPS
        trees = self._tree_states(rule) if rule.tree_layout else {}
        # foreach=True / capturable=True: CPU tensors too take the multi-tensor path (a
        # context variable set here: no Python call on the compiled loop's steps)
        forced = fast.FORCED.set(self.multi)
        # DTensor parameters: which arrays are shards, for norms and per-leaf parts (set as
        # the variable itself, not backend.sharded: a small step makes no extra Python call);
        # complex ones: which are real pairs
        shards = backend.SHARDED.set(self.sharding)
        pairs = backend.PAIRS.set(self.pairs)
        try:
            calls = self._calls(rule, views, rules)
            names = [self._names(run, where) for run, *_ in calls]
            if len(calls) > 1 and global_norm_parts(rule):
                # a global norm (a chain's clip_by_global_norm) is every run's together: runs
                # of other dtypes or step counts step apart
                sums = [functools.partial(self._update, State(r, at, run.slots, treedef,
                                                              self.state_dtype, trees),
                                          run.params, leaves, extra, names[k])
                        for k, (run, r, at, treedef, leaves) in enumerate(calls)]
                # (a scheduled threshold at the largest count of the parameters that step)
                with shared_norms(rule, sums, max(self.run_steps())) as split:
                    trees = self._step_runs(calls, trees, split, extra, names)
            else:
                trees = self._step_runs(calls, trees, None, extra, names)
        finally:
            backend.PAIRS.reset(pairs)
            backend.SHARDED.reset(shards)
            fast.FORCED.reset(forced)
        if (self.bindable and fast.cpu.STEPS == ran + 1
                and (self.lane is None or self.lane.memo is not rule.memo)):
            run = self.runs[0]
            self.lane = fast.cpu.bind(resolve(rule, self.run_steps()[0] - 1), run.params,
                                      run.slots, rule.memo, fixed_parts(rule))
            self.bindable = self.lane is not None
        if trees:
            self.state[self.plist[0]].update(trees)
        self._after(rule, grads)

    def _step_runs(self, calls: list[tuple[Any, ...]], trees: Any, split: Any,
                   extra: dict[str, Any], names: list[list[str]]) -> Any:
        """Each run's step in turn, handing on the tree states; the last ones."""
        for (run, rule, at, treedef, leaves), run_names in zip(calls, names, strict=True):
            if split is not None:
                split.at = 0
            new = self._update(State(rule, at, run.slots, treedef, self.state_dtype, trees),
                               run.params, leaves, extra, run_names)
            trees = new.tree_states
            if run.device_step is not None and new.step is not run.device_step:
                if isinstance(new.step, torch.Tensor):
                    run.device_step.copy_(new.step)  # a path that counts out of place
                else:
                    run.device_step.fill_(new.step)  # (the host's count: Plan._calls)
            self.steps.add(run.idx)
            backend.mark_written(run.written)
        return trees

    def _update(self, state: Any, params: list[Any], grads: Any,
                extra: dict[str, Any], names: list[str]) -> Any:
        given = LEAF_NAMES.set(names)
        try:
            if self.tracked:
                with backend.tracked(), torch.enable_grad():
                    return update_(state, params, grads, **extra)
            return update_(state, params, grads, **extra)  # without autograd (Optimizer.step)
        finally:
            LEAF_NAMES.reset(given)

    def _after(self, rule: Transform, grads: list[Any]) -> None:
        """The parameters with sparse gradients, after the runs."""
        for i in self.rows:
            self._rows_step(rule, i, grads[i])
        self.counts_seen = self.steps.np.tobytes()

    def _tree_states(self, rule: Transform) -> dict[str, Any]:
        """The states of the rule's whole-tree parts (a generator's), kept in the state of the
        group's first parameter, as torch's LBFGS keeps its own; made where missing."""
        st = self.state[self.plist[0]]
        with _recording(self.tracked):  # (from copies, as a recorded step's slots are: DoG's p0)
            leaves = [real(p).clone() if self.tracked else real(p.detach()) for p in self.plist]
            leaves = tree_leaves(leaves, self.state_dtype)
            return {keys[0]: st[keys[0]] if keys[0] in st else part.init_tree(leaves)
                    for part, keys in rule.keyed_parts if isinstance(part, WholeTree)}

    def _rows_step(self, rule: Transform, i: int, g: torch.Tensor) -> None:
        """A sparse gradient, as torch's Adagrad takes it: the engine updates the rows present
        (gathered, duplicates summed), the others keep their values and state."""
        p = self.params[i]
        g = g.detach().coalesce()
        index = tuple(g.indices())
        values = g.values()
        # not in the plan's identity checks: looked up at each step
        st = ensure_state(self.state, p, rule, self.names, self.steps, i, None,
                          self.group.get("state_dtype"))
        if values.numel():
            pd = p.detach()
            rows = pd[index]
            slots = {key: [st[name][index]] for key, name in self.names}
            update_(State(rule, int(self.steps.np[i]), slots, flat_list_def(1),
                          self.state_dtype), [rows], [values])
            pd[index] = rows
            for key, name in self.names:
                st[name][index] = slots[key][0]
        self.steps.count(i)


def _ptrs(ps: list[torch.Tensor], sharded: bool, wide: list[int], strided: bool
          ) -> list[Any] | None:
    """Where the parameters' memory is (a DTensor's: its local shard's) and how it is laid out,
    as a plan's views of it were made: a parameter transposed, reshaped or given new strides
    where it is (``w.t_()``, ``w.data = w.data.view(4, 3)``, ``p.set_(storage, 0, shape,
    strides)``) keeps its address, and views made before would step its elements in the old
    order or shape. A parameter cut where it is (``p.data = p.data[:2]``) keeps its address
    and strides, but not its number of elements: a step of a gradient of the old shape would
    write past its end (torch's classes raise). Where every parameter was contiguous
    (``strided`` False), each must still be (None if not: one flag per tensor), and those of
    two axes or more (``wide``) keep their strides (a tuple each: W4's 10,000 vectors' would
    cost a millisecond a step); else every parameter's strides."""
    xs = dtensor.locals_of(ps) if sharded else ps
    if strided:
        return [*map(_DATA_PTR, xs), *map(_NUMEL, xs), *map(_STRIDE, xs)]
    if not all(map(_CONTIGUOUS, xs)):
        return None
    return [*map(_DATA_PTR, xs), *map(_NUMEL, xs), *map(_STRIDE, map(xs.__getitem__, wide))]


def _wide(ps: list[torch.Tensor], sharded: bool) -> list[int]:
    return [i for i, x in enumerate(dtensor.locals_of(ps) if sharded else ps) if x.dim() > 1]


def _strided(ps: list[torch.Tensor], sharded: bool) -> bool:
    return not all(map(_CONTIGUOUS, dtensor.locals_of(ps) if sharded else ps))


def _on_device(rule: Transform) -> bool:
    """Whether ``rule`` steps with a count on the device (:func:`uniopt.fast.foreach.capturable`;
    a CPU run's count of another rule is the host's, as ``capturable=False`` steps it: no graph
    captures a step of CPU tensors, and torch.compile marks a group capturable itself)."""
    from ..fast.foreach import capturable

    return capturable(rule)


def _device_step(count: float, p: torch.Tensor) -> torch.Tensor:
    """A run's step count on its parameters' device (``capturable=True``), in float64 where
    the device has it: the coefficients computed from it are then the host's to rounding."""
    dtype = torch.float32 if p.device.type == "mps" else torch.float64
    return torch.tensor(count, dtype=dtype, device=p.device)


def build(group: dict[str, Any], rule: Transform, names: SlotNames, has: list[bool],
          sparse: list[bool], by_rows: bool, state: MutableMapping[Any, dict[str, Any]],
          steps: Steps, tags: list[Any] | None, recorded: bool) -> Plan:
    """The plan of ``group``; ``by_rows``: sparse gradients update only their rows. ``tags``:
    per parameter, what else its run must share (hashable): parameters at one step count whose
    step takes other numbers (torch's per-parameter ``mu_product`` of NAdam) go in runs of
    their own. ``recorded``: whether autograd records the step (:func:`recorded`)."""
    ps = group["params"]
    tracked = recorded
    q8 = is_q8(group)
    sharded = dtensor.any_dtensor(ps)
    if sharded:
        dtensor.check_rule(rule)
        dtensor.check_group(ps, tracked)
        if q8:
            dtensor.check_q8_rule(rule)
    multi = multi_tensor(group)
    # (refused for any parameter, refused before any gets a state)
    check_state_dtype(rule, group.get("state_dtype"),
                      [p for p, h in zip(ps, has, strict=True) if h and not p.is_complex()])
    compiled = fast.cpu.AVAILABLE and all(isinstance(q, Elementwise) for q in rule.flat_parts)
    sel: list[int] = []
    specs: list[Spec] = []
    states: list[dict[str, Any]] = []
    rows: list[int] = []
    runs: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(ps):
        if not has[i]:
            continue
        if sparse[i] and by_rows:
            ensure_state(state, p, rule, names, steps, i, None, group.get("state_dtype"))
            rows.append(i)
            continue
        s = TRACKED if tracked else spec(p)
        if s[0] == "np" and multi:
            s = ("torch", None)  # the tensors themselves, for the multi-tensor path
        if q8 and s[0] == "np" and (s[1] is not None or p.dtype == torch.bfloat16):
            # the codes are in C order, not the parameter's memory order; and the 8-bit loop
            # reads float32/float64 params, not a bfloat16 tensor's bits
            s = ("torch", None)
        if s[0] == "np" and (rule.has_per_leaf or rule.tree_layout
                             or p.dtype == torch.bfloat16 and (
                                 not compiled or group.get("state_dtype") == "float64")):
            # per-leaf and whole-tree parts run on the reference path, where torch's own ops
            # serve as well as NumPy's (slots of other shapes need no relayout, a generator's
            # state is torch's); the views of bfloat16 bits are for the compiled loop only,
            # which reads them beside a state of float32 (or their own) only
            s = ("torch", None)
        with _recording(tracked):
            st = ensure_state(state, p, rule, names, steps, i, s, group.get("state_dtype"))
        key = (s[0], p.dtype if s[0] == "np" else None, int(steps.np[i]),
               None if tags is None else tags[i])
        runs.setdefault(key, []).append(len(sel))
        sel.append(i)
        specs.append(s)
        states.append(st)
    if rule.tree_layout and ps:
        # (a plan is made anew when a parameter's dtype changes: its memory moved)
        with _recording(tracked):
            cast_trees(rule, ps, state, state_dtype=group.get("state_dtype"))
    sel_params = [ps[i] for i in sel]
    plan_runs = []
    shards: list[tuple[Any, dtensor.Spec | None]] = []  # each view, and its DTensor's layout
    for (kind, *_), pos in runs.items():
        whole = len(pos) == len(sel)
        idx = np.asarray([sel[k] for k in pos], dtype=np.intp)
        views = [_view(sel_params[k], specs[k]) for k in pos]
        if sharded:
            shards += [(v, dtensor.Spec.of(sel_params[k]) if dtensor.is_dtensor(sel_params[k])
                        else None) for v, k in zip(views, pos, strict=True)]
        tensors = ([sel_params[k] for k in pos] if not sharded else
                   [t for k in pos for t in (sel_params[k], dtensor.local(sel_params[k]))])
        plan_runs.append(
            Run(
                pos=None if whole else pos,
                idx=None if whole and len(sel) == len(ps) else idx,
                params=views,
                slots={key: [_q8_view(states[k], name, specs[k], sel_params[k]) if q8 else
                             _slot_view(states[k].get(name), specs[k]) for k in pos]
                       for key, name in names},
                written=[*tensors, steps.buf] if kind == "np" else [steps.buf],
                device_step=_device_step(float(steps.np[sel[pos[0]]]), sel_params[pos[0]])
                if group.get("capturable") and kind == "torch" else None,
            )
        )
    found = [name for _, name in names] + ([name + ABSMAX for _, name in names] if q8 else [])
    dicts: list[dict[str, Any]] = []
    keys: list[str] = []
    held: list[torch.Tensor | None] = []
    for name in found:
        tensors = [st.get(name) for st in states]
        dicts += states
        keys += [name] * len(states)
        held += tensors
    addressed = [t for t in held if isinstance(t, torch.Tensor)]
    # a recorded step made inside a torch.func transform: tensors without memory of their own
    # (the transform's wrappers), known by identity only (such a step writes through no NumPy
    # view; a complex parameter's real view, which it does step, is of a tensor with memory)
    unaddressed = tracked and any(map(WRAPPED, [*ps, *addressed]))
    if sharded or unaddressed:
        addressed = []
    dicts += states
    keys += ["step"] * len(states)
    held += [steps.views[i] for i in sel]
    # a count's memory replaced where its tensor is (``state[p]["step"].data = ...``, as the
    # common ``optimizer_to(optim, device)`` moves every state tensor): the step reads it anew
    # (ensure_state); the counts are the optimizer's own, with memory of their own everywhere
    addressed += [steps.views[i] for i in sel]
    fast_ = (not any(sparse) and all(s == PLAIN for s in specs)
             and not any(p.is_complex() for p in sel_params))
    dtypes = {p.dtype for p in sel_params}
    address = dtypes.pop() if fast_ and not q8 and len(dtypes) == 1 else None
    # what the views are of: a DTensor's local shard (its gradients go by address as theirs)
    viewed = dtensor.locals_of(sel_params) if sharded else sel_params
    table = np.zeros(len(sel), np.int64)
    elements = sum(p.numel() for p in sel_params)
    keep = not sharded and len(sel) <= KEEP_TENSORS
    wide, strided = _wide(ps, sharded), _strided(ps, sharded)
    return Plan(
        group=group,
        plist=ps,
        params=list(ps),
        has=has,
        ptrs=None if unaddressed else _ptrs(ps, sharded, wide, strided),
        wide=wide,
        strided=strided,
        state=state,
        layout=rule.layout,
        names=names,
        sel=sel,
        sel_params=sel_params,
        specs=specs,
        fast=fast_,
        states=states,
        checks=(dicts, keys, held),
        addressed=(addressed, list(map(_DATA_PTR, addressed))),
        runs=plan_runs,
        rows=rows,
        sparse=sparse,
        steps=steps,
        tracked=tracked,
        multi=multi,
        flags=(group.get("foreach"), group.get("capturable")),
        sharding=dtensor.Sharding(shards) if sharded else None,
        pairs=frozenset(id(v) for run in plan_runs for v, k in zip(
            run.params, range(len(sel)) if run.pos is None else run.pos, strict=True)
            if sel_params[k].is_complex()) or None,
        state_dtype=group.get("state_dtype"),
        keep_grads=keep and elements <= KEEP_GRADS,
        keep_views=keep and elements <= KEEP_VIEWS,
        address=address if address in _ADDRESSED and len(sel) >= ADDRESS_MIN else None,
        shapes=[p.shape for p in viewed],
        expect=[(torch.Tensor, p.dtype, True, p.shape) for p in viewed],
        nonempty=np.array([p.numel() > 0 for p in viewed], bool),
        table=table,
        table_address=-table.__array_interface__["data"][0],
        treedefs=[flat_list_def(len(r.params)) for r in plan_runs],
        # (shards too: a rule with a norm, summed across the ranks, is never bound)
        bindable=(len(plan_runs) == 1 and plan_runs[0].pos is None and not tracked
                  and not multi and not q8 and not rule.tree_layout
                  and specs[0][0] == "np"),
    )


def recorded(defaults: dict[str, Any]) -> bool:
    """Whether autograd records an optimizer's steps, as torch decides it: by the optimizer's
    ``differentiable`` (its ``defaults``, torch's grad mode for the whole step), not a group's
    own (which torch hands its functional only for how it computes): a group that says
    ``differentiable=True`` in an optimizer made without it steps unrecorded, as in torch, and
    one that says False in an optimizer made with it is recorded."""
    return bool(defaults.get("differentiable"))

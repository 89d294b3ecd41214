"""Rules that run other rules (``partition``, ``accumulate``, ``skip_nonfinite``...) under
:class:`uniopt.torch.Optimizer`: each param group keeps one uniopt :class:`~uniopt.State`,
stepped whole by the engine. Its arrays are shared with the tensors under
``optimizer.state["uniopt.group<i>"]`` (nested dicts and lists, :func:`uniopt.state.to_tree`),
which torch's ``state_dict`` saves and ``load_state_dict`` restores.

Leaves are named for masks and labels by the group's ``param_names`` (torch keeps them when
the optimizer is given ``model.named_parameters()``), else by their position in the group.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import numpy as np
import torch

from ..base import Transform
from ..combine import Held
from ..engine import setup, update_
from ..interop import dtensor
from ..state import State, _shown, from_tree, to_tree
from ..transforms.average import averaged as uo_averaged
from ..tree import flatten, flatten_leaves
from . import plans
from .state_dict import _step_count

KEY = "uniopt.group{}"
GROUP = "uniopt.group"  # a group's one state, in state_dict(), under its first parameter


def _spec(p: torch.Tensor) -> plans.Spec:
    # a NumPy view where it has the parameter's shape (masks and labels may read shapes); not
    # a bfloat16 tensor's, whose view holds its bits (uint16), for the compiled loop only
    s = plans.spec(p)
    return s if s == plans.PLAIN and p.dtype != torch.bfloat16 else ("torch", None)


def _specs(ps: list[torch.Tensor], tensors: bool = False) -> list[plans.Spec]:
    """How each parameter of a group goes to the engine; ``tensors``: as the tensors
    themselves (a rule that draws random numbers then draws torch's)."""
    specs = [_spec(p) for p in ps]
    if tensors or any(s != plans.PLAIN for s in specs):
        # the engine takes one array library per tree: where a parameter has no plain NumPy
        # view (not contiguous, complex, bfloat16, on a device), every one goes as its tensor
        specs = [("torch", None)] * len(ps)
    return specs


def _views(ps: list[torch.Tensor]) -> list[Any]:
    return [plans._view(p, s) for p, s in zip(ps, _specs(ps), strict=True)]


def _tree(group: dict[str, Any], xs: list[Any]) -> Any:
    names = group.get("param_names")
    if names and len(names) != len(xs):
        # ZeroRedundancyOptimizer hands each rank a share of a group's parameters in a copy
        # of the group that keeps every name
        raise ValueError(
            f"uniopt.torch.Optimizer: a param group has {len(xs)} parameters and "
            f"{len(names)} param_names, which cannot name them (a ZeroRedundancyOptimizer "
            "rank's share of a group keeps all its names): label the leaves by a function of "
            "(path, leaf) instead of their names")
    return dict(zip(names, xs, strict=True)) if names else xs


def showing(group: dict[str, Any]) -> Held:
    """``with showing(group):`` label and mask functions called inside see the group's
    parameters, as ``uo.setup`` of them hands them, not the engine's views of them (NumPy
    arrays, detached tensors)."""
    return Held(lambda: _tree(group, group["params"]))


def _state(opt: Any, gi: int, group: dict[str, Any], rule: Transform,
           views: list[Any]) -> State:
    """The group's state: the one held since the last step, else one set up and filled from
    ``optimizer.state`` (after a load_state_dict)."""
    ps = group["params"]
    records = opt.__dict__.setdefault("_combined", {})
    if records and (gi not in records or records[gi][3] is not group):
        realign(opt)  # (a group removed or moved since: checked here, once a step, not per group)
    held = opt._combined.get(gi)
    key = KEY.format(gi)
    entry = opt.state.get(key)
    if (held is None or held[0] is None or held[1] != _kinds(views, ps)
            or entry is not held[2] or held[0].state_dtype != group.get("state_dtype")):
        _refuse_reordered(opt, gi, group, held, entry)
        # (new parameters, or ones of a new dtype or layout since, model.to(torch.float64)
        # after a step: a state set up for them and filled from the last, cast as a load casts)
        with showing(group):
            state = setup(rule, _tree(group, views), state_dtype=group.get("state_dtype"))
        if entry:
            try:
                state = from_tree(state, entry, _load, f"{opt._name}: state[{key!r}]")
            except ValueError as e:
                if held is None or held[0] is None or held[0].treedef.num_leaves == len(ps):
                    raise
                # (a state over the group's parameters cannot take one more, but where a
                # partition routes it to a member that keeps nothing for it)
                raise ValueError(
                    f"{opt._name}: param group {gi} has {len(ps)} parameters, its state "
                    f"(state[{key!r}]) {held[0].treedef.num_leaves} (one appended to its "
                    f"params, or removed): {rule.name} keeps one state over the group's "
                    "parameters, and cannot take them as they are now; give new parameters a "
                    "group of their own (add_param_group), or start the group anew "
                    f"(del optimizer.state[{key!r}])") from e
        return state
    return held[0]


def realign(opt: Any) -> None:
    """Each group's state moved to the key of the group's position now, where groups were
    removed or reordered (``param_groups.pop(0)``) since the step that wrote it: a state is
    keyed by position, and group 1's state handed to the group now first stepped it with
    another group's moments. A removed group's state goes with it; a key written since
    (a load, ``del optimizer.state[key]``) stays as written."""
    held = opt.__dict__.get("_combined")
    groups = opt.param_groups
    if not held or all(gi < len(groups) and h[3] is groups[gi] for gi, h in held.items()):
        return
    at = {id(g): i for i, g in enumerate(groups)}
    moved: dict[int, Any] = {}
    for gi, h in held.items():
        if opt.state.get(KEY.format(gi)) is h[2]:
            del opt.state[KEY.format(gi)]
            now = at.get(id(h[3]))
            if now is not None:
                moved[now] = h
    for gi, h in moved.items():
        opt.state[KEY.format(gi)] = h[2]
    opt._combined = moved


def _refuse_reordered(opt: Any, gi: int, group: dict[str, Any], held: Any, entry: Any) -> None:
    """Raise where group ``gi``'s params were reordered since ``held``, its record, made its
    state ``entry``: the state is one over the group's tree, its per-leaf entries in the
    order then (a partition's members', Kron's factors), and stepped each parameter with
    another's moments. Refused, not followed: a partition's labels of a leaf's place in the
    group would route the parameters otherwise than their states."""
    if held is None or entry is None or entry is not held[2] or not _reordered(held[4], group):
        return
    key = KEY.format(gi)
    raise ValueError(
        f"{opt._name}: the params of param group {gi} were reordered since its state "
        f"(state[{key!r}]) was made: {opt.rule.name} keeps one state over the group's "
        "parameters, in their order then, and would step each with another's; put them back "
        f"in that order, or start the group anew (del optimizer.state[{key!r}])")


def check_orders(opt: Any) -> None:
    """:func:`_refuse_reordered` over every group, before any is stepped or saved (a
    ``state_dict()`` of the state in the order before, loaded, steps the group in the order
    now)."""
    realign(opt)
    records = opt.__dict__.get("_combined")
    if records:
        for gi, group in enumerate(opt.param_groups):
            _refuse_reordered(opt, gi, group, records.get(gi), opt.state.get(KEY.format(gi)))


def owned(opt: Any) -> None:
    """Each group's state that a load (or :func:`adopt`) wrote under its position noted as the
    group's, no state held for it yet, so that :func:`realign` moves it with its group: after
    a load, ``param_groups.pop(0)`` handed the next group the popped one's state."""
    records = opt.__dict__.setdefault("_combined", {})
    for gi, group in enumerate(opt.param_groups):
        entry = opt.state.get(KEY.format(gi))
        if entry is not None and (gi not in records or records[gi][2] is not entry):
            records[gi] = (None, None, entry, group, _order(group))


def check_entry(opt: Any, gi: int, group: dict[str, Any], rule: Transform, entry: Any,
                where: str) -> None:
    """Raise unless ``entry``, group ``gi``'s state as ``state_dict()`` saves it, fits the
    group's parameters and rule, read as the next step reads it (into a state set up for copies
    of the parameters): a load that took it replaced the state, and the step then refused it or
    stepped with what a hand had written (a step of 1.5)."""
    ps = group["params"]
    # (as the class's step sees them: Kron's and Sophia-H's draw torch's numbers, as tensors)
    views = [plans._view(p, s) for p, s in zip(
        ps, _specs(ps, getattr(opt, "_group_tensors", False)), strict=True)]
    with showing(group):
        state = setup(rule, _tree(group, views), state_dtype=group.get("state_dtype"))
    # read, not written: the template's arrays stay as set up (no copy of the parameters, one
    # throw-away state at the load, as the first step after it would set up anyway)
    from_tree(state, containers(entry), _fits, f"{where}: state[{KEY.format(gi)!r}]")


def adopt(opt: Any) -> None:
    """Each group's state that a load left in a parameter's state (under :data:`GROUP`, as
    ``state_dict()`` writes it) moved to where the step reads it: the newest the optimizer
    has. ``ZeroRedundancyOptimizer.load_state_dict`` writes each parameter's saved state into
    its local optimizer's ``state`` itself, never calling ``load_state_dict``."""
    realign(opt)
    state = opt.state
    if plans.unchanged(vars(opt).get("_adopted"), state):
        return  # (nothing written since: every step asks)
    for gi, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            st = state.get(p)
            if not isinstance(st, dict) or GROUP not in st:
                continue
            if j:
                # a group's state is a tree over its parameters: read by other ones, it
                # would step them with the wrong numbers
                raise ValueError(
                    f"{opt._name}: parameter {j} of group {gi} holds a group's state "
                    f"({GROUP!r}), which the group's first parameter keeps: the state was "
                    "saved with the parameters grouped otherwise (a ZeroRedundancyOptimizer "
                    "of another world size shares them out otherwise); load it on the "
                    "layout that saved it")
            state[KEY.format(gi)] = containers(st[GROUP])
            rest = {k: v for k, v in st.items() if k != GROUP}
            if rest:
                state[p] = rest
            else:
                del state[p]
    owned(opt)
    adopted(opt)


def adopted(opt: Any) -> None:
    """Notes that ``opt.state`` holds no group's state in a parameter's (:func:`adopt`)."""
    opt._adopted = plans.seen_as(opt.state)


def containers(x: Any) -> Any:
    """``x`` with its dicts and lists new (the tensors in them the same)."""
    if isinstance(x, dict):
        return {k: containers(v) for k, v in x.items()}
    return [containers(v) for v in x] if isinstance(x, list) else x


def averaged(opt: Any, gi: int, group: dict[str, Any], rule: Transform,
             name: str | None) -> dict[torch.Tensor, torch.Tensor]:
    """Each parameter of group ``gi`` mapped to its averaged weights (uniopt.averaged)."""
    ps = group["params"]
    views = _views(ps)
    state = _state(opt, gi, group, rule, views)
    with showing(group):  # (a partition's member is found by its labels)
        out = flatten(uo_averaged(state, _tree(group, views), name))[0]
    return {p: torch.as_tensor(a).clone()
            for p, a in zip(flatten(_tree(group, ps))[0], out, strict=True)}


def eval_weights(opt: Any, gi: int, group: dict[str, Any], rule: Transform,
                 back: bool = False) -> dict[torch.Tensor, torch.Tensor]:
    """Each parameter of group ``gi`` that a schedule-free member steps mapped to its evaluation
    weights (:func:`uniopt.schedule_free_eval`); none where no member is schedule-free.
    ``back``: the parameters hold those, and their training weights come out."""
    from ..rules.schedule_free import _eval_weights

    ps = group["params"]
    views = _views(ps)
    state = _state(opt, gi, group, rule, views)
    leaves, treedef = flatten_leaves(_tree(group, views))
    with showing(group):
        xs = _eval_weights(state, treedef, leaves, back)
    if xs is None:
        return {}
    return {p: torch.as_tensor(x).clone() for p, x in
            zip(flatten(_tree(group, ps))[0], xs, strict=True) if x is not None}


def every_gradient(opt: Any, name: str, why: str) -> None:
    """A ValueError naming the parameters without a gradient, group by group, before any group
    is written: a class whose groups step as one tree (``why``: what that means for it)."""
    for gi, group in enumerate(opt.param_groups):
        missing = [i for i, p in enumerate(group["params"]) if p.grad is None]
        if missing:
            raise ValueError(f"uniopt.torch.{name}: parameter(s) {missing} of param group {gi} "
                             f"have no gradient: {why}")


def prepare(opt: Any, gi: int, group: dict[str, Any], rule: Transform,
            tensors: bool = False) -> tuple[State, Any, Any]:
    """Group ``gi``'s state, params and gradients as its engine step takes them; ``tensors``:
    the engine sees the tensors themselves, not NumPy views (a rule that draws random numbers
    then draws torch's)."""
    ps = group["params"]
    if dtensor.any_dtensor(ps):
        dtensor.check_rule(rule)  # raises: a combinator is a whole-tree part
    specs = _specs(ps, tensors)
    views = [plans._view(p, s) for p, s in zip(ps, specs, strict=True)]
    grads = [None if p.grad is None else plans._grad_view(p.grad, p, s)
             for p, s in zip(ps, specs, strict=True)]
    state = _state(opt, gi, group, rule, views)
    return dataclasses.replace(state, rule=rule), _tree(group, views), _tree(group, grads)


def step(opt: Any, gi: int, group: dict[str, Any], rule: Transform, tensors: bool = False,
         prepared: tuple[State, Any, Any] | None = None, **extra: Any) -> None:
    """One step of group ``gi`` (:func:`prepare`'s arrays, where the caller made them);
    ``extra``: the step's extra arguments (``hvp=``)."""
    state, params, grads = prepared or prepare(opt, gi, group, rule, tensors)
    key = KEY.format(gi)
    # (a rule made anew, a scheduled group's at each step, asks its labels again)
    with showing(group):
        state = update_(state, params, grads, **extra)
    entry = _shared(to_tree(state))
    opt.state[key] = entry
    views = list(params.values()) if isinstance(params, dict) else params  # (group order)
    opt._combined[gi] = (state, _kinds(views, group["params"]), entry, group, _order(group))


def _order(group: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...] | None]:
    """The group's parameters and names, as its state is made for them: held, so that the ids
    of the record's kinds (:func:`_kinds`) are of live tensors, never of new ones at a freed
    one's address."""
    names = group.get("param_names")
    return tuple(group["params"]), None if names is None else tuple(names)


def _reordered(order: tuple[tuple[torch.Tensor, ...], tuple[Any, ...] | None],
               group: dict[str, Any]) -> bool:
    """Whether the group's leaves are its parameters as ``order`` (:func:`_order`) had them,
    but others at some place: the params reordered (``params.reverse()``), or moved against
    their ``param_names``, the tree's keys. One added or removed is not."""
    ps, names = group["params"], group.get("param_names")
    made, made_names = order
    if len(made) != len(ps) or (all(map(operator.is_, ps, made)) and (
            names is None or made_names == tuple(names))) or {*map(id, made)} != {*map(id, ps)}:
        return False  # (as made, at every step of Kron's: one pass of identities)
    # (names as many as the params or not: _tree refuses those that cannot name them)
    before = dict(zip(made_names, made, strict=False)) if made_names else dict(enumerate(made))
    now = dict(zip(names, ps, strict=False)) if names else dict(enumerate(ps))
    return before.keys() == now.keys() and any(before[k] is not now[k] for k in now)


def _kinds(views: list[Any], ps: list[torch.Tensor]) -> list[tuple[Any, ...]]:
    """What a group's held state was made for: each parameter, and its array's kind and dtype
    as the engine sees it."""
    return [(id(p), type(v), v.dtype) for p, v in zip(ps, views, strict=True)]


def _shared(x: Any) -> Any:
    """``x`` with each NumPy array as a tensor sharing its memory."""
    if isinstance(x, dict):
        return {k: _shared(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shared(v) for v in x]
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x


def _fits(value: Any, like: Any, where: str) -> Any:
    """``value`` checked against the template's ``like``, nothing written: a step count (``like``
    an int) as a parameter's own step is checked, a whole number >= 0 (a number or a 0-d
    tensor); the per-leaf counts (``like`` None) as their values on the host; an array by its
    shape."""
    if type(like) is int:
        n = None if getattr(value, "ndim", 0) else _step_count(value)
        if n is None:
            raise ValueError(f"{where}: {_shown(value)} is not a whole number of steps >= 0")
        return n
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(value).__name__}")
    if like is None:
        return value.detach().cpu().numpy()
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{where}: shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    return like


def _load(value: Any, like: Any, where: str) -> Any:
    """:func:`_fits`, then the saved tensor copied into the state's array ``like`` (the step
    counts: a copy of their values)."""
    fitted = _fits(value, like, where)
    if like is None:
        return fitted.copy()
    if type(like) is int:
        return fitted
    if isinstance(like, np.ndarray):
        like[...] = value.numpy()
    else:
        like.copy_(value)
    return like


"""What ``load_state_dict`` checks before torch's loads anything: torch matches a state to the
parameters by position without looking, so a state of another optimizer or model would load."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from .. import quant
from ..base import Combinator, Minimizer, Transform, WholeTree
from ..engine import check_tree_shapes
from ..interop import dtensor
from ..state import State


class Loading(Protocol):
    """What the check reads of the optimizer (:class:`uniopt.torch.Optimizer`)."""

    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]
    _absent_defaults: ClassVar[dict[str, Any]]
    _state_keys: ClassVar[frozenset[str]]
    _unread_keys: ClassVar[frozenset[str]]

    @property
    def _name(self) -> str: ...

    def _group_rule(self, group: dict[str, Any]) -> Transform: ...

    def _filled(self, group: dict[str, Any]) -> dict[str, Any]: ...

    def _slot_names(self, rule: Transform) -> list[tuple[str, str]]: ...

    def _known_slots(self, rule: Transform) -> set[str]: ...


def check_loadable(opt: Loading, sd: Any) -> None:
    """Raise unless ``sd`` has ``opt``'s groups and group sizes, valid group values, and for
    each parameter the slots its group's rule keeps, shaped as the parameter."""
    where = f"{opt._name}.load_state_dict"
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(
            f"{where}: expected a dict with 'state' and 'param_groups' (from state_dict()), "
            f"got {type(sd).__name__}; nothing was loaded"
        )
    saved = sd["param_groups"]
    if not isinstance(saved, (list, tuple)) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in saved):
        raise TypeError(
            f"{where}: the state's param_groups must be a list of dicts, each with its 'params' "
            f"(a list of ids), got {_shape_of(saved)}; nothing was loaded")
    if not isinstance(sd["state"], dict):
        raise TypeError(
            f"{where}: the state's state must be a dict of each parameter's state (a dict), "
            f"found {type(sd['state']).__name__}; nothing was loaded")
    if len(saved) != len(opt.param_groups):
        raise ValueError(
            f"{where}: the state has {len(saved)} parameter groups, this optimizer has "
            f"{len(opt.param_groups)}; nothing was loaded"
        )
    owner: dict[Any, tuple[int, int, torch.Tensor, Transform, dict[str, Any]]] = {}
    rules: list[Transform] = []
    for gi, (s, g) in enumerate(zip(saved, opt.param_groups, strict=True)):
        if len(s["params"]) != len(g["params"]):
            raise ValueError(
                f"{where}: parameter group {gi} of the state has {len(s['params'])} "
                f"parameters, this optimizer's has {len(g['params'])}; nothing was loaded"
            )
        # (a key of the class's own a group lacks is its default, not the constructor's)
        values = opt._filled({**{k: v for k, v in opt.defaults.items()
                                 if k not in opt._absent_defaults},
                              **{k: v for k, v in s.items() if k != "params"}})
        try:
            rule = opt._group_rule(values)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: parameter group {gi} of the state: {e}") from None
        rules.append(rule)
        for j, (k, p) in enumerate(zip(s["params"], g["params"], strict=True)):
            owner[k] = (gi, j, p, rule, values)
    counts: dict[int, dict[int, Any]] = {}  # of groups whose rule steps them together
    for k, st in sd["state"].items():
        if k not in owner:
            # (a key of no parameter is kept as it is, as torch keeps it: a script's own
            # counter, optimizer.state["step"] = n)
            continue
        if not isinstance(st, dict):
            raise TypeError(
                f"{where}: the state's state must be a dict of each parameter's state (a "
                f"dict), found {type(st).__name__} for parameter {k!r}; nothing was loaded")
        if not st:
            continue
        gi, j, p, rule, values = owner[k]
        what = f"the state of parameter {k} (group {gi}, position {j})"
        if "step" in st:
            if isinstance(st["step"], np.ndarray):
                # (torch's load casts a state's sequences element by element: a 0-d array
                # fails "iteration over a 0-d array", naming nothing)
                raise TypeError(
                    f"{where}: {what} has step {st['step']!r}, a numpy.ndarray, which torch's "
                    "load cannot take: make it a number or a tensor (torch.as_tensor); nothing "
                    "was loaded")
            step = _step_count(st["step"])
            if step is None:
                raise ValueError(f"{where}: {what} has step {st['step']!r}, not a whole number "
                                 "of steps >= 0; nothing was loaded")
            if rule.tree_layout:
                counts.setdefault(gi, {})[k] = step
        known = opt._known_slots(rule) | {"step"}
        q8 = values.get("state_dtype") == "q8"
        if q8:  # an 8-bit slot's block scales (uniopt.torch.plans.ABSMAX)
            known |= {f"{n}.absmax" for n in known - {"step"}}
        # (a key of no optimizer's is a wrapper's, kept as torch keeps it: timm's Lookahead
        # keeps its slow weights in the optimizer's own state)
        extra = sorted(n for n in set(st) - known if _another_optimizers(n))
        if extra:
            raise ValueError(
                f"{where}: {what} has slots {extra} that {opt._name} does not keep (it "
                f"keeps {sorted(known)}): is it the state of another optimizer? nothing "
                "was loaded"
            )
        shapes = rule.slot_shapes_of(tuple(p.shape))
        expected = {name: shapes.get(key) for key, name in opt._slot_names(rule)}
        names = {name for name, shape in expected.items() if shape is not None}
        needed = sorted(names - set(st) - {"momentum_buffer"})
        if needed:
            raise ValueError(f"{where}: {what} lacks the slots {needed}; nothing was loaded")
        counted = sorted((names & set(st)) - {"momentum_buffer"})
        if counted and "step" not in st:
            # (torch's SGD keeps no step, its momentum buffer meaning one: any other slot's
            # steps are counted, torch's classes fail at their next step without it, and a
            # count taken as 1 would undo Adam's bias correction)
            raise ValueError(f"{where}: {what} has {counted} but no step; nothing was loaded")
        for name, v in st.items():
            # (a whole-tree part's state, kept by the group's first parameter: any tree; and a
            # wrapper's, as it keeps it)
            if name == "step" or name in rule.tree_layout or name not in known:
                continue
            if not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"{where}: {what} has {name} of type {type(v).__name__}, not a tensor; "
                    "nothing was loaded"
                )
            want = expected.get(name, tuple(p.shape))
            if q8 and name.endswith(".absmax"):
                if dtensor.is_dtensor(p) and dtensor.is_dtensor(v):
                    # a row of scales per shard: this rank's must be of its own shard
                    dtensor.check_q8(v, p, f"{where}: {what}: {name}; nothing was loaded")
                    continue
                want = (quant.blocks(p.numel()),)
            if want is None or tuple(v.shape) != want:
                keeps = "keeps no such slot" if want is None else f"keeps it in shape {want}"
                raise ValueError(
                    f"{where}: {what} has {name} of shape {tuple(v.shape)}, but that "
                    f"parameter has shape {tuple(p.shape)} and {keeps}; nothing was loaded"
                )
    for gi, s in enumerate(saved):  # (after the slots: another optimizer's state says so)
        stateless = [k for k in s["params"] if not sd["state"].get(k)]
        check_group_keys(where, gi, s, opt.defaults, opt._unread_keys,
                         opt._state_keys, stateless)
    for gi, steps in counts.items():
        if len(set(steps.values())) > 1:
            # (a whole-tree part, Prodigy's or DoG's, keeps one state for the group, stepped
            # with every parameter at once)
            raise ValueError(
                f"{where}: the parameters of group {gi} are at steps {steps} (parameter: step), "
                f"but {owner[next(iter(steps))][3].name} steps a group's parameters together; "
                "nothing was loaded"
            )
    for gi, (s, g) in enumerate(zip(saved, opt.param_groups, strict=True)):
        _check_trees(where, gi, s["params"], g["params"], rules[gi], sd["state"],
                     max(counts.get(gi, {}).values(), default=0))


def _check_trees(where: str, gi: int, ids: list[Any], ps: list[torch.Tensor], rule: Transform,
                 state: dict[Any, Any], count: int) -> None:
    """Raise where the saved states of group ``gi``'s whole-tree parts (kept by its first
    parameter, ``ids[0]`` in ``state``) are not of this rule for these parameters, as its step
    would refuse them: a state of parameters of other shapes, or one without the part's state
    after ``count`` steps (another rule's), loaded and every later step failed, the
    optimizer's own state gone."""
    if not rule.tree_layout or not ps:
        return
    first = state.get(ids[0])
    held = first if isinstance(first, dict) else {}
    # (a combinator's state is the group's, checked by combined.check_entry)
    parts = [(part, key) for part, (key,) in (
        (part, keys) for part, keys in rule.keyed_parts if isinstance(part, WholeTree))
        if not isinstance(part, Combinator)]
    for part, key in parts:
        if (key not in held and count and not isinstance(part, Minimizer)
                and (part.like_params or part.uses_params)):
            # (the step refuses it so, plans._refuse_tree_of_others; a part without a state of
            # the parameters makes its own afresh)
            raise ValueError(
                f"{where}: the state of parameter {ids[0]} (group {gi}, position 0) lacks "
                f"{key!r}, the state of {rule.name}'s {part.name} over the group's "
                f"parameters, which have taken {count} steps: is it the state of another "
                "optimizer? nothing was loaded")
    trees = {key: held[key] for _, key in parts if key in held}
    if not trees:
        return
    leaves = [torch.view_as_real(p.detach()) if p.is_complex() else p.detach() for p in ps]
    try:
        check_tree_shapes(State(rule, count, {}, None, None, trees),
                          [f"parameter {j} of group {gi}" for j in range(len(ps))], leaves,
                          [tuple(p.shape) for p in leaves])
    except ValueError as e:
        raise ValueError(f"{where}: {e}; nothing was loaded") from None


# the modules that wrap a model and put their name in its parameters' (torch.compile's, DDP's
# and DataParallel's, FSDP1's, activation checkpointing's): a run resumed with or without one
_WRAPPERS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module",
                       "_checkpoint_wrapped_module"})


def _bare(name: Any) -> Any:
    return ".".join(s for s in name.split(".") if s not in _WRAPPERS) if isinstance(
        name, str) else name


def renamed(opt: Loading, sd: Any) -> str | None:
    """Where the state's ``param_names`` (kept by an optimizer made of ``named_parameters()``)
    are this optimizer's in another order, what to warn: torch's ``load_state_dict`` goes by
    position and never looks at them, so a state saved with the parameters in another order
    loads into the wrong ones (each of the same shape: others are refused), silently. Not
    refused: torch loads it. Names compared without the wrappers' parts (``_orig_mod.`` of a
    compiled model, ``module.`` of DDP's); other names that differ say nothing (a model
    renamed since, a module moved, keeps its order)."""
    for gi, (s, g) in enumerate(zip(sd["param_groups"], opt.param_groups, strict=True)):
        saved, here = s.get("param_names"), g.get("param_names")
        if not isinstance(saved, (list, tuple)) or not isinstance(here, (list, tuple)):
            continue
        saved, here = list(map(_bare, saved)), list(map(_bare, here))
        try:
            permuted = saved != here and sorted(saved) == sorted(here)
        except TypeError:  # (names that are not strings: a hand's)
            permuted = False
        if permuted:
            at = next(j for j, (a, b) in enumerate(zip(saved, here, strict=True)) if a != b)
            return (f"{opt._name}.load_state_dict: parameter group {gi}'s param_names differ "
                    f"at position {at}: {saved[at]!r} in the state, {here[at]!r} here. The "
                    "state of each position goes to this optimizer's parameter at that "
                    "position, as torch loads it (by position, never by name): where the "
                    "parameters were given in another order, reorder them, or map the state "
                    "by name with a load_state_dict pre-hook")
    return None


def _shape_of(groups: Any) -> str:
    """What a param_groups value that is no list of groups is, in a word or two."""
    if not isinstance(groups, (list, tuple)):
        return type(groups).__name__
    bad = next(g for g in groups if not (isinstance(g, dict)
                                         and isinstance(g.get("params"), (list, tuple))))
    if not isinstance(bad, dict):
        return f"a group that is {type(bad).__name__}"
    return "a group without its params" if "params" not in bad else \
        f"a group whose params are {type(bad['params']).__name__}"


# the per-parameter state names of torch.optim's optimizers: one in a loaded state that this
# optimizer does not keep says the state is another optimizer's
_TORCH_SLOTS = frozenset({
    "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg",
    "acc_delta", "sum", "exp_inf", "mu_product", "eta", "mu", "ax", "prev", "step_size",
    "row_var", "col_var", "variance", "func_evals", "n_iter", "d", "t", "old_dirs", "old_stps",
    "ro", "H_diag", "prev_flat_grad", "prev_loss", "al"})


def _another_optimizers(name: Any) -> bool:
    """Whether state name ``name`` is a slot of another optimizer: of torch.optim's, of a
    uniopt.torch class's (SophiaG's ``hessian``), of a uniopt rule's (``part.slot``, as
    ``uniopt.torch.Optimizer`` names them) or its 8-bit scales, or the state of a uniopt
    whole-tree part (``scale_by_prodigy``, ``scale_by_dog#1``: its type's name); any other name
    is a wrapper's own (timm's ``lookahead_slow_buff``)."""
    return (not isinstance(name, str) or name in _TORCH_SLOTS or "." in name
            or name in NAMED_SLOTS or name.partition("#")[0] in _tree_parts())


def _tree_parts() -> set[str]:
    """The names of the whole-tree parts' types defined so far (a rule's module imported since
    adds its own)."""
    out, todo = set(), [WholeTree]
    while todo:
        cls = todo.pop()
        out.add(cls.__name__)
        todo += cls.__subclasses__()
    return out


# the state names of every uniopt.torch class (each its rule's slots, by torch's names), which
# each adds as it is made
NAMED_SLOTS: set[str] = set()


def check_group_keys(where: str, gi: int, saved: dict[str, Any], defaults: dict[str, Any],
                     unread: frozenset[str] = frozenset(),
                     state_keys: frozenset[str] = frozenset(), stateless: Any = ()) -> None:
    """Raise where saved group ``gi`` lacks a hyperparameter (a number, tuple, tensor or
    schedule among ``defaults``): the group's rule is made of them, and the constructor's value
    in its place would resume the run with other numbers (torch's step raises a KeyError). Not
    for one torch's class never reads from a group (``unread``: Adagrad's
    ``initial_accumulator_value``), nor for one it reads only when it makes a parameter's state
    (``state_keys``: Rprop's ``lr``) where no parameter of the group is ``stateless`` (the ids
    of those without a saved state): torch loads and steps such a group (the constructor's
    value then takes its place). A missing flag (a bool, None, a name) takes the default, as
    torch's ``__setstate__`` fills in the flags older releases did not save."""
    lacks = sorted(k for k, v in defaults.items()
                   if k not in saved and not isinstance(v, (bool, str, type(None)))
                   and k not in unread and not (k in state_keys and not stateless))
    if not lacks:
        return
    made = [k for k in lacks if k in state_keys]
    why = (f": {made} starts the state of a parameter without one, as parameter "
           f"{list(stateless)[0]!r} is here" if made else "")
    raise ValueError(f"{where}: parameter group {gi} of the state lacks {lacks}, of which its "
                     "rule is made (this optimizer's values would take their place, and the run "
                     f"resume with other numbers{why}); nothing was loaded")


def _step_count(x: Any) -> int | None:
    """A loaded state's step count (a number, a NumPy scalar, or a one-element real tensor:
    torch keeps it so), or None where it is not a whole number >= 0."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex():
            return None
        x = x.item()
    elif isinstance(x, np.generic):  # (torch's load takes them too; not an array)
        if np.iscomplexobj(x):
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    if not (math.isfinite(x) and x >= 0 and x == int(x)):
        return None
    return int(x)

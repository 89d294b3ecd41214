"""setup / update / update_ / adjust: walk the tree, resolve hyperparameters once, run the parts.

The engine knows nothing of any particular algorithm: it asks the rule for its parts, resolves
each part's schedules for the current step (the one place that happens), validates everything,
and only then touches an array, so a bad input never half-updates. A step goes to the first
execution strategy that takes its arrays (:mod:`uniopt.fast`), else to the reference path here:
each part on whole arrays of any library. Pure and in-place updates share one prologue and one
loop; only the final write differs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import itertools
import math
import operator
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from typing import Any, TypeVar, cast

import numpy as np
import optree

from . import backend, fast, quant
from .backend import is_variable
from .base import (
    Combinator,
    Elementwise,
    Minimizer,
    Part,
    PerLeaf,
    Transform,
    WholeTree,
    assemble,
    chain,
    declared,
    makes_step,
    members,
)
from .hyper import _traced, did_you_mean, on_host, with_article
from .interop import dtensor
from .interop.jax import (
    adjusted,
    batched,
    flatten_rule,
    register_state,
    rewrapped,
    unflatten_rule,
)
from .state import AnyParams, State, stepped
from .tree import NAMESPACE, flatten_leaves, flatten_named, unflatten

# the names of an engine call's leaves where its caller knows them better than the flat list's
# "params[i]" it is handed: uniopt.torch names a parameter by its index in its group (a run of
# the group's step holds some of them) and the group by its index, where there are several
LEAF_NAMES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "uniopt_leaf_names", default=None)


def _leaves(params: Any, what: str = "params", kinds: bool = True
            ) -> tuple[list[Any], Any, list[str]]:
    """``params`` flattened, with the names its caller gave (:data:`LEAF_NAMES`) where it did;
    ``kinds``: each leaf checked to be a floating array of one library."""
    leaves, treedef, names = flatten_named(params)
    given = LEAF_NAMES.get()
    if given is not None and len(given) == len(names):
        names = given
    if not kinds:
        return leaves, treedef, names
    first = None
    for i, leaf in enumerate(leaves):
        if not backend.is_array(leaf):
            if isinstance(params, State):  # (update(params, state, grads))
                raise TypeError(f"the {what} given are a uniopt State: the state comes first, "
                                "update(state, params, grads)")
            hint = (f" (a dataclass: uniopt.register_dataclass({type(leaf).__name__}) makes "
                    "its fields nodes of the tree)" if dataclasses.is_dataclass(leaf) else "")
            raise TypeError(
                f"{names[i]} is {with_article(type(leaf).__name__)}, not an array: {what} "
                f"leaves must be arrays (or None){hint}"
            )
        k = backend.kind(leaf)
        if k.refused:
            raise TypeError(f"{names[i]} is {k.refused}")
        if first is None:
            first = (k.library, names[i])
        elif k.library != first[0]:
            raise TypeError(
                f"{names[i]} is a {k.library} array but {first[1]} is a {first[0]} array: the "
                f"{what} of one optimizer must come from one array library"
            )
        if not k.floating:
            raise TypeError(f"{names[i]} has dtype {leaf.dtype}; uniopt updates floating arrays "
                            "(real, or complex as the pairs of their parts): leave a model's "
                            "integer arrays out of the params (equinox: eqx.filter(model, "
                            "eqx.is_inexact_array); flax: nnx.Param only)")
        if k.low and backend.float_bits(leaf.dtype) < 16:
            # their moments would underflow (Adam's g**2 in float8_e4m3fn is 0 below 0.04, and
            # it has no infinity: m / sqrt(v) is NaN), and torch has no arithmetic in them
            raise TypeError(f"{names[i]} has dtype {leaf.dtype}; uniopt updates floats of 16 "
                            "bits or more: keep the parameters in bfloat16 or float32 and cast "
                            "them to 8 bits where the model reads them")
    return leaves, treedef, names


def _real_only(rule: Transform) -> str | None:
    """What of ``rule`` takes real params only, in words, or None: its first registry rule
    (itself, or a chain's member) whose ``Info.complex`` is False, else its first part marked
    ``real_only`` (a hand-built chain's, or a combinator's own: mechanize's). Their
    arithmetic on the pairs of a complex leaf's parts is not known to be right (a row and
    column factor, a matrix iteration, a distance), where it did not fail on their shapes:
    some stepped silently."""
    # (chains and combinators opened: uniopt.torch hands a combinator's members the pairs,
    # where their own set-up would not see a complex leaf)
    inner = [m for _, m in members(rule)]
    named = next((m.name for m in inner if getattr(type(m), "info", None) is not None
                  and not getattr(type(m), "info").complex), None)  # noqa: B009
    if named is not None:
        return f"{named} takes real params only (the registry's Info.complex)"
    part = next((p for m in inner for p in m.flat_parts if p.real_only), None)
    if part is None:  # a combinator's own arithmetic (mechanize's inner products of the tree)
        part = next((c for c in _combinators(rule) if c.real_only), None)
    return None if part is None else f"{part.name} takes real params only (Part.real_only)"


def _as_pairs_or_whole(rule: Transform) -> bool:
    """Whether a step of complex params hands ``rule``'s parts the real pairs of each complex
    leaf (:func:`_as_pairs`; True), or the complex leaves as they are (False): where every
    part takes them so (``takes_complex``: a combinator, whose members each step their
    leaves as pairs; an optax transformation, optax's own arithmetic). Such a part beside
    others, which see the pairs as a flat list, is refused: it routes the leaves by their
    paths, or runs optax on the tree."""
    takes = [isinstance(p, WholeTree) and p.takes_complex for p in rule.flat_parts]
    if all(takes):
        return False
    if any(takes):
        part = next(p for p, t in zip(rule.flat_parts, takes, strict=True) if t)
        raise TypeError(
            f"{rule.name}: complex params step as the real pairs of their parts, which "
            f"{part.name} cannot take beside the chain's other parts (it sees the params' "
            "tree); put those parts inside it (in its members), or step real params")
    return True


# the array API version whose Python scalars in where, maximum, clip... the parts rely on
ARRAY_API = "2024.12"


def _library_check(rule: Transform, names: list[str], leaves: list[Any]) -> None:
    """Refuse params of a library the rule does not run on (the registry's ``Info.backends``:
    Kron's and the line search's NumPy calls failed inside array-api-strict), of one without
    a linalg function or a dtype that a part declares (:attr:`Part.linalg`,
    :attr:`Part.casts_to`: dask's eigh, NumPy's bfloat16 for Muon's ``ns_dtype``), and of an
    array-API library set to a standard older than :data:`ARRAY_API` (a raw AttributeError
    from inside it, at the step)."""
    if not leaves:
        return
    lib = backend.library(leaves[0])
    # (NumPy's subclasses are NumPy's; flax's and equinox's nodes that hold a JAX array JAX's)
    where = "numpy" if isinstance(leaves[0], np.ndarray) else "torch" if backend.is_torch(
        leaves[0]) else lib if lib == "jax" else "jax" if backend.jax_array_of(
        leaves[0]) is not None else "array_api"
    xp = backend.namespace(leaves[0]) if where == "array_api" else None
    for part in _registered(rule):
        info = getattr(type(part), "info")  # noqa: B009
        if where not in info.backends:
            raise TypeError(f"setup: {part.name} runs on {', '.join(info.backends)} arrays (the "
                            f"registry's Info.backends); {names[0]} comes from {lib}")
    if xp is not None:
        # (an optional extension of the standard: dask's namespace has no eigh, and the step
        # raised an AttributeError from inside the part, a bare part in a chain too)
        for _, m in members(rule):
            for f in declared(m, "linalg"):
                if not hasattr(getattr(xp, "linalg", None), f):
                    raise TypeError(f"setup: {m.name} calls the array API's linalg.{f}, which "
                                    f"{lib}'s namespace does not have; {names[0]} comes from it")
    for _, m in members(rule):
        for f in declared(m, "casts_to"):
            if getattr(xp or backend.namespace(leaves[0]), f, None) is None:
                raise TypeError(f"setup: {m.name} computes in {f}, which {lib}'s namespace "
                                f"does not have; {names[0]} comes from it")
    version = getattr(xp, "__array_api_version__", None)
    if isinstance(version, str) and version < ARRAY_API:
        raise TypeError(f"setup: uniopt needs the array API standard {ARRAY_API} or later "
                        f"(Python scalars beside arrays); {lib} is set to {version}")


def _registered(rule: Transform) -> list[Transform]:
    """``rule`` and the members of its chains that are registry rules (with an ``info``)."""
    if isinstance(rule, chain):
        return [r for t in rule.transforms for r in _registered(t)]
    return [rule] if getattr(type(rule), "info", None) is not None else []


def _once_each(names: list[str], leaves: list[Any], views: bool = True,
               writes: bool = False, storages: bool = False) -> None:
    """Refuse an array that is two leaves of the tree, or two leaves that share memory (views
    of one array), but JAX's (immutable arrays, two leaves that start equal): a tied weight's
    steps in place were its last leaf's on one path and both leaves' on the other, and a pure
    step untied it. Views of one buffer that share no element are leaves like any other.
    ``storages`` (set-up, once): torch tensors made to share memory with ``Tensor.set_`` too
    (see :func:`backend.overlapping`), which no step looks for."""
    if len(set(map(id, leaves))) != len(leaves):
        first: dict[int, str] = {}
        for name, leaf in zip(names, leaves, strict=True):
            if id(leaf) in first and not backend.is_jax(leaf):
                raise ValueError(f"{name} is the same array as {first[id(leaf)]}: a tied weight "
                                 "is one parameter; give it once, with the sum of its gradients")
            first.setdefault(id(leaf), name)
    if views:  # (False: the caller found no view among these, or among them and more)
        _apart(names, leaves, writes=writes, storages=storages)


def _apart(names: list[str] | None, leaves: list[Any], params: Any = None,
           writes: bool = False, storages: bool = False) -> None:
    """Refuse two leaves that are views sharing memory (costs a look at each leaf's base only,
    where none is a view), and where the step ``writes`` them in place, a leaf that repeats
    its own elements. ``names``: the leaves' (None: made from ``params`` if needed). A list of
    NumPy arrays found apart is remembered (their memory is theirs for life): the check of
    columns of one matrix, every pair's, is not made at every step."""
    if not backend.has_views(leaves) and not (storages and leaves
                                              and backend.is_torch(leaves[0])):
        return
    known = len(_APART) == len(leaves) and all(
        r() is x for r, x in zip(_APART, leaves, strict=True))
    if known and (_APART_WRITABLE[0] or not writes):
        return
    if writes:
        for k, x in enumerate(leaves):
            # a stride of 0 over an axis of more than one element, in an array that has some
            # (NumPy gives an empty one strides of 0): a writable broadcast view, which an
            # in-place step would write once per repeat, the last repeat's value winning
            steps = backend.strides(x)
            if steps is not None and 0 in steps and 0 not in x.shape and any(
                    n > 1 and st == 0 for n, st in zip(x.shape, steps, strict=True)):
                name = (flatten_named(params)[2] if names is None else names)[k]
                raise ValueError(f"update_ cannot write {name} in place: it repeats its elements "
                                 "in memory (a stride of 0, as a broadcast or expanded view "
                                 "has); step a copy of its own")
            if steps is not None and len(steps) > 1 and not (
                    (x.flags.c_contiguous or x.flags.f_contiguous) if type(x) is np.ndarray
                    else x.is_contiguous() if hasattr(x, "is_contiguous") else True
            ) and backend.repeats(x):
                # rows that overlap (as_strided): torch's loops step a shared element once
                # per place, one pass from the old values once, the other updates lost
                name = (flatten_named(params)[2] if names is None else names)[k]
                raise ValueError(f"update_ cannot write {name} in place: its elements overlap "
                                 f"in memory (shape {tuple(x.shape)}, strides {steps}); step "
                                 "a copy of its own")
        if known:
            _APART_WRITABLE[0] = True
            return
    pair = backend.overlapping(leaves, storages)
    if pair is None:
        if all(type(x) is np.ndarray for x in leaves):
            _APART[:] = map(weakref.ref, leaves)
            _APART_WRITABLE[0] = writes
        return
    names = flatten_named(params)[2] if names is None else names
    i, j = pair
    raise ValueError(f"{names[j]} shares memory with {names[i]} (views of one array, or tensors "
                     "of one storage): a tied weight is one parameter; give it once, with the "
                     "sum of its gradients")


# the state dtypes set-up takes (None: the params' own)
STATE_DTYPES = ("float32", "float64", "q8")

_APART: list[Any] = []  # weak references: the arrays are not kept alive by this
_APART_WRITABLE = [False]  # whether those were found to repeat no element, too


def setup(rule: Transform, params: Any, *, state_dtype: str | None = None) -> State:
    """The initial state of ``rule`` for ``params`` (any pytree of arrays).

    ``state_dtype`` (e.g. ``"float32"``) keeps the slots in that dtype (and the states of
    whole-tree parts in the wider of it and their leaves') and computes each step in the wider
    of it and the parameters' dtype, rounding only the new parameters to their own dtype:
    float16/bfloat16 parameters with float32 moments, without overflow in ``g**2``; float64
    parameters with float32 moments, stepped in float64. ``state_dtype="q8"`` keeps
    each slot in 8 bits (:mod:`uniopt.quant`: one byte per element and a float32 scale per
    block of 2048) and computes each step in float32, float64 parameters too (their values
    then carry float32's precision).

    >>> import numpy as np, uniopt as uo
    >>> state = uo.setup(uo.adam(), {"w": np.zeros(3)})
    >>> state.step, sorted(state.slots)
    (0, ['scale_by_adam.exp_avg', 'scale_by_adam.exp_avg_sq'])
    """
    if not isinstance(rule, Transform):
        raise TypeError(f"setup: expected a uniopt rule or transform, got {rule!r}")
    leaves, treedef, names = _leaves(params)
    if any(is_variable(type(x)) for x in leaves):
        # flax NNX sets a rule up from its Params: the state is made of their arrays (a
        # zeros_like of a Param under an explicit mesh asks JAX to abstract the Param itself,
        # which it refuses)
        leaves = list(map(backend.held_array, leaves))
        params = unflatten(treedef, leaves)
    traced = _traced_fixed(rule)
    if traced:
        raise TypeError(
            f"setup: {', '.join(traced)} {'is' if len(traced) == 1 else 'are'} fixed when the "
            "rule is made (no hyperparameter) and came traced by jax.jit, as "
            "optax.inject_hyperparams hands every number to a jitted init: name "
            f"{'it' if len(traced) == 1 else 'them'} in its static_args "
            f"(static_args=({', '.join(repr(t.rsplit('.', 1)[-1]) for t in traced)},)), or "
            "run init outside jax.jit"
        )
    _alone(rule)
    _check_shapes(rule, names, leaves)
    _library_check(rule, names, leaves)
    _once_each(names, leaves, storages=True)
    register_state()  # JAX (flax) knows a State from the first one made after its import
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"setup: state_dtype must be 'float32', 'float64' or 'q8', got "
                         f"{state_dtype!r}")
    if state_dtype == "float64" and leaves and backend.jax_array_of(leaves[0]) is not None and \
            sys.modules["jax"].dtypes.canonicalize_dtype(np.float64) != np.float64:
        # (JAX would make float32 slots, which the first step then takes for another state's)
        raise ValueError("setup: state_dtype='float64' on JAX arrays needs 64-bit JAX "
                         "(jax.config.update('jax_enable_x64', True)); without it JAX has no "
                         "float64 arrays")
    check_state_dtype(rule, state_dtype, leaves)
    if state_dtype == "q8":
        quant.register_jax()
        if dtensor.any_dtensor(leaves):
            dtensor.check_q8_rule(rule)
        _refuse_q8_on_meshes(names, leaves)
    complex_ = next((n for n, p in zip(names, leaves, strict=True) if backend.is_complex(p)),
                    None)
    if complex_ is not None:
        check_complex(rule, state_dtype, complex_)
    slots: dict[str, list[Any]] = {}
    trees: dict[str, Any] = {}
    for part, keys in rule.keyed_parts:
        if isinstance(part, WholeTree):
            _tree_library(leaves, part)
            # a combinator's members keep their slots in the dtype asked for, as the rule's
            trees[keys[0]] = (part.init_tree(params, state_dtype) if isinstance(part, Combinator)
                              else part.init_tree(unflatten(treedef, tree_leaves(leaves,
                                                                                 state_dtype))))
        elif keys:
            per_leaf = [_init_slots(part, p, state_dtype) for p in leaves]
            if state_dtype == "q8":
                per_leaf = [_quantised(part.slots, s, p) for s, p in zip(per_leaf, leaves,
                                                                          strict=True)]
            for k, key in enumerate(keys):
                slots[key] = [s[k] for s in per_leaf]  # None: a leaf of that shape keeps none
    # a JAX state counts in a JAX array, as optax's do: a Python int would be static to
    # equinox's filter_jit (a recompile every step) and weakly typed to jax.jit
    step: Any = 0
    # (flax NNX sets up from its Params, and steps with the arrays they hold)
    first = backend.jax_array_of(leaves[0]) if leaves else None
    if first is not None:
        xp = backend.namespace(first)
        # the counter placed as a jitted step returns it beside these params (replicated on
        # their mesh, committed to their device), so the second step does not compile again
        step = backend.placed(xp.asarray(0, dtype=xp.int32), first)
        trees = _counted_like(trees, first)
    return State(rule, step, slots, treedef, state_dtype, trees)


def _counted_like(tree: Any, first: Any) -> Any:
    """``tree`` (a rule's whole-tree states) with each member :class:`State` that counts in a
    Python int holding JAX arrays as a state of leaf ``first`` does: a member of a partition
    or mask given none of the params (a mask that matches no leaf of this model) is set up
    without a leaf to tell its library, so its counter was an int and its whole-tree parts'
    numbers ints, bools and NumPy arrays (accumulate's count, skip_nonfinite's flags, a
    plateau's values, a generator's state); a jitted step hands them back as JAX arrays, and
    the second step missed jit's cache."""
    if isinstance(tree, State):
        if isinstance(tree.step, int):
            return dataclasses.replace(tree, step=_as_jax_like(tree.step, first),
                                       tree_states=_leaves_as_jax(tree.tree_states, first))
        trees = _counted_like(tree.tree_states, first)
        return tree if trees is tree.tree_states else dataclasses.replace(tree,
                                                                          tree_states=trees)
    if isinstance(tree, dict):
        out = {k: _counted_like(v, first) for k, v in tree.items()}
        return tree if all(out[k] is v for k, v in tree.items()) else out
    return tree


def _leaves_as_jax(tree: Any, first: Any) -> Any:
    """Every number and NumPy array of ``tree`` (member states' included) as a JAX array
    placed as ``first`` (:func:`_as_jax_like`)."""
    if isinstance(tree, State):
        return dataclasses.replace(tree, step=_as_jax_like(tree.step, first),
                                   tree_states=_leaves_as_jax(tree.tree_states, first),
                                   counts=_as_jax_like(tree.counts, first))
    if isinstance(tree, dict):
        return {k: _leaves_as_jax(v, first) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_leaves_as_jax(v, first) for v in tree)
    return _as_jax_like(tree, first)


def _as_jax_like(x: Any, first: Any) -> Any:
    """``x`` as a jitted step hands it back beside JAX leaf ``first``: a Python bool, int or
    float as a JAX bool, int32 or default float, a NumPy array in JAX's dtype for it, placed
    as ``first``; anything else (None, a JAX array) as it is."""
    if isinstance(x, (bool, int, float)):
        xp = backend.namespace(first)
        dtype = (bool if isinstance(x, bool) else xp.int32 if isinstance(x, int)
                 else xp.result_type(float))
        return backend.placed(xp.asarray(x, dtype=dtype), first)
    if isinstance(x, (np.ndarray, np.generic)):
        import jax

        return backend.placed(jax.device_put(x), first)
    return x


def _traced_settings(rule: Transform) -> list[str]:
    """The fields of ``rule`` that are no hyperparameters (fixed when the rule is made: sizes,
    thresholds, seeds) yet hold a value traced by JAX (optax.inject_hyperparams hands every
    number so under jax.jit), by name."""
    return [f.name for f in dataclasses.fields(rule) if f.init and "hyper" not in f.metadata
            and any(map(_traced, v if isinstance(v := getattr(rule, f.name), tuple) else (v,)))]


def _traced_fixed(rule: Transform, where: str = "") -> list[str]:
    """:func:`_traced_settings` of ``rule`` and its members, each as ``rule.field``."""
    out = [f"{where or rule.name + '.'}{name}" for name in _traced_settings(rule)]
    for f in dataclasses.fields(rule):
        v = getattr(rule, f.name)
        members = (v,) if isinstance(v, Transform) else tuple(v.values()) if isinstance(
            v, dict) else v if isinstance(v, tuple) else ()
        if f.init and members and all(isinstance(m, Transform) for m in members):
            for m in members:
                out += _traced_fixed(m, f"{where}{m.name}.")
    return out


def _alone(rule: Transform) -> None:
    """A rule with a :class:`~uniopt.base.Minimizer` holds nothing else: a part before it would
    see only the first of the gradients it computes, a part after it none."""
    parts = rule.flat_parts
    found = [p for p in parts if isinstance(p, Minimizer)]
    if found and len(parts) > 1:
        raise ValueError(
            f"{rule.name}: {found[0].name} evaluates the closure itself and must be its rule's "
            f"only part; this rule has {[p.name for p in parts]}"
        )


def check_complex(rule: Transform, state_dtype: str | None, name: str,
                  who: str = "setup") -> None:
    """Set-up's refusals for complex params, ``name`` the first complex leaf: a state dtype
    (the slots are kept complex, as the params), a rule that takes real params only, a part
    that cannot take the complex leaves beside the pairs the others take."""
    if state_dtype is not None:
        raise ValueError(f"{who}: state_dtype={state_dtype!r} is for real params; these "
                         "have complex leaves")
    real = _real_only(rule)
    if real is not None:
        raise TypeError(f"{who}: {real}; {name} is complex")
    _as_pairs_or_whole(rule)


def check_state_dtype(rule: Transform, state_dtype: str | None, leaves: list[Any],
                      who: str = "setup") -> None:
    """Set-up's refusals of ``state_dtype`` for ``rule`` on ``leaves``, before anything is made
    (uniopt.torch asks for a whole group's params at once, so none of them gets a state where
    one is refused); ``who`` begins the message (uniopt.torch's class name)."""
    if state_dtype == "q8" and rule.tree_layout:
        raise ValueError(f"{who}: {no_q8_for_trees(rule)}")
    if state_dtype not in ("q8", "float32"):  # (setup's usual case: no look)
        return
    # the leaves' dtypes looked at only where a part needs its params' precision (an empty
    # tree has none a slot could cap)
    exact = bool(leaves) and any(getattr(p, "exact_state", None) for p in rule.flat_parts)
    wide = exact and state_dtype == "float32" and any(
        backend.dtype_name(x.dtype) == "float64" for x in leaves)
    refused = state_dtype_refusal(rule, state_dtype, wide, exact=exact)
    if refused is not None:
        part, why, instead = refused
        on = " on float64 params" if state_dtype == "float32" else ""
        raise ValueError(f"{who}: state_dtype={state_dtype!r} is not offered for "
                         f"{_whose(rule, part)}{on}: {why}; use state_dtype={instead}")


def state_dtype_refusal(rule: Transform, state_dtype: str | None, wide: bool,
                        exact: bool = True) -> tuple[Any, str, str] | None:
    """The part of ``rule`` whose per-leaf slots cannot be kept in ``state_dtype`` (``wide``:
    on float64 params), why, and the state dtypes it takes instead; None where it is taken
    (:func:`check_state_dtype`, :func:`uniopt.memory.footprint`). ``exact``: whether parts
    that make the params from a slot are looked at."""
    if state_dtype == "q8":
        for p in rule.flat_parts:
            why = getattr(p, "no_q8", None)
            if why:
                return p, why, "None or 'float32'"
    if exact and (state_dtype == "q8" or state_dtype == "float32" and wide):
        for p in rule.flat_parts:
            why = getattr(p, "exact_state", None)
            if why:
                # (q8 on any params: 8 bits are narrower than every float)
                return p, why, ("None or 'float32'" if state_dtype == "q8" and not wide
                                else "None")
    return None


def _whose(rule: Transform, part: Any) -> str:
    """``rule`` by name; in a chain, the registry rule that holds ``part`` ("asgd" in a
    maximizing ``chain(scale(-1), asgd)``), else the chain with the part ("chain's ema")."""
    if not isinstance(rule, chain):
        return rule.name
    for member in rule.transforms:
        if part in member.flat_parts:
            if getattr(type(member), "info", None) is not None:
                return member.name
            break
    return f"{rule.name}'s {part.name}"


def no_q8_for_trees(rule: Transform) -> str:
    """Why ``rule``, which has whole-tree parts, takes no 8-bit state."""
    return (f"state_dtype='q8' quantises per-leaf slots; {rule.name} has whole-tree parts "
            f"({', '.join(rule.tree_layout)})")


def _check_shapes(rule: Transform, names: list[str], leaves: list[Any]) -> None:
    """Raise where a per-leaf part cannot take a leaf of its shape (Muon: not a matrix)."""
    # (a complex leaf's real pairs: its own shape, for a part that sees it so)
    pairs = None if backend.PAIRS.get() is None else backend.pairs_of(leaves, leaves)
    for part in rule.flat_parts:
        if isinstance(part, PerLeaf):
            for i, (name, shape) in enumerate(zip(names, _shapes(leaves), strict=True)):
                if pairs is not None and pairs[i] and part.complex_aware:
                    shape = shape[:-1]
                reason = part.check_shape(shape)
                if reason:
                    raise ValueError(f"{rule.name}: {name} has shape {shape}: {reason}")


def _shapes(leaves: list[Any]) -> list[tuple[int, ...]]:
    """Each leaf's shape: a local shard's is its whole tensor's (:func:`backend.sharded`)."""
    shards = backend.shards_of(leaves)
    if shards is None:
        return [tuple(p.shape) for p in leaves]
    return [shards.shape(i, p) for i, p in enumerate(leaves)]


def _init_slots(part: Part, p: Any, state_dtype: str | None) -> tuple[Any, ...]:
    """``part``'s slots for leaf ``p``; a complex leaf's are made for the pairs of its parts
    (Adagrad's initial sum fills both) and kept complex, as torch keeps them."""
    xp = backend.namespace(p)
    if not backend.is_complex(p):
        return part.init_slots(_stored(p, "float32" if state_dtype == "q8" else state_dtype), xp)
    return tuple(s if s is None else backend.as_complex(s, p)
                 for s in part.init_slots(backend.as_real(p), xp))


def _quantised(names: tuple[str, ...], slots: tuple[Any, ...], p: Any) -> tuple[Any, ...]:
    """Slots (float32) in 8 bits, each with the map its name asks for (:mod:`uniopt.quant`)."""
    xp = backend.namespace(p)
    out: list[Any] = []
    for name, s in zip(names, slots, strict=True):
        signed = name not in quant.NONNEGATIVE
        if s is None:
            out.append(None)
        elif dtensor.is_dtensor(p):  # each rank's shard in blocks of its own
            out.append(dtensor.quantised(xp, s, p, signed))
        elif backend.is_jax(s) and not _traced(s):
            # on the host: JAX compiles each of quantise's operations for each new shape when
            # run one by one, seconds for a small model's set-up
            q = quant.quantise(np, np.asarray(s), signed)
            out.append(quant.Q8(backend.placed(xp.asarray(q.codes), s),
                                backend.placed(xp.asarray(q.absmax), s)))
        else:
            out.append(quant.quantise(xp, s, signed))
    return tuple(out)


def _tree_library(leaves: list[Any], part: WholeTree) -> None:
    if not leaves or part.libraries is None:
        return
    library = backend.array_library(leaves[0])
    if library not in part.libraries:
        raise TypeError(f"{part.name} runs optax, on JAX or NumPy arrays; these params are "
                        f"{library} arrays")


def _stored(x: Any, state_dtype: str | None) -> Any:
    """``x`` in the dtype the slots are kept in: the params' own, or ``state_dtype``."""
    if state_dtype is None:
        return x
    xp = backend.namespace(x)
    return xp.astype(x, getattr(xp, state_dtype))


def tree_leaves(leaves: list[Any], state_dtype: str | None) -> list[Any]:
    """The leaves a whole-tree part's state is set up from: each in the wider of its dtype and
    ``state_dtype`` (Prodigy's moments and ``p0``, schedule-free's ``z``, float32 for bfloat16
    params as a slot is), never narrower than its leaf (such a state may make the params:
    schedule-free's are an average of ``z``)."""
    if state_dtype not in ("float32", "float64"):
        return leaves
    return [_in(p, _compute_dtype(p, xp, state_dtype), xp)
            for p, xp in ((p, backend.namespace(p)) for p in leaves)]


def _compute_dtype(p: Any, xp: Any, state_dtype: str | None) -> Any:
    """The dtype parameter ``p``'s step is computed in: the wider of ``state_dtype`` and its
    own (float32 slots of float64 params are read as float64: computed in float32, the params
    themselves lost their float64 digits at every step), float32 for float16/bfloat16 (as
    torch's fused optimizers do, on every path alike; only what is stored is rounded, once),
    float32 for 8-bit slots; None: its own."""
    if state_dtype == "q8":
        return xp.float32
    if state_dtype == "float32" and p.dtype == xp.float64:
        return xp.float64  # (the slots read as float64: not None, their own)
    name = state_dtype or ("float32" if backend.kind(p).low else None)
    return None if name is None else getattr(xp, name)


def _in(x: Any, dtype: Any, xp: Any) -> Any:
    """``x`` in ``dtype`` (None: as it is); a slot a leaf does not keep stays None."""
    return x if x is None or dtype is None or x.dtype == dtype else xp.astype(x, dtype)


def _align_grads(grads: Any, treedef: Any, names: list[str], params: list[Any],
                 none: bool = False) -> list[Any]:
    """Gradient leaves in trainables order, from a tree like params or a flat list; with
    ``none``, None where a leaf has no gradient (a frozen branch, a partial ``jax.grad``)."""
    g_leaves, g_def = flatten_leaves(grads)
    # a flat list is not tried as a tree first: optree's error for it formats every array
    if g_def != treedef and none and not _flat_list(grads, len(params)):
        try:
            up_to = treedef.flatten_up_to(grads)
        except (ValueError, TypeError):
            pass
        else:
            if all(g is None or backend.is_array(g) for g in up_to):
                g_leaves, g_def = up_to, treedef
    if g_def != treedef:
        odd = [] if not isinstance(grads, (list, tuple)) else [
            i for i, g in enumerate(grads) if not backend.is_array(g) and not (none and g is None)]
        if odd and len(grads) == len(params) and not any(
                isinstance(grads[i], (dict, list, tuple)) for i in odd):
            # a flat list with something other than an array in it (a Python float)
            i = odd[0]
            raise TypeError(f"flat gradient list: entry {i} (for {names[i]}) is "
                            f"{type(grads[i]).__name__} {grads[i]!r}, not an array")
        if not isinstance(grads, (list, tuple)) or odd:
            raise ValueError(
                "grads must be a tree with the structure of params or a flat list of arrays "
                f"aligned with uniopt.trainables(params); params are {treedef}, grads are {g_def}"
            )
        if len(grads) != len(params):
            raise ValueError(
                f"flat gradient list has {len(grads)} arrays but params have {len(params)} "
                "trainable arrays (see uniopt.trainables)"
            )
        g_leaves = list(grads)
    for i, (p, g) in enumerate(zip(params, g_leaves, strict=True)):
        if g is None and none:
            continue
        if not backend.is_array(g):
            raise TypeError(
                f"gradient for {names[i]} is {with_article(type(g).__name__)}, not an array")
        if type(g) is not type(p):
            # (a flax Variable holds a JAX array: a combinator's accumulated gradient for an
            # NNX Param is one)
            if backend.library(g) != backend.library(p) and {
                    backend.library(g), backend.library(p)} != {"jax", "flax"}:
                raise TypeError(
                    f"gradient for {names[i]} is a {backend.library(g)} array but its "
                    f"parameter is a {backend.library(p)} array"
                )
            refused = backend.kind(g).refused
            if refused:
                raise TypeError(f"gradient for {names[i]} is {refused}")
            if is_variable(type(g)):  # (a Param's gradient beside a bare array: its array)
                g_leaves[i] = g = backend.held_array(g)
        if g.shape != p.shape and tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"gradient for {names[i]} has shape {tuple(g.shape)}, its parameter "
                f"{tuple(p.shape)}"
            )
        if g.dtype != p.dtype and not _byte_order_apart(g.dtype, p.dtype):
            raise ValueError(f"gradient for {names[i]} has dtype {g.dtype}, its parameter "
                             f"{p.dtype}")
    return g_leaves


def _torch_grads(names: list[str], params: list[Any], grads: list[Any], state: State) -> None:
    """Each torch gradient dense, on its parameter's device: torch's own error came from the
    first kernel that met one, naming no leaf, after the leaves before it had stepped. Inside a
    reverse-mode torch.func transform, a gradient, a hyperparameter, a slot or a whole-tree
    state that carries the transform's derivative is refused outside :func:`backend.tracked`:
    the step would not record it, and the derivative through it would come back 0 (a parameter
    that requires grad is refused the same way, by :func:`backend.like_leaf`)."""
    import torch

    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    if level is not None and level() is not None and not backend.is_tracked() and _under_grad():
        _refuse_lifted(names, grads, state)
    # (the device compared here, not by _same_devices: a tensor's attribute where that makes
    # two Python calls a leaf, which tests/test_small.py counts on the reference path)
    for name, p, g in zip(names, params, grads, strict=True):
        if g is None:
            continue
        if g.device != p.device:
            raise ValueError(f"gradient for {name} is on {g.device}, its parameter on "
                             f"{p.device}")
        if g.layout != torch.strided:
            raise TypeError(f"gradient for {name} is a {g.layout} tensor; uniopt.update and "
                            "update_ take dense gradients (g.to_dense()); sparse ones go to "
                            "uniopt.torch's SGD, Adagrad and SparseAdam, or to "
                            "uniopt.torch.Optimizer(params, rule, sparse_rows=True)")


def _same_devices(names: list[str], params: list[Any], grads: list[Any]) -> None:
    """Each gradient of another array-API library (array_api_strict's devices, CuPy's) on its
    parameter's device, as :func:`_torch_grads` checks torch's: the library's own error came
    from the first kernel that met one, naming no leaf, after the leaves (a partition's
    members) before it had stepped. A device JAX places (None) is no mismatch."""
    for name, p, g in zip(names, params, grads, strict=True):
        if g is None:
            continue
        have, want = backend.device(g), backend.device(p)
        if have is not None and want is not None and have != want:
            raise ValueError(f"gradient for {name} is on {have}, its parameter on {want}")


def _under_grad() -> bool:
    """Inside a reverse-mode torch.func transform (grad, vjp, jacrev), at any depth: where
    ``requires_grad`` means the transform's derivative (vmap alone differentiates nothing)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())


def _refuse_lifted(names: list[str], grads: list[Any], state: State) -> None:
    """Inside a reverse-mode torch.func transform, outside :func:`backend.tracked`: what the
    transform differentiates through (``requires_grad``) refused, named."""
    def carries(x: Any) -> bool:
        # (not hyper.carries_derivative: in a transform functorch wraps every tensor made
        # there, those nothing differentiates too)
        return bool(getattr(x, "requires_grad", False))

    for name, g in zip(names, grads, strict=True):
        if carries(g):
            raise TypeError(f"gradient for {name} carries a torch.func derivative: "
                            f"{backend.UNTRACKED}")
    for part in state.rule.flat_parts:
        for field, value in part.hyperparameters().items():
            if carries(value) or (isinstance(value, tuple) and any(map(carries, value))):
                raise TypeError(f"{part.name}'s {field} carries a torch.func derivative: "
                                f"{backend.UNTRACKED}")
    for key, arrays in state.slots.items():
        for name, s in zip(names, arrays, strict=True):
            if carries(s):
                raise TypeError(f"the state's {key} of {name} carries a torch.func "
                                f"derivative: {backend.UNTRACKED}")
    for key, tree in state.tree_states.items():
        if any(map(carries, optree.tree_leaves(tree, namespace=NAMESPACE))):
            raise TypeError(f"the state of {key} carries a torch.func derivative: "
                            f"{backend.UNTRACKED}")


def _byte_order_apart(a: Any, b: Any) -> bool:
    """Whether NumPy dtypes ``a`` and ``b`` are one type in two byte orders (a big-endian
    ``>f8`` parameter read from a FITS or HDF5 file, and the native float64 gradient NumPy's
    arithmetic makes of it): NumPy computes with both, and a step takes them."""
    return (isinstance(a, np.dtype) and isinstance(b, np.dtype)
            and a.newbyteorder("=") == b.newbyteorder("="))


def _flat_list(grads: Any, n: int) -> bool:
    return (isinstance(grads, (list, tuple)) and len(grads) == n
            and all(g is None or backend.is_array(g) for g in grads))


OPTAX_ORDER = "the optax protocol, rule.update, takes (grads, state, params)"
ORDER = f"uniopt.update takes (state, params, grads); {OPTAX_ORDER}"


def _qualified(x: Any) -> str:
    """``x``'s type by module and name: flax's ``nnx.State`` is no uniopt ``State``."""
    t = type(x)
    if x is None or t.__module__ == "builtins":
        return repr(None) if x is None else t.__qualname__
    module = "uniopt" if t.__module__.startswith("uniopt.") else t.__module__
    return f"{module}.{t.__qualname__}"


def _not_a_state(state: Any, params: Any = None, grads: Any = None) -> str:
    """Why ``state`` is refused: where the params or the grads are the State, the order of the
    arguments (the grads first: optax's)."""
    for what, x in (("params", params), ("grads", grads)):
        if isinstance(x, State):
            return (f"the {what} given are a uniopt State: the state comes first, "
                    f"update(state, params, grads); {OPTAX_ORDER}")
    return f"expected a uniopt State (from uniopt.setup), got {_qualified(state)}"


def _check_state(state: Any, treedef: Any, names: list[str], params: list[Any]) -> None:
    if not isinstance(state, State):
        raise TypeError(_not_a_state(state))
    shape = batched(state, traced=True)
    if shape is not None:  # (its rule of rows failed in a broadcast naming nothing)
        raise ValueError(
            f"this state's numbers are a batch, shape {shape} (a state made under jax.vmap: "
            "one rule per model); step it inside vmap, e.g. jax.vmap(uo.update)(states, "
            "params, grads)")
    if isinstance(state.treedef, AnyParams) and not all(
        isinstance(v, list) for v in state.slots.values()
    ):
        raise ValueError("this state was made for optax's placeholder params (by "
                         "optax.tree.map_params), not for arrays: set one up with init(params)")
    if sorted(state.tree_states) != sorted(state.rule.tree_layout):
        raise ValueError(
            f"this state holds tree states {sorted(state.tree_states)} but its rule has "
            f"whole-tree parts {list(state.rule.tree_layout)}"
        )
    if treedef != state.treedef:
        raise ValueError(
            "params do not have the tree structure this state was set up for: "
            f"state has {state.treedef}, params are {treedef}"
        )
    _check_shapes(state.rule, names, params)
    if state.counts is not None and tuple(state.counts.shape) != (len(params),):
        held = state.counts.shape
        raise ValueError(f"this state counts steps for {held[0] if len(held) == 1 else held} "
                         f"leaves, the params have {len(params)}: it was set up for other params")
    leaf_shapes = _shapes(params)
    if state.tree_states:
        check_tree_shapes(state, names, params, leaf_shapes)
    wants = [state.rule.slot_shapes_of(shape) for shape in leaf_shapes]
    for key, arrays in state.slots.items():
        if len(arrays) != len(params):
            raise ValueError(f"the state's {key} holds {len(arrays)} arrays, the params "
                             f"{len(params)}: this state was set up for other params")
        for i, (p, s) in enumerate(zip(params, arrays, strict=True)):
            if state.state_dtype == "q8":
                _check_q8(state, key, names[i], p, s)
                continue
            shape = leaf_shapes[i]
            slot = wants[i].get(key, shape)
            if slot is None and s is None:
                continue
            if s is not None and type(s) is not type(p) and _libraries_apart(p, s):
                raise ValueError(
                    f"{names[i]} is a {backend.library(p)} array, but the state's {key} for it "
                    f"is a {backend.library(s)} array: this state was set up for other params")
            # a local shard's slot shaped as its parameter is a shard too
            local = tuple(p.shape) if slot == shape else slot
            dtype = p.dtype if state.state_dtype is None else getattr(backend.namespace(p),
                                                                       state.state_dtype)
            if s is None or tuple(s.shape) != local or s.dtype != dtype:
                got = "none" if s is None else f"shape {tuple(s.shape)} and dtype {s.dtype}"
                why = ("this state was set up for other params" if s is None
                       or tuple(s.shape) != local else
                       # (a state cast since, jax.tree.map(lambda x: x.astype(...)), or params)
                       f"a state of these params keeps {dtype} slots; the params or the state "
                       "were cast since set-up (cast them back or set up anew; "
                       "uo.setup(..., state_dtype=...) keeps slots in another dtype)")
                raise ValueError(
                    f"{names[i]} has shape {tuple(p.shape)} and dtype {p.dtype}, but the "
                    f"state's {key} for it has {got}: {why}"
                )


def check_tree_shapes(state: State, names: list[str], params: list[Any],
                       shapes: list[tuple[int, ...]]) -> None:
    """The whole-tree parts' arrays kept one per leaf, shaped as it (:attr:`WholeTree.
    like_params`), against the params: a state of params whose shapes changed since (the
    same structure) stepped silently, or failed in a broadcast naming no leaf."""
    for part, keys in state.rule.keyed_parts:
        if not isinstance(part, WholeTree):
            continue
        tree = state.tree_states.get(keys[0])
        why = part.check_tree(tree, params)  # (shapes a part keeps other than the leaves')
        if why:
            raise ValueError(f"the state's {keys[0]}: {why}: this state was set up for other "
                             "params")
        for entry in part.like_params:
            xs = tree.get(entry) if isinstance(tree, dict) else None
            if not isinstance(xs, list):
                continue  # (an entry the part keeps only for some settings)
            if len(xs) != len(params):
                # (a parameter removed from a torch group: zip() failed inside the part)
                raise ValueError(
                    f"the state's {keys[0]}[{entry!r}] holds {len(xs)} arrays, one per leaf, "
                    f"and the params have {len(params)} leaf(s): this state was set up for "
                    "other params")
            for i, x in enumerate(xs):
                if x is not None and tuple(x.shape) != shapes[i] \
                        and not backend.is_complex(params[i]):
                    raise ValueError(
                        f"{names[i]} has shape {tuple(params[i].shape)}, but the state's "
                        f"{keys[0]}[{entry!r}] for it has shape {tuple(x.shape)}: this state "
                        "was set up for other params"
                    )


def _libraries_apart(p: Any, s: Any) -> bool:
    """Whether a parameter and its slot come from two array libraries (a flax Variable holding
    a JAX array, and a quantised slot, are of their array's library)."""
    if isinstance(s, quant.Q8):
        s = s.codes
    return backend.array_library(p) != backend.array_library(s)


def _refuse_q8_on_meshes(names: list[str], leaves: list[Any]) -> None:
    """8-bit slots for JAX arrays laid out over a mesh of several devices: not offered. Their
    blocks of 2048 run over the raveled leaf, across its shards, and a jitted step on such a
    leaf fails inside JAX (its sorted search takes no sharded query); torch's DTensors quantise
    each rank's shard (:mod:`uniopt.interop.dtensor`), JAX has no such path yet."""
    for name, x in zip(names, leaves, strict=True):
        if (backend.is_jax(x) and backend.mesh_of(x) is not None
                and not x.sharding.is_fully_replicated):
            raise ValueError(
                f"setup: state_dtype='q8' is not offered for JAX arrays sharded over a mesh "
                f"({name} is laid out as {x.sharding}): its 8-bit blocks would cross the shards; "
                "use state_dtype=None, 'float32' or 'float64' with sharded params")


def _check_q8(state: State, key: str, name: str, p: Any, s: Any) -> None:
    """Raise unless ``s`` is the 8-bit slot ``key`` of a leaf shaped as ``p`` (or None where
    such a leaf keeps none)."""
    shape = tuple(p.shape)
    slot = state.rule.slot_shapes_of(shape).get(key, shape)
    if slot is None and s is None:
        return
    if isinstance(s, quant.Q8) and s.shape == slot and dtensor.is_dtensor(p):
        dtensor.check_q8(s.absmax, p, f"the state's {key} of {name}")
        return
    if (not isinstance(s, quant.Q8) or slot is None or s.shape != slot
            or tuple(s.absmax.shape) != (quant.blocks(math.prod(slot)),)):
        got = "none" if s is None else repr(s)
        raise ValueError(f"{name} has shape {shape}, but the state's 8-bit {key} for it is "
                         f"{got}: this state was set up for other params")


def _with_structure(state: State, treedef: Any) -> State:
    """``state``, with the params' structure where it had none (a state that
    ``optax.tree.map_params`` mapped: it comes out with the placeholder's :class:`AnyParams`)."""
    if isinstance(state.treedef, AnyParams):
        return dataclasses.replace(state, treedef=treedef)
    return state


Resolved = list[tuple[Part, Any, tuple[str, ...]]]


def resolve(rule: Transform, step: Any) -> Resolved:
    """Every part of ``rule`` resolved and validated for ``step``, with its coefficients; raises
    (naming the rule, the part and the step) where a schedule's value is invalid."""
    # the rule's own ranges first, where a schedule moves a number: a part may take wider ones
    # (cocob's lr >= 0 is a scale's factor, which may be negative; sophia_h's b1 < 1 an ema's
    # momentum >= 0), and a value past them ran silently
    moving = rule.memo.get("engine.moving_records")
    if moving is None:  # (a record never changes: kept in its memo, none for a fixed rule)
        moving = rule.memo["engine.moving_records"] = tuple(
            r for r in _records(rule) if not r.fixed)
    if type(step) is not int and str(getattr(step, "dtype", "")) == "int32" and (
            _traced(step) or backend.is_jax(step)):
        # the coefficients count step + 1 (NAdam's step + 2): kept within int32 (at the count's
        # end, 2**31 - 1, they are optax's at its stalled count, a power of b1 that is 0)
        step = sys.modules["jax"].numpy.minimum(step, _INT32_MAX - 2)
    for record in moving:
        record._check_at(step)
    if fixed_parts(rule):  # every part its own at every step: only the coefficients are new
        return [(part, part.coeffs(step), keys) for part, keys in rule.keyed_parts]
    out: Resolved = []
    for part, keys in rule.keyed_parts:
        try:
            resolved = part.at(step)
        except (ValueError, TypeError) as e:
            raise _in_users_words(rule, step, e) from None
        assert isinstance(resolved, Part)
        out.append((resolved, resolved.coeffs(step), keys))
    return out


def fixed_parts(rule: Transform) -> bool:
    """Whether every part of ``rule`` is itself at every step (no schedule, no number read where
    it is kept): :func:`resolve` then only asks each for its coefficients. Of the rule's own
    parts: a resolved rule's parts are fixed at their step's values."""
    fixed = rule.memo.get("engine.fixed_parts")
    if fixed is None:
        fixed = rule.memo["engine.fixed_parts"] = all(
            getattr(part, "fixed", False) for part, _ in rule.keyed_parts)
    return bool(fixed)


def _records(rule: Transform) -> tuple[Transform, ...]:
    """The records a user wrote in ``rule``: itself, or a chain's members (and theirs)."""
    if isinstance(rule, chain):
        return tuple(r for t in rule.transforms for r in _records(t))
    return (rule,)


def _in_users_words(rule: Transform, step: Any, e: Exception) -> Exception:
    """A part's error at ``step`` as the rule the user wrote would word it: the value of its
    own field (adam's ``lr``, not its part's ``folded_lr``) where that is what is wrong."""
    for record in (rule, *(rule.transforms if isinstance(rule, chain) else ())):
        try:
            record.at(step)
        except (ValueError, TypeError) as own:
            return _in_rules_words(rule, record, own)
    return type(e)(f"{rule.name}: {e}")


def _in_rules_words(rule: Transform, record: Transform, own: Exception) -> Exception:
    """Record ``record``'s own error as ``rule``, which holds it, says it (a chain names it)."""
    return type(own)(own if record is rule else f"{rule.name}: {own}")


def _deltas(
    state: State, params: list[Any], grads: list[Any], extra: dict[str, Any],
    finish: bool = False,
) -> tuple[list[Any], dict[str, list[Any]], dict[str, Any]]:
    """:func:`_float_deltas`, its new slots in 8 bits where the state keeps them so."""
    us, slots, trees = _float_deltas(state, params, grads, extra, finish)
    if state.state_dtype == "q8":
        slots = {k: [s if s is None else quant.quantise(backend.namespace(s), s, old.signed)
                     for s, old in zip(v, state.slots[k], strict=True)]
                 for k, v in slots.items()}
    return us, slots, trees


def _float_deltas(
    state: State, params: list[Any], grads: list[Any], extra: dict[str, Any],
    finish: bool = False,
) -> tuple[list[Any], dict[str, list[Any]], dict[str, Any]]:
    """The update ``u`` of every leaf (``p_new = p - u``), the new slots and tree states;
    ``extra``, the step's extra arguments (the loss), goes to the parts that read it.
    ``finish``: in place of the updates, the new params (in the computation's dtype), written
    by the last part's ``finish`` where it has one.

    Part by part over every leaf: a global norm or a whole-tree part needs every leaf's ``u``
    before it can go on. An elementwise part's kernel and a per-leaf part's ``apply`` are
    called alike, on whole arrays."""
    plan = resolve(state.rule, state.step)
    # local shards of distributed tensors: norms and per-leaf parts see the whole tensors
    shards = backend.shards_of(params)
    xps = [backend.namespace(p) for p in params]
    dts = [_compute_dtype(p, xp, state.state_dtype) for p, xp in zip(params, xps, strict=True)]
    widened = any(dt is not None for dt in dts)
    ps = [_in(p, dt, xp) for p, dt, xp in zip(params, dts, xps, strict=True)] if widened else \
        list(params)
    us = [_in(g, dt, xp) for g, dt, xp in zip(grads, dts, xps, strict=True)] if widened else \
        list(grads)
    # recorded by autograd, the step reads copies: what it saves for the backward pass must not
    # be the params and slots it then overwrites
    read = _copy if params and backend.is_torch(params[0]) and backend.is_tracked() else _in
    if read is _copy:
        ps = [_copy(p, None, None) for p in ps]
    if state.state_dtype == "q8":  # fresh float32 arrays: nothing to copy
        read = _dequantised
    new_slots: dict[str, list[Any]] = {}
    new_trees: dict[str, Any] = {}
    # the leaves that are the real pairs of complex arrays, for the parts that see them as
    # complex numbers (Part.complex_aware)
    pairs = None if backend.PAIRS.get() is None else backend.pairs_of(params, grads)
    for part, c, keys in plan:
        if isinstance(part, Minimizer):
            raise TypeError(
                f"{state.rule.name} evaluates the loss at trial points: step it with "
                "uniopt.minimize_step(state, params, closure) (or minimize_step_), where "
                "closure(params) returns (loss, grads)"
            )
        if isinstance(part, WholeTree):
            if shards is not None:
                raise TypeError(
                    f"{state.rule.name}: {part.name} sees every leaf at once; on shards of "
                    "distributed tensors (DTensor) it would see this rank's shards only, and "
                    "is not supported there"
                )
            us, new_trees[keys[0]] = _apply_tree(part, c, us, state.tree_states[keys[0]], ps,
                                                 state, extra)
            continue
        if isinstance(part, PerLeaf):
            last = finish and part.finish is not None and part is plan[-1][0]
            leaf_slots = [[read(state.slots[k][i], dt, xp) for k in keys]
                          for i, (xp, dt) in enumerate(zip(xps, dts, strict=True))]
            if pairs is not None and part.complex_aware and shards is None:
                # (DTensor shards of complex params: the whole tensors' pairs, gathered, as
                # before such parts saw complex numbers; see docs/scaling-out.md)
                outs = _per_leaf_complex(part, c, leaf_slots, xps, ps, us, last, pairs)
            elif shards is None:
                outs = _per_leaf_gathered(part, c, leaf_slots, xps, ps, us, last)
            else:
                outs = _per_leaf_sharded(part, c, leaf_slots, xps, ps, us, last, shards)
            if last:  # finish's (p_new, *slots)
                new_slots.update({k: [o[j + 1] for o in outs] for j, k in enumerate(keys)})
                return [o[0] for o in outs], new_slots, new_trees
        else:
            assert isinstance(part, Elementwise)
            if part.needs_norm and shards is not None:
                leaf_cs = _sharded_norm_coeffs(part, us, xps, shards)
            elif part.needs_norm and part.norm_per_leaf:
                sizes = _sizes(us, pairs if part.complex_aware else None)
                leaf_cs = [part.norm_coeffs(_norm([u], [xp]), n)
                           for xp, u, n in zip(xps, us, sizes, strict=True)]
                leaf_cs = [_per_dtype(lc, [u]).get(u.dtype, lc)
                           for lc, u in zip(leaf_cs, us, strict=True)]
            else:
                if part.needs_norm:
                    squares, size, shared = backend.global_squares(
                        _squares(us, xps), sum(_sizes(us, pairs if part.complex_aware
                                                      else None)))
                    c = (part if shared is None else shared).norm_coeffs(squares**0.5, size)
                cs = _per_dtype(c, us)
                leaf_cs = [cs.get(u.dtype, c) for u in us]
            if part.by_dtype:  # the stored parameter's dtype: 16-bit leaves compute wider
                leaf_cs = [part.for_dtype(lc, p.dtype)
                           for lc, p in zip(leaf_cs, params, strict=True)]
            fn, end = part.kernel, part.finish
            if len(ps) >= TRACE_ONCE and _traced(ps[0]):
                fn = _traced_once(fn)
                end = None if end is None else _traced_once(end)
            if read is _in and not widened:  # the slots as they are
                slots_in: Any = zip(*(state.slots[k] for k in keys), strict=True) if keys \
                    else [()] * len(ps)
            else:
                slots_in = ([read(state.slots[k][i], dt, xp) for k in keys]
                            for i, (xp, dt) in enumerate(zip(xps, dts, strict=True)))
            outs = [fn(xp, lc, p, u, *sl) for xp, p, u, lc, sl in zip(xps, ps, us, leaf_cs,
                                                                       slots_in, strict=True)]
            if finish and end is not None and part is plan[-1][0]:
                new_slots.update({k: [o[j + 1] for o in outs] for j, k in enumerate(keys)})
                return [end(xp, lc, p, u, *o[1:]) for xp, lc, p, u, o in
                        zip(xps, leaf_cs, ps, us, outs, strict=True)], new_slots, new_trees
        us = [o[0] for o in outs]
        for j, k in enumerate(keys):
            new_slots[k] = [o[j + 1] for o in outs]
    if finish:
        return [p - u for p, u in zip(ps, us, strict=True)], new_slots, new_trees
    return us, new_slots, new_trees


def _sizes(us: list[Any], pairs: list[bool] | None) -> list[int]:
    """Each leaf's number of elements, a complex number's pair of parts (``pairs``) one."""
    if pairs is None:
        return [math.prod(u.shape) for u in us]
    return [math.prod(u.shape[:-1] if pair else u.shape) for u, pair in zip(us, pairs,
                                                                             strict=True)]


def _per_leaf_complex(part: PerLeaf, c: Any, slots: list[list[Any]], xps: list[Any],
                      ps: list[Any], us: list[Any], finish: bool,
                      pairs: list[bool]) -> list[tuple[Any, ...]]:
    """:func:`_per_leaf_gathered` of a part that sees complex leaves as complex arrays
    (``Part.complex_aware``): the leaves that are real pairs (``pairs``) as complex arrays, its
    results as pairs again."""
    def whole(x: Any, pair: bool) -> Any:
        return backend.as_complex(x) if pair and x is not None else x

    outs = _per_leaf_gathered(
        part, c, [[whole(s, pair) for s in ss] for ss, pair in zip(slots, pairs, strict=True)],
        xps, [whole(p, pair) for p, pair in zip(ps, pairs, strict=True)],
        [whole(u, pair) for u, pair in zip(us, pairs, strict=True)], finish)
    return [tuple(backend.as_real(x) if pair and x is not None else x for x in o)
            for o, pair in zip(outs, pairs, strict=True)]


# Under jax.jit, from this many leaves on, an elementwise kernel is traced once per kind of leaf
# (shape, dtype, which coefficients are traced) and called on each leaf: the trace then holds
# one call per leaf where it held each of the kernel's operations (a dozen for Adam), each of
# which JAX stages on its own (10,000 leaves of AdamW: 19 s to trace and lower, was 49 s).
# XLA inlines the calls, so the program it compiles, and every number, is the same.
TRACE_ONCE = 16


def _traced_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(xp, c, p, u, *slots)`` (a kernel, or a part's ``finish``) as a call of one jitted
    function per kind of leaf: the coefficients that are JAX values go in as arguments, the
    others (host numbers, flags a kernel may branch on) are fixed in the function, keyed
    exactly (a float by its bits: 0.0 and -0.0 differ)."""
    def call(xp: Any, c: Any, p: Any, u: Any, *slots: Any) -> Any:
        values = tuple(c)
        dynamic = tuple(i for i, x in enumerate(values) if _is_jax(x))
        fixed = tuple((i, x) for i, x in enumerate(values) if i not in dynamic)
        try:
            key = (fn, xp, type(c), dynamic, tuple((i, type(x), _exact(x)) for i, x in fixed))
            jitted = _TRACED.get(key)
        except TypeError:  # a coefficient that cannot be a key: the operations as they are
            return fn(xp, c, p, u, *slots)
        if jitted is None:
            if len(_TRACED) >= 512:  # host numbers fixed in by a run that changes them
                _TRACED.clear()
            jitted = _TRACED[key] = _jitted(fn, xp, type(c), dynamic, fixed)
        return jitted(tuple(values[i] for i in dynamic), p, u, *slots)

    return call


_TRACED: dict[Any, Any] = {}


def _exact(x: Any) -> Any:
    """``x`` as a key that tells apart what ``==`` does not (0.0 and -0.0, NaNs)."""
    return float(x).hex() if isinstance(x, (float, np.floating)) else x


def _is_jax(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


def _jitted(fn: Callable[..., Any], xp: Any, kind: type, dynamic: tuple[int, ...],
            fixed: tuple[tuple[int, Any], ...]) -> Any:
    import jax

    def run(values: tuple[Any, ...], p: Any, u: Any, *slots: Any) -> Any:
        merged: list[Any] = [None] * (len(dynamic) + len(fixed))
        for i, x in fixed:
            merged[i] = x
        for i, x in zip(dynamic, values, strict=True):
            merged[i] = x
        c = kind(*merged) if hasattr(kind, "_fields") else kind(merged)
        return fn(xp, c, p, u, *slots)

    return jax.jit(run)


def _sharded_norm_coeffs(part: Elementwise, us: list[Any], xps: list[Any],
                         shards: Any) -> list[Any]:
    """A norm-needing part's coefficients for each leaf, where leaves are shards: each leaf's
    sum of squares over its whole tensor (the ranks' sums added, :meth:`Shards.sums`), over
    its global number of elements."""
    sums = shards.sums(np.array([float(xp.sum(xp.astype(u, backend.widest_float(xp, u)) ** 2))
                                 for xp, u in zip(xps, us, strict=True)], np.float64))
    sizes = shards.sizes([math.prod(u.shape) for u in us])
    if part.norm_per_leaf:
        return [part.norm_coeffs(float(math.sqrt(t)), int(n))
                for t, n in zip(sums, sizes, strict=True)]
    # (the squares of every run where a group steps its shards in runs: backend.global_squares)
    squares, size, shared = backend.global_squares(math.fsum(sums), int(sizes.sum()))
    c = (part if shared is None else shared).norm_coeffs(float(math.sqrt(squares)), size)
    return [c] * len(us)


def _per_leaf_sharded(part: PerLeaf, c: Any, slots: list[list[Any]], xps: list[Any],
                      ps: list[Any], us: list[Any], finish: bool,
                      shards: Any) -> list[tuple[Any, ...]]:
    """:func:`_per_leaf` where leaves are shards: on the whole tensors (each gathered on every
    rank: the parameter, the update and the slots shaped as the parameter; slots of other
    shapes are whole already), each rank keeping its shard of the results."""
    full_ps = [shards.gather(i, p) for i, p in enumerate(ps)]
    full_us = [shards.gather(i, u) for i, u in enumerate(us)]
    shaped = [[s == tuple(p.shape) for s in part.slot_shapes(tuple(p.shape))] for p in full_ps]
    full_slots = [[shards.gather(i, s) if same else s for s, same in zip(ss, sh, strict=True)]
                  for i, (ss, sh) in enumerate(zip(slots, shaped, strict=True))]
    outs = _per_leaf(part, c, full_slots, xps, full_ps, full_us, finish)
    return [(shards.cut(i, o[0]),
             *(shards.cut(i, x) if same else x for x, same in zip(o[1:], shaped[i], strict=True)))
            for i, o in enumerate(outs)]


def _per_leaf_gathered(part: PerLeaf, c: Any, slots: list[list[Any]], xps: list[Any],
                       ps: list[Any], us: list[Any], finish: bool) -> list[tuple[Any, ...]]:
    """:func:`_per_leaf`; where JAX refuses it on leaves split over an explicit mesh (an
    operation that contracts a split axis or mixes layouts asks for its output's layout), on
    the whole leaves (replicated: :func:`backend.gathered`), each result laid out again as the
    array it replaces. Only such parts gather: a per-leaf norm's sum needs no more than an
    all-reduce of a scalar, which JAX does on its own."""
    try:
        return _per_leaf(part, c, slots, xps, ps, us, finish)
    except Exception as e:
        if not _layout_refused(e):
            raise
        error = e
    (full_ps, split_p), (full_us, split_u) = _whole(ps), _whole(us)
    whole = [_whole(ss) for ss in slots]
    if not (split_p or split_u or any(split for _, split in whole)):
        raise error  # nothing was split
    outs = _per_leaf(part, c, [ss for ss, _ in whole], xps, full_ps, full_us, finish)
    lay = backend.laid_out_as
    return [(lay(o[0], p if finish else u), *(lay(x, s) for x, s in zip(o[1:], ss, strict=True)))
            for o, p, u, ss in zip(outs, ps, us, slots, strict=True)]


def _whole(xs: list[Any]) -> tuple[list[Any], bool]:
    """Arrays ``xs`` each whole (:func:`backend.gathered`), and whether any was split."""
    out = [backend.gathered(x) for x in xs]
    return out, any(map(operator.is_not, out, xs))


def _layout_refused(e: Exception) -> bool:
    """Whether JAX refused an operation for its operands' layouts on an explicit mesh (its
    ``ShardingTypeError``, not a public name)."""
    return type(e).__name__ == "ShardingTypeError"


def member_step(state: State, params: list[Any], grads: list[Any],
                extra: dict[str, Any]) -> tuple[list[Any], State]:
    """A member rule's updates for its leaves and its new state, inside a combinator's step
    (whose caller checked the leaves); complex leaves as their real pairs, as a step of the
    member alone takes them."""
    if any(map(backend.is_complex, params)) and _as_pairs_or_whole(state.rule):
        real = dataclasses.replace(state, slots={k: _pairs(v, False)
                                                 for k, v in state.slots.items()},
                                   treedef=flat_list_def(len(params)))
        ps, gs = _pairs(params, False), _pairs(grads, False)
        with backend.stepping_pairs([ps, gs], [params, grads]):
            us, new = member_step(real, ps, gs, extra)
        return _back(us, grads), dataclasses.replace(
            new, treedef=state.treedef,
            slots={k: _back(v, state.slots[k]) for k, v in new.slots.items()})
    calc = state
    if state.state_dtype is None and any(
            s is not None and s.dtype != p.dtype and backend.kind(s).low
            for col in state.slots.values() for s, p in zip(col, params, strict=True)):
        # 16-bit slots beside params a chain widened before this member: read in float32, as
        # the member alone reads them (read as they were, they met the float32 updates: an
        # extra 16-bit rounding on NumPy and JAX, torch's lerp refusing the mix)
        calc = dataclasses.replace(state, state_dtype="float32")
    us, slots, trees = _deltas(calc, params, grads, extra)
    step = _Step(params, grads, state.treedef)
    new = dataclasses.replace(state, step=_next_step(state.step), tree_states=trees,
                              slots={**state.slots, **_new_slots(state, slots, step)})
    return us, new


def _combinator(rule: Transform) -> Combinator | None:
    """The combinator that is ``rule``'s only part, which then takes the whole step."""
    parts = rule.flat_parts
    return parts[0] if len(parts) == 1 and isinstance(parts[0], Combinator) else None


def _run(state: State, part: Combinator, step: _Step, inplace: bool,
         extra: dict[str, Any]) -> tuple[State, Any]:
    (key,) = state.rule.tree_layout
    with backend.outside_autograd(step.params):
        tree, new_p = part.run(state.tree_states[key], step.treedef, step.params, step.grads,
                               inplace, **extra)
    tree = _kept_dtypes(tree, state.tree_states[key])
    new = dataclasses.replace(state, step=_next_step(state.step), tree_states={key: tree})
    if inplace:
        return new, None
    # (a 0-d leaf's NumPy arithmetic hands back a scalar: the params stay arrays; a torch
    # leaf made outside autograd (mechanize's) requires grad where its old one did)
    return new, unflatten(step.treedef, [
        np.asarray(x, dtype=p.dtype) if backend.is_numpy_scalar(x) else backend.like_leaf(x, p)
        for x, p in zip(new_p, step.params, strict=True)])


def _dequantised(x: Any, dtype: Any, xp: Any) -> Any:
    """An 8-bit slot's float32 values (a slot a leaf does not keep: None)."""
    return None if x is None else quant.dequantise(xp, x)


def _copy(x: Any, dtype: Any, xp: Any) -> Any:
    """A copy of torch tensor ``x`` in ``dtype`` (None: its own), in autograd's graph (a slot
    a leaf does not keep: None)."""
    if x is None:
        return None
    return x.clone() if dtype is None else x.to(dtype, copy=True)


def _per_leaf(part: PerLeaf, c: Any, slots: list[list[Any]], xps: list[Any], ps: list[Any],
              us: list[Any], finish: bool = False) -> list[tuple[Any, ...]]:
    """A per-leaf part's ``(u, *slots)`` for every leaf: one call per leaf, or for a part that
    takes a batch, one per set of leaves of one shape and dtype, stacked along a new leading
    axis (a leaf alone is a batch of one, so batching never changes a number). Each call gets
    the coefficients the part gives for its leaves' shape. ``finish``: the part's ``finish``
    in place of its ``apply``, ``(p_new, *slots)``."""
    groups: dict[Any, list[int]] = {}
    for i, u in enumerate(us):
        groups.setdefault((tuple(u.shape), u.dtype) if part.batched else i, []).append(i)
    outs: list[Any] = [None] * len(us)
    for whole in groups.values():
        # stacks of at most BATCH_BYTES: larger ones would be fresh memory at every step (the
        # C allocator maps blocks over 32 MB anew, each page faulted in: Muon on 24 matrices of
        # 1024 x 1024 lost 10% to it), smaller ones are reused
        n = max(1, BATCH_BYTES // (8 * math.prod(us[whole[0]].shape) or 1))
        for at in range(0, len(whole), n):
            _apply_batch(part, c, slots, xps, ps, us, whole[at:at + n], outs, finish)
    return outs


# the most bytes a batch of same-shaped leaves stacks (counting 8 per element)
BATCH_BYTES = 16 << 20


def _apply_batch(part: PerLeaf, c: Any, slots: list[list[Any]], xps: list[Any], ps: list[Any],
             us: list[Any], idx: list[int], outs: list[Any], finish: bool = False) -> None:
    """:func:`_per_leaf` on the leaves ``idx``, one call, its results into ``outs``."""
    apply = part.finish if finish and part.finish is not None else part.apply
    first, xp = us[idx[0]], xps[idx[0]]
    lc = part.leaf_coeffs(c, tuple(first.shape))
    lc = _per_dtype(lc, [first]).get(first.dtype, lc)
    if not part.batched:
        i = idx[0]
        outs[i] = apply(xp, lc, ps[i], us[i], *slots[i])
        return

    def stack(xs: list[Any], xp: Any = xp) -> Any:
        if xs[0] is None:
            return None
        return xp.expand_dims(xs[0], axis=0) if len(xs) == 1 else xp.stack(xs)

    out = apply(xp, lc, stack([ps[i] for i in idx]), stack([us[i] for i in idx]),
                     *(stack([slots[i][k] for i in idx]) for k in range(len(slots[idx[0]]))))
    for j, i in enumerate(idx):
        outs[i] = tuple(None if o is None else o[j, ...] for o in out)


def _per_dtype(c: Any, us: list[Any]) -> dict[Any, Any]:
    """Coefficients that are JAX values (a rule that came through ``jax.jit`` holds its numbers
    in one float32 array, or float64 with x64) in the dtype of each leaf they meet, by dtype: as
    Python numbers would be, so bfloat16 params stay bfloat16 and x64 does not widen float32
    ones. Empty where every coefficient is a host number."""
    jax = sys.modules.get("jax")
    # (C calls, no generator: a step's Python work is the same whether JAX is loaded or not)
    if jax is None or not any(map(isinstance, c, itertools.repeat(jax.Array))):
        torch = sys.modules.get("torch")
        if torch is None or not any(map(isinstance, c, itertools.repeat(torch.Tensor))):
            return {}
        return _per_torch_dtype(torch, c, us)
    out = {}
    for dtype in {u.dtype for u in us}:
        # (a complex leaf, a part's that sees it whole: the numbers of its parts' precision)
        real = np.finfo(dtype).dtype if dtype.kind == "c" else dtype
        values = [x.astype(real) if isinstance(x, jax.Array) else x for x in c]
        out[dtype] = type(c)(*values) if hasattr(c, "_fields") else tuple(values)
    return out


def _per_torch_dtype(torch: Any, c: Any, us: list[Any]) -> dict[Any, Any]:
    """:func:`_per_dtype` of coefficients that are 0-d torch tensors (a capturable step's,
    computed from its count on the device in float64; a recorded step's norm): each in the
    float dtype of the leaves it meets. A leaf with dimensions casts a 0-d tensor to its own
    dtype anyway; a 0-d leaf would take float64's (0-d with 0-d promotes), and a later part's
    lerp then refused the mix."""
    out = {}
    for dtype in {u.dtype for u in us}:
        if not dtype.is_floating_point:
            continue
        values = [x.to(dtype) if isinstance(x, torch.Tensor) and x.dim() == 0
                  and x.is_floating_point() and x.dtype != dtype else x for x in c]
        out[dtype] = type(c)(*values) if hasattr(c, "_fields") else tuple(values)
    return out


def _apply_tree(part: WholeTree, c: Any, us: list[Any], st: Any, ps: list[Any],
                state: State, extra: dict[str, Any]) -> Any:
    """A whole-tree part on every leaf's ``u``; its outputs as arrays of the params' library.
    Where JAX refuses it on leaves split over an explicit mesh (a dot product of two trees
    contracts split axes), the leaves and the part's state go in whole
    (:func:`backend.gathered`) and come out laid out as they went in."""
    kwargs = extra if part.reads_value else {}
    # (a 0-d leaf's NumPy arithmetic in the parts before hands back a scalar: a part, an optax
    # member's among them, takes arrays)
    us = [np.asarray(u) if backend.is_numpy_scalar(u) else u for u in us]
    error = None
    try:
        out, new_st = part.apply_tree(c, unflatten(state.treedef, us), st,
                                      unflatten(state.treedef, ps), **kwargs)
    except Exception as e:
        if not _layout_refused(e):
            raise
        error = e
    if error is not None:  # (out of the except clause: an error here is not "during" it)
        (full_us, split_u), (full_ps, split_p) = _whole(us), _whole(ps)
        if not (split_u or split_p):
            raise error  # nothing was split
        # (the step's own arguments too: a line search's gradient at the params)
        g = backend.gathered
        out, new_st = part.apply_tree(c, unflatten(state.treedef, full_us),
                                      _tree_map_arrays(g, st),
                                      unflatten(state.treedef, full_ps),
                                      **_tree_map_arrays(g, kwargs))
    leaves, treedef = flatten_leaves(out)
    if treedef != state.treedef:
        raise ValueError(
            f"{part.name} returned updates of structure {treedef}, the params are "
            f"{state.treedef}"
        )
    if error is not None:
        leaves = [backend.laid_out_as(x, u) for x, u in zip(leaves, us, strict=True)]
        new_st = _map_like(backend.laid_out_as, new_st, st)
    # optax hands back JAX arrays; setup admits only JAX or NumPy params beside it
    return [x if backend.library(x) == backend.library(u) else backend.to_numpy(x, u.dtype)
            for x, u in zip(leaves, us, strict=True)], _kept_dtypes(new_st, st)


def _is_state(x: Any) -> bool:
    return isinstance(x, State)


def _tree_map_arrays(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on every leaf of a whole-tree state (a member's :class:`State` is a leaf)."""
    return optree.tree_map(fn, tree, is_leaf=_is_state, none_is_leaf=True, namespace=NAMESPACE)


def _map_like(fn: Callable[[Any, Any], Any], new: Any, old: Any) -> Any:
    """A whole-tree part's new state ``new`` with each leaf ``x`` as ``fn(x, y)``, ``y`` the
    leaf it replaces in ``old``, where the two have one structure (else ``new``); ``new``
    itself where ``fn`` changed nothing. A member's :class:`State` is a leaf."""
    new_leaves, new_def = optree.tree_flatten(new, is_leaf=_is_state, none_is_leaf=True,
                                              namespace=NAMESPACE)
    old_leaves, old_def = optree.tree_flatten(old, is_leaf=_is_state, none_is_leaf=True,
                                              namespace=NAMESPACE)
    if new_def != old_def:
        return new
    out = [fn(x, y) for x, y in zip(new_leaves, old_leaves, strict=True)]
    return new if all(x is y for x, y in zip(out, new_leaves, strict=True)) else \
        optree.tree_unflatten(new_def, out)


def _kept_dtypes(new: Any, old: Any) -> Any:
    """A whole-tree part's new state ``new`` with each floating array in the dtype of the one
    it replaces in ``old``. The part computes in the step's dtype (float32 for 16-bit params,
    or the ``state_dtype``) and hands back its state in it; the state keeps the dtypes setup
    gave it, so a checkpoint loads into a state set up afresh, a jitted loop's state keeps its
    signature, and a pure step's state is an in-place step's, which writes into the old
    arrays. A member's :class:`State` is its own steps' to keep; a state that changed shape
    (a minimizer's history, None until its first step) has nothing to keep to."""
    return _map_like(_dtype_of, new, old)


def _dtype_of(x: Any, like: Any) -> Any:
    """Array ``x`` in the real floating dtype of array ``like`` (else ``x``, untouched)."""
    if not (_real_float(x) and _real_float(like)):
        return x
    if x.dtype == like.dtype and not (backend.is_numpy_scalar(x)
                                      and isinstance(like, np.ndarray)):
        return x
    if backend.is_numpy_scalar(x):  # NumPy's 0-d arithmetic: the state keeps arrays
        return np.asarray(x, dtype=like.dtype)
    xp = backend.namespace(x)
    if xp is not backend.namespace(like):  # (a state loaded from another library's file)
        return xp.astype(x, getattr(xp, backend.dtype_name(like.dtype)))
    return backend.narrowed(x, like.dtype)


def _real_float(x: Any) -> bool:
    if not (backend.is_array(x) or backend.is_numpy_scalar(x)):
        return False
    # (NumPy's isdtype refuses ml_dtypes' bfloat16, which the NumPy views of JAX's arrays hold)
    floating, complex_ = backend._floats(x, backend.namespace(x))
    return floating and not complex_


def _norm(us: list[Any], xps: list[Any]) -> Any:
    """The global norm of every leaf's ``u``."""
    return _squares(us, xps)**0.5


def _squares(us: list[Any], xps: list[Any]) -> Any:
    """The sum of squares of every element of ``us``, leaf after leaf in float64 where the
    library and device have it (JAX only with x64 enabled; not torch's MPS), read to the host
    once: a read per leaf was a device synchronisation per tensor on a GPU. Traced (under jit),
    on torch's meta device (a dry run, nothing to read) or lazy (dask's: a read computes the
    whole history, at every step), the library's own number."""
    total: Any = 0.0
    for xp, u in zip(xps, us, strict=True):
        wide = u.dtype if backend.is_jax(u) else backend.widest_float(xp, u)
        part = xp.sum(xp.astype(u, wide) ** 2)
        if hasattr(total, "to") and part.device != total.device:
            part = part.to(total.device)  # (torch leaves on several devices: on the first's)
        total = total + part
    # (a Python float, not NumPy's float64, which is no weak scalar: float32 leaves scaled by
    # it would be computed in float64)
    if type(total) is float or _traced(total) or getattr(total, "is_meta", False) or (
            backend.is_lazy(total)):
        return total
    if backend.is_torch(total) and backend.keeps_torch_numbers():
        # (a recorded step: a norm the derivative goes through, as torch's clip; and inside a
        # torch.func transform, which carries its own through it)
        return total
    return float(total)


class _Split:
    """The global norms (``clip_by_global_norm``'s) of a step taken in groups of leaves, one
    engine call per step count (:func:`_by_count`), each read through
    :func:`backend.global_squares`: pass ``known`` steps every group purely and sums their
    squares at the ``known``-th such part, the parts before it reading the sums of every
    group; once all are known the groups step, each part reading the norm of all the leaves
    that move, as one call over them would have. ``summed`` False: one group, its own squares,
    only the parts are the split's."""

    def __init__(self, parts: list[Elementwise], summed: bool) -> None:
        self.sums: list[list[Any]] = [[0.0, 0] for _ in parts]  # [squares, elements]
        # the norm parts at the count the groups share: one threshold for the norm of all
        self.parts = parts
        self.known = 0
        self.summed = summed
        self.at = 0  # the part a group's step is at

    def total(self, squares: Any, size: int) -> tuple[Any, int, Elementwise | None]:
        at, self.at = self.at, self.at + 1
        if not self.summed:
            return squares, size, self.parts[at]
        if at < self.known:
            return self.sums[at][0], self.sums[at][1], self.parts[at]
        if at == self.known:
            self.sums[at][0] = self.sums[at][0] + squares
            self.sums[at][1] += size
            raise _Summed  # the rest of this group's step is not wanted
        return squares, size, None


@contextlib.contextmanager
def shared_norms(rule: Transform, steps: Sequence[Callable[[], Any]], count: Any) -> Any:
    """Within: each global norm of ``rule`` (``clip_by_global_norm``'s) is that of every group
    of leaves a step takes in one engine call each (leaves that count apart, a torch group's
    runs of another dtype): ``steps`` are the groups' steps, called group by group in passes
    that stop at the norm they sum (:class:`_Split`); and each norm's part is as at ``count``
    for every group (a scheduled threshold is one for the whole norm, as a clip of the tree
    is, not each group's at its own count), a lone group's too (``steps`` empty: it steps at a
    count of its own). Yields the split (None where no such part, or one group and no
    schedule: nothing to share), whose ``at`` each group's step starts from 0."""
    norms = _global_norms(rule)
    split = None
    if norms and (len(steps) > 1 or not all(part.fixed for part in norms)):
        # the norm parts alone at the count, first in the ranges of the records that hold them
        # (a rule's own may be narrower than its part's), and in their words: another part's
        # schedule is read, and checked, at the counts its leaves step at
        held = {id(part) for part in norms}
        for record in _records(rule):
            if any(id(part) in held for part in record.flat_parts):
                try:
                    record._check_at(count)
                except (ValueError, TypeError) as own:
                    raise _in_rules_words(rule, record, own) from None
        split = _Split([cast(Elementwise, part.at(count)) for part in norms],
                       summed=len(steps) > 1)
    token = backend.SPLIT.set(split)
    try:
        if split is not None and split.summed:
            for split.known in range(len(norms)):
                for f in steps:
                    split.at = 0
                    with contextlib.suppress(_Summed):
                        f()
            split.known = len(norms)  # every norm known: the groups step
        yield split
    finally:
        backend.SPLIT.reset(token)


def _global_norms(rule: Transform) -> list[Elementwise]:
    """``rule``'s parts that take a global norm (:func:`shared_norms`), in the step's order."""
    return [part for part, _ in rule.keyed_parts if isinstance(part, Elementwise)
            and part.needs_norm and not part.norm_per_leaf]


def global_norm_parts(rule: Transform) -> int:
    """How many of ``rule``'s parts take a global norm (:func:`shared_norms`)."""
    return len(_global_norms(rule))


class _Summed(Exception):
    """A group's squares at the part :class:`_Split` sums are taken: its step stops there,
    before anything is written (the reference path writes after computing, the compiled
    loop after its norm's read pass)."""


def _as_new_array(x: Any, like: Any, inputs: tuple[Any, ...]) -> Any:
    """Results of pure updates: arrays (NumPy turns 0-d results into scalars) that alias none
    of the caller's inputs."""
    if type(x) is not type(like) and (not backend.is_array(x)
                                      or backend.is_numpy_scalar(x)):
        return backend.namespace(like).asarray(x, dtype=like.dtype)
    if x.dtype != like.dtype:  # a step computed in a wider state_dtype
        return backend.narrowed(x, like.dtype)
    if type(like) is np.ndarray and x.strides != like.strides and like.ndim > 1 and \
            like.flags.f_contiguous:
        # NumPy hands back C order from mixed layouts: the new array keeps its old one, as the
        # in-place step's does, so that later sums over it add in the same order
        out = np.empty_like(like)
        out[...] = x
        return out
    # (a view of an input's memory too: SOAP hands back a slot reshaped)
    owner = backend.owner(x)
    for a in inputs:
        if x is a or owner is not x and owner is backend.owner(a):
            return backend.fresh(x, backend.namespace(like))
    return x


@functools.lru_cache(maxsize=64)
def flat_list_def(n: int) -> Any:
    """The tree structure of a flat list of ``n`` arrays."""
    return optree.tree_structure([0] * n, namespace=NAMESPACE)  # type: ignore[arg-type]


def _fast(state: Any, params: Any, grads: Any, inplace: bool) -> Any:
    """A strategy's result as ``(new_state, new_params)``, or the reason the one that took
    these arrays declined (None: no strategy took them, nothing worth a word).

    Only cheap whole-tree work happens here; the strategies check each leaf."""
    if (not isinstance(state, State) or state.tree_states or backend.is_tracked()
            or state.counts is not None or isinstance(state.treedef, AnyParams)):
        # an optax transform in the chain: JAX runs it, on the whole tree; a step autograd
        # records: the reference path's torch operations
        return None
    if backend.PAIRS.get() is not None and any(p.complex_aware for p in state.rule.flat_parts):
        # the real pairs of complex params, which such a part sees as complex numbers on the
        # reference path only
        return None
    if type(params) is list and state.treedef == flat_list_def(len(params)):
        leaves = params
    else:
        leaves, treedef = optree.tree_flatten(params, namespace=NAMESPACE)
        if treedef != state.treedef:
            return None
    if state.rule.has_per_leaf and not (leaves and backend.is_numpy(leaves[0])):
        # decided here (a strategy would look at its slots first): tensors and JAX arrays take
        # the reference path, per-leaf parts with their library's own reductions; NumPy arrays
        # the compiled loop for the elementwise parts around them (fast.cpu.segmented)
        return None
    g_leaves: Any
    if type(grads) is list and len(grads) == len(leaves):
        g_leaves = grads
    elif (type(grads) is backend.Addressed and len(grads.tensors) == len(leaves)
          and state.state_dtype != "q8"):  # the compiled loop of float slots reads addresses
        g_leaves = grads
    else:
        if type(grads) is backend.Addressed:
            grads = grads.arrays()
        g_leaves, g_def = optree.tree_flatten(grads, namespace=NAMESPACE)
        if g_def != state.treedef:
            return None
    if not leaves:
        return None
    if state.state_dtype not in (None, "q8"):
        # the compiled paths compute in float64 for float64 params, float32 otherwise; a state
        # kept in another dtype is computed in that dtype (_compute_dtype), on the reference path
        # (but bfloat16 tensors' NumPy views, which have none)
        stored = backend.dtype_name(leaves[0].dtype)
        if state.state_dtype != ("float64" if stored == "float64" else "float32") and not (
                backend.is_numpy(leaves[0]) and backend.is_bfloat16_bits(leaves[0])):
            if backend.is_numpy(leaves[0]) or backend.is_torch(leaves[0]):
                return f"params stored as {stored} and state as {state.state_dtype}"
            return None
    elif state.state_dtype is None and state.slots and getattr(
            getattr(leaves[0], "dtype", None), "itemsize", None) == 2:
        # the loop takes float32 slots beside 16-bit params, as state_dtype="float32" keeps
        # them; without it they are a state set up for other params (the reference path says so)
        some = next(iter(state.slots.values()))[0]
        if some is not None and getattr(some, "dtype", None) != leaves[0].dtype:
            return None
    strategies = fast.Q8_STRATEGIES if state.state_dtype == "q8" else fast.STRATEGIES
    if inplace and strategies and type(g_leaves) is not backend.Addressed and _hazard(
            state.rule.memo, leaves, g_leaves):
        # views, or another leaf's params as a gradient (the gradient of a*b): the compiled
        # loop writes each element as it reads it, so two params sharing memory, or a gradient
        # reaching into a parameter's other elements, would be read after being written
        if len(set(map(id, leaves))) != len(leaves):  # (setup refused it; update_ did not)
            _once_each(flatten_named(params)[2], leaves, views=False)
        if backend.has_views(leaves):
            _apart(None, leaves, params, writes=True)
        g_leaves = _grads_apart(leaves, g_leaves, same_ok=True)
    at = functools.partial(resolve, state.rule, state.step)
    for strategy in strategies:
        out = strategy(at, leaves, g_leaves, state.slots, inplace, state.rule.memo, _per_leaf)
        if out is None:
            continue
        if isinstance(out, str):
            if backend.is_numpy(leaves[0]) and backend.is_bfloat16_bits(leaves[0]):
                raise RuntimeError(
                    f"uniopt: the compiled loop declined bfloat16 tensors ({out}); NumPy has no "
                    "bfloat16, so there is no reference path for their NumPy views"
                )
            return out
        new_params, slots = out
        step = state.step
        # (inline: the small step's Python work is counted)
        step = step + 1 if type(step) is int else _next_step(step) if not inplace else \
            _counted_in_place(step)
        if inplace:  # (update_ advances the state passed in: its slots were written)
            state.__dict__["step"] = step
            return state, None
        return stepped(state, step, slots), unflatten(state.treedef, new_params)
    return None


def _hazard(memo: dict[Any, Any], leaves: list[Any], g_leaves: list[Any]) -> bool:
    """Whether an in-place step over ``leaves`` must look closer at what shares memory: a
    leaf or a gradient is a view, or a gradient is one of the params (the gradient of a*b).
    In C calls and one pass over the gradients (a small step's cost): NumPy params met before
    are the rule's memo's, with their ids and whether any is a view (their memory is theirs
    for life)."""
    if not leaves:
        return False
    attr = _VIEW_ATTR.get(type(leaves[0]))
    if attr is None:  # a type met for the first time
        attr = _VIEW_ATTR[type(leaves[0])] = backend.view_attr(leaves[0]) or ""
    if attr != "base":  # tensors (whose memory may change under them), and other libraries
        views = backend.has_views(leaves, g_leaves) if not attr else any(
            map(_IS_NOT_NONE, map(getattr, leaves, repeat(attr), repeat(None)))) or any(
            map(_IS_NOT_NONE, map(getattr, g_leaves, repeat(attr), repeat(None))))
        ids = set(map(id, leaves))
        return views or len(ids) != len(leaves) or not ids.isdisjoint(map(id, g_leaves))
    known = memo.get("apart")
    if known is None or len(known[0]) != len(leaves) or not all(
            map(operator.is_, map(_DEREF, known[0]), leaves)):
        views = any(map(_IS_NOT_NONE, map(getattr, leaves, repeat(attr), repeat(None))))
        ids = set(map(id, leaves))
        # weak references: the rule (the user's, reused from trial to trial) keeps no params
        # alive; an array given twice is a hazard, as a view is
        known = memo["apart"] = (tuple(map(weakref.ref, leaves)), ids,
                                 views or len(ids) != len(leaves))
    if known[2]:
        return True
    return any(map(_IS_NOT_NONE, map(getattr, g_leaves, repeat("base"), repeat(None)))) or \
        not known[1].isdisjoint(map(id, g_leaves))


_DEREF = weakref.ref.__call__


def _grads_apart(params: list[Any], grads: list[Any], same_ok: bool) -> list[Any]:
    """``grads`` with a copy of each that shares memory with a parameter; ``same_ok``: but its
    own parameter's very elements (the compiled loop reads a gradient at the index it writes
    before writing it; the reference path's slots may keep the gradient itself, Adan's)."""
    if backend.memory_ids(params).isdisjoint(backend.memory_ids(grads)):
        return grads  # (the common case, views of a gradient buffer: one set each)
    owners: dict[int, list[int]] = {}
    for j, p in enumerate(params):
        owners.setdefault(id(backend.owner(p)), []).append(j)
    out = None
    for i, g in enumerate(grads):
        js = None if g is None else owners.get(id(backend.owner(g)))
        if js and any(not (same_ok and j == i and backend.same_memory(g, params[j]))
                      and (g is params[j] or backend.overlapping([params[j], g]) is not None)
                      for j in js):
            out = list(grads) if out is None else out
            out[i] = backend.detached_copy(g)
    return grads if out is None else out


# a JAX count stops here, as optax's safe_increment stops it: past it an int32 would wrap to
# negative numbers, and the bias corrections and schedules read from it with it
_INT32_MAX = 2**31 - 1


def _next_step(step: Any, by: Any = 1) -> Any:
    """``step + by``, a JAX int32 count kept at ``2**31 - 1``, under ``jax.jit`` and eagerly
    (two more operations dispatched at every eager step: an eager loop does not count that
    far, but a checkpoint's count may be there, and wrapped, the count made Adam's step 0 and
    a schedule start again)."""
    if type(step) is int or str(getattr(step, "dtype", "")) != "int32" or not (
            _traced(step) or backend.is_jax(step)):
        return step + by
    import jax.numpy as jnp

    return jnp.where(step < _INT32_MAX, step + by, step)


def _counted_in_place(step: Any) -> Any:
    """The step count after ``step`` of an in-place step: a torch tensor (a counter kept on
    the device, which a captured graph reads) counted in place."""
    return step.add_(1) if backend.is_torch(step) else step + 1


@dataclasses.dataclass
class _Step:
    """What every entry point checks before it computes anything: the leaves, aligned."""

    params: list[Any]
    grads: list[Any]
    treedef: Any
    # the flax NNX Variables whose arrays ``params`` are, where update_ sets them; else None
    held: list[Any] | None = None


NO_RECORDED_Q8 = (
    "a recorded step (uniopt.backend.tracked(), differentiable=True) of a state kept in 8 bits "
    "(state_dtype='q8'): each step rounds the state to one of 256 codes a block, and the "
    "derivative through that rounding is not the arithmetic's; record a step of a float state")


def _recorded() -> bool:
    """Whether a step of torch tensors now is recorded by autograd: inside ``tracked()``, with
    grad enabled (under ``torch.no_grad()`` nothing is)."""
    return backend.is_tracked() and sys.modules["torch"].is_grad_enabled()


def _prologue(state: Any, params: Any, grads: Any, *, writes: bool = False) -> _Step:
    """Flatten and check everything, touching no array: the one prologue of :func:`update`,
    :func:`update_` and the optax protocol. ``params=None`` (optax without params): the
    gradients stand in for them."""
    if not isinstance(state, State):  # (before the params: optax's order put grads first)
        raise TypeError(_not_a_state(state, params, grads))
    if params is None:
        p_leaves, treedef, names = _leaves(grads, "grads")
        g_leaves = p_leaves
    else:
        p_leaves, treedef, names = _leaves(params)
    if (getattr(state, "state_dtype", None) == "q8" and p_leaves
            and backend.is_torch(p_leaves[0]) and _recorded()):
        raise ValueError(NO_RECORDED_Q8)
    _check_state(state, treedef, names, p_leaves)
    if params is not None:
        g_leaves = _align_grads(grads, treedef, names, p_leaves, none=True)
        if p_leaves and backend.is_torch(p_leaves[0]):
            _torch_grads(names, p_leaves, g_leaves, state)
        elif p_leaves and not (backend.is_numpy(p_leaves[0])
                               or backend.is_jax(backend.held_array(p_leaves[0]))):
            # (NumPy has one device; JAX places arrays itself, an uncommitted one beside a
            # committed one, as NNX's Params hold theirs)
            _same_devices(names, p_leaves, g_leaves)
    if writes:
        for name, p in zip(names, p_leaves, strict=True):
            reason = backend.immutable_reason(p)
            if reason:
                raise TypeError(f"update_ cannot write {name} in place: {reason}")
        for key, arrays in state.slots.items():
            for name, s in zip(names, arrays, strict=True):
                reason = None if s is None else backend.immutable_reason(
                    s.codes if isinstance(s, quant.Q8) else s)
                if reason:
                    raise TypeError(f"update_ cannot write the state's {key} of {name}: {reason}")
        hazard = _hazard(state.rule.memo, p_leaves, g_leaves)
        _once_each(names, p_leaves, hazard, writes=True)
        if hazard:
            # the gradient of |w|^2/2 is w (or a view of it): a slot that keeps the gradient
            # (Adan's previous one) would be handed the memory the step has just written with
            # the new params
            g_leaves = _grads_apart(p_leaves, g_leaves, same_ok=False)
    if p_leaves and is_variable(type(p_leaves[0])):
        # flax NNX's Variables (nnx.split's State of Params, and jax.grad's of it) pass for
        # their arrays, but not everywhere: a Variable's != is no array's, and NumPy takes one
        # for a dtype. The parts step the arrays they hold; update hands Params back
        # (_held_as), update_ sets each Variable to its new array
        held = p_leaves
        p_leaves = list(map(backend.held_array, p_leaves))
        g_leaves = p_leaves if params is None else list(map(backend.held_array, g_leaves))
        return _Step(p_leaves, g_leaves, treedef, held if writes else None)
    return _Step(p_leaves, g_leaves, treedef)


def check_step(state: State, params: Any, grads: Any) -> None:
    """Raise where :func:`update_` would refuse these arrays, writing nothing: a caller that
    steps several states in turn (uniopt.torch's runs and groups) checks every one before the
    first writes."""
    if type(grads) is backend.Addressed:
        grads = grads.arrays()
    leaves, treedef, names = _leaves(params, kinds=False)
    if leaves and backend.is_numpy(leaves[0]) and backend.is_bfloat16_bits(leaves[0]):
        # bfloat16 tensors' NumPy views (their bits, which _leaves takes for integers): only
        # the compiled loop takes them, and checks their kinds itself, declining with a reason;
        # here what it cannot tell apart from a reason to decline, the gradients' alignment
        _align_grads(grads, treedef, names, leaves, none=True)
        return
    _prologue(state, params, grads, writes=True)


def _new_slots(state: State, slots: dict[str, list[Any]], step: _Step) -> dict[str, list[Any]]:
    """The new slots of a pure update, aliasing none of the inputs, a JAX slot laid out as
    it came (:func:`backend.laid_out_as`), an 8-bit one's arrays too (JAX's sorted search
    drops the mesh from the codes' type, which a jitted step then hands back spelled ``P()``
    where they came ``P(None, None)``: a second entry in ``jit``'s cache)."""
    relay = backend.laid_out_as if step.params and backend.is_jax(step.params[0]) else _as_is
    return {
        key: [None if old is None else
              quant.Q8(relay(s.codes, old.codes), relay(s.absmax, old.absmax))
              if isinstance(s, quant.Q8) else
              _as_new_array(relay(s, old), old, (p, g, old)) for s, p, g, old in
              zip(arrays, step.params, step.grads, state.slots[key], strict=True)]
        for key, arrays in slots.items()
    }


def _as_is(x: Any, like: Any) -> Any:
    return x


Params = TypeVar("Params")


def update(state: State, params: Params, grads: Any, *, value: Any = None,
           **extra: Any) -> tuple[State, Params]:
    """One step, pure: returns ``(new_state, new_params)`` and leaves every input untouched.

    ``grads`` is a tree shaped like ``params`` or a flat list aligned with
    :func:`uniopt.trainables`. ``value``: the loss, for the parts that read it
    (:class:`uniopt.reduce_on_plateau`); ignored by the others. Other keyword arguments go
    with it to those parts (a line search's ``grad=`` and ``value_fn=``:
    :class:`uniopt.lbfgs_linesearch`; Sophia-H's ``hvp=``), which every rule takes; any other
    keyword is refused, unless a line search (which hands it to ``value_fn``) or an optax member
    taking extra arguments is in the rule.
    """
    if extra:
        _check_keywords("update", state, extra)
    if (type(grads) is list or type(grads) is tuple) and type(params) is dict:
        _flat_order(state, params, grads)
    if isinstance(getattr(state, "step", None), _NUMPY_COUNTER):  # (_restored, inline)
        converted = _numpy_as_jax(params, grads, state)
        if converted is not None:
            params, state = converted
    new, out = _pure(state, params, grads, value, extra)
    out = _held_as(params, out)
    # what a whole-tree part handed on as it was, or as a view of it, copied: nothing returned
    # aliases an input (a tree state, a member's state that did not step in a chain); the
    # slots are new arrays where they are made (_as_new_array), and a combinator taking the
    # whole step steps its members by this function, each then checked, or copies the state
    # of one that does not move (combine._unmoved)
    if not new.tree_states or _combinator(state.rule) is not None:
        return new, out
    leaves: list[Any] = optree.tree_leaves(params, namespace=NAMESPACE)  # type: ignore[arg-type]
    if leaves and backend.is_jax(leaves[0]):  # (immutable: sharing is no aliasing)
        return new, out
    trees = _unshared(new.tree_states, (state.slots, state.tree_states, leaves, grads))
    return (new, out) if trees is new.tree_states else (
        dataclasses.replace(new, tree_states=trees), out)


_IS_NOT_NONE = functools.partial(operator.is_not, None)
# the attribute that names a view's owner, by array type ("": none known; filled as the types
# are met)
_VIEW_ATTR: dict[type, str] = {np.ndarray: "base"}


def _unshared(new: Any, given: Any) -> Any:
    """``new`` with each NumPy array or torch tensor whose memory is that of an array of
    ``given`` (the array itself, or a view of its owner) copied."""
    leaves, treedef = optree.tree_flatten(new, namespace=NAMESPACE)
    if not leaves:
        return new
    kinds = backend.memory_types()
    given_leaves = [x for x in optree.tree_leaves(given, namespace=NAMESPACE)
                    if isinstance(x, kinds)]  # (a count, an int, is no memory)
    # the common case in C calls: no leaf is an array given, and none is a view (NumPy's base,
    # torch's _base; array-api-strict's arrays wrap NumPy's, a view as any other)
    if set(map(id, given_leaves)).isdisjoint(map(id, leaves)) and not any(
            map(_IS_NOT_NONE, map(getattr, leaves, repeat("base"), repeat(None)))) and not any(
            map(_IS_NOT_NONE, map(getattr, leaves, repeat("_base"), repeat(None)))) and not (
            len(kinds) > 2 and any(isinstance(x, kinds[2]) for x in leaves)):
        return new
    held = set(map(id, map(backend.owner, given_leaves)))
    hits = [isinstance(x, kinds) and id(backend.owner(x)) in held for x in leaves]
    if not any(hits):
        return new
    return treedef.unflatten([backend.fresh(x, backend.namespace(x)) if hit else x
                              for x, hit in zip(leaves, hits, strict=True)])


def _pure(state: State, params: Any, grads: Any, value: Any,
          extra: dict[str, Any]) -> tuple[State, Any]:
    """:func:`update`, before its results are made to alias nothing of its inputs."""
    fast_out = _fast(state, params, grads, inplace=False)
    if isinstance(fast_out, tuple):
        return fast_out
    with backend.quiet():
        return _reference(state, params, grads, fast_out, value, extra)


def _reference(state: State, params: Any, grads: Any, fast_out: Any, value: Any,
               extra: dict[str, Any]) -> tuple[State, Any]:
    """:func:`_pure`'s step where no compiled strategy took it (``fast_out``: why, or None)."""
    if type(grads) is backend.Addressed:
        grads = grads.arrays()
    return _reference_step(state, _prologue(state, params, grads), fast_out,
                           _extra(value, extra))


def _reference_step(state: State, step: _Step, fast_out: Any,
                    extra: dict[str, Any]) -> tuple[State, Any]:
    """:func:`_reference` after its prologue."""
    state = _with_structure(state, step.treedef)
    if dtensor.any_dtensor(step.params):
        return _sharded(state, step, inplace=False, extra=extra)
    if any(map(backend.is_complex, step.params)) and _as_pairs_or_whole(state.rule):
        return _as_pairs(state, step, inplace=False, extra=extra)
    combinator = _combinator(state.rule)
    if combinator is not None:
        return _run(state, combinator, step, inplace=False, extra=extra)
    if state.counts is not None or any(g is None for g in step.grads):
        return _by_count(state, step, inplace=False)
    with backend.outside_autograd(step.params):
        news, slots, trees = _deltas(state, step.params, step.grads, extra, finish=True)
        new_p = [
            backend.like_leaf(_as_new_array(new, p, (p, g)), p)
            for p, g, new in zip(step.params, step.grads, news, strict=True)
        ]
    if fast_out:
        fast.warn_once(fast_out)
    new = dataclasses.replace(state, step=_next_step(state.step),
                              slots=_new_slots(state, slots, step), tree_states=trees)
    return new, unflatten(step.treedef, new_p)


def update_(state: State, params: Any, grads: Any, *, value: Any = None,
            **extra: Any) -> State:
    """One step in place: the arrays of ``params`` and of the state are written, the state
    itself is advanced (its step, its whole-tree parts' states) and returned. Bit for bit the
    same numbers as :func:`update`.

    ``state = uo.update_(state, ...)`` and a bare ``uo.update_(state, ...)`` are one step: a
    state whose slots were written in place but whose step stayed behind would bias-correct
    the next step's moments with the wrong count, silently."""
    if extra:
        _check_keywords("update_", state, extra)
    if (type(grads) is list or type(grads) is tuple) and type(params) is dict:
        _flat_order(state, params, grads)
    fast_out = _fast(state, params, grads, inplace=True)
    if isinstance(fast_out, tuple):
        new = fast_out[0]
    else:
        with backend.quiet():
            new = _update_(state, params, grads, fast_out, value, extra)
    return _advance(state, new)


def _flat_order(state: State, params: Any, grads: Any) -> None:
    """A flat gradient list for a dict of params is read in :func:`uniopt.trainables` order
    (keys sorted), where ``torch.autograd.grad(loss, model.parameters())`` gives the dict's own
    order (``named_parameters``'): a LayerNorm's weight and bias, of one shape, swapped with
    no error. Where the two orders differ and the gradients' shapes fit both, nothing can tell
    which was meant: a warning, once per rule and order of keys."""
    memo = getattr(state.rule, "memo", None)
    if memo is None or memo.get("flat-order-dict") == id(params):
        return  # (an update_ loop's one dict, looked at already; by id: the memo keeps none)
    key = ("flat-order", tuple(params))
    memo["flat-order-dict"] = id(params)
    if key in memo:
        return
    memo[key] = True
    own = list(params.values())
    leaves = flatten_leaves(params)[0]
    if len(own) != len(leaves) or len(grads) != len(own) or all(map(operator.is_, own, leaves)):
        return
    if not all(map(backend.is_array, own)) or \
            [tuple(x.shape) for x in own] != [tuple(x.shape) for x in leaves]:
        return  # (a list in the other order fails the shape check, naming the leaf)
    moved = next(k for k, a, b in zip(params, own, leaves, strict=True) if a is not b)
    warnings.warn(
        "uniopt: grads is a flat sequence, read in uniopt.trainables(params) order (the "
        f"dict's keys sorted), not the dict's own order ({list(params)[:3]}..., as "
        "torch.autograd.grad(loss, model.parameters()) returns them); the gradients' shapes "
        f"fit both, so one in the dict's order steps {moved!r} with another parameter's "
        "gradient, and nothing can tell which was meant. Pass the gradients as a dict, which "
        "says whose each is: dict(zip(params, torch.autograd.grad(loss, list(params.values()))))",
        stacklevel=3)


def _advance(state: State, new: State) -> State:
    """``state`` made ``new`` (an in-place step's result), and returned."""
    if new is not state:
        fields = state.__dict__
        fields.update(new.__dict__)
        fields.pop("_numbers", None)  # (a JAX flattening's cache of the old numbers)
    return state


def _update_(state: State, params: Any, grads: Any, fast_out: Any, value: Any,
             extra: dict[str, Any]) -> State:
    """:func:`update_`'s step where no compiled strategy took it (``fast_out``: why, or
    None): the new state, the old one's arrays written in place."""
    if type(grads) is backend.Addressed:
        grads = grads.arrays()
    step = _prologue(state, params, grads, writes=True)
    extra = _extra(value, extra)
    if step.held is not None:
        # flax NNX's Variables, written by setting each one's array (immutable): the pure step
        # on their arrays, computed whole before the first is set
        new, out = _reference_step(state, step, fast_out, extra)
        for v, x in zip(step.held, flatten_leaves(out)[0], strict=True):
            backend.assign(v, x)
        return new
    state = _with_structure(state, step.treedef)
    if dtensor.any_dtensor(step.params):
        return _sharded(state, step, inplace=True, extra=extra)[0]
    if any(map(backend.is_complex, step.params)) and _as_pairs_or_whole(state.rule):
        return _as_pairs(state, step, inplace=True, extra=extra)[0]
    combinator = _combinator(state.rule)
    if combinator is not None:
        return _run(state, combinator, step, inplace=True, extra=extra)[0]
    if state.counts is not None or any(g is None for g in step.grads):
        return _by_count(state, step, inplace=True)[0]
    with backend.outside_autograd(step.params):
        news, slots, trees = _deltas(state, step.params, step.grads, extra, finish=True)
        if fast_out:
            # before anything is written: a warning made an error (-W error) leaves params
            # and state as they were, not written and left at the old count
            fast.warn_once(fast_out)
        for p, new in zip(step.params, news, strict=True):
            backend.assign(p, new)
        for key, arrays in slots.items():
            for old, new in zip(state.slots[key], arrays, strict=True):
                if isinstance(old, quant.Q8):
                    backend.assign(old.codes, new.codes)
                    backend.assign(old.absmax, new.absmax)
                elif old is not None:
                    backend.assign(old, new)
    return dataclasses.replace(state, step=_next_step(state.step), tree_states=trees)


def _sharded(state: State, step: _Step, inplace: bool,
             extra: dict[str, Any]) -> tuple[State, Any]:
    """A step of DTensor params (FSDP2, tensor parallel): the engine on each rank's local
    shards (:mod:`uniopt.interop.dtensor`), on the compiled path where they are CPU tensors;
    a pure step's results are DTensors laid out as their inputs."""
    dtensor.check_rule(state.rule)
    if state.state_dtype == "q8":
        dtensor.check_q8_rule(state.rule)
    loc = dtensor.localize(step.params, step.grads, state.slots)
    sub = State(state.rule, state.step, loc.slots, flat_list_def(len(loc.params)),
                state.state_dtype, state.tree_states, state.counts)
    with backend.sharded(loc.sharding):
        if inplace:
            new = update_(sub, loc.params, loc.grads, **extra)
            return dataclasses.replace(state, step=new.step, tree_states=new.tree_states,
                                       counts=new.counts), None
        new, ps = update(sub, loc.params, loc.grads, **extra)
    slots = {k: loc.wrap(v, state.slots[k]) for k, v in new.slots.items()}
    out = dataclasses.replace(state, step=new.step, slots=slots, tree_states=new.tree_states,
                              counts=new.counts)
    return out, unflatten(step.treedef, [backend.like_leaf(x, p) for x, p in
                                         zip(loc.wrap(ps, step.params), step.params,
                                             strict=True)])


# the keywords a step takes beside value= (the loss), for the parts that read them: every
# rule takes them (a loop written for a line search may step any rule), as optax's chain
# hands its extra arguments to every member
STEP_KEYWORDS = ("grad", "value_fn", "hvp")
_READ = ("value", *STEP_KEYWORDS)  # (value= among them, as a combinator hands it on)


def _check_keywords(entry: str, state: Any, extra: dict[str, Any]) -> None:
    """Refuse a keyword no part reads (a misspelt ``value``, or ``lr=5.0`` taken for a new
    learning rate), unless an optax member of the rule takes extra arguments of any name."""
    unknown = [k for k in extra if k not in STEP_KEYWORDS]
    if not unknown or not isinstance(state, State):
        return
    if _takes_any_keyword(state.rule):
        return
    k = unknown[0]
    hint = did_you_mean(k, _READ)
    if not hint and k in {f.name for _, m in members(state.rule) for f in dataclasses.fields(m)}:
        hint = f"; a hyperparameter changes with uo.adjust(state, {k}=...)"
    raise TypeError(f"{entry}: unknown keyword {k!r}{hint}; a step takes value= (the loss) and "
                    f"{', '.join(f'{n}=' for n in STEP_KEYWORDS)} for the parts that read them")


def _takes_any_keyword(rule: Transform) -> bool:
    """Whether a part of ``rule`` takes keywords of any name: an optax member's extra
    arguments, a line search's for its ``value_fn``."""
    return any(getattr(p, "takes_any_keyword", False)
               for _, m in members(rule) for p in (m, *m.flat_parts))


def _member_keywords(rule: Transform, extra: dict[str, Any]) -> dict[str, Any]:
    """The step's keywords a combinator's member takes: those of another member's optax
    transformation are not its own."""
    if all(k in _READ for k in extra) or _takes_any_keyword(rule):
        return extra
    return {k: v for k, v in extra.items() if k in _READ}


def _extra(value: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The step's extra arguments for the parts that read them: ``value`` where given (the
    step's loss: a number, or a 0-d array; a per-example loss broadcast into the params'
    shape), and the others."""
    if value is None:
        return extra
    if isinstance(value, (bool, str)) or not (
            isinstance(value, (int, float)) or getattr(value, "ndim", None) == 0):
        shape = getattr(value, "shape", None)
        if shape is not None:
            raise ValueError(f"value= must be one number, the step's loss; got an array of "
                             f"shape {tuple(shape)} (its mean or sum, for a loss per example)")
        raise TypeError(f"value= must be one number, the step's loss; got {value!r}")
    return {"value": value, **extra}


# what to do with a leaf without a gradient (a frozen layer) where a part steps every leaf:
# zeros, the hint these errors gave, stepped it
NONE_HINT = ("A zero gradient would not leave it still (a rule's moments decay, its weight "
             "decay applies): step the rule inside uo.freeze(rule, paths), which passes the "
             "leaves paths names by, or leave them out of the params")


def _by_count(state: State, step: _Step, inplace: bool) -> tuple[State, Any]:
    """A step where leaves count their steps apart: those whose gradient is None stay as they
    are (params, slots, count), as torch and Optimisers.jl leave them; the others step in one
    engine call per count they share (on JAX, where counts are traced, one per leaf), at
    that count: bias corrections and schedules see each leaf's own."""
    n = len(step.params)
    moving = [i for i, g in enumerate(step.grads) if g is not None]
    if state.tree_states and len(moving) < n:
        raise ValueError(
            f"{state.rule.name}: a gradient is None, but whole-tree parts "
            f"({', '.join(state.rule.tree_layout)}) see every leaf at once. {NONE_HINT}"
        )
    jax = bool(step.params) and backend.is_jax(step.params[0])
    xp = backend.namespace(step.params[0]) if jax else np
    counts = state.counts
    if counts is None:
        counts = xp.full(n, state.step, dtype=xp.int32 if jax else xp.int64)
    groups: dict[Any, list[int]] = {}
    for i in moving:
        groups.setdefault(i if jax else int(counts[i]), []).append(i)
    if inplace and len(groups) > 1 and not all(p.fixed for p in state.rule.flat_parts):
        # each group's numbers at its count, before the first group writes: a schedule invalid
        # at one count must not leave the leaves at another stepped
        for key in groups:
            resolve(state.rule, key)
    new_p = list(step.params)
    slots = {k: list(v) for k, v in state.slots.items()}
    trees = state.tree_states

    def sub_state(key: Any, idx: list[int]) -> State:
        return State(state.rule, counts[idx[0]] if jax else key,
                     {k: [v[i] for i in idx] for k, v in state.slots.items()},
                     flat_list_def(len(idx)), state.state_dtype, trees)

    # (the squares in place for an in-place step, stopped before it writes; pure for a pure
    # step, on JAX, and where a per-leaf part may come first: the compiled segments before it
    # write their slots as they go)
    run = update_ if inplace and not (jax or state.rule.has_per_leaf) else update
    sums = [functools.partial(run, sub_state(key, idx), [step.params[i] for i in idx],
                              [step.grads[i] for i in idx]) for key, idx in groups.items()
            ] if len(groups) > 1 and global_norm_parts(state.rule) else []
    with shared_norms(state.rule, sums, state.step) as split:
        for key, idx in groups.items():
            sub = sub_state(key, idx)
            ps, gs = [step.params[i] for i in idx], [step.grads[i] for i in idx]
            if split is not None:
                split.at = 0
            if inplace:
                trees = update_(sub, ps, gs).tree_states
                continue
            sub, out = update(sub, ps, gs)
            trees = sub.tree_states
            for j, i in enumerate(idx):
                new_p[i] = out[j]
                for k in slots:
                    slots[k][i] = sub.slots[k][j]
    if not inplace:  # a pure step aliases none of its inputs
        still = set(range(n)) - set(moving)
        new_p = [_as_new_array(p, p, (p,)) if i in still else p for i, p in enumerate(new_p)]
        slots = {k: [s if s is None or i not in still else _fresh_slot(s)
                     for i, s in enumerate(v)] for k, v in slots.items()}
    mask = np.zeros(n, dtype=np.int64)
    mask[moving] = 1
    new = dataclasses.replace(state, step=_next_step(state.step), slots=slots, tree_states=trees,
                              counts=_next_step(counts, xp.asarray(mask, dtype=xp.int32)) if jax
                              else counts + mask)
    return new, None if inplace else unflatten(step.treedef, new_p)


def _fresh_slot(s: Any) -> Any:
    """A copy of slot ``s`` (an 8-bit one: of its arrays)."""
    if isinstance(s, quant.Q8):
        return quant.Q8(_as_new_array(s.codes, s.codes, (s.codes,)),
                        _as_new_array(s.absmax, s.absmax, (s.absmax,)))
    return _as_new_array(s, s, (s,))


def _pairs(xs: list[Any], inplace: bool) -> list[Any]:
    """Each complex array of ``xs`` as the real pairs of its parts (views where the library
    has them, so an in-place step writes through)."""
    return [x if x is None or not backend.is_complex(x) else backend.as_real(x, inplace)
            for x in xs]


def _back(xs: list[Any], like: list[Any]) -> list[Any]:
    """Arrays of real pairs back as complex arrays, where their counterpart in ``like`` is."""
    return [x if x is None or not backend.is_complex(c) else backend.as_complex(x, c)
            for x, c in zip(xs, like, strict=True)]


def _as_pairs(state: State, step: _Step, inplace: bool,
              extra: dict[str, Any]) -> tuple[State, Any]:
    """A step of params some of which are complex, as torch takes them: each complex array
    as the real pairs of its parts, its slots as well; the results back as complex arrays."""
    slots = {k: _pairs(v, inplace) for k, v in state.slots.items()}
    real = State(state.rule, state.step, slots, flat_list_def(len(step.params)),
                 state.state_dtype, state.tree_states, state.counts)
    grads = _pairs(step.grads, False)
    if inplace:
        # (the gradients are only read: a copy where one has no real view is as good)
        params = _pairs(step.params, True)
        with backend.stepping_pairs([params, grads], [step.params, step.grads]):
            new = update_(real, params, grads, **extra)
        # a library without real views of complex arrays (array-api-strict, dask) stepped
        # copies: written back, once the step has succeeded
        for pairs, whole in [(params, step.params),
                             *((slots[k], state.slots[k]) for k in slots)]:
            for x, c in zip(pairs, whole, strict=True):
                if c is not None and backend.is_complex(c) and not backend.has_real_view(c):
                    backend.assign(c, backend.as_complex(x, c))
        return dataclasses.replace(state, step=new.step, tree_states=new.tree_states,
                                   counts=new.counts), None
    params = _pairs(step.params, False)
    with backend.stepping_pairs([params, grads], [step.params, step.grads]):
        new, params = update(real, params, grads, **extra)
    out = dataclasses.replace(
        state, step=new.step, tree_states=new.tree_states, counts=new.counts,
        slots={k: _back(v, state.slots[k]) for k, v in new.slots.items()},
    )
    return out, unflatten(step.treedef, _back(params, step.params))


Closure = Callable[[Any], tuple[Any, Any]]


def minimize_step(state: State, params: Any, closure: Closure) -> tuple[State, Any, Any]:
    """One step that evaluates the objective itself, pure: ``(new_state, new_params, loss)``.

    ``closure(params) -> (loss, grads)`` gives the loss and the gradients (a tree shaped like
    ``params`` or a flat list) at any params it is handed; ``loss`` returned is its first
    value, at ``params``, as torch's ``step(closure)`` returns it. A rule whose part is a
    :class:`~uniopt.base.Minimizer` (:func:`uniopt.lbfgs`) calls it at trial points; any
    other rule calls it once and takes an :func:`update`, with the loss as ``value=`` for the
    parts that read it (:func:`uniopt.polyak_sgd`, :func:`uniopt.momo`).
    """
    new, out, loss = _minimize(state, params, closure, inplace=False)
    return new, _held_as(params, out), loss  # (NNX's Params back as Params, as update's)


def minimize_step_(state: State, params: Any, closure: Closure) -> tuple[State, Any]:
    """:func:`minimize_step` in place: ``(state, loss)``, the state passed in advanced as
    :func:`update_` advances it. The params are written with each trial point before the
    closure sees them (so a closure may read them from elsewhere, as torch's do), and with the
    new point at the end; if the closure raises they are put back."""
    new, _, loss = _minimize(state, params, closure, inplace=True)
    return _advance(state, new), loss


def _minimize(state: State, params: Any, closure: Closure, inplace: bool) -> Any:
    if not callable(closure):
        raise TypeError(f"minimize_step: closure must be callable (params -> (loss, grads)), "
                        f"got {closure!r}")
    leaves, treedef, names = _leaves(params)
    _check_state(state, treedef, names, leaves)
    state = _with_structure(state, treedef)
    if dtensor.any_dtensor(leaves):
        dtensor.check_rule(state.rule)
    part = next((p for p in state.rule.flat_parts if isinstance(p, Minimizer)), None)
    if part is None:  # one evaluation, its loss for the parts that read it (Polyak's, Momo's)
        loss, grads = _evaluation(closure(params))
        if inplace:
            return update_(state, params, grads, value=loss), None, loss
        return (*update(state, params, grads, value=loss), loss)
    _alone(state.rule)
    if inplace:
        _prologue(state, params, params, writes=True)
    (key,) = state.rule.tree_layout
    resolved = resolve(state.rule, state.step)[0][0]
    assert isinstance(resolved, Minimizer)
    xp = backend.namespace(leaves[0])
    with backend.outside_autograd(leaves):
        x0 = _flat(xp, leaves)

    callers = np.geterr()

    def evaluate(x: Any) -> tuple[Any, Any]:
        with np.errstate(**callers):  # (the closure is the user's: their warnings as they set)
            return _evaluated(x)

    def _evaluated(x: Any) -> tuple[Any, Any]:
        if inplace:
            if x is not x0:  # (the params hold x0 itself: the first evaluation, as torch's)
                with backend.outside_autograd(leaves):
                    for p, v in zip(leaves, _split(xp, x, leaves), strict=True):
                        backend.assign(p, v)
            loss, grads = _evaluation(closure(params))
        else:
            loss, grads = _evaluation(closure(unflatten(treedef, _split(xp, x, leaves))))
        g = _align_grads(grads, treedef, names, leaves)
        with backend.outside_autograd(leaves):
            return loss, _flat(xp, g)

    # a minimizer may write the entries of a dict state as it goes, so that a closure reads
    # them mid-step (LBFGS's n_iter and func_evals, as torch's): in place into the state's
    # own dict, put back if the step fails; a pure step's into a copy
    held = state.tree_states[key]
    before = dict(held) if isinstance(held, dict) else held
    work = held if inplace or not isinstance(held, dict) else dict(held)
    try:
        with backend.quiet():  # (the minimizer's own arithmetic; the closure: evaluate)
            x, tree, loss = resolved.minimize(xp, x0, work, evaluate)
    except BaseException:
        if inplace:
            with backend.outside_autograd(leaves):
                for p, v in zip(leaves, _split(xp, x0, leaves), strict=True):
                    backend.assign(p, v)
            if isinstance(held, dict):
                held.clear()
                held.update(before)
        raise
    tree = _kept_dtypes(tree, before)
    if not (inplace or backend.is_jax(leaves[0])):  # (as update: nothing given handed back)
        tree = _unshared(tree, (state.tree_states, leaves))
    new = dataclasses.replace(state, step=_next_step(state.step), tree_states={key: tree})
    with backend.outside_autograd(leaves):
        out = _split(xp, x, leaves)
        if inplace:
            for p, v in zip(leaves, out, strict=True):
                backend.assign(p, v)
            return new, None, loss
    return new, unflatten(treedef, [backend.like_leaf(v, p) for v, p in
                                    zip(out, leaves, strict=True)]), loss


def _evaluation(out: Any) -> tuple[Any, Any]:
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"minimize_step: closure must return (loss, grads), got {out!r}")
    loss = out[0]
    shape = getattr(loss, "shape", None)
    if shape is not None and math.prod(shape) != 1:  # (one element: torch's float(closure()))
        raise ValueError(f"minimize_step: the closure's loss must be one number; got an array "
                         f"of shape {tuple(shape)} (its mean or sum, for a loss per example)")
    if loss is not None and shape is None and (  # (None: a rule that reads no loss)
            isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise TypeError(f"minimize_step: the closure's loss must be one number; got {loss!r}")
    if shape is not None and len(shape):  # (one element: read as one number, as 0-d)
        return loss.reshape(()), out[1]
    return out


def _flat(xp: Any, leaves: list[Any]) -> Any:
    """Every leaf raveled into one vector (a copy: the caller's arrays are never aliased); a
    complex leaf as the real pairs of its parts, as :func:`update` takes it (a minimizer's
    norms and dot products are then those of the pairs)."""
    return xp.concat([xp.reshape(backend.as_real(v) if backend.is_complex(v) else v, (-1,))
                      for v in leaves])


def _split(xp: Any, x: Any, like: list[Any]) -> list[Any]:
    """Flat vector ``x`` cut into arrays shaped (and typed) as ``like``."""
    out, at = [], 0
    for p in like:
        pairs = backend.is_complex(p)
        n = math.prod(p.shape) * (2 if pairs else 1)
        v = xp.reshape(x[at:at + n], (*p.shape, 2) if pairs else tuple(p.shape))
        if pairs:
            out.append(backend.as_complex(v, p))
        else:
            out.append(v if v.dtype == p.dtype else xp.astype(v, p.dtype))
        at += n
    return out


def optax_update(rule: Transform, grads: Any, state: Any, params: Any,
                 **extra_args: Any) -> tuple[Any, State]:
    """The optax protocol for any uniopt transform. A transform that applies a learning rate
    (a rule, ``scale_by_lr``...) hands back its step negated, to be *added* to params; any
    other hands back its direction as it is, as optax's gradient transformations do, so
    ``optax.chain(uo.clip_by_global_norm(1.0), uo.adamw(...))`` means what it says. Extra
    arguments (``value=loss``) go to the parts that read them."""
    if not isinstance(state, State):
        raise TypeError(f"{rule.name}.update(grads, state, params): the state is "
                        f"{_qualified(state)}, not the uniopt State rule.init(params) made"
                        + (f" ({ORDER})" if any(isinstance(x, State) for x in (grads, params))
                           else ""))
    if state.rule is not rule and type(state.rule) is type(rule):
        rule = _fixed_at_setup(rule, state.rule)
    if (
        type(state.rule) is not type(rule)
        or state.rule.layout != rule.layout
    ):
        raise ValueError(
            f"this state was not set up for {rule!r}: its rule is {state.rule!r}"
        )
    rule, kept = _adjusted_values(rule, state.rule)
    if params is None and any(p.uses_params for p in rule.flat_parts):
        reads = next(p.name for p in rule.flat_parts if p.uses_params)
        raise ValueError(f"{rule.name}: its update needs params ({reads} reads them)")
    oriented = [p.name for p in rule.flat_parts if getattr(p, "reads_step", False)]
    if oriented and not makes_step(rule):
        raise ValueError(
            f"{rule.name}: {oriented[0]} reads its input as the step uniopt subtracts (p - u), "
            "and through optax's protocol a rule that makes no step of its own hands it "
            "optax's update, which optax adds: put it after a rule in a uo.chain "
            f"(uo.chain(rule, uo.{oriented[0]}())), or use optax's own in an optax.chain")
    try:
        step = _prologue(state, params, grads)
    except (TypeError, ValueError):
        # (looked at only here: a step of one library pays nothing for it)
        converted = None if params is None else (_numpy_as_jax(params, grads, state)
                                                 or _applied_as_jax(params, grads, state))
        if converted is None:
            raise
        params, state = converted
        grads = _as_jax_where_numpy(grads)
        step = _prologue(state, params, grads)
    if any(g is None for g in step.grads):
        # optax's transforms refuse these too (uo.update leaves such a leaf as it is)
        names = _leaves(params)[2]
        missing = [n for n, g in zip(names, step.grads, strict=True) if g is None]
        raise ValueError(
            f"{rule.name}: the gradient of {', '.join(missing)} is None; the optax protocol "
            "updates every leaf (pass zeros), uniopt.update leaves such a leaf as it is")
    state = _with_structure(state, step.treedef)
    if any(map(backend.is_complex, step.params)) and _as_pairs_or_whole(rule):
        return _protocol_pairs(rule, state, step, extra_args)
    negate = makes_step(rule)
    # a step computed wider than its params (a state_dtype's) goes back as the difference of
    # the new params, rounded as uo.update stores them, and the old: in the wider dtype, which
    # optax.apply_updates adds in and then rounds to the params' (the step's own dtype would
    # round the params twice: the update, then the sum). Not without params (the gradients
    # stand in for them), nor without a state_dtype: there the updates are the steps, which
    # a later member of an optax chain may read (optax.apply_every sums them)
    wide = negate and params is not None and _widened(state, step.params)
    with backend.outside_autograd(step.params), backend.quiet():
        deltas, slots, trees = _deltas(dataclasses.replace(state, rule=rule), step.params,
                                       step.grads, extra_args, finish=wide)
    if wide:
        updates = [_to_add(new, p) for new, p in zip(deltas, step.params, strict=True)]
    else:
        updates = [_as_new_array(-u if negate else u, g, (g,))
                   for u, g in zip(deltas, step.grads, strict=True)]
    new = State(kept, _next_step(state.step), _new_slots(state, slots, step), state.treedef,
                state.state_dtype, trees)
    out = unflatten(step.treedef, updates)
    return _held_as(grads, out), new  # (optax's updates of NNX's Params are Params)


def _widened(state: State, params: list[Any]) -> bool:
    """Whether ``state`` (set up with a ``state_dtype``) computes a step of some leaf of
    ``params`` in a dtype wider than the leaf's own."""
    if state.state_dtype is None:
        return False
    for p in params:
        dt = _compute_dtype(p, backend.namespace(p), state.state_dtype)
        if dt is not None and backend.float_bits(dt) > backend.float_bits(p.dtype):
            return True
    return False


def _to_add(new: Any, p: Any) -> Any:
    """The update that ``optax.apply_updates`` (``(p + u).astype(p.dtype)``) turns into the
    parameter :func:`update` stores, ``a`` (``new`` rounded once to ``p``'s dtype): ``u = a - p``
    in ``new``'s dtype, so that the sum is ``a`` and its rounding changes nothing. The
    subtraction is exact for a step of the form ``p - d`` (its result a multiple of the spacing
    of ``p`` in the wide dtype, or finer only where exact), and wherever ``a`` and ``p`` are within
    2^16 of each other in magnitude (bfloat16's 8 digits in float32's 24). A parameter that
    shrinks more than that in one step, by a product, lands within the wide dtype's rounding of
    the old value, which no update in that dtype can do better. Where ``a``
    equals ``p``, a zero of ``a``'s sign: ``p + u`` keeps an infinite ``p`` and the sign of a
    zero (``a - p`` would give NaN, or +0 to a -0)."""
    xp = backend.namespace(p)
    if backend.float_bits(new.dtype) > backend.float_bits(p.dtype):
        a, old = xp.astype(backend.narrowed(new, p.dtype), new.dtype), xp.astype(p, new.dtype)
    else:  # (a leaf computed in its own dtype, beside wider ones)
        a, old = _as_new_array(new, p, (p,)), p
    return xp.where(a == old, xp.copysign(xp.zeros_like(a), a), a - old)


def _held_as(like: Any, tree: Any) -> Any:
    """``tree`` (new arrays at the leaves of ``like``) with each array that ``like`` holds in
    a flax NNX Variable held in one as ``like``'s (NNX's functional style, ``nnx.split``: a
    State of Params in, a State of Params out, as optax's updates are; bare arrays changed a
    ``lax.scan`` carry's structure and gave a jitted step a second cache entry); ``tree``
    itself where ``like`` is no NNX State."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(like, nnx.State):
        return tree
    import jax

    def held(x: Any) -> bool:
        return is_variable(type(x))

    # (x may be held already: a combinator's member, handed the Params, hands them back so)
    return jax.tree.map(lambda v, x: v.replace(value=backend.held_array(x)) if held(v) else x,
                        like, tree, is_leaf=held)


def _numpy_as_jax(params: Any, grads: Any, state: State) -> tuple[Any, State] | None:
    """NumPy params and state beside JAX gradients as JAX arrays, as optax's arithmetic takes
    them: ``flax.serialization.from_bytes`` restores a ``TrainState``'s params and optimizer
    state as NumPy arrays (or the state alone, beside the JAX params it was saved with), and
    ``jax.grad`` then hands JAX ones. None for any other mix (which the engine refuses, naming
    the leaf)."""
    p_leaves, g_leaves = flatten_leaves(params)[0], flatten_leaves(grads)[0]
    if not (p_leaves and g_leaves and backend.is_jax(g_leaves[0]) and (
            isinstance(p_leaves[0], np.ndarray) or _restored(state))):
        return None
    import jax

    as_jax = functools.partial(jax.tree.map, jax.numpy.asarray)
    return as_jax(params), as_jax(state)


def _applied_as_jax(params: Any, grads: Any, state: State) -> tuple[Any, State] | None:
    """A state set up for NumPy params beside the JAX ones ``optax.apply_updates`` made of
    them (it computes with jax.numpy), as JAX arrays, as optax's own state is from its first
    step; NumPy gradients beside JAX params go as JAX arrays too (:func:`_as_jax_where_numpy`),
    as optax's arithmetic takes them. None where neither is so."""
    p_leaves = flatten_leaves(params)[0]
    if not (p_leaves and backend.is_jax(p_leaves[0])):
        return None
    slots = [x for xs in state.slots.values() for x in xs if x is not None]
    if slots and not (isinstance(slots[0], np.ndarray) or backend.is_jax(slots[0])):
        return None  # (8-bit slots: the engine names the mix)
    numpy_state = bool(slots) and isinstance(slots[0], np.ndarray)
    if not numpy_state and not any(isinstance(x, np.ndarray) for x in flatten_leaves(grads)[0]):
        return None
    import jax

    return params, jax.tree.map(jax.numpy.asarray, state) if numpy_state else state


def _as_jax_where_numpy(tree: Any) -> Any:
    leaves = flatten_leaves(tree)[0]
    if not any(isinstance(x, np.ndarray) for x in leaves):
        return tree
    import jax

    return jax.tree.map(lambda x: jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x,
                        tree)


def _restored(state: State) -> bool:
    """Whether ``state`` counts in a NumPy array: flax restored it (a state set up for NumPy
    params counts in an int, one for JAX params in a JAX array)."""
    return isinstance(state.step, _NUMPY_COUNTER)


_NUMPY_COUNTER = (np.ndarray, np.generic)


def _adjusted_values(rule: Transform, own: Transform) -> tuple[Transform, Transform]:
    """The rule the optax protocol steps with, and the one the state it hands back keeps: the
    transformation it was handed, ``rule``, or where :func:`adjust` set the state's numbers,
    the state's rule ``own`` (which stays the state's, so later steps keep its numbers). Under
    ``jax.jit`` whether the state was adjusted is a traced number: each of the rule's numbers
    is chosen by it, where the two rules have one skeleton (an adjust that gave a schedule for
    a number is not seen there)."""
    flag = adjusted(own)
    if flag is False or rule is own:
        return rule, rule
    if not _traced(flag):
        # (a number a jitted step handed back, read inside another trace: lax.cond's, as
        # optax.apply_if_finite steps, makes even that read a traced value)
        flag = on_host(flag)
        if not _traced(flag):
            return (own, own) if flag else (rule, rule)
    values, skeleton = flatten_rule(rule)
    theirs, own_skeleton = flatten_rule(own)
    # (an optimizer made again for each step, a train step's or optax.inject_hyperparams'
    # factory's, holds new objects of one form: an optax member, an optax schedule)
    if own_skeleton != skeleton and not _same_form(own_skeleton, skeleton):
        # which one steps is a traced number, and the two are programs of other forms (or
        # hold callables that are not one object: an optax schedule made again): said where
        # the step is traced (once per compile), not left silent. The state goes back with its
        # own rule, its leaves as they came: given back in the transformation's form, flax
        # NNX wrote them into the adjusted state's leaves by position (every number a slot
        # off, and uo.save kept that)
        warnings.warn(
            f"uniopt: under jax.jit the optax protocol steps with the numbers of the "
            f"transformation it is called on ({rule.name}), not the state's, whose rule is of "
            "another form: a uo.adjust that changed a hyperparameter's form (a schedule for a "
            "number, a number for a schedule, another schedule) is seen by uo.update only; "
            "an optimizer made again with another optax schedule or member (other code or "
            "numbers) steps as it did, with its own numbers (docs/optax.md)",
            stacklevel=3)
        return rule, own
    xp = backend.namespace(flag)
    mixed = unflatten_rule(skeleton, [xp.where(flag != 0, on_host(b), on_host(a))
                                      for a, b in zip(values, theirs, strict=True)])
    mixed.memo["adjusted"] = flag
    return mixed, mixed


def _same_form(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether ``a`` and ``b`` (rules' skeletons, or what they hold) are one, where functions
    count as one when made by the same code from equal values: an optax transformation or
    schedule made again (``optax.clip_by_global_norm(1.0)`` twice) is another object of the
    same form, which only object identity told apart."""
    if a is b:
        return True
    if type(a) is not type(b) or depth > 32:  # (deeper: a function that holds itself)
        return False
    deeper = functools.partial(_same_form, depth=depth + 1)
    if isinstance(a, (tuple, list)):  # (skeletons; optax's GradientTransformation, a tuple)
        return len(a) == len(b) and all(map(deeper, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(deeper(a[k], b[k]) for k in a)
    if isinstance(a, functools.partial):
        return deeper((a.func, a.args, a.keywords), (b.func, b.args, b.keywords))
    if inspect.isfunction(a):
        try:
            cells = [tuple(c.cell_contents for c in f.__closure__ or ()) for f in (a, b)]
        except ValueError:  # (a cell not yet filled)
            return False
        return a.__code__ is b.__code__ and deeper(
            (a.__defaults__, a.__kwdefaults__, cells[0]),
            (b.__defaults__, b.__kwdefaults__, cells[1]))
    if callable(a):
        return False  # (another callable object: told apart as before)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 (an array: compared as an object, not the same)
        return False


def _protocol_pairs(rule: Transform, state: State, step: _Step,
                    extra: dict[str, Any]) -> tuple[Any, State]:
    """:func:`optax_update` of complex params as :func:`update` steps them (:func:`_as_pairs`):
    each complex array as the real pairs of its parts, the updates and slots back as complex
    arrays."""
    flat = flat_list_def(len(step.params))
    real = State(state.rule, state.step, {k: _pairs(v, False) for k, v in state.slots.items()},
                 flat, state.state_dtype, state.tree_states, state.counts)
    grads, params = _pairs(step.grads, False), _pairs(step.params, False)
    with backend.stepping_pairs([params, grads], [step.params, step.grads]):
        updates, new = optax_update(rule, grads, real, params, **extra)
    slots = {k: _back(v, state.slots[k]) for k, v in new.slots.items()}
    return (unflatten(step.treedef, _back(updates, step.grads)),
            dataclasses.replace(new, slots=slots, treedef=state.treedef))


def _fixed_at_setup(rule: Transform, like: Transform) -> Transform:
    """``rule`` with each traced number of a field fixed at set-up (an initial value) taken from
    ``like``, the record of the same type its state was set up with: optax.inject_hyperparams
    hands every number back traced under ``jax.jit``, and a fixed one belongs to the skeleton
    that jit keeps static."""
    if isinstance(rule, chain):
        assert isinstance(like, chain)
        if len(rule.transforms) != len(like.transforms):
            return rule  # not the state's rule: said by the caller
        new = [_fixed_at_setup(m, o) if type(m) is type(o) else m
               for m, o in zip(rule.transforms, like.transforms, strict=True)]
        changed = any(a is not b for a, b in zip(new, rule.transforms, strict=True))
        return chain(*new) if changed else rule
    # (every field but a hyperparameter: a static one, and the plain ints of counts and seeds)
    traced = {name: getattr(like, name) for name in _traced_settings(rule)}
    return assemble(type(rule), {**rule.fields(), **traced}, rule.host) if traced else rule


def _set(t: Transform, path: list[str], value: Any, where: str,
         searching: bool = False) -> tuple[Transform, list[str]]:
    """``t`` with hyperparameter ``path[-1]`` set in the member ``path[:-1]`` names, and where
    it was found. ``searching``: ``t`` is one of a combinator's members looked through for a
    label, where a chain that the path cannot name is no error (masked's pass-through)."""
    if isinstance(t, chain):
        # a label names a member of a combinator in the chain: searched for as a name is
        labelled = not path[0].isdigit() and any(isinstance(p, Combinator) for p in t.flat_parts)
        if len(path) > 1 and not labelled:
            if searching and not path[0].isdigit():
                return t, []
            if not path[0].isdigit():
                raise ValueError(
                    f"adjust: {'.'.join(path)!r}: a member of a chain is named by its position "
                    f"(an integer), got {path[0]!r}"
                )
            i = int(path[0])
            if not 0 <= i < len(t.transforms):
                raise ValueError(f"adjust: chain has no member {i}")
            new, found = _set(t.transforms[i], path[1:], value, f"{where}{i}.")
            members = list(t.transforms)
            members[i] = new
            return chain(*members), found
        members, found = [], []
        for i, m in enumerate(t.transforms):
            new, f = _set(m, path, value, f"{where}{i}.")
            members.append(new)
            found += f
        return chain(*members), found
    if isinstance(t, Combinator):
        inner = t.inner
        # the longest label the path begins with: a label may hold dots ("no.decay")
        for k in range(len(path) - 1, 0, -1):
            label = ".".join(path[:k])
            if label in inner:
                new, found = _set(inner[label], path[k:], value, f"{where}{label}.")
                return (t.with_inner(label, new) if found else t), found
        found = []
        for name, m in inner.items():
            new, f = _set(m, path, value, f"{where}{name}.", searching=True)
            if f:
                t = t.with_inner(name, new)
            found += f
        return t, found
    if len(path) == 1 and path[0] in t.hyperparameters():
        return t.replace(**{path[0]: value}), [f"{where}{path[0]} ({t.name})"]
    return t, []


def _combinators(t: Transform) -> Iterator[Combinator]:
    """The combinators of ``t``, outermost first."""
    if isinstance(t, chain):
        for m in t.transforms:
            yield from _combinators(m)
    elif isinstance(t, Combinator):
        yield t
        for m in t.inner.values():
            yield from _combinators(m)


def _own_fields(t: Combinator) -> set[str]:
    """A combinator's own settings (mechanize's weight_decay, accumulate's every), beside the
    members it holds."""
    return {f.name for f in dataclasses.fields(t)} - {"host", "rule", "rules", "names",
                                                      "labels"}


def adjust(state: State, **hyperparameters: Any) -> State:
    """The state with hyperparameters changed (numbers or schedules); slots untouched.

    ``adjust(state, lr=1e-4)`` sets ``lr`` wherever it is defined; if more than one member of a
    chain defines it, name the member by its position: ``adjust(state, **{"1.lr": 1e-4})``.
    Flags that decide the state's layout (``amsgrad``, ``centered``...) cannot be adjusted, nor
    a number moved to or from a 0 that adds or drops a slot (``momentum``'s buffer), a
    combinator's member's as well: :class:`SlotsChanged`.

    >>> import numpy as np, uniopt as uo
    >>> state = uo.adjust(uo.setup(uo.adam(lr=1e-3), [np.zeros(2)]), lr=1e-4)
    >>> state.rule.lr
    0.0001
    """
    return adjusted_by_names(state, hyperparameters, named=True)


class SlotsChanged(ValueError):
    """:func:`adjust`'s refusal of values that add or drop a slot: ``before`` and ``after`` are
    the rule's layouts, each part's slots (a combinator member's part named ``"x.trace"``),
    for a caller that words it its own way (uniopt.torch's param groups)."""

    def __init__(self, before: Any, after: Any, message: str) -> None:
        super().__init__(message)
        self.before, self.after = before, after


def adjusted_by_names(state: State, hyperparameters: dict[str, Any], named: bool) -> State:
    """:func:`adjust`; ``named`` False: a key that is also a member's name is not refused
    (:class:`uniopt.torch.Optimizer`'s groups, whose keys are its hyperparameters' names)."""
    if not isinstance(state, State):
        return _adjust_within(state, hyperparameters)
    shape = batched(state)
    if shape is not None:
        # (its rule would be built of rows of numbers, and the next vmapped step could not
        # stack them with the new ones)
        raise ValueError(
            f"adjust: this state's numbers are a batch, shape {shape} (a state made under "
            "jax.vmap: one rule per model); adjust each model's inside vmap, e.g. "
            f"jax.vmap(lambda s: uo.adjust(s, {', '.join(f'{k}=...' for k in hyperparameters)}"
            "))(state)")
    rule = state.rule
    for key, value in hyperparameters.items():
        rule, found = _set(rule, key.split("."), value, "")
        if not found:
            own = key.rsplit(".", 1)[-1]  # ("0.every": a chain's member named by position)
            owner = next((c for c in _combinators(rule) if own in _own_fields(c)), None)
            if owner is not None:  # (accumulate's every: "not a hyperparameter" said too little)
                raise ValueError(
                    f"adjust: {own!r} of {owner.name} is its own, set when it is built; adjust "
                    "reaches the hyperparameters of the rules it holds")
            if named:
                _named_like(state.rule, key, found)
            names = sorted({n for _, m in members(rule) for n in m.hyperparameters()})
            raise ValueError(
                f"adjust: {key!r} is not a hyperparameter of {state.rule.name} (its "
                f"hyperparameters are {names}){did_you_mean(own, names)}")
        if len(found) > 1:
            raise ValueError(
                f"adjust: {key!r} is a hyperparameter of {len(found)} members of this chain "
                f"({', '.join(found)}); name one by its position or label, e.g. "
                f"adjust(state, **{{{found[0].split(' ')[0]!r}: ...}})"
            )
        if named:
            _named_like(state.rule, key, found)
    before, after = _slot_layouts(state.rule), _slot_layouts(rule)
    if after != before:
        # the keys that change them, each alone (lr=0.0 beside momentum=0 needs no schedule)
        moving = {k: v for k, v in hyperparameters.items()
                  if _slot_layouts(_set(state.rule, k.split("."), v, "")[0]) != before}
        moving = moving or hyperparameters
        if set(after) < set(before):  # a 0 drops a block: a schedule keeps it
            kept = {k: f"uniopt.schedules.constant({v!r})" for k, v in moving.items()}
            call = (", ".join(f"{k}={v}" for k, v in kept.items())
                    if all(k.isidentifier() for k in kept) else
                    "**{" + ", ".join(f"{k!r}: {v}" for k, v in kept.items()) + "}")
            how = (f"adjust(state, {call}) keeps them, a schedule's block kept at any value "
                   "(under jax.jit, traced anew once)")
        else:
            how = ("that needs a new uniopt.setup (set the hyperparameter to a non-zero value "
                   "or a schedule at set-up to keep its slot)")
        raise SlotsChanged(
            before, after,
            f"adjust: {moving} would change the optimizer's slots from {before} to {after}; "
            f"{how}"
        )
    if rule is not state.rule:
        # the state's numbers now win over the transformation's under the optax protocol
        rule.memo["adjusted"] = True
    return rewrapped(state, dataclasses.replace(
        state, rule=rule, tree_states=_members_renewed(rule, state.tree_states)))


def _slot_layouts(t: Transform, where: str = "") -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The slots of ``t``'s parts (:attr:`~uniopt.base.Transform.layout`) and of the parts of
    every rule its combinators run, which keep theirs in their own states, each part named as
    :func:`adjust` names its member (``"x.trace"``: member ``x``'s ``trace``)."""
    out = tuple((f"{where}{name}", slots) for name, slots in t.layout)
    for part in t.flat_parts:
        if isinstance(part, Combinator):
            for name, m in part.inner.items():
                out += _slot_layouts(m, f"{where}{name}.")
    return out


def _member_named(rule: Transform, key: str) -> tuple[tuple[Any, ...], Transform] | None:
    """The first member of ``rule`` (its position, and it) named ``key`` and without a
    hyperparameter of that name, where ``key`` is unqualified (no member named by position)."""
    if "." in key:
        return None
    return next(((path, m) for path, m in members(rule)
                 if m.name == key and key not in m.hyperparameters()), None)


def _named_like(rule: Transform, key: str, found: list[str]) -> None:
    """Refuse an unqualified ``key`` that is also the name of a member without such a
    hyperparameter: in ``chain(weight_decay(5e-4), adam())``, ``weight_decay=`` would set Adam's
    own L2 term, not the member named so (whose rate is ``wd``), or, without Adam, say only that
    there is no such hyperparameter."""
    named = _member_named(rule, key)
    if named is None:
        return
    path, m = named
    own = ".".join(map(str, path))
    theirs = [f"{own + '.' if own else ''}{n}" for n in m.hyperparameters()]
    who = f"member {own} of this chain" if own else "the rule"
    said = (f"is ambiguous here: it is the hyperparameter {found[0]}, and {who} is {m.name}"
            if found else f"names {who}, not a hyperparameter")
    raise ValueError(
        f"adjust: {key!r} {said}; {m.name}'s hyperparameters are {sorted(m.hyperparameters())}: "
        "name the one you mean, e.g. " + " or ".join(
            f"adjust(state, **{{{k!r}: ...}})"
            for k in [*theirs[:1], *[f.split(" ")[0] for f in found[:1]]]))


def _adjust_within(tree: Any, hyperparameters: dict[str, Any]) -> Any:
    """:func:`adjust` of the uniopt states inside ``tree``, an optax combinator's state (a
    chain's tuple, ``MultiStepsState``, ``MaskedState``...): each hyperparameter set in the one
    state whose rule has it."""
    jax = sys.modules.get("jax")
    if jax is not None:
        nodes = jax.tree_util.tree_leaves(tree, is_leaf=_is_state_node)
    else:
        nodes = optree.tree_leaves(tree, is_leaf=_is_state_node, none_is_leaf=True,
                                   namespace=NAMESPACE)
    states = [x for x in nodes if isinstance(x, State)]
    if not states:
        # (flax's nnx.State, of an nnx.Optimizer, holds the uniopt State as opt.opt_state)
        nnx = (" (an nnx.Optimizer's uniopt state is its opt_state: opt.opt_state = "
               "uo.adjust(opt.opt_state, lr=...))"
               if _qualified(tree).startswith("flax.") else "")
        raise TypeError(f"adjust: expected a uniopt State, or a tree holding one (an optax "
                        f"combinator's state), got {_qualified(tree)}{nnx}")
    changes: dict[int, dict[str, Any]] = {}
    for key, value in hyperparameters.items():
        holders = [s for s in states if _set(s.rule, key.split("."), value, "")[1]]
        named = next((n for s in states if (n := _member_named(s.rule, key))), None)
        if named is not None:  # (as adjust's _named_like, across the states)
            m = named[1]
            held = f"a hyperparameter of {holders[0].rule.name}, and " if holders else ""
            raise ValueError(
                f"adjust: {key!r} is {held}the name of a rule in this {type(tree).__name__} "
                f"({m.name}, whose hyperparameters are {sorted(m.hyperparameters())}), not a "
                "hyperparameter of it: adjust that rule's own by their names, or adjust the "
                "state you mean where it is")
        if len(holders) != 1:
            names = sorted({n for s in states for _, m in members(s.rule)
                            for n in m.hyperparameters()})
            raise ValueError(
                f"adjust: {key!r} is a hyperparameter of "
                + ("none" if not holders else f"{len(holders)}")
                + f" of the {len(states)} uniopt states in this {type(tree).__name__}"
                + ("; adjust each where it is" if holders else
                   f" (theirs are {names}){did_you_mean(key.rsplit('.', 1)[-1], names)}"))
        changes.setdefault(id(holders[0]), {})[key] = value
    new = {id(s): adjust(s, **changes[id(s)]) for s in states if id(s) in changes}

    def swap(x: Any) -> Any:
        return new.get(id(x), x) if isinstance(x, State) else x

    if jax is not None:
        return jax.tree_util.tree_map(swap, tree, is_leaf=_is_state_node)
    return optree.tree_map(swap, tree, is_leaf=_is_state_node, none_is_leaf=True,
                           namespace=NAMESPACE)


def _is_state_node(x: Any) -> bool:
    return isinstance(x, State)


def _members_renewed(rule: Transform, trees: dict[str, Any]) -> dict[str, Any]:
    """``trees`` with each combinator member's state holding the member as ``rule`` has it: a
    step hands the members' states back so, and under ``jax.jit`` a member's state still
    holding the old form (a schedule, where the adjust gave a number) made the step after the
    adjust's compile a second time."""
    out = None
    for part, keys in rule.keyed_parts:
        tree = trees.get(keys[0]) if isinstance(part, Combinator) and keys else None
        if not isinstance(tree, dict) or not isinstance(part, Combinator):
            continue
        new = None
        for name, member in part.inner.items():
            st = tree.get(name)
            if isinstance(st, State):
                new = dict(tree) if new is None else new
                # (rewrapped: the numbers back in NNX's OptArray where NNX holds the state)
                new[name] = rewrapped(st, dataclasses.replace(
                    st, rule=member, tree_states=_members_renewed(member, st.tree_states)))
        if new is not None:
            out = dict(trees) if out is None else out
            out[keys[0]] = new
    return trees if out is None else out

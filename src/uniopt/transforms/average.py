"""Averaged weights: an exponential moving average (:class:`ema`), the equal-weight running mean
of Polyak and SWA (:class:`polyak`), and Lookahead's slow weights (:func:`lookahead`).

Each is an elementwise part that goes at the end of a chain, where it sees the parameter ``p``
and the chain's final update ``u``: the step writes ``p - u``, and that is what it averages,
into a slot of its own. An average hands ``u`` on unchanged; Lookahead's sync changes it (every
``k`` steps the params jump to the slow weights). :func:`averaged` reads an average back as a
tree shaped like the params.

An average starts as a copy of the params it was set up with, as torch's ``AveragedModel``
starts as a copy of the model, and its first member replaces that copy; only an EMA from zero
(optax's) starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import quant
from ..backend import detached_copy, namespace
from ..base import Combinator, Elementwise, Transform, adopted, chain
from ..hyper import UNIT, _traced, check_integer, hyper
from ..moments import bias_correction, lerp, select
from ..state import State
from ..tree import flatten_leaves, unflatten


class Averaging(Elementwise):
    """An elementwise part whose one slot holds averaged weights (read by :func:`averaged`)."""

    uses_params: ClassVar[bool] = True  # it averages p - u
    averages: ClassVar[bool] = True
    after_average: ClassVar[bool] = True
    # an average moves by a small fraction of its distance to the params at each step, which
    # rounding to the nearest 8-bit code undoes: below the block's largest element it stopped
    no_q8: ClassVar[str | None] = (
        "its slot holds weights that move by a small step at each update, which 8-bit codes "
        "round away (the average stops moving)")

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return (detached_copy(p),)

    def read(self, xp: Any, average: Any, p: Any, step: Any) -> Any:
        """The averaged weights of one leaf, from its slot after ``step`` updates (``p``: the
        leaf)."""
        return average


class EmaCoeffs(NamedTuple):
    first: Any  # the first update copies the parameter (torch's AveragedModel)
    weight: Any  # 1 - decay: the average's step towards the parameter


def ema_kernel(xp, c, p, u, ema):
    new = p - u  # the parameter this step writes: the engine's own p - u, to the bit
    return u, select(xp, c.first, new, lerp(ema, new, c.weight))


@dataclass(frozen=True)
class ema(Averaging):
    """An exponential moving average of the parameters, for evaluation: the slot ``ema`` takes
    ``ema <- decay*ema + (1 - decay)*p`` after every update (in torch's ``lerp`` order), for the
    parameter ``p`` the update writes. Place it last in a chain; read it with
    :func:`averaged`.

    Where it starts, and what is read back:

    * ``ema(decay)`` (``initial="params"``): torch's ``AveragedModel(model,
      multi_avg_fn=get_ema_multi_avg_fn(decay))`` updated after every step: the average starts
      as the params, and the first update copies the new ones.
    * ``ema(decay, debias=True)``: ``optax.ema(decay)`` fed the params: the average starts at
      zero and is read divided by ``1 - decay**t`` after ``t`` updates (before the first, the
      params are read). ``decay`` must then be a number below 1 (the correction assumes one
      decay throughout; :func:`uniopt.adjust` changes it for the past too, as in optax).
    * ``ema(decay, initial="zero")``: ``optax.ema(decay, debias=False)``: from zero, read as
      it is.

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([1.0])]
    >>> state = uo.setup(uo.chain(uo.sgd(lr=1.0), uo.ema(0.5)), p)
    >>> for _ in range(3):
    ...     state = uo.update_(state, p, [np.array([1.0])])
    >>> p[0], uo.averaged(state, p)[0]
    (array([-2.]), array([-1.25]))
    """

    decay: Any = hyper(0.999, UNIT)
    debias: bool = False
    initial: str | None = None  # "params" or "zero"; None: "zero" where debias, else "params"
    slots: ClassVar[tuple[str, ...]] = ("ema",)

    def check(self) -> None:
        if self.initial not in (None, "params", "zero"):
            raise ValueError(
                f"{self.name}: initial must be 'params' or 'zero', got {self.initial!r}")
        if not self.debias:
            return
        if self.initial == "params":
            raise ValueError(
                f"{self.name}: debias=True corrects an average that starts at zero; with "
                "initial='params' there is no bias to correct (use initial='zero' or leave it "
                "out)"
            )
        if callable(self.decay) or self.decay == 1:
            raise ValueError(
                f"{self.name}: debias=True divides by 1 - decay**t, which needs a fixed decay "
                f"below 1, got decay={self.decay!r}"
            )

    @property
    def from_zero(self) -> bool:
        return self.initial == "zero" or (self.initial is None and self.debias)

    def init_slots(self, p: Any, xp: Any) -> tuple[Any, ...]:
        return (xp.zeros_like(p),) if self.from_zero else super().init_slots(p, xp)

    def coeffs(self, step: Any) -> EmaCoeffs:
        return EmaCoeffs(first=False if self.from_zero else step == 0,
                         weight=self.one_minus("decay"))

    kernel = staticmethod(ema_kernel)

    def read(self, xp: Any, average: Any, p: Any, step: Any) -> Any:
        if not self.debias:
            return average
        if not _traced(step):
            step = int(step)
            if step == 0:
                return p
        corrected = average / bias_correction(self.decay, self.one_minus("decay"), step - 1)
        return corrected if isinstance(step, int) else xp.where(step == 0, p, corrected)


class PolyakCoeffs(NamedTuple):
    take: Any  # this step's parameter joins the average
    first: Any  # as its first member: a copy
    count: Any  # the members with it, n + 1


def polyak_kernel(xp, c, p, u, average):
    new = p - u
    mean = average + (new - average) / c.count  # torch's default avg_fn, in its order
    return u, select(xp, c.take, select(xp, c.first, new, mean), average)


@dataclass(frozen=True)
class polyak(Averaging):
    """The equal-weight running mean of the parameters (Polyak averaging; SWA): the slot
    ``average`` takes ``average <- average + (p - average)/(n + 1)`` for the parameter ``p``
    that the update at step ``s`` writes (``s`` counts updates from 0), for ``s = start,
    start + every, ...``; ``n`` is the number averaged before, and the first one is copied.
    Place it last in a chain; read it with :func:`averaged` (before its first member it holds
    the params it was set up with).

    This is torch's ``AveragedModel(model)`` (its default ``avg_fn``) with
    ``update_parameters(model)`` called after optimizer step ``i`` (from 0) for ``i >= start``
    and ``(i - start) % every == 0``. (On CUDA torch averages with ``lerp`` instead, which
    rounds differently.)

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([0.0])]
    >>> state = uo.setup(uo.chain(uo.sgd(lr=1.0), uo.polyak(start=1)), p)
    >>> for _ in range(4):
    ...     state = uo.update_(state, p, [np.array([-1.0])])
    >>> p[0], uo.averaged(state, p)[0]
    (array([4.]), array([3.]))
    """

    start: int = 0
    every: int = 1
    slots: ClassVar[tuple[str, ...]] = ("average",)

    def check(self) -> None:
        for name, least in (("start", 0), ("every", 1)):
            object.__setattr__(self, name, check_integer(self.name, name, getattr(self, name),
                                                         least))

    def coeffs(self, step: Any) -> PolyakCoeffs:
        # arithmetic, not branches: a traced step (jax.jit) goes through as a host int does
        since = step - self.start
        take = (since >= 0) & (since % self.every == 0)
        n = since // self.every  # the members before this one, where it is one
        return PolyakCoeffs(take=take, first=take & (n == 0), count=n * take + 1)

    kernel = staticmethod(polyak_kernel)


class SyncCoeffs(NamedTuple):
    sync: Any  # the k-th update since the last sync
    alpha: Any
    one_minus_alpha: Any


def sync_kernel(xp, c, p, u, slow):
    diff = p - u - slow  # where this step takes the fast weights, from the slow ones
    # the params go to p - u - (1 - alpha)*diff, the new slow weights up to rounding, as optax
    # writes them (to the bit); between syncs the slow weights are untouched
    return (select(xp, c.sync, u + c.one_minus_alpha * diff, u),
            select(xp, c.sync, slow + c.alpha * diff, slow))


@dataclass(frozen=True)
class lookahead_sync(Averaging):
    """Lookahead's slow weights (Zhang et al., 2019): the slot ``slow`` starts as the params;
    every ``k``-th update (updates ``k, 2k, ...``) takes ``slow <- slow + alpha*(fast - slow)``,
    ``fast`` the parameter the chain before it writes, and the params are set to the new slow
    weights. Chain it after a rule, or use :func:`lookahead`."""

    k: int = 5
    alpha: Any = hyper(0.5, UNIT)
    slots: ClassVar[tuple[str, ...]] = ("slow",)
    exact_state: ClassVar[str | None] = (
        "it sets the parameters to its slow weights, so the params would keep only the state's "
        "precision")

    def check(self) -> None:
        object.__setattr__(self, "k", check_integer(self.name, "k", self.k, 1))

    def coeffs(self, step: Any) -> SyncCoeffs:
        return SyncCoeffs(sync=(step + 1) % self.k == 0, alpha=self.alpha,
                          one_minus_alpha=self.one_minus("alpha"))

    kernel = staticmethod(sync_kernel)


def lookahead(rule: Any, k: int = 5, alpha: Any = 0.5) -> chain:
    """Lookahead (Zhang et al., 2019) around ``rule``: ``k`` steps of ``rule`` (the fast
    weights are the params), then the slow weights move ``alpha`` of the way to them and the
    params are set to the slow ones: ``chain(rule, lookahead_sync(k=k, alpha=alpha))``, so
    :func:`uniopt.adjust` reaches the rule's hyperparameters as before.

    As ``optax.lookahead(rule, sync_period=k, slow_step_size=alpha)`` with the params as its
    fast params and the slow ones in the state: the params after a sync step are optax's fast
    params to the bit, ``p - u - (1 - alpha)*(p - u - slow)``, which equals the new slow
    weights up to rounding (the paper copies them exactly). optax's ``reset_state`` (the rule's
    state re-initialised at each sync) is not offered: a part keeps only its own slots.
    :func:`averaged` reads the slow weights, the ones to evaluate.

    >>> import numpy as np, uniopt as uo
    >>> p = [np.array([0.0])]
    >>> state = uo.setup(uo.lookahead(uo.sgd(lr=1.0), k=2, alpha=0.5), p)
    >>> for _ in range(2):
    ...     state = uo.update_(state, p, [np.array([-1.0])])
    >>> p[0], uo.averaged(state, p)[0]
    (array([1.]), array([1.]))
    """
    return chain(adopted("lookahead", "rule", rule), lookahead_sync(k=k, alpha=alpha))


def find_average(rule: Transform, name: str | None = None) -> tuple[Averaging, str]:
    """The averaging part of ``rule`` named ``name`` (None: its only one) and its slot key."""
    found = {key.split(".", 1)[0]: (part, key) for part, (key,) in
             ((p, k) for p, k in rule.keyed_parts if isinstance(p, Averaging))}
    if not found:
        raise ValueError(
            f"averaged: {rule.name} keeps no averaged weights; end its chain with uo.ema, "
            "uo.polyak or uo.lookahead_sync (as uo.lookahead does)"
        )
    if name is None and len(found) > 1:
        raise ValueError(
            f"averaged: {rule.name} keeps {len(found)} averages ({', '.join(found)}); name one, "
            f"e.g. averaged(state, params, name={next(iter(found))!r})"
        )
    if name is not None and name not in found:
        raise ValueError(
            f"averaged: {rule.name} has no average named {name!r}; its averages are "
            f"{list(found)}"
        )
    part, key = found[name] if name is not None else next(iter(found.values()))
    assert isinstance(part, Averaging)
    return part, key


def read_average(part: Averaging, average: Any, p: Any, step: Any) -> Any:
    """One leaf's averaged weights (``part`` resolved at ``step``), in the leaf's dtype and in
    memory of its own (a slot that the next update writes is never handed out)."""
    xp = namespace(p)
    if isinstance(average, quant.Q8):  # state_dtype="q8": its float32 values
        average = quant.dequantise(xp, average)
    out = part.read(xp, average, p, step)
    if out.dtype != p.dtype:  # kept in a wider (or 8-bit) state_dtype
        return xp.astype(out, p.dtype)
    return detached_copy(out) if out is average or out is p else out


def averaged(state: State, params: Any, name: str | None = None) -> Any:
    """The averaged weights that ``state`` keeps (:class:`ema`, :class:`polyak`,
    :func:`lookahead`'s slow weights), as a tree shaped like ``params`` of new arrays in the
    params' dtypes: debiased where the part says so. ``name`` picks one of several averaging
    parts by its state name (``"ema"``, ``"ema#1"``, ``"polyak"``...).

    >>> import numpy as np, uniopt as uo
    >>> p = {"w": np.array([2.0, 4.0])}
    >>> state = uo.setup(uo.chain(uo.sgd(lr=0.5), uo.ema(0.9, debias=True)), p)
    >>> state = uo.update_(state, p, {"w": np.array([2.0, 2.0])})
    >>> uo.averaged(state, p)["w"]
    array([1., 3.])
    """
    if not isinstance(state, State):
        raise TypeError(f"averaged: expected a uniopt State, got {type(state).__name__}")
    leaves, treedef = flatten_leaves(params)
    if treedef != state.treedef:
        raise ValueError(
            "averaged: params do not have the tree structure this state was set up for: "
            f"state has {state.treedef}, params are {treedef}"
        )
    out = _averages(state, treedef, leaves, name)
    if out is None:
        find_average(state.rule, name)  # raises, saying what is missing
    assert out is not None
    return unflatten(treedef, [detached_copy(p) if a is None else a
                              for a, p in zip(out, leaves, strict=True)])


def _averages(state: State, treedef: Any, leaves: list[Any], name: str | None) -> Any:
    """Each leaf's average (None where none is kept), from ``state`` or, where its rule runs
    other rules (accumulate, partition...), from their states; None if there is none."""
    if any(isinstance(p, Averaging) for p in state.rule.flat_parts):
        part, key = find_average(state.rule, name)
        # each leaf at its own count where a None gradient left some out (a debias's 1 - d^t)
        steps = [state.step] * len(leaves) if state.counts is None else \
            [state.counts[i] for i in range(len(leaves))]
        out_: list[Any] = []
        for a, p, k in zip(state.slots[key], leaves, steps, strict=True):
            resolved = part.at(k)
            assert isinstance(resolved, Averaging)
            out_.append(read_average(resolved, a, p, k))
        return out_
    out: list[Any] = [None] * len(leaves)
    found = False
    for runner, keys in state.rule.keyed_parts:
        if not isinstance(runner, Combinator):
            continue
        for member, idx in runner.leaves_of(treedef, leaves).items():
            sub = state.tree_states[keys[0]][member]
            got = _averages(sub, sub.treedef, [leaves[i] for i in idx], name)
            if got is not None:
                found = True
                for i, a in zip(idx, got, strict=True):
                    out[i] = a
    return out if found else None

"""Drop-in replacements for ``torch.optim``, run by uniopt's engine.

``uniopt.torch.SGD``, ``Adagrad``, ``RMSprop``, ``Adadelta``, ``Adam`` and ``AdamW`` take torch's
constructor arguments and defaults and subclass :class:`torch.optim.Optimizer`, so torch's
``lr_scheduler`` classes, ``clip_grad_norm_``, hooks and training frameworks accept them; their
``state_dict`` is torch's, slot names included, and loads into (and from) the torch class of the
same name. :class:`Optimizer` wraps any uniopt rule or chain the same way.

This module is a skin over the engine, not a second implementation: each param group becomes a
uniopt rule built from the group's values (numbers or uniopt schedules), and a step is one
:func:`uniopt.update_` per set of parameters that share a step count (usually one). CPU tensors
are handed to the engine as NumPy views of their memory, so the compiled one-pass loop updates
them in place; tensors on other devices (or of other dtypes) go to the engine as torch tensors,
through the reference path. Views of parameters and state, the grouping by step count and
the rule are cached between steps and re-checked by identity; the per-tensor work of a step is
reading ``p.grad``, ``Tensor.numpy()`` on it and those checks, each a C call mapped over the
list (no Python loop per tensor).

Differences from torch, each on purpose:

* ``state[p]["step"]`` is a 0-d float tensor as in torch, for every class (torch's SGD keeps
  none): uniopt schedules are evaluated at a parameter's step count, so SGD needs one too. The
  step tensors of a group are views into one buffer, so counting a step is one operation. A
  state from ``torch.optim.SGD`` (no ``step``) loads as step 1 where it has a momentum buffer.
* A momentum buffer that becomes non-zero mid-run (a momentum schedule leaving 0) starts from
  zeros where torch starts from the gradient; these agree except with ``dampening > 0``.
* ``differentiable=True`` is rejected (updates are written outside autograd); ``foreach``,
  ``fused`` and ``capturable`` are accepted and ignored (on CPU every step is already one fused
  pass), and kept in the param groups so that states load into torch.
* A parameter listed twice in one group is an error (torch only warns).
* Sparse gradients: SGD and Adagrad accept them as torch does (Adagrad updates only the rows
  present, SGD the dense equivalent; torch keeps SGD's momentum buffer sparse, this module keeps
  it dense); the other classes raise torch's errors.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, overload

import numpy as np
import torch
from torch.optim.optimizer import ParamsT

from ..base import Transform, chain
from ..engine import adjust, flat_list_def, setup, update_
from ..hyper import has_schedule
from ..rules.adadelta import adadelta
from ..rules.adagrad import adagrad
from ..rules.adam import adam, adamw
from ..rules.rmsprop import rmsprop
from ..rules.sgd import sgd
from ..state import State
from ..transforms.scale import scale

__all__ = ["SGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop"]

# torch's name for each slot of the rules the named classes run
TORCH_SLOTS = {
    "trace.momentum_buffer": "momentum_buffer",
    "scale_by_adagrad.sum": "sum",
    "scale_by_rms.square_avg": "square_avg",
    "scale_by_centered_rms.square_avg": "square_avg",
    "scale_by_centered_rms.grad_avg": "grad_avg",
    "scale_by_adadelta.square_avg": "square_avg",
    "scale_by_adadelta.acc_delta": "acc_delta",
    "scale_by_adam.exp_avg": "exp_avg",
    "scale_by_adam.exp_avg_sq": "exp_avg_sq",
    "scale_by_amsgrad.exp_avg": "exp_avg",
    "scale_by_amsgrad.exp_avg_sq": "exp_avg_sq",
    "scale_by_amsgrad.max_exp_avg_sq": "max_exp_avg_sq",
}

_GRAD = operator.attrgetter("grad")
_NUMPY = torch.Tensor.numpy
_DATA_PTR = torch.Tensor.data_ptr

Spec = tuple[str, tuple[int, ...] | None]
_PLAIN: Spec = ("np", None)


def _step_dtype() -> torch.dtype:
    """torch's dtype for ``state["step"]`` (``optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as torch's optimizers treat them: real and imaginary parts as pairs."""
    return torch.view_as_real(t) if t.is_complex() else t


def _spec(p: torch.Tensor) -> Spec:
    """How the engine sees parameter ``p``: a NumPy view (CPU float32/float64, dense), in
    memory order if its strides are permuted (channels_last), or else the tensor itself."""
    t = _real(p.detach())
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        if t.is_contiguous():
            return _PLAIN
        strides = t.stride()
        perm = tuple(sorted(range(t.dim()), key=lambda d: -strides[d]))
        if t.permute(perm).is_contiguous():
            return ("np", perm)
    return ("torch", None)


def _view(t: torch.Tensor, spec: Spec) -> Any:
    """What the engine gets for ``t`` (a parameter or a slot laid out as its parameter)."""
    t = _real(t.detach())
    kind, perm = spec
    if kind == "torch":
        return t
    if perm is not None:
        t = t.permute(perm).view(-1)
    return t.numpy()


def _grad_view(g: torch.Tensor, p: torch.Tensor, spec: Spec) -> Any:
    """The engine's view of gradient ``g`` of ``p``, laid out as ``p``'s view (copied when it is
    laid out otherwise)."""
    g = _real(g.detach().resolve_conj().resolve_neg())
    kind, perm = spec
    if kind == "torch":
        return g
    if perm is None:
        return (g if g.is_contiguous() else g.contiguous()).numpy()
    pr = _real(p.detach())
    if g.stride() != pr.stride():
        g = torch.empty_like(pr).copy_(g)
    return g.permute(perm).view(-1).numpy()


def _plain(v: Any) -> Any:
    """A group value as a rule field: one-element tensors as numbers, lists as tuples."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (tuple, list)):
        return tuple(_plain(x) for x in v)
    return v


def _has_schedule(rule: Transform) -> bool:
    return any(
        has_schedule(v) for part in rule.flat_parts for v in part.hyperparameters().values()
    )


def _state_step(st: dict[str, Any]) -> int:
    """Updates applied to a parameter, from its state (torch's SGD keeps no step: a momentum
    buffer means at least one)."""
    s = st.get("step")
    if s is None:
        return 1 if any(isinstance(v, torch.Tensor) for v in st.values()) else 0
    return int(s)


def _members(t: Transform, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(t, chain):
        for i, m in enumerate(t.transforms):
            yield from _members(m, (*path, str(i)))
    else:
        yield path, t


def hyperparameter_keys(rule: Transform) -> dict[str, Any]:
    """The hyperparameters of ``rule`` by the names :func:`uniopt.adjust` takes: a name alone
    where one member of a chain has it, ``"<position>.<name>"`` where several do."""
    members = list(_members(rule))
    count = Counter(n for _, t in members for n in t.hyperparameters())
    keys = {}
    for path, t in members:
        for n, v in t.hyperparameters().items():
            keys[n if count[n] == 1 else ".".join((*path, n))] = v
    return keys


@dataclasses.dataclass
class _Steps:
    """The step counts of one group's parameters: ``state[p]["step"]`` is ``views[i]``, a 0-d
    view into ``buf``, so one NumPy operation on ``np`` counts a step for a whole run."""

    params: list[torch.Tensor]
    buf: torch.Tensor
    np: Any
    views: list[torch.Tensor]

    @classmethod
    def new(cls, params: list[torch.Tensor]) -> _Steps:
        buf = torch.zeros(len(params), dtype=_step_dtype())
        return cls(list(params), buf, buf.numpy(), list(buf.unbind()))


@dataclasses.dataclass
class _Run:
    """Parameters of one group that share a step count and a kind of view: one engine call."""

    pos: list[int] | None  # positions in the plan's ``sel`` (None: all of them)
    idx: Any  # their indices in the group, for the step buffer (None: the whole group)
    params: list[Any]
    slots: dict[str, list[Any]]
    tensors: list[torch.Tensor]  # the parameters, whose version counters NumPy writes bypass
    numpy: bool


@dataclasses.dataclass
class _Plan:
    """What a group's step needs, built when anything about it changes and re-checked by
    identity each step (params, their storage, which have gradients, state dicts and slots)."""

    group: dict[str, Any]
    plist: list[torch.Tensor]
    params: list[torch.Tensor]
    has: list[bool]
    ptrs: list[int]
    state_obj: Any
    layout: Any
    sel: list[int]  # indices of the parameters the runs update (with a dense gradient)
    sel_params: list[torch.Tensor]
    specs: list[Spec]  # per entry of sel
    fast: bool  # every entry of sel is a plain NumPy view: gradients via Tensor.numpy
    states: list[dict[str, Any]]
    checks: list[tuple[str, list[torch.Tensor]]]  # slot name -> the tensors the views are of
    runs: list[_Run]
    rows: list[int]  # parameters with sparse gradients updated row by row
    sparse: list[bool]
    steps: _Steps

    def still_valid(self, opt: Optimizer, group: dict[str, Any], ps: Any, has: list[bool],
                    layout: Any) -> bool:
        if not (
            self.group is group
            and self.plist is ps
            and len(ps) == len(self.params)
            and self.state_obj is opt.state
            and self.layout == layout
            and self.has == has
            and all(map(operator.is_, ps, self.params))
            and list(map(_DATA_PTR, ps)) == self.ptrs
        ):
            return False
        sts = list(map(opt.state.get, self.sel_params))
        if not all(map(operator.is_, sts, self.states)):
            return False
        for name, tensors in self.checks:
            if not all(map(operator.is_, map(dict.get, sts, itertools.repeat(name)), tensors)):
                return False
        steps = self.steps.np
        for run in self.runs:
            v = steps if run.idx is None else steps[run.idx]
            if v.min() != v.max():
                return False
        return True

    def run_steps(self) -> list[int]:
        steps = self.steps.np
        return [int(steps[0] if run.idx is None else steps[run.idx[0]]) for run in self.runs]


@dataclasses.dataclass
class _Job:
    gi: int
    group: dict[str, Any]
    rule: Transform
    grads: list[Any]
    has: list[bool]
    sparse: list[bool] | None
    plan: _Plan | None
    gviews: list[Any] | None


class Optimizer(torch.optim.Optimizer):
    """Any uniopt rule or chain as a :class:`torch.optim.Optimizer`.

    The param groups hold the rule's hyperparameters under the names :func:`uniopt.adjust`
    takes (``lr``, ``betas``, ``weight_decay``...; ``"1.lr"`` where two members of a chain share
    a name), plus ``maximize``; a group may override any of them, and writing a number (or a
    schedule) into ``group["lr"]`` takes effect at the next step, which is how torch's
    schedulers drive it. Slots are stored under uniopt's keys (``"scale_by_adam.exp_avg"``).

    >>> import torch, uniopt as uo, uniopt.torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = uniopt.torch.Optimizer([w], uo.chain(uo.weight_decay(0.5), uo.sgd(lr=0.1)))
    >>> w.grad = torch.tensor([1.0, -1.0])
    >>> opt.step()
    >>> w.detach()
    tensor([0.8500, 1.0500])
    """

    _fields: ClassVar[tuple[str, ...]] = ()  # named classes: the group keys that are rule fields
    _slot_keys: ClassVar[frozenset[str] | None] = None  # named classes: every torch slot name
    _sparse: ClassVar[str | None] = None  # "rows", "dense", or None (sparse gradients rejected)
    _sparse_error: ClassVar[str] = ""

    rule: Transform

    def __init__(self, params: ParamsT, rule: Transform, *, maximize: bool = False) -> None:
        if not isinstance(rule, Transform):
            raise TypeError(
                f"uniopt.torch.Optimizer: expected a uniopt rule or chain, got {rule!r}"
            )
        if rule.tree_layout:
            raise TypeError(
                "uniopt.torch.Optimizer: the rule holds an optax transformation "
                f"({', '.join(rule.tree_layout)}), which runs on JAX or NumPy arrays, not tensors"
            )
        self.rule = rule
        self._keys = tuple(hyperparameter_keys(rule))
        self._init(params, {**hyperparameter_keys(rule), "maximize": maximize})

    # --- construction ----------------------------------------------------------------------

    def _init(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._reset_caches()
        if defaults.get("differentiable"):
            raise ValueError(self._no_differentiable())
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        self._plans: dict[int, _Plan] = {}
        self._rules: dict[int, tuple[dict[str, Any], tuple[Any, ...], Transform, bool]] = {}
        self._steps: dict[int, _Steps] = {}

    def _no_differentiable(self) -> str:
        return (
            f"{self._name}: differentiable=True is not supported: uniopt writes its updates in "
            "place, outside autograd"
        )

    @property
    def _name(self) -> str:
        return type(self).__name__ if self._fields else "uniopt.torch.Optimizer"

    def __getstate__(self) -> dict[str, Any]:
        out = super().__getstate__()
        if not self._fields:
            out["rule"] = self.rule
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not self._fields:
            self._keys = tuple(hyperparameter_keys(self.rule))
        self._reset_caches()
        for group in self.param_groups:
            self._complete_group(group)

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Keys an older state may lack, as torch's ``__setstate__`` fills them."""
        for k, v in self.defaults.items():
            group.setdefault(k, v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking that the group's values build a valid
        rule and that no parameter is listed twice in it (torch only warns); nothing changes on
        an error."""
        if isinstance(param_group, dict):
            params = param_group.get("params")
            if params is not None and not isinstance(params, (torch.Tensor, set, list, tuple)):
                param_group["params"] = params = list(params)  # as torch: read a generator once
            if isinstance(params, torch.Tensor):
                params = [params]
            if isinstance(params, (list, tuple)):
                seen: dict[int, int] = {}
                for j, q in enumerate(params):
                    t = q[1] if isinstance(q, tuple) else q
                    if id(t) in seen:
                        raise ValueError(
                            f"{self._name}: parameter {j} of this group is its parameter "
                            f"{seen[id(t)]} again; a parameter may appear once"
                        )
                    seen[id(t)] = j
            self._group_rule({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # --- the rule of a group ---------------------------------------------------------------

    def _group_rule(self, group: dict[str, Any]) -> Transform:
        """The rule a group's values make (raises on invalid values)."""
        if group.get("differentiable"):
            raise ValueError(self._no_differentiable())
        rule = self._build_rule(group)
        return chain(scale(-1.0), rule) if group.get("maximize") else rule

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        values = {k: _plain(group[k]) for k in self._keys}
        return adjust(State(self.rule, 0, {}, None), **values).rule

    def _rule_key(self, group: dict[str, Any]) -> tuple[Any, ...]:
        return (*(_plain(group[k]) for k in self._keys), bool(group.get("maximize")))

    def _rule(self, group: dict[str, Any]) -> tuple[Transform, bool]:
        """The group's rule and whether it holds a schedule, cached by the group's values."""
        key = self._rule_key(group)
        hit = self._rules.get(id(group))
        if hit is not None and hit[0] is group and hit[1] == key:
            return hit[2], hit[3]
        rule = self._group_rule(group)
        self._rules[id(group)] = (group, key, rule, _has_schedule(rule))
        return rule, self._rules[id(group)][3]

    def _state_name(self, key: str) -> str:
        return TORCH_SLOTS[key] if self._fields else key

    def _slot_names(self, rule: Transform) -> list[tuple[str, str]]:
        """(uniopt key, state name) of each slot of ``rule``."""
        return [
            (f"{prefix}.{s}", self._state_name(f"{prefix}.{s}"))
            for prefix, slots in rule.layout
            for s in slots
        ]

    # --- the step --------------------------------------------------------------------------

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; with ``closure``, the loss it
        returns (evaluated first, with gradients enabled). Every check runs before any
        parameter or state is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            jobs = [self._prepare(gi, group) for gi, group in enumerate(self.param_groups)]
            for job in jobs:
                self._apply(job)
        return loss

    def _prepare(self, gi: int, group: dict[str, Any]) -> _Job:
        """Everything that can fail, without writing anything."""
        rule, scheduled = self._rule(group)
        ps = group["params"]
        grads = list(map(_GRAD, ps))
        has = list(map(operator.is_not, grads, itertools.repeat(None)))
        plan = self._plans.get(gi)
        if plan is not None and not plan.still_valid(self, group, ps, has, rule.layout):
            plan = None
        gviews = None
        if plan is not None and plan.fast:
            sel = grads if len(plan.sel) == len(grads) else [grads[i] for i in plan.sel]
            try:
                # a strided gradient needs no check here: the compiled path declines it and the
                # engine's reference path runs the step (after a warning that says why)
                gviews = list(map(_NUMPY, sel))
            except (TypeError, RuntimeError):  # on another device, sparse, requiring grad...
                gviews = None
        sparse = None
        if gviews is None:
            sparse = [g is not None and g.layout != torch.strided for g in grads]
            if any(sparse):
                self._check_sparse(group, grads)
            if plan is not None and plan.sparse != sparse:
                plan = None
        if scheduled:
            if plan is not None:
                steps = {*plan.run_steps(), *(int(plan.steps.np[i]) for i in plan.rows)}
            else:
                steps = {
                    _state_step(self.state.get(p, {})) for p, h in zip(ps, has, strict=True) if h
                }
            for s in sorted(steps):
                for part in rule.flat_parts:
                    try:
                        part.at(s)
                    except (ValueError, TypeError) as e:
                        raise type(e)(f"{rule.name}: {e}") from None
        return _Job(gi, group, rule, grads, has, sparse, plan, gviews)

    def _check_sparse(self, group: dict[str, Any], grads: list[Any]) -> None:
        for g in grads:
            if g is None or g.layout == torch.strided:
                continue
            if self._sparse is None:
                raise RuntimeError(
                    self._sparse_error or f"{self._name} does not support sparse gradients"
                )
            if g.layout != torch.sparse_coo:
                raise RuntimeError(f"{self._name} does not support {g.layout} gradients")
            wd = group.get("weight_decay", 0)
            if callable(wd) or _plain(wd) != 0:
                raise RuntimeError(
                    f"{self._name}: weight_decay option is not compatible with sparse gradients"
                )

    def _apply(self, job: _Job) -> None:
        plan = job.plan
        if plan is None:
            if job.sparse is None:
                job.sparse = [g is not None and g.layout != torch.strided for g in job.grads]
            plan = self._plans[job.gi] = self._build_plan(job)
        gviews = job.gviews
        if gviews is None:
            gviews = [
                _grad_view(self._dense(job.grads[i]), p, spec)
                for i, p, spec in zip(plan.sel, plan.sel_params, plan.specs, strict=True)
            ]
        rule, steps = job.rule, plan.steps
        for run, step in zip(plan.runs, plan.run_steps(), strict=True):
            grads = gviews if run.pos is None else [gviews[k] for k in run.pos]
            state = State(rule, step, run.slots, flat_list_def(len(run.params)))
            update_(state, run.params, grads)
            if run.idx is None:
                steps.np += 1
            else:
                steps.np[run.idx] += 1
            if run.numpy:
                torch.autograd.graph.increment_version(run.tensors)
        for i in plan.rows:
            self._rows_step(rule, job.group["params"][i], job.grads[i], steps, i)

    @staticmethod
    def _dense(g: torch.Tensor) -> torch.Tensor:
        return g.coalesce().to_dense() if g.layout == torch.sparse_coo else g

    def _rows_step(
        self, rule: Transform, p: torch.Tensor, g: torch.Tensor, steps: _Steps, i: int
    ) -> None:
        """A sparse gradient, as torch's Adagrad takes it: the engine updates the rows present
        (gathered, duplicates summed), the others keep their values and state."""
        g = g.detach().coalesce()
        index = tuple(g.indices())
        values = g.values()
        names = self._slot_names(rule)
        st = self._ensure_state(p, rule, steps, i, None)  # not in the plan's identity checks
        if values.numel():
            pd = p.detach()
            rows = pd[index]
            slots = {key: [st[name][index]] for key, name in names}
            update_(State(rule, int(steps.np[i]), slots, flat_list_def(1)), [rows], [values])
            pd[index] = rows
            for key, name in names:
                st[name][index] = slots[key][0]
        steps.np[i] += 1

    # --- state -----------------------------------------------------------------------------

    def _steps_for(self, gi: int, ps: list[torch.Tensor]) -> _Steps:
        steps = self._steps.get(gi)
        if steps is None or len(steps.params) != len(ps) or not all(
            map(operator.is_, ps, steps.params)
        ):
            steps = self._steps[gi] = _Steps.new(ps)
        return steps

    def _ensure_state(
        self, p: torch.Tensor, rule: Transform, steps: _Steps, i: int, spec: Spec | None
    ) -> dict[str, Any]:
        """``state[p]`` with its step in the group's buffer, every slot of ``rule`` (missing
        ones as the rule initialises them), dense, and laid out as ``p``."""
        st = self.state[p]
        if st.get("step") is not steps.views[i]:
            steps.np[i] = _state_step(st)
            st["step"] = steps.views[i]
        names = self._slot_names(rule)
        missing = [(key, name) for key, name in names if name not in st]
        if missing:
            fresh = setup(rule, [_real(p.detach())]).slots
            for key, name in missing:
                s = fresh[key][0]
                st[name] = torch.view_as_complex(s) if p.is_complex() else s
        for _, name in names:
            s = st[name]
            if s.layout != torch.strided:  # torch's SGD keeps a sparse buffer for sparse grads
                s = s.to_dense()
            if spec == _PLAIN and not s.is_contiguous():
                s = s.contiguous()
            elif spec is not None and spec[0] == "np" and s.stride() != p.stride():
                s = torch.empty_like(p).copy_(s)  # laid out as p, so one view walks both
            st[name] = s
        return st

    def _build_plan(self, job: _Job) -> _Plan:
        group, rule = job.group, job.rule
        ps = group["params"]
        assert job.sparse is not None
        steps = self._steps_for(job.gi, ps)
        names = self._slot_names(rule)
        sel: list[int] = []
        specs: list[Spec] = []
        states: list[dict[str, Any]] = []
        rows: list[int] = []
        runs: dict[tuple[Any, ...], list[int]] = {}
        for i, (p, has) in enumerate(zip(ps, job.has, strict=True)):
            if not has:
                continue
            if job.sparse[i] and self._sparse == "rows":
                self._ensure_state(p, rule, steps, i, None)
                rows.append(i)
                continue
            spec = _spec(p)
            st = self._ensure_state(p, rule, steps, i, spec)
            key = (spec[0], p.dtype if spec[0] == "np" else None, int(steps.np[i]))
            runs.setdefault(key, []).append(len(sel))
            sel.append(i)
            specs.append(spec)
            states.append(st)
        sel_params = [ps[i] for i in sel]
        plan_runs = []
        for (kind, _, _), pos in runs.items():
            whole = len(pos) == len(sel)
            idx = np.asarray([sel[k] for k in pos], dtype=np.intp)
            plan_runs.append(
                _Run(
                    pos=None if whole else pos,
                    idx=None if whole and len(sel) == len(ps) else idx,
                    params=[_view(sel_params[k], specs[k]) for k in pos],
                    slots={
                        key: [_view(states[k][name], specs[k]) for k in pos]
                        for key, name in names
                    },
                    tensors=[sel_params[k] for k in pos],
                    numpy=kind == "np",
                )
            )
        checks = [(name, [st[name] for st in states]) for _, name in names]
        checks.append(("step", [steps.views[i] for i in sel]))
        return _Plan(
            group=group,
            plist=ps,
            params=list(ps),
            has=job.has,
            ptrs=list(map(_DATA_PTR, ps)),
            state_obj=self.state,
            layout=rule.layout,
            sel=sel,
            sel_params=sel_params,
            specs=specs,
            fast=not any(job.sparse)
            and all(s == _PLAIN for s in specs)
            and not any(p.is_complex() for p in sel_params),
            states=states,
            checks=checks,
            runs=plan_runs,
            rows=rows,
            sparse=job.sparse,
            steps=steps,
        )

    # --- checkpoints -----------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (a state saved by the torch class of the same name loads
        here, and the reverse), after checking that the groups, their sizes, the slots and their
        shapes match this optimizer's parameters; nothing changes on an error."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)

    def _check_state_dict(self, sd: Any) -> None:
        where = f"{self._name}.load_state_dict"
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError(
                f"{where}: expected a dict with 'state' and 'param_groups' (from state_dict()), "
                f"got {type(sd).__name__}; nothing was loaded"
            )
        saved = sd["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"{where}: the state has {len(saved)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}; nothing was loaded"
            )
        owner: dict[Any, tuple[int, int, torch.Tensor, Transform]] = {}
        for gi, (s, g) in enumerate(zip(saved, self.param_groups, strict=True)):
            if len(s["params"]) != len(g["params"]):
                raise ValueError(
                    f"{where}: parameter group {gi} of the state has {len(s['params'])} "
                    f"parameters, this optimizer's has {len(g['params'])}; nothing was loaded"
                )
            values = {**self.defaults, **{k: v for k, v in s.items() if k != "params"}}
            try:
                rule = self._group_rule(values)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{where}: parameter group {gi} of the state: {e}") from None
            for j, (k, p) in enumerate(zip(s["params"], g["params"], strict=True)):
                owner[k] = (gi, j, p, rule)
        allowed = self._slot_keys
        for k, st in sd["state"].items():
            if k not in owner or not st:
                continue
            gi, j, p, rule = owner[k]
            what = f"the state of parameter {k} (group {gi}, position {j})"
            names = {name for _, name in self._slot_names(rule)}
            known = (allowed if allowed is not None else frozenset(names)) | {"step"}
            extra = sorted(set(st) - known)
            if extra:
                raise ValueError(
                    f"{where}: {what} has slots {extra} that {self._name} does not keep (it "
                    f"keeps {sorted(known)}): is it the state of another optimizer? nothing "
                    "was loaded"
                )
            needed = sorted(names - set(st) - {"momentum_buffer"})
            if needed and set(st) - {"step"}:
                raise ValueError(
                    f"{where}: {what} lacks the slots {needed}; nothing was loaded"
                )
            for name, v in st.items():
                if name == "step":
                    continue
                if not isinstance(v, torch.Tensor):
                    raise TypeError(
                        f"{where}: {what} has {name} of type {type(v).__name__}, not a tensor; "
                        "nothing was loaded"
                    )
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{where}: {what} has {name} of shape {tuple(v.shape)}, but that "
                        f"parameter has shape {tuple(p.shape)}; nothing was loaded"
                    )


# --- torch's classes -----------------------------------------------------------------------


class _Named(Optimizer):
    """A torch.optim class: the group's values are fields of one uniopt rule record."""

    _base: ClassVar[Transform]

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._keys = self._fields
        self.rule = self._base
        self._init(params, defaults)

    def _base_rule(self, group: dict[str, Any]) -> Transform:
        return self._base

    def _build_rule(self, group: dict[str, Any]) -> Transform:
        values = {k: _plain(group[k]) for k in self._fields}
        return dataclasses.replace(self._base_rule(group), **values)

    def _rule_key(self, group: dict[str, Any]) -> tuple[Any, ...]:
        return (
            *(_plain(group[k]) for k in self._fields),
            bool(group.get("maximize")),
            bool(group.get("decoupled_weight_decay")),
            bool(group.get("differentiable")),
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._keys = self._fields
        self.rule = self._base


class SGD(_Named):
    """``torch.optim.SGD``, run by :func:`uniopt.sgd`; sparse gradients as torch takes them."""

    _fields = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    _slot_keys = frozenset({"momentum_buffer"})
    _sparse = "dense"
    _base = sgd()

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "maximize": maximize,
                "foreach": foreach,
                "differentiable": differentiable,
                "fused": fused,
            },
        )


class Adagrad(_Named):
    """``torch.optim.Adagrad``, run by :func:`uniopt.adagrad`. As torch's, it sets up every
    parameter's state at construction; sparse gradients update only the rows present."""

    _fields = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    _slot_keys = frozenset({"sum"})
    _sparse = "rows"
    _base = adagrad()

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "lr_decay": lr_decay,
                "eps": eps,
                "weight_decay": weight_decay,
                "initial_accumulator_value": initial_accumulator_value,
                "foreach": foreach,
                "maximize": maximize,
                "differentiable": differentiable,
                "fused": fused,
            },
        )
        for gi, group in enumerate(self.param_groups):
            rule, _ = self._rule(group)
            steps = self._steps_for(gi, group["params"])
            for i, p in enumerate(group["params"]):
                self._ensure_state(p, rule, steps, i, _spec(p))


class RMSprop(_Named):
    """``torch.optim.RMSprop``, run by :func:`uniopt.rmsprop`."""

    _fields = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    _slot_keys = frozenset({"square_avg", "momentum_buffer", "grad_avg"})
    _sparse_error = "RMSprop does not support sparse gradients"
    _base = rmsprop()

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "alpha": alpha,
                "eps": eps,
                "centered": centered,
                "weight_decay": weight_decay,
                "capturable": capturable,
                "foreach": foreach,
                "maximize": maximize,
                "differentiable": differentiable,
            },
        )


class Adadelta(_Named):
    """``torch.optim.Adadelta``, run by :func:`uniopt.adadelta`."""

    _fields = ("lr", "rho", "eps", "weight_decay")
    _slot_keys = frozenset({"square_avg", "acc_delta"})
    _sparse_error = "Adadelta does not support sparse gradients"
    _base = adadelta()

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "rho": rho,
                "eps": eps,
                "weight_decay": weight_decay,
                "maximize": maximize,
                "capturable": capturable,
                "foreach": foreach,
                "differentiable": differentiable,
            },
        )


class Adam(_Named):
    """``torch.optim.Adam``, run by :func:`uniopt.adam` (``decoupled_weight_decay=True``:
    :func:`uniopt.adamw`, as torch)."""

    _fields: ClassVar[tuple[str, ...]] = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    _slot_keys = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
    _base = adam()

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": amsgrad,
                "maximize": maximize,
                "foreach": foreach,
                "capturable": capturable,
                "differentiable": differentiable,
                "fused": fused,
                "decoupled_weight_decay": decoupled_weight_decay,
            },
        )

    def _base_rule(self, group: dict[str, Any]) -> Transform:
        return adamw() if group.get("decoupled_weight_decay") else adam()


class AdamW(Adam):
    """``torch.optim.AdamW``, run by :func:`uniopt.adamw`, plus ``couple_lr``: ``False`` makes
    the decay independent of the learning rate, ``p <- p - lr*A - weight_decay*p`` (Flux's
    form; see the README)."""

    _fields = ("lr", "betas", "eps", "weight_decay", "amsgrad", "couple_lr")

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        couple_lr: bool = True,
    ) -> None:
        _Named.__init__(
            self,
            params,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": amsgrad,
                "maximize": maximize,
                "foreach": foreach,
                "capturable": capturable,
                "differentiable": differentiable,
                "fused": fused,
                "decoupled_weight_decay": True,
                "couple_lr": couple_lr,
            },
        )

    def _base_rule(self, group: dict[str, Any]) -> Transform:
        return adamw()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch's AdamW

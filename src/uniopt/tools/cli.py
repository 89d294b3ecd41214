"""The ``uniopt`` command.

``uniopt compare`` runs rules (with hyperparameters of your choice) on the built-in problems
(:mod:`uniopt.tools.problems`) or one of your own with the functional API and prints, for each
run, the final loss, its gap to the known minimum, the number of updates after which the gap
first fell to ``--tol``, and the median time of one ``uniopt.update_`` call (the first left
out: see :func:`run_one`); ``--plot`` draws the loss curves and, on 2-D problems, the paths
over the contours. ``uniopt schedule`` evaluates and draws a schedule expression. Subcommands
are argparse sub-parsers, so more can be added beside them. Nothing the user types is
evaluated: :mod:`uniopt.tools.parse` reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__, engine, tree
from ..base import Transform
from ..fast import FastPathUnavailable
from ..hyper import did_you_mean
from ..rules.adadelta import adadelta
from ..rules.adagrad import adagrad
from ..rules.adam import adam, adamw, optimistic_adam
from ..rules.rmsprop import rmsprop
from ..rules.sgd import sgd
from . import parse as parse_
from .parse import RuleSpec, UsageError
from .problems import DEFAULT_PROBLEMS, PROBLEMS, BadProblem, Problem, UserProblem

# Every rule as built for the comparison; only lr varies by problem. Momentum 0.9 for the
# two SGD variants (plain SGD is not interesting next to the adaptive rules); everything else
# is the rule's own default, adamw's decoupled weight_decay=1e-2 included, so adamw settles at
# the minimum of a slightly different problem and shows a small gap. Any other rule of the
# registry (`uniopt rules`) runs too, with its registry example's hyperparameters.
PRESETS: dict[str, tuple[Callable[..., Transform], dict[str, Any]]] = {
    "sgd": (sgd, {"momentum": 0.9}),
    "nesterov": (sgd, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (adagrad, {}),
    "rmsprop": (rmsprop, {}),
    "adadelta": (adadelta, {}),
    "adam": (adam, {}),
    # torch's Adam(amsgrad=True), with adam's hyperparameters (weight_decay...): the same
    # steps as the registry's uo.amsgrad(convention="torch"), which rules, bench and translate
    # name amsgrad
    "amsgrad": (adam, {"amsgrad": True}),
    "adamw": (adamw, {}),
    "optimistic_adam": (optimistic_adam, {}),
}


def _preset(name: str) -> Callable[..., Transform]:
    cls, kwargs = PRESETS[name]

    def build(lr: Any, **hyper: Any) -> Transform:
        return cls(**{**kwargs, "lr": lr, **hyper})

    return build


# RULES[name](lr, **hyperparameters): the preset rules as compare builds them
RULES: dict[str, Callable[..., Transform]] = {name: _preset(name) for name in PRESETS}

DEFAULT_LR: dict[str, dict[str, float]] = {
    "rosenbrock": {
        "sgd": 1e-3,
        "nesterov": 1e-3,
        "adagrad": 1.0,
        "rmsprop": 3e-3,
        "adadelta": 1.0,
        "adam": 0.1,
        "amsgrad": 0.1,
        "adamw": 3e-2,
        "optimistic_adam": 3e-2,
    },
    "quadratic": {
        "sgd": 1e-3,
        "nesterov": 1e-3,
        "adagrad": 1.0,
        "rmsprop": 3e-3,
        "adadelta": 1.0,
        "adam": 0.1,
        "amsgrad": 0.3,
        "adamw": 3e-2,
        "optimistic_adam": 1e-2,
    },
    "logistic": {
        "sgd": 0.3,
        "nesterov": 0.3,
        "adagrad": 0.3,
        "rmsprop": 1e-3,
        "adadelta": 1.0,
        "adam": 3e-2,
        "amsgrad": 3e-2,
        "adamw": 0.1,
        "optimistic_adam": 1e-2,
    },
    "beale": {
        "sgd": 3e-3,
        "nesterov": 3e-3,
        "adagrad": 0.3,
        "rmsprop": 3e-3,
        "adadelta": 1.0,
        "adam": 0.1,
        "amsgrad": 0.1,
        "adamw": 0.1,
        "optimistic_adam": 3e-2,
    },
    # judged by the worst of seeds 0-2 (the MLP's start depends on the seed)
    "mlp": {
        "sgd": 0.3,
        "nesterov": 0.3,
        "adagrad": 0.3,
        "rmsprop": 3e-2,
        "adadelta": 1.0,
        "adam": 0.1,
        "amsgrad": 0.1,
        "adamw": 0.1,
        "optimistic_adam": 0.1,
    },
}
FALLBACK_LR = 1e-3  # for a problem added to PROBLEMS without a row above


@dataclass(frozen=True)
class Result:
    problem: str
    rule: str  # as written: the name, and the hyperparameters given (adamw:lr=0.001)
    lr: float | None  # None where lr is a schedule or the rule has none
    steps: int
    initial_loss: float
    final_loss: float | None  # None when the run diverged
    optimum: float | None  # None where the problem's minimum is not known
    steps_to_tol: int | None  # updates applied when the gap first was <= tol
    diverged_at: int | None  # updates applied when the loss first was not finite
    # the median time of one update, the first left out (see run_one); None where the run
    # made no update after its first (it diverged there)
    us_per_update: float | None
    seed: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # as given, JSON-able
    lr_text: str = "-"
    # for --plot: the loss before each update and after the last; a 2-D problem's points
    losses: tuple[float, ...] = field(default=(), repr=False, compare=False)
    path: tuple[tuple[float, float], ...] = field(default=(), repr=False, compare=False)

    @property
    def gap(self) -> float | None:
        if self.final_loss is None or self.optimum is None:
            return None
        return self.final_loss - self.optimum

    def as_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "rule": self.rule,
            "seed": self.seed,
            "hyperparameters": self.hyperparameters,
            "lr": self.lr if self.lr is not None else None if self.lr_text == "-" else
            self.lr_text,
            "steps": self.steps,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "optimum": self.optimum,
            "gap": self.gap,
            "steps_to_tol": self.steps_to_tol,
            "diverged": self.diverged_at is not None,
            "diverged_at": self.diverged_at,
            "us_per_update": self.us_per_update,
        }


def default_lr(problem: str, rule: str) -> float:
    return DEFAULT_LR.get(problem, {}).get(rule, FALLBACK_LR)


def _finite(doc: Any) -> Any:
    """``doc`` with each infinite or NaN number null: JSON has none (a strict reader refuses
    Python's ``Infinity`` and ``NaN``), and a diverged run's loss, a schedule past float's
    range are such numbers."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_finite(v) for v in doc]
    return doc


def _json_value(v: Any) -> Any:
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    if isinstance(v, tuple | list):
        return [_json_value(x) for x in v]
    return parse_.short(v)  # a schedule, as the call that builds it


@dataclass(frozen=True)
class Run:
    """A rule built for one problem, with what its step needs beside the gradient."""

    spec: RuleSpec
    rule: Transform
    lr: Any
    step_args: tuple[str, ...] = ()
    needs_closure: bool = False

    @property
    def lr_text(self) -> str:
        if self.lr is None:
            return "-"
        return f"{self.lr:g}" if isinstance(self.lr, int | float) else parse_.short(self.lr)


def _known_rule(name: str) -> tuple[Callable[..., Transform], dict[str, Any], Any]:
    """``(class, base hyperparameters, registry entry or None)`` of a rule name."""
    if name in PRESETS:
        cls, kwargs = PRESETS[name]
        return cls, kwargs, None
    from .. import registry

    if name not in registry.entries():
        raise parse_.unknown("rule", name, [*PRESETS, *registry.names()],
                            " (`uniopt rules` lists them all)")
    e = registry.entry(name)
    return e.rule, dict(e.info.example), e


def check_spec(spec: RuleSpec) -> None:
    """A UsageError for an unknown rule or a hyperparameter the rule does not have."""
    cls, _, _ = _known_rule(spec.name)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    for key in spec.hyper:
        if key not in names:
            raise parse_.unknown(f"hyperparameter of {spec.name}", key, names)


def build_run(spec: RuleSpec, problem: str, lr: float | None = None) -> Run:
    """``spec`` built for ``problem``: the hyperparameters given, else ``lr`` (``--lr``), else
    the hand-picked lr of a preset or the registry example's hyperparameters."""
    cls, kwargs, entry = _known_rule(spec.name)
    if entry is None:
        kwargs = {**kwargs, "lr": default_lr(problem, spec.name) if lr is None else lr}
    elif lr is not None and "lr" in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
        # (a rule without one, SAM's or Polyak's, whose step size comes from elsewhere: as
        # it is, its table's lr column a dash)
        kwargs = {**kwargs, "lr": lr}
    kwargs = {**kwargs, **spec.hyper}
    try:
        rule = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{spec.label}: {e}") from None
    if entry is None:
        return Run(spec, rule, kwargs.get("lr"))
    return Run(spec, rule, kwargs.get("lr"), tuple(entry.step_args), entry.needs_closure)


# what a rule's step may read beside the gradient (its registry entry's step_args): the loss,
# the gradient and the objective, which every problem gives, and the Hessian-vector product,
# which a problem gives where it has an ``hvp`` method (the built-in ones do)
STEP_ARGS = {
    "value": "the loss",
    "grad": "the gradient",
    "value_fn": "the objective, params -> (loss, grads)",
    "hvp": "the Hessian-vector product, v -> H v at the params",
}


def _check_step_args(problem: Problem, run: Run) -> None:
    """A UsageError where ``run``'s step reads an argument that ``problem`` cannot give."""
    lacking = [a for a in run.step_args if a not in STEP_ARGS
               or (a == "hvp" and not callable(getattr(problem, "hvp", None)))]
    if lacking:
        needs = "; ".join(f"{a}= ({STEP_ARGS.get(a, 'unknown to compare')})" for a in lacking)
        raise UsageError(f"{run.spec.label} cannot run on {problem.name}: its step needs "
                         f"{needs}, which {problem.name} does not give")


def _closure(problem: Problem) -> Callable[[Any], tuple[float, Any]]:
    own = getattr(problem, "closure", None)
    if callable(own):
        return own
    if problem in PROBLEMS.values():
        return lambda params: (problem.loss(params), problem.grad(params))

    def closure(params: Any) -> tuple[float, Any]:  # an object of the user's own
        try:
            return problem.loss(params), problem.grad(params)
        except Exception as e:
            raise BadProblem(f"{problem.name} raised {type(e).__name__}: {e}") from None
    return closure


def _start(problem: Problem, seed: int) -> Any:
    if problem in PROBLEMS.values() or isinstance(problem, UserProblem):
        return problem.init(seed)  # (a UserProblem names what failed itself)
    try:
        return problem.init(seed)
    except Exception as e:
        raise BadProblem(f"{problem.name}: init({seed}) raised {type(e).__name__}: {e}") from None


def _point(params: Any) -> tuple[float, float] | None:
    """The two coordinates of a 2-D problem's params, else None."""
    leaves = tree.trainables(params) if not isinstance(params, np.ndarray) else [params]
    if len(leaves) == 1 and np.size(leaves[0]) == 2:
        x, y = np.asarray(leaves[0], dtype=np.float64).ravel()
        return float(x), float(y)
    return None


def run_one(
    problem: Problem,
    run: Run | str,
    lr: float | None,
    steps: int,
    seed: int,
    tol: float,
    tick: Callable[[int], None] = lambda n: None,
    track: bool = False,
) -> Result:
    """``steps`` updates of ``run`` on ``problem`` from ``problem.init(seed)``, in place; ``run``
    may be a preset's name (with ``lr``). ``tick(n)`` hears of every n updates done; ``track``
    keeps a 2-D problem's points for the plot.

    Each update is timed alone (``uniopt.update_``, or ``uniopt.minimize_step_`` for a rule that
    evaluates the objective itself, with the objective's evaluations in it), and the time
    reported is the median over the updates after the first. The first pays the process's and
    the rule's one-off costs (loading the compiled loop from the disk cache: some 0.4 s in a
    fresh process), and a rule whose loop is not on disk compiles it, once, about a second long,
    after its first :data:`uniopt.fast.cpu.COMPILE_AFTER` updates: the median leaves that out
    of a longer run. A run of one update reports that update."""
    if isinstance(run, str):
        run = build_run(RuleSpec(run), problem.name, lr)
    _check_step_args(problem, run)
    closure = _closure(problem)
    hvp = getattr(problem, "hvp", None)
    params = _start(problem, seed)
    state = engine.setup(run.rule, params)
    optimum = problem.optimum
    loss, grads = closure(params)
    initial = loss
    losses = [loss]
    path = [] if not track or _point(params) is None else [_point(params)]
    hit = 0 if optimum is not None and loss - optimum <= tol else None
    diverged_at = None
    times: list[float] = []
    done = 0
    every = 100
    # a diverging run overflows on its way to inf/nan; that is reported, not warned about
    with np.errstate(all="ignore"):
        for k in range(1, steps + 1):
            try:
                if run.needs_closure:
                    t0 = time.perf_counter()
                    state, _ = engine.minimize_step_(state, params, closure)
                else:
                    given = {"value": loss, "grad": grads, "value_fn": closure}
                    if hvp is not None and "hvp" in run.step_args:  # (made where it is read)
                        given["hvp"] = hvp(params)
                    extra = {a: given[a] for a in run.step_args}
                    t0 = time.perf_counter()
                    state = engine.update_(state, params, grads, **extra)
            except (TypeError, ValueError) as e:  # BadProblem too: a schedule invalid later,
                # a gradient the problem's function makes of another dtype or shape
                raise BadProblem(f"{run.spec.label} on {problem.name}, update {k}: {e}") from None
            times.append(time.perf_counter() - t0)
            done = k
            loss, grads = closure(params)
            losses.append(loss)
            if path:
                path.append(_point(params))
            if k % every == 0:
                tick(every)
            if not math.isfinite(loss):
                diverged_at = k
                break
            if hit is None and optimum is not None and loss - optimum <= tol:
                hit = k
    tick(done % every + (steps - done))
    return Result(
        problem=problem.name,
        rule=run.spec.label,
        lr=float(run.lr) if isinstance(run.lr, int | float) else None,
        steps=steps,
        initial_loss=initial,
        final_loss=None if diverged_at is not None else loss,
        optimum=optimum,
        steps_to_tol=hit,
        diverged_at=diverged_at,
        # (a run of one update reports it; one that diverged at its first, none)
        us_per_update=(None if diverged_at == 1 else
                       float(np.median(times[1:] or times)) * 1e6),
        seed=seed,
        hyperparameters={k: _json_value(v) for k, v in run.spec.hyper.items()},
        lr_text=run.lr_text,
        losses=tuple(losses),
        path=tuple(p for p in path if p is not None),
    )


PROGRESS_DELAY_S = 1.0  # a command quicker than this shows no bar


class Progress:
    """A rich progress bar on stderr that shows itself once the work has taken ``delay``
    seconds (a quick command prints no bar); nothing at all without rich or when disabled."""

    def __init__(self, total: int, enabled: bool, delay: float | None = None,
                 console: Any = None):
        self.total, self.done = total, 0
        self.delay = PROGRESS_DELAY_S if delay is None else delay
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.label = ""
        self._make: Callable[[], Any] | None = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar
        except ImportError:  # the `cli` extra is not installed: no bar
            return
        console = console if console is not None else Console(stderr=True)
        self._make = lambda: Bar(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)

    def describe(self, label: str) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.update(self.task, description=label)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is None and self._make is not None:
            if time.perf_counter() - self.t0 < self.delay:
                return
            self.bar = self._make()
            self.task = self.bar.add_task(self.label, total=self.total)
            self.bar.start()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def compare(
    rules: Sequence[RuleSpec | str],
    problems: Sequence[Problem | str],
    steps: int,
    seeds: Sequence[int] | int,
    tol: float,
    lr: float | None = None,
    progress: Progress | None = None,
    track: bool = False,
) -> list[Result]:
    """Every rule on every problem from every seed; a UsageError for a rule that cannot be
    built, before anything runs."""
    specs = [RuleSpec(r) if isinstance(r, str) else r for r in rules]
    probs = [PROBLEMS[p] if isinstance(p, str) else p for p in problems]
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    runs = {(p.name, s.label): build_run(s, p.name, lr) for p in probs for s in specs}
    # a rule that cannot take a problem's params, or its step an argument the problem cannot
    # give, and a problem of your own that breaks its contract say so before anything runs
    for p in probs:
        try:
            start = _start(p, seeds[0])
            _closure(p)(start)
        except BadProblem as e:
            raise UsageError(str(e)) from None
        for s in specs:
            _check_step_args(p, runs[p.name, s.label])
            try:
                engine.setup(runs[p.name, s.label].rule, start)
            except (TypeError, ValueError) as e:
                raise UsageError(f"{s.label} cannot run on {p.name}: {e}") from None
    bar = progress or Progress(0, enabled=False)
    out = []
    # the bar stopped whatever ends the runs (a usage error, ^C): a running one hides the
    # terminal's cursor, and would be redrawn after the error
    with warnings.catch_warnings(), contextlib.closing(bar):
        # a rule with per-leaf parts runs on the reference path: its time per update in the
        # table says so, and a warning between the rows would only clutter them
        warnings.simplefilter("ignore", FastPathUnavailable)
        for p in probs:
            for s in specs:
                for seed in seeds:
                    bar.describe(f"{p.name} {s.label}"
                                 + (f" seed {seed}" if len(seeds) > 1 else ""))
                    try:
                        out.append(run_one(p, runs[p.name, s.label], lr, steps, seed, tol,
                                           bar.advance, track))
                    except BadProblem as e:  # (a function that breaks its contract later on,
                        # a schedule invalid at a later step)
                        raise UsageError(str(e)) from None
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def format_table(results: Sequence[Result], tol: float) -> str:
    """A plain-text table, one block of rows per problem (a seed column if there are several
    seeds)."""
    seeds = len({r.seed for r in results}) > 1
    head = ("problem", "rule", *(("seed",) if seeds else ()), "lr", "final loss", "gap",
            f"steps to {tol:g}", "us/update")
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.diverged_at is not None:
            loss, gap = "diverged", f"at step {r.diverged_at}"
        else:
            loss, gap = _fmt(r.final_loss), _fmt(r.gap)
        steps = "-" if r.steps_to_tol is None else str(r.steps_to_tol)
        rows.append((r.problem, r.rule, *((str(r.seed),) if seeds else ()), r.lr_text, loss,
                     gap, steps,
                     "-" if r.us_per_update is None else f"{r.us_per_update:.1f}"))
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    left = {0, 1}  # names left-aligned, numbers right-aligned

    def line(row: tuple[str, ...]) -> str:
        cells = (
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    rule_line = "  ".join("-" * w for w in widths)
    out = [line(head), rule_line]
    for i, (r, row) in enumerate(zip(results, rows, strict=True)):
        if i and r.problem != results[i - 1].problem:
            out.append("")
        out.append(line(row))
    return "\n".join(out)


def _names(kind: str, known: Sequence[str], fold: bool = False) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of ``known`` (``fold``:
    whatever its case, as ``known`` writes it)."""
    spelled = {k.lower(): k for k in known} if fold else {}

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        names = [spelled.get(n.lower(), n) for n in names] if fold else names
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} named in {text!r}")
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {n!r}{did_you_mean(n, known)} (choose from "
                    f"{', '.join(known)})"
                )
        return list(dict.fromkeys(names))

    parse.__name__ = f"{kind} list"  # what argparse calls the type in its messages
    return parse


def _positive(cast: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


def _usage(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a parser that raises UsageError."""

    def convert(text: str) -> Any:
        try:
            return fn(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def _rule_specs(text: str) -> list[RuleSpec]:
    specs = parse_.rules([text])
    for spec in specs:
        check_spec(spec)
    return specs


def _problems(text: str) -> list[Problem]:
    """``all``, names of built-in problems, or ``module:function`` problems of your own."""
    from . import problems

    out: list[Problem] = []
    loaded: dict[str, Problem] = {}
    for name in parse_.split_top(text):
        if not name:
            continue
        if name == "all":
            out += PROBLEMS.values()
        elif ":" in name:
            if name not in loaded:  # (the same spec twice is one problem, as a built-in's is)
                try:
                    loaded[name] = problems.load(name)
                except ValueError as e:
                    raise UsageError(str(e)) from None
            out.append(loaded[name])
        elif name in PROBLEMS:
            out.append(PROBLEMS[name])
        else:
            raise parse_.unknown("problem", name, PROBLEMS)
    if not out:
        raise UsageError(f"no problem named in {text!r}")
    return _distinct(out)


def _distinct(problems: Sequence[Problem]) -> list[Problem]:
    """``problems`` each once (rows are told apart by the name); a UsageError where two are
    named alike. A ``MODULE:FUNCTION`` given twice is one problem (equal, where each
    ``--problems`` loads its own)."""
    named: dict[str, Problem] = {}
    for p in problems:
        if named.setdefault(p.name, p) != p:
            raise UsageError(f"two problems are named {p.name!r}; give each its own name")
    return list(named.values())


def _seeds(text: str) -> list[int]:
    """``0``, ``0,1,2`` or ``0-4`` (both ends in)."""
    out: list[int] = []
    for piece in text.split(","):
        lo, dash, hi = piece.strip().partition("-")
        try:
            first, last = (int(lo), int(hi)) if dash and lo else (int(piece), int(piece))
        except ValueError:
            raise UsageError(f"seeds are integers >= 0, as 0, 0,1,2 or 0-4; got {text!r}") \
                from None
        if first < 0 or last < first:
            raise UsageError(f"seeds are integers >= 0, a range low-high; got {piece.strip()!r} "
                             f"in {text!r}")
        if len(out) + last - first >= MAX_SEEDS:
            raise UsageError(f"at most {MAX_SEEDS:,} seeds; {text!r} asks for more")
        out += range(first, last + 1)
    return list(dict.fromkeys(out))


MAX_SEEDS = 10_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniopt", description="uniopt: one optimizer library for every array framework."
    )
    parser.add_argument("--version", action="version", version=f"uniopt {__version__}",
                        help="print uniopt's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmp = sub.add_parser(
        "compare",
        help="run rules on built-in problems and tabulate how far and how fast they get",
        description=(
            "Run each rule on each problem with uniopt.setup + uniopt.update_ and report the "
            "final loss, its gap to the known minimum, the updates needed to bring the gap to "
            "TOL and the median wall time of one update (each timed alone, the first left out: it "
            "loads the compiled loop). Learning rates are hand-picked per problem "
            "and rule (see uniopt.tools.cli.DEFAULT_LR), not tuned per seed; any other rule "
            "of `uniopt rules` runs with its registry example's hyperparameters."
        ),
    )
    cmp.add_argument(
        "--rules",
        type=_usage(_rule_specs, "rule list"),
        action="extend",
        default=None,
        metavar="RULES",
        help=(f"comma-separated rules, each NAME or NAME:KEY=VALUE,KEY=VALUE (e.g. "
              f"'adamw:lr=3e-4,weight_decay=0.1,sgd'; values are numbers, True/False/None, "
              f"tuples, quoted strings, bare words (convention=optax) or schedule calls such "
              f"as lr='warmup(100,cosine(0.1,2000))'); the presets "
              f"{', '.join(RULES)} (default: these) or any rule of `uniopt rules`; "
              f"repeatable"),
    )
    cmp.add_argument(
        "--problems",
        type=_usage(_problems, "problem list"),
        action="extend",
        default=None,
        metavar="PROBLEMS",
        help=(f"comma-separated, from {', '.join(PROBLEMS)}, 'all', or MODULE:FUNCTION, a "
              f"function params -> (loss, grads) of your own with a start in FUNCTION.x0 "
              f"(default: {','.join(DEFAULT_PROBLEMS)}); repeatable"),
    )
    cmp.add_argument(
        "--steps",
        type=_positive(int, "a positive integer"),
        default=2000,
        help="updates per run (default: 2000)",
    )
    cmp.add_argument("--seeds", "--seed", dest="seeds", type=_usage(_seeds, "seed list"),
                     default=[0], metavar="SEEDS",
                     help="seeds of the starting points: 0, 0,1,2 or 0-4 (default: 0); rosenbrock "
                          "and beale start where their benchmarks do, whatever the seed")
    cmp.add_argument(
        "--tol",
        type=_positive(float, "a positive number"),
        default=1e-6,
        help="gap to the minimum that counts as solved; 'steps to tol' is the first update "
             "that reached it (default: 1e-6)",
    )
    cmp.add_argument(
        "--lr",
        type=_positive(float, "a positive number"),
        default=None,
        help="one learning rate for every run whose rule has an lr, in place of the "
        "hand-picked ones",
    )
    cmp.add_argument("--json", action="store_true", help="print the results as JSON")
    cmp.add_argument("--plot", metavar="FILE.png", default=None,
                     help=("draw the loss curves (log scale) and, on 2-D problems, the paths "
                           "over the contours, to FILE.png (needs matplotlib: uniopt[plot])"))
    cmp.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (shown on a terminal for runs over a second, "
                          "with rich: uniopt[cli])")
    cmp.set_defaults(func=_cmd_compare)
    add_schedule_parser(sub)
    add_bench_parser(sub)
    add_conventions_parsers(sub)
    add_rules_parser(sub)
    parser.set_defaults(commands=list(sub.choices))
    return parser


def horizon(schedule: Any) -> tuple[int, list[int]]:
    """``(steps, knots)``: how many steps show what ``schedule`` does (its warm-ups, decays and
    boundaries; three restarts of a restarting one, two cycles of a cyclic one; 1000 for a
    callable that is not one of uniopt's schedules), and the steps where it changes course."""
    from .. import schedules as S

    s = schedule

    def inner(t: Any) -> tuple[int, list[int]]:
        return horizon(t) if callable(t) else (0, [])

    if isinstance(s, S.constant):
        return 0, []
    if isinstance(s, S.linear | S.polynomial | S.cosine):
        return int(s.steps), [int(s.steps)]
    if isinstance(s, S.exponential):
        if s.end is not None and s.rate != 1 and s.end > 0 and s.init > 0:
            n = int(s.steps * max(1.0, math.log(s.end / s.init) / math.log(s.rate)))
            return n, [n]
        return int(s.steps * (math.log(0.01) / math.log(s.rate) if 0 < s.rate < 1 else 10)), []
    if isinstance(s, S.piecewise_constant | S.piecewise_interpolate):
        knots = sorted(int(k) for k in s.boundaries_and_values)
        return (knots[-1] if knots else 0), knots
    if isinstance(s, S.warmup):
        n, knots = inner(s.then)
        return int(s.steps) + n, [int(s.steps), *(int(s.steps) + k for k in knots)]
    if isinstance(s, S.join):
        bounds = [int(b) for b in s.boundaries]
        knots = list(bounds)
        for start, t in zip([0, *bounds], s.schedules, strict=False):
            knots += [start + k for k in inner(t)[1]]
        # the last schedule starts at the last boundary (at 0 where there is none)
        return (bounds[-1] if bounds else 0) + inner(s.schedules[-1])[0], sorted(set(knots))
    if isinstance(s, S.sgdr):
        ends = list(itertools.accumulate(int(s.steps * s.mult**i) for i in range(3)))
        return ends[-1], ends
    if isinstance(s, S.cyclic):
        down = s.steps_up if s.steps_down is None else s.steps_down
        period = int(s.steps_up + down)
        return 2 * period, [int(s.steps_up), period, period + int(s.steps_up), 2 * period]
    if isinstance(s, S.wsd):
        knots = list(itertools.accumulate(int(x) for x in (s.warmup, s.stable, s.decay)))
        return knots[-1], knots
    if isinstance(s, S.inverse_sqrt):
        return int(100 * s.timescale), []
    if isinstance(s, S.product):
        parts = [inner(f) for f in s.factors]
        return max((n for n, _ in parts), default=0), sorted({k for _, ks in parts for k in ks})
    if isinstance(s, S.bias_correction):
        return (round(5 / (1 - s.beta)) if s.beta < 1 else 0), []
    return 1000, []


def _step_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"steps are integers, as 0,100,1000; got {text!r}") from None
    if not out or min(out) < 0:
        raise UsageError(f"steps are integers >= 0, as 0,100,1000; got {text!r}")
    return out


def add_schedule_parser(sub: Any) -> None:
    s = sub.add_parser(
        "schedule",
        help="evaluate (and draw) a schedule expression, e.g. 'warmup(1000, cosine(3e-4, "
             "100_000))'",
        description=(
            "Build the schedule that EXPRESSION writes with uniopt's schedules ("
            + ", ".join(parse_.SCHEDULES) + "; positional or keyword arguments, nested, as in "
            "Python; nothing is evaluated), and print its value at a few steps (the value the "
            "update after that many updates sees)."
        ),
    )
    s.add_argument("expression", type=_usage(parse_.schedule, "schedule"), metavar="EXPRESSION",
                   help="e.g. 'warmup(1000, cosine(3e-4, 100_000))' or "
                        "'wsd(peak=1e-3, warmup=100, stable=800, decay=100)'")
    s.add_argument("--steps", type=_usage(_step_list, "step list"), default=None,
                   metavar="STEPS", help="comma-separated steps to print the value at "
                                         "(default: 0 to the horizon in ten even steps, and "
                                         "the steps where the schedule changes course)")
    s.add_argument("--until", type=_positive(int, "a positive integer"), default=None,
                   metavar="N", help="the horizon: steps drawn and printed run from 0 to N "
                                     "(default: guessed from the schedule, e.g. the warm-up "
                                     "plus the decay)")
    s.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw the schedule over 0..N to FILE.png (needs matplotlib: "
                        "uniopt[plot])")
    s.add_argument("--log", action="store_true", help="a log scale for the values in the plot")
    s.add_argument("--json", action="store_true", help="print the values as JSON")
    s.set_defaults(func=_cmd_schedule)


def _cmd_schedule(args: argparse.Namespace) -> int:
    sched = args.expression
    end, knots = horizon(sched)
    until = args.until if args.until is not None else max(10, end)
    steps = args.steps
    if steps is None:  # ten even steps and the knots up to the horizon
        even = [round(until * i / 10) for i in range(11)]
        steps = sorted({*even, *(k for k in knots if 0 <= k <= until)})
    if args.plot is not None:
        from . import plots

        plots.require(args.plot)
    try:
        values = [float(sched(k)) for k in steps]
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise UsageError(f"{sched!r}: {e}") from None
    if args.plot is not None:
        last = max(until, *steps)
        grid = np.linspace(0, last, min(last + 1, 2001)).round().astype(int)
        grid = np.unique(np.concatenate([grid, [k for k in knots if k <= last], steps]))
        try:
            curve = [float(sched(int(k))) for k in grid]
        except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
            raise UsageError(f"{sched!r}: {e}") from None
        try:
            fig = plots.schedule_figure(grid, curve, steps, values, repr(sched), log=args.log)
        except ValueError as e:
            raise UsageError(str(e)) from None
        plots.save(fig, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        doc = {"schedule": repr(sched), "until": until,
               "values": [{"step": k, "value": v} for k, v in zip(steps, values, strict=True)]}
        print(json.dumps(_finite(doc), indent=2, allow_nan=False))
        return 0
    print(repr(sched))
    width = max(len("step"), *(len(f"{k:,}") for k in steps))
    print(f"{'step':>{width}}  value")
    for k, v in zip(steps, values, strict=True):
        print(f"{k:>{width},}  {v:.6g}")
    return 0


def add_rules_parser(sub: Any) -> None:
    r = sub.add_parser(
        "rules",
        help=("every rule uniopt has (the README's table, the site's rules/ pages), or one "
              "rule's entry and docstring"),
        description=(
            "The registry of rules (uniopt.registry): with no NAME, the table of every rule "
            "(family, paper, the implementations its tests hold it to, state slots, notes); "
            "with NAME, that rule's entry and its docstring."
        ),
    )
    r.add_argument("name", nargs="?", default=None, metavar="NAME", help="one rule, e.g. adamw")
    r.add_argument("--json", action="store_true", help="print the entries as JSON")
    r.set_defaults(func=_cmd_rules)


def _cmd_rules(args: argparse.Namespace) -> int:
    import inspect

    from .. import registry

    if args.name is None:
        if args.json:
            print(json.dumps([registry.as_dict(e) for e in registry.entries().values()],
                             indent=2, ensure_ascii=False))
        else:
            print(registry.table())
        return 0
    try:
        e = registry.entry(args.name)
    except KeyError as err:
        print(f"uniopt rules: {err.args[0]}", file=sys.stderr)
        return 2
    doc = registry.as_dict(e)
    if args.json:
        print(json.dumps({**doc, "doc": inspect.getdoc(e.rule) or ""}, indent=2,
                         ensure_ascii=False))
        return 0
    for k, v in doc.items():
        shown = ", ".join(map(str, v)) if isinstance(v, list) else v
        print(f"{k + ':':<15}{shown if shown not in ('', None) else '-'}")
    print()
    print(inspect.getdoc(e.rule) or "")
    return 0


def _assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value read as compare's ``--rules`` reads one (:func:`parse.value`):
    a number, ``True``/``False``/``None``, a tuple, a schedule call (``cosine(1e-3, 100)``) or
    else the text itself."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), parse_.value(value)
    except UsageError as e:  # a misspelled schedule, or one with bad arguments
        raise argparse.ArgumentTypeError(str(e)) from None


_assignment.__name__ = "KEY=VALUE"


def add_conventions_parsers(sub: Any) -> None:
    from .. import conventions
    from ..base import FRAMEWORKS

    t = sub.add_parser(
        "translate",
        help="rewrite a rule from one framework's convention into another's",
        description=(
            "Build RULE as the --from framework writes it (with the KEY=VALUE hyperparameters), "
            "rewrite it in the --to framework's convention, and print the target rule, whether "
            "it is exact, under which conditions, and why (uniopt.translate)."
        ),
    )
    # (no choices=: a rule of one form is a rule, and translate's message says why it has
    # nothing to translate, where argparse's would call it an invalid choice)
    t.add_argument("rule", metavar="RULE",
                   help=f"one of {', '.join(conventions.translatable())} (a rule of one form, "
                        "lamb, ftrl and the others without conventions, has nothing to "
                        "translate)")
    t.add_argument("hyper", nargs="*", type=_assignment, metavar="KEY=VALUE",
                   help="hyperparameters of the source rule, e.g. lr=1e-3 weight_decay=1e-2")
    t.add_argument("--from", dest="source", choices=FRAMEWORKS, default=None,
                   help="the framework the rule is written in (default: the rule's default "
                        "convention, uo.RULE().convention)")
    t.add_argument("--to", dest="target", choices=FRAMEWORKS, required=True,
                   help="the framework to rewrite it in")
    t.add_argument("--set", dest="options", action="append", type=_assignment, default=[],
                   metavar="KEY=VALUE", help="fix an option of the target, e.g. couple_lr=False")
    t.add_argument("--json", action="store_true", help="print the translation as JSON")
    # (its parser: a KEY=VALUE word after the options is read in _main, and an error in it
    # is translate's, with translate's usage)
    t.set_defaults(func=_cmd_translate, extra=[], parser=t)
    c = sub.add_parser(
        "conventions",
        help="print or write the conventions page (docs/conventions.md)",
        description="The conventions page, rendered from uniopt.conventions (uniopt's data).",
    )
    c.add_argument("--write", metavar="PATH", default=None,
                   help="write the page to PATH instead of printing it")
    c.set_defaults(func=_cmd_conventions)


def _cmd_translate(args: argparse.Namespace) -> int:
    from .. import conventions

    try:
        if args.rule not in conventions.rules():
            known = conventions.translatable()
            raise ValueError(f"unknown rule {args.rule!r}{did_you_mean(args.rule, known)} "
                             f"(choose from {', '.join(known)})")
        for what, pairs in (("", [*args.hyper, *args.extra]), ("--set ", args.options)):
            twice = parse_.given_twice([k for k, _ in pairs])
            if twice:  # (as compare says of a rule's hyperparameters)
                raise ValueError(f"{what}{twice} given twice")
        rule = conventions.build(args.rule, args.source, **dict([*args.hyper, *args.extra]))
        tr = conventions.translate(rule, args.source, args.target, **dict(args.options))
    except (ValueError, TypeError) as e:
        # (the function's own messages say "translate: ", for a caller in Python)
        print(f"uniopt translate: {str(e).removeprefix('translate: ')}", file=sys.stderr)
        return 2
    if args.json:
        doc = {"rule": conventions.call(tr.rule), "source": tr.source, "target": tr.target,
               "exact": tr.exact, "conditions": tr.conditions, "explanation": tr.explanation,
               "state": tr.state}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(tr)
    return 0


def _cmd_conventions(args: argparse.Namespace) -> int:
    from .. import conventions

    text = conventions.page()
    if args.write is None:
        # (the page as --write writes it: `uniopt conventions > docs/conventions.md` too)
        sys.stdout.write(text)
        return 0
    try:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"cannot write {args.write}: {e.strerror or e}") from None
    print(f"wrote {args.write}", file=sys.stderr)
    return 0


def _bench_rules(text: str) -> list[str]:
    """``all`` (every rule of the registry) or a list of registry names."""
    from .. import registry

    if text.strip() == "all":
        return registry.names()
    return _names("rule", registry.names())(text)


_bench_rules.__name__ = "rule list"


def add_bench_parser(sub: Any) -> None:
    from . import bench

    b = sub.add_parser(
        "bench",
        help="one optimizer step against the memory-bandwidth floor and torch.optim / optax",
        # (the module's first paragraph, its reST literals as a terminal shows them)
        description=(bench.__doc__ or "").strip().split("\n\n")[0].replace("``", "`"),
    )
    b.add_argument(
        "--workloads",
        type=_names("workload", list(bench.WORKLOADS), fold=True),
        default=None,
        help=("S1: an MLP 20-64-64-3 (6 tensors), S2: 50 tensors of 1K-64K, W1: 1 x 16.8M, "
              "W2: 1,000 x 16K, W3: ResNet-50's 161 tensors, W4: 10,000 x 100 (default: all, "
              "or none when --sizes is given)"),
    )
    b.add_argument(
        "--sizes",
        type=_usage(_sizes, "size list"),
        default=None,
        metavar="SIZES",
        help=("workloads of your own, comma-separated COUNTxSIZE (COUNT tensors of SIZE "
              "elements) or COUNTxROWSxCOLS (matrices), e.g. 500x4096,1x1000000,24x1024x1024; "
              "only these run unless --workloads is given"),
    )
    b.add_argument(
        "--rules",
        type=_bench_rules,
        default=["adam"],
        help=("'all', or comma-separated names of uniopt rules (`uniopt rules`); a rule whose "
              "parts are not all elementwise runs without a floor, one that reads the loss is "
              "reported as skipped (default: adam)"),
    )
    b.add_argument(
        "--implementations",
        type=_names("implementation", list(bench.IMPLEMENTATIONS)),
        default=list(bench.IMPLEMENTATIONS),
        help="comma-separated (default: all of them; a row whose library is not installed "
        "is skipped, and says so)",
    )
    b.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="of the params and gradients (bfloat16: the torch and JAX rows)",
    )
    b.add_argument(
        "--device",
        default="cpu",
        help=("where the torch rows' tensors live, e.g. cuda (default: cpu); off the CPU only "
              "the torch rows run, each step synchronised, against a copy's bandwidth there"),
    )
    b.add_argument("--repeats", type=_positive(int, "a positive integer"), default=10,
                   help="timed steps per implementation, after 2 warm-up steps; the median is "
                        "reported (default: 10)")
    b.add_argument(
        "--slow", action="store_true", help="also run optax + jit on W4 (minutes to compile)"
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw each implementation's ratio to the floor as bars, to FILE.png "
                        "(needs matplotlib: uniopt[plot])")
    b.set_defaults(func=_cmd_bench)


def _device_problem(device: str) -> str | None:
    """Why torch cannot time steps on ``device`` (None: it can)."""
    try:
        import torch
    except ImportError:
        return "the torch rows need torch (pip install torch)"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as e:
        return str(e).splitlines()[0]
    if kind == "meta":
        return "meta tensors hold no numbers: nothing to time"
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as e:  # (an unavailable CUDA raises AssertionError)
        return f"torch has no such device here ({str(e).splitlines()[0]})"
    return None


def _sizes(text: str) -> dict[str, list[tuple[int, ...]]]:
    """``COUNTxSIZE[,COUNTxSIZE...]``: a workload named by its text for each; COUNTxROWSxCOLS
    for matrices (Muon's)."""
    out: dict[str, list[tuple[int, ...]]] = {}
    for piece in text.split(","):
        name = piece.strip().lower()
        try:
            count, *shape = (int(x) for x in name.split("x"))
        except ValueError:
            shape = []
        if len(shape) not in (1, 2):
            raise UsageError("sizes are COUNTxSIZE or COUNTxROWSxCOLS, e.g. 500x4096 or "
                             f"24x1024x1024; got {piece!r}")
        if count < 1 or min(shape) < 1:
            raise UsageError(f"COUNT and SIZE must be positive, got {piece!r}")
        out[name] = [tuple(shape)] * count
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    shapes: dict[str, list[tuple[int, ...]]] = dict(args.sizes or {})
    workloads = list(args.workloads or ([] if shapes else bench.WORKLOADS)) + list(shapes)
    if args.plot is not None:
        from . import plots

        plots.require(args.plot)
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    rules = []
    for name in args.rules:
        why = bench.skip_reason(name)
        if why is None:
            rules.append(name)
        else:
            print(f"uniopt bench: {name} skipped: {why}", file=sys.stderr)
    if not rules:
        print("uniopt bench: none of the rules takes a step from gradients alone",
              file=sys.stderr)
        return 2
    if args.plot is not None and not any(r in bench.TRAFFIC for r in rules):
        # (the figure draws each row's ratio to the floor: it would be empty)
        raise UsageError(f"--plot: nothing to plot: none of {', '.join(rules)} has a "
                         "memory-bandwidth floor (their parts are not all elementwise)")
    if args.device != "cpu":
        why = _device_problem(args.device)
        if why is not None:
            print(f"uniopt bench: --device {args.device}: {why}", file=sys.stderr)
            return 2
    bw, rows = bench.run(
        workloads, rules, args.implementations, args.repeats, shapes, log, args.slow,
        args.dtype, args.device,
    )
    if not rows:  # (each skipped, and said why: an empty table would read as a result)
        print("uniopt bench: nothing was measured: every implementation was skipped for these "
              "workloads, rules and dtype (the lines above say why)", file=sys.stderr)
        return 2
    drawn = args.plot is not None and any(r.floor_ms is not None for r in rows)
    if drawn:
        plots.save(plots.bench_figure(bw, rows, args.implementations), args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    elif args.plot is not None:  # (each row with a floor was skipped, and said why)
        print(f"uniopt bench: --plot: nothing to plot: no row measured has a floor; "
              f"{args.plot} not written", file=sys.stderr)
    print(bench.to_json(bw, rows) if args.json
          else bench.table(bw, rows, args.device, args.implementations))
    return 2 if args.plot is not None and not drawn else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    specs = args.rules or [RuleSpec(n) for n in RULES]
    # (--problems repeated: the same problem in two of them runs once, as in one)
    problems = _distinct(args.problems or [PROBLEMS[n] for n in DEFAULT_PROBLEMS])
    if args.plot is not None:
        from . import plots

        plots.require(args.plot)  # before the runs, not after
    total = len(specs) * len(problems) * len(args.seeds) * args.steps
    bar = Progress(total, enabled=args.progress and sys.stderr.isatty())
    results = compare(specs, problems, args.steps, args.seeds, args.tol, args.lr, bar,
                      track=args.plot is not None)
    if args.plot is not None:
        plots.save(plots.compare_figure(results, {p.name: p for p in problems}), args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        doc = {
            "settings": {
                "rules": [s.label for s in specs],
                "problems": [p.name for p in problems],
                "steps": args.steps,
                "seeds": args.seeds,
                "tol": args.tol,
                "lr": args.lr,
            },
            "results": [r.as_dict() for r in results],
        }
        print(json.dumps(_finite(doc), indent=2, allow_nan=False))
        return 0
    for p in problems:
        minimum = "unknown" if p.optimum is None else f"{p.optimum:.10g}"
        print(f"{p.name}: {p.description}; minimum {minimum}")
    seeds = ",".join(map(str, args.seeds))
    print(f"{args.steps} updates from seed{'s' if len(args.seeds) > 1 else ''} {seeds}\n")
    print(format_table(results, args.tol))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Usage errors print argparse's message to stderr and return 2 instead of raising; output cut
    short by its reader (``uniopt rules | head -1``) returns 141 with nothing printed.
    """
    try:
        result = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # stdout pointed at /dev/null, so that the interpreter's own flush at exit finds no
        # pipe to fail on. 141 = 128 + SIGPIPE, what the shell reports for cat, yes or any tool
        # that SIGPIPE stops: under `set -o pipefail` the pipeline fails alike, and a caller
        # can tell that the output was cut short, which 0 would hide
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return result


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    commands = parser.get_default("commands")
    # the command is the first word that is no option (uniopt's own take no value)
    command = next((w for w in (sys.argv[1:] if argv is None else argv)
                    if not w.startswith("-")), None)
    try:
        if command is not None and command not in commands:
            # (argparse lists the commands; the closest it names only from Python 3.14 on)
            parser.error(f"unknown command {command!r}{did_you_mean(command, commands)} "
                         f"(choose from {', '.join(commands)})")
        # KEY=VALUE words may follow options (`translate adamw --to flux lr=1e-3`): argparse
        # leaves them over, and the subcommand that takes them (``extra``) parses them
        args, extra = parser.parse_known_args(argv)
        if extra and not hasattr(args, "extra"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        for word in extra:
            try:
                args.extra.append(_assignment(word))
            except argparse.ArgumentTypeError as e:
                args.parser.error(f"argument KEY=VALUE: {e}")
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    try:
        result: int = args.func(args)
    except UsageError as e:
        print(f"uniopt {args.command}: {e}", file=sys.stderr)
        return 2
    return result

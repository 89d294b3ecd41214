"""The ``uniopt`` command.

``uniopt compare`` runs rules on the built-in problems (:mod:`uniopt.problems`) with the
functional API and prints, for each pair, the final loss, its gap to the known minimum, the
number of updates after which the gap first fell to ``--tol``, and the time of one
``uniopt.update_`` call. Subcommands are argparse sub-parsers, so more can be added beside it.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import engine
from ..base import Transform
from ..rules.adadelta import adadelta
from ..rules.adagrad import adagrad
from ..rules.adam import adam, adamw, optimistic_adam
from ..rules.rmsprop import rmsprop
from ..rules.sgd import sgd
from .problems import PROBLEMS, Problem

# Every rule as built for the comparison; only lr varies by problem. Momentum 0.9 for the
# two SGD variants (plain SGD is not interesting next to the adaptive rules); everything else
# is the rule's own default, adamw's decoupled weight_decay=1e-2 included, so adamw settles at
# the minimum of a slightly different problem and shows a small gap.
RULES: dict[str, Callable[[float], Transform]] = {
    "sgd": lambda lr: sgd(lr=lr, momentum=0.9),
    "nesterov": lambda lr: sgd(lr=lr, momentum=0.9, nesterov=True),
    "adagrad": lambda lr: adagrad(lr=lr),
    "rmsprop": lambda lr: rmsprop(lr=lr),
    "adadelta": lambda lr: adadelta(lr=lr),
    "adam": lambda lr: adam(lr=lr),
    "amsgrad": lambda lr: adam(lr=lr, amsgrad=True),
    "adamw": lambda lr: adamw(lr=lr),
    "optimistic_adam": lambda lr: optimistic_adam(lr=lr),
}

# Learning rates picked by hand, once: for each problem and rule, a value from the grid
# 1e-4, 3e-4, ..., 1, 3 that did well over 2000 steps from seeds 0-2, a notch below where runs
# start to oscillate or diverge. Not tuned per seed, and not the best possible; adadelta keeps
# its own lr=1.0 throughout (the point of that rule). torch's defaults would leave most rules
# crawling along Rosenbrock's valley.
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
}
FALLBACK_LR = 1e-3  # for a problem added to PROBLEMS without a row above


@dataclass(frozen=True)
class Result:
    problem: str
    rule: str
    lr: float
    steps: int
    initial_loss: float
    final_loss: float | None  # None when the run diverged
    optimum: float
    steps_to_tol: int | None  # updates applied when the gap first was <= tol
    diverged_at: int | None  # updates applied when the loss first was not finite
    us_per_update: float

    @property
    def gap(self) -> float | None:
        return None if self.final_loss is None else self.final_loss - self.optimum

    def as_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "rule": self.rule,
            "lr": self.lr,
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


def run_one(problem: Problem, rule: str, lr: float, steps: int, seed: int, tol: float) -> Result:
    """``steps`` updates of ``rule`` on ``problem`` from ``problem.init(seed)``, in place."""
    params = problem.init(seed)
    state = engine.setup(RULES[rule](lr), params)
    loss = initial = problem.loss(params)
    hit = 0 if loss - problem.optimum <= tol else None
    diverged_at = None
    spent = 0.0
    done = 0
    # a diverging run overflows on its way to inf/nan; that is reported, not warned about
    with np.errstate(all="ignore"):
        for k in range(1, steps + 1):
            grads = problem.grad(params)
            t0 = time.perf_counter()
            state = engine.update_(state, params, grads)
            spent += time.perf_counter() - t0
            done = k
            loss = problem.loss(params)
            if not math.isfinite(loss):
                diverged_at = k
                break
            if hit is None and loss - problem.optimum <= tol:
                hit = k
    return Result(
        problem=problem.name,
        rule=rule,
        lr=lr,
        steps=steps,
        initial_loss=initial,
        final_loss=None if diverged_at is not None else loss,
        optimum=problem.optimum,
        steps_to_tol=hit,
        diverged_at=diverged_at,
        us_per_update=spent / max(done, 1) * 1e6,
    )


def compare(
    rules: Sequence[str],
    problems: Sequence[str],
    steps: int,
    seed: int,
    tol: float,
    lr: float | None = None,
) -> list[Result]:
    return [
        run_one(PROBLEMS[p], r, default_lr(p, r) if lr is None else lr, steps, seed, tol)
        for p in problems
        for r in rules
    ]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def format_table(results: Sequence[Result], tol: float) -> str:
    """A plain-text table, one block of rows per problem."""
    head = ("problem", "rule", "lr", "final loss", "gap", f"steps to {tol:g}", "us/update")
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.diverged_at is not None:
            loss, gap = "diverged", f"at step {r.diverged_at}"
        else:
            loss, gap = _fmt(r.final_loss), _fmt(r.gap)
        steps = "-" if r.steps_to_tol is None else str(r.steps_to_tol)
        rows.append((r.problem, r.rule, f"{r.lr:g}", loss, gap, steps, f"{r.us_per_update:.1f}"))
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


def _names(kind: str, known: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of ``known``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} named in {text!r}")
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {kind}{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                f"choose from {', '.join(known)}"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniopt", description="uniopt: one optimizer library for every array framework."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmp = sub.add_parser(
        "compare",
        help="run rules on built-in problems and tabulate how far and how fast they get",
        description=(
            "Run each rule on each problem with uniopt.setup + uniopt.update_ and report the "
            "final loss, its gap to the known minimum, the updates needed to bring the gap to "
            "TOL and the wall time of one update. Learning rates are hand-picked per problem "
            "and rule (see uniopt.tools.cli.DEFAULT_LR), not tuned per seed."
        ),
    )
    cmp.add_argument(
        "--rules",
        type=_names("rule", list(RULES)),
        default=list(RULES),
        help=f"comma-separated, from {','.join(RULES)} (default: all)",
    )
    cmp.add_argument(
        "--problems",
        type=_names("problem", list(PROBLEMS)),
        default=list(PROBLEMS),
        help=f"comma-separated, from {','.join(PROBLEMS)} (default: all)",
    )
    cmp.add_argument(
        "--steps",
        type=_positive(int, "a positive integer"),
        default=2000,
        help="updates per run (default: 2000)",
    )
    cmp.add_argument("--seed", type=int, default=0, help="seed of the starting points (default: 0)")
    cmp.add_argument(
        "--tol",
        type=_positive(float, "a positive number"),
        default=1e-6,
        help="gap to the minimum that counts as solved (default: 1e-6)",
    )
    cmp.add_argument(
        "--lr",
        type=_positive(float, "a positive number"),
        default=None,
        help="one learning rate for every run, in place of the hand-picked ones",
    )
    cmp.add_argument("--json", action="store_true", help="print the results as JSON")
    cmp.set_defaults(func=_cmd_compare)
    add_bench_parser(sub)
    add_conventions_parsers(sub)
    add_rules_parser(sub)
    return parser


def add_rules_parser(sub: Any) -> None:
    r = sub.add_parser(
        "rules",
        help="every rule uniopt has (the README's table), or one rule's entry and docstring",
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
    """``KEY=VALUE``, the value a Python literal (``1e-3``, ``(0.9, 0.99)``, ``False``) or else
    the text itself."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return key.strip(), parsed


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
    t.add_argument("rule", choices=list(conventions.rules()), metavar="RULE",
                   help=f"one of {', '.join(conventions.rules())}")
    t.add_argument("hyper", nargs="*", type=_assignment, metavar="KEY=VALUE",
                   help="hyperparameters of the source rule, e.g. lr=1e-3 weight_decay=1e-2")
    t.add_argument("--from", dest="source", choices=FRAMEWORKS, default="torch",
                   help="the framework the rule is written in (default: torch)")
    t.add_argument("--to", dest="target", choices=FRAMEWORKS, required=True,
                   help="the framework to rewrite it in")
    t.add_argument("--set", dest="options", action="append", type=_assignment, default=[],
                   metavar="KEY=VALUE", help="fix an option of the target, e.g. couple_lr=False")
    t.add_argument("--json", action="store_true", help="print the translation as JSON")
    t.set_defaults(func=_cmd_translate, extra=[])
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
        rule = conventions.build(args.rule, args.source, **dict([*args.hyper, *args.extra]))
        tr = conventions.translate(rule, args.source, args.target, **dict(args.options))
    except (ValueError, TypeError) as e:
        print(f"uniopt translate: {e}", file=sys.stderr)
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
        print(text)
        return 0
    with open(args.write, "w", encoding="utf-8") as f:
        f.write(text)
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
        description=(bench.__doc__ or "").strip().split("\n\n")[0],
    )
    b.add_argument(
        "--workloads",
        type=_names("workload", list(bench.WORKLOADS)),
        default=list(bench.WORKLOADS),
        help=("S1: an MLP 20-64-64-3 (6 tensors), S2: 50 tensors of 1K-64K, W1: 1 x 16.8M, "
              "W2: 1,000 x 16K, W3: ResNet-50's 161 tensors, W4: 10,000 x 100"),
    )
    b.add_argument(
        "--sizes",
        default=None,
        help="a workload of your own: COUNTxSIZE, e.g. 500x4096 (added as 'custom')",
    )
    b.add_argument(
        "--rules",
        type=_bench_rules,
        default=["adam"],
        help=("'all', or comma-separated names of uniopt rules (`uniopt rules`); a rule whose "
              "parts are not all elementwise is reported as skipped (default: adam)"),
    )
    b.add_argument(
        "--implementations",
        type=_names("implementation", list(bench.IMPLEMENTATIONS)),
        default=list(bench.IMPLEMENTATIONS),
        help="comma-separated (default: every one installed)",
    )
    b.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="of the params and gradients (bfloat16: the torch and JAX rows)",
    )
    b.add_argument("--repeats", type=_positive(int, "a positive integer"), default=10)
    b.add_argument(
        "--slow", action="store_true", help="also run optax + jit on W4 (minutes to compile)"
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    shapes: dict[str, list[tuple[int, ...]]] = {}
    workloads = list(args.workloads)
    if args.sizes:
        try:
            count, size = (int(x) for x in args.sizes.lower().split("x"))
        except ValueError:
            print(f"uniopt bench: --sizes must be COUNTxSIZE, got {args.sizes!r}", file=sys.stderr)
            return 2
        shapes["custom"] = [(size,)] * count
        workloads.append("custom")
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    rules = []
    for name in args.rules:
        why = bench.skip_reason(name)
        if why is None:
            rules.append(name)
        else:
            print(f"uniopt bench: {name} skipped: {why}", file=sys.stderr)
    if not rules:
        print("uniopt bench: none of the rules is elementwise", file=sys.stderr)
        return 2
    bw, rows = bench.run(
        workloads, rules, args.implementations, args.repeats, shapes, log, args.slow,
        args.dtype,
    )
    print(bench.to_json(bw, rows) if args.json else bench.table(bw, rows))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    results = compare(args.rules, args.problems, args.steps, args.seed, args.tol, args.lr)
    if args.json:
        doc = {
            "settings": {
                "rules": args.rules,
                "problems": args.problems,
                "steps": args.steps,
                "seed": args.seed,
                "tol": args.tol,
                "lr": args.lr,
            },
            "results": [r.as_dict() for r in results],
        }
        print(json.dumps(doc, indent=2, allow_nan=False))
        return 0
    for name in args.problems:
        p = PROBLEMS[name]
        print(f"{name}: {p.description}; minimum {p.optimum:.10g}")
    print(f"{args.steps} updates from seed {args.seed}\n")
    print(format_table(results, args.tol))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Usage errors print argparse's message to stderr and return 2 instead of raising.
    """
    parser = build_parser()
    try:
        # KEY=VALUE words may follow options (`translate adamw --to flux lr=1e-3`): argparse
        # leaves them over, and the subcommand that takes them (``extra``) parses them
        args, extra = parser.parse_known_args(argv)
        if extra and not hasattr(args, "extra"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        for word in extra:
            try:
                args.extra.append(_assignment(word))
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument KEY=VALUE: {e}")
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    result: int = args.func(args)
    sys.stdout.flush()
    return result

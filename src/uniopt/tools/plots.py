"""The pictures of ``uniopt compare --plot``, ``uniopt schedule --plot`` and ``uniopt bench
--plot``, drawn with matplotlib (the optional extra ``plot``: ``pip install 'uniopt[plot]'``).

Each figure is built as a :class:`matplotlib.figure.Figure` on its own, without pyplot, so
nothing global changes and no display is needed; :func:`save` writes it as a PNG. The lines a
test counts carry a ``gid``: ``"curve"`` (a loss curve or a schedule), ``"path"`` (a run's
points over the contours of a 2-D problem).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .parse import UsageError

if TYPE_CHECKING:
    from .bench import Row

# cli.Result, as the figures read it (cli imports this module, not the other way round)
Result = Any

EXTRA = "plot"


def require(path: str | None = None) -> None:
    """A UsageError naming the extra to install when matplotlib is missing, or saying why
    ``path`` cannot be written where its directory is missing or not writable: before a
    command's runs, not after them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            f"--plot needs matplotlib, which is not installed: pip install 'uniopt[{EXTRA}]' "
            "(or pip install matplotlib)"
        ) from None
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"cannot write {path}: there is no directory {folder}")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write {path}: {folder} is not writable")


def _figure(width: float, height: float) -> Any:
    require()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Any, path: str) -> None:
    """``fig`` at ``path``, in the format its extension names where matplotlib writes it
    (``.pdf``, ``.svg``), else as a PNG; a UsageError if it cannot be written there."""
    ext = str(path).rpartition(".")[2].lower() if "." in str(path) else ""
    try:
        fig.savefig(path, dpi=100,
                    format=ext if ext in fig.canvas.get_supported_filetypes() else "png")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _box(points: np.ndarray, anchors: np.ndarray) -> tuple[float, float, float, float]:
    """A window over ``points`` (the paths of the runs that did not blow up) that keeps the
    start and the minimum in view."""
    pts = np.concatenate([anchors, points[np.all(np.isfinite(points), axis=1)]])
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.15 * np.maximum(hi - lo, 0.5)
    return lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1]


def _contours(ax: Any, problem: Any, results: Sequence[Result], colors: Mapping[str, Any]) -> None:
    start = np.array(results[0].path[0])
    argmin = getattr(problem, "argmin", None)
    anchors = [start]
    if argmin is not None:
        anchors.append(np.ravel(np.asarray(argmin[0] if isinstance(argmin, list) else argmin)))
    # the window follows the runs that ended below their start; one that blew up leaves it
    settled = [np.asarray(r.path, dtype=float) for r in results
               if r.final_loss is not None and r.final_loss <= r.initial_loss]
    points = np.concatenate(settled) if settled else np.empty((0, 2))
    x0, x1, y0, y1 = _box(points, np.array(anchors))
    xs, ys = np.linspace(x0, x1, 120), np.linspace(y0, y1, 120)
    z = np.full((len(ys), len(xs)), np.nan)
    template = problem.init(results[0].seed)
    # a problem of the user's own may be defined on part of the window only (a log of x > 0):
    # where its loss raises or is not finite, the grid has a hole, and no warning
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                try:
                    z[i, j] = problem.loss(_with_point(template, x, y))
                except Exception:
                    pass
    z[~np.isfinite(z)] = np.nan
    if np.isfinite(z).any():
        floor = problem.optimum if problem.optimum is not None else float(np.nanmin(z))
        # log of the gap, so the valley floor shows: the 1e-6 of the range keeps log off 0
        span = float(np.nanmax(z) - np.nanmin(z))
        logz = np.log10(np.maximum(z - floor, 0.0) + 1e-6 * max(span, 1e-12))
        logz = np.ma.masked_invalid(logz)  # (the holes)
        ax.contourf(xs, ys, logz, levels=20, cmap="Greys", alpha=0.55)
        ax.contour(xs, ys, logz, levels=20, colors="0.45", linewidths=0.4)
    for r in results:
        p = np.asarray(r.path, dtype=float)
        ax.plot(p[:, 0], p[:, 1], color=colors[r.rule], lw=1.2, gid="path")
    ax.plot(*start, marker="o", color="black", ms=6, ls="none", label="start")
    if argmin is not None:
        ax.plot(*anchors[1], marker="*", color="gold", mec="black", ms=13, ls="none",
                label="minimum")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{problem.name}: paths", fontsize=10)
    ax.legend(loc="best", fontsize=8)


def _with_point(template: Any, x: float, y: float) -> Any:
    """``template`` (a 2-D problem's params: one leaf of two numbers) holding ``(x, y)``."""
    point = np.array([x, y])
    if isinstance(template, np.ndarray):
        return point.reshape(template.shape)
    if isinstance(template, list) and len(template) == 1:
        return [point.reshape(np.shape(template[0]))]
    if isinstance(template, dict) and len(template) == 1:
        ((k, v),) = template.items()
        return {k: point.reshape(np.shape(v))}
    import optree

    leaves, spec = optree.tree_flatten(template)
    return optree.tree_unflatten(spec, [point.reshape(np.shape(leaves[0]))])


def compare_figure(results: Sequence[Result], problems: Mapping[str, Any]) -> Any:
    """One row per problem: the loss curves (the gap to the minimum where it is known) on a
    log scale, one line per run in the rule's colour; beside them, for a 2-D problem, each
    run's path over the loss's contours."""
    names = list(dict.fromkeys(r.problem for r in results))
    flat = [n for n in names if all(r.path for r in results if r.problem == n)]
    cols = 2 if flat else 1
    fig = _figure(6.0 * cols, 3.8 * len(names))
    grid = fig.add_gridspec(len(names), cols)
    rules = list(dict.fromkeys(r.rule for r in results))
    colors = _colors(rules)
    for row, name in enumerate(names):
        runs = [r for r in results if r.problem == name]
        problem = problems[name]
        ax = fig.add_subplot(grid[row, 0] if name in flat else grid[row, :])
        optimum = problem.optimum
        signed = False
        seen: set[str] = set()
        # a curve is drawn where it is within a thousand times the largest start, and left
        # blank where it is beyond (matplotlib's log scale overflows near 1e300, and a clipped
        # flat line would read as a plateau); a run that diverged ends in a cross at its last
        # point drawn, where one that only passed through such losses and came back goes on
        cap = 1e3 * max(abs(r.losses[0] - (optimum or 0.0)) for r in runs) + 1.0
        for r in runs:
            y = np.asarray(r.losses, dtype=float)
            if optimum is not None:
                # the gap, floored where it reaches rounding (a log scale has no 0)
                y = np.maximum(y - optimum, 1e-16 * max(1.0, abs(optimum)))
            out = ~(np.abs(y) <= cap)  # beyond the cap, or not finite
            y[out] = np.nan
            signed = signed or bool(np.any(y[np.isfinite(y)] <= 0))
            label = r.rule if r.rule not in seen else None
            seen.add(r.rule)
            ax.plot(np.arange(len(y)), y, color=colors[r.rule], lw=1.2, label=label, gid="curve")
            drawn = np.flatnonzero(~out)
            if r.diverged_at is not None and drawn.size:
                k = int(drawn[-1])
                ax.plot([k], [y[k]], marker="x", ms=8, mew=2, color=colors[r.rule],
                        gid="diverged")
        ax.set_yscale("symlog" if signed else "log")
        ax.set_xlabel("update")
        ax.set_ylabel("loss - minimum" if optimum is not None else "loss")
        ax.set_title(f"{name}: {problem.description}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        if name in flat:
            _contours(fig.add_subplot(grid[row, 1]), problem, runs, colors)
    return fig


def schedule_figure(steps: Sequence[int] | np.ndarray, values: Sequence[float],
                    marked: Sequence[int], marked_values: Sequence[float], title: str,
                    log: bool = False) -> Any:
    """The schedule's value against the step, the printed steps marked."""
    if log and not max(values) > 0:
        raise ValueError("--log: the schedule has no positive value to draw on a log axis")
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", lw=1.5, gid="curve")
    ax.plot(marked, marked_values, "o", color="tab:red", ms=4, ls="none", label="printed steps")
    if log:  # (a warm-up from 0: its points at 0 are left out, the rest drawn)
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("step (updates applied)")
    ax.set_ylabel("value")
    ax.set_title(_wrap(title), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def _wrap(text: str, width: int = 90) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def bench_figure(bandwidth: float, rows: Sequence[Row],
                 implementations: Sequence[str] = ()) -> Any:
    """Horizontal bars, one group per (workload, rule), one bar per implementation (in the
    order of ``implementations``, as the table's columns): its time over the floor (1 = memory
    speed), on a log scale with the floor drawn at 1. Rows without a floor (rules whose parts
    are not all elementwise) are left out."""
    from .bench import order

    cell = {(r.workload, r.rule, r.implementation): r.ms / r.floor_ms for r in rows
            if r.floor_ms is not None}
    keys = list(dict.fromkeys(k[:2] for k in cell))
    impls = order(implementations, [k[2] for k in cell])
    colors = _colors(impls)
    height = 0.8 / max(len(impls), 1)
    fig = _figure(8.0, 1.0 + 0.35 * max(len(keys) * len(impls), 3))
    ax = fig.add_subplot()
    for j, impl in enumerate(impls):
        ys, ratios = [], []
        for i, key in enumerate(keys):
            x = cell.get((*key, impl))
            if x is not None:
                ys.append(i + (j - (len(impls) - 1) / 2) * height)
                ratios.append(x)
        bars = ax.barh(ys, ratios, height=height, color=colors[impl], label=impl, gid="bars")
        ax.bar_label(bars, labels=[f"{x:.1f}x" for x in ratios], fontsize=7, padding=2)
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xscale("log")
    every = list(cell.values())
    ax.set_xlim(min(0.5, min(every, default=1.0) / 1.5), max(every, default=1.0) * 3)
    ax.set_yticks(range(len(keys)), [f"{w} {rule}" for w, rule in keys])
    ax.invert_yaxis()
    ax.set_xlabel("time per step / memory-bandwidth floor (1 = memory speed)")
    ax.set_title(f"uniopt bench: floor {bandwidth / 1e9:.1f} GB/s", fontsize=10)
    # below the axes: inside, it would cover the longest bars
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center",
               ncols=min(len(impls), 4), fontsize=8)
    return fig

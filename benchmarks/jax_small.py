"""A jitted step on small models, uniopt against optax, interleaved: ``uniopt bench``'s rows
"optax + jit" and "uniopt + jit" (the same arrays, donation and ``block_until_ready``), run in
alternating rounds in one process so that a noisy machine weighs on both alike.

    python benchmarks/jax_small.py [--workloads S1,S2] [--rules adamw,sgd,adam]
                                   [--rounds 40] [--steps 25]

Prints, per workload and rule, the min and median over rounds of each round's median step (ms)
and uniopt's ratio to optax (of the medians; of the mins). Also the floor under both: a jitted
function of optax's arguments for the rule that returns them untouched (donated: nothing is
copied), the cost of one call with that many arrays. A rule the bench has no optax peer for
is skipped, saying so.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import jax

from uniopt.tools import bench


def _noop(w: bench._Workload, tx: Any) -> Callable[[], Any]:
    """A jitted call of optax's arguments (params, the state of ``tx``, grads) that computes
    nothing."""
    params = [jax.numpy.asarray(p) for p in w.params]
    grads = [[jax.numpy.asarray(g) for g in gs] for gs in w.grads]
    f = jax.jit(lambda p, s, g: (p, s), donate_argnums=(0, 1))
    return bench.donated_steps(f, [params, tx.init(params)], grads, ready=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="S1,S2")
    ap.add_argument("--rules", default="adamw,sgd,adam")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=25)
    a = ap.parse_args()
    print(f"jax {jax.__version__}, {a.rounds} rounds of {a.steps} steps each; ms per step "
          "(min and median over rounds of a round's median)")
    for wname in a.workloads.split(","):
        w = bench._Workload(bench.WORKLOADS[wname])
        for rule in a.rules.split(","):
            tx, uniopt = bench.optax_peer(rule), bench._uniopt_jit(w, rule)
            if tx is None or uniopt is None:
                print(f"{wname} {rule:6s} skipped: the bench has no optax peer for it", flush=True)
                continue
            # (the floor takes the rule's own state: SGD's has half the arrays of Adam's)
            runs = {"no-op": _noop(w, tx), "optax": bench._optax(w, rule), "uniopt": uniopt}
            meds = bench._interleaved(runs, a.rounds, a.steps, warmup=5)
            mn = {k: min(v) for k, v in meds.items()}
            md = {k: statistics.median(v) for k, v in meds.items()}
            print(f"{wname} {rule:6s} " + "  ".join(
                f"{k} {mn[k]:.4f}/{md[k]:.4f}" for k in runs)
                + f"  uniopt/optax {md['uniopt'] / md['optax']:.2f}x median, "
                  f"{mn['uniopt'] / mn['optax']:.2f}x min", flush=True)


if __name__ == "__main__":
    main()

"""Run the optimizer-step benchmark without the CLI: ``python benchmarks/bench.py [options]``.

Same options as ``uniopt bench`` (see ``--help``): the bandwidth floor is measured first, then
uniopt beside torch.optim (for-loop, foreach, fused), optax + jit and naive NumPy, whichever are
installed, on workloads W1-W4; it prints ms per step and the ratio to the floor.
"""

import sys

from uniopt.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

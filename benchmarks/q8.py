"""8-bit state against float32 state: ``python benchmarks/q8.py [repeats] [rules...]``.

For each of the workloads W1-W3 of ``uniopt bench`` (one 16.8M tensor; 1,000 of 16K; ResNet-50's
161 tensors), the median in-place step time of uniopt with ``setup(..., state_dtype="q8")`` and
with float32 state (the compiled CPU loop both), and their ratio. The machine's noise moves the
ratio by a few percent: run it more than once.
"""

import sys

from uniopt.fast import cpu
from uniopt.tools import bench


def main(repeats: int = 20, rules: tuple[str, ...] = ("adam",)) -> None:
    cpu.COMPILE_AFTER = 0
    for wname in ("W1", "W2", "W3"):
        w = bench._Workload(bench.WORKLOADS[wname])
        for rule in rules:
            ms = {}
            for label, dtype in (("float32", None), ("q8", "q8")):
                step = bench._uniopt(w, rule, dtype)
                assert step is not None
                ms[label] = bench._median_ms(step, repeats)
            print(f"{wname} {rule:6s} float32 {ms['float32']:8.2f} ms   q8 {ms['q8']:8.2f} ms"
                  f"   q8/float32 {ms['q8'] / ms['float32']:.2f}x", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, tuple(sys.argv[2:]) or ("adam",))

"""Execution strategies for the engine.

Each strategy runs whole steps for the kinds of arrays it knows, from the plan the engine
resolved (parts, coefficients, slot keys), and returns the new params and slots; or None where
the arrays are not its kind, or a reason where it declined and wrote nothing. The engine tries
them in order, and its reference path (each part's kernel on whole arrays, any library) runs
what none takes: it is the ground truth every strategy is held to, bit for bit.

Today: the multi-tensor path (:mod:`uniopt.fast.foreach`, torch tensors off the CPU: one
``torch._foreach_*`` call per array operation of the rule's kernels, whatever the number of
tensors), then the compiled CPU loop (:mod:`uniopt.fast.cpu`, NumPy arrays and CPU tensors).
``resolve`` is ``functools.partial(engine.resolve, rule, step)``: a strategy reads the step
from its ``args`` (a step counted on the device, by the multi-tensor path).
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

import numpy as np

from ..jitcache import callers_level
from . import cpu, q8
from .options import FORCED


def _foreach(resolve: Any, params: list[Any], *args: Any) -> Any:
    """:func:`uniopt.fast.foreach.step`, imported (with torch) only for torch tensors, and
    called only for those off the CPU or where :data:`FORCED`."""
    torch = sys.modules.get("torch")
    if (torch is None or type(params[0]) is np.ndarray or not isinstance(params[0], torch.Tensor)
            or (params[0].device.type == "cpu" and not FORCED.get())):
        return None
    from . import foreach

    return foreach.step(resolve, params, *args)


STRATEGIES = (_foreach, cpu.step)
# for states kept in 8 bits (setup's state_dtype='q8')
Q8_STRATEGIES = (q8.step,)


class FastPathUnavailable(UserWarning):
    """A strategy could not run a step; the reference path ran it instead."""


_warned: set[str] = set()


# a reason names the first leaf it met ("params leaf 3 is ..."): once per reason, whichever
# leaf (a tree of 18 float64 leaves among float32 ones warned 18 times)
_LEAF = re.compile(r"leaf \d+")


def warn_once(reason: str) -> None:
    key = _LEAF.sub("leaf", reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"uniopt: fast path not used ({reason}); running the reference path, which is "
            "correct but slower. This is reported once per reason.",
            FastPathUnavailable,
            stacklevel=callers_level(),
        )



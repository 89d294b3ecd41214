"""Execution strategies for the engine.

Each strategy runs whole steps for the kinds of arrays it knows, from the plan the engine
resolved (parts, coefficients, slot keys), and returns the new params and slots; or None where
the arrays are not its kind, or a reason where it declined and wrote nothing. The engine tries
them in order, and its reference path (each part's kernel on whole arrays, any library) runs
what none takes: it is the ground truth every strategy is held to, bit for bit.

Today: the compiled CPU loop (:mod:`uniopt.fast.cpu`, NumPy arrays and CPU tensors). A torch
multi-tensor path for other devices plugs in here.
"""

from __future__ import annotations

import warnings

from . import cpu, q8

STRATEGIES = (cpu.step,)
# for states kept in 8 bits (setup's state_dtype='q8')
Q8_STRATEGIES = (q8.step,)


class FastPathUnavailable(UserWarning):
    """A strategy could not run a step; the reference path ran it instead."""


_warned: set[str] = set()


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"uniopt: fast path not used ({reason}); running the reference path, which is "
            "correct but slower. This is reported once per reason.",
            FastPathUnavailable,
            stacklevel=4,
        )

"""Switches the strategies read, in a module of their own: the package and the multi-tensor
strategy both need them, and the package imports that strategy."""

from __future__ import annotations

import contextvars

# whether torch tensors on the CPU take the multi-tensor path too (uniopt.fast.foreach.forced)
FORCED: contextvars.ContextVar[bool] = contextvars.ContextVar("uniopt_foreach", default=False)

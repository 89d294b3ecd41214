"""Putting transforms together."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Elementwise, Transform


@dataclass(frozen=True, init=False)
class chain(Transform):
    """Apply transforms one after another; the output of each is the input of the next.

    ``chain(weight_decay(5e-4), adam(lr=1e-3))`` is torch's ``Adam(weight_decay=5e-4)``.
    Hyperparameters of the members are reached by name through :func:`uniopt.adjust`.
    """

    transforms: tuple[Transform, ...]

    def __init__(self, *transforms: Transform) -> None:
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"chain: argument {i} is not a uniopt transform: {t!r}")
        object.__setattr__(self, "transforms", tuple(transforms))

    def parts(self) -> tuple[Elementwise, ...]:
        out: list[Elementwise] = []
        for t in self.transforms:
            out.extend(t.flat_parts)
        return tuple(out)

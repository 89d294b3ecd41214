"""Gradient centralization (Yong et al., 2020): the update of a weight less its mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import PerLeaf
from .scale import NoCoefficients


@dataclass(frozen=True)
class centralize(PerLeaf):
    """``u <- u - mean(u)`` over every axis but the first, for leaves of two or more
    dimensions (each output unit of a torch weight, each input row of a JAX kernel: the mean
    is over the axes optax's ``centralize`` takes); vectors and scalars pass unchanged.

    >>> import numpy as np, uniopt as uo
    >>> g = [np.array([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0]]), np.array([1.0, 2.0])]
    >>> uo.update(uo.setup(uo.centralize(), g), [np.zeros((2, 3)), np.zeros(2)], g)[1]
    [array([[ 1.,  0., -1.],
           [ 2.,  0., -2.]]), array([-1., -2.])]
    """

    batched: ClassVar[bool] = True
    # a complex leaf's mean is of its complex numbers, over its own axes (as optax's)
    complex_aware: ClassVar[bool] = True

    def coeffs(self, step: Any) -> NoCoefficients:
        return NoCoefficients()

    @staticmethod
    def apply(xp, c, p, u):
        if u.ndim <= 2:  # a batch of vectors or scalars
            return (u,)
        return (u - xp.mean(u, axis=tuple(range(2, u.ndim)), keepdims=True),)

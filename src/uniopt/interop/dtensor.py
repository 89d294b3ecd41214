"""DTensor leaves (``torch.distributed.tensor``): FSDP2's sharded parameters, tensor
parallel's, any placement on any device mesh.

The engine updates each rank's *local* shard (``DTensor.to_local()``, a plain tensor sharing the
DTensor's memory): an elementwise rule needs nothing else, so it runs on the compiled CPU loop
(NumPy views of the local shards) or the reference path, with no communication at all. The
state of a DTensor parameter is DTensors of the parameter's mesh and placements, so
``torch.distributed.checkpoint`` saves it and reshards it on load; a slot of another shape than
its parameter (Adafactor's row and column factors) is whole on every rank, a DTensor replicated
on the parameter's mesh.

What a step communicates, and only where a part needs more than one element:

* a norm (:func:`uniopt.clip_by_global_norm`, :func:`uniopt.clip_by_norm`,
  :func:`uniopt.clip_by_block_rms`): each leaf's local sum of squares (float64), summed over the
  mesh dimensions its tensor is split across, one ``all_reduce`` of a vector of one number per
  leaf per mesh dimension. A replicated dimension is not summed over (every rank holds the
  same numbers there: summing would count them again). On a 2-D mesh (HSDP's
  ``(Replicate(), Shard(0))``, FSDP2 over tensor parallel's ``(_StridedShard(0), Shard(0))``)
  a leaf split across both dimensions is summed over the first, then those totals over the
  second; a leaf on a 1-D sub-mesh (``mesh["dp"]``) over that mesh's dimension alone;
* a per-leaf part (Adafactor's factors, Muon's Newton-Schulz iteration, LAMB's and LARS's trust
  ratios, centralisation...): the whole tensor, all-gathered on every rank (the parameter, the
  update, the slots shaped like the parameter), the part run on it, and each rank's own
  shard of the results kept (no communication). Every rank computes the same numbers, so
  results equal an unsharded run's;
* gradients whose placements differ from their parameter's (a ``Partial`` sum) are
  redistributed to the parameter's placements first.

8-bit state (``state_dtype="q8"``, :mod:`uniopt.quant`): each rank quantises its own shard,
raveled, in blocks of :data:`~uniopt.quant.BLOCK` that never cross a shard's edge, with no
communication. The codes are DTensors laid out as the parameter. The block scales depend on the
local shard's size, so they are no one global tensor: they are a DTensor of one row per shard
(shape: the shards, by ``Shard(0)`` over each mesh dimension the parameter is split across,
``Replicate()`` over the others; then :data:`HEADER` numbers per dimension of the parameter and
the most blocks a shard can have), each row this rank's shard's offset and shape (its header)
and its scales, zeros after them. ``torch.distributed.checkpoint`` saves every row, and a load
into another layout (world size, mesh or placements) is refused: a mesh of another size by
DCP's planner (the scales' shape differs), the same shape by the header (:func:`check_q8`).
Only elementwise rules (norms included) keep 8-bit state on shards.

Whole-tree parts (an optax member, a closure-driven minimizer such as L-BFGS, parameter-free
rules that take dot products over the tree) are refused on sharded leaves with an error.

The engine sees plain tensors (or NumPy views of them); which of them are shards of bigger
tensors is said by a :class:`Sharding` held in :func:`uniopt.backend.sharded`, keyed by the
identity of each array handed to the engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from .. import quant

# numbers in an 8-bit slot's row of scales per dimension of its parameter: the shard's offset
# and length, each as two float32 halves (n // 4096, n % 4096): exact up to 2**36, where one
# float32 is exact only below 2**24
HEADER = 4
_HALF = 4096


def dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor`` where that module is loaded (else None: no DTensor
    can exist, and nothing is imported to find out)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def is_dtensor(x: Any) -> bool:
    t = dtensor_type()
    return t is not None and isinstance(x, t)


def any_dtensor(xs: Iterable[Any]) -> bool:
    t = dtensor_type()
    # (C calls, no generator: a step's Python work is the same whether torch.distributed is
    # loaded or not)
    return t is not None and any(map(isinstance, xs, itertools.repeat(t)))


def local(x: Any) -> Any:
    """The local shard of DTensor ``x`` (a plain tensor sharing its memory); ``x`` itself where
    it is not a DTensor. The DTensor's own tensor, not ``to_local()``'s fresh alias of it:
    plans compare these by identity and memory address at every step."""
    t = dtensor_type()
    return x._local_tensor if t is not None and isinstance(x, t) else x


# a DTensor's own local tensor and placements, read by C calls (a step of FSDP2's 1,000
# shards maps them over every gradient and parameter: a Python call each cost ~1 us a tensor)
_LOCAL = operator.attrgetter("_local_tensor")
_PLACEMENTS = operator.attrgetter("_spec.placements")


def locals_of(xs: list[Any]) -> list[Any]:
    """:func:`local` of each of ``xs``."""
    t = dtensor_type()
    if t is not None and all(map(isinstance, xs, itertools.repeat(t))):
        return list(map(_LOCAL, xs))
    return list(map(local, xs))


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """Where a DTensor leaf lives: its mesh and placements, its global shape and strides, and
    the mesh dimensions it is split across (``dims``)."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dims: tuple[int, ...]

    @classmethod
    def of(cls, t: Any, what: str = "a parameter") -> Spec:
        """The spec of DTensor ``t``; raises for a ``Partial`` placement (a pending sum: no
        rank holds values of its own)."""
        from torch.distributed.tensor import Replicate

        dims = []
        for d, pl in enumerate(t.placements):
            if pl.is_partial():
                raise ValueError(
                    f"uniopt: {what} is a DTensor with placements {t.placements}: a Partial "
                    "placement is a pending sum; redistribute it (Replicate or Shard) first"
                )
            if not isinstance(pl, Replicate):
                dims.append(d)
        return cls(t.device_mesh, tuple(t.placements), tuple(t.shape), tuple(t.stride()),
                   tuple(dims))

    def wrap(self, x: Any) -> Any:
        """Local tensor ``x`` as the DTensor of this spec (no communication, no check). A local
        tensor on another device than the mesh's (FSDP2's CPU offload) stays where it is."""
        import torch
        from torch.distributed.tensor import DTensor

        if x.device.type == self.mesh.device_type:
            return DTensor.from_local(x, self.mesh, self.placements, run_check=False,
                                      shape=torch.Size(self.shape), stride=self.stride)
        # from_local would move x to the mesh's device: built as FSDP2 builds its offloaded
        # parameters instead
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

        meta = TensorMeta(torch.Size(self.shape), self.stride, x.dtype)
        spec = DTensorSpec(self.mesh, self.placements, tensor_meta=meta)
        return DTensor(x, spec, requires_grad=False)

    def gather(self, x: Any) -> Any:
        """The whole tensor whose local shard is ``x`` (an all-gather), on ``x``'s device."""
        if not self.dims:
            return x
        full = self.wrap(x).full_tensor()
        wait = getattr(full, "wait", None)  # an AsyncCollectiveTensor: its value, now
        if wait is not None:
            full = wait()
        return full if full.device == x.device else full.to(x.device)

    def cut(self, full: Any) -> Any:
        """This rank's shard of ``full``, a tensor of the global shape (no communication)."""
        if not self.dims:
            return full
        from torch.distributed.tensor import DTensor, Replicate

        on = full if full.device.type == self.mesh.device_type else full.to(
            self.mesh.device_type)
        rep = DTensor.from_local(on, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)
        out = rep.redistribute(self.mesh, self.placements).to_local()
        return out if out.device == full.device else out.to(full.device)


def replicated(x: Any, like: Any) -> Any:
    """Tensor ``x`` (whole, the same on every rank) as a DTensor replicated on DTensor
    ``like``'s mesh, its memory shared (a slot of another shape than its parameter)."""
    from torch.distributed.tensor import Replicate

    mesh = like.device_mesh
    spec = Spec(mesh, (Replicate(),) * mesh.ndim, tuple(x.shape), tuple(x.stride()), ())
    return spec.wrap(x)


def sharded_like(x: Any, like: Any) -> Any:
    """Whole tensor ``x`` as a DTensor laid out as DTensor ``like``: this rank's shard of it,
    copied (a state loaded from an unsharded checkpoint; no communication)."""
    spec = Spec.of(like)
    return spec.wrap(spec.cut(x.to(local(like).device)).contiguous())


class Shards:
    """The leaves of one engine call that are shards of bigger tensors: ``specs[i]`` for
    leaf ``i`` (None: a leaf whole on this rank). What the engine and the compiled loop ask."""

    def __init__(self, specs: list[Spec | None]) -> None:
        self.specs = specs

    def shape(self, i: int, x: Any) -> tuple[int, ...]:
        """Leaf ``i``'s global shape (``x`` is its local array)."""
        s = self.specs[i]
        return tuple(x.shape) if s is None else s.shape

    def sizes(self, local_sizes: Any) -> Any:
        """The global number of elements of each leaf (int64), from the local ones."""
        return np.array([n if s is None else math.prod(s.shape)
                         for n, s in zip(local_sizes, self.specs, strict=True)], np.int64)

    def sums(self, local_sums: Any) -> Any:
        """Each leaf's sum over the whole tensor (float64), from each rank's sums over its
        shard: one ``all_reduce`` per mesh dimension that some leaf is split across, of the
        sums of those leaves only (replicated dimensions hold the same numbers on every rank,
        and are not summed again)."""
        import torch
        import torch.distributed as dist

        out = np.array(local_sums, dtype=np.float64)
        ndims = max((s.mesh.ndim for s in self.specs if s is not None), default=0)
        # dimension by dimension, in one order on every rank: a leaf split across two is summed
        # over the first, then those totals over the second
        for d in range(ndims):
            groups: dict[Any, list[int]] = {}
            for i, s in enumerate(self.specs):
                if s is not None and d in s.dims:
                    groups.setdefault(s.mesh, []).append(i)
            for mesh, idx in groups.items():
                t = torch.tensor(out[idx], dtype=torch.float64, device=mesh.device_type)
                dist.all_reduce(t, group=mesh.get_group(d))
                out[idx] = t.cpu().numpy()
        return out

    def gather(self, i: int, x: Any) -> Any:
        s = self.specs[i]
        return x if s is None or x is None else s.gather(_tensor(x))

    def cut(self, i: int, full: Any) -> Any:
        s = self.specs[i]
        return full if s is None or full is None else s.cut(full)


def _tensor(x: Any) -> Any:
    """``x`` as a torch tensor (a NumPy view of a local shard: the tensor of its memory)."""
    if isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(x)
    return x


class Sharding:
    """Which arrays handed to the engine are the local shards of which DTensors, by identity
    (the arrays are held here, so no identity is reused while it lives)."""

    def __init__(self, pairs: Iterable[tuple[Any, Spec | None]]) -> None:
        kept = [(x, s) for x, s in pairs if s is not None and s.dims]
        self._held = [x for x, _ in kept]
        self._by_id = {id(x): s for x, s in kept}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def of(self, leaves: list[Any]) -> Shards | None:
        """The :class:`Shards` of ``leaves``; None where none of them is a shard."""
        by_id = self._by_id
        specs = [by_id.get(id(x)) for x in leaves]
        return Shards(specs) if any(s is not None for s in specs) else None


@dataclasses.dataclass
class Local:
    """A step's DTensor leaves as the engine takes them (the functional API's view)."""

    params: list[Any]
    grads: list[Any]
    slots: dict[str, list[Any]]
    specs: list[Spec | None]  # None: a plain tensor (the same on every rank)
    sharding: Sharding

    def wrap(self, xs: list[Any], like: list[Any]) -> list[Any]:
        """Local results as DTensors laid out as ``like`` (a leaf's old value: a DTensor of
        the parameter's layout, or a plain tensor kept plain)."""
        out = []
        for x, old, s in zip(xs, like, self.specs, strict=True):
            if isinstance(old, quant.Q8) and s is not None:
                # a new row of scales: the old one's header, the new scales
                row = local(old.absmax).clone()
                start = HEADER * len(s.shape)
                row[0, start:start + x.absmax.shape[0]] = x.absmax
                out.append(quant.Q8(s.wrap(x.codes), Spec.of(old.absmax, "scales").wrap(row)))
            elif x is None or s is None or not is_dtensor(old):
                out.append(x)
            elif old.placements == s.placements and tuple(old.shape) == s.shape:
                out.append(s.wrap(x))
            else:  # a slot of another shape: replicated
                out.append(Spec.of(old, "a slot").wrap(x))
        return out


def localize(params: list[Any], grads: list[Any], slots: dict[str, list[Any]]) -> Local:
    """The local shards of a step's DTensor params, gradients and slots; a gradient laid out
    otherwise than its parameter (a ``Partial`` sum, a replicated gradient of a sharded
    parameter) is redistributed to the parameter's placements first (communication)."""
    specs: list[Spec | None] = []
    for i, p in enumerate(params):
        specs.append(Spec.of(p, f"params leaf {i}") if is_dtensor(p) else None)
    lps = [local(p) for p in params]
    lgs = [None if g is None else local_grad(g, p) for g, p in zip(grads, params, strict=True)]
    lslots = {k: [None if s is None else _local_slot(s, p)
                  for s, p in zip(v, params, strict=True)] for k, v in slots.items()}
    return Local(lps, lgs, lslots, specs, Sharding(zip(lps, specs, strict=True)))


def _local_slot(s: Any, p: Any) -> Any:
    if isinstance(s, quant.Q8):
        return local_q8(s, p) if is_dtensor(p) else s
    if is_dtensor(s) and any(pl.is_partial() for pl in s.placements):
        raise ValueError(f"uniopt: a state slot is a DTensor with placements {s.placements}")
    return local(s)


def q8_layout(p: Any) -> tuple[Spec, Any]:
    """The layout of the block scales of an 8-bit slot of DTensor ``p`` (module docstring),
    and this rank's header: its shard's offset and shape, float32."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    spec = Spec.of(p)
    mesh = spec.mesh
    # the most blocks a shard can have, the same number on every rank (no communication):
    # each split dimension's length over its mesh dimension's size, rounded up
    most = list(spec.shape)
    for d in spec.dims:
        dim = spec.placements[d].dim
        most[dim] = -(-most[dim] // mesh.size(d))
    width = HEADER * len(spec.shape) + quant.blocks(math.prod(most))
    shape, offset = compute_local_shape_and_global_offset(spec.shape, mesh, spec.placements)
    header = np.array([h for n in (*offset, *shape) for h in divmod(n, _HALF)], np.float32)
    rows = math.prod(mesh.size(d) for d in spec.dims)
    placements = tuple(Shard(0) if d in spec.dims else Replicate() for d in range(mesh.ndim))
    return Spec(mesh, placements, (rows, width), (width, 1), spec.dims), header


def quantised(xp: Any, s: Any, p: Any, signed: bool) -> quant.Q8:
    """Slot ``s`` (a float32 DTensor laid out as DTensor ``p``) in 8 bits: its local shard
    quantised, the codes laid out as ``p``, the scales in this rank's row (:func:`q8_layout`)."""
    import torch

    layout, header = q8_layout(p)
    q = quant.quantise(xp, local(s), signed)
    row = torch.zeros((1, layout.shape[1]), dtype=torch.float32, device=q.absmax.device)
    row[0, :len(header)] = torch.from_numpy(header)
    row[0, len(header):len(header) + q.absmax.shape[0]] = q.absmax
    return quant.Q8(Spec.of(p).wrap(q.codes), layout.wrap(row))


def local_scales(absmax: Any, p: Any) -> Any:
    """This rank's block scales of an 8-bit slot of DTensor ``p`` from its DTensor of scales:
    a view of its row (writes reach the DTensor)."""
    start = HEADER * p.ndim
    return local(absmax)[0, start:start + quant.blocks(local(p).numel())]


def local_q8(q: quant.Q8, p: Any) -> quant.Q8:
    """The local arrays of the 8-bit slot ``q`` of DTensor ``p`` (views)."""
    return quant.Q8(local(q.codes), local_scales(q.absmax, p))


def _numbers(header: list[float]) -> list[int]:
    """The integers of a header (:data:`HEADER`), from their halves."""
    return [int(hi) * _HALF + int(lo) for hi, lo in zip(header[::2], header[1::2], strict=True)]


def check_q8(absmax: Any, p: Any, what: str) -> None:
    """Raise unless ``absmax`` is the DTensor of block scales of an 8-bit slot of DTensor
    ``p`` as this rank holds it: its shape, and its row's header this rank's shard's."""
    layout, header = q8_layout(p)
    got = tuple(absmax.shape)
    if not is_dtensor(absmax) or got != layout.shape or not np.array_equal(
            local(absmax)[0, :len(header)].cpu().numpy(), header):
        had = (f"shape {got}" if not is_dtensor(absmax) or got != layout.shape else
               f"this rank's row for the shard at offset, shape "
               f"{_numbers(local(absmax)[0, :len(header)].tolist())}")
        raise ValueError(
            f"uniopt: {what}: 8-bit block scales of {had}, but this rank holds the shard at "
            f"offset, shape {_numbers(header.tolist())} of a parameter of shape "
            f"{tuple(p.shape)} "
            f"(scales of shape {layout.shape}): 8-bit state keeps a scale per block of each "
            "rank's shard and loads only into the layout it was saved from (the same mesh "
            "and placements); load it there and save it unquantised to change the layout"
        )


def local_grad(g: Any, p: Any) -> Any:
    """The local shard of gradient ``g`` of parameter ``p``, laid out as ``p``'s."""
    if not is_dtensor(g):
        if is_dtensor(p):
            raise TypeError(
                f"uniopt: a DTensor parameter of shape {tuple(p.shape)} has a plain tensor "
                "gradient; give it a DTensor gradient of the parameter's mesh"
            )
        return g
    if not is_dtensor(p):
        raise TypeError(
            f"uniopt: a plain tensor parameter of shape {tuple(p.shape)} has a DTensor gradient"
        )
    if g.placements != p.placements or g.device_mesh != p.device_mesh:
        g = g.redistribute(p.device_mesh, p.placements)
    return local(g)


def local_grads(grads: list[Any], params: list[Any]) -> list[Any]:
    """:func:`local_grad` of each gradient (None stays None)."""
    return [None if g is None else local_grad(g, p) for g, p in zip(grads, params, strict=True)]


def same_layout_locals(grads: list[Any], params: list[Any]) -> list[Any] | None:
    """The local shards of DTensor gradients laid out as their parameters (plain tensors as
    they are); None where one is not, and would have to be redistributed (:func:`local_grads`
    then does it, once)."""
    t = dtensor_type()
    every = itertools.repeat(t)
    if all(map(isinstance, grads, every)) and all(map(isinstance, params, every)):
        # (C calls only: equal placements are mostly the same objects)
        if list(map(_PLACEMENTS, grads)) != list(map(_PLACEMENTS, params)):
            return None
        return list(map(_LOCAL, grads))
    out = []
    for g, p in zip(grads, params, strict=True):
        if isinstance(g, t):
            if not isinstance(p, t) or g.placements != p.placements:
                return None
            out.append(g._local_tensor)
        elif isinstance(p, t):
            return None
        else:
            out.append(g)
    return out


def check_rule(rule: Any) -> None:
    """Raise where ``rule`` has a whole-tree part: it would see this rank's shards only."""
    if rule.tree_layout:
        raise TypeError(
            f"uniopt: {rule.name} has whole-tree parts ({', '.join(rule.tree_layout)}), which "
            "see every leaf at once (a combinator, a closure-driven minimizer such as L-BFGS, "
            "an optax member, a rule that takes dot products over the tree); on DTensor "
            "(sharded) parameters they would see this rank's shards only, and are not "
            "supported there"
        )


def check_q8_rule(rule: Any) -> None:
    """Raise where ``rule`` has per-leaf parts: 8-bit state on shards is for elementwise
    rules."""
    if rule.has_per_leaf:
        raise ValueError(
            f"uniopt: state_dtype='q8' on DTensor (sharded) parameters takes elementwise rules "
            f"(norms included); {rule.name} has per-leaf parts, which gather whole tensors"
        )


def check_group(params: list[Any], tracked: bool) -> None:
    """Raise where a param group of DTensors asks for what their shards cannot do."""
    if tracked:
        raise ValueError("uniopt.torch: differentiable=True records the step in autograd on "
                         "whole tensors; these parameters are DTensors")
    for i, p in enumerate(params):
        if is_dtensor(p):
            Spec.of(p, f"parameter {i} of the group")

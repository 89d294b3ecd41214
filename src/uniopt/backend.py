"""Which array library a leaf belongs to, and the one place arrays are written in place."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import operator
import sys
from collections.abc import Callable
from typing import Any

import array_api_compat as aac
import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy 1.26
    byte_bounds = np.byte_bounds  # type: ignore[attr-defined]  # noqa: NPY201

from .hyper import _traced

# an array's namespace, by its exact type: array_api_compat's lookup walks every library's
# checks (array-api-strict's also resets its flags), and the reference path asks per leaf. The
# type alone decides it, but for NumPy's float0 arrays (JAX's gradients of integers), which
# array_api_compat counts as JAX's and which are not cached.
_NAMESPACES: dict[type, Any] = {}


def namespace(x: Any) -> Any:
    xp = _NAMESPACES.get(type(x))
    if xp is None:
        xp = aac.array_namespace(x)
        if type(x) is not np.ndarray or aac.is_numpy_array(x):
            _NAMESPACES[type(x)] = xp
    return xp


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    """What a step asks of an array, the same for every array of its type and dtype."""

    library: str  # as :func:`library` names it
    floating: bool  # real or complex floating: a dtype uniopt updates
    complex: bool
    low: bool  # narrower than float32 (float16, bfloat16): its step is computed in float32
    refused: str | None = None  # why no step takes an array of this type, or None


_KINDS: dict[tuple[type, Any], Kind] = {}

# NumPy's arithmetic on a masked array leaves its masked entries as they were (or not, as the
# operands' masks fall), and a matrix product mixes them in
_MASKED = ("a NumPy masked array: a step would move its masked entries or not as each "
           "operation's masks fall; pass its data (np.ma.getdata) and zero the gradients that "
           "must not move")
_MARRAY = ("a masked array (marray): a step would move its masked entries or not as each "
           "operation's masks fall; pass its data (x.data) and zero the gradients that must not "
           "move")


def dtype_name(dtype: Any) -> str:
    """A dtype's name without its library's prefix: ``"float32"`` for NumPy's, torch's
    (``torch.float32``), JAX's and array-api-strict's alike (NumPy's by its name: a big-endian
    ``>f2`` is float16)."""
    return dtype.name if isinstance(dtype, np.dtype) else str(dtype).rsplit(".", 1)[-1]


def float_bits(dtype: Any) -> int:
    """The width of a real floating dtype, read off its name (array-api-strict's dtypes have no
    ``itemsize``): 16 for bfloat16, 8 for ``float8_e4m3fn``."""
    digits = dtype_name(dtype).removeprefix("b").removeprefix("float").split("_", 1)[0]
    return int(digits) if digits.isdigit() else 64


def narrowed(x: Any, dtype: Any) -> Any:
    """Array ``x`` as ``dtype``, where a float64 result (``state_dtype="float64"``) goes to
    16 bits rounded once, as NumPy rounds it: torch and XLA convert float64 to float16 and
    bfloat16 through float32, which rounds twice (a value just past a 16-bit midpoint first
    rounds onto it, then to even). Rounded to odd on the way to float32 (toward zero, the last
    bit set where inexact), the second rounding is the only one (Boldo and Melquiond, 2008):
    float32 keeps more than two bits beyond any 16-bit format's."""
    xp = namespace(x)
    if not (dtype_name(x.dtype) == "float64" and float_bits(dtype) == 16
            and (is_torch(x) or is_jax(x))):
        return xp.astype(x, dtype)
    if is_torch(x):
        import torch

        y = x.to(torch.float32)
        inexact = y.to(torch.float64) != x
        away = inexact & (y.to(torch.float64).abs() > x.abs())
        # the bits of a float32 count its magnitude: one less is one ulp toward zero
        bits = (y.view(torch.int32) - away.to(torch.int32)) | inexact.to(torch.int32)
        return bits.view(torch.float32).to(dtype)
    import jax

    jnp = jax.numpy
    y = x.astype(jnp.float32)
    inexact = y.astype(jnp.float64) != x
    away = inexact & (jnp.abs(y.astype(jnp.float64)) > jnp.abs(x))
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    bits = (bits - away.astype(jnp.int32)) | inexact.astype(jnp.int32)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def _floats(x: Any, xp: Any) -> tuple[bool, bool]:
    """Whether ``x``'s dtype is floating, and complex."""
    try:
        return (bool(xp.isdtype(x.dtype, ("real floating", "complex floating"))),
                bool(xp.isdtype(x.dtype, "complex floating")))
    except TypeError:
        # NumPy holds ml_dtypes' numbers (bfloat16 and the 8-bit floats, as JAX hands its
        # arrays to NumPy; int4) as opaque dtypes, which its isdtype refuses
        return dtype_name(x.dtype).startswith(("float", "bfloat")), False


def kind(x: Any) -> Kind:
    """:class:`Kind` of array ``x``, looked up by its type and dtype after the first time."""
    try:
        key = (type(x), x.dtype)
        found = _KINDS.get(key)
    except TypeError:  # a dtype that cannot be hashed
        key, found = None, None
    if found is None:
        floating, complex_ = _floats(x, namespace(x))
        found = Kind(library(x), floating, complex_,
                     floating and not complex_ and float_bits(x.dtype) < 32,
                     _MASKED if isinstance(x, np.ma.MaskedArray) else _MARRAY if type(
                         x).__module__.split(".")[0] == "marray" else None)
        if key is not None and type(x) in _NAMESPACES:
            _KINDS[key] = found
    return found


def device(x: Any) -> Any:
    """Where to make arrays like ``x``: its device, but none for a JAX array not committed to
    one, or traced (the compiler places those). JAX hands a jitted step's outputs back
    committed when any input was: a slot made committed beside uncommitted params would make
    the second call's inputs differ from the first's, and compile the step a second time."""
    if hasattr(type(x), "__jax_array__"):  # (a C look first: no call for an array)
        # a flax NNX Param, which NNX sets a rule up from, is looked at as its array: asked of
        # the Param, aac gave its device as of a committed array, and the state's scalars
        # were made committed
        x = held_array(x)
    if is_jax(x) and (_traced(x) or not x.committed):
        return None
    return aac.device(x)


def mesh_of(x: Any) -> Any:
    """The mesh a JAX array is laid out over when it spans more than one device (a
    ``NamedSharding``'s), else None."""
    if _traced(x) or not hasattr(x, "sharding"):
        return None
    mesh = getattr(x.sharding, "mesh", None)
    return mesh if mesh is not None and len(x.sharding.device_set) > 1 else None


def placement(x: Any) -> Any:
    """Where a jitted step hands back an array made beside ``x``: the mesh ``x`` spans, the
    device ``x`` is committed to, or None (uncommitted: wherever JAX puts it)."""
    if _traced(x) or not getattr(x, "committed", False):
        return None
    mesh = mesh_of(x)
    return mesh if mesh is not None else next(iter(x.sharding.device_set))


def placed(x: Any, like: Any) -> Any:
    """``x`` placed as ``like`` (:func:`placement`): replicated over its mesh, committed to its
    device, else left as it is. A state's arrays not made from a parameter (the step counter,
    the rule's numbers, a generator's key) are placed so: a jitted step returns them so, and
    an argument laid out as it comes back is a signature seen before, where one uncommitted
    beside committed params (or a NumPy array) would compile the step a second time."""
    where = placement(like)
    if where is None:
        return x
    import jax

    if not isinstance(where, jax.sharding.Mesh):
        return jax.device_put(x, where)
    # spelled as a jitted step spells a replicated output, so that the next call's argument is
    # the same signature, not a second entry in jit's cache: on a mesh of explicit axes
    # (jax.make_mesh's default) by its type, each axis named None; on one of automatic axes
    # (Mesh(...)) as XLA's layout is read back, P()
    spec = (jax.sharding.PartitionSpec(*([None] * np.ndim(x)))
            if getattr(where, "explicit_axes", ()) else jax.sharding.PartitionSpec())
    return jax.device_put(x, jax.sharding.NamedSharding(where, spec))


def placed_slot(x: Any, like: Any) -> Any:
    """``x``, a slot of another shape than its sharded parameter ``like`` (Adafactor's row and
    column factors: an axis of 1 where the parameter's is reduced), placed as a jitted step
    hands it back. On a mesh of automatic axes XLA lays the step's factor out as the parameter
    along the axes it keeps, spelled without trailing Nones (P('d',) for the rows of a P('d',
    'm') matrix, P(None, 'm') for its columns): set up so, the second call is the first's
    signature, not a second compilation. On a mesh of explicit axes whole (:func:`placed`;
    the step lays the new factor out as the old, :func:`laid_out_as`), and where the axes do
    not line up whole too."""
    mesh = mesh_of(like)
    if mesh is None or bool(getattr(mesh, "explicit_axes", None)) or np.ndim(x) != np.ndim(like):
        return placed(x, like)
    import jax

    spec = like.sharding.spec  # (a NamedSharding's: mesh_of found its mesh)
    axes = [*spec, *[None] * (np.ndim(like) - len(spec))]
    kept = [a if n == m else None for a, n, m in zip(axes, x.shape, like.shape, strict=True)]
    while kept and kept[-1] is None:
        kept.pop()
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*kept)))


def made_beside(make: Callable[[Any], Any], like: Any) -> Any:
    """``make(device)``, an array of another shape than ``like`` (a whole-tree part's
    projector, a factor), made beside it: on its device, or replicated over the mesh it spans,
    whose layout may split an axis the new array lacks (or not divide it)."""
    if mesh_of(like) is not None:
        return placed(make(None), like)
    return make(device(like))


def number(xp: Any, value: Any, dtype: Any, like: Any) -> Any:
    """``value`` (a number, or a list of them) as an array of ``dtype`` beside array ``like``:
    on its device, or replicated on its mesh (:func:`placed`, as the step counter), where
    ``like``'s own sharding may split an axis these lack."""
    if mesh_of(like) is not None:
        return placed(xp.asarray(value, dtype=dtype), like)
    return xp.asarray(value, dtype=dtype, device=device(like))


def laid_out_as(x: Any, like: Any) -> Any:
    """JAX array ``x`` resharded as JAX array ``like`` where ``like``'s type names axes of an
    explicit mesh (``jax.make_mesh``'s default), else ``x``. A new slot keeps its old one's
    layout: a kernel may return it otherwise (a sharded matrix's row factor comes back split,
    its slot set up whole), and a jitted step's outputs laid out otherwise than its inputs
    make the next call's arguments new to ``jit``, a second compilation."""
    if not (is_jax(x) and is_jax(like)):
        return x
    import jax

    typeof = getattr(jax, "typeof", None)  # JAX before explicit meshes: nothing to keep
    if typeof is None:
        return x
    want = typeof(like).sharding
    if not getattr(want.mesh, "explicit_axes", ()) or typeof(x).sharding == want:
        return x
    return jax.sharding.reshard(x, want)


def gathered(x: Any) -> Any:
    """JAX array ``x`` replicated over its mesh where its type splits an axis of an explicit
    mesh, else ``x``. An operation that contracts a split axis or mixes layouts (a matrix
    product, a concatenation of per-axis maxima) is refused on such arrays until told its
    output's layout; a per-leaf or whole-tree part runs on whole arrays instead, as on a
    DTensor's gathered shards, and its results are laid out again (:func:`laid_out_as`)."""
    if not is_jax(x):
        return x
    import jax

    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return x
    have = typeof(x).sharding
    if not getattr(have.mesh, "explicit_axes", ()) or all(a is None for a in have.spec):
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(have.mesh,
                                                              jax.sharding.PartitionSpec()))


def quiet() -> Any:
    """NumPy's floating-point warnings off, for a step's own arithmetic on NumPy arrays (the
    reference path, the compiled loop's per-leaf parts, the optax protocol, a minimizer): a
    non-finite gradient or an overflow made them warn ("invalid value encountered in
    divide"), and under -W error raise with nothing written, where the compiled loop, torch
    and JAX step to NaN or inf in silence; which path a step took (the kernel cache, the
    tree's size) decided whether it warned. Code of the user's that a step calls back (an
    L-BFGS closure) runs under the caller's own settings."""
    return np.errstate(all="ignore")


def decomposed(decompose: Callable[[Any], Any], a: Any) -> tuple[Any, ...]:
    """``decompose(a)``, a LAPACK decomposition of matrix ``a`` (eigh, qr, svd), as a tuple.
    Where it does not converge (NumPy's and torch's ``LinAlgError``):

    - ``a`` holds a NaN or an infinity: its results all NaN, as JAX's are. So a non-finite
      gradient takes a matrix rule (Shampoo, SOAP, GaLore) to NaN on every library, as it
      takes every elementwise rule, and does not stop the step partway (the leaves before
      this one stepped, the slots of an elementwise part before it written in place);
    - a finite float32 ``a``: decomposed again in float64 (as Meta's distributed Shampoo
      retries);
    - a finite ``a`` of another dtype: the error, never NaN in silence (rare; that step then
      stops partway)."""
    try:
        return tuple(decompose(a))
    except _lapack_errors():
        xp = namespace(a)
        if not bool(xp.all(xp.isfinite(a))):
            return tuple(x * float("nan") for x in decompose(xp.zeros_like(a)))
        if a.dtype != xp.float32:  # (retried from float32 alone)
            raise
    # a finite float32 matrix too ill-conditioned for the solver in its dtype: in float64
    return tuple(xp.astype(x, a.dtype) for x in decompose(xp.astype(a, xp.float64)))


def _lapack_errors() -> tuple[type[BaseException], ...]:
    torch = sys.modules.get("torch")
    return (np.linalg.LinAlgError,) if torch is None else (np.linalg.LinAlgError,
                                                          torch.linalg.LinAlgError)


def is_array(x: Any) -> bool:
    return type(x) in _NAMESPACES or bool(aac.is_array_api_obj(x))


def is_numpy_scalar(x: Any) -> bool:
    """NumPy turns 0-d results into scalars; results must be handed back as arrays."""
    return isinstance(x, np.generic)


def is_jax(x: Any) -> bool:
    if type(x) is np.ndarray:  # (a float0 array, JAX's gradient of integers, counts as JAX's)
        return bool(aac.is_jax_array(x))
    found = _JAX_TYPES.get(type(x))
    if found is None:
        found = _JAX_TYPES[type(x)] = bool(aac.is_jax_array(x))
    return found


# whether arrays of a type are JAX's, torch's (an instance check, so the type decides it; a
# type seen before its library was imported is not one of its arrays): asked per leaf and slot
_JAX_TYPES: dict[type, bool] = {}
_TORCH_TYPES: dict[type, bool] = {}


def is_variable(cls: type) -> bool:
    """Whether ``cls`` is a framework's variable that holds one value and passes for it (flax
    NNX's ``Variable``: ``__jax_array__`` and ``get_value``); an equinox module that defines
    ``__jax_array__`` (a parametrisation: its array computed from fields) is a node."""
    return hasattr(cls, "__jax_array__") and callable(getattr(cls, "get_value", None))


def held_array(x: Any) -> Any:
    """The JAX array a framework's variable holds (flax NNX's Param, :func:`is_variable`),
    else ``x``."""
    if not is_variable(type(x)):
        return x
    inner = jax_array_of(x)
    return x if inner is None else inner


def jax_array_of(x: Any) -> Any:
    """The JAX array ``x`` is or holds: ``x`` itself, or the one array of a JAX node that
    wraps it (a flax ``nnx.Variable``, which forwards the array's attributes); else None."""
    if aac.is_jax_array(x):
        return x
    jax = sys.modules.get("jax")
    if jax is None or is_numpy(x) or is_torch(x):
        return None
    leaves = jax.tree_util.tree_leaves(x)
    return leaves[0] if len(leaves) == 1 and leaves[0] is not x and is_jax(leaves[0]) else None


def is_numpy(x: Any) -> bool:
    return bool(aac.is_numpy_array(x))


def is_lazy(x: Any) -> bool:
    """Whether ``x`` is an array of a library that computes when asked (dask's): reading its
    value on the host (``float``, ``bool``) computes every step before it, each time."""
    return bool(aac.is_dask_array(x))


def is_torch(x: Any) -> bool:
    found = _TORCH_TYPES.get(type(x))
    if found is None:
        found = _TORCH_TYPES[type(x)] = bool(aac.is_torch_array(x))
    return found


# --- torch tensors written through NumPy views: the one place views are made and marked -----


# NumPy has no bfloat16: a bfloat16 tensor's NumPy view holds its bits, as uint16 tagged with
# this dtype's metadata, which the compiled loop reads (and which nothing else takes for numbers)
BFLOAT16_BITS = np.dtype(np.uint16, metadata={"uniopt": "bfloat16"})


def is_bfloat16_bits(x: Any) -> bool:
    """Whether NumPy array ``x`` is the bits of a bfloat16 tensor (:func:`numpy_view`)."""
    return is_bfloat16_bits_dtype(x.dtype)


def is_bfloat16_bits_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` is :data:`BFLOAT16_BITS` (a dtype of any library: False)."""
    md = getattr(dtype, "metadata", None)
    return md is not None and md.get("uniopt") == "bfloat16"


def numpy_view(t: Any) -> Any:
    """A NumPy array sharing tensor ``t``'s memory (a CPU tensor of a dtype NumPy has, without
    lazy conjugate/negative bits, or bfloat16 as :data:`BFLOAT16_BITS`); raises
    TypeError/RuntimeError where it has none. Whoever writes through it must call
    :func:`mark_written` on ``t`` afterwards."""
    if is_bfloat16(t):
        import torch

        return t.detach().view(torch.int16).numpy().view(BFLOAT16_BITS)
    return t.detach().numpy()


def unpinned_view(t: Any) -> Any:
    """:func:`numpy_view` of tensor ``t`` that leaves its storage resizable. ``Tensor.numpy()``
    marks a storage unresizable for good, so after a step a user's ``p.untyped_storage().
    resize_(0)`` (freeing or offloading a parameter's memory) raised; torch.optim's steps make
    no such views. For the views a ``uniopt.torch`` plan keeps of its parameters and slots,
    whose addresses it checks before every step, and which it makes once (a DLPack view costs
    about 2.7 us where ``numpy()`` costs 0.7: gradients, viewed at every step, keep ``numpy()``).
    NumPy before 2.1 reads DLPack memory as read-only: ``numpy()`` there."""
    import torch

    d = t.detach()
    if d.is_neg() or d.is_conj() or d.device.type != "cpu":
        return numpy_view(t)  # (refused there: DLPack would drop a negative bit)
    bits = is_bfloat16(d)
    try:
        a = np.from_dlpack(d.view(torch.int16) if bits else d)
    except (BufferError, TypeError, RuntimeError, ValueError):
        return numpy_view(t)
    if not a.flags.writeable:
        return numpy_view(t)
    return a.view(BFLOAT16_BITS) if bits else a


def numpy_views(lists: list[list[Any]]) -> list[list[Any]] | None:
    """:func:`numpy_view` of every tensor in ``lists``, or None if one has no such view."""
    try:
        return [_views(xs) for xs in lists]
    except (AttributeError, TypeError, RuntimeError):
        return None


_DTYPE = operator.attrgetter("dtype")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _views(xs: list[Any]) -> list[Any]:
    import torch

    if xs and is_bfloat16(xs[0]):
        # NumPy has no bfloat16: its bits (BFLOAT16_BITS), which the compiled loop reads as
        # bfloat16 (C calls only, as below; the dtype check too)
        if not all(map(operator.eq, map(_DTYPE, xs), itertools.repeat(torch.bfloat16))):
            raise TypeError("bfloat16 beside other dtypes")
        if any(map(_REQUIRES_GRAD, xs)):
            xs = list(map(torch.Tensor.detach, xs))
        bits = map(torch.Tensor.numpy, map(operator.methodcaller("view", torch.int16), xs))
        return list(map(operator.methodcaller("view", BFLOAT16_BITS), bits))
    try:
        # C calls only, no Python frame per tensor: the per-tensor cost of a step of 10,000
        # gradients (detaching each would double it)
        return list(map(torch.Tensor.numpy, xs))
    except RuntimeError:  # one requires grad
        return list(map(numpy_view, xs))


class Addressed:
    """Leaves handed to the compiled loop by the addresses of their memory, in place of a list
    of NumPy views: ``uniopt.torch``'s gradients, new tensors at every step, whose views cost
    about 0.8 us each (:func:`numpy_views`) where an address costs 0.05. Whoever makes one has
    checked that each tensor is dense, C-contiguous, on the CPU, of NumPy dtype ``dtype`` and of
    its parameter's shape (the loop reads as many numbers from each address as the parameter
    has), and that ``ptrs`` are their ``data_ptr()``. ``tensors`` keep that memory alive;
    :meth:`arrays` are their views, made for any other path."""

    __slots__ = ("tensors", "ptrs", "dtype", "address", "_arrays")

    def __init__(self, tensors: list[Any], ptrs: Any, dtype: Any, address: int | None = None
                 ) -> None:
        self.tensors, self.ptrs, self.dtype = tensors, ptrs, dtype
        # the table's own address, negated: how the compiled loop tells it from a list's
        # (uniopt.fast.cpu._leaf); given by a maker that refills one table step after step
        # (reading it costs about 0.8 us)
        self.address = -ptrs.__array_interface__["data"][0] if address is None else address
        self._arrays: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.tensors)

    def take(self, pos: list[int]) -> Addressed:
        """The leaves at positions ``pos``."""
        return Addressed([self.tensors[k] for k in pos], self.ptrs[pos], self.dtype)

    def arrays(self) -> list[Any]:
        """The leaves as NumPy views."""
        if self._arrays is None:
            self._arrays = list(map(numpy_view, self.tensors))
        return self._arrays


def mark_written(tensors: list[Any]) -> None:
    """Bump the autograd version counter of tensors written through NumPy views, as torch's
    own in-place operations do: a graph that saved one of them then raises on ``backward()``
    instead of silently using the new values."""
    if tensors:
        import torch

        # (torch.autograd.graph.increment_version's own call, without its Python frame)
        torch._C._increment_version(tensors)


def from_numpy(x: Any, dtype: Any = None) -> Any:
    """A tensor sharing ``x``'s memory (results of the compiled path, for tensor inputs), of
    ``dtype`` where ``x`` holds its bits (bfloat16 as :data:`BFLOAT16_BITS`)."""
    import torch

    t = torch.from_numpy(x)
    return t if dtype is None or t.dtype == dtype else t.view(dtype)


def is_bfloat16(x: Any) -> bool:
    """Whether tensor ``x`` is bfloat16 (its NumPy view holds its bits)."""
    return str(x.dtype) == "torch.bfloat16"


def to_numpy(x: Any, dtype: Any) -> Any:
    """``x`` from another library (optax's JAX output for NumPy params) as a NumPy array."""
    return np.asarray(x, dtype=dtype)


def library(x: Any) -> str:
    """A short name of the library that owns array ``x``, for error messages."""
    name = _LIBRARIES.get(type(x))
    if name is None:
        # JAX's arrays live in jaxlib; a subclass of NumPy's array or torch's tensor is
        # theirs (np.memmap, a framework's own Parameter type), and so is a NumPy scalar of
        # another package's dtype (ml_dtypes' bfloat16, a 0-d array's arithmetic)
        name = "jax" if aac.is_jax_array(x) else "numpy" if isinstance(
            x, (np.ndarray, np.generic)) else "torch" if is_torch(x) else \
            type(x).__module__.split(".")[0]
        if type(x) in _NAMESPACES:
            _LIBRARIES[type(x)] = name
    return name


_LIBRARIES: dict[type, str] = {}


def array_library(x: Any) -> str:
    """:func:`library` of the array ``x`` is or holds: a flax ``nnx.Variable`` holding a JAX
    array is a JAX array, as it is to JAX and optax."""
    held = jax_array_of(x)
    return library(x if held is None else held)


def owner(x: Any) -> Any:
    """The object whose memory array ``x`` is: a NumPy view's ``base``, a torch view's
    ``_base``, an array-api-strict array's NumPy array's owner, else ``x`` itself (anything
    else: itself)."""
    if type(x) is not np.ndarray and type(x).__module__.startswith("array_api_strict"):
        # (a private attribute of array-api-strict's: the NumPy array it wraps; a reshape
        # there wraps a NumPy view, whose owner is the memory's)
        inner = getattr(x, "_array", None)
        return x if inner is None else owner(inner)
    base = getattr(x, "base" if type(x) is np.ndarray else "_base", None)
    return x if base is None else base


def _span(x: Any) -> tuple[int, int] | None:
    """The bytes ``[low, high)`` that array ``x`` reaches into, or None (no memory of its own
    to speak of: empty, or not a NumPy array, a torch tensor or an array-api-strict array)."""
    if type(x) is not np.ndarray and type(x).__module__.startswith("array_api_strict"):
        x = getattr(x, "_array", None)
    if isinstance(x, np.ndarray):
        return tuple(byte_bounds(x)) if x.size else None  # type: ignore[return-value]
    if is_torch(x) and x.numel() and x.layout == sys.modules["torch"].strided:
        x = getattr(x, "_local_tensor", x)  # (a DTensor's: its shard on this rank)
        low = x.data_ptr()
        reach = sum((n - 1) * st for n, st in zip(x.shape, x.stride(), strict=True))
        return low, low + (reach + 1) * x.element_size()
    return None


def _share(a: Any, b: Any) -> bool:
    """Whether arrays ``a`` and ``b``, whose spans overlap, share an element: NumPy's exact
    answer, on CPU tensors' NumPy views too (two columns of one matrix share none); a tensor
    elsewhere counts as sharing."""
    a, b = (_as_numpy_memory(x) for x in (a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.shares_memory(a, b))
    return True


def _as_numpy_memory(x: Any) -> Any:
    """``x``'s memory as a NumPy array (array-api-strict's; a CPU tensor's, a DTensor's local
    shard's, bfloat16 read as 16-bit integers), or ``x``."""
    if type(x).__module__.startswith("array_api_strict"):
        return getattr(x, "_array", x)
    if is_torch(x):
        x = getattr(x, "_local_tensor", x).detach()
        if x.device.type != "cpu":
            return x
        torch = sys.modules["torch"]
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        try:  # (unpinned: the user's tensors stay resizable; bfloat16 as its bits)
            return unpinned_view(x)
        except (TypeError, RuntimeError):  # a dtype NumPy has none of: by its bytes' width
            width = ints.get(x.element_size())
            return unpinned_view(x.view(width)) if width is not None else x
    return x


def overlapping(xs: list[Any], storages: bool = False) -> tuple[int, int] | None:
    """Two of ``xs`` (by index) that share memory, or None. Costs a look at each array's base
    only, where none is a view (no two distinct arrays then share memory). ``storages``: torch
    tensors are grouped by their storage, not their base: those made to share one with
    ``Tensor.set_`` are no views of each other (a storage object each, one address)."""
    owners: dict[Any, list[int]] = {}
    for i, x in enumerate(xs):
        key: Any = id(owner(x))
        if storages and is_torch(x) and x.layout == sys.modules["torch"].strided:
            try:
                at = getattr(x, "_local_tensor", x).untyped_storage().data_ptr()
            except (NotImplementedError, RuntimeError, ValueError):
                # (no storage: functorch's wrappers, a lazy module's UninitializedParameter)
                at = 0
            if at:  # (0: no memory, a meta tensor's: each is its own)
                key = ("storage", at)
        owners.setdefault(key, []).append(i)
    for idx in owners.values():
        if len(idx) < 2:
            continue
        spans = sorted((sp, i) for i in idx if (sp := _span(xs[i])) is not None)
        open_: list[tuple[int, int]] = []  # (high, index) of the spans still reached into
        for (low, high), i in spans:
            open_ = [(h, j) for h, j in open_ if h > low]
            for _, j in open_:
                if _share(xs[j], xs[i]):
                    return (j, i) if j < i else (i, j)
            open_.append((high, i))
    return None


def view_attr(x: Any) -> str | None:
    """The attribute that names the owner of a view ``x`` is: NumPy's ``base`` (its
    subclasses' too), torch's ``_base``; None for other arrays."""
    return "base" if isinstance(x, np.ndarray) else "_base" if is_torch(x) else None


def has_views(xs: list[Any], ys: Any = ()) -> bool:
    """Whether some array of ``xs`` or ``ys`` (of one library; ``ys`` may hold None) is a view
    of another array's memory, in one Python call (a small step's cost); array-api-strict's
    arrays are taken as views (they wrap NumPy's), JAX's as none (immutable)."""
    if not xs:
        return False
    attr = view_attr(xs[0])
    if attr is None:
        return type(xs[0]).__module__.startswith("array_api_strict")
    # (getattr: a gradient of another library is refused later, with a message)
    for x in itertools.chain(xs, ys):  # (a plain loop: the quickest form, as measured)
        if getattr(x, attr, None) is not None:
            return True
    return False


def same_memory(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same elements of one memory, in the same layout (a
    gradient read at the index it writes its parameter: harmless in place)."""
    return _span(a) == _span(b) and strides(a) == strides(b) and tuple(a.shape) == tuple(b.shape)


def strides(x: Any) -> Any:
    """``x``'s strides (NumPy's in bytes, torch's in elements), or None where it has none."""
    return tuple(x.stride()) if is_torch(x) else getattr(x, "strides", None)



def repeats(x: Any) -> bool:
    """Whether ``x`` (a NumPy array or a tensor) reaches a place of its memory twice: a stride of
    0 over an axis of more than one element, or strides under which its rows overlap
    (``as_strided``). Axes whose strides nest (each at least the reach of the smaller ones) do
    not; where they do not nest, every element's place is looked at."""
    steps = strides(x)
    shape = tuple(x.shape)
    if steps is None or 0 in shape:
        return False
    unit = 1 if is_torch(x) else x.itemsize
    reach = 0
    for st, n in sorted((abs(st), n) for n, st in zip(shape, steps, strict=True) if n > 1):
        if st < reach + unit:
            if np.prod(shape, dtype=np.int64) > _PLACES_LOOKED_AT:
                return False  # (an as_strided layout of this size: not looked at, see below)
            places = np.zeros((), np.int64)
            for n_, st_ in zip(shape, steps, strict=True):
                places = places[..., None] + np.arange(n_, dtype=np.int64) * st_
            places = np.sort(places, axis=None)
            return bool(np.any(np.diff(places) < unit))
        reach += st * (n - 1)
    return False


# the most elements whose places :func:`repeats` sorts (an int64 each, and a sort: 40M took
# minutes with np.unique); only as_strided layouts whose strides do not nest get that far
_PLACES_LOOKED_AT = 1 << 24


def memory_ids(xs: list[Any]) -> set[int]:
    """The ids of the objects whose memory ``xs`` are (:func:`owner`'s, None skipped), in one
    pass of attribute reads where they are NumPy arrays or tensors."""
    attr = view_attr(next((x for x in xs if x is not None), None))
    if attr is None:
        return {id(owner(x)) for x in xs if x is not None}
    return {id(x if (b := getattr(x, attr, None)) is None else b) for x in xs if x is not None}


def memory_types() -> tuple[type, ...]:
    """The array types whose memory a pure step must not hand back: NumPy's, and torch's and
    array-api-strict's where they are imported (in that order)."""
    torch = sys.modules.get("torch")
    strict = sys.modules.get("array_api_strict._array_object")
    kinds: tuple[type, ...] = (np.ndarray, torch.Tensor if torch is not None else np.ndarray)
    return kinds + (strict.Array,) if strict is not None else kinds


def immutable_reason(x: Any) -> str | None:
    """Why ``x`` cannot be written in place, or None if it can."""
    if type(x) is np.ndarray and x.flags.writeable or is_torch(x):  # (the common cases first)
        if type(x) is np.ndarray and x.dtype.kind == "c" and not (
                x.flags.c_contiguous or x.strides and x.strides[-1] == x.itemsize):
            # (stepped as its real pairs, through a view it does not have)
            return (f"a complex array with strides {x.strides} has no real view to write; use "
                    "uniopt.update, or a contiguous array")
        return None
    if is_jax(x):
        return "JAX arrays are immutable; use uniopt.update"
    if isinstance(x, np.generic):  # (np.float32(1.0): a number, not an array, held by value)
        return (f"a NumPy scalar ({type(x).__name__}) is a value, not memory to write; use "
                "uniopt.update, or a 0-d array (np.array(x))")
    if aac.is_numpy_array(x) and not x.flags.writeable:
        return "the NumPy array is read-only; use uniopt.update"
    if not hasattr(type(x), "__setitem__"):  # (pydata's sparse arrays)
        return f"{library(x)} arrays cannot be written in place; use uniopt.update"
    return None


# set while a step is to be differentiated through (torch's differentiable=True): its
# arithmetic and its writes are recorded by autograd like any other operations
_TRACKED = contextvars.ContextVar("uniopt_tracked", default=False)


@contextlib.contextmanager
def tracked() -> Any:
    """Steps in this context are part of torch's autograd graph: a meta-learning loop can
    differentiate the new parameters with respect to the old ones, the gradients and the
    state (torch tensors only; they take the reference path)."""
    token = _TRACKED.set(True)
    try:
        yield
    finally:
        _TRACKED.reset(token)


def is_tracked() -> bool:
    return _TRACKED.get()


def keeps_torch_numbers() -> bool:
    """Whether a number a torch step reads on the host (a global norm, Adafactor's norms of
    each leaf) stays a tensor: in a recorded step (:func:`tracked`), whose derivative a Python
    float would cut, and inside any torch.func transform, where a forward one (``jvp``,
    ``jacfwd``) carries its derivative in the tensor (a float dropped it: a wrong derivative,
    silently) and ``vmap`` refuses the read (``.item()``)."""
    if _TRACKED.get():
        return True
    functorch = getattr(sys.modules["torch"]._C, "_functorch", None)
    level = getattr(functorch, "maybe_current_level", None)
    return level is not None and level() is not None


# set while a step updates local shards of distributed tensors (uniopt.interop.dtensor): which
# of the arrays the engine is handed are shards of bigger tensors, for the parts that need more
# than one element (a norm, a whole leaf); set directly (a C call) where a step must make no
# Python call of its own (uniopt.torch's plans)
SHARDED: contextvars.ContextVar[Any] = contextvars.ContextVar("uniopt_sharded", default=None)


@contextlib.contextmanager
def sharded(sharding: Any) -> Any:
    """Steps in this context update local shards: ``sharding.of(leaves)`` says which of a
    step's leaves are shards of which tensors (:class:`uniopt.interop.dtensor.Sharding`)."""
    token = SHARDED.set(sharding)
    try:
        yield
    finally:
        SHARDED.reset(token)


# set while the engine steps, one call per step count, the groups of leaves that count apart
# (after a None gradient): a global norm (clip_by_global_norm's) is that of every group together
# (engine._Split), where each part that takes one reads it through global_squares
SPLIT: contextvars.ContextVar[Any] = contextvars.ContextVar("uniopt_split", default=None)


def global_squares(squares: Any, size: int) -> tuple[Any, int, Any]:
    """A global-norm part's sum of squares and count of elements: this step's, or every
    group's of the step :data:`SPLIT` splits; and the part whose coefficients they make
    there, at the count the groups share (None: the step's own)."""
    split = SPLIT.get()
    return (squares, size, None) if split is None else split.total(squares, size)


def shards_of(leaves: list[Any]) -> Any:
    """The :class:`uniopt.interop.dtensor.Shards` of a step's ``leaves`` (the arrays it was
    handed); None outside :func:`sharded`, or where none of them is a shard."""
    sharding = SHARDED.get()
    return None if sharding is None else sharding.of(leaves)


def assign(dst: Any, src: Any) -> None:
    """``dst[...] = src`` for every mutable library (torch outside autograd, unless
    :func:`tracked`)."""
    if type(dst) is np.ndarray:  # (the common case, first)
        dst[...] = src
    elif is_torch(dst):
        import torch

        # (copy_ rounds float64 to 16 bits twice; attribute reads only: a call per leaf here
        # is one on every leaf of the reference path)
        if getattr(src, "dtype", None) is torch.float64 and (
                dst.dtype is torch.float16 or dst.dtype is torch.bfloat16):
            src = narrowed(src, dst.dtype)
        if _TRACKED.get() or not torch.is_grad_enabled():
            dst.copy_(src)
        else:
            with torch.no_grad():
                dst.copy_(src)
    else:
        dst[...] = src


def outside_autograd(leaves: list[Any]) -> contextlib.AbstractContextManager[Any]:
    """An optimizer step is not part of the model's graph: torch records nothing in it
    (unless :func:`tracked`)."""
    if leaves and is_torch(leaves[0]) and not _TRACKED.get():
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def like_leaf(x: Any, like: Any) -> Any:
    """A new parameter ``x`` made a leaf that requires grad where its old one did (torch)."""
    if getattr(like, "requires_grad", False) and is_torch(x) and not x.requires_grad:
        try:
            x.requires_grad_(True)
        except RuntimeError:
            # inside a torch.func transform (grad, jacrev), which refuses the flag: the step
            # ran outside autograd, and its derivative would be silently 0
            raise TypeError(UNTRACKED) from None
    return x


UNTRACKED = ("uniopt steps outside autograd: to differentiate through a step (torch.func's grad "
             "or jacrev, a meta-learning loop), run it inside uniopt.backend.tracked(), or use "
             "uniopt.torch with differentiable=True")


def loss_like(value: Any, like: Any) -> Any:
    """A step's loss (``value=``: a number, or a 0-d array) as an array of ``like``'s dtype and
    device; a torch tensor as itself, in autograd's graph, so that a recorded step carries its
    derivative (torch's ``asarray`` cut it before 2.13 and warns of the change since)."""
    if is_torch(value):
        if is_torch(like):
            return value.to(dtype=like.dtype, device=like.device)
        value = value.detach()  # (a loss that requires grad, beside arrays of another library)
    return namespace(like).asarray(value, dtype=like.dtype, device=device(like))


def fresh(x: Any, xp: Any) -> Any:
    """A copy of ``x`` that no caller holds a reference to (in a recorded step, a tensor's
    copy in autograd's graph, as the tensor is)."""
    if _TRACKED.get() and is_torch(x):
        return x.clone()
    return xp.asarray(x, copy=True)


def detached_copy(x: Any) -> Any:
    """A copy of ``x`` in memory of its own (a state slot that starts as the parameter) and,
    for a tensor, outside autograd's graph; but in a recorded step (:func:`tracked`) inside
    it: the slot then carries the parameter's derivative, as a meta-learning loop that
    differentiates with respect to the initial parameters needs (schedule-free's ``z``,
    lookahead's slow weights, DoG's ``p0``)."""
    if is_torch(x):
        return x.clone() if _TRACKED.get() else x.detach().clone()
    return fresh(x, namespace(x))


# --- complex leaves: an optimizer sees a complex number as the pair of its parts (torch) -------


def is_complex(x: Any) -> bool:
    return kind(x).complex


def widest_float(xp: Any, x: Any) -> Any:
    """float64, where ``x``'s device has it; else float32 (torch's MPS, array-api-strict's
    devices without float64). The host-like sums (norms) are taken in it."""
    if type(x) is np.ndarray or xp is np:
        return xp.float64
    if is_torch(x):
        return xp.float32 if x.device.type == "mps" else xp.float64
    return _widest(xp, device(x))


@functools.lru_cache(maxsize=64)
def _widest(xp: Any, dev: Any) -> Any:
    info = getattr(xp, "__array_namespace_info__", None)
    try:
        floats = info().dtypes(device=dev, kind="real floating") if info else {}
    except Exception:  # (a library whose inspection API is partial)
        floats = {}
    return xp.float32 if floats and "float64" not in floats else xp.float64


def has_real_view(x: Any) -> bool:
    """Whether :func:`as_real` of complex ``x`` is a view of its memory (NumPy and torch)."""
    return is_numpy(x) or is_torch(x)


def as_real(x: Any, writable: bool = False) -> Any:
    """Complex ``x`` as real pairs along a new last axis (torch's ``view_as_real``): a view of
    its memory for NumPy and torch (``writable``: it must be one), a new array for the others."""
    if is_torch(x):
        import torch

        if x.is_conj():
            # a lazily conjugated tensor (x.conj()) has no real view of its values: a copy,
            # refused where the step would write through it
            if writable:
                raise TypeError("a conjugated complex tensor (x.conj()) has no real view to "
                                "write; resolve it first (x.resolve_conj()), or use uniopt.update")
            x = x.resolve_conj()
        return torch.view_as_real(x)
    if is_numpy(x):
        if x.flags.c_contiguous or x.strides and x.strides[-1] == x.itemsize:
            # (a 0-d array by way of one of shape (1,): NumPy changes no 0-d array's itemsize)
            return (x.reshape(1) if not x.ndim else x).view(x.real.dtype).reshape(*x.shape, 2)
        if writable:
            raise TypeError(f"a complex array with strides {x.strides} has no real view to "
                            "write; use uniopt.update, or a contiguous array")
    xp = namespace(x)
    return xp.stack([xp.real(x), xp.imag(x)], axis=-1)


def as_complex(x: Any, like: Any = None) -> Any:
    """Real pairs ``x`` (from :func:`as_real`) as a complex array of ``like``'s dtype (without
    ``like``: of ``x``'s precision)."""
    if is_torch(x):
        import torch

        return torch.view_as_complex(x.contiguous())
    if is_jax(x):
        import jax

        z = jax.lax.complex(x[..., 0], x[..., 1])
        return z if like is None else z.astype(like.dtype)
    if is_numpy(x):
        out = np.empty(x.shape[:-1], np.result_type(x.dtype, np.complex64) if like is None
                       else like.dtype)
        out.real, out.imag = x[..., 0], x[..., 1]
        return out
    xp = namespace(x)
    dtype = like.dtype if like is not None else xp.complex128 if x.dtype == xp.float64 \
        else xp.complex64
    j = xp.asarray(1j, dtype=dtype, device=device(x if like is None else like))
    return xp.astype(x[..., 0], dtype) + j * xp.astype(x[..., 1], dtype)


# set while a step updates complex arrays as the real pairs of their parts (:func:`as_real`,
# torch's view_as_real): the ids of the arrays the step is handed that are such pairs (params
# or gradients; the caller holds them for the step), for the parts whose arithmetic on a leaf
# is not that of its real numbers taken one by one (a count of elements, a mean over a leaf's
# axes, a unit's norm: :attr:`uniopt.base.Part.complex_aware`); set directly where a step makes
# no Python call of its own (uniopt.torch's plans)
PAIRS: contextvars.ContextVar[frozenset[int] | None] = contextvars.ContextVar(
    "uniopt_pairs", default=None)


@contextlib.contextmanager
def stepping_pairs(pairs: list[list[Any]], whole: list[list[Any]]) -> Any:
    """Steps in this context take the arrays of ``pairs`` that are views of the complex
    arrays of ``whole`` beside them (their real pairs) as such (:data:`PAIRS`)."""
    ids = frozenset(id(x) for xs, cs in zip(pairs, whole, strict=True)
                    for x, c in zip(xs, cs, strict=True) if c is not None and is_complex(c))
    token = PAIRS.set(ids or None)
    try:
        yield
    finally:
        PAIRS.reset(token)


def pairs_of(params: list[Any], grads: list[Any]) -> list[bool] | None:
    """Which of a step's leaves are the real pairs of complex arrays (:data:`PAIRS`), known by
    their params or gradients; None where none is."""
    ids = PAIRS.get()
    if ids is None:
        return None
    flags = [id(p) in ids or id(g) in ids for p, g in zip(params, grads, strict=True)]
    return flags if any(flags) else None

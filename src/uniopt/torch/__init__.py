"""Drop-in replacements for ``torch.optim``, run by uniopt's engine.

``uniopt.torch`` has every optimizer of ``torch.optim``: ``SGD``, ``Adagrad``, ``RMSprop``,
``Adadelta``, ``Adam``, ``AdamW``, ``Adamax``, ``NAdam``, ``RAdam``, ``ASGD``, ``Rprop``,
``SparseAdam``, ``LBFGS``, ``Adafactor`` and ``Muon``. They take torch's constructor arguments and
defaults and subclass :class:`torch.optim.Optimizer`, so torch's ``lr_scheduler`` classes,
``clip_grad_norm_``, hooks and training frameworks accept them; their ``state_dict`` is torch's,
slot names included, and loads into (and from) the torch class of the same name.
``SophiaH`` is pytorch-optimizer's Sophia-H (:func:`uniopt.sophia_h`), stepped with a closure
that calls ``loss.backward(create_graph=True)``; ``SophiaG`` is its authors' Sophia-G
(:func:`uniopt.sophia_g`: ``update_hessian()`` after a backward at sampled labels,
``step(bs=...)``); ``Kron`` is pytorch-optimizer's Kron (:func:`uniopt.kron`).
:class:`Optimizer` wraps any uniopt rule or chain the same way.
Under ``ZeroRedundancyOptimizer(..., overlap_with_ddp=True)`` and DDP's ``_register_fused_optim``
each class steps through its functional twin (:mod:`uniopt.torch.functional`), registered in
torch's ``functional_optim_map`` when ``torch.distributed.optim`` is imported.

This module is a skin over the engine, not a second implementation: each param group becomes a
uniopt rule built from the group's values (numbers or uniopt schedules), and a step is one
:func:`uniopt.update_` per set of parameters that share a step count (usually one). CPU tensors
are handed to the engine as NumPy views of their memory, so the compiled one-pass loop updates
them in place; tensors on other devices go to the engine as torch tensors, through the
multi-tensor path (float32/float64; the reference path for the rest). Views of parameters and
state, the grouping by step count and the rule are cached between steps and re-checked by
identity; the per-tensor work of a step is reading ``p.grad``, ``Tensor.numpy()`` on it and
those checks, each a C call mapped over the list (no Python loop per tensor).

Differences from torch, each on purpose:

* ``state[p]["step"]`` is a 0-d float tensor as in torch, for every class (torch's SGD keeps
  none): uniopt schedules are evaluated at a parameter's step count, so SGD needs one too. The
  step tensors of a group are views into one buffer, so counting a step is one operation. A
  state from ``torch.optim.SGD`` (no ``step``) loads as step 1 where it has a momentum buffer.
* A momentum buffer that becomes non-zero mid-run (a momentum schedule leaving 0) starts from
  zeros where torch starts from the gradient; these agree except with ``dampening > 0``.
* ``differentiable=True`` records the step in autograd (the reference path on the tensors
  themselves); ``fused`` changes nothing (on CPU every step is already one fused pass, off it
  the multi-tensor path runs) but is refused where torch refuses it; ``foreach=True`` takes the
  multi-tensor path (:mod:`uniopt.fast.foreach`) on every device, the CPU included;
  ``capturable=True`` takes it with each run's step count on the parameters' device, so that a
  step reads nothing back to the host (a CUDA graph can capture it; rules whose coefficients
  need the host, NAdam, RAdam, ASGD, are refused off the CPU, and step with the host's count on
  it). All are kept in the param groups so that states load into torch.
* A parameter listed twice in one group warns as torch does and is kept once (torch updates it
  twice per step).
* Validation is torch's, in its order and words; uniopt's own checks follow where torch has none.
* NAdam's ``mu_product`` (the product of each step's own momentum) and ASGD's ``eta`` and
  ``mu`` (computed at the end of a step, from its ``lr``, ``lambd``, ``alpha``, ``t0``, for the
  next) are numbers torch keeps per parameter from step to step; uniopt keeps them per
  parameter too, beside ``state[p]``, rounded to torch's default dtype as torch keeps them.
  ``state_dict()`` writes them as torch does (0-d tensors of that dtype) and ``load_state_dict``
  reads them, so states load both ways and a run resumes as torch's under any scheduler; a
  parameter that skipped steps keeps its own. A state without them, or a parameter whose state
  was replaced, derives them from its step count and the group's values.
* Rprop, as torch: ``lr`` sets a parameter's step sizes when its state is made; later values
  (a scheduler's) change nothing.
* Sparse gradients: SGD and Adagrad accept them as torch does (Adagrad updates only the rows
  present, SGD the dense equivalent; torch keeps SGD's momentum buffer sparse, this module keeps
  it dense); SparseAdam takes only them; the other classes raise torch's errors.
* Step scalars are computed in double in every mode; torch's ``differentiable=True``,
  ``capturable=True`` and tensor ``lr``/``betas`` compute some in float32 (the step or lr
  tensor's dtype). A tensor ``lr`` that a scheduler rewrites in place is also torch's LBFGS
  ``state["t"]``; uniopt keeps a number there.
* Muon iterates in bfloat16 as torch's does (``uniopt.muon(ns_dtype="bfloat16")``); a
  last-bit difference upstream can round a bfloat16 tie the other way.

tests/test_torch_optim_db.py holds every class to torch's own ``optim_db``; each difference
above that shows in it is a strict xfail naming it.
"""

from .hessian import SophiaG, SophiaH
from .named import (
    ASGD,
    LBFGS,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Muon,
    NAdam,
    RAdam,
    RMSprop,
    Rprop,
    SparseAdam,
)
from .optimizer import Optimizer
from .psgd import Kron

__all__ = [
    "ASGD", "LBFGS", "SGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "Kron",
    "Muon", "NAdam", "Optimizer", "RAdam", "RMSprop", "Rprop", "SparseAdam", "SophiaG", "SophiaH",
]

from . import functional as _functional  # noqa: E402  (registered once every class is here)

_functional.install()

"""uniopt: one optimizer library for every Python array framework.

>>> import numpy as np, uniopt as uo
>>> params = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}
>>> opt = uo.chain(uo.weight_decay(5e-4), uo.adam(lr=uo.schedules.cosine(1e-3, steps=100)))
>>> state = uo.setup(opt, params)
>>> state, params = uo.update(state, params, {"w": np.array([0.1, -0.2]), "b": np.array([1.0])})
>>> state.step
1
"""

from . import checkpoint, conventions, memory, registry, schedules
from .base import Combinator, Elementwise, Minimizer, PerLeaf, Rule, Transform, WholeTree, chain
from .checkpoint import CheckpointError, load, save
from .combine import (
    accumulate,
    by_path,
    freeze,
    masked,
    mechanize,
    partition,
    set_to_zero,
    skip_nonfinite,
)
from .conventions import Translation, translate
from .engine import adjust, minimize_step, minimize_step_, setup, update, update_
from .interop.optax import from_optax, to_optax
from .rules.acprop import acprop, scale_by_acprop
from .rules.adadelta import adadelta, scale_by_adadelta
from .rules.adafactor import adafactor, scale_by_factored_rms, scale_by_param_scale
from .rules.adagrad import adagrad, scale_by_adagrad, scale_by_rss
from .rules.adam import (
    adam,
    adamw,
    optimistic_adam,
    scale_by_adam,
    scale_by_amsgrad,
    scale_by_optimistic_gradient,
)
from .rules.adam_extra import (
    adabelief,
    adamaxw,
    amsgrad,
    nadamw,
    scale_by_belief,
    scale_by_yogi,
    yogi,
)
from .rules.adam_modern import (
    ademamix,
    ademamix_alpha,
    ademamix_b3,
    adopt,
    scale_by_ademamix,
    scale_by_adopt,
    scale_by_simplified_ademamix,
    simplified_ademamix,
    step_power,
)
from .rules.adam_variants import (
    adamax,
    nadam,
    radam,
    scale_by_adamax,
    scale_by_nadam,
    scale_by_radam,
)
from .rules.adan import adan, proximal_weight_decay, scale_by_adan
from .rules.asgd import asgd, scale_by_asgd
from .rules.ftrl import ftrl, scale_by_ftrl, scale_by_ftrl_power
from .rules.galore import GaLoreDimensionNumbers, galore, scale_by_galore
from .rules.kron import kron, psgd_update_probability, scale_by_kron
from .rules.lbfgs_linesearch import lbfgs_linesearch, scale_by_lbfgs, value_and_grad_from_state
from .rules.madgrad import madgrad, scale_by_madgrad
from .rules.matrix import (
    ema_momentum,
    ema_momentum_bias_corrected,
    muon,
    orthogonalize,
    scale_by_shape_lr,
    sum_momentum,
)
from .rules.momo import momo, momo_adam, scale_by_momo, scale_by_momo_adam
from .rules.parameter_free import (
    cocob,
    dadapt_adamw,
    dog,
    dowg,
    prodigy,
    scale_by_cocob,
    scale_by_dadapt_adam,
    scale_by_dog,
    scale_by_dowg,
    scale_by_prodigy,
)
from .rules.preconditioned import (
    merged_shape,
    scale_by_lr_decay_after,
    scale_by_shampoo,
    scale_by_soap,
    shampoo,
    soap,
)
from .rules.private import (
    differentially_private_aggregate,
    dpsgd,
    per_example_global_norm_clip,
)
from .rules.quasi_newton import lbfgs, lbfgs_step
from .rules.rmsprop import (
    rmsprop,
    scale_by_centered_rms,
    scale_by_centered_rms_in_sqrt,
    scale_by_rms,
    scale_by_rms_in_sqrt,
)
from .rules.rprop import rprop, scale_by_rprop
from .rules.schedule_free import (
    scale_by_bias_corrected_rms,
    scale_by_schedule_free,
    schedule_free_adamw,
    schedule_free_eval,
    schedule_free_sgd,
)
from .rules.sgd import sgd
from .rules.sgd_variants import (
    noisy_sgd,
    optimistic_gradient_descent,
    polyak_sgd,
    scale_by_polyak,
)
from .rules.sharpness import sam, sam_step
from .rules.sign import lion, scale_by_lion, scale_by_signum, sign_sgd, signum
from .rules.sm3 import scale_by_sm3, sm3
from .rules.sophia import scale_by_sophia, scale_by_sophia_g, sophia, sophia_g, sophia_hessian
from .rules.sophia_h import scale_by_hutchinson_sophia, sophia_h
from .rules.sparse_adam import scale_by_sparse_adam, sparse_adam
from .rules.trust import fromage, lamb, lars, novograd, scale_by_fromage, scale_by_novograd
from .state import State
from .transforms.average import averaged, ema, lookahead, lookahead_sync, polyak
from .transforms.centralize import centralize
from .transforms.clip import (
    adaptive_grad_clip,
    clip,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_norm,
    normalize,
)
from .transforms.constrain import apply_every, keep_params_nonnegative, zero_nans
from .transforms.decay import decoupled_weight_decay, sign_decay, weight_decay
from .transforms.kahan import kahan_summation
from .transforms.linesearch import scale_by_backtracking_linesearch, scale_by_zoom_linesearch
from .transforms.mask import masked_block
from .transforms.momentum import keras_trace, sutskever_trace, trace
from .transforms.noise import add_noise
from .transforms.plateau import reduce_on_plateau
from .transforms.scale import (
    scale,
    scale_by_lr,
    scale_by_param_block_norm,
    scale_by_param_block_rms,
    scale_by_trust_ratio,
    sign,
)
from .tree import pack, register_dataclass, trainables

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "checkpoint",
    "conventions",
    "registry",
    "load",
    "save",
    "accumulate",
    "skip_nonfinite",
    "Combinator",
    "by_path",
    "freeze",
    "masked",
    "partition",
    "set_to_zero",
    "Elementwise",
    "Minimizer",
    "PerLeaf",
    "Rule",
    "State",
    "Transform",
    "WholeTree",
    "adadelta",
    "adaptive_grad_clip",
    "add_noise",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "adjust",
    "asgd",
    "averaged",
    "centralize",
    "chain",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "normalize",
    "apply_every",
    "keep_params_nonnegative",
    "zero_nans",
    "sign_decay",
    "ema_momentum",
    "ema_momentum_bias_corrected",
    "from_optax",
    "lbfgs",
    "lbfgs_step",
    "lbfgs_linesearch",
    "scale_by_lbfgs",
    "value_and_grad_from_state",
    "scale_by_zoom_linesearch",
    "scale_by_backtracking_linesearch",
    "merged_shape",
    "scale_by_lr_decay_after",
    "scale_by_shampoo",
    "scale_by_soap",
    "shampoo",
    "soap",
    "lookahead",
    "lookahead_sync",
    "minimize_step",
    "minimize_step_",
    "muon",
    "decoupled_weight_decay",
    "ema",
    "nadam",
    "optimistic_adam",
    "orthogonalize",
    "pack",
    "polyak",
    "radam",
    "reduce_on_plateau",
    "register_dataclass",
    "rmsprop",
    "rprop",
    "scale",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_asgd",
    "scale_by_centered_rms",
    "scale_by_centered_rms_in_sqrt",
    "scale_by_factored_rms",
    "scale_by_lr",
    "scale_by_nadam",
    "scale_by_optimistic_gradient",
    "scale_by_param_scale",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rms_in_sqrt",
    "scale_by_rprop",
    "scale_by_rss",
    "scale_by_shape_lr",
    "scale_by_trust_ratio",
    "scale_by_param_block_norm",
    "scale_by_param_block_rms",
    "kahan_summation",
    "schedules",
    "memory",
    "setup",
    "sgd",
    "sum_momentum",
    "sign",
    "scale_by_bias_corrected_rms",
    "cocob",
    "mechanize",
    "dadapt_adamw",
    "dog",
    "dowg",
    "prodigy",
    "scale_by_dowg",
    "scale_by_cocob",
    "scale_by_dadapt_adam",
    "scale_by_dog",
    "scale_by_prodigy",
    "scale_by_schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval",
    "schedule_free_sgd",
    "scale_by_sparse_adam",
    "sparse_adam",
    "sutskever_trace",
    "keras_trace",
    "to_optax",
    "trace",
    "trainables",
    "translate",
    "Translation",
    "update",
    "update_",
    "weight_decay",
    "adabelief",
    "adamaxw",
    "amsgrad",
    "nadamw",
    "scale_by_belief",
    "scale_by_yogi",
    "yogi",
    "lion",
    "scale_by_lion",
    "scale_by_signum",
    "sign_sgd",
    "signum",
    # modern rules: ADOPT, AdEMAMix, MADGRAD, SAM, Sophia
    "ademamix",
    "ademamix_alpha",
    "ademamix_b3",
    "adopt",
    "madgrad",
    "ftrl",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_madgrad",
    "scale_by_ftrl",
    "scale_by_ftrl_power",
    "scale_by_simplified_ademamix",
    "sam",
    "sam_step",
    "scale_by_sophia",
    "scale_by_sophia_g",
    "simplified_ademamix",
    "sophia",
    "sophia_g",
    "sophia_hessian",
    "step_power",
    # rules/trust.py
    "fromage",
    "lamb",
    "lars",
    "novograd",
    "scale_by_fromage",
    "scale_by_novograd",
    "masked_block",
    # rules/adan.py, rules/sm3.py, rules/sgd_variants.py
    "adan",
    "proximal_weight_decay",
    "scale_by_adan",
    "scale_by_sm3",
    "sm3",
    "noisy_sgd",
    "optimistic_gradient_descent",
    "polyak_sgd",
    "scale_by_polyak",
    # rules/acprop.py
    "acprop",
    "scale_by_acprop",
    # rules/momo.py
    "momo",
    "momo_adam",
    "scale_by_momo",
    "scale_by_momo_adam",
    # rules/private.py
    "differentially_private_aggregate",
    "dpsgd",
    "per_example_global_norm_clip",
    # rules/galore.py
    "GaLoreDimensionNumbers",
    "galore",
    "scale_by_galore",
    # rules/sophia_h.py
    "scale_by_hutchinson_sophia",
    "sophia_h",
    # rules/kron.py
    "kron",
    "psgd_update_probability",
    "scale_by_kron",
]

from .interop.jax import register_state as _register_state  # noqa: E402

_register_state()  # where JAX or flax is already imported; never imports either

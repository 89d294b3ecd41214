"""The multi-tensor path (uniopt.fast.foreach), on CPU tensors where it is forced (no GPU here):
the rule's own kernels over lists of tensors, one ``torch._foreach_*`` call per operation.

Held to the reference path bit for bit (on the CPU each ``_foreach`` op is torch's per-tensor
op), to torch's own ``foreach=True`` classes bit for bit where torch's foreach equals its
for-loop, and counted: a step dispatches as many operations for 1,000 tensors as for 10, on the
CPU and on the ``meta`` device. With ``capturable=True`` a step reads nothing back to the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import pytest

torch = pytest.importorskip("torch")

import uniopt as uo  # noqa: E402
import uniopt.torch as ut  # noqa: E402
from uniopt import fast, registry  # noqa: E402
from uniopt.base import Elementwise, Transform  # noqa: E402
from uniopt.fast import foreach  # noqa: E402

TorchDispatchMode = pytest.importorskip("torch.utils._python_dispatch").TorchDispatchMode

SHAPES = [(3, 2), (4,), ()]


def _cases() -> list[tuple[str, Transform]]:
    """Every registry rule whose parts are all elementwise, in each of its conventions, and a
    few chains."""
    out = []
    for name, e in registry.entries().items():
        if e.needs_closure or "torch" not in e.backends or e.step_args:
            continue
        for conv in list(getattr(e.rule, "conventions", {}) or {}) or [None]:
            kw = dict(e.example) | ({} if conv is None else {"convention": conv})
            rule = e.rule(**kw)
            if all(isinstance(p, Elementwise) and not p.needs_norm for p in rule.flat_parts):
                out.append((name if conv is None else f"{name}[{conv}]", rule))
    out += [
        ("chain(weight_decay, adam)", uo.chain(uo.weight_decay(0.1), uo.adam(lr=0.01))),
        ("chain(clip, sgd, ema)", uo.chain(uo.clip(0.5), uo.sgd(lr=0.1, momentum=0.9),
                                           uo.ema(0.9))),
        ("chain(sign, scale)", uo.chain(uo.sign(), uo.scale(0.01))),
    ]
    return out


CASES = _cases()
IDS = [label for label, _ in CASES]
DTYPES = [torch.float32, torch.float64]


@contextlib.contextmanager
def _reference() -> Iterator[None]:
    """Steps in this context run the engine's reference path: no strategy takes them."""
    saved = fast.STRATEGIES
    fast.STRATEGIES = ()
    try:
        yield
    finally:
        fast.STRATEGIES = saved


def _run(rule: Transform, path: Callable[[], Any], dtype: torch.dtype, steps: int,
         inplace: bool = True, state_dtype: str | None = None
         ) -> tuple[list[torch.Tensor], uo.State]:
    g = torch.Generator().manual_seed(7)
    # 16-bit: float32 draws rounded, as a model's would be
    draw = dtype if dtype in DTYPES else torch.float32
    ps = [torch.randn(s, generator=g, dtype=draw).to(dtype) for s in SHAPES]
    state = uo.setup(rule, ps, state_dtype=state_dtype)
    with path(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a schedule's value warnings are the rule's own
        for _ in range(steps):
            gs = [torch.randn(s, generator=g, dtype=draw).to(dtype) for s in SHAPES]
            if inplace:
                state = uo.update_(state, ps, gs)
            else:
                state, ps = uo.update(state, ps, gs)
    return ps, state


def _same(a: tuple[list[torch.Tensor], uo.State], b: tuple[list[torch.Tensor], uo.State]) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y), (x - y).abs().max()
    for key, xs in a[1].slots.items():
        for x, y in zip(xs, b[1].slots[key], strict=True):
            assert torch.equal(x, y), key


def _parity(rule: Transform, dtype: torch.dtype, steps: int,
            state_dtype: str | None = None) -> None:
    before = foreach.STEPS
    ours = _run(rule, foreach.forced, dtype, steps, state_dtype=state_dtype)
    assert foreach.STEPS - before == steps  # every step took the multi-tensor path
    _same(ours, _run(rule, _reference, dtype, steps, state_dtype=state_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", [r for _, r in CASES], ids=IDS)
def test_equals_the_reference_path_bit_for_bit(rule: Transform, dtype: torch.dtype) -> None:
    _parity(rule, dtype, steps=4)


# what only a long run shows is in the step-dependent coefficients (bias corrections, warm-ups,
# RAdam's switch), the same numbers for either dtype: float32's 300 steps, float64's 4 above
@pytest.mark.slow
@pytest.mark.parametrize("rule", [r for _, r in CASES], ids=IDS)
def test_equals_the_reference_path_for_300_steps(rule: Transform) -> None:
    _parity(rule, torch.float32, steps=300)


# float16/bfloat16 params compute in float32 (their slots in their dtype, or in float32 with
# state_dtype="float32"), widened and rounded back once, as on the reference path: every rule in
# bfloat16, the other three kinds of 16-bit group on a rule of each kind of kernel
WIDE_LABELS = ["adamw[torch]", "adam[optax]", "sgd[torch]", "rprop[torch]", "lion[paper]",
               "chain(clip, sgd, ema)"]
WIDE = [(label, torch.bfloat16, None) for label in IDS] + [
    (label, dtype, state_dtype) for label in WIDE_LABELS
    for dtype, state_dtype in ((torch.float16, None), (torch.bfloat16, "float32"),
                               (torch.float16, "float32"))]


@pytest.mark.parametrize(("label", "dtype", "state_dtype"), WIDE,
                         ids=[f"{label}-{str(d)[6:]}-{s}" for label, d, s in WIDE])
def test_16_bit_params_equal_the_reference_path_bit_for_bit(
        label: str, dtype: torch.dtype, state_dtype: str | None) -> None:
    _parity(dict(CASES)[label], dtype, steps=4, state_dtype=state_dtype)


# (adan's kernel keeps the gradient itself as its slot of the last one: a pure step copies it)
PURE = ["adamw[torch]", "chain(weight_decay, adam)", "rprop[torch]", "chain(clip, sgd, ema)",
        "adan[optax]"]


@pytest.mark.parametrize(("label", "dtype", "state_dtype"),
                         [(label, torch.float32, None) for label in PURE]
                         + [(label, torch.bfloat16, sd) for label in PURE
                            for sd in (None, "float32")])
def test_a_pure_step_equals_the_in_place_one_and_aliases_nothing(
        label: str, dtype: torch.dtype, state_dtype: str | None) -> None:
    rule = dict(CASES)[label]
    ps, state = _run(rule, foreach.forced, dtype, 3, inplace=False, state_dtype=state_dtype)
    _same((ps, state), _run(rule, foreach.forced, dtype, 3, state_dtype=state_dtype))
    given = [torch.ones(s, dtype=dtype) for s in SHAPES]
    grads = [torch.ones(s, dtype=dtype) for s in SHAPES]
    state = uo.setup(rule, given, state_dtype=state_dtype)
    with foreach.forced():
        new_state, new = uo.update(state, given, grads)
    assert [x.dtype for x in new] == [dtype] * len(SHAPES)
    for key, xs in new_state.slots.items():
        assert [x.dtype for x in xs] == [x.dtype for x in state.slots[key]], key
    inputs = {x.data_ptr() for x in [*given, *grads, *(s for v in state.slots.values()
                                                      for s in v)] if x.numel()}
    outputs = [*new, *(s for v in new_state.slots.values() for s in v)]
    assert not inputs & {x.data_ptr() for x in outputs if x.numel()}


# torch's own foreach classes, bit for bit where torch's foreach is its for-loop's arithmetic
# (NAdam, RAdam and ASGD's foreach implementations order their operations otherwise, and
# differ from torch's own for-loop on 4-100% of elements after 50 steps; uniopt follows the
# for-loop there, as tests/test_torch_exact.py holds it)
TORCH_FOREACH = [
    ("AdamW", {"lr": 0.01}), ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True}), ("SGD", {"lr": 0.01, "momentum": 0.9}),
    ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.01, "centered": True}), ("Adagrad", {"lr": 0.1}),
    ("Adamax", {"lr": 0.01}), ("Adadelta", {}), ("Rprop", {}),
]


def _train(cls: Any, dtype: torch.dtype, steps: int = 30, **kw: Any) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]
    opt = cls(ps, **kw)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return [p.detach() for p in ps]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "kw"), TORCH_FOREACH,
                         ids=[f"{n}{sorted(k)}" for n, k in TORCH_FOREACH])
def test_equals_torch_foreach_bit_for_bit(name: str, kw: dict[str, Any],
                                          dtype: torch.dtype) -> None:
    before = foreach.STEPS
    ours = _train(getattr(ut, name), dtype, foreach=True, **kw)
    assert foreach.STEPS - before == 30
    theirs = _train(getattr(torch.optim, name), dtype, foreach=True, **kw)
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x, y)


# --- the number of device operations ------------------------------------------------------------


class _Count(TorchDispatchMode):
    """The operations dispatched, but views (a view of memory is made on the host, no device
    operation)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func.is_view:
            self.views += 1
        else:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _engine_ops(rule: Transform, n: int, device: str, dtype: torch.dtype = torch.float32,
                state_dtype: str | None = None) -> int:
    ps = [torch.zeros(4, device=device, dtype=dtype) for _ in range(n)]
    gs = [torch.ones(4, device=device, dtype=dtype) for _ in range(n)]
    state = uo.setup(rule, ps, state_dtype=state_dtype)
    with foreach.forced():
        state = uo.update_(state, ps, gs)
        with _Count() as c:
            uo.update_(state, ps, gs)
    if dtype == torch.float32:
        assert c.views == 0
    return len(c.ops)


def _facade_ops(make: Callable[..., torch.optim.Optimizer], n: int, device: str,
                **flags: Any) -> int:
    ps = [torch.nn.Parameter(torch.zeros(4, device=device)) for _ in range(n)]
    for p in ps:
        p.grad = torch.ones(4, device=device)
    # off the CPU the multi-tensor path is the default; on it, foreach=True asks for it
    opt = make(ps, **(flags or ({"foreach": True} if device == "cpu" else {})))
    opt.step()  # the state is made
    with _Count() as c:
        opt.step()
    return len(c.ops)


ENGINE = {"adamw": uo.adamw(), "adam": uo.adam(), "sgd_momentum": uo.sgd(lr=0.1, momentum=0.9)}
FACADE: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": ut.AdamW, "adam": ut.Adam,
    "sgd_momentum": lambda ps, **kw: ut.SGD(ps, lr=0.1, momentum=0.9, **kw),
}


# On the meta device each _foreach op is torch's Python decomposition, a millisecond per
# tensor: the suite counts 10 and 100 tensors there for AdamW, and 1,000 in the slow run
SIZES = (10, 100, 1000)
COUNTS = [("cpu", name, SIZES) for name in ENGINE] + [("meta", "adamw", SIZES[:2])]
SLOW_COUNTS = [("meta", name, SIZES) for name in ENGINE]


def _constant(counts: list[int]) -> None:
    assert max(counts) - min(counts) <= 2, counts


WITH_SLOW = [*COUNTS, *(pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_COUNTS)]


@pytest.mark.parametrize(("device", "name", "sizes"), WITH_SLOW)
def test_an_engine_step_dispatches_as_many_operations_for_any_number_of_tensors(
        device: str, name: str, sizes: tuple[int, ...]) -> None:
    counts = [_engine_ops(ENGINE[name], n, device) for n in sizes]
    _constant(counts)
    assert counts[0] < 30, counts  # AdamW 16, Adam 14, SGD with momentum 6


@pytest.mark.parametrize(("device", "name", "sizes"), WITH_SLOW)
def test_a_uniopt_torch_step_dispatches_as_many_operations_for_any_number_of_tensors(
        device: str, name: str, sizes: tuple[int, ...]) -> None:
    _constant([_facade_ops(FACADE[name], n, device) for n in sizes])


@pytest.mark.parametrize(("dtype", "state_dtype"), [(torch.bfloat16, None),
                                                    (torch.float16, "float32")])
def test_a_16_bit_step_dispatches_as_many_operations_for_any_number_of_tensors(
        dtype: torch.dtype, state_dtype: str | None) -> None:
    counts = [_engine_ops(uo.adamw(), n, "cpu", dtype, state_dtype) for n in SIZES]
    _constant(counts)
    # AdamW's 16 (its writes converting as they copy) and, for each list widened to float32
    # (params, gradients and 16-bit slots), an allocation and a converting copy
    assert counts[0] == 16 + 2 * (4 if state_dtype is None else 2), counts


def test_a_capturable_step_dispatches_as_many_operations_for_any_number_of_tensors() -> None:
    # the coefficients computed on the device add a fixed number: AdamW 16 + 14
    _constant([_facade_ops(ut.AdamW, n, "cpu", capturable=True) for n in SIZES])


def test_the_reference_path_dispatches_per_tensor() -> None:
    # what the multi-tensor path saves: the reference path's count grows with the tensors
    with _reference():
        counts = [_engine_ops(uo.adamw(), n, "cpu") for n in (10, 100)]
    assert counts[1] > 5 * counts[0]


def test_meta_tensors_take_the_multi_tensor_path_unforced() -> None:
    ps = [torch.zeros(3, device="meta")]
    state = uo.setup(uo.adam(), ps)
    before = foreach.STEPS
    uo.update_(state, ps, [torch.ones(3, device="meta")])
    assert foreach.STEPS == before + 1


@pytest.mark.parametrize("rule", [uo.noisy_sgd(lr=0.1, seed=3),
                                  uo.chain(uo.add_noise(0.1, 0.55, seed=3), uo.adam())],
                         ids=["noisy_sgd", "add_noise-adam"])
def test_rules_that_draw_noise_step_on_the_meta_device(rule: uo.Transform) -> None:
    """The meta device has no generator: a rule that draws keeps a CPU generator's state for
    its seed (the one a CPU run starts from), and a step on meta tensors, shapes only, draws
    nothing and leaves it as it was. (Set-up raised "META device type not an accelerator".)"""
    ps = [torch.zeros(3, 2, device="meta"), torch.zeros(4, device="meta", dtype=torch.float64)]
    gs = [torch.ones_like(p) for p in ps]
    state = uo.setup(rule, ps)
    seeded = uo.setup(rule, [torch.zeros(3, 2), torch.zeros(4, dtype=torch.float64)])
    (key,) = state.tree_states
    assert torch.equal(state.tree_states[key], seeded.tree_states[key])
    new, out = uo.update(state, ps, gs)
    assert [(x.device.type, x.shape, x.dtype) for x in out] == [
        ("meta", p.shape, p.dtype) for p in ps]
    assert torch.equal(new.tree_states[key], seeded.tree_states[key])
    assert int(uo.update_(new, ps, gs).step) == 2


# --- capturable: no host synchronisation ------------------------------------------------------


class _NoSync(TorchDispatchMode):
    """Fails on any read of a tensor's value by the host: ``.item()``, ``float(t)``,
    ``bool(t)`` (a Python branch on a tensor), ``.tolist()``."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


CAPTURABLE: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": lambda ps, **kw: ut.AdamW(ps, lr=0.01, **kw),
    "Adam_amsgrad": lambda ps, **kw: ut.Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.1, **kw),
    "SGD_momentum": lambda ps, **kw: ut.Optimizer(ps, uo.sgd(lr=0.01, momentum=0.9), **kw),
    "RMSprop": lambda ps, **kw: ut.RMSprop(ps, lr=0.01, **kw),
    "Adamax": lambda ps, **kw: ut.Adamax(ps, lr=0.01, **kw),
    "lion": lambda ps, **kw: ut.Optimizer(ps, uo.lion(lr=0.01), **kw),
    # a per-leaf part: the reference path, with the device's count (counted out of place)
    "lamb": lambda ps, **kw: ut.Optimizer(ps, uo.lamb(lr=0.01), **kw),
}


def _steps(make: Callable[..., torch.optim.Optimizer], steps: int,
           **kw: Any) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]
    opt = make(ps, **kw)
    for i in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        with _NoSync() if kw.get("capturable") and i else contextlib.nullcontext():
            opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("name", list(CAPTURABLE))
def test_a_capturable_step_reads_nothing_back_to_the_host(name: str) -> None:
    ours, opt = _steps(CAPTURABLE[name], 20, capturable=True)
    # the coefficients come from the device's count, -expm1(t log1p(-(1 - b))) where the
    # host takes 1 - b**t: the same to float64 rounding
    theirs, _ = _steps(CAPTURABLE[name], 20, foreach=True)
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=0)
    run = opt._plans[0].runs[0]
    assert run.device_step is not None and float(run.device_step) == 20.0
    assert [float(opt.state[p]["step"]) for p in opt.param_groups[0]["params"]] == [20.0] * 3


def _train_16(dtype: torch.dtype, state_dtype: str | None, steps: int, **kw: Any
              ) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    opt = ut.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True, **kw,
                   **({"state_dtype": state_dtype} if state_dtype else {}))
    for i in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        with _NoSync() if kw.get("capturable") and i else contextlib.nullcontext():
            opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize(("dtype", "state_dtype"), [(torch.bfloat16, None),
                                                    (torch.float16, None),
                                                    (torch.bfloat16, "float32")])
def test_uniopt_torch_16_bit_groups_take_the_path_and_equal_the_default_one(
        dtype: torch.dtype, state_dtype: str | None) -> None:
    before = foreach.STEPS
    ours, opt = _train_16(dtype, state_dtype, 30, foreach=True)
    assert foreach.STEPS - before == 30
    loop_before = fast.cpu.STEPS
    # CPU tensors' default: bfloat16 the compiled loop (its views of the bits have no
    # reference path), float16 in the suite's small steps the reference path
    theirs, loop = _train_16(dtype, state_dtype, 30)
    assert fast.cpu.STEPS - loop_before == (30 if dtype == torch.bfloat16 else 0)
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x, y)
    for p, q in zip(opt.param_groups[0]["params"], loop.param_groups[0]["params"],
                    strict=True):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            a, b = opt.state[p][key], loop.state[q][key]
            assert a.dtype == (torch.float32 if state_dtype else dtype)
            assert torch.equal(a, b), key
    # capturable: nothing read back to the host; the coefficients from the device's count
    # differ from the host's in their last float32 bit, so an element may round to the
    # neighbouring 16-bit value
    captured, cap = _train_16(dtype, state_dtype, 30, capturable=True)
    ulp = torch.finfo(dtype).eps
    for x, y in zip(captured, ours, strict=True):
        torch.testing.assert_close(x, y, rtol=ulp, atol=1e-3 * ulp)
    # float32 slots show that the coefficients are float32 (16-bit ones: 4e-3 apart)
    slot_ulp = torch.finfo(torch.float32 if state_dtype else dtype).eps
    for p, q in zip(cap.param_groups[0]["params"], opt.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(cap.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"],
                                   rtol=4 * slot_ulp, atol=0)


# hyperparameters as one-element tensors on the device, which a scheduler writes in place: a
# captured graph replays with their new values, so a step reads them there (not on the host)
TENSOR_VALUES: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "AdamW": (ut.AdamW, {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1}),
    "Adam_amsgrad": (lambda ps, **kw: ut.Adam(ps, amsgrad=True, **kw), {"lr": 0.01}),
    "RMSprop": (ut.RMSprop, {"lr": 0.01, "alpha": 0.9}),
    "Adamax": (ut.Adamax, {"lr": 0.01}),
    "Adadelta": (ut.Adadelta, {"lr": 0.5}),
    "Rprop": (ut.Rprop, {"lr": 0.01}),
    "lion": (lambda ps, capturable, foreach, **values: ut.Optimizer(
        [{"params": ps, **values}], uo.lion(), capturable=capturable, foreach=foreach),
             {"lr": 0.01, "b1": 0.8}),
}


def _tensor_run(name: str, tensors: bool) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    make, values = TENSOR_VALUES[name]

    def value(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(map(value, v))
        return torch.tensor(v, dtype=torch.float64) if tensors else v

    g = torch.Generator().manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]
    opt = make(ps, capturable=tensors, foreach=not tensors,
               **{k: value(v) for k, v in values.items()})
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.7)
    for i in range(8):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        with _NoSync() if tensors and i else contextlib.nullcontext():
            opt.step()
        sched.step()  # a tensor lr: written in place (fill_)
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("name", list(TENSOR_VALUES))
def test_a_capturable_step_reads_tensor_hyperparameters_where_they_are(name: str) -> None:
    ours, opt = _tensor_run(name, tensors=True)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    # the group's rule holds the tensors, not their values: made once, never again
    rule = opt._rule(opt.param_groups[0])[0]
    assert opt._rule(opt.param_groups[0])[0] is rule
    theirs, _ = _tensor_run(name, tensors=False)
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=0)


def test_a_capturable_groups_rule_holds_a_list_of_tensors_once() -> None:
    # a list may change in place, so it is looked at every step: its tensors by their identity
    # (an earlier key took the identity of a view made anew each time: a new rule every step)
    ps = [torch.nn.Parameter(torch.ones(3))]
    opt = ut.AdamW(ps, lr=torch.tensor(0.01), capturable=True)
    # (written into the group: the constructor makes a tuple of a list, as torch's does)
    opt.param_groups[0]["betas"] = [torch.tensor(0.9), torch.tensor(0.99)]
    rules = set()
    for _ in range(4):
        ps[0].grad = torch.ones(3)
        opt.step()
        rules.add(id(opt._rule(opt.param_groups[0])[0]))
    assert len(rules) == 1
    opt.param_groups[0]["betas"][1] = torch.tensor(0.999)  # replaced: a rule of its own
    assert id(opt._rule(opt.param_groups[0])[0]) not in rules


@pytest.mark.parametrize("state_dtype", ["q8", "float64"])
def test_a_capturable_group_off_the_multi_tensor_path_reads_tensor_values_on_the_host(
        state_dtype: str) -> None:
    # 8-bit slots take the compiled loop, float64 ones of float32 params the reference path:
    # neither reads numbers on a device, and a tensor lr is its value there, as without capture
    runs = []
    for lr in (torch.tensor(0.01, dtype=torch.float64), 0.01):
        g = torch.Generator().manual_seed(2)
        ps = [torch.nn.Parameter(torch.randn(64, 40, generator=g)) for _ in range(2)]
        opt = ut.AdamW(ps, lr=lr, capturable=True, state_dtype=state_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fast.FastPathUnavailable)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
        runs.append([p.detach() for p in ps])
    assert all(map(torch.equal, *runs))


def test_a_capturable_groups_tensor_values_are_checked_when_its_rule_is_made() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    opt = ut.Optimizer([{"params": [w], "lr": torch.tensor(0.1)}], uo.adam(), capturable=True)
    opt.param_groups[0]["lr"] = torch.tensor(-0.1)
    with pytest.raises(ValueError, match="lr must be >= 0, got -0.1"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(3))


def test_a_device_counted_16_bit_step_computes_its_coefficients_in_float32() -> None:
    # steps of the size of the params, whose last 16-bit bit then depends on the last bits of
    # the bias corrections: those the device computes from its count differ from the host's
    # in their last float32 bit at most, which moves none of these 1,000 elements (checked:
    # rounded to bfloat16 they move 72% of them)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(1000, generator=g).to(torch.bfloat16) for _ in range(3)]

    def run(step: Any) -> torch.Tensor:
        ps = [torch.zeros(1000, dtype=torch.bfloat16)]
        state = dataclasses.replace(uo.setup(uo.adam(lr=0.01), ps), step=step)
        with foreach.forced():
            for grad in grads:
                state = uo.update_(state, ps, [grad])
        return ps[0]

    moved = run(torch.zeros((), dtype=torch.float64)) != run(0)
    assert moved.float().mean() < 0.01, moved.float().mean()


def test_a_device_counted_engine_step_counts_in_place() -> None:
    ps = [torch.zeros(3)]
    step = torch.zeros((), dtype=torch.float64)
    state = dataclasses.replace(uo.setup(uo.adam(lr=0.1), ps), step=step)
    with foreach.forced(), _NoSync():
        state = uo.update_(state, ps, [torch.ones(3)])
        state = uo.update_(state, ps, [torch.ones(3)])
    assert state.step is step and float(step) == 2.0
    torch.testing.assert_close(ps[0], torch.full((3,), -0.2), rtol=1e-6, atol=0)


def test_a_device_counted_engine_step_of_a_rule_that_needs_the_host_is_refused() -> None:
    # (the engine's own step, where no optimizer class checked the rule first: refused before
    # anything is written, its count too)
    ps = [torch.zeros(3)]
    step = torch.zeros((), dtype=torch.float64)
    state = dataclasses.replace(uo.setup(uo.radam(lr=0.1), ps), step=step)
    with foreach.forced(), pytest.raises(TypeError, match=r"radam's part scale_by_radam "
                                                          r"computes its coefficients on the host"):
        uo.update_(state, ps, [torch.ones(3)])
    assert torch.equal(ps[0], torch.zeros(3)) and float(step) == 0.0


@pytest.mark.parametrize("make", [lambda ps, **kw: ut.NAdam(ps, **kw),
                                  lambda ps, **kw: ut.RAdam(ps, **kw),
                                  lambda ps, **kw: ut.ASGD(ps, **kw)], ids=["NAdam", "RAdam",
                                                                           "ASGD"])
def test_a_rule_whose_coefficients_need_the_host_is_refused_capture(make: Any) -> None:
    """Off the CPU (here the meta device: refused before any arithmetic, and before any state
    is made, where the multi-tensor path's own check left one behind). A flag the optimizer
    was not made with is named as what torch.compile writes, with what to do."""
    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    p.grad = torch.ones(3, device="meta")
    opt = make([p], capturable=True)
    with pytest.raises(TypeError, match=r"part scale_by_.* computes its coefficients on the "
                                        r"host.*\(param group 0\)$"):
        opt.step()
    assert not opt.state[p]
    opt = make([p])
    opt.param_groups[0]["capturable"] = True  # (as dynamo's _set_capturable writes it)
    with pytest.raises(TypeError, match=r"on the host.*Param group 0 holds capturable=True, "
                                        r"which the optimizer was not made with: torch.compile"
                                        r".*_set_capturable.*group\['capturable'\] = False"):
        opt.step()
    assert not opt.state[p]


@pytest.mark.parametrize("make", [ut.NAdam, ut.RAdam, ut.ASGD])
def test_on_the_cpu_a_rule_whose_coefficients_need_the_host_steps_capturable(make: Any) -> None:
    """No graph captures a step of CPU tensors, and torch.compile marks every group
    capturable=True itself (dynamo's ``_set_capturable``, when a compiled function writes a
    group value): NAdam, RAdam and ASGD were refused every step, where torch.optim's step
    them. On the CPU such a rule steps with the host's count: ``capturable=False``'s numbers,
    bit for bit, and its count on the device follows."""
    runs = []
    for capturable in (False, True):
        g = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
              for s in SHAPES]
        opt = make(ps, lr=0.01, capturable=capturable)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        runs.append([p.detach() for p in ps])
        assert [float(opt.state[p]["step"]) for p in ps] == [6.0] * len(ps)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda lr, p=None: ut.AdamW([_ones() if p is None else p],
                                                                lr=lr, capturable=True),
                                  lambda lr, p=None: ut.Optimizer([_ones() if p is None else p],
                                                                  uo.sgd(lr=lr), capturable=True)],
                         ids=["AdamW", "Optimizer-sgd"])
def test_capture_refuses_a_uniopt_schedule_naming_it(make: Any) -> None:
    """capturable=True with a uniopt schedule (even ``constant``) was refused as the rule's
    part "computing its coefficients on the host; the rules whose coefficients are arithmetic
    on the step (Adam, AdamW, SGD...) can": AdamW named as refused and as capturable. The
    schedule's value is checked on the host at every step; the message names the
    hyperparameter by the user's name (not a part's, adamw's folded_lr) and what to give.
    Off the CPU (the meta device here); on the CPU, where no graph is captured, it steps."""
    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    p.grad = torch.ones(3, device="meta")
    opt = make(uo.schedules.cosine(1e-2, steps=10), p)
    with pytest.raises(TypeError, match=r"'s lr is a uniopt schedule.*capturable=True.*torch "
                                        r"lr_scheduler"):
        opt.step()
    assert not opt.state[p]  # nothing made
    opt = make(uo.schedules.cosine(1e-2, steps=10))
    opt.step()
    assert float(opt.param_groups[0]["params"][0].detach()[0]) < 1
    opt = make(torch.tensor(1e-2))  # (a tensor lr, which a scheduler drives, steps)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    for _ in range(2):
        opt.step()
        scheduler.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(2.5e-3)


@pytest.mark.filterwarnings("ignore:uniopt. fast path not used")
@pytest.mark.parametrize("make", [
    lambda: uo.chain(uo.clip_by_global_norm(1.0), uo.adamw(lr=1e-2), uo.ema(0.9)),
    lambda: uo.chain(uo.clip_by_global_norm(1.0), uo.sgd(lr=1e-2), uo.ema(0.9))],
    ids=["clip-adamw-ema", "clip-sgd-ema"])
def test_a_captured_step_of_a_0d_parameter_keeps_its_dtype(make: Any) -> None:
    """capturable=True computes a step's numbers from its count on the device, 0-d float64
    tensors; against a 0-d float32 parameter torch promotes (0-d with 0-d), and after a clip
    an average's lerp refused the float64 mix. They meet each leaf in its dtype: the run is
    the uncaptured one's."""
    runs = []
    for capturable in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.tensor(0.5))]
        opt = ut.Optimizer(ps, make(), capturable=capturable)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        assert ps[1].dtype == torch.float32
        runs.append([p.detach().clone() for p in ps])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _ones() -> Any:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    return p


def test_the_options_of_uniopt_torch_optimizer() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    assert "foreach" not in ut.Optimizer([w], uo.sgd()).param_groups[0]  # as it was
    opt = ut.Optimizer([w], uo.sgd(lr=0.5), foreach=True)
    assert opt.param_groups[0]["foreach"] is True
    w.grad = torch.ones(3)
    before = foreach.STEPS
    opt.step()
    assert foreach.STEPS == before + 1
    opt.param_groups[0]["foreach"] = False  # the plan is rebuilt: the compiled loop's again
    opt.step()
    assert foreach.STEPS == before + 1
    assert torch.equal(w.detach(), torch.zeros(3))


# --- what the path leaves to the reference path, and its errors -------------------------------


def test_what_it_declines_runs_on_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "_warned", set())  # each reason is said once per process
    ps = [torch.ones(3, dtype=torch.float16)]
    state = uo.setup(uo.adam(), ps, state_dtype="float64")
    before = foreach.STEPS
    with foreach.forced(), pytest.warns(fast.FastPathUnavailable, match="float16 and state "
                                                                         "as float64"):
        uo.update_(state, ps, [torch.ones(3, dtype=torch.float16)])
    assert foreach.STEPS == before
    ps = [torch.ones(3)]
    state = uo.setup(uo.chain(uo.clip_by_global_norm(1.0), uo.sgd()), ps)
    with foreach.forced(), pytest.warns(fast.FastPathUnavailable, match="norm"):
        uo.update_(state, ps, [torch.ones(3)])
    assert foreach.STEPS == before


def test_a_bad_gradient_gets_the_engines_error() -> None:
    ps = [torch.ones(3)]
    state = uo.setup(uo.adam(), ps)
    with foreach.forced(), pytest.raises(ValueError, match="has shape"):
        uo.update_(state, ps, [torch.ones(4)])
    assert torch.equal(ps[0], torch.ones(3))


def test_mixed_dtypes_run_as_one_list_each() -> None:
    ps = [torch.ones(3), torch.ones(2, dtype=torch.float64), torch.ones(1)]
    ref = [p.clone() for p in ps]
    gs = [torch.full_like(p, 0.5) for p in ps]
    with foreach.forced(), _Count() as c:
        uo.update_(uo.setup(uo.adam(lr=0.1), ps), ps, gs)
    with _reference():
        uo.update_(uo.setup(uo.adam(lr=0.1), ref), ref, gs)
    assert all(map(torch.equal, ps, ref))
    assert c.ops.count("aten._foreach_sqrt.default") == 2  # a list of float32, one of float64


def test_a_kernel_that_branches_on_values_is_told_to_select() -> None:
    xs = foreach.Lists([torch.ones(2)])
    with pytest.raises(TypeError, match=r"^uniopt: a kernel branched on the values of its arrays; "
                                        r"use uniopt\.moments\.select$"):
        bool(xs > 0)
    with pytest.raises(TypeError, match=r"^uniopt\.fast\.foreach: where's condition is a float$"):
        foreach.XP.where(1.0, xs, xs)
    with pytest.raises(TypeError, match="coefficient on the device"):
        foreach.XP.maximum(xs, torch.tensor(1.0))


class _Shift(NamedTuple):
    pass


@dataclasses.dataclass(frozen=True)
class _shift(Elementwise):
    """A kernel whose new slot ``b`` is the old ``a``, and whose ``a`` is the old parameter."""

    slots: ClassVar[tuple[str, ...]] = ("a", "b")

    def coeffs(self, step: Any) -> _Shift:
        return _Shift()

    @staticmethod
    def kernel(xp, c, p, u, a, b):  # type: ignore[no-untyped-def]
        return u, p, a


def test_a_slot_that_is_an_old_value_keeps_it() -> None:
    ps = [torch.full((2,), 3.0)]
    state = uo.setup(_shift(), ps)
    state.slots["_shift.a"][0].fill_(5.0)
    with foreach.forced():
        uo.update_(state, ps, [torch.ones(2)])
    assert ps[0].tolist() == [2.0, 2.0]
    assert state.slots["_shift.a"][0].tolist() == [3.0, 3.0]
    assert state.slots["_shift.b"][0].tolist() == [5.0, 5.0]


def test_comparisons_are_masks_and_select_is_exact() -> None:
    x = torch.tensor([-2.0, 0.0, 3.0, float("nan")])
    xs = foreach.Lists([x])
    for got, want in [(xs > 0, x > 0), (xs < 0, x < 0), (xs > 1.0, x > 1.0)]:
        assert torch.equal(got.ts[0], want.to(x.dtype))  # NaN: false, as the reference's
    x, xs = x[:3], foreach.Lists([x[:3]])  # a NaN has sign 0: it compares as 0 does below
    for got, want in [(xs >= 0, x >= 0), (xs <= 0, x <= 0), (xs == 0, x == 0),
                      (xs != 0, x != 0), (xs < xs, x < x)]:
        assert torch.equal(got.ts[0], want.to(x.dtype))
    x = torch.tensor([-2.0, 0.0, 3.0, float("nan")])
    xs = foreach.Lists([x])
    a, b = torch.tensor([1e-30, 5.0, -7.0, 2.0]), torch.tensor([1.0, 1e30, 3.0, -0.5])
    picked = foreach.XP.where(xs > 0, foreach.Lists([a]), foreach.Lists([b]))
    assert torch.equal(picked.ts[0], torch.where(x > 0, a, b))


def test_prodigys_first_moment_switch_reads_no_host_value_when_capturable() -> None:
    """Prodigy's test of ``betas[0] == 0`` (a step where the first moment is off) read a
    tensor ``betas[0]`` back to the host at every capturable step, a device synchronisation
    a CUDA graph cannot capture; it stays a tensor, and the step its numbers."""
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = ut.Optimizer([p], uo.prodigy(), capturable=True)
    ref = ut.Optimizer([q], uo.prodigy())
    opt.param_groups[0]["betas"] = (torch.tensor(0.9, dtype=torch.float64), 0.999)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        grad = torch.randn(5, generator=g, dtype=torch.float64)
        p.grad, q.grad = grad.clone(), grad.clone()
        if i >= 2:  # (the first steps make the plan and the state, on the host)
            with _NoSync():
                opt.step()
        else:
            opt.step()
        ref.step()
    assert torch.allclose(p, q, rtol=1e-12, atol=0)

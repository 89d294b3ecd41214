"""Schedule-free and parameter-free rules against their authors' code and optax.contrib.

The torch references (Meta's ``schedulefree``, the authors' ``prodigyopt``) run on float64
tensors; optax runs under ``jax.jit`` in x64; ours on NumPy (the reference path). Each side
runs free, its gradients taken at its own parameters, so a wrong step shows in every later one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")
jnp = jax.numpy

import uniopt as uo  # noqa: E402
from helpers import jitted_optax_step, rel_diff  # noqa: E402

SHAPES = {"a": (5, 3), "b": (4,), "c": ()}
KEYS = sorted(SHAPES)
STEPS = 300
TOL = 1e-12


@pytest.fixture(autouse=True)
def _x64():  # type: ignore[no-untyped-def]
    with jax.enable_x64(True):
        yield


def _grad(x: Any, noise: np.ndarray) -> Any:
    return np.tanh(x) * 0.5 + noise


def _run(ours: uo.Transform, steps: int = STEPS, seed: int = 0, *,
         torch_opt: Callable[[list[Any]], Any] | None = None, tx: Any = None,
         check: Callable[[uo.State, dict[str, Any], Any, Any], None] | None = None,
         ) -> tuple[float, float]:
    """Largest relative difference of the params from the torch reference and from optax."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    state = uo.setup(ours, params)
    tp = [torch.tensor(params[k], dtype=torch.float64, requires_grad=True) for k in KEYS]
    topt = torch_opt(tp) if torch_opt else None
    if topt is not None and hasattr(topt, "train"):
        topt.train()
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    js = tx.init(jp) if tx is not None else None
    jstep = jitted_optax_step(tx) if tx is not None else None
    worst_t = worst_j = 0.0
    for _ in range(steps):
        noise = {k: 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()}
        state, params = uo.update(state, params, {k: _grad(params[k], noise[k]) for k in KEYS})
        if topt is not None:
            for t, k in zip(tp, KEYS, strict=True):
                t.grad = torch.as_tensor(np.asarray(_grad(t.detach().numpy(), noise[k])))
            topt.step()
            worst_t = max(worst_t, *(rel_diff(params[k], t.detach().numpy())
                                     for t, k in zip(tp, KEYS, strict=True)))
        if jstep is not None:
            jp, js = jstep(jp, js, {k: _grad(jp[k], noise[k]) for k in KEYS})
            worst_j = max(worst_j, *(rel_diff(params[k], jp[k]) for k in KEYS))
    if check is not None:
        check(state, params, topt if topt is not None else tp, js)
    return worst_t, worst_j


# --- schedule-free -------------------------------------------------------------------------------


def _sf_torch(kind: str, reference: bool = True) -> Any:
    import schedulefree
    from schedulefree.adamw_schedulefree_reference import AdamWScheduleFreeReference
    from schedulefree.sgd_schedulefree_reference import SGDScheduleFreeReference

    if kind == "sgd":
        return SGDScheduleFreeReference if reference else schedulefree.SGDScheduleFree
    return AdamWScheduleFreeReference if reference else schedulefree.AdamWScheduleFree


def _sf_hypers(kind: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    h: dict[str, Any] = {"lr": float(rng.uniform(0.05, 0.5) if kind == "sgd"
                                     else rng.uniform(1e-3, 3e-2)),
                         "weight_decay": float(rng.uniform(0, 0.05)),
                         "warmup_steps": int(rng.integers(0, 30)),
                         "r": float(rng.uniform(0, 1)),
                         "weight_lr_power": float(rng.uniform(0, 3))}
    beta = float(rng.uniform(0.5, 0.98))
    if kind == "sgd":
        h["momentum"] = beta
    else:
        h["betas"] = (beta, float(rng.uniform(0.9, 0.9999)))
        h["eps"] = float(10 ** rng.uniform(-8, -4))
    return h


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("seed", [0, 1])
def test_schedule_free_matches_meta_reference(kind: str, seed: int) -> None:
    h = _sf_hypers(kind, seed)
    rule = uo.schedule_free_sgd if kind == "sgd" else uo.schedule_free_adamw

    def eval_weights(state: uo.State, params: Any, topt: Any, js: Any) -> None:
        # Meta's eval() puts x into the model; ours reads it from the state
        ours = uo.schedule_free_eval(state, params)
        topt.eval()
        for k, t in zip(KEYS, topt.param_groups[0]["params"], strict=True):
            assert rel_diff(ours[k], t.detach().numpy()) < TOL

    worst, _ = _run(rule(**h), torch_opt=lambda p: _sf_torch(kind)(p, **h), check=eval_weights)
    assert worst < TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_schedule_free_matches_meta_fast_form(kind: str) -> None:
    # SGDScheduleFree/AdamWScheduleFree keep y and z only (x eliminated), as ours do
    h = _sf_hypers(kind, 7)
    rule = uo.schedule_free_sgd if kind == "sgd" else uo.schedule_free_adamw
    worst, _ = _run(rule(**h), torch_opt=lambda p: _sf_torch(kind, reference=False)(
        p, **h, foreach=False))
    assert worst < TOL


@pytest.mark.slow
def test_schedule_free_adamw_paper_matches_meta_paper_form() -> None:
    from schedulefree import AdamWScheduleFreePaper

    h = _sf_hypers("adamw", 8)
    worst, _ = _run(uo.schedule_free_adamw(**h, convention="paper"),
                    torch_opt=lambda p: AdamWScheduleFreePaper(p, **h, foreach=False))
    assert worst < TOL


def _sf_optax(kind: str, h: dict[str, Any], lr: Any) -> Any:
    common = {"learning_rate": lr, "warmup_steps": h.get("warmup_steps") or None,
              "weight_decay": h.get("weight_decay", 0.0),
              "weight_lr_power": h["weight_lr_power"]}
    if kind == "sgd":
        return optax.contrib.schedule_free_sgd(b1=h["momentum"], **common)
    return optax.contrib.schedule_free_adamw(b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"],
                                             **common)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("seed", [0, 1])
def test_schedule_free_matches_optax(kind: str, seed: int) -> None:
    h = _sf_hypers(kind, seed)
    h.pop("r")  # optax has no polynomial weighting
    # optax's warmup_constant_schedule computes in float32 even under x64: a learning rate and
    # a warm-up length that float32 holds exactly (2**-k, t/8) keep the comparison in float64
    h["lr"] = 2.0 ** -3 if kind == "sgd" else 2.0 ** -7
    h["warmup_steps"] = 8 * seed
    rule = uo.schedule_free_sgd if kind == "sgd" else uo.schedule_free_adamw

    def eval_weights(state: uo.State, params: Any, topt: Any, js: Any) -> None:
        ours = uo.schedule_free_eval(state, params)
        theirs = optax.contrib.schedule_free_eval_params(
            js, {k: jnp.asarray(v) for k, v in params.items()})
        for k in KEYS:
            assert rel_diff(ours[k], theirs[k]) < TOL

    _, worst = _run(rule(**h, convention="optax"), tx=_sf_optax(kind, h, h["lr"]),
                    check=eval_weights)
    assert worst < TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_schedule_free_scheduled_lr_matches_optax(kind: str) -> None:
    h = _sf_hypers(kind, 3)
    h.pop("r")
    h["warmup_steps"] = 0
    peak = 0.2 if kind == "sgd" else 0.01
    ours = uo.schedules.cosine(peak, steps=STEPS, floor=0.1 * peak)
    theirs = optax.cosine_decay_schedule(peak, STEPS, alpha=0.1)
    rule = uo.schedule_free_sgd if kind == "sgd" else uo.schedule_free_adamw
    _, worst = _run(rule(**{**h, "lr": ours}, convention="optax"),
                    tx=_sf_optax(kind, h, theirs))
    assert worst < TOL


def test_schedule_free_conventions_differ_only_under_warmup() -> None:
    # at a constant lr the two conventions are one rule; under warm-up optax's z step lags
    h = _sf_hypers("sgd", 4)
    h["warmup_steps"] = 0
    a, b = (_run_np(uo.schedule_free_sgd(**h, convention=c), 20) for c in ("torch", "optax"))
    assert max(rel_diff(a[k], b[k]) for k in KEYS) == 0.0
    h["warmup_steps"] = 5
    a, b = (_run_np(uo.schedule_free_sgd(**h, convention=c), 20) for c in ("torch", "optax"))
    assert max(rel_diff(a[k], b[k]) for k in KEYS) > 1e-3


def _run_np(rule: uo.Transform, steps: int, params: Any = None,
            inplace: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    p = params if params is not None else {
        k: rng.standard_normal(s) for k, s in SHAPES.items()}
    state = uo.setup(rule, p)
    for _ in range(steps):
        g = {k: _like(0.5 * np.asarray(p[k]) + rng.standard_normal(SHAPES[k]), p[k])
             for k in KEYS}
        if inplace:
            state = uo.update_(state, p, g)
        else:
            state, p = uo.update(state, p, g)
    return {k: np.asarray(v) for k, v in p.items()}


def _like(x: np.ndarray, p: Any) -> Any:
    if isinstance(p, torch.Tensor):
        return torch.as_tensor(x)
    return jnp.asarray(x) if isinstance(p, jax.Array) else x


def test_schedule_free_eval_doc_example() -> None:
    p = {"w": np.array([1.0])}
    state = uo.setup(uo.schedule_free_sgd(lr=0.5, momentum=0.5), p)
    for _ in range(2):
        state, p = uo.update(state, p, {"w": np.array([1.0])})
    # z: 1 -> 0.5 -> 0; x: 0.5, then the mean of the z's 0.25; y = (x + z)/2
    assert p["w"][0] == 0.125
    assert uo.schedule_free_eval(state, p)["w"][0] == 0.25


def test_schedule_free_eval_inside_masked_and_partition() -> None:
    p = {"w": np.array([1.0]), "b": np.array([2.0])}
    sf = uo.schedule_free_sgd(lr=0.5, momentum=0.5)
    for rule in (uo.masked(sf, "w"), uo.partition({"a": sf, "b": uo.sgd(lr=0.1)},
                                                  uo.by_path({"w": "a", "b": "b"}))):
        q = {k: v.copy() for k, v in p.items()}
        state = uo.setup(rule, q)
        for _ in range(2):
            state, q = uo.update(state, q, {"w": np.array([1.0]), "b": np.array([1.0])})
        x = uo.schedule_free_eval(state, q)
        assert x["w"][0] == 0.25 and x["b"][0] == q["b"][0] and x["b"] is not q["b"]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_uniopt_torch_eval_and_train_are_schedulefrees(kind: str) -> None:
    """schedulefree's ``optimizer.eval()``/``train()`` swap the evaluation weights into the
    model (the HF Trainer calls them where an optimizer has them); uniopt.torch had neither,
    so a ported run evaluated ``y``, 0.02 from ``x``. ``eval()`` gives the peer's ``x``,
    ``train()`` gives back ``y`` bit for bit, a step between raises with nothing written, and
    a rule without a schedule-free part is left as it is."""
    schedulefree = pytest.importorskip("schedulefree")
    import uniopt.torch as ut

    def model() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                   torch.nn.Linear(3, 1)).double()

    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True)
    h = {"lr": 1e-2, "momentum": 0.9} if kind == "sgd" else {"lr": 1e-2}
    mp, mu = model(), model()
    peer = {"sgd": schedulefree.SGDScheduleFree,
            "adamw": schedulefree.AdamWScheduleFree}[kind](mp.parameters(), **h)
    rule = {"sgd": uo.schedule_free_sgd, "adamw": uo.schedule_free_adamw}[kind](**h)
    ours = ut.Optimizer(mu.parameters(), rule)
    peer.train()
    for _ in range(30):
        for m, o in ((mp, peer), (mu, ours)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    ys = [p.detach().clone() for p in mu.parameters()]
    xs = ours.eval_weights()
    peer.eval()
    ours.eval()
    # (after eval(), the evaluation weights are the parameters: it read them as y before)
    assert all(torch.equal(x, ours.eval_weights()[p]) for p, x in xs.items())
    ours.eval()  # (twice: still x, and train() still gives y back)
    for a, b in zip(mu.parameters(), mp.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    xs = [p.detach().clone() for p in mu.parameters()]
    with pytest.raises(RuntimeError, match=r"after optimizer.eval\(\).*optimizer.train\(\)"):
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(mu.parameters(), xs, strict=True))
    ours.train()
    ours.train()
    assert all(torch.equal(a, b) for a, b in zip(mu.parameters(), ys, strict=True))
    # a checkpoint saved in eval mode (the HF Trainer saves after evaluating) resumes as the
    # run that never stopped: the mode is saved with the groups, and train() makes y of the
    # loaded x and z (a copy held by eval() was lost with the process: y := x, 2e-3 off)
    ours.eval()
    import copy

    # (copies, as a file holds: a loaded state's tensors are the saved dict's own)
    saved = copy.deepcopy({"model": mu.state_dict(), "opt": ours.state_dict()})
    assert all(g["train_mode"] is False for g in saved["opt"]["param_groups"])
    ours.train()
    resumed = model()
    resumed.load_state_dict(saved["model"])
    again = ut.Optimizer(resumed.parameters(), rule)
    again.load_state_dict(saved["opt"])
    with pytest.raises(RuntimeError, match=r"optimizer.train\(\)"):
        again.step()
    again.train()
    for m, o in ((mu, ours), (resumed, again)):
        for _ in range(5):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(resumed.parameters(), mu.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # a load between eval() and train(): the loaded weights, not the copy eval() held
    ours.eval()
    ours.load_state_dict(copy.deepcopy(again.state_dict()))
    with torch.no_grad():
        for a, b in zip(mu.parameters(), resumed.parameters(), strict=True):
            a.copy_(b)
    ours.train()
    assert all(torch.equal(a, b) for a, b in zip(mu.parameters(), resumed.parameters(),
                                                 strict=True))
    # a partition: only the schedule-free member's parameters; and a rule without one
    mu = model()
    split = ut.Optimizer(mu.parameters(), uo.partition(
        {"sf": rule, "sgd": uo.sgd(lr=0.1)}, lambda path, p: "sf" if p.ndim == 2 else "sgd"))
    plain = ut.AdamW(mu.parameters(), lr=0.1)
    for o in (split, plain):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.mse_loss(mu(x), y).backward()
            o.step()
    before = {n: p.detach().clone() for n, p in mu.named_parameters()}
    plain.eval()
    assert all(torch.equal(p, before[n]) for n, p in mu.named_parameters())
    plain.train()
    split.eval()
    moved = {n for n, p in mu.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"0.weight", "2.weight"}, moved
    split.train()
    assert all(torch.equal(p, before[n]) for n, p in mu.named_parameters())


def test_schedule_free_errors() -> None:
    with pytest.raises(ValueError, match=r"^schedule_free_sgd: momentum must be in \(0, 1\), got "
                                         r"0\.0$"):
        uo.schedule_free_sgd(momentum=0.0)
    with pytest.raises(ValueError, match=r"^schedule_free_adamw: betas\[0\] must be in \(0, 1\) "
                                         r"\(y = beta\*x \+ \(1 - beta\)\*z; 0 would make x "
                                         r"unrecoverable\), got 0\.0$"):
        uo.schedule_free_adamw(betas=(0.0, 0.999))
    with pytest.raises(ValueError, match=r"^schedule_free_sgd: warmup_steps must be an integer "
                                         r">= 0, got -1$"):
        uo.schedule_free_sgd(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"^schedule_free_sgd: convention must be one of "
                                         r"'torch', 'optax', got 'keras'$"):
        uo.schedule_free_sgd(convention="keras")
    with pytest.raises(ValueError, match="warm-up"):
        uo.schedule_free_sgd(lr=uo.schedules.cosine(1.0, steps=10), warmup_steps=3,
                             convention="optax")
    state = uo.setup(uo.sgd(lr=0.1), {"w": np.zeros(2)})
    with pytest.raises(ValueError, match="not a schedule-free rule"):
        uo.schedule_free_eval(state, {"w": np.zeros(2)})
    with pytest.raises(TypeError, match=r"^schedule_free_eval: expected a uniopt State, got dict$"):
        uo.schedule_free_eval({"w": np.zeros(2)}, {"w": np.zeros(2)})


# --- Prodigy, DoG -------------------------------------------------------------------------------


def _prodigy_hypers(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"lr": float(rng.uniform(0.3, 1.0)),
            "betas": (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.9999))),
            "eps": float(10 ** rng.uniform(-8, -5)), "d0": float(10 ** rng.uniform(-6, -3)),
            "d_coef": float(rng.uniform(0.5, 2.0))}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prodigy_matches_prodigyopt(seed: int) -> None:
    import prodigyopt

    h = _prodigy_hypers(seed)
    extra = [{}, {"weight_decay": 0.02, "decouple": False, "safeguard_warmup": True,
                  "growth_rate": 1.05}, {"use_bias_correction": True, "beta3": 0.99}][seed]
    worst, _ = _run(uo.prodigy(**h, **extra),
                    torch_opt=lambda p: prodigyopt.Prodigy(p, **h, **extra))
    assert worst < TOL


@pytest.mark.slow
def test_prodigy_decoupled_decay_matches_prodigyopt() -> None:
    import prodigyopt

    h = {**_prodigy_hypers(3), "weight_decay": 0.01}
    worst, _ = _run(uo.prodigy(**h), torch_opt=lambda p: prodigyopt.Prodigy(p, **h))
    # prodigyopt writes p twice (p -= wd*dlr*p, then the step), we write p - u once: a one-ulp
    # difference in p. Early on the steps are d0-sized (1e-6 of |p|), so p0 - p in the
    # estimate's inner product carries a relative error of about 1e-10 from that ulp, and the
    # estimate d feeds it into every later step. optax writes p + u once, as we do, and agrees
    # to 1e-15 (test_prodigy_matches_optax); without the decay prodigyopt agrees to 1e-15.
    assert worst < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_prodigy_matches_optax(seed: int) -> None:
    h = _prodigy_hypers(seed)
    wd = 0.01 * seed
    tx = optax.contrib.prodigy(h["lr"], betas=h["betas"], eps=h["eps"], estim_lr0=h["d0"],
                               estim_lr_coef=h["d_coef"], weight_decay=wd,
                               safeguard_warmup=bool(seed))
    _, worst = _run(uo.prodigy(**h, weight_decay=wd, safeguard_warmup=bool(seed),
                               convention="optax"), tx=tx)
    assert worst < TOL


@pytest.mark.slow
def test_prodigy_scheduled_lr_matches_optax() -> None:
    h = _prodigy_hypers(4)
    ours = uo.schedules.cosine(h["lr"], steps=STEPS, floor=0.1 * h["lr"])
    theirs = optax.cosine_decay_schedule(h["lr"], STEPS, alpha=0.1)
    tx = optax.contrib.prodigy(theirs, betas=h["betas"], eps=h["eps"], estim_lr0=h["d0"],
                               estim_lr_coef=h["d_coef"])
    _, worst = _run(uo.prodigy(**{**h, "lr": ours}, convention="optax"), tx=tx)
    assert worst < TOL


@pytest.mark.slow
@pytest.mark.parametrize("init_step", [("heuristic", 1e-4), ("learning_rate", 1e-2)])
def test_dog_matches_optax(init_step: tuple[str, float]) -> None:
    lr = uo.schedules.cosine(0.8, steps=STEPS) if init_step[0] == "heuristic" else 0.8
    theirs = optax.cosine_decay_schedule(0.8, STEPS) if callable(lr) else lr
    wd = 0.01 if init_step[0] == "learning_rate" else None
    tx = optax.contrib.dog(theirs, init_step=init_step, weight_decay=wd)
    _, worst = _run(uo.dog(lr=lr, init_step=init_step, weight_decay=wd or 0.0), tx=tx)
    assert worst < TOL


@pytest.mark.slow
def test_dowg_matches_optax() -> None:
    start, wd = 0.05, 0.01
    tx = optax.contrib.dowg(0.7, init_estim_sq_dist=start, eps=1e-5, weight_decay=wd)
    _, worst = _run(uo.dowg(lr=0.7, init_estim_sq_dist=start, eps=1e-5, weight_decay=wd),
                    tx=tx)
    assert worst < TOL


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dadapt_adamw_matches_optax(seed: int) -> None:
    h = _prodigy_hypers(seed)
    h.pop("d_coef")
    wd = 0.01 * seed
    lr = uo.schedules.cosine(h["lr"], steps=STEPS) if seed else h["lr"]
    theirs = optax.cosine_decay_schedule(h["lr"], STEPS) if seed else h["lr"]
    tx = optax.contrib.dadapt_adamw(theirs, betas=h["betas"], eps=h["eps"], estim_lr0=h["d0"],
                                    weight_decay=wd)
    _, worst = _run(uo.dadapt_adamw(**{**h, "lr": lr}, weight_decay=wd), tx=tx)
    assert worst < TOL


@pytest.mark.slow
def test_cocob_matches_optax() -> None:
    h = {"lr": 0.5, "alpha": 50.0, "eps": 1e-6, "weight_decay": 0.01}
    tx = optax.contrib.cocob(**{{"lr": "learning_rate"}.get(k, k): v for k, v in h.items()})
    _, worst = _run(uo.cocob(**h), tx=tx)
    assert worst < TOL


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_mechanize_matches_optax(seed: int) -> None:
    if seed == 0:
        ours = uo.mechanize(uo.adam(lr=1e-2, convention="optax"))
        tx = optax.contrib.mechanize(optax.adam(1e-2))
    else:
        ours = uo.mechanize(uo.sgd(lr=0.1, momentum=0.9), weight_decay=0.05, s_init=1e-4,
                            num_betas=3)
        tx = optax.contrib.mechanize(optax.sgd(0.1, momentum=0.9), weight_decay=0.05,
                                     s_init=1e-4, num_betas=3)
    _, worst = _run(ours, seed=seed, tx=tx)
    # Mechanic rebuilds the sum of the rule's updates as (x0 - p)/sum(s), sum(s) starting at
    # num_betas*s_init: one ulp of p becomes 1e-16/6e-6 of it, and the wealth recursion feeds
    # that back. optax's mechanize against itself with p moved by one ulp after its first step
    # differs by 5e-8 within 100 steps (measured); here the two sides differ by the order of
    # their sums (numpy's pairwise vs XLA's) and adam's rounding, about 1e-12 after 300 steps
    # with optax.adam (7e-13 with optax.adam itself as the member, via uo.from_optax).
    assert worst < (1e-10 if seed == 0 else TOL)


def test_mechanize_in_a_chain_and_adjust() -> None:
    # inside a chain it hands on its updates; alone it writes the params: the same step
    rule = uo.mechanize(uo.sgd(lr=0.1, momentum=0.9))
    alone = _run_np(rule, 10)
    chained = _run_np(uo.chain(uo.scale(1.0), rule), 10)
    for k in KEYS:
        assert rel_diff(chained[k], alone[k]) < TOL
    state = uo.adjust(uo.setup(rule, {"w": np.zeros(2)}), **{"inner.lr": 0.5})
    assert state.rule.flat_parts[0].rule.lr == 0.5
    with pytest.raises(ValueError, match=r"^mechanize: num_betas must be an integer >= 1, got 0$"):
        uo.mechanize(uo.sgd(lr=0.1), num_betas=0)
    with pytest.raises(ValueError, match=r"^mechanize: weight_decay must be a number >= 0, got "
                                         r"-1\.0$"):
        uo.mechanize(uo.sgd(lr=0.1), weight_decay=-1.0)


_SIXTEEN = {"numpy float16": lambda a: a.astype(np.float16),
            "numpy bfloat16": lambda a: a.astype(pytest.importorskip("ml_dtypes").bfloat16),
            "torch bfloat16": lambda a: torch.tensor(a).to(torch.bfloat16),
            "jax bfloat16": lambda a: jnp.asarray(a, dtype=jnp.bfloat16)}


@pytest.mark.parametrize("lib", list(_SIXTEEN))
def test_mechanize_keeps_16_bit_params_dtypes(lib: str) -> None:
    """A pure step hands back 16-bit params in their dtype, rounded once, bit for bit the
    in-place step's: they came back float32 (the member's updates of 16-bit leaves are), and
    the next step refused the gradients as of another dtype."""
    conv = _SIXTEEN[lib]
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    rule = uo.mechanize(uo.adam(lr=0.1))
    pure = {k: conv(v) for k, v in start.items()}
    inplace = None if lib.startswith("jax") else {k: conv(v) for k, v in start.items()}
    s_pure = uo.setup(rule, pure)
    s_inplace = None if inplace is None else uo.setup(rule, inplace)
    for _ in range(3):
        g = {k: conv(rng.standard_normal(s)) for k, s in SHAPES.items()}
        s_pure, pure = uo.update(s_pure, pure, g)
        if inplace is not None:
            s_inplace = uo.update_(s_inplace, inplace, g)
    def bits(x: Any) -> bytes:  # (float32 holds every 16-bit value exactly)
        return np.asarray(x.float() if isinstance(x, torch.Tensor) else x, np.float32).tobytes()

    for k in KEYS:
        assert pure[k].dtype == conv(start[k]).dtype, k
        if inplace is not None:
            assert bits(pure[k]) == bits(inplace[k]), k


@pytest.mark.usefixtures("small_steps_compiled")
def test_cocob_compiled_loop_matches_reference() -> None:
    from helpers import reference_path

    rule = uo.cocob(lr=0.5, weight_decay=0.01)
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    fast = _run_np(rule, 20, {k: v.copy() for k, v in p0.items()}, inplace=True)
    with reference_path():
        ref = _run_np(rule, 20, {k: v.copy() for k, v in p0.items()}, inplace=True)
    for k in KEYS:
        assert rel_diff(fast[k], ref[k]) < TOL


def test_parameter_free_errors() -> None:
    with pytest.raises(ValueError, match=r"^prodigy: d0 must be > 0, got 0\.0$"):
        uo.prodigy(d0=0.0)
    with pytest.raises(ValueError, match=r"^prodigy: beta3 must be None \(sqrt\(betas\[1\]\)\) "
                                         r"or a number in \[0, 1\), got 1\.0$"):
        uo.prodigy(beta3=1.0)
    with pytest.raises(ValueError, match=r"^prodigy: growth_rate must be None \(no limit\) or a "
                                         r"number >= 1, got 0\.5$"):
        uo.prodigy(growth_rate=0.5)
    with pytest.raises(ValueError, match=r"^prodigy: convention must be one of 'torch', 'optax', "
                                         r"got 'keras'$"):
        uo.prodigy(convention="keras")
    with pytest.raises(ValueError, match=r"^dog: init_step's kind must be one of 'heuristic', "
                                         r"'distance', 'learning_rate', got 'nope'$"):
        uo.dog(init_step=("nope", 1.0))
    with pytest.raises(ValueError, match=r"^dog: init_step's value must be a number > 0, got "
                                         r"0\.0$"):
        uo.dog(init_step=("distance", 0.0))
    with pytest.raises(ValueError, match=r"^dadapt_adamw: d0 must be > 0, got -1\.0$"):
        uo.dadapt_adamw(d0=-1.0)
    with pytest.raises(ValueError, match="dadapt_adamw: eps must be > 0, got 0"):
        uo.dadapt_adamw(eps=0)
    with pytest.raises(ValueError, match=r"^dowg: init_estim_sq_dist must be None \(eps\) or a "
                                         r"number > 0, got 0\.0$"):
        uo.dowg(init_estim_sq_dist=0.0)
    with pytest.raises(ValueError, match=r"^cocob: eps must be > 0, got 0\.0$"):
        uo.cocob(eps=0.0)
    with pytest.raises(ValueError, match=r"^cocob: alpha must be >= 0, got -1\.0$"):
        uo.cocob(alpha=-1.0)


# --- every rule of this file: backends, in place, jax.jit --------------------------------------

RULES: dict[str, Callable[[], uo.Transform]] = {
    "schedule_free_sgd": lambda: uo.schedule_free_sgd(lr=0.1, weight_decay=0.01,
                                                      warmup_steps=3),
    "schedule_free_adamw": lambda: uo.schedule_free_adamw(lr=0.01, weight_decay=0.01,
                                                          warmup_steps=3),
    "prodigy": lambda: uo.prodigy(weight_decay=0.01, d0=1e-3, use_bias_correction=True),
    "dog": lambda: uo.dog(lr=0.5, weight_decay=0.01),
    "dadapt_adamw": lambda: uo.dadapt_adamw(weight_decay=0.01, d0=1e-3),
    "cocob": lambda: uo.cocob(lr=0.5, weight_decay=0.01),
    "dowg": lambda: uo.dowg(lr=0.5, weight_decay=0.01),
    "mechanize": lambda: uo.mechanize(uo.adam(lr=1e-2)),
}


@pytest.mark.parametrize("name", list(RULES))
def test_backends_and_inplace_agree(name: str) -> None:
    rule = RULES[name]()
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    ref = _run_np(rule, 20, {k: v.copy() for k, v in p0.items()})
    inplace = _run_np(rule, 20, {k: v.copy() for k, v in p0.items()}, inplace=True)
    on_torch = _run_np(rule, 20, {k: torch.tensor(v) for k, v in p0.items()})
    on_jax = _run_np(rule, 20, {k: jnp.asarray(v) for k, v in p0.items()})
    for k in KEYS:
        assert rel_diff(inplace[k], ref[k]) == 0.0
        assert rel_diff(on_torch[k], ref[k]) < TOL
        assert rel_diff(on_jax[k], ref[k]) < TOL


# every rule's single compile under jax.jit is tests/test_registry.py's; here the eval weights
# of a state that went through jit, against the same run on NumPy (eager JAX compiles each
# operation on first use: seconds per rule)
@pytest.mark.parametrize("name", [n for n in RULES if n.startswith("schedule_free")])
def test_jit_compiles_once(name: str) -> None:
    rule = RULES[name]()
    p = {k: jnp.ones(s) for k, s in SHAPES.items()}
    state = uo.setup(rule, p)
    traces = 0

    @jax.jit
    def step(state: uo.State, p: Any, g: Any) -> Any:
        nonlocal traces
        traces += 1
        return uo.update(state, p, g)

    ref = {k: np.ones(s) for k, s in SHAPES.items()}
    ref_state = uo.setup(rule, ref)
    for _ in range(5):
        g = {k: 0.3 * v + 0.1 for k, v in p.items()}
        state, p = step(state, p, g)
        ref_state, ref = uo.update(ref_state, ref, {k: 0.3 * v + 0.1 for k, v in ref.items()})
    assert traces == 1
    for k in KEYS:
        assert rel_diff(p[k], ref[k]) < TOL
    if name.startswith("schedule_free"):  # the eval weights of a state that went through jit
        x, ref_x = uo.schedule_free_eval(state, p), uo.schedule_free_eval(ref_state, ref)
        assert all(rel_diff(x[k], ref_x[k]) < TOL for k in KEYS)


def test_prodigy_zero_gradients_then_steps_match_prodigyopt() -> None:
    # no gradient yet: prodigyopt returns before its estimate (0/0) and leaves p; so do we
    import prodigyopt

    rng = np.random.default_rng(3)
    p = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    tp = [torch.tensor(p[k], requires_grad=True) for k in KEYS]
    topt = prodigyopt.Prodigy(tp, d0=1e-3)
    state = uo.setup(uo.prodigy(d0=1e-3), p)
    for i in range(12):
        g = {k: (i >= 2) * _grad(p[k], 0.0) for k in KEYS}
        state, p = uo.update(state, p, g)
        for t in tp:
            t.grad = torch.as_tensor(np.asarray((i >= 2) * _grad(t.detach().numpy(), 0.0)))
        topt.step()
        assert all(np.isfinite(p[k]).all() for k in KEYS)
        assert max(rel_diff(p[k], t.detach().numpy()) for t, k in zip(tp, KEYS,
                                                                       strict=True)) < TOL


# steps where prodigyopt returns early: a warm-up from lr 0 (HF's linear schedule starts there),
# two steps of lr 0 mid-run (with a growth limit, which d must not climb there), and two
# leading steps of zero gradients (no estimate yet)
_EARLY = {"warm-up": (uo.schedules.linear(0.0, 1.0, 20), 0, None),
          "lr 0 mid-run": (uo.schedules.piecewise_constant(1.0, {30: 0.0, 32: 1.0}), 0, 1.02),
          "zero gradients": (1.0, 2, None)}


@pytest.mark.parametrize("bias_correction", [False, True], ids=["plain", "bias-corrected"])
@pytest.mark.parametrize("case", list(_EARLY))
def test_prodigy_steps_that_return_early_match_prodigyopt(case: str,
                                                           bias_correction: bool) -> None:
    """prodigyopt returns early at a step of lr 0 or before any gradient: m, v, s, its
    numerator, d and its own step count (its bias correction's) stay. ``lr0_idle`` (the torch
    convention's) does the same; updating them ended 0.12 apart after 200 steps of a warm-up,
    counting every step with bias correction 26 times a parameter's size apart after 80, and d
    grew at lr 0 under a growth limit (1.4e-2). 60 steps, NumPy and under ``jax.jit``."""
    import prodigyopt

    lr, zeros, growth = _EARLY[case]
    safeguard = bias_correction  # each case with and without the safeguard, between the two
    at = (lambda i: float(lr(i))) if callable(lr) else (lambda i: lr)
    hypers = {"betas": (0.9, 0.99), "d0": 1e-4, "safeguard_warmup": safeguard,
              "use_bias_correction": bias_correction}
    rng = np.random.default_rng(5)
    start = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    tp = [torch.tensor(start[k], requires_grad=True) for k in KEYS]
    topt = prodigyopt.Prodigy(tp, lr=1.0, growth_rate=growth or float("inf"), **hypers)
    rule = uo.prodigy(lr=lr, growth_rate=growth, **hypers)
    p = {k: v.copy() for k, v in start.items()}
    state = uo.setup(rule, p)
    jp = {k: jnp.asarray(v) for k, v in start.items()}
    jstate, step = uo.setup(rule, jp), jax.jit(uo.update)
    for i in range(60):
        on = float(i >= zeros)
        state, p = uo.update(state, p, {k: on * _grad(p[k], 0.1 * i) for k in KEYS})
        jstate, jp = step(jstate, jp, {k: on * _grad(np.asarray(jp[k]), 0.1 * i) for k in KEYS})
        for group in topt.param_groups:
            group["lr"] = at(i)
        for t in tp:
            t.grad = torch.as_tensor(on * _grad(t.detach().numpy(), 0.1 * i))
        topt.step()
    d = topt.param_groups[0]["d"]
    assert abs(float(state.tree_states["scale_by_prodigy"]["d"]) - d) < TOL * d
    if bias_correction:
        assert float(state.tree_states["scale_by_prodigy"]["k"]) == topt.param_groups[0]["k"]
    for t, k in zip(tp, KEYS, strict=True):
        assert rel_diff(p[k], t.detach().numpy()) < TOL
        assert rel_diff(np.asarray(jp[k]), p[k]) < TOL


@pytest.mark.parametrize("convention", ["torch", "optax"])
def test_prodigy_first_moment_switched_off_mid_run_matches_its_peer(convention: str) -> None:
    """``betas[0]`` at 0 for some steps (a schedule's; a group's value in uniopt.torch):
    prodigyopt's ``if beta1 > 0`` keeps ``m`` and steps ``d*g`` with the new ``d``, where the
    state's ``m`` was overwritten with the old ``d*g`` and stepped (0.16 off after 8 steps);
    optax, whose ``m`` is ``b1*m + d*(1 - b1)*g`` at every step, overwrites it. 40 steps,
    NumPy and under ``jax.jit``, against prodigyopt or optax."""
    import prodigyopt

    b1 = uo.schedules.piecewise_constant(0.9, {3: 0.0, 5: 0.9, 20: 0.0, 21: 0.8})
    rng = np.random.default_rng(7)
    start = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    rule = uo.prodigy(lr=1.0, d0=1e-3, betas=(b1, 0.999), convention=convention)
    p, state = dict(start), uo.setup(rule, start)
    jp = {k: jnp.asarray(v) for k, v in start.items()}
    jstate, step = uo.setup(rule, jp), jax.jit(uo.update)
    tp = [torch.tensor(start[k], requires_grad=True) for k in KEYS]
    topt = prodigyopt.Prodigy(tp, lr=1.0, d0=1e-3)
    # (optax's betas is no hyperparameter inject_hyperparams reaches: a prodigy of each b1,
    # stepping one state)
    def tx(b: float) -> Any:
        return optax.contrib.prodigy(1.0, betas=(b, 0.999), estim_lr0=1e-3)

    op, ostate = dict(jp), tx(0.9).init(jp)
    for i in range(40):
        state, p = uo.update(state, p, {k: _grad(p[k], 0.1 * i) for k in KEYS})
        jstate, jp = step(jstate, jp, {k: _grad(np.asarray(jp[k]), 0.1 * i) for k in KEYS})
        if convention == "torch":
            topt.param_groups[0]["betas"] = (b1(i), 0.999)
            for t in tp:
                t.grad = torch.as_tensor(_grad(t.detach().numpy(), 0.1 * i))
            topt.step()
            theirs = {k: t.detach().numpy() for k, t in zip(KEYS, tp, strict=True)}
        else:
            u, ostate = tx(b1(i)).update({k: _grad(np.asarray(op[k]), 0.1 * i) for k in KEYS},
                                         ostate, op)
            op = optax.apply_updates(op, u)
            theirs = {k: np.asarray(v) for k, v in op.items()}
        for k in KEYS:
            assert rel_diff(p[k], theirs[k]) < TOL, (i, k)
            assert rel_diff(np.asarray(jp[k]), p[k]) < TOL, (i, k)


def test_prodigy_lr_differentiates_eagerly_as_under_jit() -> None:
    """The derivative of the loss after three Prodigy steps with respect to its lr, by
    ``jax.grad`` eagerly and under ``jax.jit`` and by a central difference: a JVP's tracer
    compared to 0 is a concrete answer, which ``lr0_idle`` took for lr 0 (no step, derivative
    0)."""
    p0 = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([3.0])}

    def loss(p: Any) -> Any:
        return sum(jnp.sum(jnp.tanh(v) ** 2 + 0.1 * v ** 2) for v in p.values())

    def final(lr: Any) -> Any:
        state, p = uo.setup(uo.prodigy(lr=lr, d0=1e-3), p0), p0
        for _ in range(3):
            state, p = uo.update(state, p, jax.grad(loss)(p))
        return loss(p)

    eager, jitted = jax.grad(final)(1.0), jax.jit(jax.grad(final))(1.0)
    h = 1e-6
    central = (float(final(1.0 + h)) - float(final(1.0 - h))) / (2 * h)
    assert float(eager) != 0.0
    assert abs(float(eager) - float(jitted)) < 1e-12 * abs(float(jitted))
    assert abs(float(eager) - central) < 1e-6 * abs(central)


def test_checkpoint_resumes_every_rule(tmp_path: Any) -> None:
    # the whole-tree scalars stay 0-d arrays (a checkpoint keeps them as tensors) and every
    # option is a finite number or None (prodigyopt's growth_rate=inf is stored as None)
    assert uo.prodigy(growth_rate=float("inf")).growth_rate is None
    for name, make in RULES.items():
        rule = make()
        rng = np.random.default_rng(1)
        p = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        state = uo.setup(rule, p)
        for _ in range(3):
            state, p = uo.update(state, p, {k: np.tanh(v) for k, v in p.items()})
        uo.save(tmp_path / f"{name}.ckpt", state)
        loaded = uo.load(tmp_path / f"{name}.ckpt", (rule, p))
        a, b = dict(p), {k: v.copy() for k, v in p.items()}
        for _ in range(3):
            state, a = uo.update(state, a, {k: np.tanh(v) for k, v in a.items()})
            loaded, b = uo.update(loaded, b, {k: np.tanh(v) for k, v in b.items()})
        for k in KEYS:
            assert rel_diff(a[k], b[k]) == 0.0, name


@pytest.mark.parametrize("jit", [False, True])
def test_schedule_free_eval_under_a_momentum_schedule_is_metas(jit: bool) -> None:
    """A momentum schedule: params and eval weights after every update as Meta's
    ``SGDScheduleFree`` gives them with its group's momentum set before each step; the eval
    reads the momentum of the update that made y (it read the next update's: 22% off at the
    change)."""
    schedulefree = pytest.importorskip("schedulefree")
    mom = uo.schedules.piecewise_constant(0.9, {3: 0.5})
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal(6), [rng.standard_normal(6) for _ in range(5)]
    w = torch.tensor(p0, requires_grad=True)
    meta = schedulefree.SGDScheduleFree([w], lr=0.1, momentum=0.9, foreach=False)
    meta.train()
    make = jnp.asarray if jit else np.asarray
    p, rule = {"w": make(p0)}, uo.schedule_free_sgd(lr=0.1, momentum=mom)
    state = uo.setup(rule, p)
    step = jax.jit(uo.update) if jit else uo.update
    read = jax.jit(uo.schedule_free_eval) if jit else uo.schedule_free_eval
    for t, g in enumerate(grads):
        meta.param_groups[0]["momentum"] = mom(t)
        w.grad = torch.tensor(g)
        meta.step()
        state, p = step(state, p, {"w": make(g)})
        meta.eval()
        np.testing.assert_allclose(np.asarray(read(state, p)["w"]), w.detach().numpy(),
                                   rtol=1e-6 if jit else 1e-14)
        meta.train()
        np.testing.assert_allclose(np.asarray(p["w"]), w.detach().numpy(),
                                   rtol=1e-6 if jit else 1e-14)


@pytest.mark.parametrize("jit", [False, True])
def test_dadapt_adamw_keeps_its_estimate_while_nothing_moves(jit: bool) -> None:
    """lr 0 (a warm-up from 0 starts there) or a zero gradient: nothing moves ``s``, and the
    estimate is 0/0. optax's ``d`` turns NaN, and every parameter after it; uniopt keeps ``d``,
    as the authors' dadaptation does, and from the first step that moves ``s`` goes on as
    optax's run from that step with the same ``d``."""
    warm = 3
    lr = uo.schedules.linear(0.0, 1.0, warm)
    theirs = optax.linear_schedule(0.0, 1.0, warm)
    p0 = {"w": np.linspace(-1.0, 1.0, 6)}
    rule = uo.dadapt_adamw(lr=lr, d0=1e-3)
    state = uo.setup(rule, p0)
    tx = optax.contrib.dadapt_adamw(theirs, estim_lr0=1e-3)
    jp = {"w": jnp.asarray(p0["w"])}
    ts = tx.init(jp)
    step = jax.jit(uo.update) if jit else uo.update
    p = {"w": p0["w"].copy()}
    for k in range(8):
        g = {"w": np.cos(3 * p["w"])}
        state, p = step(state, p, g)
        u, ts = tx.update({"w": jnp.asarray(g["w"])}, ts, jp)
        jp = optax.apply_updates(jp, u)
        d = float(state.tree_states["scale_by_dadapt_adam"]["d"])
        if k == 0:  # lr 0: s still 0
            assert d == 1e-3 and np.isnan(float(ts.estim_lr))
            np.testing.assert_array_equal(np.asarray(p["w"]), p0["w"])
    assert np.all(np.isfinite(np.asarray(p["w"]))) and d > 1e-3
    # a zero gradient at the first step, lr 1: the same; a NaN one still makes d NaN, as optax's
    state = uo.setup(uo.dadapt_adamw(lr=1.0, d0=1e-3), p0)
    state, q = uo.update(state, p0, {"w": np.zeros(6)})
    assert float(state.tree_states["scale_by_dadapt_adam"]["d"]) == 1e-3
    np.testing.assert_array_equal(q["w"], p0["w"])
    state, q = uo.update(state, q, {"w": np.full(6, np.nan)})
    assert np.isnan(float(state.tree_states["scale_by_dadapt_adam"]["d"]))


def test_dadapt_adamw_on_float16_params_stays_finite() -> None:
    """D-Adaptation's dot product is taken in its ``d``'s dtype: in float16 its eps (1e-8) is 0
    and the first step's ``s/sqrt(v)`` 0/0, which made every parameter NaN."""
    for dtype in (np.float16, np.float32):
        p = [np.ones((8, 8), dtype)]
        state = uo.setup(uo.dadapt_adamw(lr=0.3, d0=1e-3), p)
        for _ in range(5):
            state = uo.update_(state, p, [np.full((8, 8), 1e-3, dtype)])
        assert p[0].dtype == dtype and np.all(np.isfinite(p[0])) and np.all(p[0] < 1), dtype


# --- keras's ScheduleFreeAdamW -----------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"lr": 2**-6}, {"lr": 2**-6, "warmup_steps": 10},
                                {"lr": 2**-5, "betas": (0.8, 0.99), "eps": 1e-6}])
def test_the_keras_convention_is_keras_schedule_free_adamw(kw: dict[str, Any]) -> None:
    """keras 3 on JAX, float64 variables, 300 steps free-running; the rates are dyadic (keras
    keeps its rate in a variable of floatx). keras weighs every step alike in the average,
    under warm-up too, where Meta's weighs it by the largest rate so far squared."""
    from free_run import TOL, run_keras, run_ours, worst_of
    from helpers import keras_on_jax

    keras = keras_on_jax()
    theirs = run_keras(jax, keras, keras.optimizers.ScheduleFreeAdamW(
        learning_rate=kw["lr"], warmup_steps=kw.get("warmup_steps", 0),
        **({"beta_1": kw["betas"][0], "beta_2": kw["betas"][1], "epsilon": kw["eps"]}
           if "betas" in kw else {})), 3)
    ours = uo.schedule_free_adamw(convention="keras", **kw)
    assert ours.weight_lr_power == 0.0
    assert worst_of(run_ours(ours, 3), theirs) < TOL
    if "warmup_steps" in kw:  # Meta's weights under warm-up are not keras's
        assert worst_of(run_ours(uo.schedule_free_adamw(**kw), 3), theirs) > 1e-3


def test_the_keras_convention_refuses_kerass_other_weight_decay() -> None:
    """keras decays y before the step, outside the schedule-free arithmetic: asked for under
    the keras convention, a decay is refused, not stepped as this rule's own. A translation
    into keras's form drops it and says so (it raised the constructor's error)."""
    with pytest.raises(ValueError, match=r"convention='keras'.*weight_decay=0.1"):
        uo.schedule_free_adamw(convention="keras", weight_decay=0.1)
    t = uo.translate(uo.schedule_free_adamw(lr=0.01, weight_decay=0.1), target="keras")
    assert not t.exact and t.rule.weight_decay == 0.0 and t.rule.convention == "keras"
    assert "weight_decay: weight_decay = 0.0" in t.conditions
    assert "keras's ScheduleFreeAdamW decays y before the step" in t.explanation


def test_translating_to_keras_is_exact_only_at_a_constant_lr_without_warm_up() -> None:
    """keras's ScheduleFreeAdamW has no weight_lr_power (its average weighs every step alike):
    the translation sets it to 0, exact while the largest lr so far is the same at every
    step."""
    t = uo.translate(uo.schedule_free_adamw(lr=2**-6), target="keras")
    assert t.exact and t.rule.weight_lr_power == 0.0 and t.rule.convention == "keras"
    t = uo.translate(uo.schedule_free_adamw(lr=2**-6, warmup_steps=10), target="keras")
    assert not t.exact and "warmup_steps = 0" in t.conditions
    t = uo.translate(uo.schedule_free_adamw(lr=uo.schedules.cosine(1e-2, steps=10)),
                     target="keras")
    assert not t.exact

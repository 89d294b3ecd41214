"""uniopt.torch under torch.compile: the step is left to run as it does eagerly (one graph
break, no guards on its per-step coefficients), so a compiled loop never recompiles and its
numbers are the eager run's."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

torch = pytest.importorskip("torch")
dynamo = pytest.importorskip("torch._dynamo")

import uniopt.torch as ut  # noqa: E402


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    dynamo.reset()
    yield
    dynamo.config.error_on_recompile = False
    dynamo.reset()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def _data(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(16, 20, generator=g), torch.randn(16, 3, generator=g)


def _train(step: Callable[..., None], model: torch.nn.Module, n: int, strict_after: int) -> None:
    for k in range(n):
        if k == strict_after:  # warm-up done: any recompile from here on raises
            dynamo.config.error_on_recompile = True
        step(*_data(k))


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("make", [
    lambda ps: ut.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: ut.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
], ids=["adamw", "sgd-nesterov"])
def test_compiled_step_never_recompiles_and_matches_eager(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
) -> None:
    runs = {}
    for compiled in (False, True):
        model = _model()
        opt = make(list(model.parameters()))

        def opt_step() -> None:
            opt.step()  # noqa: B023

        run_step = torch.compile(opt_step) if compiled else opt_step

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            loss = torch.nn.functional.mse_loss(model(x), y)  # noqa: B023
            opt.zero_grad()  # noqa: B023
            loss.backward()
            run_step()  # noqa: B023

        _train(step, model, 25, strict_after=3)
        runs[compiled] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(runs[False], runs[True], strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_whole_compiled_training_step_with_the_optimizer_inside() -> None:
    """forward, backward, opt.step() and zero_grad in one torch.compile'd function: the model's
    part compiles, the step runs eagerly between its graphs, and nothing recompiles."""
    runs = {}
    for compiled in (False, True):
        model = _model()
        opt = ut.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(model(x), y)  # noqa: B023
            loss.backward()
            opt.step()  # noqa: B023
            opt.zero_grad()  # noqa: B023
            return loss

        # aot_eager: dynamo and AOTAutograd as torch.compile runs them, without waiting for
        # inductor's C++ compiler (which changes nothing here)
        run = torch.compile(step, backend="aot_eager") if compiled else step
        _train(run, model, 25, strict_after=3)
        runs[compiled] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("fresh_dynamo")
def test_the_step_is_one_graph_break() -> None:
    model = _model()
    opt = ut.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        opt.step()
        return y + 1

    explained = dynamo.explain(f)(torch.ones(3))
    assert (explained.graph_count, explained.graph_break_count) == (2, 1)
    assert "_UNTRACED_STEP" in explained.break_reasons[0].reason


def test_importing_uniopt_torch_leaves_dynamo_unimported() -> None:
    """dynamo costs about 1.5 s to import: it is imported at the first traced step."""
    code = "import sys, uniopt.torch; print('torch._dynamo' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["NAdam", "RAdam", "ASGD", "Adam-after-a-scheduler"])
def test_a_compiled_step_that_writes_a_group_value_steps_as_eager(name: str) -> None:
    """A compiled function that writes ``group["lr"]`` and calls ``opt.step()``: dynamo marks
    every group ``capturable=True`` (its ``_set_capturable``), and the write carries the flag
    into the real group. uniopt's NAdam, RAdam and ASGD then refused every step (their numbers
    are computed on the host), and Adam did after a torch scheduler had changed its lr (its
    rule read the lr from the group, as "a schedule"); torch.optim's step them. On the CPU,
    where no graph is captured, the steps are torch's eager steps with those values (torch's
    own compiled ones take the step scalars in float32), bit for bit but Adam's, computed from
    its count on the device (to float64 rounding)."""
    cls = name.split("-")[0]
    runs = []
    for impl, compiled in ((torch.optim, False), (ut, True)):
        model = _model().double()
        opt = getattr(impl, cls)(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9) if "scheduler" in name else None

        def set_and_step(lr: float) -> None:
            for g in opt.param_groups:  # noqa: B023
                g["lr"] = lr
            opt.step()  # noqa: B023

        run_step = torch.compile(set_and_step, backend="eager") if compiled else set_and_step
        for k in range(8):
            x, y = _data(k)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
            if sched is not None and k < 3:
                opt.step()
                sched.step()
            else:
                run_step(1e-2 / (k + 1))
        assert opt.param_groups[0]["capturable"] == compiled
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        if cls == "Adam":
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)
        else:
            assert torch.equal(a, b)

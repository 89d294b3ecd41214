"""uniopt.torch inside the trainers torch users train with: Lightning and the HF Trainer train,
checkpoint and resume to the same parameters, bit for bit, as a run that never stopped. Each
runs in a fresh process (the trainers set global state: loggers, seeds, threads)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

MODEL = """
    import os, tempfile, torch
    import uniopt.torch as ut

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    root = tempfile.mkdtemp()

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
"""


def _fresh(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MODEL) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_lightning_and_hf_trainer_resume_bit_for_bit() -> None:
    """One process for both (torch, uniopt and numba's start-up once)."""
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = _fresh("""
        import lightning as L
        from transformers import Trainer, TrainingArguments

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = net()
            def training_step(self, batch, i):
                x, y = batch
                return torch.nn.functional.mse_loss(self.net(x), y)
            def configure_optimizers(self):
                opt = ut.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
                return {"optimizer": opt,
                        "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

        data = torch.utils.data.TensorDataset(X, Y)
        loader = lambda: torch.utils.data.DataLoader(data, batch_size=8)
        kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)

        # 3 epochs straight; 1, a checkpoint, resumed to 3: (the resuming trainer's step,
        # resumed == straight, first half == straight)
        def halves(cls, name):
            straight = cls()
            L.Trainer(max_epochs=3, **kw).fit(straight, loader())
            first = cls()
            trainer = L.Trainer(max_epochs=1, **kw)
            trainer.fit(first, loader())
            trainer.save_checkpoint(f"{root}/{name}.ckpt")
            resumed = cls()
            again = L.Trainer(max_epochs=3, **kw)
            again.fit(resumed, loader(), ckpt_path=f"{root}/{name}.ckpt")
            return again.global_step, same(straight, resumed), same(straight, first)

        print("lightning", *halves(M, "half"))

        # a recipe by path (no decay on biases, accumulation, a NaN guard): its state is one
        # group entry of the optimizer's state_dict, which Lightning saves and restores
        import uniopt as uo
        class R(M):
            def configure_optimizers(self):
                return ut.Optimizer(self.named_parameters(), uo.skip_nonfinite(uo.accumulate(
                    uo.partition({"d": uo.adamw(lr=1e-2, weight_decay=0.1),
                                  "n": uo.adamw(lr=1e-2, weight_decay=0.0)},
                                 uo.by_path({"*.bias": "n", "*": "d"})), every=2)))
        print("recipe", *halves(R, "recipe")[1:])

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net()
            def forward(self, x, y):
                return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}

        rows = [{"x": X[i], "y": Y[i]} for i in range(64)]

        def run(out, steps, resume=None):
            model = Net()
            opt = ut.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            args = TrainingArguments(
                output_dir=out, max_steps=steps, save_steps=8, per_device_train_batch_size=8,
                report_to=[], lr_scheduler_type="constant", use_cpu=True, seed=0,
                logging_strategy="no")
            Trainer(model=model, args=args, train_dataset=rows,
                    optimizers=(opt, None)).train(resume_from_checkpoint=resume)
            return model

        straight = run(root + "/a", 16)
        first = run(root + "/b", 8)
        resumed = run(root + "/b", 16, resume=root + "/b/checkpoint-8")
        print("hf", same(straight, resumed), same(straight, first))
    """)
    got = {line.split()[0]: line.split()[1:] for line in out.splitlines()
           if line.split() and line.split()[0] in ("lightning", "hf", "recipe")}
    assert got == {"lightning": ["24", "True", "False"], "hf": ["True", "False"],
                   "recipe": ["True", "False"]}, out

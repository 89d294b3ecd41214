"""8-bit state on a small transformer: ``python benchmarks/q8_transformer.py [steps] [seeds]``.

A two-layer, 4-head causal torch transformer (d_model 64) learns next-token prediction on
sequences of 16 tokens drawn from a fixed random second-order Markov chain over 32 tokens (a
synthetic language, generated here, nothing downloaded; its entropy rate is the loss floor), trained
with uniopt's AdamW through the functional API on the model's tensors, once with float32 state
and once with ``state_dtype="q8"``, for each seed. It prints each run's final loss (the mean of
the last 50 steps' training losses), the float32 runs' seed-to-seed spread, and whether the q8
mean lies inside it. Issue 16 asks for "the final loss within the seed-to-seed spread of
float32 Adam" on a small transformer; tests/test_q8.py checks the same on an MLP.
"""

from __future__ import annotations

import statistics
import sys

import torch

import uniopt as uo

VOCAB, LENGTH, BATCH, D = 32, 16, 32, 64


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(D, 4, 128, dropout=0.0, batch_first=True)
    return torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(VOCAB, D),
        "pos": torch.nn.Embedding(LENGTH, D),
        "body": torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
        "head": torch.nn.Linear(D, VOCAB),
    })


# the chain: the next token's distribution given the two before it, peaked (temperature 0.5)
_CHAIN = torch.softmax(torch.randn(VOCAB, VOCAB, VOCAB,
                                   generator=torch.Generator().manual_seed(7)) / 0.5, dim=-1)
_MASK = torch.nn.Transformer.generate_square_subsequent_mask(LENGTH - 1)


def _batch(gen: torch.Generator) -> torch.Tensor:
    x = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    for t in range(2, LENGTH):
        x[:, t] = torch.multinomial(_CHAIN[x[:, t - 2], x[:, t - 1]], 1, generator=gen)[:, 0]
    return x


def _loss(model: torch.nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    inp, target = x[:, :-1], x[:, 1:]
    h = model["embed"](inp) + model["pos"](torch.arange(LENGTH - 1))
    logits = model["head"](model["body"](h, mask=_MASK, is_causal=True))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def train(seed: int, steps: int, state_dtype: str | None) -> float:
    model = _model(seed)
    params = [p for p in model.parameters()]
    rule = uo.adamw(lr=uo.schedules.warmup(steps // 10, uo.schedules.cosine(2e-3, steps=steps)),
                    weight_decay=0.01)
    state = uo.setup(rule, [p.detach() for p in params], state_dtype=state_dtype)
    data = torch.Generator().manual_seed(1000 + seed)
    losses = []
    for _ in range(steps):
        x = _batch(data)
        loss = _loss(model, x)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            state = uo.update_(state, [p.detach() for p in params], list(grads))
        losses.append(float(loss.detach()))
    return statistics.fmean(losses[-50:])


def main(steps: int = 1500, seeds: int = 4) -> None:
    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {"float32": [], "q8": []}
    for seed in range(seeds):
        for label, dtype in (("float32", None), ("q8", "q8")):
            runs[label].append(train(seed, steps, dtype))
            print(f"seed {seed} {label:7s} final loss {runs[label][-1]:.4f}", flush=True)
    lo, hi = min(runs["float32"]), max(runs["float32"])
    q8 = statistics.fmean(runs["q8"])
    print(f"float32: {[round(x, 4) for x in runs['float32']]} (spread {lo:.4f}..{hi:.4f})")
    print(f"q8:      {[round(x, 4) for x in runs['q8']]} (mean {q8:.4f}, "
          f"{'inside' if lo <= q8 <= hi else 'OUTSIDE'} the float32 spread)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

#!/usr/bin/env python
"""A GRPO step's training passes on SmolLM2 with HF's modules and with steprl's lean ones
(`steprl.models.lean`): what autograd saves for the backward of one micro-batch, by kind, and the
forward + backward of 16 completions in micro-batches, alternating in one process.

    python benchmarks/training_passes.py [--repeats 4] [--micro-batch 4]

The completions are random tokens after the benchmark's prompts (4 prompts x 4, 64 down to 52
tokens), run as `minibatch_backward` runs them: the common beginning once (`Beginning`), each
prompt once per micro-batch. The gradients of both variants are compared.
"""
from __future__ import annotations

import argparse
import collections
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (offline set-up, the benchmark's prompts)
from prefill_decode import alternate  # noqa: E402
import torch  # noqa: E402

from steprl.memory import keep_freed_memory  # noqa: E402
from steprl.models.lean import lean_training  # noqa: E402
from steprl.rollout.episodes import Trajectory  # noqa: E402
from steprl.training.passes import Beginning, completion_logprobs  # noqa: E402


def trajectories(tok, prompts: int = 4, group: int = 4):
    ids, _, problems = bench.task_prompts(tok, prompts)
    gen = torch.Generator().manual_seed(0)
    return [Trajectory(problem, p, ids=torch.randint(100, 40000, (64 - 4 * j,), generator=gen).tolist(),
                       mask=[1] * (64 - 4 * j)) for p, problem in zip(ids, problems) for j in range(group)]


def kind(shape: tuple, cfg) -> str:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if shape[-1] == cfg.intermediate_size:
        return "MLP [tokens, intermediate]"
    if shape[-1] == cfg.vocab_size:
        return "logits"
    if len(shape) == 4 and shape[-1] == head_dim:
        return "attention [B, heads, L, d]"
    if shape[-1] == cfg.hidden_size:
        return "hidden [tokens, hidden]"
    return "other (masks, norms, log-normalisers)"


def saved_bytes(model, trajs, beginning) -> dict:
    """Bytes of the tensors autograd saves in one micro-batch's forward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logprobs(model, trajs, with_entropy=True, beginning=beginning.of())
    out = collections.Counter()
    for nbytes, shape in storages.values():
        out[kind(shape, model.config)] += nbytes
    return out


def forward_backward(model, trajs, micro_batch: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    beginning = Beginning(model, trajs, len(trajs) // micro_batch)
    for lo in range(0, len(trajs), micro_batch):
        logp, entropy = completion_logprobs(model, trajs[lo:lo + micro_batch], with_entropy=True,
                                            beginning=beginning.of())
        (logp.sum() + 0.01 * entropy.sum()).backward()
    beginning.backward()
    return [p.grad for p in model.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    a = ap.parse_args()
    keep_freed_memory()  # as the RL recipes run
    hf, tok = bench.smollm2_factory()()
    lean = lean_training(copy.deepcopy(hf))
    models = {"HF": hf.train(), "lean": lean.train()}
    trajs = trajectories(tok)
    for name, model in models.items():
        saved = saved_bytes(model, trajs[:a.micro_batch], Beginning(model, trajs, len(trajs) // a.micro_batch))
        print(f"{name}: saved for the backward of one micro-batch of {a.micro_batch}, "
              f"{sum(saved.values()) / 1e9:.3f} GB: "
              + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in saved.most_common()), flush=True)
    grads = {}

    def run(name):
        grads[name] = forward_backward(models[name], trajs, a.micro_batch)
    times = alternate({name: lambda name=name: run(name) for name in models}, a.repeats)
    worst = max(float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))
                for x, y in zip(grads["lean"], grads["HF"]) if y is not None)
    print(f"forward + backward of {len(trajs)} completions in micro-batches of {a.micro_batch}: "
          + ", ".join(f"{n} {statistics.median(t):.2f} s ({', '.join(f'{x:.2f}' for x in t)})" for n, t in times.items())
          + f"; gradients' largest difference relative to the tensor's largest entry {worst:.1e}")


if __name__ == "__main__":
    main()

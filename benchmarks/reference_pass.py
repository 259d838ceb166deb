#!/usr/bin/env python
"""The KL reference pass of a SmolLM2 GRPO step (4 prompts x 4, <= 64 sampled tokens), four ways
on the same trajectories, interleaved: the reference as a copy in the heap or mapped from the
checkpoint file (`models.mapped`, pages given back after each module), in 4 micro-batches of 4
or in one pass of 16 (`training.passes.REFERENCE_BATCHES`). Checks that all four give the same log-probs.

    python benchmarks/reference_pass.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
import torch  # noqa: E402

from steprl.config import RewardConfig  # noqa: E402
from steprl.memory import keep_freed_memory  # noqa: E402
from steprl.models.mapped import frozen_reference, release_reference  # noqa: E402
from steprl.envs.tool_env import make_envs  # noqa: E402
from steprl.rollout import NativeEngine  # noqa: E402
from steprl.rollout.chat import tool_setup  # noqa: E402
from steprl.rollout.episodes import run_episodes  # noqa: E402
from steprl.rollout.sampling import SamplingParams  # noqa: E402
from steprl.tasks import get_task  # noqa: E402
from steprl.training.passes import batched_logprobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    keep_freed_memory()  # as the RL recipes run
    model, tok = bench.smollm2_factory()()
    task = get_task("calc")
    tools, renderer, suffix = tool_setup(task, tok)
    episodes = [p for p in task.problems("train", 4, seed=0) for _ in range(4)]
    envs = make_envs(task, tools, RewardConfig(), 1, len(episodes), suffix)
    trajs = run_episodes(NativeEngine(model, tok), tok, envs, episodes, SamplingParams(max_new_tokens=64), renderer,
                         torch.Generator().manual_seed(0))
    refs = {"heap": copy.deepcopy(model).eval().requires_grad_(False),
            "mapped": frozen_reference(model, model.name_or_path)}
    ways = [(f"{kind}, {'4 x 4' if batch == 4 else '1 x 16'}", refs[kind], batch)
            for kind in refs for batch in (4, 16)]
    times, out = {}, {}
    for r in range(a.repeats + 1):  # round 0 warms up
        for name, ref, batch in (ways if r % 2 else ways[::-1]):
            start = time.perf_counter()
            out[name] = batched_logprobs(ref, trajs, batch)
            release_reference(ref)
            if r:
                times.setdefault(name, []).append(time.perf_counter() - start)
    print("reference pass, SmolLM2, 16 trajectories, seconds:")
    for name, ts in times.items():
        print(f"  {name:16s} median {statistics.median(ts):5.2f} ({', '.join(f'{t:.2f}' for t in ts)})")
    first = next(iter(out.values()))
    print(f"  largest log-prob difference between the ways: {max(float((x - first).abs().max()) for x in out.values()):.1e}")


if __name__ == "__main__":
    main()

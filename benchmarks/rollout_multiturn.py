"""Multi-turn rollout time on the calc task: what a GRPO step's rollout (16 prompts x 8 episodes,
T = 1) and an evaluation (150 held-out problems, greedy) cost, up to 3 turns each.

    .venv/bin/python benchmarks/rollout_multiturn.py runs/demo/sft/checkpoint

Run it at two commits to compare engines (docs/benchmarks.md records the numbers); it prints
the median of 3 timed runs after a warm-up, accuracy and mean turns as a check that both played
the same episodes.
"""
import argparse
import statistics
import time

import torch

from steprl.config import RewardConfig
from steprl.models.loading import load_policy
from steprl.envs.tool_env import make_envs
from steprl.rollout import NativeEngine
from steprl.rollout.chat import tool_setup
from steprl.rollout.episodes import run_episodes
from steprl.rollout.sampling import SamplingParams
from steprl.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a checkpoint that plays the calc task (e.g. the demo's SFT)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_policy(a.model)
    task = get_task("calc", min_ops=1, max_ops=3)
    tools, renderer, suffix = tool_setup(task, tok)
    grpo = [p for p in task.problems("train", 16, seed=9) for _ in range(8)]
    cases = [("grpo rollout, 16 x 8, T=1", SamplingParams(max_new_tokens=64, temperature=1.0), grpo),
             ("eval, 150 held-out, greedy", SamplingParams(max_new_tokens=64, temperature=0.0), task.problems("test", 150))]
    for name, params, problems in cases:
        seconds = []
        for rep in range(1 + a.repeats):  # rep 0 is the warm-up
            envs = make_envs(task, tools, RewardConfig(), 3, len(problems), suffix)
            start = time.perf_counter()
            trajs = run_episodes(NativeEngine(model, tok), tok, envs, problems, params, renderer, torch.Generator().manual_seed(rep))
            seconds.append(time.perf_counter() - start)
        acc = sum(t.correct for t in trajs) / len(trajs)
        turns = sum(t.n_turns for t in trajs) / len(trajs)
        print(f"{name}: median {statistics.median(seconds[1:]):.3f} s over {a.repeats} "
              f"(all {[round(x, 3) for x in seconds]}), accuracy {acc:.3f}, mean turns {turns:.2f}")


if __name__ == "__main__":
    main()

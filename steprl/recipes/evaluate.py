"""Held-out accuracy: greedy multi-turn episodes with the task's tools, batched, on any rollout engine."""
from __future__ import annotations

from steprl.config import RewardConfig
from steprl.envs.tool_env import make_envs
from steprl.rollout import make_engine
from steprl.rollout.chat import tool_setup
from steprl.rollout.episodes import run_episodes
from steprl.rollout.sampling import SamplingParams
from steprl.tasks.base import Task


def evaluate(model, tokenizer, task: Task, split: str = "test", limit: int | None = 300,
             batch_size: int = 128, max_new_tokens: int = 64, max_turns: int = 3,
             problems=None, engine: str = "auto") -> tuple[dict, list]:
    """Greedy episodes on `limit` problems with the `engine` named (auto, native, hf).
    Returns (metrics, trajectories)."""
    was_training = model.training
    model.eval()
    sampler = make_engine(engine, model, tokenizer, next(model.parameters()).device.type)
    problems = problems if problems is not None else task.problems(split, limit)
    tools, renderer, suffix = tool_setup(task, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    trajs = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        envs = make_envs(task, tools, RewardConfig(), max_turns, len(chunk), suffix)
        trajs += run_episodes(sampler, tokenizer, envs, chunk, params, renderer)
    model.train(was_training)
    return eval_metrics(task, trajs), trajs


def eval_metrics(task: Task, trajs: list) -> dict:
    """Strict and lenient accuracy, tool use and turns; by calculator steps where problems say."""
    n = len(trajs)
    metrics = {
        "accuracy": sum(t.correct for t in trajs) / max(n, 1),
        "accuracy_lenient": sum(task.check_lenient(t.problem, "\n".join(t.turn_texts)) for t in trajs) / max(n, 1),
        "n": n,
        "answered": sum(t.answered for t in trajs) / max(n, 1),
        "tool_calls_per_episode": sum(t.n_tool_calls for t in trajs) / max(n, 1),
        "tool_failure_rate": sum(t.n_tool_failures for t in trajs) / max(1, sum(t.n_tool_calls for t in trajs)),
        "turns_mean": sum(t.n_turns for t in trajs) / max(n, 1),
    }
    if trajs and all("n_steps" in t.problem.meta for t in trajs):  # by how many calculator steps a problem needs
        buckets = {}
        for t in trajs:
            buckets.setdefault(str(min(t.problem.meta["n_steps"], 3)).replace("3", "3+"), []).append(t)
        # a policy that makes the same number of calls whatever the problem shows here, not in the mean
        metrics["accuracy_by_steps"] = {k: {"accuracy": sum(t.correct for t in v) / len(v), "n": len(v),
                                            "tool_calls_per_episode": sum(t.n_tool_calls for t in v) / len(v)}
                                        for k, v in sorted(buckets.items())}
    return metrics

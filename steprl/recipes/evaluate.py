"""Held-out accuracy: greedy multi-turn episodes with the task's tools, batched."""
from __future__ import annotations

import json
import warnings

from steprl.config import RewardConfig
from steprl.envs.tool_env import ToolEnv
from steprl.models.tiny import CHATML_TEMPLATE
from steprl.rollout.episodes import ChatRenderer, run_episodes
from steprl.rollout.sampling import SamplingParams
from steprl.tasks.base import Task
from steprl.tools import function_schema, get_tools

ANSWER_FORMAT = "Give the final answer as <answer>NUMBER</answer>."


def tool_setup(task: Task, tokenizer):
    """(tools, renderer, system-prompt suffix) for a task and a model's chat template.

    The embedded tokenizer was trained on the protocol and needs no description. A template that
    takes `tools` (Qwen, Llama 3.1 ...) gets the JSON schemas; any other gets them in the system
    prompt, with the Hermes call format spelled out. A task with no tools (single-turn PBRFT)
    gets no tools and, on a foreign template, only the answer format.
    """
    tools = get_tools(list(task.tool_names))
    schemas = [function_schema(fn) for fn in tools.values()]
    template = tokenizer.chat_template or ""
    if template == CHATML_TEMPLATE:
        return tools, ChatRenderer(tokenizer), ""
    if not schemas:
        return tools, ChatRenderer(tokenizer), " " + ANSWER_FORMAT
    if "tools" in template:
        return tools, ChatRenderer(tokenizer, schemas), " " + ANSWER_FORMAT
    described = "\n".join(json.dumps(s["function"]) for s in schemas)
    suffix = (f"\nYou can call these tools:\n{described}\nTo call one, write "
              '<tool_call>{"name": NAME, "arguments": {...}}</tool_call> and wait for its result. '
              + ANSWER_FORMAT)
    return tools, ChatRenderer(tokenizer), suffix


def make_envs(task, tools, reward: RewardConfig, max_turns: int, n: int, system_suffix: str = ""):
    """n environments; warns when max_turns is too few for the task's solved episodes (e.g. the
    one-call-per-operation calc variant needs ops + 1 turns), which no training can fix."""
    needed = getattr(task, "turns_needed", 1)
    cap = getattr(task, "max_turns", None) or max_turns
    if min(max_turns, cap) < needed:
        warnings.warn(f"max_turns={max_turns} but task '{task.name}' needs up to {needed} turns per "
                      f"solved episode: raise max_turns (grpo/ppo/eval) to {needed}", stacklevel=2)
    return [ToolEnv(task, tools, reward, max_turns, system_suffix) for _ in range(n)]


def evaluate(model, tokenizer, task: Task, split: str = "test", limit: int | None = 300,
             batch_size: int = 128, max_new_tokens: int = 64, max_turns: int = 3,
             problems=None) -> tuple[dict, list]:
    """Greedy episodes on `limit` problems. Returns (metrics, trajectories)."""
    was_training = model.training
    model.eval()
    problems = problems if problems is not None else task.problems(split, limit)
    tools, renderer, suffix = tool_setup(task, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    trajs = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        envs = make_envs(task, tools, RewardConfig(), max_turns, len(chunk), suffix)
        trajs += run_episodes(model, tokenizer, envs, chunk, params, renderer)
    model.train(was_training)
    n = len(trajs)
    metrics = {
        "accuracy": sum(t.correct for t in trajs) / max(n, 1),
        "n": n,
        "answered": sum(t.answered for t in trajs) / max(n, 1),
        "tool_calls_per_episode": sum(t.n_tool_calls for t in trajs) / max(n, 1),
        "tool_failure_rate": sum(t.n_tool_failures for t in trajs) / max(1, sum(t.n_tool_calls for t in trajs)),
        "turns_mean": sum(t.n_turns for t in trajs) / max(n, 1),
    }
    return metrics, trajs

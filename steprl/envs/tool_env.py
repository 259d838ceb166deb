"""The agent's world: a multi-turn episode with tools and per-step rewards.

    s_0 = prompt                     reset(problem)
    a_t = one assistant turn (text)  step(text) -> tool messages o_{t+1}, reward r_t, done

A turn with tool calls runs them and returns their results as `tool` messages; the episode
ends on an answer, on a turn with no tool call, or after `max_turns`. Rewards per turn:
    + correct            on the turn that gives the right <answer> (sparse)
    + tool_success       per tool call that ran without error, at most tool_success_cap in all (dense);
                         with tool_success_needed_only, at most tool_success x the calls the
                         problem's worked solution makes (Task.calls_needed)
    + format_penalty     on the last turn when the episode ends with no parsable <answer>
Malformed calls and tools that fail come back to the model as "Error: ..." tool messages: the
episode goes on and the model can recover, as it would in deployment. So does a call still
running after `tool_timeout_s` seconds: a hung tool costs that long, never the run.

With no tools (single-turn PBRFT: a task with no tool_names and max_turns = 1) a tool call is
never parsed or run: the turn is just text without an <answer>, scored like any other. The
task's own max_turns caps the config's, so T = 1 holds in every stage without extra settings.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from steprl.config import RewardConfig, RolloutConfig
from steprl.tasks.base import Problem, Task
from steprl.tools import execute_tool_call, parse_tool_calls


@dataclass
class StepResult:
    observation: list[dict]  # tool messages to append (empty when done)
    reward: float
    done: bool
    info: dict = field(default_factory=dict)


def with_system_suffix(messages: list[dict], suffix: str) -> list[dict]:
    """The conversation with `suffix` (tool descriptions, the answer format, for a model whose
    template does not carry them) at the end of its system message: what rollouts and SFT both
    show the model."""
    if not suffix:
        return list(messages)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + suffix}] + list(messages[1:])
    return [{"role": "system", "content": suffix.strip()}] + list(messages)


class ToolEnv:
    def __init__(self, task: Task, tools: dict, reward: RewardConfig, max_turns: int,
                 system_suffix: str = "", tool_timeout_s: float = RolloutConfig.tool_timeout_s):
        max_turns = min(max_turns, task.max_turns) if task.max_turns else max_turns
        tools = tools if task.tool_names else {}  # a task with no tools gets none
        self.task, self.tools, self.reward_cfg, self.max_turns = task, tools, reward, max_turns
        self.system_suffix = system_suffix  # tool descriptions for models not trained on them
        self.stop_strings = task.stop_strings  # the texts that end an assistant turn
        self.tool_timeout_s = tool_timeout_s

    def reset(self, problem: Problem) -> list[dict]:
        self.problem = problem
        self.turn = 0
        self.tool_reward_given = 0.0
        self.tool_reward_cap = self.reward_cfg.tool_success_cap
        needed = self.task.calls_needed(problem) if self.reward_cfg.tool_success_needed_only else None
        if needed is not None:
            self.tool_reward_cap = min(self.tool_reward_cap, self.reward_cfg.tool_success * needed)
        self.n_calls = self.n_failures = 0
        self.answer: str | None = None
        self.correct = False
        return with_system_suffix(self.task.prompt_messages(problem), self.system_suffix)

    def step(self, text: str) -> StepResult:
        cfg = self.reward_cfg
        self.turn += 1
        reward = 0.0
        answer = self.task.extract_answer(text)
        calls = parse_tool_calls(text) if answer is None and self.tools else []
        if answer is not None:
            self.answer = answer
            self.correct = self.task.check(self.problem, text)
            reward += cfg.correct if self.correct else 0.0
            return StepResult([], reward, True, {"answered": True})
        if not calls:
            info = {"answered": False, "tool_call_ignored": not self.tools and "<tool_call>" in text}
            return StepResult([], reward + cfg.format_penalty, True, info)
        observation = []
        for call in calls:
            result, ok = execute_tool_call(call, self.tools, self.tool_timeout_s)
            self.n_calls += 1
            self.n_failures += not ok
            if ok and self.tool_reward_given < self.tool_reward_cap:
                bonus = min(cfg.tool_success, self.tool_reward_cap - self.tool_reward_given)
                self.tool_reward_given += bonus
                reward += bonus
            observation.append({"role": "tool", "content": result})
        if self.turn >= self.max_turns:
            return StepResult([], reward + cfg.format_penalty, True, {"answered": False, "out_of_turns": True})
        return StepResult(observation, reward, False, {})


def make_envs(task, tools, reward: RewardConfig, max_turns: int, n: int, system_suffix: str = "",
              tool_timeout_s: float = RolloutConfig.tool_timeout_s):
    """n environments; warns when max_turns is too few for the task's solved episodes (e.g. the
    one-call-per-operation calc variant needs ops + 1 turns), which no training can fix."""
    needed = task.turns_needed
    cap = task.max_turns or max_turns
    if min(max_turns, cap) < needed:
        warnings.warn(f"max_turns={max_turns} but task '{task.name}' needs up to {needed} turns per "
                      f"solved episode: raise max_turns (grpo/ppo/eval) to {needed}", stacklevel=2)
    return [ToolEnv(task, tools, reward, max_turns, system_suffix, tool_timeout_s) for _ in range(n)]

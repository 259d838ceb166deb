"""Reward functions with TRL's signature, and the code that applies them without ever crashing.

    f(prompts, completions, **kwargs) -> list[float | None]        (None = "no opinion", as in TRL)

`completions[i]` is the final text (a string) or, in TRL's conversational format, a list of
messages (`[{"role": "assistant", "content": ...}, {"role": "tool", ...}, ...]`). kwargs carry
`answer` (expected answers, one per sample) and, inside steprl, `trajectories` (rollout
Trajectory objects: per-turn rewards, tool-call counts, token masks). A TRL reward function
works here unchanged; these work in TRL unchanged (they ignore kwargs they do not know).

Config entries name functions: {"name": "accuracy" | "module:function", "weight": 1.0,
"args": {...}} or {"model": PATH, "weight": 0.5} for a trained reward model (rewards/reward_model.py).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

from steprl.tasks.base import answers_match, extract_answer
from steprl.tools import parse_tool_calls

log = logging.getLogger("steprl.rewards")
RewardFn = Callable[..., list]


# ----------------------------------------------------------------------------- helpers

def completion_text(completion) -> str:
    """The final answer text: the string itself, or the content of the last assistant message."""
    if isinstance(completion, str):
        return completion
    assistant = [m for m in completion if m.get("role") == "assistant"]
    return (assistant or list(completion) or [{"content": ""}])[-1].get("content") or ""


def assistant_text(completion) -> str:
    """Everything the model wrote: the string, or all assistant messages joined."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def _per_sample(value, n: int) -> list:
    return list(value) if value is not None else [None] * n


# ----------------------------------------------------------------------------- the library

def accuracy(rel_tol: float = 0.0) -> RewardFn:
    """1.0 when the last <answer>...</answer> matches `answer` (numerically, |p - e| <= rel_tol
    max(|e|, 1); exact text for non-numbers), else 0.0; None when there is no expected answer."""
    def accuracy_reward(prompts, completions, answer=None, **kwargs):
        answers = _per_sample(answer, len(completions))
        return [None if a is None else float(answers_match(extract_answer(completion_text(c)), str(a), rel_tol))
                for c, a in zip(completions, answers)]
    return accuracy_reward


accuracy_reward = accuracy()


def format_reward(prompts, completions, **kwargs):
    """1.0 when the final text contains a parsable <answer>...</answer>, else 0.0."""
    return [float(extract_answer(completion_text(c)) is not None) for c in completions]


def tool_success(per_call: float = 0.1, cap: float = 0.2) -> RewardFn:
    """Dense: per_call for each tool call that ran without error, at most `cap` per episode.

    Counted from `trajectories` (n_tool_calls - n_tool_failures) when given, else from the tool
    messages of a conversational completion (a tool message not starting with "Error" is a
    success); None for plain-string completions with no trajectories.
    """
    def tool_success_reward(prompts, completions, trajectories=None, **kwargs):
        out = []
        for i, c in enumerate(completions):
            if trajectories is not None:
                ok = trajectories[i].n_tool_calls - trajectories[i].n_tool_failures
            elif not isinstance(c, str):
                ok = sum(m.get("role") == "tool" and not str(m.get("content", "")).startswith("Error")
                         for m in c)
            else:
                out.append(None)
                continue
            out.append(min(cap, per_call * ok))
        return out
    return tool_success_reward


tool_success_reward = tool_success()


def length_penalty(max_len: int = 256, coef: float = 0.1, unit: str = "chars") -> RewardFn:
    """For correct answers only: -coef * min(L / max_len, 1); 0.0 for wrong answers.

    A wrong answer is never made worse by its length, so the penalty cannot teach the model to
    give up early; among correct answers the shorter wins. L = characters of all assistant text
    (unit "chars") or trained tokens (unit "tokens", needs `trajectories`). Correctness comes
    from `answer` when given, else from trajectories[i].correct; None when neither is known.
    """
    if unit not in ("chars", "tokens"):
        raise ValueError(f"length_penalty: unit must be 'chars' or 'tokens', got {unit!r}")

    def length_penalty_reward(prompts, completions, answer=None, trajectories=None, **kwargs):
        out = []
        for i, c in enumerate(completions):
            if answer is not None and answer[i] is not None:
                correct = answers_match(extract_answer(completion_text(c)), str(answer[i]))
            elif trajectories is not None:
                correct = trajectories[i].correct
            else:
                out.append(None)
                continue
            if unit == "tokens":
                if trajectories is None:
                    out.append(None)
                    continue
                length = sum(trajectories[i].mask)
            else:
                length = len(assistant_text(c))
            out.append(-coef * min(length / max_len, 1.0) if correct else 0.0)
        return out
    return length_penalty_reward


def _correct(i: int, completion, answer, trajectories) -> bool | None:
    """Whether completion i is correct: from `answer` when given, else the trajectory's own verdict."""
    if answer is not None and answer[i] is not None:
        return answers_match(extract_answer(completion_text(completion)), str(answer[i]))
    if trajectories is not None:
        return trajectories[i].correct
    return None


def length_over_target(alpha: float = 0.001, target: int = 200) -> RewardFn:
    """For correct answers only: -alpha * max(0, L - target), L the characters of all assistant
    text; 0.0 for wrong answers (so length never makes a wrong answer worse); None when
    correctness is unknown. The source's length penalty (alpha 0.001, target 200)."""
    def length_over_target_reward(prompts, completions, answer=None, trajectories=None, **kwargs):
        out = []
        for i, c in enumerate(completions):
            correct = _correct(i, c, answer, trajectories)
            out.append(None if correct is None else -alpha * max(0, len(assistant_text(c)) - target) if correct else 0.0)
        return out
    return length_over_target_reward


def step_bonus(beta: float = 0.1, cap: int = 3) -> RewardFn:
    """For correct answers only: beta * min(steps, cap), steps = the episode's successful tool calls
    (from `trajectories`, or its tool messages not starting with "Error"), or, for an episode that
    calls no tool, the non-empty lines of its text (its written steps). The source's step bonus."""
    def step_bonus_reward(prompts, completions, answer=None, trajectories=None, **kwargs):
        out = []
        for i, c in enumerate(completions):
            correct = _correct(i, c, answer, trajectories)
            if not correct:
                out.append(None if correct is None else 0.0)
                continue
            if trajectories is not None:
                calls = trajectories[i].n_tool_calls - trajectories[i].n_tool_failures
            else:
                calls = 0 if isinstance(c, str) else sum(1 for m in c if m.get("role") == "tool"
                                                         and not str(m.get("content", "")).startswith("Error"))
            steps = calls or sum(1 for line in assistant_text(c).splitlines() if line.strip())
            out.append(beta * min(steps, cap))
        return out
    return step_bonus_reward


def step_reward(prompts, completions, trajectories=None, gamma: float = 1.0, **kwargs):
    """The environment's per-step rewards as one number: R = sum_t gamma^t r_t (None without
    trajectories). Use it when the env's rewards are not already counted (e.g. scoring saved
    trajectories, or mixing env rewards with a reward model under one weight)."""
    if trajectories is None:
        return [None] * len(completions)
    return [sum(gamma ** t * r for t, r in enumerate(tr.turn_rewards)) for tr in trajectories]


def prompt_text(prompt) -> str:
    """The user's words: the string itself, or the content of the user messages."""
    if isinstance(prompt, str):
        return prompt
    return " ".join(m.get("content") or "" for m in prompt if m.get("role") == "user")


def numbers_copied(prompts, completions, **kwargs):
    """Dense shaping for tools that must reuse the prompt's numbers: for each number q in the
    user's words, the best digit-prefix match among the numbers in the tool calls' arguments,

        r = mean_q max_c |common prefix(q, c)| / max(|q|, |c|)     (1.0 when every q is copied),

    so a call that miscopies one digit of one number still earns most of it, and the samples of
    a group that all got the answer wrong are still ranked. None when the prompt has no number
    or the completion is a plain string (no calls to read)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        wanted = re.findall(r"\d+", prompt_text(prompt))
        if not wanted or isinstance(completion, str):
            out.append(None)
            continue
        calls = [c for m in completion if m.get("role") == "assistant"
                 for c in parse_tool_calls(m.get("content") or "") if c.error is None]
        used = [n for c in calls for v in c.arguments.values() for n in re.findall(r"\d+", str(v))]
        out.append(sum(max((len(os.path.commonprefix([q, c])) / max(len(q), len(c)) for c in used), default=0.0)
                       for q in wanted) / len(wanted))
    return out


def combine(funcs: list[RewardFn], weights: list[float] | None = None) -> RewardFn:
    """One TRL-style function: sum_i w_i f_i, skipping None; None only when every f_i says None."""
    weights = list(weights) if weights is not None else [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"combine: {len(funcs)} functions but {len(weights)} weights")

    def combined_reward(prompts, completions, **kwargs):
        columns = [f(prompts=prompts, completions=completions, **kwargs) for f in funcs]
        out = []
        for i in range(len(completions)):
            parts = [w * col[i] for w, col in zip(weights, columns) if col[i] is not None]
            out.append(sum(parts) if parts else None)
        return out
    return combined_reward


# name -> (object, is_factory)
LIBRARY: dict[str, tuple[Callable, bool]] = {
    "accuracy": (accuracy, True), "accuracy_reward": (accuracy, True),
    "format": (format_reward, False), "format_reward": (format_reward, False),
    "tool_success": (tool_success, True), "tool_success_reward": (tool_success, True),
    "length_penalty": (length_penalty, True),
    "length_over_target": (length_over_target, True), "step_bonus": (step_bonus, True),
    "step_reward": (step_reward, False), "step": (step_reward, False),
    "numbers_copied": (numbers_copied, False),
}


# ----------------------------------------------------------------------------- config -> functions

def _is_reward_fn(obj) -> bool:
    try:
        return "completions" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return True


def resolve_reward(spec: dict, run_dir=None) -> tuple[str, RewardFn, float]:
    """(name, function, weight) for one config entry.

    {"name": "accuracy", "args": {"rel_tol": 0.01}}   a library name; args go to its factory
    {"name": "my_pkg.rewards:brevity", "args": {...}} your own: a reward function (args are
                                                      bound as keywords) or a factory that
                                                      returns one (called with args)
    {"model": "runs/x/rm/checkpoint"}                 a trained reward model (RewardModelScorer);
    {"model": "rm"}                                   ... this run's own rm stage (<run_dir>/rm/checkpoint)
    """
    if not isinstance(spec, dict):
        raise ValueError(f"reward function entry must be a mapping, got {spec!r}")
    unknown = set(spec) - {"name", "model", "weight", "args"}
    if unknown:
        raise ValueError(f"reward function entry: unknown key(s) {sorted(unknown)} (allowed: name, model, weight, args)")
    weight, args = float(spec.get("weight", 1.0)), dict(spec.get("args") or {})
    if spec.get("model"):
        from steprl.rewards.reward_model import RewardModelScorer  # loads transformers' classes: only when used

        path = str(spec["model"])
        if path == "rm":
            if run_dir is None:
                raise ValueError("reward function {model: rm} means this run's rm stage, but no run directory was given")
            path = str(Path(run_dir) / "rm" / "checkpoint")
        return spec.get("name") or "reward_model", RewardModelScorer(path, **args), weight
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward function entry needs 'name' (one of {', '.join(sorted(LIBRARY))}, "
                         f"or 'module:function') or 'model', got {spec!r}")
    if name in LIBRARY:
        obj, factory = LIBRARY[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward function '{name}': cannot import ({err})") from None
        factory = not _is_reward_fn(obj)
    else:
        raise ValueError(f"unknown reward function '{name}' (known: {', '.join(sorted(LIBRARY))}, "
                         "or 'module:function')")
    if factory:
        try:
            return name, obj(**args), weight
        except TypeError as err:
            raise ValueError(f"reward function '{name}': bad args ({err})") from None
    return name, (functools.partial(obj, **args) if args else obj), weight


def resolve_rewards(specs: list[dict], run_dir=None) -> list[tuple[str, RewardFn, float]]:
    """All entries of a config list, with repeated names made unique ("accuracy#2")."""
    out, seen = [], {}
    for spec in specs or []:
        name, fn, w = resolve_reward(spec, run_dir)
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", fn, w))
    return out


# ----------------------------------------------------------------------------- applying them safely

_WARNED: set[str] = set()


def _warn_once(name: str, message: str, warned: set) -> None:
    if name not in warned:
        warned.add(name)
        log.warning("reward function '%s': %s (its reward counts as 0 for the affected samples; "
                    "the run goes on; warned once)", name, message)


def apply_rewards(funcs_with_weights, prompts, completions, details: dict | None = None,
                  warned: set | None = None, **kwargs) -> tuple[list[float], dict[str, int]]:
    """Weighted sum of reward functions per sample, robust to broken functions.

        reward_i = sum_f w_f * f(...)_i     over the functions with an opinion (not None)

    `funcs_with_weights`: (fn, weight) or (name, fn, weight) items. A function that raises or
    returns the wrong number of values fails for every sample; a NaN, inf or non-number fails for
    that sample. Failures contribute 0, are counted per function (failures[name] = number of
    affected samples) and logged once per function name. `details`, if given, receives
    {name: per-sample values (None for no opinion or failure)} for logging.
    """
    warned = _WARNED if warned is None else warned
    n = len(completions)
    rewards, failures = [0.0] * n, {}
    for item in funcs_with_weights:
        name, fn, weight = item if len(item) == 3 else (getattr(item[0], "__name__", type(item[0]).__name__), *item)
        failures[name] = 0
        values: list = [None] * n
        try:
            out = fn(prompts=prompts, completions=completions, **kwargs)
            out = list(out)
            if len(out) != n:
                raise ValueError(f"returned {len(out)} values for {n} completions")
        except Exception as err:  # noqa: BLE001 - a bad reward function must never stop the run
            failures[name] = n
            _warn_once(name, f"{type(err).__name__}: {err}", warned)
            out = [None] * n
        for i, v in enumerate(out):
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                failures[name] += 1
                _warn_once(name, f"returned a non-finite or non-numeric value ({out[i]!r})", warned)
                continue
            values[i] = v
            rewards[i] += weight * v
        if details is not None:
            details[name] = values
    return rewards, failures


def trajectory_rewards(funcs_with_weights, trajs, details: dict | None = None):
    """apply_rewards on rollout trajectories: prompts and completions in conversational format
    (the prompt messages, then everything after them), answer = each problem's expected answer
    (also passed as `solution`, the column name TRL's own accuracy_reward reads)."""
    prompts, completions = [], []
    for t in trajs:
        first = next((i for i, m in enumerate(t.messages) if m["role"] == "assistant"), len(t.messages))
        prompts.append(t.messages[:first])
        completions.append(t.messages[first:])
    answers = [t.problem.answer for t in trajs]
    return apply_rewards(funcs_with_weights, prompts, completions, details=details,
                         answer=answers, solution=answers, trajectories=trajs)


def add_final_rewards(funcs_with_weights, trajs) -> dict[str, float]:
    """Add the functions' weighted sum to each episode's last turn: r_{T-1} += sum_f w_f f(...).

    Functions judge whole episodes, so their reward belongs to the final turn: credit "turn"
    then gives it to every turn through the returns-to-go. Returns metrics to log:
    rewards/<name>/mean (over samples with an opinion) and rewards/<name>/failures.
    """
    if not funcs_with_weights:
        return {}
    details: dict = {}
    extra, failures = trajectory_rewards(funcs_with_weights, trajs, details=details)
    for t, x in zip(trajs, extra):
        if t.turn_rewards:
            t.turn_rewards[-1] += x
    metrics = {}
    for name, values in details.items():
        seen = [v for v in values if v is not None]
        if seen:
            metrics[f"rewards/{name}/mean"] = sum(seen) / len(seen)
        metrics[f"rewards/{name}/failures"] = failures[name]
    return metrics

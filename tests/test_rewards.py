"""The reward library: hand-computed values, TRL-style functions unchanged, failures counted not fatal."""
import logging
import math
import re
from types import SimpleNamespace

import pytest

from steprl.rewards import (accuracy, accuracy_reward, add_final_rewards, apply_rewards, combine,
                            format_reward, length_penalty, resolve_reward, resolve_rewards, step_reward,
                            tool_success, tool_success_reward, trajectory_rewards)
from steprl.tasks.base import Problem

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 + 5"}}\n</tool_call>'
COMPLETIONS = [
    "<answer>17</answer>",                                   # right
    "<answer>16</answer>",                                   # wrong by 1
    "it is 17",                                              # no answer tag
    [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "17"},
     {"role": "assistant", "content": "<answer>17.0</answer>"}],  # conversational, right
]
PROMPTS = ["Sam has 12 apples. He finds 5 more. How many?"] * 4
ANSWERS = ["17"] * 4


# TRL's documentation examples, copied unchanged: they must work here as they do in TRL.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^<answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def make_bonus(value):  # a factory: config args build the reward function
    return lambda prompts, completions, **kw: [value] * len(completions)


def scaled_len(completions, scale=1.0, **kwargs):  # a reward function with an extra keyword
    return [scale * len(c) for c in completions]


def traj(turn_rewards, calls=0, failures=0, correct=False, mask=(1, 1, 1)):
    return SimpleNamespace(turn_rewards=list(turn_rewards), n_tool_calls=calls, n_tool_failures=failures,
                           correct=correct, mask=list(mask))


def test_accuracy_exact_and_tolerance():
    assert accuracy_reward(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 0.0, 1.0]
    # |16 - 17| = 1 <= 0.1 * 17 = 1.7
    assert accuracy(rel_tol=0.1)(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 1.0, 0.0, 1.0]
    assert accuracy_reward(PROMPTS, COMPLETIONS) == [None] * 4  # no expected answer: no opinion


def test_format_tool_success_length_step():
    assert format_reward(PROMPTS, COMPLETIONS) == [1.0, 1.0, 0.0, 1.0]
    # from messages: one tool message that is not an error -> 0.1; strings -> None
    assert tool_success_reward(PROMPTS, COMPLETIONS) == [None, None, None, 0.1]
    msgs = [[{"role": "tool", "content": "1"}, {"role": "tool", "content": "Error: bad"}]]
    assert tool_success_reward(PROMPTS[:1], msgs) == [0.1]
    # from trajectories: 5 calls - 1 failure = 4 successes, 0.4 capped at 0.2; 1 success = 0.1
    trajs = [traj([0], 5, 1), traj([0], 1, 0)]
    assert tool_success_reward(PROMPTS[:2], ["", ""], trajectories=trajs) == [0.2, 0.1]
    assert tool_success(per_call=0.05, cap=1.0)(PROMPTS[:2], ["", ""], trajectories=trajs) == [0.2, 0.05]
    # length penalty only on correct answers: "<answer>17</answer>" is 19 chars, 19 / 40 * 0.5 = 0.2375;
    # the conversational one has 86 + 21 = 107 chars -> min(107 / 40, 1) * 0.5
    assert len(CALL) == 86
    pen = length_penalty(max_len=40, coef=0.5)(PROMPTS, COMPLETIONS, answer=ANSWERS)
    assert pen == [pytest.approx(-0.2375), 0.0, 0.0, -0.5]
    # tokens: 3 trained tokens / 6 * 0.4 = 0.2, correctness from the trajectory
    tok = length_penalty(max_len=6, coef=0.4, unit="tokens")
    assert tok(PROMPTS[:2], ["", ""], trajectories=[traj([1], correct=True), traj([0])]) == [pytest.approx(-0.2), 0.0]
    assert length_penalty()(PROMPTS[:1], ["x"]) == [None]
    # step reward: 0.1 + 0.5 * 1.0 with gamma 0.5
    assert step_reward(PROMPTS[:1], [""], trajectories=[traj([0.1, 1.0])], gamma=0.5) == [pytest.approx(0.6)]
    assert step_reward(PROMPTS[:1], [""]) == [None]


def test_combine_weights_and_none():
    f = combine([accuracy_reward, format_reward], [1.0, 0.5])
    assert f(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.5, 0.5, 0.0, 1.5]
    only_none = combine([accuracy_reward])  # no answers: every function says None
    assert only_none(PROMPTS, COMPLETIONS) == [None] * 4


def test_trl_style_functions_work_unchanged():
    rewards, failures = apply_rewards([(reward_len, 1.0)], PROMPTS[:3], COMPLETIONS[:3])
    assert rewards == [-1.0, -1.0, -12.0]  # 19, 19 and 8 characters and failures == {"reward_len": 0}
    conv = [[{"role": "assistant", "content": "<answer>17</answer>"}], [{"role": "assistant", "content": "17"}]]
    rewards, _ = apply_rewards([("fmt", format_reward_func, 2.0)], PROMPTS[:2], conv)
    assert rewards == [2.0, 0.0]
    # and by name from a config, as module:function
    name, fn, w = resolve_reward({"name": "test_rewards:reward_len", "weight": 0.5})
    assert (name, fn, w) == ("test_rewards:reward_len", reward_len, 0.5)


def test_resolve_library_factories_and_args():
    specs = [{"name": "accuracy", "args": {"rel_tol": 0.1}}, {"name": "format", "weight": 0.5},
             {"name": "test_rewards:make_bonus", "args": {"value": 2.0}},
             {"name": "test_rewards:scaled_len", "args": {"scale": 3.0}, "weight": -1.0},
             {"name": "format_reward"}, {"name": "format", "weight": 0.0}]
    resolved = resolve_rewards(specs)
    assert [r[0] for r in resolved][-1] == "format#2"
    rewards, failures = apply_rewards(resolved, PROMPTS[:2], COMPLETIONS[:2], answer=ANSWERS[:2])
    # accuracy(0.1) 1; format 0.5 * 1; bonus 2; -1 * 3 * 19 chars; format_reward 1; format#2 0
    assert rewards == [pytest.approx(1 + 0.5 + 2 - 57 + 1)] * 2
    assert set(failures.values()) == {0}
    for bad in ({"name": "nope"}, {"name": "accuracy", "args": {"bogus": 1}}, {"weight": 1.0},
                {"name": "no_such_module:f"}, {"name": "format", "wieght": 1}):
        with pytest.raises(ValueError):
            resolve_reward(bad)


def test_broken_functions_are_counted_and_do_not_stop(caplog):
    def raises(prompts, completions, **kw):
        raise RuntimeError("boom")

    def nan_second(prompts, completions, **kw):
        return [1.0, math.nan, None, "x"][: len(completions)]

    def too_short(prompts, completions, **kw):
        return [1.0]

    funcs = [("raises", raises, 1.0), ("nan", nan_second, 1.0), ("short", too_short, 1.0),
             ("ok", format_reward, 1.0)]
    warned = set()
    with caplog.at_level(logging.WARNING, logger="steprl.rewards"):
        for _ in range(3):  # three calls, one warning per broken function
            rewards, failures = apply_rewards(funcs, PROMPTS, COMPLETIONS, warned=warned)
    assert rewards == [2.0, 1.0, 0.0, 1.0]  # nan: 1 then failed, None, failed; ok: format
    assert failures == {"raises": 4, "nan": 2, "short": 4, "ok": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and any("boom" in m for m in messages)


def test_trajectory_rewards_and_final_turn():
    problem = Problem("p", "Sam has 12 apples. He finds 5 more.", "17")
    messages = [{"role": "user", "content": problem.question}, {"role": "assistant", "content": CALL},
                {"role": "tool", "content": "17"}, {"role": "assistant", "content": "<answer>17</answer>"}]
    t = SimpleNamespace(messages=messages, problem=problem, turn_rewards=[0.1, 1.0], n_tool_calls=1,
                        n_tool_failures=0, correct=True, mask=[1] * 10)
    seen = {}

    def spy(prompts, completions, answer, solution, trajectories, **kw):
        seen.update(prompts=prompts, completions=completions, answer=answer, solution=solution)
        return [0.5]

    rewards, _ = trajectory_rewards([(spy, 1.0)], [t])
    assert rewards == [0.5] and seen["prompts"] == [messages[:1]] and seen["completions"] == [messages[1:]]
    assert seen["answer"] == seen["solution"] == ["17"]
    metrics = add_final_rewards([("acc", accuracy_reward, 2.0), ("spy", spy, 1.0)], [t])
    assert t.turn_rewards == [0.1, pytest.approx(1.0 + 2.0 + 0.5)]
    assert metrics == {"rewards/acc/mean": 1.0, "rewards/acc/failures": 0,
                       "rewards/spy/mean": 0.5, "rewards/spy/failures": 0}
    assert add_final_rewards([], [t]) == {}


def test_numbers_copied_by_hand():
    from steprl.rewards.library import numbers_copied
    from steprl.tools import format_tool_call

    prompt = [{"role": "system", "content": "Use 1 tool."},  # only the user's numbers count
              {"role": "user", "content": "Mia has 7317 shells. She gets 56 more."}]

    def calls(*expressions):
        return [{"role": "assistant", "content": format_tool_call("calculator", {"expression": e})}
                for e in expressions] + [{"role": "tool", "content": "1"}]

    completions = [calls("7317 + 56"),            # both copied: (1 + 1) / 2
                   calls(" 7131 + 56"),           # 7131 vs 7317: prefix 1 of 4 -> (0.25 + 1) / 2
                   calls("7317 + 5"),             # 5 vs 56: prefix 1 of 2 -> (1 + 0.5) / 2
                   calls("73170 + 56"),           # longer: prefix 4 of 5 -> (0.8 + 1) / 2
                   calls("9 + 9"),                # nothing copied
                   calls("7317 * 2", "14634 + 56"),  # numbers may be spread over several calls
                   [{"role": "assistant", "content": '<tool_call>{"name": "calculator"'}],  # malformed: no call
                   "7317 + 56"]                   # a plain string has no calls to read
    got = numbers_copied([prompt] * len(completions), completions)
    assert got[:7] == pytest.approx([1.0, 0.625, 0.75, 0.9, 0.0, 1.0, 0.0]) and got[7] is None
    assert numbers_copied([[{"role": "user", "content": "no numbers"}]], [calls("1 + 1")]) == [None]
    assert resolve_reward({"name": "numbers_copied", "weight": 0.5})[2] == 0.5

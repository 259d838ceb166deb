"""Issue 3 task variants: single-turn PBRFT (calc with no tools, T = 1) and the one-call-per-operation
calc variant for the credit-assignment experiment; each also end to end at toy size."""
import copy
import json
import warnings
from pathlib import Path

import pytest

from steprl.algos import discounted_returns, turn_level_group_advantages
from steprl.config import RewardConfig, load_config
from steprl.envs.tool_env import ToolEnv
from steprl.recipes import rm
from steprl.envs.tool_env import make_envs
from steprl.rollout import NativeEngine
from steprl.rollout.chat import ChatRenderer, tool_setup
from steprl.rollout.episodes import run_episodes
from steprl.tasks.base import Task
from steprl.rollout.sampling import SamplingParams
from steprl.tasks import get_task
from steprl.tasks.calc import DIRECT_PROMPT, CalcTask
from steprl.tools import calculator, format_tool_call


def call(expression):
    return format_tool_call("calculator", {"expression": expression})


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


# ----------------------------------------------------------------------------- PBRFT (no tools, T = 1)

def test_pbrft_task_has_no_tools_one_turn_and_the_same_problems():
    task = get_task("calc", tools=False)
    assert task.tool_names == () and task.max_turns == 1 and task.system_prompt == DIRECT_PROMPT
    agentic = CalcTask()
    assert [(p.question, p.answer) for p in task.problems("test")] == \
           [(p.question, p.answer) for p in agentic.problems("test")]
    conv = task.cold_start(20)
    problems = task.problems("train", 20, seed=10_000)  # the cold-start problems
    for c, p in zip(conv, problems):
        assert [m["role"] for m in c] == ["system", "user", "assistant"] and c[1]["content"] == p.question
        assert "<tool_call>" not in c[2]["content"] and task.check(p, c[2]["content"])
    p = problems[0]
    assert conv[0][2]["content"] == f"We compute {p.meta['expression']} = {p.answer}. <answer>{p.answer}</answer>"
    with pytest.raises(ValueError, match="tools must be true or false"):
        get_task("calc", tools="false")


def test_pbrft_env_gives_one_turn_and_scores_a_direct_answer(tiny):
    _, tok, _ = tiny
    task = CalcTask(tools=False)
    tools, _, suffix = tool_setup(task, tok)
    assert tools == {} and suffix == ""
    p = task.problems("test", 1)[0]
    env = make_envs(task, tools, RewardConfig(), max_turns=3, n=1)[0]
    assert env.max_turns == 1  # the task caps the config
    assert env.reset(p)[0] == {"role": "system", "content": DIRECT_PROMPT}
    r = env.step(f"We compute {p.meta['expression']} = {p.answer}. <answer>{p.answer}</answer>")
    assert r.done and r.reward == 1.0 and env.correct
    env.reset(p)
    r = env.step(f"<answer>{int(p.answer) + 1}</answer>")
    assert r.done and r.reward == 0.0 and not env.correct
    env.reset(p)
    r = env.step(f"It is {p.answer}.")
    assert r.done and r.reward == -0.2


@pytest.mark.parametrize("tools", [{}, {"calculator": calculator}])
def test_pbrft_tool_call_is_not_executed(tools):
    task = CalcTask(tools=False)
    p = task.problems("test", 1)[0]
    env = ToolEnv(task, tools, RewardConfig(), max_turns=3)  # even when handed a calculator
    env.reset(p)
    r = env.step(call(p.meta["expression"]))
    assert r.done and r.observation == [] and r.reward == -0.2  # no +0.1: nothing ran
    assert env.n_calls == 0 and r.info["tool_call_ignored"] and env.answer is None


def test_tool_setup_without_tools_on_a_foreign_template_asks_for_the_answer_format(tiny):
    _, tok, _ = tiny
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template + "{# not the embedded template #}"
    tools, renderer, suffix = tool_setup(CalcTask(tools=False), other)
    assert tools == {} and suffix == " " + Task.answer_format and renderer.tools_schema is None
    _, _, agentic_suffix = tool_setup(CalcTask(), other)
    assert "calculator" in agentic_suffix  # the agentic task still describes its tool


def test_pbrft_rollouts_have_one_turn(tiny):
    model, tok, _ = tiny
    task = CalcTask(tools=False)
    tools, renderer, suffix = tool_setup(task, tok)
    problems = task.problems("test", 4)
    envs = make_envs(task, tools, RewardConfig(), 3, len(problems), suffix)
    trajs = run_episodes(NativeEngine(model, tok), tok, envs, problems, SamplingParams(max_new_tokens=8, temperature=1.0), renderer)
    assert all(t.n_turns == 1 and t.n_tool_calls == 0 and all(t.mask) for t in trajs)


def test_pbrft_rm_pairs_from_direct_answers(tiny):
    _, tok, _ = tiny
    task = CalcTask(tools=False)
    tools, _, suffix = tool_setup(task, tok)
    pairs = rm.generated_pairs(task, tools, suffix, task.problems("train", 8), ["wrong_answer", "missing_answer"], 0)
    assert len(pairs) == 8 and all(p["margin"] > 0 for p in pairs)


# ----------------------------------------------------------------------------- one call per operation

@pytest.mark.parametrize("cumulative", [False, True])
def test_per_op_cold_start_replays_with_every_call_succeeding(cumulative):
    for seed in range(5):
        task = CalcTask(min_ops=1, max_ops=3, one_call_per_op=True, cumulative=cumulative)
        tools = {"calculator": calculator}
        for conv in task.cold_start(40, seed=seed):
            p = next(q for q in task.problems("train", 40, seed=10_000 + seed) if q.question == conv[1]["content"])
            env = make_envs(task, tools, RewardConfig(tool_success_cap=0.3), 4, 1)[0]
            env.reset(p)
            turns = [m for m in conv if m["role"] == "assistant"]
            tool_msgs = [m["content"] for m in conv if m["role"] == "tool"]
            assert len(turns) == p.meta["n_steps"] + 1 and len(tool_msgs) == p.meta["n_steps"]
            rewards = []
            for k, m in enumerate(turns):
                r = env.step(m["content"])
                rewards.append(r.reward)
                if k < len(turns) - 1:
                    assert not r.done and r.observation == [{"role": "tool", "content": tool_msgs[k]}]
            assert r.done and env.correct and env.n_calls == p.meta["n_steps"] and env.n_failures == 0
            assert rewards == pytest.approx([0.1] * p.meta["n_steps"] + [1.0])


def test_per_op_calls_chain_the_intermediate_results():
    task = CalcTask(one_call_per_op=True)
    p = next(q for q in task.problems("train", 50) if q.meta["n_steps"] == 3)
    conv = task.solution_messages(p)
    results = [m["content"] for m in conv if m["role"] == "tool"]
    calls = [m["content"] for m in conv if m["role"] == "assistant"][:-1]
    assert str(p.meta["start"]) in calls[0] and results[-1] == p.answer
    for prev, nxt in zip(results, calls[1:]):
        assert f'" {prev} ' in nxt  # each call starts from the previous result (after a space)


def test_cumulative_calls_are_prefixes_of_the_chain():
    task = CalcTask(one_call_per_op=True, cumulative=True)
    p = next(q for q in task.problems("train", 50) if q.meta["n_steps"] == 3)
    conv = task.solution_messages(p)
    turns = [m["content"] for m in conv if m["role"] == "assistant"]
    calls = [json.loads(t.split("\n")[1])["arguments"]["expression"] for t in turns[:-1]]
    results = [m["content"] for m in conv if m["role"] == "tool"]
    (a, (op1, b), (op2, c), (op3, d)) = p.meta["start"], *p.meta["steps"]
    assert calls == [f" {a} {op1} {b}", f" ({a} {op1} {b}) {op2} {c}", f" (({a} {op1} {b}) {op2} {c}) {op3} {d}"]
    assert calls[-1] == " " + p.meta["expression"] and results[-1] == p.answer
    assert results == [str(r) for _, r in CalcTask(one_call_per_op=True)._steps(p)]
    # the pretraining text is the chained one, as for the single call
    docs = CalcTask(one_call_per_op=True, cumulative=True).pretrain_corpus(50)
    assert docs == CalcTask().pretrain_corpus(50)
    with pytest.raises(ValueError, match="cumulative applies to one_call_per_op only"):
        CalcTask(cumulative=True)


def test_per_op_pretrain_corpus_works_in_steps():
    docs = CalcTask(one_call_per_op=True).pretrain_corpus(200)
    worked = [d if isinstance(d, str) else d[1]["content"] for d in docs]
    worked = [w for w in worked if "We compute" in w]
    assert worked and not any("(" in w for w in worked)  # never the parenthesised chain
    multi = [w for w in worked if w.count(" = ") >= 3]
    assert multi  # e.g. "We compute 114 * 3 = 342. 342 + 8606 = 8948. 8948 * 8 = 71584."


def test_per_op_episode_rewards_and_credit_by_hand():
    """A solved 3-op episode against one that fails a call and gives up, same prompt.

    A: call ok, call ok, call ok, correct answer   r = [0.1, 0.1, 0.1, 1.0]   G = [1.3, 1.2, 1.1, 1.0]
    B: call ok, bad call, no answer                r = [0.1, 0.0, -0.2]       G = [-0.1, -0.2, -0.2]
    credit turn (scale none): turn t baselined on the group's G at turn t; turn 3 has no peer and
    falls back to the mean G_0 = 0.6.
    """
    task = CalcTask(one_call_per_op=True)
    p = next(q for q in task.problems("train", 50) if q.meta["n_steps"] == 3)
    turns = [m["content"] for m in task.solution_messages(p) if m["role"] == "assistant"]
    env = ToolEnv(task, {"calculator": calculator}, RewardConfig(tool_success_cap=0.3), max_turns=4)
    env.reset(p)
    a = [env.step(t).reward for t in turns]
    env.reset(p)
    b = [env.step(turns[0]).reward, env.step(call("12 +")).reward, env.step("I do not know").reward]
    assert a == pytest.approx([0.1, 0.1, 0.1, 1.0]) and b == pytest.approx([0.1, 0.0, -0.2])
    assert discounted_returns(a, 1.0) == pytest.approx([1.3, 1.2, 1.1, 1.0])
    assert discounted_returns(a, 0.5) == pytest.approx([0.1 + 0.05 + 0.025 + 0.125, 0.1 + 0.05 + 0.25, 0.6, 1.0])
    adv = turn_level_group_advantages([a, b], 2, 1.0, "none")
    assert adv[0] == pytest.approx([0.7, 0.7, 0.65, 0.4]) and adv[1] == pytest.approx([-0.7, -0.7, -0.65])
    env = ToolEnv(task, {"calculator": calculator}, RewardConfig(), max_turns=4)  # default cap 0.2
    env.reset(p)
    assert [env.step(t).reward for t in turns] == pytest.approx([0.1, 0.1, 0.0, 1.0])


def test_call_bonus_paid_only_for_the_calls_a_solution_needs():
    """A 2-op problem under the credit config's cap 0.3: a third, redundant call earns 0.1 more than
    the solution's two calls (the incentive GRPO learned to exploit). With tool_success_needed_only
    the cap is 0.1 x 2 calls: the third call pays nothing, and the solved episode keeps 1.2."""
    task = CalcTask(min_ops=2, max_ops=3, one_call_per_op=True, cumulative=True)
    p = next(q for q in task.problems("train", 50) if q.meta["n_steps"] == 2)
    assert task.calls_needed(p) == 2 and CalcTask().calls_needed(p) == 1 and CalcTask(tools=False).calls_needed(p) == 0
    *calls, answer = [m["content"] for m in task.solution_messages(p) if m["role"] == "assistant"]
    padded = calls + [calls[-1], answer]  # the last call repeated, then the same answer

    def rewards(turns, **reward):
        env = ToolEnv(task, {"calculator": calculator}, RewardConfig(tool_success_cap=0.3, **reward), max_turns=4)
        env.reset(p)
        return [env.step(t).reward for t in turns]

    assert rewards(padded) == pytest.approx([0.1, 0.1, 0.1, 1.0])
    assert rewards(padded, tool_success_needed_only=True) == pytest.approx([0.1, 0.1, 0.0, 1.0])
    assert rewards(calls + [answer], tool_success_needed_only=True) == pytest.approx([0.1, 0.1, 1.0])


def test_eval_gives_accuracy_and_calls_by_operations():
    """A policy that always calls three times shows it per bucket: 2-operation problems, 3 calls."""
    from types import SimpleNamespace

    from steprl.recipes.evaluate import eval_metrics

    task = CalcTask(min_ops=2, max_ops=3, one_call_per_op=True, cumulative=True)
    two = [p for p in task.problems("test", 40) if p.meta["n_steps"] == 2][:2]
    three = [p for p in task.problems("test", 40) if p.meta["n_steps"] == 3][:1]
    trajs = [SimpleNamespace(problem=p, correct=c, answered=True, n_tool_calls=3, n_tool_failures=0, n_turns=4,
                             turn_texts=[f"<answer>{p.answer if c else -1}</answer>"])
             for p, c in zip(two + three, [True, False, True])]
    by = eval_metrics(task, trajs)["accuracy_by_steps"]
    assert by == {"2": {"accuracy": 0.5, "n": 2, "tool_calls_per_episode": 3.0},
                  "3+": {"accuracy": 1.0, "n": 1, "tool_calls_per_episode": 3.0}}


def test_episode_metrics_count_calls_beyond_the_solution():
    """By hand: calls 3, 2, 3 on problems of 2, 2 and 3 operations -> (1 + 0 + 0) / 3 beyond the
    solutions; an episode with fewer calls than needed counts 0, not -1; no task, no metric."""
    from steprl.rollout.episodes import Trajectory
    from steprl.training.rl import episode_metrics

    task = CalcTask(min_ops=2, max_ops=3, one_call_per_op=True, cumulative=True)
    two = [p for p in task.problems("train", 40) if p.meta["n_steps"] == 2][:2]
    three = next(p for p in task.problems("train", 40) if p.meta["n_steps"] == 3)
    trajs = [Trajectory(p, [1], turn_rewards=[0.0], n_tool_calls=c) for p, c in zip(two + [three], [3, 2, 3])]
    assert episode_metrics(trajs, 3, task)["tools/calls_beyond_needed"] == pytest.approx(1 / 3)
    trajs[0].n_tool_calls = 0
    assert episode_metrics(trajs, 3, task)["tools/calls_beyond_needed"] == 0.0
    assert "tools/calls_beyond_needed" not in episode_metrics(trajs, 3)


def test_gsm8k_calls_needed_counts_the_annotations():
    from steprl.tasks.gsm8k import Gsm8kTask

    p = Gsm8kTask._problem("x", {"question": "q", "answer": "2*3=<<2*3=6>>6 and 6+4=<<6+4=10>>10.\n#### 10"})
    assert Gsm8kTask().calls_needed(p) == 2 and Gsm8kTask(tools=False).calls_needed(p) == 0


def test_per_op_rm_pairs_for_every_corruption(tiny):
    _, tok, _ = tiny
    task = CalcTask(min_ops=2, max_ops=3, one_call_per_op=True)
    tools, _, suffix = tool_setup(task, tok)
    kinds = ["wrong_number", "wrong_answer", "missing_answer", "malformed_call"]
    pairs = rm.generated_pairs(task, tools, suffix, task.problems("train", 16), kinds, 0)
    assert len(pairs) >= 12 and all(p["margin"] > 0 for p in pairs)


def test_too_few_turns_for_the_per_op_variant_warns():
    task = CalcTask(min_ops=2, max_ops=3, one_call_per_op=True)
    assert task.turns_needed == 4
    with pytest.warns(UserWarning, match="needs up to 4 turns"):
        make_envs(task, {}, RewardConfig(), 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_envs(task, {}, RewardConfig(), 4, 1)
        make_envs(CalcTask(tools=False), {}, RewardConfig(), 3, 1)  # capped to 1, needs 1


# ----------------------------------------------------------------------------- configs, end to end

def test_new_configs_load():
    pbrft, credit = load_config("configs/pbrft.yaml"), load_config("configs/credit.yaml")
    assert get_task(pbrft.task.name, **pbrft.task.args).max_turns == 1
    task = get_task(credit.task.name, **credit.task.args)
    assert credit.grpo.credit == "turn" and credit.grpo.max_turns >= task.turns_needed
    assert credit.ppo.max_turns >= task.turns_needed and credit.eval.max_turns >= task.turns_needed
    assert load_config("configs/credit.yaml", ["grpo.credit=trajectory"]).grpo.credit == "trajectory"


def toy_run(out, name, overrides):
    from steprl.cli import main

    assert main(["run", "configs/toy.yaml", f"output_dir={out}", f"name={name}", "eval_after=[grpo]",
                 *overrides]) == 0
    return out / name


def test_toy_pbrft_end_to_end(tmp_path):
    run = toy_run(tmp_path, "pbrft", ["task.args.tools=false", "grpo.max_turns=1", "eval.max_turns=1"])
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft", "grpo"]
    rows = read_jsonl(run / "grpo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["turns/mean"] == 1.0 and r["tools/call_frequency"] == 0.0 for r in rows)
    assert json.loads((run / "grpo/eval.json").read_text())["turns_mean"] == 1.0
    # PPO on the same task (pretrain and sft are done: the pipeline skips them)
    toy_run(tmp_path, "pbrft", ["task.args.tools=false", "stages=[pretrain,sft,ppo]", "eval_after=[ppo]",
                                "ppo.steps=2", "ppo.prompts_per_step=4", "ppo.minibatch_size=4",
                                "ppo.max_new_tokens=16", "ppo.num_iterations=1"])
    rows = read_jsonl(run / "ppo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["turns/mean"] == 1.0 for r in rows)


def test_toy_credit_end_to_end(tmp_path):
    run = toy_run(tmp_path, "credit", ["task.args.one_call_per_op=true", "task.args.min_ops=2",
                                       "grpo.credit=turn", "grpo.max_turns=4", "eval.max_turns=4",
                                       "grpo.reward.tool_success_cap=0.3"])
    rows = read_jsonl(run / "grpo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(1.0 <= r["turns/mean"] <= 4.0 for r in rows)
    samples = read_jsonl(run / "grpo/samples.jsonl")
    assert samples and all(len(s["turn_rewards"]) <= 4 for s in samples)


def test_rm_corruptions_of_a_direct_answer():
    """Every corruption kind applies to a single-turn solution and scores below it under the rules."""
    import random

    from steprl.recipes.rm import rule_reward
    from steprl.tasks.calc import CalcTask

    task = CalcTask(tools=False)
    problems = task.problems("train", 20, seed=3)
    for problem in problems:
        solution = task.solution_messages(problem)
        for kind in task.corruptions:
            bad = task.corrupt(solution, kind, {}, random.Random(0))
            assert bad[:-1] == solution[:-1]
            assert rule_reward(task, {}, problem, bad) < rule_reward(task, {}, problem, solution)


def test_eval_uses_the_runs_own_task_args(tmp_path):
    from steprl.cli import _run_task_args

    run = tmp_path / "pb"
    (run / "grpo" / "checkpoint").mkdir(parents=True)
    (run / "config.yaml").write_text("task: {name: calc, args: {tools: false}}\n")
    assert _run_task_args(str(run), "calc") == {"tools": False}
    assert _run_task_args(str(run / "grpo" / "checkpoint"), "calc") == {"tools": False}
    assert _run_task_args(str(run), "other") == {}
    assert _run_task_args(str(tmp_path / "plain_model"), "calc") == {}

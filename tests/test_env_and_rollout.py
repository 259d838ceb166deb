import torch

from steprl.config import GRPOConfig, RewardConfig
from steprl.envs.tool_env import ToolEnv
from steprl.recipes.grpo import completion_logprobs, token_advantages
from steprl.rollout.episodes import ChatRenderer, run_episodes
from steprl.rollout.sampling import SamplingParams, generate, left_pad
from steprl.tasks.base import Problem
from steprl.tools import calculator, format_tool_call

PROBLEM = Problem("p", "Sam has 12 apples. He finds 5 more. How many apples does Sam have now?", "17",
                  {"expression": "12 + 5"})


def env_for(task, max_turns=3):
    return ToolEnv(task, {"calculator": calculator}, RewardConfig(), max_turns)


def test_env_tool_call_then_correct_answer(tiny):
    env = env_for(tiny[2])
    messages = env.reset(PROBLEM)
    assert messages[-1] == {"role": "user", "content": PROBLEM.question}
    r1 = env.step(format_tool_call("calculator", {"expression": "12 + 5"}))
    assert r1.observation == [{"role": "tool", "content": "17"}] and not r1.done
    assert r1.reward == 0.1  # dense reward for a successful call
    r2 = env.step("<answer>17</answer>")
    assert r2.done and r2.reward == 1.0 and env.correct


def test_env_bad_calls_do_not_stop_the_episode(tiny):
    env = env_for(tiny[2])
    env.reset(PROBLEM)
    r = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "12 +"}')  # unclosed
    assert not r.done and r.observation[0]["content"].startswith("Error") and r.reward == 0.0
    r = env.step(format_tool_call("calculator", {"expression": "import os"}))  # garbage
    assert r.observation[0]["content"].startswith("Error") and r.reward == 0.0
    assert env.n_calls == 2 and env.n_failures == 2


def test_env_ends_without_answer_with_format_penalty(tiny):
    env = env_for(tiny[2], max_turns=1)
    env.reset(PROBLEM)
    assert env.step("I think it is 17").reward == -0.2
    env.reset(PROBLEM)
    r = env.step(format_tool_call("calculator", {"expression": "12 + 5"}))  # out of turns
    assert r.done and abs(r.reward - (0.1 - 0.2)) < 1e-9


def test_env_tool_reward_is_capped(tiny):
    env = env_for(tiny[2], max_turns=10)
    env.reset(PROBLEM)
    call = format_tool_call("calculator", {"expression": "1 + 1"})
    total = sum(env.step(call).reward for _ in range(5))
    assert abs(total - 0.2) < 1e-9


def test_conversation_mask_trains_only_assistant_tokens(tiny):
    _, tok, task = tiny
    conv = task.solution_messages(PROBLEM)
    ids, mask = ChatRenderer(tok).conversation_ids(conv)
    assert len(ids) == len(mask)
    # the whole sequence is exactly the chat template's rendering
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False).rstrip("\n")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == conv[2]["content"] + "<|im_end|>" + conv[4]["content"] + "<|im_end|>"
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<|im_start|>tool\n17<|im_end|>" in context and PROBLEM.question in context


def test_greedy_generate_matches_hf_generate(tiny):
    model, tok, _ = tiny
    prompts = [tok("Sam has 12 apples.")["input_ids"], tok("7 plus")["input_ids"]]
    ours, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for row, got in zip(ref[:, ids.shape[1]:].tolist(), ours):
        assert row[: len(got)] == got


def test_rollout_keeps_sampled_tokens_and_logprobs(tiny):
    model, tok, task = tiny
    g = torch.Generator().manual_seed(0)
    problems = task.problems("train", 6)
    envs = [env_for(task) for _ in problems]
    trajs = run_episodes(model, tok, envs, problems, SamplingParams(max_new_tokens=16), generator=g)
    for t in trajs:
        assert len(t.ids) == len(t.mask) == len(t.logps) == len(t.turn_index)
        assert t.n_turns >= 1 and len(t.turn_texts) == t.n_turns
    # sampling log-probs equal a fresh full forward's
    logp, _ = completion_logprobs(model, trajs)
    width = logp.shape[1]
    for i, t in enumerate(trajs):
        fresh = logp[i, width - len(t.ids):]
        for f, old, m in zip(fresh.tolist(), t.logps, t.mask):
            if m:
                assert abs(f - old) < 1e-4


def test_observation_tokens_get_no_advantage(tiny):
    model, tok, task = tiny
    traj_problems = [PROBLEM] * 2
    envs = [env_for(task) for _ in traj_problems]
    trajs = run_episodes(model, tok, envs, traj_problems, SamplingParams(max_new_tokens=8),
                         generator=torch.Generator().manual_seed(1))
    trajs[0].turn_rewards, trajs[1].turn_rewards = [1.0], [0.0]
    width = max(len(t.ids) for t in trajs)
    adv = token_advantages(trajs, GRPOConfig(num_generations=2), width)
    for i, t in enumerate(trajs):
        row = adv[i, width - len(t.ids):].tolist()
        assert all(a == 0.0 for a, m in zip(row, t.mask) if not m)
    # (1 - 0.5) / (std([1, 0]) + 1e-4) with Bessel std sqrt(0.5)
    assert abs(adv[0, -1].item() - 0.5 / (0.5 ** 0.5 + 1e-4)) < 1e-5


def test_logprobs_at_sampling_temperature_match(tiny):
    """With T != 1 the loss must score tokens under softmax(logits / T), like the sampler did."""
    model, tok, task = tiny
    problems = task.problems("train", 3)
    envs = [env_for(task) for _ in problems]
    trajs = run_episodes(model, tok, envs, problems, SamplingParams(max_new_tokens=8, temperature=0.7),
                         generator=torch.Generator().manual_seed(2))
    logp, _ = completion_logprobs(model, trajs, temperature=0.7)
    width = logp.shape[1]
    for i, t in enumerate(trajs):
        for f, old, m in zip(logp[i, width - len(t.ids):].tolist(), t.logps, t.mask):
            if m:
                assert abs(f - old) < 1e-4

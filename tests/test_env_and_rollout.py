import torch

from steprl.config import GRPOConfig, RewardConfig
from steprl.envs.tool_env import ToolEnv
from steprl.models.tiny import render_chatml
from steprl.recipes.grpo import token_advantages
from steprl.rollout import NativeEngine
from steprl.rollout.chat import ChatRenderer
from steprl.rollout.episodes import run_episodes
from steprl.rollout.sampling import SamplingParams, generate, left_pad
from steprl.tasks.base import Problem
from steprl.tools import calculator, format_tool_call
from steprl.training.passes import completion_logprobs

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
    assert render_chatml(conv) == tok.apply_chat_template(conv, tokenize=False)  # what trained the tokenizer
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == conv[2]["content"] + "<|im_end|>" + conv[4]["content"] + "<|im_end|>"
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    # a tool result follows a space, as numbers do in the pretraining prose (steprl.models.tiny)
    assert "<|im_start|>tool\n 17<|im_end|>" in context and PROBLEM.question in context


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
    trajs = run_episodes(NativeEngine(model, tok), tok, envs, problems, SamplingParams(max_new_tokens=16), generator=g)
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
    trajs = run_episodes(NativeEngine(model, tok), tok, envs, traj_problems, SamplingParams(max_new_tokens=8),
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
    trajs = run_episodes(NativeEngine(model, tok), tok, envs, problems, SamplingParams(max_new_tokens=8, temperature=0.7),
                         generator=torch.Generator().manual_seed(2))
    logp, _ = completion_logprobs(model, trajs, temperature=0.7)
    width = logp.shape[1]
    for i, t in enumerate(trajs):
        for f, old, m in zip(logp[i, width - len(t.ids):].tolist(), t.logps, t.mask):
            if m:
                assert abs(f - old) < 1e-4


def logps_match(fresh: torch.Tensor, trajs) -> int:
    """Every trained token's sampling log-prob equals the fresh pass's ([N, K] right-aligned) to
    1e-4; returns how many tokens were compared."""
    width, n = fresh.shape[1], 0
    for i, t in enumerate(trajs):
        for new, old, m in zip(fresh[i, width - len(t.ids):].tolist(), t.logps, t.mask):
            if m:
                assert abs(new - old) < 1e-4
                n += 1
    return n


class ScriptedEnv:
    """An environment that ends after `turns` turns whatever the model writes, answering each
    turn with a tool message, so that a random model plays real multi-turn episodes."""

    def __init__(self, turns: int):
        self.turns, self.correct, self.answer, self.n_calls, self.n_failures = turns, False, None, 0, 0

    stop_strings = ("</tool_call>", "</answer>")

    def reset(self, problem):
        self.k = 0
        return [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": problem.question}]

    def step(self, text):
        from steprl.envs.tool_env import StepResult

        self.k += 1
        if self.k >= self.turns:
            return StepResult([], 1.0, True)
        return StepResult([{"role": "tool", "content": f"{self.k * 37} after {len(text)} characters"}], 0.1, False)


def turn_by_turn(model, tok, problems, turns, params):
    """The reference: one `generate` per turn over each episode's whole context so far (prefilled
    again every turn), the rollout as it ran before turns shared the batch."""
    renderer = ChatRenderer(tok)
    params = SamplingParams(**{**params.__dict__, "stop_strings": ("</tool_call>", "</answer>")})
    envs = [ScriptedEnv(k) for k in turns]
    prompts = [renderer.prompt_ids(env.reset(p)) for env, p in zip(envs, problems)]
    ids, masks, logps = [[] for _ in problems], [[] for _ in problems], [[] for _ in problems]
    active = list(range(len(problems)))
    while active:
        out, lps, finish = generate(model, tok, [prompts[i] + ids[i] for i in active], params)
        still = []
        for i, toks, lp, how in zip(active, out, lps, finish):
            ids[i] += toks
            masks[i] += [1] * len(toks)
            logps[i] += lp
            result = envs[i].step(tok.decode(toks, skip_special_tokens=True))
            if not result.done:
                obs = renderer.observation_ids(result.observation, how == "eos")
                ids[i] += obs
                masks[i] += [0] * len(obs)
                logps[i] += [0.0] * len(obs)
                still.append(i)
        active = still
    return ids, masks, logps


def test_multi_turn_rows_share_one_batch_and_match_turn_by_turn(tiny):
    """Episodes of 1, 2 and 3 turns decode in one batch, each row fed its tool result where its
    turn ends: greedy token for token what one `generate` per turn over the whole context gives
    (the context outgrows the first turn's KV cache, which must grow), and sampled log-probs equal
    a fresh forward's."""
    model, tok, task = tiny
    problems = task.problems("train", 6)
    turns = [1, 3, 2, 3, 1, 2]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    trajs = run_episodes(NativeEngine(model, tok), tok, [ScriptedEnv(k) for k in turns], problems, params)
    ids, masks, logps = turn_by_turn(model, tok, problems, turns, params)
    assert [t.n_turns for t in trajs] == turns
    for t, i, m, lp in zip(trajs, ids, masks, logps):
        assert t.ids == i and t.mask == m
        assert max(abs(a - b) for a, b in zip(t.logps, lp)) < 1e-4
        assert t.turn_index.count(-1) == m.count(0)  # observations belong to no turn
        assert sorted({k for k in t.turn_index if k >= 0}) == list(range(t.n_turns))
    assert max(len(t.ids) for t in trajs) > 2 * params.max_new_tokens  # later turns really ran
    sampled = run_episodes(NativeEngine(model, tok), tok, [ScriptedEnv(k) for k in turns], problems,
                           SamplingParams(max_new_tokens=10, temperature=1.0), generator=torch.Generator().manual_seed(3))
    logp, _ = completion_logprobs(model, sampled)
    assert logps_match(logp, sampled) > 0

"""Reward model and PPO at toy size: generated pairs, BT training above chance, the scorer as a
reward source, PPO with both critics, and turn-level GAE checked by hand."""
import json
from pathlib import Path

import pytest
import torch

from steprl.config import LoraConfig, PPOConfig, RMConfig, RunConfig
from steprl.recipes import ppo, rm
from steprl.rewards import reward_model
from steprl.rollout.chat import tool_setup
from steprl.training.policy import VALUE_FILE
from steprl.rewards import resolve_reward
from steprl.rollout.episodes import Trajectory
from steprl.tasks.base import Problem

METRICS_PPO = {"step", "reward", "reward_std", "accuracy", "kl", "entropy", "loss", "learning_rate",
               "grad_norm", "clip_ratio", "completions/mean_length", "completions/clipped_ratio",
               "turns/mean", "tools/call_frequency", "tools/failure_frequency", "frac_reward_zero_std",
               "step_time", "value_loss", "explained_variance", "logp_gap", "logp_gap_max"}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base(tiny_dir):
    """The starting point of both stages: the tiny model's checkpoint directory (conftest)."""
    return str(tiny_dir)


def config(base, out, stage, **sections) -> RunConfig:
    cfg = RunConfig(name="t", output_dir=str(out), stages=[stage], report_to=[])
    cfg.model.name_or_path = base
    cfg.doctor.enabled = False
    for key, value in sections.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def rm_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    cfg = config(base, out, "rm", rm=RMConfig(n_pairs=32, n_test_pairs=24, epochs=2, batch_size=16,
                                                learning_rate=1e-3, warmup_steps=2, use_margin=True,
                                                center_rewards_coefficient=0.01, log_every=1))
    return rm.run(cfg), out / "t" / "rm"


def test_generated_pairs_are_deterministic_ranked_and_disjoint(tiny):
    _, tok, task = tiny
    tools, _, suffix = tool_setup(task, tok)
    kinds = ["wrong_number", "wrong_answer", "missing_answer", "malformed_call"]
    problems = task.problems("train", 12, seed=1)
    train = rm.generated_pairs(task, tools, suffix, problems, kinds, seed=0)
    again = rm.generated_pairs(task, tools, suffix, problems, kinds, seed=0)
    test = rm.generated_pairs(task, tools, suffix, task.problems("test", 12), kinds, seed=1)
    assert train == again and len(train) == 12
    assert {p["kind"] for p in train} == set(kinds)
    assert all(p["margin"] > 0 and p["chosen"][:2] == p["rejected"][:2] for p in train)
    # replayed through the environment: chosen earns correct (1.0) + one successful call (0.1)
    for problem, pair in zip(problems, train):
        assert rm.rule_reward(task, tools, problem, pair["chosen"]) == pytest.approx(1.1)
        assert rm.rule_reward(task, tools, problem, pair["rejected"]) == pytest.approx(1.1 - pair["margin"])
    questions = lambda pairs: {p["chosen"][1]["content"] for p in pairs}  # noqa: E731
    assert not questions(train) & questions(test)


def test_jsonl_pairs_text_and_messages(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "<answer>4</answer>", "rejected": "<answer>5</answer>", "margin": 1},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = rm.load_pairs(str(path))
    assert pairs[0]["chosen"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<answer>4</answer>"}]
    assert pairs[0]["margin"] == 1.0 and pairs[1]["rejected"][-1]["content"] == "b" and pairs[1]["margin"] == 0.0
    path.write_text(json.dumps({"prompt": "x", "chosen": "y"}))
    with pytest.raises(ValueError, match="rejected"):
        rm.load_pairs(str(path))


def test_rm_learns_above_chance_and_scores(rm_run, tiny):
    info, out = rm_run
    assert info["eval"]["n"] == 24 and info["eval"]["accuracy"] > 0.6  # chance is 0.5
    rows = read_jsonl(out / "metrics.jsonl")
    assert any("eval/accuracy" in r for r in rows) and all("step" in r for r in rows)
    assert json.loads((out / "eval.json").read_text())["accuracy"] == info["eval"]["accuracy"]
    ckpt = out / "checkpoint"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    assert json.loads((ckpt / "config.json").read_text())["pad_token_id"] is not None
    # the scorer: TRL signature, text or messages, and resolvable from a config entry
    task = tiny[2]
    p = task.problems("test", 1)[0]
    name, scorer, weight = resolve_reward({"model": str(ckpt), "weight": 0.5})
    assert name == "reward_model" and weight == 0.5
    assert resolve_reward({"model": "rm"}, run_dir=out.parent)[1].model.config.num_labels == 1  # this run's rm
    messages = task.solution_messages(p)
    r_msgs = scorer([messages[:2]], [messages[2:]])
    r_text = scorer([p.question], ["<answer>1</answer>"])
    assert len(r_msgs) == len(r_text) == 1 and all(isinstance(x, float) for x in r_msgs + r_text)


def test_rm_lora_saves_a_merged_model(base, tmp_path):
    cfg = config(base, tmp_path, "rm", rm=RMConfig(n_pairs=8, n_test_pairs=4, epochs=1, batch_size=8,
                                                   lora=LoraConfig(enabled=True, r=4, alpha=8)))
    info = rm.run(cfg)
    ckpt = Path(info["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "adapter_config.json").exists()
    assert len(reward_model.RewardModelScorer(str(ckpt))(["q"], ["a"])) == 1


@pytest.mark.parametrize("use_lora", [False, True])
def test_rm_mean_pooling_by_hand(base, tmp_path, use_lora):
    """pooling "mean": r = mean of the head's per-token scores over the assistant's tokens, in a
    padded batch equal to one unpadded sequence at a time; the trained checkpoint records its
    pooling and the scorer applies it."""
    cfg = config(base, tmp_path, "rm", rm=RMConfig(n_pairs=8, n_test_pairs=4, epochs=1, batch_size=8, pooling="mean",
                                                   lora=LoraConfig(enabled=use_lora, r=4, alpha=8)))
    info = rm.run(cfg)
    ckpt = Path(info["checkpoint"])
    assert json.loads((ckpt / "config.json").read_text())["steprl_rm_pooling"] == "mean"
    scorer = reward_model.RewardModelScorer(str(ckpt))
    model = scorer.model
    torch.manual_seed(0)
    model.score.weight.data.normal_()  # a head that tells tokens apart
    seqs = [[5, 9, 12, 7, 30, 31], [5, 9, 40], [8, 8, 8, 8]]
    masks = [[0, 0, 1, 1, 0, 1], [0, 1, 1], [0, 0, 0, 1]]
    with torch.no_grad():
        got = reward_model.scores(model, seqs, scorer.tokenizer.pad_token_id, masks)
        for seq, mask, r in zip(seqs, masks, got):
            hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state[0]
            per_token = hidden @ model.score.weight[0]
            want = sum(v for v, m in zip(per_token.tolist(), mask) if m) / sum(mask)
            assert abs(float(r) - want) < 1e-5, (float(r), want)
    task = rm.get_task("calc")
    messages = task.solution_messages(task.problems("test", 1)[0])
    ids, mask = scorer.renderer.conversation_ids(messages)
    with torch.no_grad():
        want = reward_model.scores(model, [ids], scorer.tokenizer.pad_token_id, [mask])
        last = reward_model.scores(model, [ids], scorer.tokenizer.pad_token_id)
    assert scorer([messages[:2]], [messages[2:]]) == pytest.approx(want.tolist(), abs=1e-6)
    assert abs(float(want - last)) > 1e-4  # mean pooling is not the last token's score


def logprob_sum_by_hand(model, seq, mask):
    """sum over masked tokens of log softmax(logits)[token], one unpadded sequence."""
    logits = model(input_ids=torch.tensor([seq])).logits[0]
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    return sum(v for v, m in zip(logp.tolist(), mask[1:]) if m)


@pytest.mark.parametrize("use_lora", [False, True])
def test_implicit_scores_by_hand(tiny, use_lora):
    """type "implicit": r = beta * sum_t m_t [log pi(y_t) - log pi_ref(y_t)] in a padded batch equals
    the log-softmax of one unpadded sequence at a time; under LoRA the reference is the base with
    adapters disabled, without LoRA a separate model."""
    import copy

    from steprl.models.loading import apply_lora

    base = copy.deepcopy(tiny[0])
    if use_lora:
        policy, reference = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, r=4, alpha=8)), None
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # fresh LoRA is a no-op: make it move the policy
    else:
        policy, reference = copy.deepcopy(base), base
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
    seqs = [[5, 9, 12, 7, 30, 31], [5, 9, 40], [8, 8, 8, 8]]
    masks = [[0, 0, 1, 1, 0, 1], [0, 1, 1], [0, 0, 0, 1]]
    with torch.no_grad():
        got = reward_model.implicit_scores(policy, reference, seqs, masks, beta=0.3)
        for seq, mask, r in zip(seqs, masks, got):
            want = 0.3 * (logprob_sum_by_hand(policy, seq, mask) - logprob_sum_by_hand(base, seq, mask))
            assert abs(float(r) - want) < 1e-5, (float(r), want)
            assert abs(want) > 1e-3  # the policy differs from its reference where it is scored
    same = reward_model.implicit_scores(base, copy.deepcopy(base), seqs, masks, beta=0.3)
    assert same.abs().max() < 1e-6  # pi = pi_ref: r = 0


@pytest.mark.parametrize("use_lora", [False, True])
def test_implicit_rm_learns_and_scores(base, tmp_path, use_lora):
    """The implicit RM trains (held-out pairs above chance on the toy model), saves the policy with
    its reference beside it, and the scorer gives the same r as the training-time function."""
    cfg = config(base, tmp_path, "rm", rm=RMConfig(type="implicit", beta=0.1, n_pairs=32, n_test_pairs=24, epochs=2,
                                                   batch_size=16, learning_rate=1e-3, warmup_steps=2,
                                                   lora=LoraConfig(enabled=use_lora, r=8, alpha=16)))
    info = rm.run(cfg)
    assert info["eval"]["accuracy"] > 0.6  # chance is 0.5; the untrained implicit RM scores every pair 0
    ckpt = Path(info["checkpoint"])
    assert (ckpt / "reference" / "model.safetensors").is_file() and not (ckpt / "adapter_config.json").exists()
    scorer = resolve_reward({"model": str(ckpt)})[1]
    task = rm.get_task("calc")
    messages = task.solution_messages(task.problems("test", 1)[0])
    ids, mask = scorer.renderer.conversation_ids(messages)
    policy, _ = rm.load_policy(str(ckpt))
    reference, _ = rm.load_policy(str(base))  # the saved reference is the untouched base
    with torch.no_grad():
        want = 0.1 * (logprob_sum_by_hand(policy, ids, mask) - logprob_sum_by_hand(reference, ids, mask))
    got = scorer([messages[:2]], [messages[2:]])
    assert got == pytest.approx([want], abs=1e-4) and abs(want) > 1e-3


def hand_trajectory():
    """Prompt, turn 0 (2 sampled tokens), 2 observation tokens, turn 1 (1 sampled token)."""
    return Trajectory(Problem("p", "q", "1"), prompt_ids=[1, 2], ids=[10, 11, 50, 51, 12], mask=[1, 1, 0, 0, 1],
                      logps=[-1.0, -1.0, 0.0, 0.0, -1.0], turn_index=[0, 0, -1, -1, 1], turn_rewards=[0.1, 1.0])


def test_turn_level_gae_by_hand():
    t = hand_trajectory()
    # width 6: one padding column on the left; observation values (9.0) must play no part
    values = torch.tensor([[0.0, 0.5, 0.6, 9.0, 9.0, 0.8]])
    p = PPOConfig(credit="turn", gamma=0.9, gae_lambda=0.5)
    adv, ret = ppo.advantages_and_returns([t], values, p)
    # turn 1 (last token): delta = 1.0 + 0 - 0.8 = 0.2, A = 0.2
    # end of turn 0: delta = 0.1 + 0.9 * 0.8 - 0.6 = 0.22, A = 0.22 + 0.9 * 0.5 * 0.2 = 0.31
    # inside turn 0 (gamma = lambda = 1): delta = 0 + 0.6 - 0.5 = 0.1, A = 0.1 + 0.31 = 0.41
    #   = r_0 + gamma V(s_1) - V_0 + gamma lambda A(s_1) = 0.1 + 0.72 - 0.5 + 0.09
    assert adv[0].tolist() == pytest.approx([0, 0.41, 0.31, 0, 0, 0.2])
    assert ret[0].tolist() == pytest.approx([0, 0.91, 0.91, 0, 0, 1.0])
    # k1 KL in the reward, beta 0.5: token rewards [0 - 0.1, 0.1 + 0.05, 1.0 - 0.2] = [-0.1, 0.15, 0.8]
    kl = torch.tensor([[0.0, 0.2, -0.1, 5.0, 5.0, 0.4]])
    adv, _ = ppo.advantages_and_returns([t], values, p, kl=kl, kl_coef=0.5)
    # A_2 = 0.8 - 0.8 = 0; A_1 = 0.15 + 0.72 - 0.6 = 0.27; A_0 = -0.1 + 0.6 - 0.5 + 0.27 = 0.27
    assert adv[0].tolist() == pytest.approx([0, 0.27, 0.27, 0, 0, 0], abs=1e-6)
    # truncation penalty -0.5 on the last token: A_2 = -0.3, A_1 = 0.22 - 0.135, A_0 = 0.1 + A_1
    t.truncated = True
    adv, _ = ppo.advantages_and_returns([t], values, PPOConfig(credit="turn", gamma=0.9, gae_lambda=0.5,
                                                               truncation_penalty=-0.5))
    assert adv[0].tolist() == pytest.approx([0, 0.185, 0.085, 0, 0, -0.3])


def test_trajectory_credit_gae_by_hand_and_matches_algos():
    t = hand_trajectory()
    values = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.8]])
    # R = 0.1 + 0.9 * 1.0 = 1.0 on the last token; token-level GAE with gamma 1, lambda 0.5:
    # A_2 = 1.0 - 0.8 = 0.2; A_1 = 0.8 - 0.6 + 0.5 * 0.2 = 0.3; A_0 = 0.6 - 0.5 + 0.5 * 0.3 = 0.25
    adv, ret = ppo.advantages_and_returns([t], values, PPOConfig(credit="trajectory", gamma=0.9, gae_lambda=0.5))
    assert adv[0].tolist() == pytest.approx([0.25, 0.3, 0, 0, 0.2])
    assert ret[0].tolist() == pytest.approx([0.75, 0.9, 0, 0, 1.0])
    # one turn only: turn credit and trajectory credit coincide when lambda = 1
    a1, _ = ppo.episode_gae([0.0, 0.0, 1.0], [0.2, 0.4, 0.6], [0, 0, 0], 0.9, 1.0, "turn")
    a2, _ = ppo.episode_gae([0.0, 0.0, 1.0], [0.2, 0.4, 0.6], [0, 0, 0], 0.9, 1.0, "trajectory")
    assert a1 == pytest.approx(a2) and a1 == pytest.approx([0.8, 0.6, 0.4])


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_two_steps(base, tmp_path, critic, rm_run):
    shared = critic == "shared"
    rm_ckpt = str(rm_run[1] / "checkpoint")
    p = PPOConfig(steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=8, max_turns=2,
                  minibatch_size=4, critic=critic, credit="turn" if shared else "trajectory",
                  kl_in_reward=not shared, adaptive_kl=shared, truncation_penalty=-0.1,
                  lora=LoraConfig(enabled=shared, r=4, alpha=8))
    p.reward.functions = [{"name": "accuracy"}, {"model": rm_ckpt, "weight": 0.1}]
    info = ppo.run(config(base, tmp_path, "ppo", ppo=p))
    out = tmp_path / "t" / "ppo"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert METRICS_PPO <= set(rows[0]) and "rewards/reward_model/mean" in rows[0]
    assert all(r["rewards/reward_model/failures"] == 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["value_loss"] >= 0 for r in rows)
    # fp32 sampler and fp32 training pass before the first update: one policy, only float rounding
    assert all(0 <= r["logp_gap"] <= r["logp_gap_max"] < 1e-4 for r in rows)
    ckpt = Path(info["checkpoint"])
    assert (ckpt / ("adapter_model.safetensors" if shared else "model.safetensors")).is_file()
    assert (ckpt / VALUE_FILE).is_file() and (out / "done.json").is_file()
    assert read_jsonl(out / "samples.jsonl")

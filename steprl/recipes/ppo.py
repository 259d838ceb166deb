"""Stage `ppo`: PPO with a learned value model on multi-turn tool episodes. One step, top to bottom:

 1. rollout   P prompts x G episodes (G = num_generations, 1 by default), turns batched, tools run
              between turns; each sampled token keeps its log-prob (the sampler's).
 2. scores    per-turn rewards r_t from the environment (+ config reward functions or a reward
              model, added to the last turn); the old log-probs: the training pass's own under
              importance_sampling_correction (one no-grad pass), else the sampler's; reference
              log-probs (adapters disabled, or a frozen copy; skipped when kl_coef is 0 and the
              controller is fixed); values V_j of the critic at every action token j (the state
              just before token j is sampled).
 3. rewards   on action tokens only (observation tokens are the environment's move, not the
              agent's: they get no reward, no advantage, no value loss):
                credit "trajectory": R = sum_t gamma^t r_t on the episode's last token;
                credit "turn":       r_t on the last token of turn t;
              kl_in_reward: every token also gets -beta * (logp_old_j - logp_ref_j)   (k1);
              truncation_penalty is added on the last token when a turn hit max_new_tokens.
 4. GAE       over the action tokens j = 0..n-1 of an episode, V_n = 0 (the episode ended):
                delta_j = r_j + g_j V_{j+1} - V_j,     A_j = delta_j + g_j l_j A_{j+1}
              "trajectory": g_j = 1, l_j = lambda at every token (token-level GAE, as RLHF PPO);
              "turn": (g_j, l_j) = (gamma, lambda) from the last token of turn t to the first of
              turn t+1, (1, 1) inside a turn. Inside turn t the sum telescopes to
                A_j = r_t + gamma V(s_{t+1}) - V_j + gamma lambda A(s_{t+1})
              turn-level GAE (gamma and lambda act between turns, not tokens), each token
              baselined by its own value. Value targets R_j = A_j + V_j; advantages whitened.
 5. loss      per action token: w clipped_surrogate(logp, old, A) [+ beta KL_est(pi || ref) when not
              kl_in_reward], aggregated by loss_type; + vf_coef * token-mean of clipped_value_loss;
              w = min(exp(old - sampler), cap) under importance_sampling_correction (TIS), else 1.
 6. update    num_iterations epochs over minibatches, gradient clipping (policy and critic apart),
              then the KL controller: fixed, or adaptive
                beta <- beta * (1 + clip(KL / target_kl - 1, -0.2, 0.2) * episodes / kl_horizon).

The loop around the step (schedule, logging, auto-fix, checkpoints) is training/rl.py's, shared
with GRPO. critic "separate": a copy of the policy's trunk + a linear value head, fully trained;
critic "shared": the value head reads the policy's own last hidden state (LoRA or full).

doctor.auto_fix: the same AutoFixer as GRPO acts on the live doctor's findings: the KL coefficient
is steered into the healthy band; a KL explosion lowers the learning rate (the critic's with it),
raises kl_coef and rolls the policy *and* the value model back to the last healthy step, clearing
AdamW's moments for both; a NaN minibatch is skipped (logged as a NaN loss, so the doctor sees
it) and the learning rate backs off; an OOM step is retried with a halved micro-batch (gradient
accumulation keeps the minibatch), fewer new tokens and gradient checkpointing.
"""
from __future__ import annotations

import copy
import random

import torch

from steprl.algos import (AdaptiveKLController, FixedKLController, aggregate_loss, clipped_surrogate,
                          clipped_value_loss, discounted_returns, gae, kl_penalty, masked_mean, masked_whiten,
                          truncated_is_weight)
from steprl.config import RunConfig
from steprl.monitor.autofix import micro_batch
from steprl.rewards import add_final_rewards, resolve_rewards
from steprl.rollout import make_engine
from steprl.rollout.chat import tool_setup
from steprl.rollout.episodes import Trajectory
from steprl.runtime import setup_runtime
from steprl.tasks import get_task
from steprl.training.common import Timer, stage_dir
from steprl.training.passes import REFERENCE_BATCHES, batched_logprobs, reference_logprobs, right_aligned
from steprl.training.policy import setup_policy
from steprl.training.rl import (RLState, accumulation_scale, clipped_tokens, episode_metrics, live_settings, rollout,
                                sampler_gap, train_rl)
from steprl.training.value import Critic, ValueHead, batched, policy_forward


def run(cfg: RunConfig) -> dict:
    rt = setup_runtime(cfg)
    p = live_settings(cfg.ppo)
    ckpt = stage_dir(cfg, "ppo") / "checkpoint"
    # auto-fix watches KL (an explosion is its main trigger) and may switch the penalty on
    use_ref = p.kl_coef > 0 or p.adaptive_kl or cfg.doctor.auto_fix

    def make_value_model(model):  # before LoRA goes in: a separate critic copies the plain trunk
        hidden_size = model.config.get_text_config().hidden_size
        if p.critic == "separate":
            return Critic(copy.deepcopy(model.get_decoder()), hidden_size)
        return ValueHead(hidden_size)

    policy = setup_policy(cfg, "ppo", p.lora, p.learning_rate, use_ref, ckpt, make_value_model,
                          p.critic_learning_rate, rt=rt)
    task = get_task(cfg.task.name, **cfg.task.args)
    tools, renderer, suffix = tool_setup(task, policy.tokenizer)
    start = policy.state["step"] if policy.state else 0
    kl_coef = policy.state["extra"]["settings"]["kl_coef"] if policy.state else p.kl_coef
    kl_ctl = None
    if not cfg.doctor.auto_fix:  # auto-fix steers kl_coef itself (adaptive, as GRPO's)
        kl_ctl = AdaptiveKLController(kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl else FixedKLController(kl_coef)
    state = RLState(
        settings=p, policy=policy, runtime=rt,
        engine=make_engine(cfg.rollout.engine, policy.sampler, policy.tokenizer, rt.device.type, cfg.rollout.release_memory,
                           rt.rollout_precision(cfg.rollout.precision)),
        task=task, tools=tools, renderer=renderer, system_suffix=suffix, rollout=cfg.rollout,
        problems=task.problems("train", max(p.steps * p.prompts_per_step, 1000), seed=cfg.seed),
        reward_fns=resolve_rewards(p.reward.functions, run_dir=cfg.run_dir),  # rules and/or a reward model
        generator=torch.Generator().manual_seed(rt.rank_seed(cfg.seed + start)), rng=random.Random(cfg.seed),
        extra={"use_ref": use_ref, "kl_ctl": kl_ctl})
    desc = (f"ppo ({'LoRA' if p.lora.enabled else 'full'}, {p.critic} critic, "
            f"{p.prompts_per_step * p.num_generations} episodes/step)")
    info = train_rl(cfg, "ppo", state, ppo_step, desc, adapt_kl=p.kl_coef > 0 or p.adaptive_kl)
    return {**info, "critic": p.critic}


def ppo_step(state: RLState) -> tuple[dict, list[Trajectory]]:
    """One PPO step (steps 1-6 of the module docstring); returns its metrics and trajectories.
    Minibatches of p.minibatch_size episodes are split into micro-batches (micro_batch_size,
    lowered by auto-fix on OOM) whose gradients add up to the minibatch's."""
    p, model, optimizer = state.settings, state.policy.model, state.policy.optimizer
    value_model, device, autocast = state.policy.value_model, state.runtime.device, state.runtime.autocast
    micro = micro_batch(p)
    timer = Timer()
    critic = value_model if isinstance(value_model, Critic) else None
    head = value_model if critic is None else None
    policy_params, value_params = state.policy.params, list(value_model.parameters())
    # 1. rollout
    value_model.eval()
    trajs = rollout(state, state.next_prompts())
    rollout_seconds = timer.seconds

    # 2. scores: extra rewards, reference log-probs, old values
    reward_metrics = add_final_rewards(state.reward_fns, trajs)
    width = max(len(t.ids) for t in trajs)
    mask = right_aligned([t.mask for t in trajs], width, device=device)
    sampler_logp = right_aligned([t.logps for t in trajs], width, device=device)
    old_logp, ref_logp = sampler_logp, None
    with autocast():
        if p.importance_sampling_correction:  # the training pass's own, before any update (see grpo.py)
            old_logp = batched_logprobs(model, trajs, REFERENCE_BATCHES * micro, p.temperature)
        if state.extra["use_ref"]:
            ref_logp = reference_logprobs(model, state.policy.ref_model, trajs, micro, p.temperature)
        old_values = batched(critic if critic is not None else (lambda mb: policy_forward(model, mb, head)[2]),
                             trajs, micro).float()

    # 3-4. token rewards -> GAE -> whitened advantages and value targets
    k1 = (old_logp - ref_logp) * mask if ref_logp is not None else None
    advantages, returns = advantages_and_returns(trajs, old_values, p, k1 if p.kl_in_reward else None,
                                                 p.kl_coef)
    rt = state.runtime
    if p.whiten_advantages:  # over the whole launch's batch
        total = (lambda t: t.new_tensor(rt.sum(float(t)))) if rt.world_size > 1 else None
        advantages = masked_whiten(advantages, mask, total=total) * mask

    # 5-6. clipped policy and value updates, micro-batches accumulated into minibatches
    model.train()
    value_model.train()
    stats = {k: [] for k in ("loss", "policy_loss", "value_loss", "entropy", "clip_ratio", "grad_norm",
                             "logp_gap", "logp_gap_max")}
    skipped = 0
    for _ in range(p.num_iterations):
        order = list(range(len(trajs)))
        state.rng.shuffle(order)
        for lo in range(0, len(order), state.minibatch_size):
            mb_idx = order[lo:lo + state.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0}
            mb_tokens = max(rt.sum(float(mask[mb_idx].sum())) / rt.world_size, 1.0)  # token means are the launch's
            finite = True
            for mlo in range(0, len(mb_idx), micro):
                idx = mb_idx[mlo:mlo + micro]
                mb = [trajs[i] for i in idx]
                cols = slice(width - max(len(t.ids) for t in mb), width)
                with autocast():
                    logp, entropy, values = policy_forward(model, mb, head, p.temperature)
                    if critic is not None:
                        values = critic(mb)
                values = values.float()
                m, a, old, sampled = mask[idx, cols], advantages[idx, cols], old_logp[idx, cols], sampler_logp[idx, cols]
                per_token = clipped_surrogate(logp, old, a, p.epsilon, clip_eps_high=p.epsilon_high)
                if p.importance_sampling_correction:
                    per_token = per_token * truncated_is_weight(old, sampled, p.importance_sampling_cap)
                if ref_logp is not None and not p.kl_in_reward:
                    per_token = per_token + p.kl_coef * kl_penalty(logp, ref_logp[idx, cols], p.kl_estimator)
                # each part weighted by its share of the minibatch, so the accumulated gradient is the minibatch's
                policy_loss = aggregate_loss(per_token, m, p.loss_type, max_len=p.max_new_tokens * p.max_turns)
                policy_loss = policy_loss * accumulation_scale(p, mask[idx], mask[mb_idx], mb_tokens)
                value_loss = masked_mean(clipped_value_loss(values, old_values[idx, cols], returns[idx, cols],
                                                            p.value_clip), m)
                value_loss = value_loss * float(mask[idx].sum()) / mb_tokens
                loss = policy_loss + p.vf_coef * value_loss
                if not torch.isfinite(loss):
                    finite = False
                    if not rt.shards_parameters:
                        break
                loss.backward()  # under FSDP also a NaN's: every rank runs every backward, its collectives pair them
                if not finite:
                    continue
                for key, value in (("loss", loss), ("policy_loss", policy_loss), ("value_loss", value_loss)):
                    totals[key] += float(value.detach())
                stats["entropy"].append(float(masked_mean(entropy, m)))
                stats["clip_ratio"].append(float(masked_mean(clipped_tokens(logp, old, a, p).float(), m)))
                if not stats["grad_norm"]:  # sampler vs trainer: only before the first update
                    for key, value in sampler_gap(logp, sampled, m).items():
                        stats[key].append(value)
            # every micro-batch finite on every rank: average over ranks, clip (policy and critic apart), apply
            if rt.sync_gradients(list({id(q): q for q in policy_params + value_params}.values()), finite):
                grad_norm = torch.nn.utils.clip_grad_norm_(policy_params, p.max_grad_norm)
                value_norm = torch.nn.utils.clip_grad_norm_(value_params, p.max_grad_norm)
                if torch.isfinite(grad_norm) and torch.isfinite(value_norm):
                    optimizer.step()
                    for key, value in totals.items():
                        stats[key].append(value)
                    stats["grad_norm"].append(float(grad_norm))
                    continue
            skipped += 1  # a NaN loss or gradient: this minibatch is never applied
            stats["loss"].append(float("nan"))  # logged, so that the doctor (and auto-fix) see it
            optimizer.zero_grad(set_to_none=True)

    kl = float(masked_mean(kl_penalty(old_logp, ref_logp, p.kl_estimator), mask)) if ref_logp is not None else 0.0
    metrics = {
        **episode_metrics(trajs, p.num_generations, state.task),
        "kl": kl,
        **{k: sum(v) / len(v) for k, v in stats.items() if v},
        "explained_variance": explained_variance(old_values, returns, mask),
        "values/mean": float(masked_mean(old_values, mask)),
        **reward_metrics,
        "rollout_time": rollout_seconds,
    }
    if stats["logp_gap_max"]:
        metrics["logp_gap_max"] = max(stats["logp_gap_max"])
    if skipped:
        metrics.update({"event": "nan_skip", "skipped_minibatches": skipped})

    # 7. the KL controller (auto-fix steers kl_coef itself when it is on)
    metrics["kl_coef"] = p.kl_coef
    kl_ctl = state.extra.get("kl_ctl")
    if kl_ctl is not None:  # from the launch's KL, so that every rank's coefficient moves alike
        kl_ctl.update(rt.sum(kl) / rt.world_size, len(trajs) * rt.world_size)
        p.kl_coef = kl_ctl.value
    return metrics, trajs



# ---------------------------------------------------------------------------- rewards and GAE

def episode_gae(rewards, values, turn_of, gamma: float, lam: float, credit: str):
    """(advantages, returns) over one episode's action tokens (formulas in the module docstring)."""
    if credit == "trajectory":
        adv, ret = gae(rewards, list(values) + [0.0], 1.0, lam)
        return adv.tolist(), ret.tolist()
    n, adv, next_v, next_a = len(rewards), [0.0] * len(rewards), 0.0, 0.0
    for j in reversed(range(n)):
        boundary = j == n - 1 or turn_of[j + 1] != turn_of[j]
        g, lam_j = (gamma, lam) if boundary else (1.0, 1.0)
        next_a = rewards[j] + g * next_v - values[j] + g * lam_j * next_a
        adv[j], next_v = next_a, values[j]
    return adv, [a + v for a, v in zip(adv, values)]


def advantages_and_returns(trajs, values: torch.Tensor, p, kl: torch.Tensor | None = None,
                           kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards placed as in step 3, then episode_gae; [N, K] right-aligned, 0 off the action tokens."""
    adv, ret = torch.zeros_like(values), torch.zeros_like(values)
    width = values.shape[1]
    for i, t in enumerate(trajs):
        off = width - len(t.ids)
        pos = [off + j for j, m in enumerate(t.mask) if m]
        if not pos:
            continue
        turn_of = [t.turn_index[q - off] for q in pos]
        r = [0.0] * len(pos)
        if p.credit == "trajectory":
            r[-1] += discounted_returns(t.turn_rewards, p.gamma)[0] if t.turn_rewards else 0.0
        else:
            last = {k: j for j, k in enumerate(turn_of)}  # turn -> index of its last token
            for k, r_k in enumerate(t.turn_rewards):
                r[last.get(k, len(r) - 1)] += r_k
        if t.truncated:
            r[-1] += p.truncation_penalty
        if kl is not None:
            r = [x - kl_coef * float(kl[i, q]) for x, q in zip(r, pos)]
        a, g = episode_gae(r, values[i, pos].tolist(), turn_of, p.gamma, p.gae_lambda, p.credit)
        adv[i, pos], ret[i, pos] = torch.tensor(a, device=adv.device), torch.tensor(g, device=adv.device)
    return adv, ret


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over the action tokens: 1 = perfect critic, <= 0 = useless."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 1e-8 else 0.0

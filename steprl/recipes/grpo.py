"""Stage `grpo`: GRPO on multi-turn tool episodes. One step, top to bottom:

 1. rollout   sample G episodes for each of P prompts (turns batched, tools run between turns);
              keep each sampled token's log-prob (the sampler's).
 2. rewards   per-turn rewards r_t from the environment (correct answer, tool success, format);
              credit "trajectory": R = sum_t gamma^t r_t for every token of the episode;
              credit "turn": G_t = sum_{k>=t} gamma^(k-t) r_k for the tokens of turn t.
 3. advantage A = (R - mean_group) / (std_group + 1e-4)   (scale_rewards: group | batch | none)
 4. loss      per trained token: -w min(rho A, clip(rho, 1-eps, 1+eps_high) A) + kl_coef * KL_k3(pi || pi_ref),
              rho = exp(logp - old_logp); aggregated per sequence ("grpo"), per token ("dapo")
              or by a constant ("dr_grpo"); observation tokens (mask 0) never count.
              importance_sampling_correction (TIS): old_logp is the training pass's own, before the
              step's first update, and w = min(exp(old_logp - sampler_logp), cap) corrects for the
              sampler's arithmetic (bf16, other kernels); without it, old_logp = sampler_logp, w = 1.
 5. update    num_iterations passes over the batch in minibatches, gradient clipping. A minibatch
              runs in micro-batches of similar length (sorted by prompt + completion), so that
              left-padding each to its longest costs little; the prompts' common beginning runs
              once per minibatch (`Beginning`); the loss is the same for any grouping.

Under LoRA the reference policy is the same network with its adapters disabled: no second copy.
The loop around the step (schedule, logging, auto-fix, checkpoints) is training/rl.py's, shared
with PPO; the passes that compute log-probs are training/passes.py's.
"""
from __future__ import annotations

import random
from contextlib import nullcontext

import torch
from torch.distributed.fsdp import FSDPModule

from steprl.algos import (aggregate_loss, clipped_surrogate, group_advantages, kl_penalty, trajectory_returns,
                          truncated_is_weight, turn_level_group_advantages)
from steprl.config import RunConfig
from steprl.monitor.autofix import micro_batch
from steprl.rewards import add_final_rewards, resolve_rewards
from steprl.rollout import make_engine
from steprl.rollout.chat import tool_setup
from steprl.rollout.episodes import Trajectory
from steprl.runtime import setup_runtime
from steprl.tasks import get_task
from steprl.training.common import Timer, stage_dir
from steprl.training.passes import (REFERENCE_BATCHES, Beginning, batched_logprobs, by_length, completion_logprobs,
                                    reference_logprobs, right_aligned)
from steprl.training.policy import setup_policy
from steprl.training.rl import (RLState, accumulation_scale, clipped_tokens, episode_metrics, live_settings, rollout,
                                sampler_gap, train_rl)


def run(cfg: RunConfig) -> dict:
    rt = setup_runtime(cfg)
    g = live_settings(cfg.grpo)
    ckpt = stage_dir(cfg, "grpo") / "checkpoint"
    policy = setup_policy(cfg, "grpo", g.lora, g.learning_rate, g.kl_coef > 0 or cfg.doctor.auto_fix, ckpt, rt=rt)
    task = get_task(cfg.task.name, **cfg.task.args)
    tools, renderer, suffix = tool_setup(task, policy.tokenizer)
    start = policy.state["step"] if policy.state else 0
    state = RLState(
        settings=g, policy=policy, runtime=rt,
        engine=make_engine(cfg.rollout.engine, policy.sampler, policy.tokenizer, rt.device.type, cfg.rollout.release_memory,
                           rt.rollout_precision(cfg.rollout.precision)),
        task=task, tools=tools, renderer=renderer, system_suffix=suffix, rollout=cfg.rollout,
        problems=task.problems("train", max(g.steps * g.prompts_per_step, 1000), seed=cfg.seed),
        reward_fns=resolve_rewards(g.reward.functions, run_dir=cfg.run_dir),  # rules and/or {model: rm}
        generator=torch.Generator().manual_seed(rt.rank_seed(cfg.seed + start)), rng=random.Random(cfg.seed + start))
    desc = f"grpo ({'LoRA' if g.lora.enabled else 'full'}, {g.prompts_per_step}x{g.num_generations} episodes/step)"
    return train_rl(cfg, "grpo", state, grpo_step, desc, adapt_kl=g.kl_coef > 0)


def grpo_step(state: RLState) -> tuple[dict, list[Trajectory]]:
    """One GRPO step (rollout, rewards, advantages, updates); returns its metrics and trajectories."""
    g, model, optimizer = state.settings, state.policy.model, state.policy.optimizer
    device = state.runtime.device
    timer = Timer()

    # 1. rollout: G episodes per prompt, consecutive blocks share a prompt
    trajs = rollout(state, state.next_prompts())
    rollout_seconds = timer.seconds

    # 2. rewards: the environment's per-turn rewards; reward functions or a reward model add theirs
    #    to the last turn: r_{T-1} += sum_f w_f f(...)
    reward_metrics = add_final_rewards(state.reward_fns, trajs)

    # 3. advantages per token; the old log-probs: the sampler's, or under TIS the training pass's,
    #    which a step of one update takes from its own pass (None here) and others from one more
    #    pass; the reference pass only when the KL term counts
    width = max(len(t.ids) for t in trajs)
    advantages = token_advantages(trajs, g, width, device, state.runtime)
    sampler_logp = right_aligned([t.logps for t in trajs], width, device=device)
    mask = right_aligned([t.mask for t in trajs], width, device=device)
    old_logp = None if g.importance_sampling_correction else sampler_logp
    if g.importance_sampling_correction and (g.num_iterations > 1 or state.minibatch_size < len(trajs)):
        with state.runtime.autocast():
            old_logp = batched_logprobs(model, trajs, REFERENCE_BATCHES * micro_batch(g), g.temperature)
    ref_logp = None
    if g.kl_coef > 0:
        with state.runtime.autocast():
            ref_logp = reference_logprobs(model, state.policy.ref_model, trajs, micro_batch(g), g.temperature)

    # 4-5. clipped policy-gradient updates, micro-batches accumulated into minibatches
    model.train()
    stats: dict[str, list[float]] = {"loss": [], "kl": [], "entropy": [], "clip_ratio": [], "grad_norm": [],
                                     "logp_gap": [], "logp_gap_max": []}
    skipped, rt = 0, state.runtime
    for _ in range(g.num_iterations):
        order = list(range(len(trajs)))
        state.rng.shuffle(order)
        for lo in range(0, len(order), state.minibatch_size):
            mb_idx = order[lo:lo + state.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            mb_tokens = rt.sum(float(mask[mb_idx].sum())) / rt.world_size  # dapo's token mean is the launch's
            done = minibatch_backward(model, trajs, mb_idx, mask, advantages, (old_logp, sampler_logp), ref_logp,
                                      g, rt.autocast, mb_tokens)
            # every micro-batch finite on every rank: average over ranks, clip and apply
            if rt.sync_gradients(state.policy.params, done is not None):
                total, micro_stats = done
                for s in micro_stats:
                    for k, v in s.items():
                        if not k.startswith("logp_gap") or not stats["grad_norm"]:  # the gap: before any update
                            stats[k].append(v)
                grad_norm = torch.nn.utils.clip_grad_norm_(state.policy.params, g.max_grad_norm)
                if torch.isfinite(grad_norm):
                    optimizer.step()
                    stats["loss"].append(total)
                    stats["grad_norm"].append(float(grad_norm))
                    continue
            skipped += 1  # a NaN loss or gradient: this minibatch is never applied
            optimizer.zero_grad(set_to_none=True)

    metrics = {
        **episode_metrics(trajs, g.num_generations, state.task),
        **{k: sum(v) / len(v) for k, v in stats.items() if v},
        **reward_metrics,
        "rollout_time": rollout_seconds,
    }
    if stats["logp_gap_max"]:
        metrics["logp_gap_max"] = max(stats["logp_gap_max"])
    if skipped:
        metrics.update({"event": "nan_skip", "skipped_minibatches": skipped})
    return metrics, trajs


# ---------------------------------------------------------------------------- the step's parts

def token_advantages(trajs: list[Trajectory], g, width: int, device=None, runtime=None) -> torch.Tensor:
    """Advantage of every completion token, [B, K] right-aligned (0 on observation tokens)."""
    turn_rewards, mine = [t.turn_rewards for t in trajs], 0
    if g.scale_rewards == "batch" and runtime is not None and runtime.world_size > 1:
        # the batch's std is the whole launch's: every rank's rewards, then this rank's rows
        turn_rewards, mine = runtime.gather(turn_rewards), runtime.rank * len(trajs)
    if g.credit == "trajectory":
        returns = torch.tensor(trajectory_returns(turn_rewards, g.gamma))
        adv = group_advantages(returns, g.num_generations, g.scale_rewards).tolist()[mine:]
        rows = [[a if m else 0.0 for m in t.mask] for a, t in zip(adv, trajs)]
    else:
        per_turn = turn_level_group_advantages(turn_rewards, g.num_generations, g.gamma, g.scale_rewards)[mine:]
        rows = [[per_turn[i][k] if k >= 0 else 0.0 for k in t.turn_index] for i, t in enumerate(trajs)]
    return right_aligned(rows, width, device=device)


def minibatch_backward(model, trajs, mb_idx, mask, advantages, old_logp, ref_logp, g, autocast=nullcontext,
                       mb_tokens: float | None = None):
    """Accumulate the gradient of one minibatch's loss, micro-batch by micro-batch. `old_logp`:
    (old log-probs or None for the pass's own, the sampler's log-probs) as `policy_loss` takes them.

    The micro-batches are cut from the minibatch sorted by length (`by_length`), not in its shuffled
    order: which trajectories form the minibatch, and each one's weight in its loss, do not change,
    only which of them share a forward pass. Returns (loss, statistics per micro-batch), or None when
    a loss is not finite (the caller then drops the partial gradient): at once, or under FSDP after
    every micro-batch's backward, which every rank must run.
    """
    total, stats, finite = 0.0, [], True
    width = mask.shape[1]
    order = by_length(trajs, mb_idx)
    micro = micro_batch(g)
    starts = range(0, len(order), micro)
    with autocast():
        beginning = Beginning(model, [trajs[i] for i in order], len(starts))
    for lo in starts:
        idx = order[lo:lo + micro]
        mb = [trajs[i] for i in idx]
        cols = slice(width - max(len(t.ids) for t in mb), width)
        scale = accumulation_scale(g, mask[idx], mask[mb_idx], mb_tokens)
        with autocast():
            old = tuple(None if x is None else x[idx] for x in old_logp)
            loss, s = policy_loss(model, mb, cols, mask[idx], advantages[idx], old,
                                  None if ref_logp is None else ref_logp[idx], g, scale, beginning.of())
        if not torch.isfinite(loss):
            finite = False
            if not isinstance(model, FSDPModule):
                return None
        loss.backward()  # under FSDP also a NaN's: every rank runs every backward, its collectives pair them
        total += loss.item()
        stats.append(s)
    with autocast():
        beginning.backward()
    return (total, stats) if finite else None


def policy_loss(model, mb, cols, mask, advantages, old_logp, ref_logp, g, scale: float, beginning=None):
    """Loss of one micro-batch (already scaled for gradient accumulation) and its statistics.
    `old_logp` = (old, sampler): the ratio's old log-probs (None: this pass's own, detached: the
    step's only update) and the sampler's, which TIS weights by."""
    logp, entropy = completion_logprobs(model, mb, with_entropy=True, temperature=g.temperature,
                                        beginning=beginning)
    old, sampled = old_logp
    m, a, sampled = mask[:, cols], advantages[:, cols], sampled[:, cols]
    old = logp.detach() if old is None else old[:, cols]
    per_token = clipped_surrogate(logp, old, a, g.epsilon, clip_eps_high=g.epsilon_high)
    if g.importance_sampling_correction:
        per_token = per_token * truncated_is_weight(old, sampled, g.importance_sampling_cap)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp[:, cols], g.kl_estimator)
        per_token = per_token + g.kl_coef * kl
    loss = aggregate_loss(per_token, m, g.loss_type, max_len=g.max_new_tokens * g.max_turns) * scale
    n_tok = m.sum().clamp(min=1)
    clipped = clipped_tokens(logp, old, a, g)
    stats = {"kl": float((kl.detach() * m).sum() / n_tok), "entropy": float((entropy * m).sum() / n_tok),
             "clip_ratio": float((clipped.float() * m).sum() / n_tok), **sampler_gap(logp, sampled, m)}
    return loss, stats

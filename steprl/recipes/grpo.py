"""Stage 3, GRPO on multi-turn tool episodes. One step, top to bottom:

 1. rollout   sample G episodes for each of P prompts (turns batched, tools run between turns);
              keep each sampled token's log-prob: it is the "old" log-prob, no extra pass needed.
 2. rewards   per-turn rewards r_t from the environment (correct answer, tool success, format);
              credit "trajectory": R = sum_t gamma^t r_t for every token of the episode;
              credit "turn": G_t = sum_{k>=t} gamma^(k-t) r_k for the tokens of turn t.
 3. advantage A = (R - mean_group) / (std_group + 1e-4)   (scale_rewards: group | batch | none)
 4. loss      per trained token: -min(rho A, clip(rho, 1-eps, 1+eps_high) A) + kl_coef * KL_k3(pi || pi_ref),
              rho = exp(logp - old_logp); aggregated per sequence ("grpo"), per token ("dapo")
              or by a constant ("dr_grpo"); observation tokens (mask 0) never count.
 5. update    num_iterations passes over the batch in minibatches, gradient clipping. A minibatch
              runs in micro-batches of similar length (sorted by prompt + completion), so that
              left-padding each to its longest costs little; the prompts' common beginning runs
              once per minibatch (`Beginning`); the loss is the same for any grouping.

Under LoRA the reference policy is the same network with its adapters disabled: no second copy.
"""
from __future__ import annotations

import json
import random

import torch
from transformers.cache_utils import DynamicCache

from steprl.algos import (aggregate_loss, clipped_surrogate, entropy_from_logits, group_advantages, kl_penalty,
                          logprobs_and_entropy, token_logprobs, trajectory_returns, turn_level_group_advantages)
from steprl.config import RunConfig
from steprl.memory import keep_freed_memory, release_free_memory
from steprl.models.loading import is_peft, save_checkpoint
from steprl.models.mapped import release_reference
from steprl.monitor import MetricsLogger
from steprl.monitor.autofix import AutoFixer, Knobs, handle_oom
from steprl.recipes.common import (Timer, cosine_lr, mark_done, progress_bar, save_state,
                                   set_lr, setup_torch, stage_dir)
from steprl.recipes.evaluate import make_envs, tool_setup
from steprl.recipes.policy import setup_policy
from steprl.rewards import add_final_rewards, resolve_rewards
from steprl.rollout.decoder import LlamaDecoder
from steprl.rollout.episodes import Trajectory, run_episodes
from steprl.rollout.sampling import SamplingParams, common_prefix, extend, left_pad
from steprl.tasks import get_task

REFERENCE_BATCHES = 4  # training micro-batches per reference pass (see reference_logprobs)


# ---------------------------------------------------------------------------- batching

def right_aligned(rows: list[list], width: int, fill=0, dtype=torch.float32) -> torch.Tensor:
    """Rows placed at the right edge of a [len(rows), width] tensor (completions end together)."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r):] = torch.tensor(r, dtype=dtype)
    return out


def by_length(trajs: list[Trajectory], idx) -> list[int]:
    """`idx` ordered so that consecutive runs of it make cheap micro-batches: the G episodes of a
    prompt side by side (a micro-batch computes their shared prompt once, `completion_logits`), and
    groups sorted by length (prompt + the group's longest completion), so that padding each
    micro-batch to its longest wastes little compute. With no repeated prompt this is plain
    sorting by sequence length."""
    longest: dict[tuple, int] = {}
    for i in idx:
        key = tuple(trajs[i].prompt_ids)
        longest[key] = max(longest.get(key, 0), len(trajs[i].ids))

    def order(i):
        prompt = tuple(trajs[i].prompt_ids)
        return len(prompt) + longest[prompt], prompt, len(trajs[i].ids)
    return sorted(idx, key=order)


def completion_logits(model, trajs: list[Trajectory], width: int, beginning=None) -> torch.Tensor:
    """Logits [B, width, V] that predict each completion token, completions right-aligned to `width`.

    What the rows share is computed once, in up to three passes through one KV cache, each run
    on top of the cache of the one before (rows left-padded, the padding masked, positions
    continuing the row's sequence):
      1. the beginning common to every prompt (a system prompt, a tool description), once;
      2. each distinct prompt's rest, minus its last token, once per prompt (the G episodes of a
         GRPO group share it), the cache's rows repeated for its episodes afterwards;
      3. each episode's last prompt token + completion; the LM head runs here only.
    The logits are those of one plain pass over prompt + completion, to float rounding, and the
    gradient flows through the shared keys and values into every episode's loss. Passes 1 and 2
    are skipped when they would not save tokens (distinct prompts: one plain pass, LM head on
    the last width + 1 positions only).

    `beginning` = (ids, [(keys, values) per layer]) replaces pass 1 with keys and values computed
    once for several micro-batches (`Beginning`); every prompt must start with `ids`.
    """
    index: dict[tuple, int] = {}
    stem_of = [index.setdefault(tuple(t.prompt_ids), len(index)) for t in trajs]
    bodies = [list(p[:-1]) for p in index]  # the last prompt token goes with the completion
    n, u = len(trajs), len(bodies)
    cache = DynamicCache(config=model.config)
    if beginning is not None:  # pass 1 done already: its keys and values seed the cache
        ids, kv = beginning
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys, values, layer)
        cache.batch_select_indices(torch.zeros(u, dtype=torch.long))
        bodies, past = [b[len(ids):] for b in bodies], torch.ones(u, len(ids), dtype=torch.long)
    else:
        shared = min(common_prefix(bodies[0], b) for b in bodies)
        common = min(shared, min(len(b) for b in bodies) - 1)  # every prompt keeps a token
        cost = {"plain": n * max(len(t.prompt_ids) + len(t.ids) for t in trajs),
                "per_prompt": u * max(len(b) for b in bodies) + n * (width + 1),
                "common": common + u * max(len(b) - common for b in bodies) + n * (width + 1)}
        plan = min(cost, key=cost.get)
        checkpointing = getattr(model, "is_activation_checkpointing", False)  # it turns the cache off
        if plan == "plain" or min(len(b) for b in bodies) < 1 or checkpointing:
            ids, attn, pos = left_pad([t.prompt_ids + t.ids for t in trajs], pad_id=0)
            return model(input_ids=ids, attention_mask=attn, position_ids=pos,
                         logits_to_keep=width + 1).logits[:, :-1]
        past = torch.zeros(u, 0, dtype=torch.long)  # the attention mask of what the cache holds
        if plan == "common" and common > 0:
            _, past, _ = extend(model, cache, [bodies[0][:common]], past[:1])
            cache.batch_select_indices(torch.zeros(u, dtype=torch.long))
            bodies, past = [b[common:] for b in bodies], past.expand(u, -1)
    _, past, _ = extend(model, cache, bodies, past)
    rows = torch.tensor(stem_of)
    cache.batch_select_indices(rows)
    logits, _, _ = extend(model, cache, [[t.prompt_ids[-1]] + t.ids for t in trajs], past[rows], keep=width + 1)
    return logits[:, :-1]


class Beginning:
    """The prompts' common beginning (a system prompt and tool description), run once for all the
    micro-batches of a minibatch instead of once per micro-batch.

    With gradients, its keys and values enter each micro-batch as leaves (`kv`), whose gradients
    accumulate over the micro-batches; `backward()` then sends the sum through the beginning's
    graph once. By the chain rule the parameters get the gradient of one pass over everything.
    That graph is built only then, by running the beginning again (same weights and random
    state, so the same keys and values): the first run keeps no activations, so none are held
    while the micro-batches run (SmolLM2's 152 tokens: ~0.16 GB, for one more forward of them).
    Empty (`ids` = []) when the prompts share fewer than MIN_BEGINNING tokens or there is one
    micro-batch only (`completion_logits` then shares what it can within the pass).
    """

    MIN_BEGINNING = 16

    def __init__(self, model, trajs: list[Trajectory], micro_batches: int):
        prompts = [t.prompt_ids for t in trajs]
        k = min(min(common_prefix(prompts[0], p) for p in prompts), min(len(p) for p in prompts) - 2)
        checkpointing = getattr(model, "is_activation_checkpointing", False)  # it turns the cache off
        self.ids = list(prompts[0][:k]) if micro_batches > 1 and k >= self.MIN_BEGINNING and not checkpointing else []
        self.model, self.kv = None, None
        if self.ids:
            grad, self.rng = torch.is_grad_enabled(), torch.get_rng_state()  # dropout draws again alike
            with torch.no_grad():
                self.kv = [tuple(x.requires_grad_(grad) for x in pair) for pair in self.keys_values(model)]
            self.model = model if grad else None

    def keys_values(self, model) -> list[tuple]:
        out = model(input_ids=torch.tensor([self.ids]), use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def of(self):
        """The `beginning` argument of completion_logits (None when there is none)."""
        return (self.ids, self.kv) if self.ids else None

    def backward(self) -> None:
        """Send the gradients the micro-batches left on the keys and values through the beginning."""
        leaves = [x for pair in self.kv or [] for x in pair]
        if self.model is None or all(x.grad is None for x in leaves):
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            graph = [x for pair in self.keys_values(self.model) for x in pair]
        pairs = [(x, leaf.grad) for x, leaf in zip(graph, leaves) if leaf.grad is not None]
        torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])


def completion_logprobs(model, trajs: list[Trajectory], with_entropy: bool = False, temperature: float = 1.0,
                        beginning=None):
    """Log-probs of every completion token under softmax(logits / T), [B, K] right-aligned,
    K = longest completion. T must be the sampling temperature, so that the first ratio is 1.

    A shared prompt is computed once per micro-batch and the LM head runs on completion positions
    only (`completion_logits`).
    """
    width = max(len(t.ids) for t in trajs)
    logits = completion_logits(model, trajs, width, beginning).float()
    if temperature != 1.0:  # skipped at 1: a copy of [B, K, V] for nothing
        logits = logits / temperature
    targets = right_aligned([t.ids for t in trajs], width, dtype=torch.long)
    if not torch.is_grad_enabled():  # reference / old log-probs: never the [B, K, V] log-softmax
        return token_logprobs(logits, targets), (entropy_from_logits(logits) if with_entropy else None)
    return logprobs_and_entropy(logits, targets, with_entropy)


def token_advantages(trajs: list[Trajectory], g, width: int) -> torch.Tensor:
    """Advantage of every completion token, [B, K] right-aligned (0 on observation tokens)."""
    turn_rewards = [t.turn_rewards for t in trajs]
    if g.credit == "trajectory":
        returns = torch.tensor(trajectory_returns(turn_rewards, g.gamma))
        adv = group_advantages(returns, g.num_generations, g.scale_rewards).tolist()
        rows = [[a if m else 0.0 for m in t.mask] for a, t in zip(adv, trajs)]
    else:
        per_turn = turn_level_group_advantages(turn_rewards, g.num_generations, g.gamma, g.scale_rewards)
        rows = [[per_turn[i][k] if k >= 0 else 0.0 for k in t.turn_index] for i, t in enumerate(trajs)]
    return right_aligned(rows, width)


def sample_record(tokenizer, t: Trajectory, step: int) -> dict:
    """One trajectory for samples.jsonl: text segments with their trained flag."""
    segments = [{"text": tokenizer.decode(t.prompt_ids), "trained": False, "role": "prompt"}]
    start = 0
    for i in range(1, len(t.ids) + 1):
        if i == len(t.ids) or t.mask[i] != t.mask[start]:
            trained = bool(t.mask[start])
            segments.append({"text": tokenizer.decode(t.ids[start:i]), "trained": trained,
                             "role": "assistant" if trained else "tool"})
            start = i
    return {"step": step, "prompt": t.problem.question, "answer": t.problem.answer, "reward": t.reward,
            "turn_rewards": t.turn_rewards, "correct": t.correct, "segments": segments}


def episode_metrics(trajs: list[Trajectory], group_size: int) -> dict:
    """The BRIEF's episode metrics, the same for grpo and ppo: reward, accuracy, lengths, turns and
    tool use. Consecutive blocks of group_size share a prompt; with 1 (PPO) the batch is one group."""
    rewards = torch.tensor([t.reward for t in trajs])
    groups = rewards.view(-1, group_size) if group_size > 1 else rewards.view(1, -1)
    group_std = groups.std(dim=1).nan_to_num(0.0)  # NaN for a group of one
    n, n_calls = len(trajs), sum(t.n_tool_calls for t in trajs)
    return {
        "reward": rewards.mean().item(),
        "reward_std": group_std.mean().item(),
        "accuracy": sum(t.correct for t in trajs) / n,
        "completions/mean_length": sum(sum(t.mask) for t in trajs) / n,
        "completions/clipped_ratio": sum(t.truncated for t in trajs) / n,
        "turns/mean": sum(t.n_turns for t in trajs) / n,
        "tools/call_frequency": n_calls / n,
        "tools/failure_frequency": sum(t.n_tool_failures for t in trajs) / max(1, n_calls),
        "frac_reward_zero_std": (group_std < 1e-6).float().mean().item(),
        "format": sum(t.answered for t in trajs) / n,
    }


def log_samples(samples_file, tokenizer, trajs: list[Trajectory], rng, n: int, step: int) -> None:
    """n random trajectories of this step to samples.jsonl, flushed so a crash keeps them."""
    for t in rng.sample(trajs, min(n, len(trajs))):
        samples_file.write(json.dumps(sample_record(tokenizer, t, step)) + "\n")
    samples_file.flush()


# ---------------------------------------------------------------------------- the stage

def policy_loss(model, mb, cols, mask, advantages, old_logp, ref_logp, g, knobs, scale: float, beginning=None):
    """Loss of one micro-batch (already scaled for gradient accumulation) and its statistics."""
    logp, entropy = completion_logprobs(model, mb, with_entropy=True, temperature=g.temperature,
                                        beginning=beginning)
    m, a, old = mask[:, cols], advantages[:, cols], old_logp[:, cols]
    per_token = clipped_surrogate(logp, old, a, g.epsilon, clip_eps_high=g.epsilon_high)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp[:, cols], g.kl_estimator)
        per_token = per_token + knobs.kl_coef * kl
    loss = aggregate_loss(per_token, m, g.loss_type, max_len=g.max_new_tokens * g.max_turns) * scale
    n_tok = m.sum().clamp(min=1)
    clipped = clipped_tokens(logp, old, a, g)
    stats = {"kl": float((kl.detach() * m).sum() / n_tok), "entropy": float((entropy * m).sum() / n_tok),
             "clip_ratio": float((clipped.float() * m).sum() / n_tok)}
    return loss, stats


def clipped_tokens(logp, old_logp, advantages, g) -> torch.Tensor:
    """Where the clip held the ratio back (no gradient): rho < 1 - eps with A < 0, or
    rho > 1 + eps_high with A > 0. Its token mean is the clip_ratio metric."""
    ratio = torch.exp(logp.detach() - old_logp)
    eps_high = g.epsilon_high if g.epsilon_high is not None else g.epsilon
    return ((ratio < 1 - g.epsilon) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))


def accumulation_scale(g, micro_mask: torch.Tensor, mb_mask: torch.Tensor) -> float:
    """Weight of a micro-batch in its minibatch, so that accumulated gradients equal one big batch."""
    if g.loss_type == "dapo":  # token mean over the whole minibatch
        return float(micro_mask.sum() / mb_mask.sum().clamp(min=1))
    return micro_mask.shape[0] / mb_mask.shape[0]  # per-sequence means


def minibatch_backward(model, trajs, mb_idx, mask, advantages, old_logp, ref_logp, g, knobs):
    """Accumulate the gradient of one minibatch's loss, micro-batch by micro-batch.

    The micro-batches are cut from the minibatch sorted by length (`by_length`), not in its shuffled
    order: which trajectories form the minibatch, and each one's weight in its loss, do not change,
    only which of them share a forward pass. Returns (loss, statistics per micro-batch), or None as
    soon as a loss is not finite (the caller then drops the partial gradient).
    """
    total, stats = 0.0, []
    width = mask.shape[1]
    order = by_length(trajs, mb_idx)
    starts = range(0, len(order), knobs.micro_batch_size)
    beginning = Beginning(model, [trajs[i] for i in order], len(starts))
    for lo in starts:
        idx = order[lo:lo + knobs.micro_batch_size]
        mb = [trajs[i] for i in idx]
        cols = slice(width - max(len(t.ids) for t in mb), width)
        scale = accumulation_scale(g, mask[idx], mask[mb_idx])
        loss, s = policy_loss(model, mb, cols, mask[idx], advantages[idx], old_logp[idx],
                              None if ref_logp is None else ref_logp[idx], g, knobs, scale, beginning.of())
        if not torch.isfinite(loss):
            return None
        loss.backward()
        total += loss.item()
        stats.append(s)
    beginning.backward()
    return total, stats


def run(cfg: RunConfig) -> dict:
    setup_torch(cfg)
    keep_freed_memory()  # the passes reuse freed activations instead of page-faulting fresh ones
    g, out = cfg.grpo, stage_dir(cfg, "grpo")
    ckpt = out / "checkpoint"
    policy = setup_policy(cfg, "grpo", g.lora, g.learning_rate, g.kl_coef > 0 or cfg.doctor.auto_fix, ckpt)
    model, tokenizer, ref_model, optimizer, params = (policy.model, policy.tokenizer, policy.ref_model,
                                                      policy.optimizer, policy.params)

    task = get_task(cfg.task.name, **cfg.task.args)
    tools, renderer, suffix = tool_setup(task, tokenizer)
    problems = task.problems("train", max(g.steps * g.prompts_per_step, 1000), seed=cfg.seed)
    reward_fns = resolve_rewards(g.reward.functions, run_dir=cfg.run_dir)  # rules and/or {model: rm}
    knobs = Knobs(g.learning_rate, g.kl_coef, g.micro_batch_size or g.minibatch_size, g.num_generations,
                  g.max_new_tokens, g.max_grad_norm, g.gradient_checkpointing)
    start = 0
    if policy.state:
        start = policy.state["step"]
        knobs = Knobs(**policy.state["extra"]["knobs"])
    fixer = AutoFixer(model, knobs) if cfg.doctor.auto_fix else None
    if fixer is not None:
        fixer.snapshot(start)  # the starting weights are the first known-good state to roll back to
    logger = MetricsLogger(out, "grpo", report_to=cfg.report_to, doctor_context=knobs.as_context(),
                           live_doctor=cfg.doctor.enabled)
    if start:
        logger.truncate_after(start + 1)
    generator = torch.Generator().manual_seed(cfg.seed + start)
    rng = random.Random(cfg.seed + start)
    bar = progress_bar(g.steps, f"grpo ({'LoRA' if g.lora.enabled else 'full'}, "
                                f"{g.prompts_per_step}x{g.num_generations} episodes/step)", initial=start)
    samples_file = open(out / "samples.jsonl", "a")
    step = start
    while step < g.steps:
        timer = Timer()
        set_lr(optimizer, knobs.learning_rate * cosine_lr(step, g.steps, g.warmup_steps, min_ratio=1.0))
        if knobs.gradient_checkpointing and not model.is_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if fixer is not None:
            fixer.begin_step(step)  # the weights this step's metrics will judge
        try:
            metrics, trajs = grpo_step(model, ref_model, tokenizer, optimizer, params, task, tools, renderer,
                                       suffix, problems, step, g, knobs, generator, rng, reward_fns)
        except (torch.OutOfMemoryError, MemoryError) as err:
            handle_oom(fixer, logger, optimizer, step + 1, err, "lower grpo.micro_batch_size")
            continue  # nothing was applied: retry the step with the smaller settings
        metrics.update({"learning_rate": optimizer.param_groups[0]["lr"], "kl_coef": knobs.kl_coef,
                        "step_time": timer.seconds})
        logger.context.update(knobs.as_context())  # advice starts from the settings in force now
        findings = logger.log(metrics, step + 1)
        if fixer is not None:
            for action in fixer.after_step(findings, metrics, step + 1, optimizer, len(trajs), g.kl_coef > 0):
                logger.record(action)
        log_samples(samples_file, tokenizer, trajs, rng, g.n_samples_logged, step + 1)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        kl=f"{metrics.get('kl', 0.0):.3f}")
        step += 1
        if g.save_every and step % g.save_every == 0 and step < g.steps:
            save_checkpoint(model, tokenizer, ckpt, base_path=policy.base)
            save_state(ckpt, step, optimizer, {"knobs": knobs.__dict__})
    bar.close()
    samples_file.close()
    logger.close()
    save_checkpoint(model, tokenizer, ckpt, base_path=policy.base)
    (ckpt / "trainer_state.pt").unlink(missing_ok=True)
    info = {"checkpoint": str(ckpt), "base": policy.base, "steps": g.steps}
    mark_done(out, info)
    return info


def grpo_step(model, ref_model, tokenizer, optimizer, params, task, tools, renderer, suffix, problems,
              step, g, knobs, generator, rng, reward_fns=()) -> tuple[dict, list[Trajectory]]:
    """One GRPO step (rollout, advantages, updates); returns its metrics and trajectories."""
    timer = Timer()
    # 1. rollout: G episodes per prompt, consecutive blocks share a prompt
    first = (step * g.prompts_per_step) % len(problems)
    batch = [problems[(first + i) % len(problems)] for i in range(g.prompts_per_step)]
    episodes = [p for p in batch for _ in range(knobs.num_generations)]
    envs = make_envs(task, tools, g.reward, g.max_turns, len(episodes), suffix)
    sampling = SamplingParams(max_new_tokens=knobs.max_new_tokens, temperature=g.temperature,
                              top_p=g.top_p, top_k=g.top_k)
    model.eval()
    if g.release_memory:  # the last passes' freed activations: not resident under the rollout's
        release_free_memory()
    trajs = run_episodes(model, tokenizer, envs, episodes, sampling, renderer, generator)
    LlamaDecoder.forget(model)  # its weight copies go stale at the next update: free them for the passes
    rollout_seconds = timer.seconds

    # 2-3. rewards -> per-token advantages; the sampling log-probs are the old log-probs (no forward
    #      pass, whatever num_iterations); the reference pass only when the KL term counts
    reward_metrics = add_final_rewards(reward_fns, trajs)  # r_{T-1} += sum_f w_f f(...): functions, RM
    width = max(len(t.ids) for t in trajs)
    advantages = token_advantages(trajs, g, width)
    old_logp = right_aligned([t.logps for t in trajs], width)
    mask = right_aligned([t.mask for t in trajs], width)
    ref_logp = None
    if knobs.kl_coef > 0:
        ref_logp = reference_logprobs(model, ref_model, trajs, knobs.micro_batch_size, g.temperature)

    # 4-5. clipped policy-gradient updates, micro-batches accumulated into minibatches
    model.train()
    stats: dict[str, list[float]] = {"loss": [], "kl": [], "entropy": [], "clip_ratio": [], "grad_norm": []}
    skipped = 0
    for _ in range(g.num_iterations):
        order = list(range(len(trajs)))
        rng.shuffle(order)
        for lo in range(0, len(order), g.minibatch_size):
            optimizer.zero_grad(set_to_none=True)
            done = minibatch_backward(model, trajs, order[lo:lo + g.minibatch_size], mask, advantages,
                                      old_logp, ref_logp, g, knobs)
            if done is not None:  # every micro-batch was finite: clip and apply the accumulated gradient
                total, micro_stats = done
                for s in micro_stats:
                    for k, v in s.items():
                        stats[k].append(v)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, knobs.max_grad_norm)
                if torch.isfinite(grad_norm):
                    optimizer.step()
                    stats["loss"].append(total)
                    stats["grad_norm"].append(float(grad_norm))
                    continue
            skipped += 1  # a NaN loss or gradient: this minibatch is never applied
            optimizer.zero_grad(set_to_none=True)

    metrics = {
        **episode_metrics(trajs, knobs.num_generations),
        **{k: sum(v) / len(v) for k, v in stats.items() if v},
        **reward_metrics,
        "rollout_time": rollout_seconds,
    }
    if skipped:
        metrics.update({"event": "nan_skip", "skipped_minibatches": skipped})
    return metrics, trajs


@torch.no_grad()
def batched_logprobs(model, trajs: list[Trajectory], batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of all completions, [N, K] right-aligned with K the longest in the whole batch;
    computed in batches of similar length (`by_length`), like the training pass."""
    width = max(len(t.ids) for t in trajs)
    out = torch.zeros(len(trajs), width)
    order = by_length(trajs, range(len(trajs)))
    starts = range(0, len(order), batch_size)
    beginning = Beginning(model, trajs, len(starts))
    for lo in starts:
        idx = order[lo:lo + batch_size]
        logp, _ = completion_logprobs(model, [trajs[i] for i in idx], temperature=temperature,
                                      beginning=beginning.of())
        out[idx, width - logp.shape[1]:] = logp
    return out


def reference_logprobs(model, ref_model, trajs: list[Trajectory], micro_batch_size: int,
                       temperature: float = 1.0) -> torch.Tensor:
    """Log-probs under the reference policy: the same network with its LoRA adapters disabled,
    or, for full fine-tuning, the frozen copy `ref_model` (a mapped one gives its pages back
    after each module, so that they are not resident on top of the heap's high-water mark).

    The pass holds no activations for a backward, so it runs REFERENCE_BATCHES micro-batches at
    once: its memory is mostly the logits ([B, K, V], log-probs taken one row at a time), below a
    training micro-batch's saved activations, and larger batches run the matmuls faster (SmolLM2,
    16 sequences: 1.68 s in one pass against 2.15 s in 4, `benchmarks/reference_pass.py`)."""
    batch_size = REFERENCE_BATCHES * micro_batch_size
    if is_peft(model):
        with model.disable_adapter():
            return batched_logprobs(model, trajs, batch_size, temperature)
    logp = batched_logprobs(ref_model, trajs, batch_size, temperature)
    release_reference(ref_model)
    return logp

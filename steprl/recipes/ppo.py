"""Stage `ppo`: PPO with a learned value model on multi-turn tool episodes. One step, top to bottom:

 1. rollout   P prompts x G episodes (G = num_generations, 1 by default), turns batched, tools run
              between turns; each sampled token keeps its log-prob: the "old" log-prob.
 2. scores    per-turn rewards r_t from the environment (+ config reward functions or a reward
              model, added to the last turn); reference log-probs (adapters disabled, or a frozen
              copy; skipped when kl_coef is 0 and the controller is fixed); values V_j of the
              critic at every action token j (the state just before token j is sampled).
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
 5. loss      per action token: clipped_surrogate(logp, old, A) [+ beta KL_est(pi || ref) when not
              kl_in_reward], aggregated by loss_type; + vf_coef * token-mean of clipped_value_loss.
 6. update    num_iterations epochs over minibatches, gradient clipping (policy and critic apart),
              then the KL controller: fixed, or adaptive
                beta <- beta * (1 + clip(KL / target_kl - 1, -0.2, 0.2) * episodes / kl_horizon).

critic "separate": a copy of the policy's trunk + a linear value head, fully trained;
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
from safetensors.torch import load_file, save_file

from steprl.algos import (AdaptiveKLController, FixedKLController, aggregate_loss, clipped_surrogate,
                          clipped_value_loss, discounted_returns, gae, kl_penalty, logprobs_and_entropy,
                          masked_mean, masked_whiten)
from steprl.config import RunConfig
from steprl.memory import keep_freed_memory, release_free_memory
from steprl.models.loading import save_checkpoint, unwrap_peft
from steprl.monitor import MetricsLogger
from steprl.monitor.autofix import AutoFixer, Knobs, handle_oom
from steprl.recipes.common import (Timer, cosine_lr, mark_done, progress_bar, save_state,
                                   setup_torch, stage_dir)
from steprl.recipes.grpo import (accumulation_scale, clipped_tokens, completion_logprobs, episode_metrics,
                                 log_samples, make_envs, reference_logprobs, right_aligned, run_episodes,
                                 tool_setup)
from steprl.recipes.policy import setup_policy
from steprl.rewards import add_final_rewards, resolve_rewards
from steprl.rollout.decoder import LlamaDecoder
from steprl.rollout.sampling import SamplingParams, left_pad
from steprl.tasks import get_task

VALUE_FILE = "value_model.safetensors"  # the critic (or the shared value head), beside the checkpoint


# ---------------------------------------------------------------------------- the value model

class ValueHead(torch.nn.Module):
    """V = w . h + b on a hidden state; zero-initialised so every value starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.v = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.v.weight)
        torch.nn.init.zeros_(self.v.bias)

    def forward(self, hidden):
        return self.v(hidden).squeeze(-1)


def completion_hidden(trunk, trajs) -> torch.Tensor:
    """Last hidden state at the position before each completion token, [B, K, H] right-aligned."""
    width = max(len(t.ids) for t in trajs)
    ids, attn, pos = left_pad([t.prompt_ids + t.ids for t in trajs], pad_id=0)
    hidden = trunk(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    return hidden[:, -(width + 1):-1]


class Critic(torch.nn.Module):
    """critic "separate": its own copy of the policy's trunk and a value head."""

    def __init__(self, trunk, hidden_size: int):
        super().__init__()
        self.trunk, self.head = trunk, ValueHead(hidden_size)

    def forward(self, trajs):
        return self.head(completion_hidden(self.trunk, trajs))


def policy_forward(model, trajs, head=None, temperature: float = 1.0):
    """(log-probs, entropy, values or None), each [B, K], log-probs under softmax(logits / T);
    with a shared head one trunk pass gives all."""
    if head is None:
        logp, entropy = completion_logprobs(model, trajs, with_entropy=True, temperature=temperature)
        return logp, entropy, None
    base = unwrap_peft(model)
    hidden = completion_hidden(base.get_decoder(), trajs)
    logits = base.get_output_embeddings()(hidden).float() / temperature
    targets = right_aligned([t.ids for t in trajs], hidden.shape[1], dtype=torch.long)
    logp, entropy = logprobs_and_entropy(logits, targets)
    return logp, entropy, head(hidden)


@torch.no_grad()
def batched(fn, trajs, batch_size: int) -> torch.Tensor:
    """fn(minibatch) -> [b, k] right-aligned, stitched into [N, K] for the whole batch."""
    width = max(len(t.ids) for t in trajs)
    out = torch.zeros(len(trajs), width)
    for lo in range(0, len(trajs), batch_size):
        x = fn(trajs[lo:lo + batch_size])
        out[lo:lo + x.shape[0], width - x.shape[1]:] = x
    return out


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
        adv[i, pos], ret[i, pos] = torch.tensor(a), torch.tensor(g)
    return adv, ret


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over the action tokens: 1 = perfect critic, <= 0 = useless."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 1e-8 else 0.0


# ---------------------------------------------------------------------------- the stage

def run(cfg: RunConfig) -> dict:
    setup_torch(cfg)
    keep_freed_memory()  # the passes reuse freed activations instead of page-faulting fresh ones
    p, out = cfg.ppo, stage_dir(cfg, "ppo")
    ckpt = out / "checkpoint"
    # auto-fix watches KL (an explosion is its main trigger) and may switch the penalty on
    use_ref = p.kl_coef > 0 or p.adaptive_kl or cfg.doctor.auto_fix

    def make_value_model(model):  # before LoRA goes in: a separate critic copies the plain trunk
        hidden_size = model.config.get_text_config().hidden_size
        if p.critic == "separate":
            return Critic(copy.deepcopy(model.get_decoder()), hidden_size)
        return ValueHead(hidden_size)

    policy = setup_policy(cfg, "ppo", p.lora, p.learning_rate, use_ref, ckpt, make_value_model,
                          p.critic_learning_rate)
    model, tokenizer, optimizer, value_model = policy.model, policy.tokenizer, policy.optimizer, policy.value_model
    knobs = Knobs(p.learning_rate, p.kl_coef, p.minibatch_size, p.num_generations, p.max_new_tokens, p.max_grad_norm)
    start = 0
    if policy.state:
        value_model.load_state_dict(load_file(str(ckpt / VALUE_FILE)))
        start, extra = policy.state["step"], policy.state["extra"]
        knobs = Knobs(**extra["knobs"]) if "knobs" in extra else knobs
        knobs.kl_coef = extra["kl_coef"]
    kl_ctl = (AdaptiveKLController(knobs.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(knobs.kl_coef))
    fixer = None
    if cfg.doctor.auto_fix:  # steers kl_coef itself (adaptive, as GRPO's), and rolls back policy and critic
        fixer = AutoFixer([model, value_model], knobs,
                          **({"kl_target": p.target_kl, "kl_horizon": p.kl_horizon} if p.adaptive_kl else {}))
        fixer.snapshot(start)  # the starting weights are the first known-good state to roll back to

    task = get_task(cfg.task.name, **cfg.task.args)
    tools, renderer, suffix = tool_setup(task, tokenizer)
    problems = task.problems("train", max(p.steps * p.prompts_per_step, 1000), seed=cfg.seed)
    reward_fns = resolve_rewards(p.reward.functions, run_dir=cfg.run_dir)  # rules and/or a reward model
    logger = MetricsLogger(out, "ppo", report_to=cfg.report_to, doctor_context=knobs.as_context(),
                           live_doctor=cfg.doctor.enabled)
    if start:
        logger.truncate_after(start + 1)  # the first step to re-run is logged as start + 1
    generator = torch.Generator().manual_seed(cfg.seed + start)
    rng = random.Random(cfg.seed)
    bar = progress_bar(p.steps, f"ppo ({'LoRA' if p.lora.enabled else 'full'}, {p.critic} critic, "
                                f"{p.prompts_per_step * p.num_generations} episodes/step)", initial=start)
    samples_file = open(out / "samples.jsonl", "a")
    step = start
    while step < p.steps:
        timer = Timer()
        # a fix that lowers the learning rate lowers the critic's too: a NaN can come from either
        scale = knobs.learning_rate / p.learning_rate if p.learning_rate else 1.0
        mult = cosine_lr(step, p.steps, p.warmup_steps, min_ratio=1.0)
        for group, peak in zip(optimizer.param_groups, (p.learning_rate, p.critic_learning_rate or p.learning_rate)):
            group["lr"] = peak * scale * mult
        if knobs.gradient_checkpointing and not model.is_gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if isinstance(value_model, Critic):
                value_model.trunk.gradient_checkpointing_enable()
        if fixer is not None:
            fixer.begin_step(step)  # the weights this step's metrics will judge
        try:
            metrics, trajs = ppo_step(model, value_model, policy.ref_model, use_ref, tokenizer,
                                      optimizer, policy.params, task, tools, renderer, suffix, problems, step, p,
                                      knobs, generator, rng, reward_fns)
        except (torch.OutOfMemoryError, MemoryError) as err:
            handle_oom(fixer, logger, optimizer, step + 1, err, "lower ppo.minibatch_size")
            continue  # nothing was applied: retry the step with the smaller settings
        metrics.update({"learning_rate": optimizer.param_groups[0]["lr"], "kl_coef": knobs.kl_coef,
                        "step_time": timer.seconds})
        logger.context.update(knobs.as_context())  # advice starts from the settings in force now
        findings = logger.log(metrics, step + 1)
        if fixer is not None:
            for action in fixer.after_step(findings, metrics, step + 1, optimizer, len(trajs),
                                           p.kl_coef > 0 or p.adaptive_kl):
                logger.record(action)
        else:
            kl_ctl.update(metrics["kl"], len(trajs))
            knobs.kl_coef = kl_ctl.value
        log_samples(samples_file, tokenizer, trajs, rng, p.n_samples_logged, step + 1)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        kl=f"{metrics['kl']:.3f}", ev=f"{metrics['explained_variance']:.2f}")
        step += 1
        if p.save_every and step % p.save_every == 0 and step < p.steps:
            save_all(model, tokenizer, value_model, ckpt, policy.base)
            save_state(ckpt, step, optimizer, {"kl_coef": knobs.kl_coef, "knobs": knobs.__dict__})
    bar.close()
    samples_file.close()
    logger.close()
    save_all(model, tokenizer, value_model, ckpt, policy.base)
    (ckpt / "trainer_state.pt").unlink(missing_ok=True)
    info = {"checkpoint": str(ckpt), "base": policy.base, "steps": p.steps, "critic": p.critic}
    mark_done(out, info)
    return info


def ppo_step(model, value_model, ref_model, use_ref: bool, tokenizer, optimizer, policy_params, task, tools,
             renderer, suffix, problems, step, p, knobs, generator, rng, reward_fns=()) -> tuple[dict, list]:
    """One PPO step (steps 1-6 of the module docstring); returns its metrics and trajectories.
    Minibatches of p.minibatch_size episodes are split into micro-batches of
    knobs.micro_batch_size (lowered by auto-fix on OOM) whose gradients add up to the minibatch's."""
    timer = Timer()
    critic = value_model if isinstance(value_model, Critic) else None
    head = value_model if critic is None else None
    value_params = list(value_model.parameters())
    # 1. rollout
    first = (step * p.prompts_per_step) % len(problems)
    batch = [problems[(first + i) % len(problems)] for i in range(p.prompts_per_step)]
    episodes = [q for q in batch for _ in range(knobs.num_generations)]
    envs = make_envs(task, tools, p.reward, p.max_turns, len(episodes), suffix)
    sampling = SamplingParams(max_new_tokens=knobs.max_new_tokens, temperature=p.temperature,
                              top_p=p.top_p, top_k=p.top_k)
    model.eval()
    value_model.eval()
    if p.release_memory:  # the last passes' freed activations: not resident under the rollout's
        release_free_memory()
    trajs = run_episodes(model, tokenizer, envs, episodes, sampling, renderer, generator)
    LlamaDecoder.forget(model)  # its weight copies go stale at the next update: free them for the passes
    rollout_seconds = timer.seconds

    # 2. scores: extra rewards, reference log-probs, old values
    reward_metrics = add_final_rewards(reward_fns, trajs)
    width = max(len(t.ids) for t in trajs)
    mask = right_aligned([t.mask for t in trajs], width)
    old_logp = right_aligned([t.logps for t in trajs], width)
    ref_logp = None
    if use_ref:
        ref_logp = reference_logprobs(model, ref_model, trajs, knobs.micro_batch_size, p.temperature)
    old_values = batched(critic if critic is not None else (lambda mb: policy_forward(model, mb, head)[2]),
                         trajs, knobs.micro_batch_size)

    # 3-4. token rewards -> GAE -> whitened advantages and value targets
    k1 = (old_logp - ref_logp) * mask if ref_logp is not None else None
    advantages, returns = advantages_and_returns(trajs, old_values, p, k1 if p.kl_in_reward else None,
                                                 knobs.kl_coef)
    if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask) * mask

    # 5-6. clipped policy and value updates, micro-batches accumulated into minibatches
    model.train()
    value_model.train()
    stats = {k: [] for k in ("loss", "policy_loss", "value_loss", "entropy", "clip_ratio", "grad_norm")}
    skipped = 0
    for _ in range(p.num_iterations):
        order = list(range(len(trajs)))
        rng.shuffle(order)
        for lo in range(0, len(order), p.minibatch_size):
            mb_idx = order[lo:lo + p.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0}
            for mlo in range(0, len(mb_idx), knobs.micro_batch_size):
                idx = mb_idx[mlo:mlo + knobs.micro_batch_size]
                mb = [trajs[i] for i in idx]
                cols = slice(width - max(len(t.ids) for t in mb), width)
                logp, entropy, values = policy_forward(model, mb, head, p.temperature)
                if critic is not None:
                    values = critic(mb)
                m, a, old = mask[idx, cols], advantages[idx, cols], old_logp[idx, cols]
                per_token = clipped_surrogate(logp, old, a, p.epsilon, clip_eps_high=p.epsilon_high)
                if ref_logp is not None and not p.kl_in_reward:
                    per_token = per_token + knobs.kl_coef * kl_penalty(logp, ref_logp[idx, cols], p.kl_estimator)
                # each part weighted by its share of the minibatch, so the accumulated gradient is the minibatch's
                policy_loss = aggregate_loss(per_token, m, p.loss_type, max_len=p.max_new_tokens * p.max_turns)
                policy_loss = policy_loss * accumulation_scale(p, mask[idx], mask[mb_idx])
                value_loss = masked_mean(clipped_value_loss(values, old_values[idx, cols], returns[idx, cols],
                                                            p.value_clip), m)
                value_loss = value_loss * float(mask[idx].sum() / mask[mb_idx].sum().clamp(min=1))
                loss = policy_loss + p.vf_coef * value_loss
                if not torch.isfinite(loss):
                    break
                loss.backward()
                for key, value in (("loss", loss), ("policy_loss", policy_loss), ("value_loss", value_loss)):
                    totals[key] += float(value.detach())
                stats["entropy"].append(float(masked_mean(entropy, m)))
                stats["clip_ratio"].append(float(masked_mean(clipped_tokens(logp, old, a, p).float(), m)))
            else:  # every micro-batch was finite: clip (policy and critic apart) and apply
                grad_norm = torch.nn.utils.clip_grad_norm_(policy_params, knobs.max_grad_norm)
                value_norm = torch.nn.utils.clip_grad_norm_(value_params, knobs.max_grad_norm)
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
        **episode_metrics(trajs, knobs.num_generations),
        "kl": kl,
        **{k: sum(v) / len(v) for k, v in stats.items() if v},
        "explained_variance": explained_variance(old_values, returns, mask),
        "values/mean": float(masked_mean(old_values, mask)),
        **reward_metrics,
        "rollout_time": rollout_seconds,
    }
    if skipped:
        metrics.update({"event": "nan_skip", "skipped_minibatches": skipped})
    return metrics, trajs


def save_all(model, tokenizer, value_model, ckpt, base: str) -> None:
    """The policy in Hugging Face format (adapter or full) and the value model beside it."""
    save_checkpoint(model, tokenizer, ckpt, base_path=base)
    save_file({k: v.detach().contiguous() for k, v in value_model.state_dict().items()}, str(ckpt / VALUE_FILE))

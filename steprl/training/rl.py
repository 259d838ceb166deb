"""What GRPO and PPO share: the state of a run, the rollout, the episode metrics, and the loop.

    state = RLState(...)                      settings, policy, engine, task, problems, rewards
    train_rl(cfg, "grpo", state, grpo_step)   for each step: lr schedule -> step(state) ->
                                              log + doctor (+ auto-fix) -> samples -> checkpoint

`state.settings` is the stage's config, copied: the one source of truth for the settings in force.
Auto-fix (monitor/autofix.py) edits it, every consumer reads it, and a checkpoint saves the
fields auto-fix may change, so a resumed run continues with them.
"""
from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field

import torch

from steprl.config import ConfigError, GRPOConfig, PPOConfig, RolloutConfig, RunConfig
from steprl.monitor import MetricsLogger
from steprl.monitor.doctor import read_jsonl
from steprl.monitor.autofix import (REWARD_SETTINGS, AutoFixer, doctor_context, fixable_settings, handle_oom,
                                    restore_settings)
from steprl.envs.tool_env import make_envs
from steprl.rollout.episodes import Trajectory, run_episodes
from steprl.rollout.sampling import SamplingParams
from steprl.runtime import Runtime
from steprl.training.common import (Timer, cosine_lr, finish, progress_bar, restore_streams, save_resumable, stage_dir,
                                    write_atomic)
from steprl.training.policy import Policy


@dataclass
class RLState:
    settings: GRPOConfig | PPOConfig  # live: auto-fix edits this copy of the stage's config
    policy: Policy
    runtime: Runtime
    engine: object  # a rollout engine (rollout/engine.py)
    task: object
    tools: dict
    renderer: object
    system_suffix: str
    problems: list
    reward_fns: list = field(default_factory=list)
    generator: torch.Generator | None = None
    rng: random.Random = field(default_factory=random.Random)
    step: int = 0
    extra: dict = field(default_factory=dict)  # what a recipe keeps across steps (PPO's KL controller)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the run's rollout: section (tool workers, timeout)

    @property
    def micro_batch_size(self) -> int:
        return self.settings.micro_batch_size or self.settings.minibatch_size

    @property
    def minibatch_size(self) -> int:
        """Episodes per minibatch on this process: the configured size is the whole launch's."""
        return self.settings.minibatch_size // self.runtime.world_size

    def next_prompts(self) -> list:
        """This step's prompts_per_step problems, in order through the training split; under a
        multi-process launch, this rank's share of them (a prompt's G episodes stay on one rank)."""
        s, n = self.settings, len(self.problems)
        first = (self.step * s.prompts_per_step) % n
        return self.runtime.shard([self.problems[(first + i) % n] for i in range(s.prompts_per_step)],
                                  "prompts_per_step")


def live_settings(stage_config):
    """A copy of a stage's config for auto-fix to edit; the run's own config stays as written."""
    return copy.deepcopy(stage_config)


def rollout(state: RLState, prompts: list) -> list[Trajectory]:
    """num_generations episodes per prompt, consecutive blocks sharing a prompt; each sampled
    token keeps its log-prob (the "old" log-prob of the update)."""
    s = state.settings
    episodes = [p for p in prompts for _ in range(s.num_generations)]
    envs = make_envs(state.task, state.tools, s.reward, s.max_turns, len(episodes), state.system_suffix,
                     state.rollout.tool_timeout_s)
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    state.policy.sync_sampler()
    state.policy.sampler.eval()
    trajs = run_episodes(state.engine, state.policy.tokenizer, envs, episodes, params, state.renderer,
                         state.generator, tool_workers=state.rollout.tool_workers)
    state.engine.sleep()  # what sampling holds is freed for the training passes
    return trajs


def episode_metrics(trajs: list[Trajectory], group_size: int, task=None) -> dict:
    """The BRIEF's episode metrics, the same for grpo and ppo: reward, accuracy, lengths, turns and
    tool use. Consecutive blocks of group_size share a prompt; with 1 (PPO) the batch is one group.
    With a task whose problems have worked solutions, also tools/calls_beyond_needed: the mean of
    max(0, calls - the solution's calls) per episode."""
    rewards = torch.tensor([t.reward for t in trajs])
    groups = rewards.view(-1, group_size) if group_size > 1 else rewards.view(1, -1)
    group_std = groups.std(dim=1).nan_to_num(0.0)  # NaN for a group of one
    n, n_calls = len(trajs), sum(t.n_tool_calls for t in trajs)
    needed = [task.calls_needed(t.problem) for t in trajs] if task is not None else []
    beyond = ({"tools/calls_beyond_needed": sum(max(0, t.n_tool_calls - k) for t, k in zip(trajs, needed)) / n}
              if needed and None not in needed else {})
    return {
        **beyond,
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


def clipped_tokens(logp, old_logp, advantages, s) -> torch.Tensor:
    """Where the clip held the ratio back (no gradient): rho < 1 - eps with A < 0, or
    rho > 1 + eps_high with A > 0. Its token mean is the clip_ratio metric."""
    ratio = torch.exp(logp.detach() - old_logp)
    eps_high = s.epsilon_high if s.epsilon_high is not None else s.epsilon
    return ((ratio < 1 - s.epsilon) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))


def sampler_gap(logp, old_logp, mask) -> dict[str, float]:
    """|logp_train - logp_sampler| over a micro-batch's completion tokens: its token mean
    (`logp_gap`) and max (`logp_gap_max`). Before the first update both passes are the same policy,
    so the gap is the two engines' arithmetic (bf16 rounding, kernels); the ratio rho is taken to the
    sampler's log-probs, so the clipped surrogate already corrects for it as importance sampling."""
    gap = (logp.detach() - old_logp).abs() * mask
    return {"logp_gap": float(gap.sum() / mask.sum().clamp(min=1)), "logp_gap_max": float(gap.max())}


def accumulation_scale(s, micro_mask: torch.Tensor, mb_mask: torch.Tensor, mb_tokens: float | None = None) -> float:
    """Weight of a micro-batch in its minibatch, so that accumulated gradients equal one big batch.
    `mb_tokens`: the minibatch's tokens per rank over a multi-process launch (default: this rank's)."""
    if s.loss_type == "dapo":  # token mean over the whole minibatch
        tokens = float(mb_mask.sum()) if mb_tokens is None else mb_tokens
        return float(micro_mask.sum()) / max(tokens, 1.0)
    return micro_mask.shape[0] / mb_mask.shape[0]  # per-sequence means


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


def log_samples(samples_file, tokenizer, trajs: list[Trajectory], rng, n: int, step: int) -> None:
    """n random trajectories of this step to samples.jsonl, flushed so a crash keeps them."""
    for t in rng.sample(trajs, min(n, len(trajs))):
        samples_file.write(json.dumps(sample_record(tokenizer, t, step)) + "\n")
    samples_file.flush()


# ---------------------------------------------------------------------------- the loop

def train_rl(cfg: RunConfig, stage: str, state: RLState, rl_step, desc: str, adapt_kl: bool) -> dict:
    """Run `rl_step(state) -> (metrics, trajectories)` for the stage's steps, resumable.

    Around each step: the learning rate (cosine, every optimiser group scaled alike, so a fix that
    lowers it lowers PPO's critic's too), gradient checkpointing when auto-fix turned it on, the
    doctor on the logged metrics, auto-fix's actions (`adapt_kl`: it steers kl_coef), an
    out-of-memory step retried with smaller settings, samples, checkpoints with the live settings.
    """
    s, policy, rt = state.settings, state.policy, state.runtime
    for name in ("prompts_per_step", "minibatch_size"):
        if getattr(s, name) % rt.world_size:
            raise ConfigError(f"{stage}.{name}: {getattr(s, name)} does not split evenly over {rt.world_size} processes")
    out = stage_dir(cfg, stage)
    ckpt = out / "checkpoint"
    configured = getattr(cfg, stage)  # the settings as written: the schedule's reference
    peaks = [group["lr"] for group in policy.optimizer.param_groups]
    models = [m for m in (policy.model, policy.value_model) if m is not None]
    if policy.state:
        state.step = policy.state["step"]
        restore_settings(s, policy.state["extra"].get("settings", {}))
    fixer = None
    if cfg.doctor.auto_fix:
        fixer = AutoFixer(models, s, **({"kl_target": s.target_kl, "kl_horizon": s.kl_horizon}
                                          if getattr(s, "adaptive_kl", False) else {}))
        fixer.snapshot(state.step)  # the starting weights are the first known-good state to roll back to
        saved = policy.state["extra"].get("autofix") if policy.state else None
        if isinstance(saved, list):  # saved sharded, a state per rank: usable with the same number of ranks only
            saved = saved[rt.rank] if len(saved) == rt.world_size and rt.shards_parameters else None
        if saved:
            fixer.load_state_dict(saved)  # the last healthy weights before the checkpoint
    logger = MetricsLogger(out, stage, report_to=cfg.report_to, doctor_context=doctor_context(s),
                           live_doctor=cfg.doctor.enabled, write=rt.is_main)
    # the first step to re-run is logged as step + 1; a fresh start drops what a killed run logged
    logger.truncate_after(state.step + 1)
    bar = progress_bar(s.steps, desc, initial=state.step)
    samples_file = None
    if rt.is_main:
        keep_samples_until(out / "samples.jsonl", state.step)
        samples_file = open(out / "samples.jsonl", "a")
    if policy.state:  # last: nothing the setup drew shifts the streams
        restore_streams(policy.state, rt.rank, rt.world_size, state.generator, state.rng)
    while state.step < s.steps:
        timer = Timer()
        mult = cosine_lr(state.step, s.steps, s.warmup_steps, min_ratio=1.0) * s.learning_rate / configured.learning_rate
        for group, peak in zip(policy.optimizer.param_groups, peaks):
            group["lr"] = peak * mult
        if s.gradient_checkpointing:
            for m in models:
                trunk = getattr(m, "trunk", m)
                if hasattr(trunk, "gradient_checkpointing_enable") and not getattr(trunk, "is_activation_checkpointing", False):
                    trunk.gradient_checkpointing_enable()
        if fixer is not None:
            fixer.begin_step(state.step)  # the weights this step's metrics will judge
        try:
            metrics, trajs = rl_step(state)
        except (torch.OutOfMemoryError, MemoryError) as err:
            if rt.world_size > 1:
                raise  # the other ranks are inside the step's collectives: retrying alone would hang them
            handle_oom(fixer, logger, policy.optimizer, state.step + 1, err, f"lower {stage}.micro_batch_size")
            continue  # nothing was applied: retry the step with the smaller settings
        state.engine.sync_weights()
        metrics = rt.mean_metrics(metrics)  # every rank logs the launch's numbers, so the doctor decides alike
        metrics.setdefault("kl_coef", s.kl_coef)  # the coefficient the step used (PPO's controller moves it after)
        metrics.update({"learning_rate": policy.optimizer.param_groups[0]["lr"], "step_time": timer.seconds})
        logger.context.update(doctor_context(s))  # advice starts from the settings in force now
        findings = logger.log(metrics, state.step + 1)
        if fixer is not None:
            reward_before = {k: getattr(s.reward, k) for k in REWARD_SETTINGS}
            for action in fixer.after_step(findings, metrics, state.step + 1, policy.optimizer, len(trajs), adapt_kl):
                logger.record(action)
            reward_now = {k: getattr(s.reward, k) for k in REWARD_SETTINGS}
            if reward_now != reward_before:
                # the doctor compares rewards only after this step (the next ones are on another
                # scale) and reads the new settings from it, post hoc too
                logger.amend({"reward_changed": reward_now})
        if samples_file is not None:
            log_samples(samples_file, policy.tokenizer, trajs, state.rng, s.n_samples_logged, state.step + 1)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "accuracy", "kl", "explained_variance")
                         if k in metrics})
        state.step += 1
        if s.save_every and state.step % s.save_every == 0 and state.step < s.steps:
            save_rl_checkpoint(ckpt, state, fixer)
    bar.close()
    logger.close()
    info = {"checkpoint": str(ckpt), "base": policy.base, "steps": s.steps}
    save_rl_checkpoint(ckpt, state, fixer)  # its trainer state goes once done.json is written
    if rt.is_main:
        samples_file.close()
        finish(out, ckpt, info)
    rt.barrier()  # the next stage loads this checkpoint on every rank
    return info


def save_rl_checkpoint(ckpt, state: RLState, fixer: AutoFixer | None) -> None:
    """The policy (and value model), optimiser, live settings, auto-fix's last healthy weights and
    every rank's random streams, as one checkpoint."""
    s, rt = state.settings, state.runtime
    autofix = fixer.state_dict() if fixer is not None else None
    if autofix is not None and rt.shards_parameters:  # each rank's rollback weights are its own shards
        autofix = rt.gather([autofix])
    extra = {"settings": fixable_settings(s), "autofix": autofix}
    save_resumable(ckpt, state.runtime, state.step, state.policy.optimizer, state.policy.save,
                   state.generator, state.rng, extra=extra, model=state.policy.trained, last=state.step == s.steps)


def keep_samples_until(path, step: int) -> None:
    """Resume: samples.jsonl keeps the steps up to `step`; the later ones are re-run."""
    if path.is_file():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

"""Opt-in auto-fix (`doctor.auto_fix: true`): act on the doctor's findings while a run is on.

The doctor's findings carry a machine-applicable `fix` ({"learning_rate": 1e-5, "kl_coef": 0.1,
"rollback": True, "tool_success": 0.0, ...}). `AutoFixer.apply` changes the run's settings accordingly, restores the last
good weights when asked to roll back, and records every action as a finding that says what
changed. Between findings, an adaptive KL coefficient (Ziegler et al.) holds KL near the middle of
the healthy band 0.01-0.1. It edits the stage's live settings (a copy of its config that every
consumer reads: one source of truth). The RL loop (training/rl.py) calls `after_step` once per logged step and
`handle_oom` when a step ran out of memory (each OOM takes one rung down `shrink_for_oom`'s
ladder, then the step is retried); the same loop therefore serves both.
"""
from __future__ import annotations


import torch
from torch.distributed.tensor import DTensor

from steprl.algos import AdaptiveKLController
from steprl.monitor.doctor import Finding

SETTINGS = ("learning_rate", "kl_coef", "micro_batch_size", "num_generations", "max_new_tokens",
            "gradient_checkpointing", "max_grad_norm")  # what auto-fix may change in a stage's config
REWARD_SETTINGS = ("tool_success",)  # ... and in its reward section


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: an FSDP parameter's (a DTensor's) local shard, else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def micro_batch(settings) -> int:
    """Trajectories per forward pass: micro_batch_size, 0 meaning the whole minibatch."""
    return settings.micro_batch_size or settings.minibatch_size


def holder(settings, key: str):
    """The part of a stage's settings that holds `key`: its reward section or the stage itself."""
    return settings.reward if key in REWARD_SETTINGS else settings


def fixable_settings(settings) -> dict:
    """The values auto-fix may have changed, for a checkpoint: {"learning_rate": ..., "tool_success": ...}."""
    return {k: getattr(holder(settings, k), k) for k in SETTINGS + REWARD_SETTINGS if hasattr(holder(settings, k), k)}


def restore_settings(settings, saved: dict) -> None:
    """Put a checkpoint's `fixable_settings` back into the live settings (a resumed run goes on
    with what auto-fix had changed, not with the config as written)."""
    for key, value in saved.items():
        setattr(holder(settings, key), key, value)


def doctor_context(settings) -> dict:
    """The doctor's view of the settings in force, so that its advice starts from the values
    in force now (after earlier fixes), not from the config's."""
    return {"learning_rate": settings.learning_rate, "kl_coef": settings.kl_coef,
            "num_generations": settings.num_generations, "per_device_batch_size": micro_batch(settings),
            "max_new_tokens": settings.max_new_tokens, "max_turns": settings.max_turns,
            "tool_success": settings.reward.tool_success}


class AutoFixer:
    """`model`: the module that trains, or a list of them (PPO: the policy and its value model),
    so that a rollback restores all of them together. `settings`: the stage's live config
    (GRPOConfig, PPOConfig), edited in place."""

    def __init__(self, model, settings, kl_target: float = 0.05, kl_horizon: float = 2000):
        self.model = torch.nn.ModuleList(model) if isinstance(model, (list, tuple)) else model
        self.settings = settings
        self.kl = AdaptiveKLController(max(settings.kl_coef, 1e-3), kl_target, kl_horizon)
        self.good: dict | None = None
        self.good_step = 0
        self.pending: dict | None = None  # see begin_step
        self.pending_step = 0
        self.rolled_back = False  # the trainer resets its optimiser state when this is set

    def _weights(self) -> dict:
        """The trainable weights, by name; under FSDP this rank's shard of each (a checkpoint's copy
        then resumes with the same number of processes)."""
        return {n: local(p).detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def snapshot(self, step: int) -> None:
        """Remember the trainable weights of a healthy step, for rollback."""
        self.good, self.good_step = self._weights(), step

    def state_dict(self) -> dict:
        """What a checkpoint keeps between steps: the weights a rollback would restore. (The KL
        controller's value is the settings' kl_coef, saved with them.)"""
        return {"good": self.good, "good_step": self.good_step}

    def load_state_dict(self, state: dict) -> None:
        self.good, self.good_step = state["good"], state["good_step"]

    def begin_step(self, step: int) -> None:
        """Before a step: copy the weights its rollout samples from. A step's metrics (KL of the
        sampled tokens, reward) judge these weights, not the ones its update leaves, which only
        the next step can judge; so `after_step` keeps this copy as the good state when the step
        is healthy. (Without begin_step, after_step snapshots the updated weights instead.)"""
        self.pending, self.pending_step = self._weights(), step

    def rollback(self) -> bool:
        if self.good is None:
            return False
        params = dict(self.model.named_parameters())
        for name, value in self.good.items():
            local(params[name]).data.copy_(value)
        return True

    def adapt_kl(self, kl: float, n_samples: int) -> None:
        self.kl.update(kl, n_samples)
        self.settings.kl_coef = self.kl.value

    def apply(self, findings: list[Finding], step: int) -> list[Finding]:
        """Apply each finding's fix; return one 'info' finding per action, saying what changed."""
        actions = []
        for f in findings:
            # out-of-memory has its own ladder (shrink_for_oom), one rung per OOM, run by handle_oom
            if not f.fix or f.severity == "info" or f.code == "out_of_memory":
                continue
            changes = []
            for key in SETTINGS + REWARD_SETTINGS:
                where = holder(self.settings, key)
                if key in f.fix and f.fix[key] != getattr(where, key):
                    old = getattr(where, key)
                    setattr(where, key, type(old)(f.fix[key]))
                    name = "reward." + key if key in REWARD_SETTINGS else key
                    changes.append(f"{name} {old:g} -> {getattr(where, key):g}" if not isinstance(old, bool)
                                   else f"{name} {old} -> {f.fix[key]}")
            if "kl_coef" in f.fix:
                self.kl.value = self.settings.kl_coef
            if f.fix.get("rollback") and self.rollback():
                self.rolled_back = True
                changes.append(f"rolled back to the weights of step {self.good_step}")
            if changes:
                actions.append(Finding(f.code, "info", step, f"auto-fix for {f.code}: " + "; ".join(changes),
                                       "continuing with the new settings"))
        return actions

    def shrink_for_oom(self, step: int) -> Finding | None:
        """One rung down the out-of-memory ladder per OOM, cheapest loss first: halve the
        micro-batch (gradient accumulation keeps the effective batch, so the maths is unchanged)
        down to 1, then halve num_generations (down to 2), then max_new_tokens (down to 16), then
        turn on gradient checkpointing. None when nothing is left to lower."""
        k = self.settings
        if micro_batch(k) > 1:
            old = micro_batch(k)
            k.micro_batch_size = old // 2
            change = f"micro_batch_size {old} -> {k.micro_batch_size} (gradient accumulation keeps the effective batch)"
        elif k.num_generations > 2:
            old, k.num_generations = k.num_generations, max(2, k.num_generations // 2)
            change = f"num_generations {old} -> {k.num_generations}"
        elif k.max_new_tokens > 16:
            old, k.max_new_tokens = k.max_new_tokens, max(16, k.max_new_tokens // 2)
            change = f"max_new_tokens {old} -> {k.max_new_tokens}"
        elif not k.gradient_checkpointing:
            k.gradient_checkpointing = True
            change = "gradient_checkpointing False -> True"
        else:
            return None
        return Finding("out_of_memory", "info", step, f"auto-fix for out_of_memory: {change}",
                       "retrying the step with the smaller setting")

    def after_step(self, findings: list[Finding], metrics: dict, step: int, optimizer, n_samples: int,
                   adapt_kl: bool) -> list[Finding]:
        """Once per logged step: apply the findings' fixes, restart AdamW after a rollback (its
        moments come from the bad steps), steer the KL coefficient, and remember the weights if
        the step was healthy. Returns the actions, for the trainer to record."""
        actions = self.apply(findings, step)
        if self.rolled_back:  # one optimiser holds every group (PPO: the value model's too)
            getattr(optimizer, "optim", optimizer).state.clear()  # ZeRO keeps this rank's shard in .optim
            self.rolled_back = False
        if adapt_kl and "kl" in metrics:
            self.adapt_kl(metrics["kl"], n_samples)
        if not any(f.severity == "critical" for f in findings) and metrics.get("kl", 0.0) < 0.1:
            if self.pending is not None:
                self.good, self.good_step = self.pending, self.pending_step
            else:
                self.snapshot(step)
        self.pending = None
        return actions


def handle_oom(fixer: AutoFixer | None, logger, optimizer, step: int, err: BaseException, hint: str) -> None:
    """A step that ran out of memory applied nothing: log it, let the doctor pick smaller settings
    and retry; without auto-fix, or when it has nothing left to change, stop with the way out."""
    optimizer.zero_grad(set_to_none=True)
    logger.log({"event": "oom"}, step)  # the doctor's out_of_memory finding, printed once
    action = fixer.shrink_for_oom(step) if fixer is not None else None
    if action is None:
        raise RuntimeError(f"{logger.stage}: out of memory at step {step} ({err}); "
                           f"set doctor.auto_fix=true or {hint}") from err
    logger.record(action)

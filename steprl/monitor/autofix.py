"""Opt-in auto-fix (`doctor.auto_fix: true`): act on the doctor's findings while a run is on.

The doctor's findings carry a machine-applicable `fix` ({"learning_rate": 1e-5, "kl_coef": 0.1,
"rollback": True, ...}). `AutoFixer.apply` changes the run's knobs accordingly, restores the last
good weights when asked to roll back, and records every action as a finding that says what
changed. Between findings, an adaptive KL coefficient (Ziegler et al.) holds KL near the middle of
the healthy band 0.01-0.1.
"""
from __future__ import annotations

from dataclasses import dataclass

from steprl.algos import AdaptiveKLController
from steprl.monitor.doctor import Finding

KNOBS = ("learning_rate", "kl_coef", "micro_batch_size", "num_generations", "max_new_tokens",
         "gradient_checkpointing", "max_grad_norm")


@dataclass
class Knobs:
    """What auto-fix may change in a running RL stage."""
    learning_rate: float
    kl_coef: float
    micro_batch_size: int
    num_generations: int
    max_new_tokens: int
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False


class AutoFixer:
    def __init__(self, model, knobs: Knobs, kl_target: float = 0.05, kl_horizon: int = 2000):
        self.model, self.knobs = model, knobs
        self.kl = AdaptiveKLController(max(knobs.kl_coef, 1e-3), kl_target, kl_horizon)
        self.good: dict | None = None
        self.good_step = 0
        self.rolled_back = False  # the trainer resets its optimiser state when this is set

    def snapshot(self, step: int) -> None:
        """Remember the trainable weights of a healthy step, for rollback."""
        self.good = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.good_step = step

    def rollback(self) -> bool:
        if self.good is None:
            return False
        params = dict(self.model.named_parameters())
        for name, value in self.good.items():
            params[name].data.copy_(value)
        return True

    def adapt_kl(self, kl: float, n_samples: int) -> None:
        self.kl.update(kl, n_samples)
        self.knobs.kl_coef = self.kl.value

    def apply(self, findings: list[Finding], step: int) -> list[Finding]:
        """Apply each finding's fix; return one 'info' finding per action, saying what changed."""
        actions = []
        for f in findings:
            if not f.fix or f.severity == "info":
                continue
            changes = []
            for key in KNOBS:
                if key in f.fix and f.fix[key] != getattr(self.knobs, key):
                    old = getattr(self.knobs, key)
                    setattr(self.knobs, key, type(old)(f.fix[key]))
                    changes.append(f"{key} {old:g} -> {getattr(self.knobs, key):g}" if not isinstance(old, bool)
                                   else f"{key} {old} -> {f.fix[key]}")
            if f.fix.get("per_device_batch_size"):
                old = self.knobs.micro_batch_size
                self.knobs.micro_batch_size = max(1, int(f.fix["per_device_batch_size"]))
                changes.append(f"micro_batch_size {old} -> {self.knobs.micro_batch_size} "
                               "(gradient accumulation keeps the effective batch)")
            if "kl_coef" in f.fix:
                self.kl.value = self.knobs.kl_coef
            if f.fix.get("rollback") and self.rollback():
                self.rolled_back = True
                changes.append(f"rolled back to the weights of step {self.good_step}")
            if changes:
                actions.append(Finding(f.code, "info", step, f"auto-fix for {f.code}: " + "; ".join(changes),
                                       "continuing with the new settings"))
        return actions

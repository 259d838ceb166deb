"""Rules on whether the run is numerically sound and stays near its reference: NaN losses, out of
memory, KL too high or too low, a sampler whose log-probs differ from the training pass's.
"""
from __future__ import annotations

import math

import numpy as np

from steprl.monitor.doctor.series import Finding, History, adjust, as_float, fmt, kl_up, runs_of

KL_CRITICAL, KL_WARNING, KL_LOW = 0.5, 0.1, 0.001
KL_SPIKE = 2.5  # one logged step at 5x the critical line is an explosion on its own
# mean |logp_sampler - logp_trainer| before the first update; bf16 rounding alone is ~0.003
LOGP_GAP_WARNING = 0.05


def rule_nan_loss(h: History, final: bool) -> list[Finding]:
    """Critical, unless every bad step was skipped by the trainer (event "nan_skip") and they are
    rare (<= 10% of logged steps): then the run recovered and it is a warning. A skip counts even
    when the logged values are finite (the RL recipes log the minibatches they did apply)."""
    bad, skipped = [], 0
    for e in h.raw:
        hits = [(k, as_float(v)) for k, v in e.items()
                if k in ("loss", "grad_norm", "reward", "kl") or k.endswith("loss")]
        hits = [(k, x) for k, x in hits if x is not None and not math.isfinite(x)]
        skip = str(e.get("event", "")).endswith("skip")
        if hits or skip:
            bad.append((int(as_float(e.get("step")) or 0), *(hits[0] if hits else ("loss", "non-finite (skipped)"))))
            skipped += skip
    if not bad:
        return []
    step, key, val = bad[0]
    recovered = skipped == len(bad) and len(bad) <= 0.1 * max(1, len(h.raw))
    parts, fix = adjust(h.ctx, [("learning_rate", lambda x: x / 10, "lower the learning rate 10x")])
    fix.update({"max_grad_norm": 1.0, "rollback": True})
    return [Finding("nan_loss", "warning" if recovered else "critical", step,
                    f"{key} = {val} at step {step} ({len(bad)} non-finite value(s) in loss/grad_norm/reward"
                    + (", all skipped by the trainer)" if recovered else ")"),
                    ", ".join(parts) + ", clip grad norm 1.0, resume from the last good checkpoint; "
                    "stay in fp32 (fp16/bf16 overflow), check the reward function for NaN/division by zero",
                    fix)]


def rule_out_of_memory(h: History, final: bool) -> list[Finding]:
    ooms = [e for e in h.raw if e.get("event") == "oom" or (as_float(e.get("oom")) or 0) > 0]
    if not ooms:
        return []
    step = int(as_float(ooms[0].get("step")) or 0)
    parts, fix = adjust(h.ctx, [
        ("num_generations", lambda g: max(2, g // 2), "num_generations 8 -> 4"),
        ("per_device_batch_size", lambda b: max(1, b // 2), "batch 4 -> 2"),
        ("max_new_tokens", lambda t: max(16, t // 2), "max_new_tokens 512 -> 256"),
    ])
    fix["gradient_checkpointing"] = True
    return [Finding("out_of_memory", "critical", step,
                    f"{len(ooms)} out-of-memory event(s), first at step {step}",
                    ", ".join(parts) + ", enable gradient checkpointing, use mixed precision on GPU",
                    fix)]


def rule_kl_explosion(h: History, final: bool) -> list[Finding]:
    steps, kl = h.get("kl")
    if len(kl) == 0:
        return []
    for sev, thr in (("critical", KL_CRITICAL), ("warning", KL_WARNING)):
        # two logged steps above 0.5 are an explosion (live and post-hoc alike); a warning needs three.
        # One step far above the line (KL_SPIKE) is one too: a policy that moved that far in one
        # update is broken even if the next step's KL, measured against it, looks calm.
        need = min(2 if sev == "critical" else 3, max(len(kl), 2))
        runs = [r for r in runs_of(kl > thr) if r[1] >= need]
        if sev == "critical":
            runs = sorted(runs + [(int(i), 1) for i in np.flatnonzero(kl > KL_SPIKE)])
        if not runs:
            continue
        s, n = runs[0]
        peak = int(np.argmax(kl[s:s + n])) + s
        factor, kl_factor = (0.2, 2.0) if sev == "critical" else (0.5, 1.5)
        parts, fix = adjust(h.ctx, [
            ("learning_rate", lambda x: x * factor, "lower the learning rate (5e-5 -> 1e-5)"),
            ("kl_coef", kl_up(kl_factor), "raise kl_coef (0.05 -> 0.1)")])
        fix["max_grad_norm"] = 1.0
        if sev == "critical":
            fix["rollback"] = True
        return [Finding("kl_explosion", sev, int(steps[s]),
                        f"kl above {thr} for {n} consecutive logged step{'s' * (n > 1)} from step {steps[s]} "
                        f"(peak {fmt(kl[peak])} at step {steps[peak]}); healthy is 0.01-0.1",
                        ", ".join(parts) + ", clip grad norm 1.0"
                        + (", roll back to the last checkpoint before the spike" if sev == "critical" else "")
                        + "; check samples for garbled format and a too aggressive reward", fix)]
    return []


def rule_kl_too_low(h: History, final: bool) -> list[Finding]:
    steps, kl = h.get("kl")
    if len(kl) < 10:
        return []
    warm = max(3, len(kl) // 5)
    post = kl[warm:]
    if float(np.median(post)) >= KL_LOW:
        return []
    if float(post.max()) == 0.0 and as_float(h.ctx.get("kl_coef")) == 0:
        return []  # KL simply not measured when the penalty is off
    frozen = float(post.max()) < 1e-4
    parts, fix = adjust(h.ctx, [("learning_rate", lambda x: x * 2, "raise the learning rate")])
    return [Finding("kl_too_low", "warning" if frozen else "info", int(steps[warm]),
                    f"kl median {fmt(float(np.median(post)))} (< {KL_LOW}) over {len(post)} logged steps "
                    f"after warm-up (steps {steps[warm]}-{steps[-1]}): the policy is not moving",
                    ", ".join(parts) + "; check that gradients reach the trained parameters "
                    "(LoRA target modules, frozen layers) and that rewards vary within groups", fix)]


def rule_sampler_mismatch(h: History, final: bool) -> list[Finding]:
    """The rollout engine and the training pass compute different policies from the same weights
    (precision, kernels, a stale weight sync): the updates are then off-policy by that much."""
    steps, gap = h.get("logp_gap")
    if len(gap) < 3 or float(np.median(gap)) < LOGP_GAP_WARNING:
        return []
    return [Finding("sampler_mismatch", "warning", int(steps[0]),
                    f"logp_gap median {fmt(float(np.median(gap)))} (>= {LOGP_GAP_WARNING}) over {len(gap)} logged "
                    "steps: the sampler's log-probs differ from the training pass's at the same weights",
                    "sample in the training passes' precision or in fp32 (rollout.precision: fp32); check that "
                    "the engine reloads the weights after every update (sync_weights)")]

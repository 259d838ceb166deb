"""Rules on whether RL learns: the reward flat, falling or bought with quality; groups that carry no
signal; a policy that stops exploring. Rewards are compared only on one scale (History).
"""
from __future__ import annotations

import math

import numpy as np

from steprl.monitor.doctor.series import (Finding, History, adjust, fmt, kl_up, noise, runs_of, smooth,
                                          tail_run, trend)

# sampled accuracy from which a flat reward is a plateau near the ceiling, not a run that fails to learn
NEAR_CEILING = 0.8


def _saturated(h: History, since_step: int) -> bool:
    s, acc = h.get("accuracy")
    late = acc[s >= since_step]
    return len(late) > 0 and float(np.mean(late)) >= 0.95


def _reward_scale(h: History, steps_from: int, r: np.ndarray) -> float:
    s, rs = h.get("reward_std")
    rs = rs[s >= steps_from]
    if len(rs) and float(np.median(rs)) > 0:
        return float(np.median(rs))
    return float(np.std(r))


def rule_reward_stagnation(h: History, final: bool) -> list[Finding]:
    """Flat = no significant and meaningful trend in the recent window AND confidently (95% upper
    bound post hoc, 99% live) less gain since the start than 15% of the within-group reward
    spread. Asking for confidence, not just a missing rise, keeps slow-but-steady runs quiet."""
    steps, r = h.get("reward")
    n, min_n = len(r), (20 if final else 50)
    if n < min_n:
        return []
    w = min(n, max(min_n, n // 2))
    win = r[-w:]
    if _saturated(h, int(steps[-w])):
        return []
    rise, se_rise, sigma = trend(win)
    k = min(max(10, n // 10), n // 3)
    run_rise = float(win.mean() - r[:k].mean())
    se_run = sigma * math.sqrt(1 / w + 1 / k)
    s_, rs = h.get("reward_std")
    rs = rs[s_ >= steps[-w]]
    # within-group spread; without it, guess it from the step noise (a batch of ~16 per step)
    scale = float(np.median(rs)) if len(rs) and float(np.median(rs)) > 0 else 4 * sigma
    tol = 0.15 * scale
    z = 1.64 if final else 2.33  # live looks at every step: stricter against repeated chances
    if rise > max(1.64 * se_rise, tol) or run_rise + z * se_run > tol:
        return []
    # falling, not flat (reward_collapse): confidently below the start, or a confident downward trend
    if run_rise + z * se_run < -tol or rise < -max(1.64 * se_rise, tol):
        return []
    evidence = (f"reward flat at {fmt(float(win.mean()))} +- {fmt(sigma)} over the last {w} logged steps "
                f"(steps {steps[-w]}-{steps[-1]}): trend {rise:+.3g}, gain since start {run_rise:+.3g} "
                f"(meaningful: {fmt(tol)})")
    acc_s, acc = h.get("accuracy")
    acc = acc[acc_s >= steps[-w]]
    if len(acc) and float(np.mean(acc)) >= NEAR_CEILING:  # a raised learning rate would risk what was learned
        return [Finding("reward_stagnation", "info", int(steps[-w]),
                        evidence + f", with {float(np.mean(acc)):.0%} of sampled episodes already correct",
                        "a plateau near the ceiling: little is left to learn on these prompts (greedy "
                        "accuracy is usually above the sampled one); use harder prompts, or stop here")]
    parts, fix = adjust(h.ctx, [
        ("learning_rate", lambda x: x * 5, "raise the learning rate (1e-5 -> 5e-5)"),
        ("kl_coef", lambda k_: k_ / 2, "lower kl_coef (0.1 -> 0.05)")])
    return [Finding("reward_stagnation", "warning", int(steps[-w]), evidence,
                    ", ".join(parts) + "; check the reward function (does it ever give credit?), "
                    "and redo cold-start SFT if the model rarely succeeds", fix)]


def rule_reward_collapse(h: History, final: bool) -> list[Finding]:
    steps, r = h.get("reward")
    n = len(r)
    if n < (10 if final else 20):
        return []
    w = max(5 if n >= 20 else 3, n // 8)
    s = smooth(r, w)
    p = int(np.argmax(s))
    gain, drop = float(s[p] - s[0]), float(s[p] - s[-1])
    se = noise(r) / math.sqrt(w) * math.sqrt(2)  # of a difference of two window means
    tol = 0.2 * _reward_scale(h, int(steps[0]), r)
    # 4 se: the peak of a smoothed noisy curve is biased upwards by the max over many windows
    if gain <= max(4 * se, tol):
        return _fall_from_start(h, steps, r, tol, final)
    if drop <= max(4 * se, tol) or drop < 0.3 * gain:
        return []
    peak_step = int(steps[p + w // 2])
    sev = "critical" if drop >= 0.6 * gain else "warning"
    parts, fix = adjust(h.ctx, [
        ("learning_rate", lambda x: x / 2, "lower the learning rate"),
        ("kl_coef", kl_up(2.0), "raise kl_coef")])
    fix.update({"rollback": True, "rollback_step": peak_step})
    return [Finding("reward_collapse", sev, peak_step,
                    f"reward rose {fmt(float(s[0]))} -> {fmt(float(s[p]))} (peak near step {peak_step}) then fell "
                    f"to {fmt(float(s[-1]))}: lost {drop / gain:.0%} of the gain",
                    f"overfitting or reward collapse: keep the checkpoint near step {peak_step} (stop there), "
                    + ", ".join(parts) + "; read samples after the peak for reward hacking", fix)]


def _fall_from_start(h: History, steps: np.ndarray, r: np.ndarray, tol: float, final: bool) -> list[Finding]:
    """A reward that never rose but fell: RL making a good cold start worse (typically a learning
    rate too high for it). The linear trend over every step is confidently negative (z 2.58 post
    hoc; 3.5 live, which looks at every step: a flat reward of sd 0.15 reached z 3.0 on one prefix
    of 320) and its fall is meaningful (> tol)."""
    rise, se, _ = trend(r)
    fall, k = -rise, max(3, len(r) // 5)
    start, end = float(r[:k].mean()), float(r[-k:].mean())
    if fall <= max((2.58 if final else 3.5) * se, tol) or start - end <= tol:
        return []
    sev = "critical" if start - end >= 0.3 * abs(start) else "warning"
    parts, fix = adjust(h.ctx, [
        ("learning_rate", lambda x: x / 4, "lower the learning rate"),
        ("kl_coef", kl_up(2.0), "raise kl_coef")])
    fix.update({"rollback": True, "rollback_step": int(steps[0])})
    return [Finding("reward_collapse", sev, int(steps[0]),
                    f"reward fell from the start, {fmt(start)} -> {fmt(end)} (mean of the first and last {k} "
                    f"logged steps; trend {-fall:+.3g} +- {fmt(se)}), and never rose",
                    "RL is making the starting policy worse, most often a learning rate too high for it: "
                    + ", ".join(parts) + "; keep the starting checkpoint", fix)]


def rule_quality_drop(h: History, final: bool) -> list[Finding]:
    key = "accuracy" if len(h.get("accuracy")[1]) >= 6 else "reward"
    steps, a = h.get(key)
    n = len(a)
    if n < 6:
        return []
    k = max(2, n // 3)
    up = float(a[-k:].mean() - a[:k].mean())
    tol = 0.05 if key == "accuracy" else 0.1 * _reward_scale(h, int(steps[0]), a)
    if up <= max(2 * noise(a) * math.sqrt(2 / k), tol):
        return []
    signals = []

    def early_late(name):
        s, v = h.get(name)
        if len(v) < 6:
            return None
        kk = max(2, len(v) // 3)
        return float(v[:kk].mean()), float(v[-kk:].mean()), int(s[-kk])

    c = early_late("completions/clipped_ratio")
    if c and c[1] - c[0] > 0.2 and c[1] > 0.25:
        signals.append((c[2], f"completions/clipped_ratio {fmt(c[0])} -> {fmt(c[1])}"))
    for name in sorted({k_ for e in h.raw for k_ in e if "format" in k_.lower()}):
        f = early_late(name)
        if f and f[0] - f[1] > max(0.1, 0.2 * abs(f[0])):
            signals.append((f[2], f"{name} {fmt(f[0])} -> {fmt(f[1])}"))
    m, t, name = early_late("completions/mean_length"), early_late("turns/mean"), "completions/mean_length"
    if m and t and min(t[:2]) > 0:  # more turns is tool use (turn_limit watches it); verbosity is longer turns
        m, name = (m[0] / t[0], m[1] / t[1], m[2]), name + " per turn"
    if m and m[0] > 0 and not 0.5 < m[1] / m[0] < 2.0:
        signals.append((m[2], f"{name} {fmt(m[0])} -> {fmt(m[1])}"))
    if not signals:
        return []
    parts, fix = adjust(h.ctx, [("kl_coef", kl_up(2.0), "raise kl_coef (0.05 -> 0.1)")])
    return [Finding("quality_drop", "warning", min(s for s, _ in signals),
                    f"{key} up {up:+.3g} while " + ", ".join(t for _, t in signals),
                    "single-objective reward or KL too weak: use a combined reward (add a format/quality "
                    "term), " + ", ".join(parts) + ", train fewer steps; read the samples", fix)]


def rule_zero_variance_groups(h: History, final: bool) -> list[Finding]:
    steps, f = h.get("frac_reward_zero_std")
    if len(f) < 3:
        return []
    runs = [r for r in runs_of(f > 0.5) if r[1] >= min(5, len(f))]
    if not runs:
        return []
    s, n = runs[0]
    lo, hi = int(steps[s]), int(steps[s + n - 1])
    acc_s, acc = h.get("accuracy")
    seg_acc = acc[(acc_s >= lo) & (acc_s <= hi)]
    solved = len(seg_acc) > 0 and float(seg_acc.mean()) >= 0.9
    parts, fix = adjust(h.ctx, [
        ("num_generations", lambda g: g * 2, "more generations per prompt (4 -> 8)"),
        ("temperature", lambda t: min(1.2, t + 0.2), "a higher sampling temperature")])
    why = ("the prompts are solved (accuracy >= 0.9): use harder prompts"
           if solved else "denser/partial-credit reward (e.g. +0.1 per successful tool call), "
           "prompts of the right difficulty")
    return [Finding("zero_variance_groups", "info" if solved else "warning", lo,
                    f"frac_reward_zero_std {fmt(float(f[s:s + n].mean()))} (> 0.5) for {n} logged steps "
                    f"(steps {lo}-{hi}): most groups give every completion the same reward, so no gradient",
                    ", ".join(parts) + "; " + why, fix)]


def rule_entropy_collapse(h: History, final: bool) -> list[Finding]:
    steps, e = h.get("entropy")
    n = len(e)
    if n < (5 if final else 8):
        return []
    k = max(1, min(5, n // 10))
    start = float(e[:k].mean())
    if start <= 0:
        return []
    low = e < 0.15 * start
    tail = tail_run(low)
    if tail < min(3, n // 3) or tail == 0:
        return []
    parts, fix = adjust(h.ctx, [("kl_coef", kl_up(2.0), "raise kl_coef (0.05 -> 0.1)"),
                                 ("learning_rate", lambda x: x / 2, "lower the learning rate"),
                                 ("temperature", lambda t: min(1.2, t + 0.2), "raise the sampling temperature")])
    return [Finding("entropy_collapse", "warning", int(steps[n - tail]),
                    f"entropy {fmt(start)} -> {fmt(float(e[-1]))} (< 15% of its start) since step {steps[n - tail]}: "
                    "the policy is near-deterministic and stops exploring",
                    ", ".join(parts) + "; consider an entropy bonus", fix)]

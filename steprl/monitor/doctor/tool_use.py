"""Rules on how an agent uses its tools: calls that stop, calls beyond what the problem needs, and
episodes that run to the turn limit instead of answering.
"""
from __future__ import annotations

import math

import numpy as np

from steprl.monitor.doctor.series import (Finding, History, adjust, as_float, fmt, kl_up, noise, smooth,
                                          tail_run)


def rule_tool_use_collapse(h: History, final: bool) -> list[Finding]:
    steps, c = h.get("tools/call_frequency")
    n = len(c)
    if n < 6:
        return []
    w = max(2, min(5, n // 10))
    sm = smooth(c, w)
    p = int(np.argmax(sm))
    peak = float(sm[p])
    if peak < 0.2:
        return []  # never used tools much: nothing collapsed
    tail = tail_run(c < min(0.05, 0.25 * peak))
    if tail < 3:
        return []
    fs, fr = h.get("tools/failure_frequency")
    fail = f"; tools/failure_frequency {fmt(float(fr[-w:].mean()))} at the end" if len(fr) else ""
    peak_step = int(steps[p + w // 2])
    parts, fix = adjust(h.ctx, [("kl_coef", kl_up(2.0), "raise kl_coef to stay near the cold-start policy")])
    fix.update({"rollback": True, "rollback_step": peak_step})
    return [Finding("tool_use_collapse", "warning", int(steps[n - tail]),
                    f"tools/call_frequency {fmt(peak)} near step {peak_step} -> {fmt(float(c[-1]))} "
                    f"since step {steps[n - tail]}{fail}",
                    "the policy stopped calling tools: reward successful tool calls (dense +0.1), check that "
                    "tool failures are not over-penalised, " + ", ".join(parts)
                    + ", redo cold-start SFT on tool trajectories", fix)]


def rule_calls_beyond_needed(h: History, final: bool) -> list[Finding]:
    """Episodes come to make more tool calls than the problem's worked solution
    (tools/calls_beyond_needed: at least 0.3 an episode, up 0.2 or more since the start and beyond
    its noise). While a per-call bonus pays, that is the bonus being learned for its own sake: it is
    not potential-based shaping (Ng et al., 1999), so it changes which policy is best. The fix
    turns it off; it catches what turn_limit catches, steps earlier (docs/experiments.md, "The
    doctor on the experiments' runs"). Without a bonus, extra calls may be checks: info only."""
    steps, c = h.get("tools/calls_beyond_needed")
    n = len(c)
    if n < 4:
        return []
    k = max(2, min(5, n // 4))
    start, now = float(c[:k].mean()), float(c[-k:].mean())
    if now < 0.3 or now - start < max(0.2, 2 * noise(c) * math.sqrt(2 / k)):
        return []
    since = int(steps[n - tail_run(c >= 0.3)]) if c[-1] >= 0.3 else int(steps[-k])
    bonus = as_float(h.ctx.get("tool_success"))
    paid = bonus is not None and bonus > 0
    evidence = (f"tools/calls_beyond_needed {fmt(start)} -> {fmt(now)} (mean of the first and last {k} logged "
                f"steps): episodes make calls their problem's solution does not")
    if not paid:
        return [Finding("calls_beyond_needed", "info", since, evidence,
                        "read the samples: extra calls that check a result are fine, calls that wander are not")]
    return [Finding("calls_beyond_needed", "warning", since, evidence + f", while calls pay {fmt(bonus)} each",
                    "the per-call reward is being learned for its own sake (it changes which policy is best): "
                    "drop it (reward.tool_success 0); paying only the needed calls did not stop it on the "
                    "credit task", {"tool_success": 0.0})]


def rule_turn_limit(h: History, final: bool) -> list[Finding]:
    """Episodes come to run to `max_turns` while fewer of them answer: the policy calls tools
    instead of finishing. A task that needs every turn keeps answering, and stays quiet here.
    Measured cause (docs/experiments.md, "Credit assignment"): a per-call reward, even one paid
    only for the calls the problem needs; the fix turns it off (`tool_success: 0`)."""
    limit = as_float(h.ctx.get("max_turns"))
    steps, t = h.get("turns/mean")
    _, answered = h.get("format")  # the fraction of episodes that gave an answer
    n = len(t)
    if not limit or limit < 2 or n < 6 or len(answered) != n:
        return []
    k = max(3, min(5, n // 5))
    t_start, t_end = float(t[:k].mean()), float(t[-k:].mean())
    a_start, a_end = float(answered[:k].mean()), float(answered[-k:].mean())
    drop = max(0.15, 3 * noise(answered) * math.sqrt(2 / k))  # two means of k noisy points apart
    if t_end < limit - 0.3 or t_start > limit - 0.5 or a_start - a_end < drop:
        return []
    sm = smooth(t, k)
    since = int(steps[len(sm) - tail_run(sm >= limit - 0.3) + k - 1])
    bonus = h.ctx.get("tool_success")
    paid = bonus is None or bonus > 0  # unknown counts as paid: the default config pays 0.1 a call
    return [Finding("turn_limit", "warning", since,
                    f"turns/mean {fmt(t_start)} -> {fmt(t_end)} (max_turns {fmt(limit)}), answered (format) "
                    f"{fmt(a_start)} -> {fmt(a_end)}: episodes run to the turn limit instead of answering",
                    ("the per-call reward teaches calling for its own sake: drop it once the calls are learned "
                     "(reward.tool_success 0) or use PPO, whose critic values each turn; " if paid else "")
                    + "check that the answer is rewarded above everything else; raise max_turns only if the "
                    "task needs more turns", {"tool_success": 0.0} if paid else None)]

"""Rules on supervised fitting (pretraining, SFT, the reward model): a loss that does not fall or
diverges; eval loss or accuracy that turns while training goes on (overfitting).
"""
from __future__ import annotations

import math

import numpy as np

from steprl.monitor.doctor.series import Finding, History, adjust, fmt, kl_up, noise


def rule_loss_not_decreasing(h: History, final: bool) -> list[Finding]:
    if h.is_rl:
        return []  # the RL surrogate loss is not expected to fall
    steps, loss = h.get("loss")
    n = len(loss)
    if n < (6 if final else 20):
        return []
    k = max(2, n // 5)
    early, late = float(loss[:k].mean()), float(loss[-k:].mean())
    se = noise(loss) * math.sqrt(2 / k)
    if late > 1.5 * early and late - early > 3 * se:
        parts, fix = adjust(h.ctx, [("learning_rate", lambda x: x / 3, "lower the learning rate")])
        fix["max_grad_norm"] = 1.0
        return [Finding("loss_not_decreasing", "critical", int(steps[-k]),
                        f"loss rose {fmt(early)} -> {fmt(late)} (steps {steps[0]}-{steps[-1]}): training diverges",
                        ", ".join(parts) + ", clip grad norm 1.0, check the data (labels, masking)", fix)]
    if early - late >= max(2 * se, 0.01 * abs(early)):
        return []
    parts, fix = adjust(h.ctx, [("learning_rate", lambda x: x * 3, "raise the learning rate"),
                                 ("num_epochs", lambda e: e * 2, "more epochs")])
    return [Finding("loss_not_decreasing", "warning", int(steps[-k]),
                    f"loss flat: {fmt(early)} -> {fmt(late)} over {n} logged steps "
                    f"(steps {steps[0]}-{steps[-1]}, noise +-{fmt(noise(loss))})",
                    ", ".join(parts) + "; check the data format (chat template, completion-only "
                    "labels not all masked)", fix)]


def rule_overfitting(h: History, final: bool) -> list[Finding]:
    es, ev = h.get("eval/loss")
    ts, tl = h.get("loss")
    if len(ev) >= 3:
        m = int(np.argmin(ev))
        after = ev[m + 1:]
        tail = after[-3:].mean() if len(after) else 0.0
        if (len(after) >= (1 if final else 2) and (after > ev[m]).all()
                and tail - ev[m] > max(0.05 * ev[m], 3 * noise(ev))):
            at_best, end = tl[ts <= es[m]], tl[ts > es[m]]
            falling = len(tl) < 2 or (len(at_best) and len(end) and
                                      end[-max(1, len(end) // 3):].mean() < at_best[-3:].mean())
            if falling:
                best, last = int(es[m]), int(es[-1])
                parts, fix = adjust(h.ctx, [
                    ("weight_decay", lambda w: w * 10 if w > 0 else 0.01, "more weight_decay (0 -> 0.01)"),
                    ("num_epochs", lambda e: max(1, math.ceil(e * best / max(last, 1))), "fewer epochs")])
                fix.update({"rollback": True, "rollback_step": best})
                train = (f" while loss {fmt(float(at_best[-3:].mean()))} -> {fmt(float(end[-1]))}"
                         if len(tl) >= 2 else "")
                return [Finding("overfitting", "warning", best,
                                f"eval/loss {fmt(float(ev[m]))} at step {best} (best) -> {fmt(float(ev[-1]))} "
                                f"at step {last} (+{ev[-1] / ev[m] - 1:.0%}){train}",
                                ", ".join(parts) + f", more data; keep the checkpoint at step {best}", fix)]
    es, ea = h.get("eval/accuracy")
    rs, rr = h.get("reward")
    if len(ea) >= 3 and len(rr) >= 6:
        m = int(np.argmax(ea))
        after = ea[m + 1:]
        if len(after) >= (1 if final else 2) and ea[m] - ea[-1] >= 0.1 and (after < ea[m]).all():
            before, later = rr[rs <= es[m]], rr[rs > es[m]]
            if len(before) >= 3 and len(later) >= 3 and later[-3:].mean() > before[-3:].mean():
                parts, fix = adjust(h.ctx, [("kl_coef", kl_up(2.0), "raise kl_coef")])
                fix.update({"rollback": True, "rollback_step": int(es[m])})
                return [Finding("overfitting", "warning", int(es[m]),
                                f"eval/accuracy {fmt(float(ea[m]))} at step {es[m]} (best) -> {fmt(float(ea[-1]))} "
                                f"at step {es[-1]} while the training reward kept rising",
                                f"keep the checkpoint at step {es[m]}, train fewer steps, "
                                + ", ".join(parts) + ", use more/varied training prompts", fix)]
    return []

"""Training doctor: turns a metrics history into findings with advice.

The rules encode the monitoring and troubleshooting theory of the course (see BRIEF.md):
KL healthy in 0.01-0.1, >0.5 is an explosion, <0.001 means the policy is not moving; reward
should rise; accuracy up with quality down means a single-objective reward; flat SFT loss means
a too-low learning rate or bad data. Each rule is a small function over the history alone, so the
same code runs live (inside the trainer, on a growing history) and post hoc (`steprl doctor` on a
hand-written metrics.jsonl). Advice is scaled to the run's own hyper-parameters when known, and a
machine-applicable `fix` dict lets an auto-fix loop act on it.

Rules must stay quiet on healthy runs: every judgement compares a change against the series' own
noise (estimated from step-to-step differences) and asks for a sustained pattern, never one blip.
Rewards are compared only on one scale: after a change of the reward mid-run (the trainer's
"reward_changed" on a step) the reward's series start again.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
KL_CRITICAL, KL_WARNING, KL_LOW = 0.5, 0.1, 0.001
# mean |logp_sampler - logp_trainer| before the first update; bf16 rounding alone is ~0.003
LOGP_GAP_WARNING = 0.05
KL_SPIKE = 2.5  # one logged step at 5x the critical line is an explosion on its own
INT_KEYS = {"num_generations", "per_device_batch_size", "max_new_tokens", "num_epochs"}
RL_STAGES = {"grpo", "ppo", "rl"}
RL_METRICS = ("reward", "reward_std", "kl")  # logged by RL stages only
# series on the reward's scale: a change of the reward ("reward_changed": {"tool_success": 0.0} on the
# step after which auto-fix dropped the call bonus) makes the steps before it incomparable with the
# steps after
REWARD_SCALED = ("reward", "reward_std", "frac_reward_zero_std")
# sampled accuracy from which a flat reward is a plateau near the ceiling, not a run that fails to learn
NEAR_CEILING = 0.8
STAGE_ORDER = ["pretrain", "sft", "rm", "grpo", "ppo", "eval"]
CONTEXT_KEYS = {  # context key -> config spellings we accept
    "learning_rate": ("learning_rate", "lr"),
    "kl_coef": ("kl_coef", "beta", "kl_beta"),
    "num_generations": ("num_generations", "group_size"),
    "per_device_batch_size": ("per_device_batch_size", "per_device_train_batch_size", "batch_size",
                              "minibatch_size"),
    "max_new_tokens": ("max_new_tokens", "max_completion_length"),
    "weight_decay": ("weight_decay",),
    "num_epochs": ("num_epochs", "num_train_epochs", "epochs"),
    "temperature": ("temperature",),
    "max_grad_norm": ("max_grad_norm", "grad_clip"),
    "max_turns": ("max_turns",),
    "tool_success": ("tool_success",),
}


@dataclass
class Finding:
    code: str
    severity: str  # "info" | "warning" | "critical"
    step: int
    evidence: str
    advice: str
    fix: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["fix"] is None:
            del d["fix"]
        return d


# ----------------------------------------------------------------------------- helpers
def _num(v) -> float | None:
    """A float from a JSON value ("nan"/"inf" strings included); None if not a number."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _g(x: float) -> str:
    return f"{x:.3g}"


def _round(x: float) -> float:
    return float(f"{x:.3g}")


class _History:
    """Cached, finite-only access to the series of one stage; the reward's series only since its
    last change (the `reward_since` step)."""

    def __init__(self, history: list[dict], context: dict):
        self.raw = [e for e in history if isinstance(e, dict)]
        self.ctx = dict(context)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        changes = [e for e in self.raw if isinstance(e.get("reward_changed"), dict)]
        self.reward_since = int(_num(changes[-1].get("step")) or 0) if changes else None
        for e in changes:  # the reward settings in force now: what the last change set
            self.ctx.update(e["reward_changed"])
        # no config value: fall back to the logged ones (peak lr of the schedule, current kl_coef)
        for key, pick in (("learning_rate", np.max), ("kl_coef", lambda v: v[-1])):
            vals = self.get(key)[1]
            if _num(self.ctx.get(key)) is None and len(vals) and pick(vals) > 0:
                self.ctx[key] = float(pick(vals))
        self.is_rl = is_rl_history(self.raw, context)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._cache:
            pts = [(int(_num(e.get("step")) or 0), _num(e[key])) for e in self.raw if key in e]
            pts = [(s, v) for s, v in pts if v is not None and math.isfinite(v)]
            if key in REWARD_SCALED and self.reward_since is not None:
                pts = [(s, v) for s, v in pts if s > self.reward_since]
            self._cache[key] = (np.array([p[0] for p in pts], dtype=np.int64),
                                np.array([p[1] for p in pts], dtype=float))
        return self._cache[key]


def is_rl_history(history: list[dict], context: dict) -> bool:
    """An RL history logs episode metrics (reward, KL); a stage named in the context by the
    live logger or a config counts too. A directory's name never decides: a GRPO run saved
    under any name gets the RL rules, an SFT run the SFT ones."""
    if str(context.get("stage", "")).lower() in RL_STAGES:
        return True
    return any(key in e for e in history for key in RL_METRICS)


def _noise(y: np.ndarray) -> float:
    """Per-point noise from first differences (robust to trends and outliers)."""
    if len(y) < 3:
        return float(np.std(y)) if len(y) else 0.0
    d = np.diff(y)  # mean absolute deviation: efficient on short series, tolerant of outliers
    return float(np.mean(np.abs(d - np.median(d)))) * math.sqrt(math.pi / 2) / math.sqrt(2)


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    return np.convolve(y, np.ones(w) / w, mode="valid") if len(y) >= w else y


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of consecutive True stretches."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - start))
            start = None
    return out


def _tail_run(mask: np.ndarray) -> int:
    """Length of the True stretch that ends at the last point."""
    n = 0
    for m in mask[::-1]:
        if not m:
            break
        n += 1
    return n


def _trend(y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line through y: (rise from first to last point, its standard error, the
    residual noise per point)."""
    n, t = len(y), np.arange(len(y), dtype=float)
    slope, icpt = np.polyfit(t, y, 1)
    sigma = float(np.sqrt(((y - (slope * t + icpt)) ** 2).sum() / max(1, n - 2)))
    return float(slope) * (n - 1), sigma / math.sqrt(float(((t - t.mean()) ** 2).sum())) * (n - 1), sigma


def _adjust(ctx: dict, changes: list[tuple[str, object, str]]) -> tuple[list[str], dict]:
    """Scale the run's own hyper-parameters: ("learning_rate", fn, generic text) ->
    "learning_rate 5e-05 -> 1e-05" and fix {"learning_rate": 1e-05}; generic text when unknown."""
    parts, fix = [], {}
    for key, fn, generic in changes:
        old = _num(ctx.get(key))
        if old is None:
            parts.append(generic)
            continue
        new = int(fn(int(old))) if key in INT_KEYS else _round(fn(old))
        fix[key] = new
        parts.append(f"{key} {_g(old)} -> {_g(new)}")
    return parts, fix


def _kl_up(factor: float, floor: float = 0.04):
    return lambda k: k * factor if k > 0 else floor


# ----------------------------------------------------------------------------- rules
def rule_nan_loss(h: _History, final: bool) -> list[Finding]:
    """Critical, unless every bad step was skipped by the trainer (event "nan_skip") and they are
    rare (<= 10% of logged steps): then the run recovered and it is a warning. A skip counts even
    when the logged values are finite (the RL recipes log the minibatches they did apply)."""
    bad, skipped = [], 0
    for e in h.raw:
        hits = [(k, _num(v)) for k, v in e.items()
                if k in ("loss", "grad_norm", "reward", "kl") or k.endswith("loss")]
        hits = [(k, x) for k, x in hits if x is not None and not math.isfinite(x)]
        skip = str(e.get("event", "")).endswith("skip")
        if hits or skip:
            bad.append((int(_num(e.get("step")) or 0), *(hits[0] if hits else ("loss", "non-finite (skipped)"))))
            skipped += skip
    if not bad:
        return []
    step, key, val = bad[0]
    recovered = skipped == len(bad) and len(bad) <= 0.1 * max(1, len(h.raw))
    parts, fix = _adjust(h.ctx, [("learning_rate", lambda x: x / 10, "lower the learning rate 10x")])
    fix.update({"max_grad_norm": 1.0, "rollback": True})
    return [Finding("nan_loss", "warning" if recovered else "critical", step,
                    f"{key} = {val} at step {step} ({len(bad)} non-finite value(s) in loss/grad_norm/reward"
                    + (", all skipped by the trainer)" if recovered else ")"),
                    ", ".join(parts) + ", clip grad norm 1.0, resume from the last good checkpoint; "
                    "stay in fp32 (fp16/bf16 overflow), check the reward function for NaN/division by zero",
                    fix)]


def rule_out_of_memory(h: _History, final: bool) -> list[Finding]:
    ooms = [e for e in h.raw if e.get("event") == "oom" or (_num(e.get("oom")) or 0) > 0]
    if not ooms:
        return []
    step = int(_num(ooms[0].get("step")) or 0)
    parts, fix = _adjust(h.ctx, [
        ("num_generations", lambda g: max(2, g // 2), "num_generations 8 -> 4"),
        ("per_device_batch_size", lambda b: max(1, b // 2), "batch 4 -> 2"),
        ("max_new_tokens", lambda t: max(16, t // 2), "max_new_tokens 512 -> 256"),
    ])
    fix["gradient_checkpointing"] = True
    return [Finding("out_of_memory", "critical", step,
                    f"{len(ooms)} out-of-memory event(s), first at step {step}",
                    ", ".join(parts) + ", enable gradient checkpointing, use mixed precision on GPU",
                    fix)]


def rule_kl_explosion(h: _History, final: bool) -> list[Finding]:
    steps, kl = h.get("kl")
    if len(kl) == 0:
        return []
    for sev, thr in (("critical", KL_CRITICAL), ("warning", KL_WARNING)):
        # two logged steps above 0.5 are an explosion (live and post-hoc alike); a warning needs three.
        # One step far above the line (KL_SPIKE) is one too: a policy that moved that far in one
        # update is broken even if the next step's KL, measured against it, looks calm.
        need = min(2 if sev == "critical" else 3, max(len(kl), 2))
        runs = [r for r in _runs(kl > thr) if r[1] >= need]
        if sev == "critical":
            runs = sorted(runs + [(int(i), 1) for i in np.flatnonzero(kl > KL_SPIKE)])
        if not runs:
            continue
        s, n = runs[0]
        peak = int(np.argmax(kl[s:s + n])) + s
        factor, kl_factor = (0.2, 2.0) if sev == "critical" else (0.5, 1.5)
        parts, fix = _adjust(h.ctx, [
            ("learning_rate", lambda x: x * factor, "lower the learning rate (5e-5 -> 1e-5)"),
            ("kl_coef", _kl_up(kl_factor), "raise kl_coef (0.05 -> 0.1)")])
        fix["max_grad_norm"] = 1.0
        if sev == "critical":
            fix["rollback"] = True
        return [Finding("kl_explosion", sev, int(steps[s]),
                        f"kl above {thr} for {n} consecutive logged step{'s' * (n > 1)} from step {steps[s]} "
                        f"(peak {_g(kl[peak])} at step {steps[peak]}); healthy is 0.01-0.1",
                        ", ".join(parts) + ", clip grad norm 1.0"
                        + (", roll back to the last checkpoint before the spike" if sev == "critical" else "")
                        + "; check samples for garbled format and a too aggressive reward", fix)]
    return []


def rule_kl_too_low(h: _History, final: bool) -> list[Finding]:
    steps, kl = h.get("kl")
    if len(kl) < 10:
        return []
    warm = max(3, len(kl) // 5)
    post = kl[warm:]
    if float(np.median(post)) >= KL_LOW:
        return []
    if float(post.max()) == 0.0 and _num(h.ctx.get("kl_coef")) == 0:
        return []  # KL simply not measured when the penalty is off
    frozen = float(post.max()) < 1e-4
    parts, fix = _adjust(h.ctx, [("learning_rate", lambda x: x * 2, "raise the learning rate")])
    return [Finding("kl_too_low", "warning" if frozen else "info", int(steps[warm]),
                    f"kl median {_g(float(np.median(post)))} (< {KL_LOW}) over {len(post)} logged steps "
                    f"after warm-up (steps {steps[warm]}-{steps[-1]}): the policy is not moving",
                    ", ".join(parts) + "; check that gradients reach the trained parameters "
                    "(LoRA target modules, frozen layers) and that rewards vary within groups", fix)]


def rule_sampler_mismatch(h: _History, final: bool) -> list[Finding]:
    """The rollout engine and the training pass compute different policies from the same weights
    (precision, kernels, a stale weight sync): the updates are then off-policy by that much."""
    steps, gap = h.get("logp_gap")
    if len(gap) < 3 or float(np.median(gap)) < LOGP_GAP_WARNING:
        return []
    return [Finding("sampler_mismatch", "warning", int(steps[0]),
                    f"logp_gap median {_g(float(np.median(gap)))} (>= {LOGP_GAP_WARNING}) over {len(gap)} logged "
                    "steps: the sampler's log-probs differ from the training pass's at the same weights",
                    "sample in the training passes' precision or in fp32 (rollout.precision: fp32); check that "
                    "the engine reloads the weights after every update (sync_weights)")]


def _saturated(h: _History, since_step: int) -> bool:
    s, acc = h.get("accuracy")
    late = acc[s >= since_step]
    return len(late) > 0 and float(np.mean(late)) >= 0.95


def _reward_scale(h: _History, steps_from: int, r: np.ndarray) -> float:
    s, rs = h.get("reward_std")
    rs = rs[s >= steps_from]
    if len(rs) and float(np.median(rs)) > 0:
        return float(np.median(rs))
    return float(np.std(r))


def rule_reward_stagnation(h: _History, final: bool) -> list[Finding]:
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
    rise, se_rise, sigma = _trend(win)
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
    evidence = (f"reward flat at {_g(float(win.mean()))} +- {_g(sigma)} over the last {w} logged steps "
                f"(steps {steps[-w]}-{steps[-1]}): trend {rise:+.3g}, gain since start {run_rise:+.3g} "
                f"(meaningful: {_g(tol)})")
    acc_s, acc = h.get("accuracy")
    acc = acc[acc_s >= steps[-w]]
    if len(acc) and float(np.mean(acc)) >= NEAR_CEILING:  # a raised learning rate would risk what was learned
        return [Finding("reward_stagnation", "info", int(steps[-w]),
                        evidence + f", with {float(np.mean(acc)):.0%} of sampled episodes already correct",
                        "a plateau near the ceiling: little is left to learn on these prompts (greedy "
                        "accuracy is usually above the sampled one); use harder prompts, or stop here")]
    parts, fix = _adjust(h.ctx, [
        ("learning_rate", lambda x: x * 5, "raise the learning rate (1e-5 -> 5e-5)"),
        ("kl_coef", lambda k_: k_ / 2, "lower kl_coef (0.1 -> 0.05)")])
    return [Finding("reward_stagnation", "warning", int(steps[-w]), evidence,
                    ", ".join(parts) + "; check the reward function (does it ever give credit?), "
                    "and redo cold-start SFT if the model rarely succeeds", fix)]


def rule_reward_collapse(h: _History, final: bool) -> list[Finding]:
    steps, r = h.get("reward")
    n = len(r)
    if n < (10 if final else 20):
        return []
    w = max(5 if n >= 20 else 3, n // 8)
    s = _smooth(r, w)
    p = int(np.argmax(s))
    gain, drop = float(s[p] - s[0]), float(s[p] - s[-1])
    se = _noise(r) / math.sqrt(w) * math.sqrt(2)  # of a difference of two window means
    tol = 0.2 * _reward_scale(h, int(steps[0]), r)
    # 4 se: the peak of a smoothed noisy curve is biased upwards by the max over many windows
    if gain <= max(4 * se, tol):
        return _fall_from_start(h, steps, r, tol, final)
    if drop <= max(4 * se, tol) or drop < 0.3 * gain:
        return []
    peak_step = int(steps[p + w // 2])
    sev = "critical" if drop >= 0.6 * gain else "warning"
    parts, fix = _adjust(h.ctx, [
        ("learning_rate", lambda x: x / 2, "lower the learning rate"),
        ("kl_coef", _kl_up(2.0), "raise kl_coef")])
    fix.update({"rollback": True, "rollback_step": peak_step})
    return [Finding("reward_collapse", sev, peak_step,
                    f"reward rose {_g(float(s[0]))} -> {_g(float(s[p]))} (peak near step {peak_step}) then fell "
                    f"to {_g(float(s[-1]))}: lost {drop / gain:.0%} of the gain",
                    f"overfitting or reward collapse: keep the checkpoint near step {peak_step} (stop there), "
                    + ", ".join(parts) + "; read samples after the peak for reward hacking", fix)]


def _fall_from_start(h: _History, steps: np.ndarray, r: np.ndarray, tol: float, final: bool) -> list[Finding]:
    """A reward that never rose but fell: RL making a good cold start worse (typically a learning
    rate too high for it). The linear trend over every step is confidently negative (z 2.58 post
    hoc; 3.5 live, which looks at every step: a flat reward of sd 0.15 reached z 3.0 on one prefix
    of 320) and its fall is meaningful (> tol)."""
    rise, se, _ = _trend(r)
    fall, k = -rise, max(3, len(r) // 5)
    start, end = float(r[:k].mean()), float(r[-k:].mean())
    if fall <= max((2.58 if final else 3.5) * se, tol) or start - end <= tol:
        return []
    sev = "critical" if start - end >= 0.3 * abs(start) else "warning"
    parts, fix = _adjust(h.ctx, [
        ("learning_rate", lambda x: x / 4, "lower the learning rate"),
        ("kl_coef", _kl_up(2.0), "raise kl_coef")])
    fix.update({"rollback": True, "rollback_step": int(steps[0])})
    return [Finding("reward_collapse", sev, int(steps[0]),
                    f"reward fell from the start, {_g(start)} -> {_g(end)} (mean of the first and last {k} "
                    f"logged steps; trend {-fall:+.3g} +- {_g(se)}), and never rose",
                    "RL is making the starting policy worse, most often a learning rate too high for it: "
                    + ", ".join(parts) + "; keep the starting checkpoint", fix)]


def rule_quality_drop(h: _History, final: bool) -> list[Finding]:
    key = "accuracy" if len(h.get("accuracy")[1]) >= 6 else "reward"
    steps, a = h.get(key)
    n = len(a)
    if n < 6:
        return []
    k = max(2, n // 3)
    up = float(a[-k:].mean() - a[:k].mean())
    tol = 0.05 if key == "accuracy" else 0.1 * _reward_scale(h, int(steps[0]), a)
    if up <= max(2 * _noise(a) * math.sqrt(2 / k), tol):
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
        signals.append((c[2], f"completions/clipped_ratio {_g(c[0])} -> {_g(c[1])}"))
    for name in sorted({k_ for e in h.raw for k_ in e if "format" in k_.lower()}):
        f = early_late(name)
        if f and f[0] - f[1] > max(0.1, 0.2 * abs(f[0])):
            signals.append((f[2], f"{name} {_g(f[0])} -> {_g(f[1])}"))
    m, t, name = early_late("completions/mean_length"), early_late("turns/mean"), "completions/mean_length"
    if m and t and min(t[:2]) > 0:  # more turns is tool use (turn_limit watches it); verbosity is longer turns
        m, name = (m[0] / t[0], m[1] / t[1], m[2]), name + " per turn"
    if m and m[0] > 0 and not 0.5 < m[1] / m[0] < 2.0:
        signals.append((m[2], f"{name} {_g(m[0])} -> {_g(m[1])}"))
    if not signals:
        return []
    parts, fix = _adjust(h.ctx, [("kl_coef", _kl_up(2.0), "raise kl_coef (0.05 -> 0.1)")])
    return [Finding("quality_drop", "warning", min(s for s, _ in signals),
                    f"{key} up {up:+.3g} while " + ", ".join(t for _, t in signals),
                    "single-objective reward or KL too weak: use a combined reward (add a format/quality "
                    "term), " + ", ".join(parts) + ", train fewer steps; read the samples", fix)]


def rule_loss_not_decreasing(h: _History, final: bool) -> list[Finding]:
    if h.is_rl:
        return []  # the RL surrogate loss is not expected to fall
    steps, loss = h.get("loss")
    n = len(loss)
    if n < (6 if final else 20):
        return []
    k = max(2, n // 5)
    early, late = float(loss[:k].mean()), float(loss[-k:].mean())
    se = _noise(loss) * math.sqrt(2 / k)
    if late > 1.5 * early and late - early > 3 * se:
        parts, fix = _adjust(h.ctx, [("learning_rate", lambda x: x / 3, "lower the learning rate")])
        fix["max_grad_norm"] = 1.0
        return [Finding("loss_not_decreasing", "critical", int(steps[-k]),
                        f"loss rose {_g(early)} -> {_g(late)} (steps {steps[0]}-{steps[-1]}): training diverges",
                        ", ".join(parts) + ", clip grad norm 1.0, check the data (labels, masking)", fix)]
    if early - late >= max(2 * se, 0.01 * abs(early)):
        return []
    parts, fix = _adjust(h.ctx, [("learning_rate", lambda x: x * 3, "raise the learning rate"),
                                 ("num_epochs", lambda e: e * 2, "more epochs")])
    return [Finding("loss_not_decreasing", "warning", int(steps[-k]),
                    f"loss flat: {_g(early)} -> {_g(late)} over {n} logged steps "
                    f"(steps {steps[0]}-{steps[-1]}, noise +-{_g(_noise(loss))})",
                    ", ".join(parts) + "; check the data format (chat template, completion-only "
                    "labels not all masked)", fix)]


def rule_overfitting(h: _History, final: bool) -> list[Finding]:
    es, ev = h.get("eval/loss")
    ts, tl = h.get("loss")
    if len(ev) >= 3:
        m = int(np.argmin(ev))
        after = ev[m + 1:]
        tail = after[-3:].mean() if len(after) else 0.0
        if (len(after) >= (1 if final else 2) and (after > ev[m]).all()
                and tail - ev[m] > max(0.05 * ev[m], 3 * _noise(ev))):
            at_best, end = tl[ts <= es[m]], tl[ts > es[m]]
            falling = len(tl) < 2 or (len(at_best) and len(end) and
                                      end[-max(1, len(end) // 3):].mean() < at_best[-3:].mean())
            if falling:
                best, last = int(es[m]), int(es[-1])
                parts, fix = _adjust(h.ctx, [
                    ("weight_decay", lambda w: w * 10 if w > 0 else 0.01, "more weight_decay (0 -> 0.01)"),
                    ("num_epochs", lambda e: max(1, math.ceil(e * best / max(last, 1))), "fewer epochs")])
                fix.update({"rollback": True, "rollback_step": best})
                train = (f" while loss {_g(float(at_best[-3:].mean()))} -> {_g(float(end[-1]))}"
                         if len(tl) >= 2 else "")
                return [Finding("overfitting", "warning", best,
                                f"eval/loss {_g(float(ev[m]))} at step {best} (best) -> {_g(float(ev[-1]))} "
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
                parts, fix = _adjust(h.ctx, [("kl_coef", _kl_up(2.0), "raise kl_coef")])
                fix.update({"rollback": True, "rollback_step": int(es[m])})
                return [Finding("overfitting", "warning", int(es[m]),
                                f"eval/accuracy {_g(float(ea[m]))} at step {es[m]} (best) -> {_g(float(ea[-1]))} "
                                f"at step {es[-1]} while the training reward kept rising",
                                f"keep the checkpoint at step {es[m]}, train fewer steps, "
                                + ", ".join(parts) + ", use more/varied training prompts", fix)]
    return []


def rule_zero_variance_groups(h: _History, final: bool) -> list[Finding]:
    steps, f = h.get("frac_reward_zero_std")
    if len(f) < 3:
        return []
    runs = [r for r in _runs(f > 0.5) if r[1] >= min(5, len(f))]
    if not runs:
        return []
    s, n = runs[0]
    lo, hi = int(steps[s]), int(steps[s + n - 1])
    acc_s, acc = h.get("accuracy")
    seg_acc = acc[(acc_s >= lo) & (acc_s <= hi)]
    solved = len(seg_acc) > 0 and float(seg_acc.mean()) >= 0.9
    parts, fix = _adjust(h.ctx, [
        ("num_generations", lambda g: g * 2, "more generations per prompt (4 -> 8)"),
        ("temperature", lambda t: min(1.2, t + 0.2), "a higher sampling temperature")])
    why = ("the prompts are solved (accuracy >= 0.9): use harder prompts"
           if solved else "denser/partial-credit reward (e.g. +0.1 per successful tool call), "
           "prompts of the right difficulty")
    return [Finding("zero_variance_groups", "info" if solved else "warning", lo,
                    f"frac_reward_zero_std {_g(float(f[s:s + n].mean()))} (> 0.5) for {n} logged steps "
                    f"(steps {lo}-{hi}): most groups give every completion the same reward, so no gradient",
                    ", ".join(parts) + "; " + why, fix)]


def rule_entropy_collapse(h: _History, final: bool) -> list[Finding]:
    steps, e = h.get("entropy")
    n = len(e)
    if n < (5 if final else 8):
        return []
    k = max(1, min(5, n // 10))
    start = float(e[:k].mean())
    if start <= 0:
        return []
    low = e < 0.15 * start
    tail = _tail_run(low)
    if tail < min(3, n // 3) or tail == 0:
        return []
    parts, fix = _adjust(h.ctx, [("kl_coef", _kl_up(2.0), "raise kl_coef (0.05 -> 0.1)"),
                                 ("learning_rate", lambda x: x / 2, "lower the learning rate"),
                                 ("temperature", lambda t: min(1.2, t + 0.2), "raise the sampling temperature")])
    return [Finding("entropy_collapse", "warning", int(steps[n - tail]),
                    f"entropy {_g(start)} -> {_g(float(e[-1]))} (< 15% of its start) since step {steps[n - tail]}: "
                    "the policy is near-deterministic and stops exploring",
                    ", ".join(parts) + "; consider an entropy bonus", fix)]


def rule_tool_use_collapse(h: _History, final: bool) -> list[Finding]:
    steps, c = h.get("tools/call_frequency")
    n = len(c)
    if n < 6:
        return []
    w = max(2, min(5, n // 10))
    sm = _smooth(c, w)
    p = int(np.argmax(sm))
    peak = float(sm[p])
    if peak < 0.2:
        return []  # never used tools much: nothing collapsed
    tail = _tail_run(c < min(0.05, 0.25 * peak))
    if tail < 3:
        return []
    fs, fr = h.get("tools/failure_frequency")
    fail = f"; tools/failure_frequency {_g(float(fr[-w:].mean()))} at the end" if len(fr) else ""
    peak_step = int(steps[p + w // 2])
    parts, fix = _adjust(h.ctx, [("kl_coef", _kl_up(2.0), "raise kl_coef to stay near the cold-start policy")])
    fix.update({"rollback": True, "rollback_step": peak_step})
    return [Finding("tool_use_collapse", "warning", int(steps[n - tail]),
                    f"tools/call_frequency {_g(peak)} near step {peak_step} -> {_g(float(c[-1]))} "
                    f"since step {steps[n - tail]}{fail}",
                    "the policy stopped calling tools: reward successful tool calls (dense +0.1), check that "
                    "tool failures are not over-penalised, " + ", ".join(parts)
                    + ", redo cold-start SFT on tool trajectories", fix)]


def rule_calls_beyond_needed(h: _History, final: bool) -> list[Finding]:
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
    if now < 0.3 or now - start < max(0.2, 2 * _noise(c) * math.sqrt(2 / k)):
        return []
    since = int(steps[n - _tail_run(c >= 0.3)]) if c[-1] >= 0.3 else int(steps[-k])
    bonus = _num(h.ctx.get("tool_success"))
    paid = bonus is not None and bonus > 0
    evidence = (f"tools/calls_beyond_needed {_g(start)} -> {_g(now)} (mean of the first and last {k} logged "
                f"steps): episodes make calls their problem's solution does not")
    if not paid:
        return [Finding("calls_beyond_needed", "info", since, evidence,
                        "read the samples: extra calls that check a result are fine, calls that wander are not")]
    return [Finding("calls_beyond_needed", "warning", since, evidence + f", while calls pay {_g(bonus)} each",
                    "the per-call reward is being learned for its own sake (it changes which policy is best): "
                    "drop it (reward.tool_success 0); paying only the needed calls did not stop it on the "
                    "credit task", {"tool_success": 0.0})]


def rule_turn_limit(h: _History, final: bool) -> list[Finding]:
    """Episodes come to run to `max_turns` while fewer of them answer: the policy calls tools
    instead of finishing. A task that needs every turn keeps answering, and stays quiet here.
    Measured cause (docs/experiments.md, "Credit assignment"): a per-call reward, even one paid
    only for the calls the problem needs; the fix turns it off (`tool_success: 0`)."""
    limit = _num(h.ctx.get("max_turns"))
    steps, t = h.get("turns/mean")
    _, answered = h.get("format")  # the fraction of episodes that gave an answer
    n = len(t)
    if not limit or limit < 2 or n < 6 or len(answered) != n:
        return []
    k = max(3, min(5, n // 5))
    t_start, t_end = float(t[:k].mean()), float(t[-k:].mean())
    a_start, a_end = float(answered[:k].mean()), float(answered[-k:].mean())
    drop = max(0.15, 3 * _noise(answered) * math.sqrt(2 / k))  # two means of k noisy points apart
    if t_end < limit - 0.3 or t_start > limit - 0.5 or a_start - a_end < drop:
        return []
    sm = _smooth(t, k)
    since = int(steps[len(sm) - _tail_run(sm >= limit - 0.3) + k - 1])
    bonus = h.ctx.get("tool_success")
    paid = bonus is None or bonus > 0  # unknown counts as paid: the default config pays 0.1 a call
    return [Finding("turn_limit", "warning", since,
                    f"turns/mean {_g(t_start)} -> {_g(t_end)} (max_turns {_g(limit)}), answered (format) "
                    f"{_g(a_start)} -> {_g(a_end)}: episodes run to the turn limit instead of answering",
                    ("the per-call reward teaches calling for its own sake: drop it once the calls are learned "
                     "(reward.tool_success 0) or use PPO, whose critic values each turn; " if paid else "")
                    + "check that the answer is rewarded above everything else; raise max_turns only if the "
                    "task needs more turns", {"tool_success": 0.0} if paid else None)]


RULES = [rule_nan_loss, rule_out_of_memory, rule_kl_explosion, rule_kl_too_low, rule_sampler_mismatch,
         rule_reward_stagnation, rule_reward_collapse, rule_quality_drop, rule_loss_not_decreasing,
         rule_overfitting, rule_zero_variance_groups, rule_entropy_collapse, rule_tool_use_collapse, rule_turn_limit,
         rule_calls_beyond_needed]


def diagnose(history: list[dict], context: dict | None = None, final: bool = False) -> list[Finding]:
    """All findings for one stage's history, most severe first. `final=True` means the run is
    over, which allows judgements on shorter evidence (e.g. a drop seen in only the last eval)."""
    h = _History(history, context or {})
    out = [f for rule in RULES for f in rule(h, final)]
    return sorted(out, key=lambda f: (-SEVERITY_RANK[f.severity], f.step))


# ----------------------------------------------------------------------------- files / CLI
def read_jsonl(path) -> list[dict]:
    """JSON lines, skipping blank and broken ones (a crash can truncate the last line)."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _config_context(cfg, stage: str) -> dict:
    """Best-effort: known hyper-parameters for `stage` from a resolved config of unknown shape.
    Values under a section named like the stage win over top-level/shared ones."""
    def leaves(d, path=()):
        if isinstance(d, dict):
            for k, v in d.items():
                yield from leaves(v, path + (str(k).lower(),))
        else:
            yield path, d

    ctx: dict = {}
    if not isinstance(cfg, dict):
        return ctx
    items = list(leaves(cfg))
    others = set(STAGE_ORDER) - {stage}
    for own in (False, True):  # shared first, then the stage's own section overrides
        for path, v in items:
            in_stage = stage in path[:-1]
            if in_stage != own or (not own and others & set(path[:-1])):
                continue
            for key, names in CONTEXT_KEYS.items():
                if path[-1] in names and _num(v) is not None:
                    ctx[key] = _num(v)
    return ctx


def stage_dirs(path) -> list[Path]:
    """The stage dirs under `path` (itself if it has metrics.jsonl), in pipeline order."""
    p = Path(path)
    if (p / "metrics.jsonl").is_file():
        return [p]
    subs = [d for d in p.iterdir() if (d / "metrics.jsonl").is_file()] if p.is_dir() else []
    rank = {n: i for i, n in enumerate(STAGE_ORDER)}
    return sorted(subs, key=lambda d: (rank.get(d.name, len(rank)), d.name))


def load_context(stage_dir: Path) -> dict:
    """Hyper-parameters for the doctor's advice from the run's config, if there is one. The
    directory's name only picks the config section to read; whether the history is RL is
    decided from its metrics (`is_rl_history`)."""
    ctx = {}
    for cfg_path in (stage_dir.parent / "config.yaml", stage_dir / "config.yaml"):
        if cfg_path.is_file():
            try:
                import yaml
                ctx.update(_config_context(yaml.safe_load(cfg_path.read_text()), stage_dir.name))
            except Exception:  # a broken config must not stop the doctor
                pass
    return ctx


def doctor_dir(path) -> list[Finding]:
    """Post-hoc diagnosis of a stage dir or a run dir, from metrics.jsonl (+ config.yaml if any)."""
    dirs = stage_dirs(path)
    if not dirs:
        raise SystemExit(f"steprl doctor: no metrics.jsonl in {path} or its stage subdirectories")
    is_run = dirs[0] != Path(path)
    out = []
    for d in dirs:
        for f in diagnose(read_jsonl(d / "metrics.jsonl"), load_context(d), final=True):
            if is_run:
                f.evidence = f"{d.name}: {f.evidence}"
            out.append(f)
    return out


def main_doctor(path, as_json: bool = False) -> int:
    """`steprl doctor PATH [--json]`: print findings; exit status 1 if any is critical."""
    findings = doctor_dir(path)
    n_steps = sum(len(read_jsonl(d / "metrics.jsonl")) for d in stage_dirs(path))
    if not findings:
        print(f"steprl doctor: no problems found ({n_steps} logged steps in {path})")
    for f in findings:
        print(f"{f.severity.upper():8s} {f.code} @ step {f.step}: {f.evidence}\n         -> {f.advice}")
    if as_json:
        print(json.dumps([f.to_dict() for f in findings]))
    return 1 if any(f.severity == "critical" for f in findings) else 0

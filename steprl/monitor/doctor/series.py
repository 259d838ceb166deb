"""What the doctor's rules read and return: a stage's history as finite series (`History`), the
statistics every judgement uses (noise from step-to-step differences, trends, runs of steps), and a
`Finding` with advice scaled to the run's own hyper-parameters.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
INT_KEYS = {"num_generations", "per_device_batch_size", "max_new_tokens", "num_epochs"}
RL_STAGES = {"grpo", "ppo", "rl"}
RL_METRICS = ("reward", "reward_std", "kl")  # logged by RL stages only
# series on the reward's scale: a change of the reward ("reward_changed": {"tool_success": 0.0} on the
# step after which auto-fix dropped the call bonus) makes the steps before it incomparable with the
# steps after
REWARD_SCALED = ("reward", "reward_std", "frac_reward_zero_std")


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


def as_float(v) -> float | None:
    """A float from a JSON value ("nan"/"inf" strings included); None if not a number."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt(x: float) -> str:
    return f"{x:.3g}"


def round3(x: float) -> float:
    return float(f"{x:.3g}")


class History:
    """Cached, finite-only access to the series of one stage; the reward's series only since its
    last change (the `reward_since` step)."""

    def __init__(self, history: list[dict], context: dict):
        self.raw = [e for e in history if isinstance(e, dict)]
        self.ctx = dict(context)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        changes = [e for e in self.raw if isinstance(e.get("reward_changed"), dict)]
        self.reward_since = int(as_float(changes[-1].get("step")) or 0) if changes else None
        for e in changes:  # the reward settings in force now: what the last change set
            self.ctx.update(e["reward_changed"])
        # no config value: fall back to the logged ones (peak lr of the schedule, current kl_coef)
        for key, pick in (("learning_rate", np.max), ("kl_coef", lambda v: v[-1])):
            vals = self.get(key)[1]
            if as_float(self.ctx.get(key)) is None and len(vals) and pick(vals) > 0:
                self.ctx[key] = float(pick(vals))
        self.is_rl = is_rl_history(self.raw, context)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._cache:
            pts = [(int(as_float(e.get("step")) or 0), as_float(e[key])) for e in self.raw if key in e]
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


def noise(y: np.ndarray) -> float:
    """Per-point noise from first differences (robust to trends and outliers)."""
    if len(y) < 3:
        return float(np.std(y)) if len(y) else 0.0
    d = np.diff(y)  # mean absolute deviation: efficient on short series, tolerant of outliers
    return float(np.mean(np.abs(d - np.median(d)))) * math.sqrt(math.pi / 2) / math.sqrt(2)


def smooth(y: np.ndarray, w: int) -> np.ndarray:
    return np.convolve(y, np.ones(w) / w, mode="valid") if len(y) >= w else y


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of consecutive True stretches."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - start))
            start = None
    return out


def tail_run(mask: np.ndarray) -> int:
    """Length of the True stretch that ends at the last point."""
    n = 0
    for m in mask[::-1]:
        if not m:
            break
        n += 1
    return n


def trend(y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line through y: (rise from first to last point, its standard error, the
    residual noise per point)."""
    n, t = len(y), np.arange(len(y), dtype=float)
    slope, icpt = np.polyfit(t, y, 1)
    sigma = float(np.sqrt(((y - (slope * t + icpt)) ** 2).sum() / max(1, n - 2)))
    return float(slope) * (n - 1), sigma / math.sqrt(float(((t - t.mean()) ** 2).sum())) * (n - 1), sigma


def adjust(ctx: dict, changes: list[tuple[str, object, str]]) -> tuple[list[str], dict]:
    """Scale the run's own hyper-parameters: ("learning_rate", fn, generic text) ->
    "learning_rate 5e-05 -> 1e-05" and fix {"learning_rate": 1e-05}; generic text when unknown."""
    parts, fix = [], {}
    for key, fn, generic in changes:
        old = as_float(ctx.get(key))
        if old is None:
            parts.append(generic)
            continue
        new = int(fn(int(old))) if key in INT_KEYS else round3(fn(old))
        fix[key] = new
        parts.append(f"{key} {fmt(old)} -> {fmt(new)}")
    return parts, fix


def kl_up(factor: float, floor: float = 0.04):
    return lambda k: k * factor if k > 0 else floor

"""Training doctor: turns a metrics history into findings with advice.

The rules encode the monitoring and troubleshooting theory of the course (see BRIEF.md):
KL healthy in 0.01-0.1, >0.5 is an explosion, <0.001 means the policy is not moving; reward
should rise; accuracy up with quality down means a single-objective reward; flat SFT loss means
a too-low learning rate or bad data. Each rule is a small function over the history alone, so the
same code runs live (inside the trainer, on a growing history) and post hoc (`steprl doctor` on a
hand-written metrics.jsonl). Advice is scaled to the run's own hyper-parameters when known, and a
machine-applicable `fix` dict lets an auto-fix loop act on it.

The rules live by what they watch: stability (NaN, memory, KL, the sampler), fit (supervised
loss), reward (RL learning and exploration), tool_use (calls and turns); series holds what they
share. This module runs them over a history or a run directory.

Rules must stay quiet on healthy runs: every judgement compares a change against the series' own
noise (estimated from step-to-step differences) and asks for a sustained pattern, never one blip.
Rewards are compared only on one scale: after a change of the reward mid-run (the trainer's
"reward_changed" on a step) the reward's series start again.
"""
from __future__ import annotations

import json
from pathlib import Path

from steprl.monitor.doctor.fit import rule_loss_not_decreasing, rule_overfitting
from steprl.monitor.doctor.reward import (rule_entropy_collapse, rule_quality_drop, rule_reward_collapse,
                                          rule_reward_stagnation, rule_zero_variance_groups)
from steprl.monitor.doctor.series import SEVERITY_RANK, Finding, History, as_float
from steprl.monitor.doctor.stability import (rule_kl_explosion, rule_kl_too_low, rule_nan_loss,
                                             rule_out_of_memory, rule_sampler_mismatch)
from steprl.monitor.doctor.tool_use import rule_calls_beyond_needed, rule_tool_use_collapse, rule_turn_limit

__all__ = ["Finding", "History", "RULES", "STAGE_ORDER", "diagnose", "doctor_dir", "load_context", "main_doctor", "read_jsonl",
           "stage_dirs"]

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


RULES = [rule_nan_loss, rule_out_of_memory, rule_kl_explosion, rule_kl_too_low, rule_sampler_mismatch,
         rule_reward_stagnation, rule_reward_collapse, rule_quality_drop, rule_loss_not_decreasing,
         rule_overfitting, rule_zero_variance_groups, rule_entropy_collapse, rule_tool_use_collapse, rule_turn_limit,
         rule_calls_beyond_needed]


def diagnose(history: list[dict], context: dict | None = None, final: bool = False) -> list[Finding]:
    """All findings for one stage's history, most severe first. `final=True` means the run is
    over, which allows judgements on shorter evidence (e.g. a drop seen in only the last eval)."""
    h = History(history, context or {})
    out = [f for rule in RULES for f in rule(h, final)]
    return sorted(out, key=lambda f: (-SEVERITY_RANK[f.severity], f.step))


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
                if path[-1] in names and as_float(v) is not None:
                    ctx[key] = as_float(v)
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

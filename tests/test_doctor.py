"""The doctor must fire on each documented failure with the right severity, and stay quiet on
healthy (noisy) runs, live on every prefix as well as post hoc."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from steprl.monitor import Finding, MetricsLogger, diagnose, doctor_dir
from steprl.monitor.doctor import History, main_doctor

# key -> (curve over u in [0, 1], noise sd). Values are clamped at 0 (all these metrics are >= 0).
GRPO = {
    "reward": (lambda u: 0.2 + 0.6 * u, 0.05),
    "reward_std": (lambda u: 0.35 - 0.1 * u, 0.02),
    "accuracy": (lambda u: 0.15 + 0.6 * u, 0.04),
    "kl": (lambda u: 0.01 + 0.05 * u, 0.003),
    "entropy": (lambda u: 1.2 - 0.4 * u, 0.03),
    "loss": (lambda u: 0.05, 0.02),
    "grad_norm": (lambda u: 0.5, 0.1),
    "completions/mean_length": (lambda u: 120 - 20 * u, 8),
    "completions/clipped_ratio": (lambda u: 0.03, 0.01),
    "tools/call_frequency": (lambda u: 0.8, 0.04),
    "tools/failure_frequency": (lambda u: 0.1, 0.02),
    "frac_reward_zero_std": (lambda u: 0.2, 0.05),
    "turns/mean": (lambda u: 1.8 + 0.2 * u, 0.05),
    "format": (lambda u: 0.95, 0.02),
}
SFT = {"loss": (lambda u: 0.6 + 1.4 * math.exp(-4 * u), 0.04)}
PRETRAIN = {"loss": (lambda u: 2.0 + 2.5 * math.exp(-5 * u), 0.06)}


def make(curves, n=100, seed=0, evals=None, eval_every=10):
    """A history: one line per step from `curves`, plus eval lines every `eval_every` steps."""
    rng = np.random.default_rng(seed)
    hist = []
    for i in range(n):
        u = i / (n - 1)
        hist.append({"step": i, **{k: max(0.0, f(u) + rng.normal(0, sd)) for k, (f, sd) in curves.items()}})
        if evals and i % eval_every == eval_every - 1:
            hist.append({"step": i, **{k: max(0.0, f(u) + rng.normal(0, sd)) for k, (f, sd) in evals.items()}})
    return hist


def codes(findings, min_severity="info"):
    rank = {"info": 0, "warning": 1, "critical": 2}
    return {f.code: f.severity for f in findings if rank[f.severity] >= rank[min_severity]}


def only(findings, code) -> Finding:
    hits = [f for f in findings if f.code == code]
    assert len(hits) == 1, findings
    return hits[0]


GRPO_EVAL = {"eval/accuracy": (lambda u: 0.15 + 0.55 * u, 0.03)}
SFT_EVAL = {"eval/loss": (lambda u: 0.7 + 1.4 * math.exp(-4 * u), 0.02)}
HEALTHY = {"grpo": (GRPO, GRPO_EVAL, "grpo"), "sft": (SFT, SFT_EVAL, "sft"),
           "pretrain": (PRETRAIN, {"eval/loss": (lambda u: 2.1 + 2.5 * math.exp(-5 * u), 0.03)}, "pretrain")}


@pytest.mark.parametrize("kind", list(HEALTHY))
@pytest.mark.parametrize("seed", range(4))
def test_healthy_histories_raise_nothing(kind, seed):
    curves, evals, stage = HEALTHY[kind]
    hist = make(curves, seed=seed, evals=evals)
    ctx = {"stage": stage, "learning_rate": 1e-5, "max_turns": 3}
    assert codes(diagnose(hist, ctx, final=True), "warning") == {}
    assert codes(diagnose(hist, {}, final=True), "warning") == {}  # stage guessed from metrics
    for i in range(1, len(hist) + 1, 3):  # the live doctor sees every prefix
        assert codes(diagnose(hist[:i], ctx), "warning") == {}, i


def test_short_and_missing_metrics_are_fine():
    assert diagnose([]) == []
    assert diagnose([{"step": 0}, {"step": 1, "loss": 2.0}]) == []
    assert diagnose([{"step": 0, "kl": 0.9}]) == []  # one point is a blip
    assert diagnose(make(SFT, n=5), final=True) == []


def test_kl_explosion_critical_with_scaled_fix():
    hist = make({**GRPO, "kl": (lambda u: 0.03 if u < 0.6 else 0.8, 0.02)})
    f = only(diagnose(hist, {"learning_rate": 5e-5, "kl_coef": 0.05}), "kl_explosion")
    assert f.severity == "critical" and 59 <= f.step <= 62
    assert "learning_rate 5e-05 -> 1e-05" in f.advice and "kl_coef 0.05 -> 0.1" in f.advice
    assert f.fix["learning_rate"] == 1e-5 and f.fix["kl_coef"] == 0.1 and f.fix["rollback"] is True
    generic = only(diagnose(hist), "kl_explosion")  # no context: generic advice, still a fix
    assert "learning rate" in generic.advice and "learning_rate" not in generic.fix


def test_kl_warning_band_and_single_blip():
    hist = make({**GRPO, "kl": (lambda u: 0.03 if u < 0.5 else 0.25, 0.02)})
    assert only(diagnose(hist), "kl_explosion").severity == "warning"
    blip = make(GRPO)
    blip[50]["kl"] = 2.0
    assert "kl_explosion" not in codes(diagnose(blip, final=True))


def test_kl_single_huge_spike_is_critical():
    """One step at KL 39 (seen in a broken run: the next step, measured against the moved policy,
    looked calm) is an explosion; a blip of 2.0 is not (test above)."""
    hist = make(GRPO)
    hist[30]["kl"] = 39.4
    f = only(diagnose(hist, {"learning_rate": 2e-3, "kl_coef": 0.001}, final=True), "kl_explosion")
    assert f.severity == "critical" and f.step == hist[30]["step"] and f.fix["rollback"] is True
    assert "1 consecutive logged step from" in f.evidence and "peak 39.4" in f.evidence
    first = [{"step": 1, "kl": 3.4}]  # live, after the very first step
    assert only(diagnose(first), "kl_explosion").severity == "critical"


def test_kl_too_low():
    hist = make({**GRPO, "kl": (lambda u: 0.0003, 0.0001)})
    assert only(diagnose(hist), "kl_too_low").severity == "info"
    frozen = make({**GRPO, "kl": (lambda u: 0.0, 0.0)})
    f = only(diagnose(frozen, {"kl_coef": 0.05}), "kl_too_low")
    assert f.severity == "warning" and "not moving" in f.evidence
    assert "kl_too_low" not in codes(diagnose(frozen, {"kl_coef": 0.0}))  # KL not measured


def test_sampler_mismatch():
    """A healthy bf16 gap (~0.003) says nothing; a gap of 0.2 (a stale or miscomputing sampler) warns."""
    assert "sampler_mismatch" not in codes(diagnose(make({**GRPO, "logp_gap": (lambda u: 0.003, 0.001)})))
    f = only(diagnose(make({**GRPO, "logp_gap": (lambda u: 0.2, 0.01)})), "sampler_mismatch")
    assert f.severity == "warning" and "rollout.precision" in f.advice


def test_reward_stagnation_with_source_advice():
    flat = {**GRPO, "reward": (lambda u: 0.3, 0.03), "accuracy": (lambda u: 0.3, 0.03)}
    ctx = {"learning_rate": 1e-5, "kl_coef": 0.1}
    f = only(diagnose(make(flat), ctx, final=True), "reward_stagnation")
    assert f.severity == "warning"
    assert f.fix == {"learning_rate": 5e-5, "kl_coef": 0.05}
    assert "learning_rate 1e-05 -> 5e-05" in f.advice and "kl_coef 0.1 -> 0.05" in f.advice
    live = [diagnose(make(flat)[:i], ctx) for i in range(40, 101, 5)]
    assert any("reward_stagnation" in codes(fs) for fs in live)  # the live doctor sees it too
    # a plateau after learning is convergence, not stagnation
    plateau = {**GRPO, "reward": (lambda u: 0.2 + 0.6 * min(1.0, 3 * u), 0.03)}
    assert "reward_stagnation" not in codes(diagnose(make(plateau), final=True))


def test_reward_collapse():
    up_down = lambda u: 0.2 + 1.2 * u if u < 0.5 else 0.8 - 1.2 * (u - 0.5)  # noqa: E731
    f = only(diagnose(make({**GRPO, "reward": (up_down, 0.04)}), final=True), "reward_collapse")
    assert f.severity == "critical" and 40 <= f.step <= 60 and f.fix["rollback_step"] == f.step
    partial = lambda u: 0.2 + 1.2 * u if u < 0.5 else 0.8 - 0.5 * (u - 0.5)  # noqa: E731
    assert only(diagnose(make({**GRPO, "reward": (partial, 0.04)}), final=True),
                "reward_collapse").severity == "warning"


# GRPO at lr 2e-4 on SmolLM2 from a cold start of 0.92 held-out (calc, 8 prompts x 4, all-linear
# LoRA): the reward only fell. The post-hoc doctor used to call it stagnation and advise 5x the
# learning rate.
FELL_REWARD = [0.925, 0.791, 0.769, 0.613, 0.922, 0.703, 0.966, 0.613, 0.903, 0.934, 0.531, 0.559, 0.316, 0.434,
               0.222, 0.269, 0.603, 0.253, 0.488, 0.403, 0.209, 0.734, 0.612, 0.366, 0.547, 0.728, 0.087]
FELL_STD = [0.291, 0.372, 0.284, 0.412, 0.303, 0.297, 0.216, 0.406, 0.269, 0.206, 0.13, 0.081, 0.069, 0.302,
            0.091, 0.15, 0.081, 0.178, 0.157, 0.055, 0.156, 0.284, 0.251, 0.175, 0.121, 0.438, 0.129]


def test_reward_that_falls_from_the_start_is_a_collapse_not_stagnation():
    ctx = {"stage": "grpo", "learning_rate": 2e-4, "kl_coef": 0.04}
    real = [{"step": i + 1, "reward": r, "reward_std": sd} for i, (r, sd) in enumerate(zip(FELL_REWARD, FELL_STD))]
    f = only(diagnose(real, ctx, final=True), "reward_collapse")
    assert f.severity == "critical" and "fell from the start" in f.evidence
    assert f.fix == {"learning_rate": 5e-5, "kl_coef": 0.08, "rollback": True, "rollback_step": 1}
    assert "reward_stagnation" not in codes(diagnose(real, ctx, final=True))
    assert "reward_collapse" in codes(diagnose(real[:20], ctx))  # live, at the first step it judges
    assert "reward_collapse" not in codes(diagnose(real[:12], ctx, final=True))  # not yet below the start
    # synthetic: a slow fall from a strong start is caught; a noisy plateau there is not
    fall = {**GRPO, "reward": (lambda u: 0.8 - 0.3 * u, 0.1), "accuracy": (lambda u: 0.8 - 0.3 * u, 0.1)}
    assert "reward_collapse" in codes(diagnose(make(fall), ctx, final=True), "warning")
    plateau = {**GRPO, "reward": (lambda u: 0.8, 0.15), "accuracy": (lambda u: 0.8, 0.1)}
    for seed in range(4):
        hist = make(plateau, seed=seed)
        assert "reward_collapse" not in codes(diagnose(hist, ctx, final=True))
        assert not any("reward_collapse" in codes(diagnose(hist[:i], ctx)) for i in range(20, 101, 3))


# GRPO on the credit task with auto-fix (runs/exp-credit/credit-grpo-autofix-s2): turn_limit's fix
# dropped the +0.1 per call after step 12, and the reward fell with the bonus, not with the policy
# (accuracy 0.25 before, 0.19 after). Without the trainer's "reward_changed" mark the doctor read
# the fall as a collapse (critical) and auto-fix rolled the run back and cut its learning rate.
DROPPED_BONUS = {
    "reward": [0.377, 0.225, 0.403, 0.295, 0.483, 0.547, 0.412, 0.487, 0.495, 0.488, 0.42, 0.464, 0.3, 0.212,
               0.134, 0.016, 0.194, 0.056, 0.228, 0.037],
    "reward_std": [0.486, 0.302, 0.446, 0.369, 0.424, 0.411, 0.383, 0.368, 0.356, 0.309, 0.305, 0.221, 0.265,
                   0.281, 0.226, 0.228, 0.26, 0.245, 0.407, 0.226],
    "accuracy": [0.281, 0.125, 0.266, 0.172, 0.328, 0.359, 0.219, 0.25, 0.281, 0.281, 0.219, 0.25, 0.328, 0.25,
                 0.188, 0.078, 0.234, 0.094, 0.266, 0.094]}


def test_a_changed_reward_is_not_compared_with_the_old_one():
    ctx = {"stage": "grpo", "learning_rate": 2e-4, "kl_coef": 0.02}
    rows = [{"step": i + 1, **{k: v[i] for k, v in DROPPED_BONUS.items()}} for i in range(20)]
    misread = codes(diagnose(rows, ctx, final=True))
    assert misread.get("reward_collapse") == "critical"  # the misreading ...
    assert "reward_stagnation" not in misread  # ... but never also called flat: its trend falls
    marked = rows[:11] + [dict(rows[11], reward_changed={"tool_success": 0.0})] + rows[12:]
    found = codes(diagnose(marked, ctx, final=True))
    assert "reward_collapse" not in found and "reward_stagnation" not in found
    # only the reward's own series are cut: the steps after the change still count for accuracy
    h = History(marked, ctx)
    assert list(h.get("reward")[0]) == list(range(13, 21)) and len(h.get("accuracy")[0]) == 20
    # a real fall after the change is still seen
    fall = [{"step": s, "reward": 0.5 if s <= 22 else 0.05, "reward_std": 0.3, "accuracy": 0.3 if s <= 22 else 0.05}
            for s in range(13, 33)]
    assert "reward_collapse" in codes(diagnose(marked[:12] + fall, ctx, final=True))


# PPO from the demo_ppo cold start (SFT 0.97 held-out): 40 steps with 84-94% of sampled episodes
# correct from the first. A flat reward there is a plateau near the ceiling; the warning's fix (5x
# the learning rate) would risk what the cold start gave.
NEAR_CEILING = {
    "reward": [0.97, 0.969, 0.891, 1.031, 0.998, 1.019, 0.95, 0.833, 0.984, 0.966, 0.889, 0.892, 1.006, 0.972, 1.005,
               0.998, 1.0, 1.034, 0.933, 0.931, 0.969, 0.984, 1.033, 0.969, 0.969, 0.953, 0.917, 0.919, 0.952, 0.995,
               0.98, 0.834, 0.947, 1.031, 0.945, 0.938, 0.972, 0.973, 0.998, 1.003],
    "reward_std": [0.376, 0.35, 0.42, 0.27, 0.32, 0.282, 0.377, 0.469, 0.334, 0.36, 0.422, 0.415, 0.294, 0.342,
                   0.299, 0.32, 0.315, 0.256, 0.394, 0.398, 0.35, 0.329, 0.264, 0.35, 0.35, 0.366, 0.407, 0.403,
                   0.372, 0.331, 0.349, 0.466, 0.384, 0.27, 0.389, 0.382, 0.342, 0.338, 0.32, 0.304],
    "accuracy": [0.891, 0.875, 0.797, 0.938, 0.906, 0.922, 0.859, 0.75, 0.891, 0.875, 0.797, 0.797, 0.906, 0.875,
                 0.906, 0.906, 0.906, 0.938, 0.844, 0.844, 0.875, 0.891, 0.938, 0.875, 0.875, 0.859, 0.828, 0.828,
                 0.859, 0.906, 0.891, 0.75, 0.859, 0.938, 0.859, 0.844, 0.875, 0.875, 0.906, 0.906]}


def test_a_flat_reward_near_the_ceiling_is_info_without_a_fix():
    ctx = {"stage": "ppo", "learning_rate": 2e-4, "kl_coef": 0.02}
    rows = [{"step": i + 1, **{k: v[i] for k, v in NEAR_CEILING.items()}} for i in range(40)]
    f = only(diagnose(rows, ctx, final=True), "reward_stagnation")
    assert f.severity == "info" and f.fix is None and "87% of sampled episodes" in f.evidence
    # the same rewards with a third of the episodes correct: a run that fails to learn
    low = [dict(r, accuracy=r["accuracy"] - 0.55) for r in rows]
    f = only(diagnose(low, ctx, final=True), "reward_stagnation")
    assert f.severity == "warning" and f.fix == {"learning_rate": 1e-3, "kl_coef": 0.01}


def test_quality_drop():
    hist = make({**GRPO, "completions/clipped_ratio": (lambda u: 0.02 if u < 0.5 else 0.5, 0.02),
                 "rewards/format": (lambda u: 0.9 if u < 0.5 else 0.4, 0.03)})
    f = only(diagnose(hist, {"kl_coef": 0.05}), "quality_drop")
    assert f.severity == "warning" and "clipped_ratio" in f.evidence and "rewards/format" in f.evidence
    assert f.fix == {"kl_coef": 0.1} and "combined reward" in f.advice
    longer = make({**GRPO, "completions/mean_length": (lambda u: 100 + 300 * u, 8)})
    assert "mean_length per turn" in only(diagnose(longer), "quality_drop").evidence
    # episodes 2.5x longer because they take 2.5x the turns (PPO on the credit task: 1.8 -> 3.4 turns,
    # 40 -> 105 tokens) are the calls RL taught, not verbose turns
    more_turns = make({**GRPO, "completions/mean_length": (lambda u: 40 + 110 * u, 3),
                       "turns/mean": (lambda u: 1.2 + 2.8 * u, 0.05)})
    assert "quality_drop" not in codes(diagnose(more_turns))
    assert "quality_drop" in codes(diagnose([{k: v for k, v in e.items() if k != "turns/mean"} for e in more_turns]))


def test_loss_not_decreasing_flat_and_diverging():
    flat = make({"loss": (lambda u: 1.5, 0.03)}, n=60)
    f = only(diagnose(flat, {"stage": "sft", "learning_rate": 2e-5}), "loss_not_decreasing")
    assert f.severity == "warning" and f.fix["learning_rate"] == 6e-5
    up = make({"loss": (lambda u: 1.0 + 2.0 * u, 0.05)}, n=60)
    assert only(diagnose(up), "loss_not_decreasing").severity == "critical"
    assert "loss_not_decreasing" not in codes(diagnose(make(GRPO)))  # RL loss need not fall


def test_overfitting_sft_and_rl():
    evals = {"eval/loss": (lambda u: 2.0 - 2.5 * u if u < 0.4 else 1.0 + 1.5 * (u - 0.4), 0.01)}
    hist = make({"loss": (lambda u: 2.0 - 1.5 * u, 0.03)}, evals=evals)
    f = only(diagnose(hist, {"weight_decay": 0.0, "num_epochs": 3}), "overfitting")
    assert f.severity == "warning" and 30 <= f.step <= 50
    assert f.fix["weight_decay"] == 0.01 and f.fix["num_epochs"] <= 2
    rl_evals = {"eval/accuracy": (lambda u: 0.2 + u if u < 0.4 else 0.6 - 0.8 * (u - 0.4), 0.01)}
    assert only(diagnose(make(GRPO, evals=rl_evals)), "overfitting").severity == "warning"


def test_out_of_memory_and_nan():
    hist = make(GRPO, n=40) + [{"step": 40, "event": "oom"}]
    f = only(diagnose(hist, {"num_generations": 8, "per_device_batch_size": 4, "max_new_tokens": 512}),
             "out_of_memory")
    assert f.severity == "critical" and f.step == 40
    assert f.fix == {"num_generations": 4, "per_device_batch_size": 2, "max_new_tokens": 256,
                     "gradient_checkpointing": True}
    sft = make(SFT, n=40)
    sft[30]["loss"] = float("nan")
    f = only(diagnose(sft), "nan_loss")
    assert f.severity == "critical" and f.step == 30
    sft[30]["loss"] = "inf"  # hand-written files
    assert only(diagnose(sft), "nan_loss").step == 30
    sft[30]["event"] = "nan_skip"  # one batch skipped by the trainer: the run recovered
    assert only(diagnose(sft), "nan_loss").severity == "warning"
    # GRPO/PPO skip a non-finite minibatch and log the finite ones they applied: still a finding
    grpo = make(GRPO, n=40)
    grpo[12].update({"event": "nan_skip", "skipped_minibatches": 1})
    f = only(diagnose(grpo, {"learning_rate": 1e-5}), "nan_loss")
    assert (f.severity, f.step) == ("warning", grpo[12]["step"]) and "skipped" in f.evidence
    assert f.fix["learning_rate"] == 1e-6 and f.fix["rollback"]


def test_zero_variance_groups():
    hist = make({**GRPO, "frac_reward_zero_std": (lambda u: 0.8, 0.05)})
    f = only(diagnose(hist, {"num_generations": 4}), "zero_variance_groups")
    assert f.severity == "warning" and f.fix["num_generations"] == 8
    solved = make({**GRPO, "frac_reward_zero_std": (lambda u: 0.9, 0.03), "accuracy": (lambda u: 0.97, 0.01)})
    assert only(diagnose(solved), "zero_variance_groups").severity == "info"


def test_entropy_and_tool_use_collapse():
    hist = make({**GRPO, "entropy": (lambda u: 1.2 * math.exp(-6 * u), 0.01)})
    assert only(diagnose(hist), "entropy_collapse").severity == "warning"
    tools = make({**GRPO, "tools/call_frequency": (lambda u: 0.8 if u < 0.6 else 0.0, 0.01)})
    f = only(diagnose(tools), "tool_use_collapse")
    assert f.severity == "warning" and 58 <= f.step <= 64 and "failure_frequency" in f.evidence


def test_turn_limit_when_episodes_stop_answering():
    """Calls that fill every turn while fewer episodes answer (a hacked per-call bonus) warn; a
    task that needs every turn and still answers does not, nor a run with no known max_turns."""
    hacked = make({**GRPO, "turns/mean": (lambda u: min(3.9, 2.0 + 4 * u), 0.05),
                   "format": (lambda u: max(0.7, 0.97 - 0.6 * u), 0.04)}, n=40)
    f = only(diagnose(hacked, {"max_turns": 4}, final=True), "turn_limit")
    assert f.severity == "warning" and 18 <= f.step <= 26 and "max_turns 4" in f.evidence
    assert f.fix == {"tool_success": 0.0}  # auto-fix drops the call bonus
    unpaid = only(diagnose(hacked, {"max_turns": 4, "tool_success": 0.0}, final=True), "turn_limit")
    assert unpaid.fix is None and "tool_success" not in unpaid.advice  # no bonus to drop
    needs_every_turn = make({**GRPO, "turns/mean": (lambda u: min(3.9, 2.0 + 4 * u), 0.05)}, n=40)
    assert "turn_limit" not in codes(diagnose(needs_every_turn, {"max_turns": 4}, final=True))
    assert "turn_limit" not in codes(diagnose(hacked, {}, final=True))
    assert "turn_limit" not in codes(diagnose(hacked, {"max_turns": 8}, final=True))  # far from its limit


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_main_doctor_json_contract(tmp_path, capsys):
    bad = tmp_path / "run" / "grpo"
    bad.mkdir(parents=True)
    lines = [f'{{"step": {i}, "kl": {0.02 if i < 10 else 0.9}, "reward": 0.5}}' for i in range(20)]
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n{broken\n")
    assert main_doctor(bad, as_json=True) == 1
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kl = [f for f in out if f["code"] == "kl_explosion"][0]
    assert {"code", "severity", "step", "evidence", "advice"} <= set(kl) and kl["severity"] == "critical"
    assert kl["step"] == 10
    # run dir: evidence prefixed with the stage name
    assert doctor_dir(tmp_path / "run")[0].evidence.startswith("grpo: ")

    good = tmp_path / "sft"
    _write(good / "metrics.jsonl", make(SFT, n=50))
    assert main_doctor(good, as_json=True) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == []
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main_doctor(tmp_path / "nowhere")


def test_doctor_reads_config_context(tmp_path):
    run = tmp_path / "run"
    _write(run / "grpo" / "metrics.jsonl", make({**GRPO, "kl": (lambda u: 0.03 if u < 0.6 else 0.8, 0.02),
                                                 "turns/mean": (lambda u: min(3.9, 2.0 + 4 * u), 0.05),
                                                 "format": (lambda u: max(0.7, 0.97 - 0.6 * u), 0.04)}))
    (run / "config.yaml").write_text("name: run\nsft: {learning_rate: 2.0e-4}\n"
                                     "grpo:\n  learning_rate: 5.0e-5\n  kl_coef: 0.05\n  max_turns: 4\n"
                                     "  reward: {tool_success: 0.0}\n"
                                     "ppo: {reward: {tool_success: 0.1}}\n"
                                     "eval: {max_turns: 2}\n")
    f = only(doctor_dir(run), "kl_explosion")
    assert f.fix["learning_rate"] == 1e-5 and f.fix["kl_coef"] == 0.1
    # grpo's max_turns (4), not eval's (2, where turns of 2.0 at the start would already be at the limit)
    turns = only(doctor_dir(run), "turn_limit")
    assert "(max_turns 4)" in turns.evidence and turns.fix is None  # grpo's reward pays no calls (ppo's does)


def test_metrics_logger(tmp_path, capsys):
    d = tmp_path / "grpo"
    log = MetricsLogger(d, "grpo", report_to=("tensorboard",), doctor_context={"kl_coef": 0.05})
    got = []
    for i in range(8):
        got += log.log({"kl": torch.tensor(0.9), "reward": np.float32(0.5), "hist": [1, 2]}, step=i)
    assert [f.code for f in got] == ["kl_explosion"] and got[0].fix["kl_coef"] == 0.1
    assert "kl_explosion" in capsys.readouterr().out
    log.close()
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "kl": pytest.approx(0.9), "reward": 0.5} and len(rows) == 8
    assert len((d / "doctor.jsonl").read_text().splitlines()) == 1
    assert any((d / "tb").iterdir())

    # resume: history reloaded, re-run steps dropped, the known finding not repeated
    log = MetricsLogger(d, "grpo", report_to=())
    assert len(log.history) == 8
    log.truncate_after(5)
    assert [r["step"] for r in log.history] == [0, 1, 2, 3, 4]
    assert log.log({"kl": 0.9}, step=5) == []
    log.log({"event": "oom"}, step=6)
    log.close()
    assert [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()] == list(range(7))


def test_logger_escalates_and_warns_once_for_missing_sink(tmp_path, capsys):
    sink = "wandb" if importlib.util.find_spec("wandb") is None else "nonexistent_sink"
    log = MetricsLogger(tmp_path, "grpo", report_to=(sink,))
    found = [f for i in range(6) for f in log.log({"kl": 0.3 if i < 3 else 0.9}, step=i)]
    log.close()
    assert [(f.code, f.severity) for f in found] == [("kl_explosion", "warning"), ("kl_explosion", "critical")]
    assert capsys.readouterr().out.count(f"report_to '{sink}'") == 1


@pytest.mark.parametrize("name", ["grpo", "my_experiment", "sft"])
def test_rl_or_not_is_decided_from_the_metrics_not_the_folder_name(tmp_path, name):
    """A healthy GRPO history (surrogate loss noisy around 0) gets the RL rules whatever its
    directory is called, and an SFT history saved in a folder named grpo/ gets the SFT ones."""
    rl = tmp_path / name
    rl.mkdir()
    (rl / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in make(GRPO, seed=3)))
    assert "loss_not_decreasing" not in codes(doctor_dir(rl))
    flat_sft = tmp_path / "grpo_named_sft" / "grpo"
    flat_sft.mkdir(parents=True)
    flat = make({"loss": (lambda u: 1.5, 0.02)}, seed=4)
    (flat_sft / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in flat))
    assert "loss_not_decreasing" in codes(doctor_dir(flat_sft))


def test_calls_beyond_the_solution_while_a_call_bonus_pays():
    """tools/calls_beyond_needed rising to 0.6 an episode: a warning that drops the bonus while one is
    paid, info without one, quiet when the extra calls stay rare or were there from the start."""
    over = {**GRPO, "tools/calls_beyond_needed": (lambda u: min(0.6, 1.5 * u), 0.05)}
    f = only(diagnose(make(over, n=20), {"tool_success": 0.1}), "calls_beyond_needed")
    assert f.severity == "warning" and f.fix == {"tool_success": 0.0} and "pay 0.1 each" in f.evidence
    assert only(diagnose(make(over, n=20), {"tool_success": 0.0}), "calls_beyond_needed").fix is None
    assert only(diagnose(make(over, n=20)), "calls_beyond_needed").severity == "info"
    rare = {**GRPO, "tools/calls_beyond_needed": (lambda u: 0.1 * u, 0.03)}
    always = {**GRPO, "tools/calls_beyond_needed": (lambda u: 0.6, 0.05)}
    for quiet in (rare, always):
        assert "calls_beyond_needed" not in codes(diagnose(make(quiet, n=20), {"tool_success": 0.1}))
    # live, it fires within a few steps of the extra calls passing 0.3 an episode (step 4 of 20 here)
    live = [codes(diagnose(make(over, n=20)[:i], {"tool_success": 0.1})) for i in range(4, 21)]
    first = next(i for i, c in zip(range(4, 21), live) if "calls_beyond_needed" in c)
    assert 5 <= first <= 8

import math

import pytest
import torch

from steprl.algos import aggregate_loss
from steprl.config import GRPOConfig, PPOConfig
from steprl.monitor.autofix import AutoFixer, doctor_context, fixable_settings, restore_settings
from steprl.monitor.doctor import Finding


def fixer():
    model = torch.nn.Linear(2, 1)
    return model, AutoFixer(model, GRPOConfig(learning_rate=5e-5, kl_coef=0.05, micro_batch_size=8,
                                         num_generations=8, max_new_tokens=512))


def test_kl_explosion_lowers_lr_raises_kl_and_rolls_back():
    model, fx = fixer()
    fx.snapshot(step=3)
    good = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(10.0)  # the "exploded" update
    f = Finding("kl_explosion", "critical", 5, "kl 0.9", "lower lr",
                {"learning_rate": 1e-5, "kl_coef": 0.1, "rollback": True})
    actions = fx.apply([f], step=5)
    assert fx.settings.learning_rate == 1e-5 and fx.settings.kl_coef == 0.1
    assert torch.equal(model.weight, good) and fx.rolled_back
    assert len(actions) == 1 and actions[0].severity == "info"
    assert "learning_rate 5e-05 -> 1e-05" in actions[0].evidence and "step 3" in actions[0].evidence


def test_apply_leaves_out_of_memory_to_the_ladder():
    """The doctor's OOM finding halves everything at once; auto-fix instead takes one rung of
    shrink_for_oom per OOM (handle_oom), so apply must not act on it too."""
    _, fx = fixer()
    f = Finding("out_of_memory", "critical", 2, "oom", "smaller",
                {"num_generations": 4, "per_device_batch_size": 4, "max_new_tokens": 256,
                 "gradient_checkpointing": True})
    assert fx.apply([f], step=2) == []
    k = fx.settings
    assert (k.micro_batch_size, k.num_generations, k.max_new_tokens, k.gradient_checkpointing) == (8, 8, 512, False)


def test_doctor_context_follows_the_fixes():
    _, fx = fixer()
    fx.apply([Finding("kl_explosion", "critical", 5, "", "", {"learning_rate": 1e-5, "kl_coef": 0.1})], step=5)
    fx.shrink_for_oom(step=6)
    assert doctor_context(fx.settings) == {"learning_rate": 1e-5, "kl_coef": 0.1, "num_generations": 8,
                                     "per_device_batch_size": 4, "max_new_tokens": 512, "max_turns": 3,
                                     "tool_success": 0.1}


def test_turn_limit_fix_drops_the_call_bonus():
    _, fx = fixer()
    turn_limit = Finding("turn_limit", "warning", 9, "", "", {"tool_success": 0.0})
    actions = fx.apply([turn_limit], step=9)
    assert fx.settings.reward.tool_success == 0.0 and "reward.tool_success 0.1 -> 0" in actions[0].evidence
    assert doctor_context(fx.settings)["tool_success"] == 0.0
    assert fx.apply([turn_limit], step=10) == []  # already off: no second action


def test_a_checkpoint_keeps_what_auto_fix_changed():
    _, fx = fixer()
    fx.apply([Finding("turn_limit", "warning", 9, "", "", {"tool_success": 0.0}),
              Finding("kl_explosion", "critical", 9, "", "", {"learning_rate": 1e-5})], step=9)
    saved = fixable_settings(fx.settings)
    assert saved["tool_success"] == 0.0 and saved["learning_rate"] == 1e-5
    resumed = GRPOConfig(learning_rate=5e-5)  # the config as written
    restore_settings(resumed, saved)
    assert resumed.reward.tool_success == 0.0 and resumed.learning_rate == 1e-5
    assert fixable_settings(resumed) == saved and not hasattr(resumed, "tool_success")


def test_oom_ladder_one_rung_per_oom_in_order():
    fx = AutoFixer(torch.nn.Linear(2, 1), GRPOConfig(learning_rate=1e-4, kl_coef=0.05, micro_batch_size=2,
                                                num_generations=8, max_new_tokens=40))
    seen = []
    while (action := fx.shrink_for_oom(step=1)) is not None:
        k = fx.settings
        seen.append((k.micro_batch_size, k.num_generations, k.max_new_tokens, k.gradient_checkpointing))
        assert action.code == "out_of_memory" and action.severity == "info"
    assert seen == [(1, 8, 40, False), (1, 4, 40, False), (1, 2, 40, False), (1, 2, 20, False),
                    (1, 2, 16, False), (1, 2, 16, True)]


def test_info_findings_and_findings_without_fix_change_nothing():
    _, fx = fixer()
    assert fx.apply([Finding("kl_too_low", "info", 1, "", "", {"learning_rate": 1.0}),
                     Finding("entropy_collapse", "warning", 1, "", "")], step=1) == []
    assert fx.settings.learning_rate == 5e-5


def test_adaptive_kl_moves_toward_target():
    _, fx = fixer()
    before = fx.settings.kl_coef
    fx.adapt_kl(kl=0.5, n_samples=100)  # KL far above the 0.05 target: coefficient rises
    assert fx.settings.kl_coef > before
    high = fx.settings.kl_coef
    fx.adapt_kl(kl=0.001, n_samples=100)
    assert fx.settings.kl_coef < high


def test_oom_ladder_never_grows_a_size():
    """A small PPO run (1 generation, 8 new tokens) is already below the ladder's floors
    (num_generations >= 2, max_new_tokens >= 16): only the micro-batch and checkpointing move."""
    fx = AutoFixer(torch.nn.Linear(2, 1), GRPOConfig(learning_rate=1e-4, kl_coef=0.05, micro_batch_size=4,
                                                num_generations=1, max_new_tokens=8))
    seen = []
    while fx.shrink_for_oom(step=1) is not None:
        k = fx.settings
        seen.append((k.micro_batch_size, k.num_generations, k.max_new_tokens, k.gradient_checkpointing))
    assert seen == [(2, 1, 8, False), (1, 1, 8, False), (1, 1, 8, True)]


def test_rollback_restores_every_module_given():
    policy, value = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    fx = AutoFixer([policy, value], PPOConfig(learning_rate=1e-4, kl_coef=0.05, micro_batch_size=4, num_generations=1, max_new_tokens=8))
    fx.snapshot(step=1)
    good = [policy.weight.detach().clone(), value.weight.detach().clone()]
    with torch.no_grad():
        policy.weight.add_(1.0)
        value.weight.add_(1.0)
    fx.apply([Finding("kl_explosion", "critical", 3, "", "", {"rollback": True})], step=3)
    assert torch.equal(policy.weight, good[0]) and torch.equal(value.weight, good[1])



def test_after_step_keeps_the_weights_a_healthy_step_sampled_from_and_restarts_adam():
    model, fx = fixer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = model.weight.detach().clone()
    fx.begin_step(0)  # step 1 samples from the start weights ...
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # ... and its update is only judged by step 2
    fx.after_step([], {"kl": 0.0}, 1, opt, n_samples=4, adapt_kl=False)
    assert fx.good_step == 0 and torch.equal(fx.good["weight"], start)
    fx.begin_step(1)
    boom = Finding("kl_explosion", "critical", 2, "", "", {"rollback": True})
    actions = fx.after_step([boom], {"kl": 0.9}, 2, opt, n_samples=4, adapt_kl=False)
    assert torch.equal(model.weight, start) and not opt.state and not fx.rolled_back
    assert "step 0" in actions[0].evidence and fx.good_step == 0  # the exploded step is never kept

# ---------------------------------------------------------------------------- PPO, end to end (toy size)

from test_rm_ppo import base, config, read_jsonl  # noqa: E402,F401  (the toy checkpoint fixture)

from steprl.config import LoraConfig  # noqa: E402
from steprl.recipes import ppo  # noqa: E402
from steprl.training import rl  # noqa: E402



def ppo_run(base, tmp_path, steps, **kw):
    """A few PPO steps with the live doctor and auto-fix on; returns (metrics rows, doctor rows)."""
    p = PPOConfig(steps=steps, prompts_per_step=2, num_generations=2, max_new_tokens=8, max_turns=2,
                  minibatch_size=4, num_iterations=1, **kw)
    cfg = config(base, tmp_path, "ppo", ppo=p)
    cfg.doctor.enabled = cfg.doctor.auto_fix = True
    ppo.run(cfg)
    out = tmp_path / "t" / "ppo"
    return read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "doctor.jsonl")


def test_ppo_kl_explosion_lowers_lr_and_rolls_back_policy_and_critic(base, tmp_path, monkeypatch):
    """lr 1.0 wrecks the toy policy in one step: KL > 0.5 twice -> lr 1 -> 0.2, kl_coef up, and the
    policy and the separate critic both back at the last weights a healthy step sampled from."""
    rollbacks = []

    class Spy(rl.AutoFixer):
        def rollback(self):
            done = super().rollback()
            policy, critic = self.model  # both handed to the fixer
            trained = [q for q in self.model.parameters() if q.requires_grad]
            now = dict(self.model.named_parameters())
            rollbacks.append((isinstance(critic, ppo.Critic), len(self.good) == len(trained),
                              all(torch.equal(now[n], v) for n, v in self.good.items())))
            return done

    monkeypatch.setattr(rl, "AutoFixer", Spy)
    rows, doctor = ppo_run(base, tmp_path, steps=4, learning_rate=1.0, critic="separate", kl_coef=0.05)
    explosion = [d for d in doctor if d["code"] == "kl_explosion"]
    assert explosion[0]["severity"] == "critical"
    action = next(d for d in explosion if d["severity"] == "info")
    assert "learning_rate 1 -> 0.2" in action["evidence"]
    # step 1 sampled from the start weights with KL 0; its update is what step 2 saw explode
    assert "rolled back to the weights of step 0" in action["evidence"]
    after = next(r for r in rows if r["step"] == action["step"] + 1)
    assert after["learning_rate"] == pytest.approx(0.2) and after["kl_coef"] > 0.05
    assert after["kl"] < 0.01  # sampling from the restored weights again: the explosion is gone
    assert rollbacks == [(True, True, True)]  # policy and critic, every trained tensor restored


def test_ppo_nan_loss_is_skipped_and_lr_backs_off(base, tmp_path, monkeypatch):
    calls = []

    def nan_first(*args, **kwargs):  # the first minibatch's loss is NaN
        calls.append(1)
        loss = aggregate_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(ppo, "aggregate_loss", nan_first)
    rows, doctor = ppo_run(base, tmp_path, steps=2, learning_rate=1e-3, critic="shared",
                           lora=LoraConfig(enabled=True, r=4, alpha=8))
    first, second = rows
    assert first["event"] == "nan_skip" and first["skipped_minibatches"] == 1
    assert math.isnan(first["loss"]) and "grad_norm" not in first  # never applied
    assert math.isfinite(second["loss"]) and "grad_norm" in second
    assert any(d["code"] == "nan_loss" and d["severity"] != "info" for d in doctor)
    action = next(d for d in doctor if d["code"] == "nan_loss" and d["severity"] == "info")
    assert "learning_rate 0.001 -> 0.0001" in action["evidence"]
    assert second["learning_rate"] == pytest.approx(1e-4)


def test_ppo_oom_halves_the_micro_batch_and_retries(base, tmp_path, monkeypatch):
    real = rl.run_episodes

    def oom_once(*args, **kwargs):
        if not getattr(oom_once, "raised", False):
            oom_once.raised = True
            raise torch.OutOfMemoryError("toy")
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "run_episodes", oom_once)
    rows, doctor = ppo_run(base, tmp_path, steps=1, critic="shared")
    assert rows[0] == {"step": 1, "event": "oom"} and rows[-1]["step"] == 1 and "loss" in rows[-1]
    action = next(d for d in doctor if d["code"] == "out_of_memory" and d["severity"] == "info")
    assert "micro_batch_size 4 -> 2" in action["evidence"] and "num_generations" not in action["evidence"]


def test_ppo_dropped_call_bonus_marks_the_step_where_the_reward_changed(base, tmp_path, monkeypatch):
    """When auto-fix changes the reward (turn_limit's fix drops the call bonus), the trainer marks
    that step's entry, so the doctor never compares the new rewards with the old."""
    from steprl.monitor import doctor

    def turn_limit_once(h, final):
        return [Finding("turn_limit", "warning", 1, "", "", {"tool_success": 0.0})]

    monkeypatch.setattr(doctor, "RULES", [turn_limit_once])
    rows, found = ppo_run(base, tmp_path, steps=2, critic="shared")
    assert [r["step"] for r in rows] == [1, 2]  # one entry per step
    assert rows[0]["reward_changed"] == {"tool_success": 0.0} and "reward" in rows[0]
    assert "reward_changed" not in rows[1]
    action = next(d for d in found if d["severity"] == "info")
    assert "reward.tool_success 0.1 -> 0" in action["evidence"]
    h = doctor.History(rows, {"tool_success": 0.1})  # post hoc: config.yaml's bonus, then the event's
    assert h.get("reward")[0].tolist() == [2] and h.ctx["tool_success"] == 0.0

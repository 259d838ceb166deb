import torch

from steprl.monitor.autofix import AutoFixer, Knobs
from steprl.monitor.doctor import Finding


def fixer():
    model = torch.nn.Linear(2, 1)
    return model, AutoFixer(model, Knobs(learning_rate=5e-5, kl_coef=0.05, micro_batch_size=8,
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
    assert fx.knobs.learning_rate == 1e-5 and fx.knobs.kl_coef == 0.1
    assert torch.equal(model.weight, good) and fx.rolled_back
    assert len(actions) == 1 and actions[0].severity == "info"
    assert "learning_rate 5e-05 -> 1e-05" in actions[0].evidence and "step 3" in actions[0].evidence


def test_oom_halves_micro_batch_and_generations():
    _, fx = fixer()
    f = Finding("out_of_memory", "critical", 2, "oom", "smaller",
                {"num_generations": 4, "per_device_batch_size": 4, "max_new_tokens": 256,
                 "gradient_checkpointing": True})
    fx.apply([f], step=2)
    k = fx.knobs
    assert (k.micro_batch_size, k.num_generations, k.max_new_tokens, k.gradient_checkpointing) == (4, 4, 256, True)


def test_info_findings_and_findings_without_fix_change_nothing():
    _, fx = fixer()
    assert fx.apply([Finding("kl_too_low", "info", 1, "", "", {"learning_rate": 1.0}),
                     Finding("entropy_collapse", "warning", 1, "", "")], step=1) == []
    assert fx.knobs.learning_rate == 5e-5


def test_adaptive_kl_moves_toward_target():
    _, fx = fixer()
    before = fx.knobs.kl_coef
    fx.adapt_kl(kl=0.5, n_samples=100)  # KL far above the 0.05 target: coefficient rises
    assert fx.knobs.kl_coef > before
    high = fx.knobs.kl_coef
    fx.adapt_kl(kl=0.001, n_samples=100)
    assert fx.knobs.kl_coef < high

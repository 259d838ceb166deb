import pytest

from steprl.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\ngrpo: {learning_rate: 1.0e-5}\n"),
                      ["grpo.kl_coef=0.1", "sft.lora.r=4", "stages=[pretrain, sft]", "output_dir=out"])
    assert cfg.name == "x" and cfg.output_dir == "out"
    assert cfg.grpo.learning_rate == 1e-5 and cfg.grpo.kl_coef == 0.1
    assert cfg.sft.lora.r == 4 and cfg.stages == ["pretrain", "sft"]
    assert str(cfg.run_dir) == "out/x"


def test_int_accepted_for_float():
    cfg = load_config(None, ["grpo.kl_coef=0"])
    assert cfg.grpo.kl_coef == 0.0 and isinstance(cfg.grpo.kl_coef, float)


@pytest.mark.parametrize("override, message", [
    ("grpo.lerning_rate=1e-5", "unknown key 'grpo.lerning_rate' (allowed: steps,"),
    ("bogus=1", "unknown key 'bogus'"),
    ("grpo.steps=many", "grpo.steps: expected int, got 'many'"),
    ("grpo.loss_type=ppo", "grpo.loss_type: 'ppo' is not allowed (allowed: 'grpo', 'dapo', 'dr_grpo')"),
    ("grpo.num_generations=1", "grpo.num_generations: must be >= 2"),
    ("stages=[pretrain, dance]", "stages: unknown stage 'dance'"),
    ("sft.lora=3", "sft.lora: expected a mapping"),
    ("grpo.learning_rate=-1", "grpo.learning_rate: must be > 0"),
    ("noequals", "expected key=value"),
    ("rm.type=critic", "rm.type: 'critic' is not allowed (allowed: 'classifier', 'implicit')"),
    (["rm.type=implicit", "rm.pooling=mean"], "rm.pooling: applies to rm.type classifier only"),
    (["rm.type=implicit", "rm.beta=0"], "rm.beta: must be > 0"),
    ("sft.no_tool_fraction=1.5", "sft.no_tool_fraction: must be in [0, 1], got 1.5"),
])
def test_bad_configs_give_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override if isinstance(override, list) else [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_shipped_configs_load():
    for name in ("demo", "toy"):
        load_config(f"configs/{name}.yaml")

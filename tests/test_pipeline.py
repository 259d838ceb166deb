"""End to end at toy size: every stage through the CLI, the run directory contract, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steprl.cli import main

METRICS_GRPO = {"step", "reward", "reward_std", "accuracy", "kl", "entropy", "loss", "learning_rate",
                "grad_norm", "clip_ratio", "completions/mean_length", "completions/clipped_ratio",
                "turns/mean", "tools/call_frequency", "tools/failure_frequency", "frac_reward_zero_std",
                "step_time"}


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_run_directory_contract(toy_run):
    assert (toy_run / "config.yaml").is_file()
    summary = json.loads((toy_run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft", "grpo"]
    for s in summary["stages"]:
        assert s["wall_seconds"] > 0
    evals = {s["name"]: s["eval"] for s in summary["stages"] if "eval" in s}
    assert set(evals) == {"sft", "grpo"} and all(e["n"] == 16 and 0 <= e["accuracy"] <= 1 for e in evals.values())
    assert (toy_run / "pretrain/checkpoint/model.safetensors").is_file()
    assert (toy_run / "pretrain/checkpoint/tokenizer.json").is_file()
    for stage in ("sft", "grpo"):  # LoRA stages save adapters
        assert (toy_run / stage / "checkpoint/adapter_model.safetensors").is_file()
    for stage in ("pretrain", "sft"):
        rows = read_jsonl(toy_run / stage / "metrics.jsonl")
        assert rows and all("step" in r for r in rows) and any("loss" in r for r in rows)
    grpo = read_jsonl(toy_run / "grpo/metrics.jsonl")
    assert [r["step"] for r in grpo] == [1, 2, 3]
    assert METRICS_GRPO <= set(grpo[0])
    samples = read_jsonl(toy_run / "grpo/samples.jsonl")
    assert samples and {"text", "trained", "role"} <= set(samples[0]["segments"][0])
    assert any(seg["trained"] for seg in samples[0]["segments"])


def test_eval_json_last_line(toy_run, capsys):
    assert main(["eval", str(toy_run), "--task", "calc", "--limit", "5", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["n"] == 5 and 0.0 <= result["accuracy"] <= 1.0


def test_eval_gives_the_same_greedy_episodes_on_both_engines(toy_run, capsys):
    results = {}
    for engine in ("native", "hf"):
        assert main(["eval", str(toy_run), "--task", "calc", "--limit", "24", "--json", "--engine", engine]) == 0
        results[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["hf"]["engine"] == "hf" and results["hf"]["n"] == 24
    for key in ("accuracy", "answered", "tool_calls_per_episode", "turns_mean"):
        assert results["hf"][key] == results["native"][key], key


def test_toy_pipeline_runs_with_the_hf_engine(tmp_path):
    """Every stage, rollouts and evaluation through transformers' generate instead of our engine."""
    assert main(["run", "configs/toy.yaml", f"output_dir={tmp_path}", "name=hf", "rollout.engine=hf"]) == 0
    run = tmp_path / "hf"
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft", "grpo"]
    rows = read_jsonl(run / "grpo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and METRICS_GRPO <= set(rows[-1])


def test_inspect_shows_trained_tokens(toy_run, capsys):
    assert main(["inspect", str(toy_run / "grpo"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "<|im_start|>user" in out


def test_doctor_json_on_run(toy_run, capsys):
    code = main(["doctor", str(toy_run), "--json"])
    findings = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(findings, list) and code in (0, 1)
    assert code == int(any(f["severity"] == "critical" for f in findings))


def test_bad_config_key_is_one_line(capsys):
    assert main(["run", "configs/toy.yaml", "grpo.lerning_rate=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("steprl: error: unknown key 'grpo.lerning_rate'") and "\n" not in err


def test_killed_pretrain_resumes_from_checkpoint(tmp_path):
    args = [sys.executable, "-m", "steprl.cli", "pretrain", "configs/toy.yaml", f"output_dir={tmp_path}",
            "pretrain.steps=100", "pretrain.save_every=20", "pretrain.log_every=1"]
    env = {**os.environ, "STEPRL_NO_PROGRESS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "toy/pretrain/checkpoint/trainer_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "toy/pretrain/done.json").exists(), "killed too late to test resume"
    killed_at = len(read_jsonl(tmp_path / "toy/pretrain/metrics.jsonl"))
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = [r["step"] for r in read_jsonl(tmp_path / "toy/pretrain/metrics.jsonl")]
    assert steps == list(range(1, 101)), "metrics must continue without gaps or repeats"
    assert killed_at >= 20

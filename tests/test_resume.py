"""Killed (SIGKILL) and the same command run again: the stage resumes from its last checkpoint,
its metrics are steps 1..N exactly once, and it logs what an uninterrupted run logs; the same seed
and config give the same metrics; a checkpoint is replaced whole or not at all.

Every run here is one process at one thread (`runtime.threads=1`): what is bit-reproducible and
what is not is in ARCHITECTURE.md, "Resuming and determinism".
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steprl.training.common import STATE_FILE, commit_checkpoint, load_state, save_state

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"step_time", "rollout_time", "tokens_per_second"}  # wall-clock: never the same twice

# An untrained model never answers, so every episode would earn the same reward and every
# advantage would be 0; this reward differs between a group's episodes, so the updates do not.
REWARD = '''
from steprl.rewards.library import assistant_text


def digits(prompts, completions, **kwargs):
    return [sum(c.isdigit() for c in assistant_text(x)) / 10 for x in completions]
'''

GRPO = ["grpo.steps=6", "grpo.save_every=2", "grpo.learning_rate=0.01", "grpo.warmup_steps=4",
        "doctor.auto_fix=true", "grpo.reward.functions=[{name: 'toy_reward:digits'}]"]
SFT = ["sft.n_examples=48", "sft.epochs=2", "sft.batch_size=4", "sft.save_every=5", "sft.log_every=1"]


@pytest.fixture(scope="module")
def home(tiny, tmp_path_factory):
    """The tiny model as the starting checkpoint, and the reward's module."""
    model, tok, _ = tiny
    path = tmp_path_factory.mktemp("resume")
    model.save_pretrained(path / "base")
    tok.save_pretrained(path / "base")
    (path / "toy_reward.py").write_text(REWARD)
    return path


def command(home, name: str, stage: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "steprl.cli", stage, "configs/toy.yaml", f"output_dir={home / 'runs'}",
            f"name={name}", f"model.name_or_path={home / 'base'}", f"stages=[{stage}]", "eval_after=[]",
            "report_to=[]", "runtime.threads=1", *overrides]


def environment(home) -> dict:
    return {**os.environ, "STEPRL_NO_PROGRESS": "1", "PYTHONPATH": str(home), "OMP_NUM_THREADS": "1"}


def run(home, cmd) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=environment(home), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_after_first_checkpoint(home, cmd, stage_dir: Path) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = stage_dir / "checkpoint" / STATE_FILE
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint before the kill"
    assert not (stage_dir / "done.json").exists(), "killed too late to test resume"


def metrics(stage_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def adapter(stage_dir: Path) -> dict:
    return load_file(str(stage_dir / "checkpoint" / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def grpo_whole(home):
    """GRPO run once without interruption: the reference the other runs must repeat."""
    run(home, command(home, "whole", "grpo", GRPO))
    return home / "runs" / "whole" / "grpo"


def test_grpo_killed_after_its_first_checkpoint_resumes_as_if_never_killed(home, grpo_whole):
    cmd = command(home, "killed", "grpo", GRPO)
    stage_dir = home / "runs" / "killed" / "grpo"
    kill_after_first_checkpoint(home, cmd, stage_dir)
    run(home, cmd)
    rows = metrics(stage_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert json.loads((stage_dir / "done.json").read_text())["steps"] == 6
    assert not (stage_dir / "checkpoint" / STATE_FILE).exists()
    # the sampler's stream, the shuffles, AdamW, auto-fix's KL coefficient: all continue
    assert rows == metrics(grpo_whole)
    assert (stage_dir / "samples.jsonl").read_text() == (grpo_whole / "samples.jsonl").read_text()
    assert_same_weights(adapter(stage_dir), adapter(grpo_whole))


def test_same_seed_and_config_give_the_same_grpo_metrics(home, grpo_whole):
    run(home, command(home, "again", "grpo", GRPO))
    again = home / "runs" / "again" / "grpo"
    rows = metrics(again)
    assert any(r["reward_std"] > 0 for r in rows) and any(r["loss"] != 0 for r in rows)  # the updates did something
    assert rows == metrics(grpo_whole)  # exactly: not approximately
    assert_same_weights(adapter(again), adapter(grpo_whole))


def test_sft_killed_after_its_first_checkpoint_resumes_as_if_never_killed(home):
    run(home, command(home, "whole", "sft", SFT))
    whole = home / "runs" / "whole" / "sft"
    cmd = command(home, "killed", "sft", SFT)
    stage_dir = home / "runs" / "killed" / "sft"
    kill_after_first_checkpoint(home, cmd, stage_dir)
    run(home, cmd)
    rows = metrics(stage_dir)
    assert [r["step"] for r in rows] == list(range(1, 23))  # 2 epochs of 11 steps: the resume crosses an epoch
    assert rows == metrics(whole)
    assert_same_weights(adapter(stage_dir), adapter(whole))


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])

    def checkpoint_at(step: int):
        def write(directory: Path) -> None:
            (directory / "weights.txt").write_text(f"step {step}")
            save_state(directory, step, optimizer.state_dict(), [])
        return write

    commit_checkpoint(ckpt, checkpoint_at(2))

    def killed_midway(directory: Path) -> None:
        (directory / "weights.txt").write_text("step 4")
        (directory / STATE_FILE).write_bytes(b"half a fi")
        raise KeyboardInterrupt  # stops the write where a SIGKILL would

    with pytest.raises(KeyboardInterrupt):
        commit_checkpoint(ckpt, killed_midway)
    assert (tmp_path / "checkpoint.tmp").is_dir()  # what the kill left behind
    assert load_state(ckpt)["step"] == 2 and (ckpt / "weights.txt").read_text() == "step 2"
    assert not (tmp_path / "checkpoint.tmp").exists()

    # killed between the two renames: the previous checkpoint is aside, the new one not in place
    commit_checkpoint(tmp_path / "next", checkpoint_at(4))
    os.replace(ckpt, tmp_path / "checkpoint.old")
    os.replace(tmp_path / "next", tmp_path / "checkpoint.tmp")
    assert load_state(ckpt)["step"] == 2 and (ckpt / "weights.txt").read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    commit_checkpoint(ckpt, checkpoint_at(4))  # and a save that completes replaces it whole
    assert load_state(ckpt)["step"] == 4 and (ckpt / "weights.txt").read_text() == "step 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_stages_last_checkpoint_keeps_no_optimizer_state(tmp_path):
    """Nothing steps after a stage's last save, so it writes no optimizer state (under sharding,
    gathering it on rank 0 would be the run's memory peak); a resume from it loads none."""
    from steprl.runtime import Runtime
    from steprl.training.common import save_resumable

    rt = Runtime(torch.device("cpu"), "fp32")
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    optimizer.step()

    def write(directory, weights):
        (directory / "weights.txt").write_text("w")
    save_resumable(tmp_path / "mid", rt, 5, optimizer, write)
    save_resumable(tmp_path / "last", rt, 10, optimizer, write, last=True)
    assert set(load_state(tmp_path / "mid")["optimizer"]["state"][0]) >= {"exp_avg", "exp_avg_sq"}
    last = load_state(tmp_path / "last")
    assert last["step"] == 10 and last["optimizer"] is None and (tmp_path / "last" / "weights.txt").is_file()
    fresh = torch.optim.AdamW([p])
    rt.load_optimizer_state(None, fresh, last["optimizer"])
    assert not fresh.state

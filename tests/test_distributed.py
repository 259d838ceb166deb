"""Data parallel over processes (gloo on the CPU): a step on two ranks equals a step on one process
over the concatenated batch, rank 0 alone writes, and a killed two-process launch resumes."""
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steprl.rollout.episodes import Trajectory
from steprl.tasks.base import Problem
from steprl.training.passes import completion_logprobs

ROOT = Path(__file__).resolve().parents[1]

# One GRPO update and one PPO update (each critic) on fixed trajectories (no sampling, so every
# launch sees the same batch), plain SGD and no clipping so that the parameters move by exactly
# lr x the averaged gradient.
RL_WORKER = r'''
import copy, pickle, random, sys, torch
from pathlib import Path
import steprl.recipes.grpo as grpo
import steprl.recipes.ppo as ppo
from steprl.config import LoraConfig, RunConfig, TaskConfig
from steprl.models.loading import load_policy
from steprl.runtime import leave_process_group, setup_runtime
from steprl.training.policy import Policy, setup_policy
from steprl.training.rl import RLState
from steprl.training.value import Critic, ValueHead

model_dir, trajs_file, out_file, zero_stage = sys.argv[1:5]
trajs = pickle.load(open(trajs_file, "rb"))
results = {}
for loss_type, scale in [("grpo", "group"), ("dapo", "batch")]:
    cfg = RunConfig(task=TaskConfig(name="calc"))
    cfg.runtime.device, cfg.runtime.zero_stage = "cpu", int(zero_stage)
    rt = setup_runtime(cfg)
    model, tok = load_policy(model_dir)
    g = cfg.grpo
    g.prompts_per_step, g.num_generations, g.minibatch_size, g.micro_batch_size = 4, 3, 12, 2
    g.num_iterations, g.kl_coef, g.loss_type, g.scale_rewards, g.max_grad_norm = 1, 0.04, loss_type, scale, 1e9
    g.lora = LoraConfig(enabled=False)
    grpo.rollout = lambda state, prompts: rt.shard(copy.deepcopy(trajs), "episodes")
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    whole = copy.deepcopy(model) if rt.shards_parameters else None
    model = rt.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    policy = Policy(model, tok, ref, "", params, torch.optim.SGD(params, lr=0.5), None, whole_copy=whole)
    state = RLState(g, policy, rt, None, None, {}, None, "", [trajs[0].problem] * 4,
                    generator=torch.Generator().manual_seed(0), rng=random.Random(rt.rank))
    metrics, _ = grpo.grpo_step(state)
    results[loss_type] = rt.full_state_dict(model) or {n: p.detach().clone() for n, p in model.named_parameters()}
    policy.sync_sampler()  # what the next rollout samples from
    results[loss_type + "/sampler"] = {n: p.detach().clone() for n, p in policy.sampler.named_parameters()}
for critic in ("separate", "shared"):
    cfg = RunConfig(task=TaskConfig(name="calc"), stages=["ppo"])
    cfg.model.name_or_path = model_dir
    cfg.runtime.device, cfg.runtime.zero_stage = "cpu", int(zero_stage)
    rt = setup_runtime(cfg)
    p = cfg.ppo
    p.prompts_per_step, p.num_generations, p.minibatch_size, p.micro_batch_size = 4, 3, 12, 2
    p.num_iterations, p.kl_coef, p.max_grad_norm, p.critic = 1, 0.04, 1e9, critic
    p.lora = LoraConfig(enabled=False)
    value_model = lambda m: (Critic(copy.deepcopy(m.get_decoder()), m.config.hidden_size) if critic == "separate"
                             else ValueHead(m.config.hidden_size))
    policy = setup_policy(cfg, "ppo", p.lora, 0.5, True, Path(out_file + "-none"), value_model, 0.5, rt=rt)
    policy.optimizer = torch.optim.SGD([q for group in policy.optimizer.param_groups for q in group["params"]], lr=0.5)
    ppo.rollout = lambda state, prompts: rt.shard(copy.deepcopy(trajs), "episodes")
    state = RLState(p, policy, rt, None, None, {}, None, "", [trajs[0].problem] * 4,
                    generator=torch.Generator().manual_seed(0), rng=random.Random(rt.rank),
                    extra={"use_ref": True, "kl_ctl": None})
    metrics, _ = ppo.ppo_step(state)
    results["ppo/" + critic + "/sharded"] = [hasattr(next(m.parameters()), "full_tensor")
                                             for m in (policy.model, policy.value_model)]
    results["ppo/" + critic] = rt.full_state_dict(policy.trained) or {
        n: q.detach().clone() for n, q in policy.trained.named_parameters()}
torch.save(results, out_file + str(rt.rank))
leave_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, cwd=ROOT, timeout=300) -> None:
    """`world` processes with the environment torchrun gives its workers; all must succeed."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPRL_NO_PROGRESS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def test_an_rl_step_on_two_ranks_equals_one_process_on_the_whole_batch(tiny, tiny_dir, tmp_path):
    """4 prompts x 3 episodes, two prompts per rank. Both ranks end with identical parameters, and
    those equal one process's after the same step within 1e-5: the gradients are averaged, dapo's
    token mean, scale_rewards=batch's std and PPO's advantage whitening are the launch's, not a
    rank's. Under FSDP (zero_stage 3, full fine-tuning) too, where every rank runs plain passes
    (the one process shares the prompts' common beginning and each prompt through the KV cache)
    and PPO's separate critic is sharded as the policy is (a shared value head stays whole)."""
    model, _, _ = tiny
    rng, vocab = random.Random(0), model.config.vocab_size
    trajs = []
    system = [rng.randrange(4, vocab) for _ in range(18)]  # a beginning every prompt shares (`Beginning`)
    for p in range(4):
        prompt = system + [rng.randrange(4, vocab) for _ in range(rng.randint(5, 12))]
        for _ in range(3):
            k = rng.randint(2, 10)  # unequal lengths: a token mean differs from a mean of means
            t = Trajectory(Problem(f"p{p}", "q", "1", {}), list(prompt), ids=[rng.randrange(4, vocab) for _ in range(k)],
                           mask=[1] * k, turn_index=[0] * k, turn_rewards=[rng.choice([0.0, 0.3, 1.0])])
            with torch.no_grad():
                t.logps = (completion_logprobs(model, [t])[0][0] + 0.2 * torch.randn(k)).tolist()
            trajs.append(t)
    (tmp_path / "trajs.pkl").write_bytes(pickle.dumps(trajs))
    worker = tmp_path / "worker.py"
    worker.write_text(RL_WORKER)
    for name, world, zero_stage in [("one", 1, 0), ("two", 2, 0), ("fsdp", 2, 3)]:
        launch([str(worker), str(tiny_dir), str(tmp_path / "trajs.pkl"), str(tmp_path / f"{name}.pt"), str(zero_stage)],
               world=world)
    one = torch.load(tmp_path / "one.pt0")
    ranks = [torch.load(tmp_path / f"two.pt{r}") for r in (0, 1)]
    fsdp = torch.load(tmp_path / "fsdp.pt0")  # the weights gathered on rank 0
    start = dict(model.named_parameters())
    for loss_type in ("grpo", "dapo"):
        moved = max((one[loss_type][n] - start[n]).abs().max().item() for n in start)
        assert moved > 1e-3  # the step did something for the comparison to see
        for n in start:
            assert torch.equal(ranks[0][loss_type][n], ranks[1][loss_type][n]), n
            torch.testing.assert_close(ranks[0][loss_type][n], one[loss_type][n], atol=1e-5, rtol=0)
            torch.testing.assert_close(fsdp[loss_type][n], one[loss_type][n], atol=1e-5, rtol=0)
            assert torch.equal(fsdp[loss_type + "/sampler"][n], fsdp[loss_type][n]), n  # FSDP's whole copy follows
    assert fsdp["ppo/separate/sharded"] == [True, True] and fsdp["ppo/shared/sharded"] == [True, False]
    assert ranks[0]["ppo/separate/sharded"] == [False, False]
    for critic in ("ppo/separate", "ppo/shared"):  # the policy and its value model, sharded alike or (a head) whole
        assert {n.split(".")[0] for n in one[critic]} == {"policy", "value"}
        assert max((one[critic]["policy." + n] - start[n]).abs().max().item() for n in start) > 1e-3
        assert max(v.abs().max().item() for n, v in one[critic].items() if n.startswith("value.") and n.endswith("v.weight")) > 1e-3
        for n in one[critic]:
            assert torch.equal(ranks[0][critic][n], ranks[1][critic][n]), n
            torch.testing.assert_close(ranks[0][critic][n], one[critic][n], atol=1e-5, rtol=0)
            torch.testing.assert_close(fsdp[critic][n], one[critic][n], atol=1e-5, rtol=0)


def sft_args(tiny_dir, lora: bool) -> list[str]:
    return ["run", "configs/toy.yaml", "name=t", "stages=[sft]", "eval_after=[]",
            f"model.name_or_path={tiny_dir}", "sft.n_examples=16", "sft.batch_size=16", "sft.warmup_steps=0",
            "report_to=[]", f"sft.lora.enabled={str(lora).lower()}"]


@pytest.fixture(scope="module")
def one_process_sft(tiny_dir, tmp_path_factory):
    """The one-process SFT step that two-rank launches are compared with, run once per LoRA setting,
    in this process (a launch of one would pay the imports again for the same result)."""
    from steprl.cli import main

    runs = {}

    def run(lora: bool) -> Path:
        if lora not in runs:
            runs[lora] = tmp_path_factory.mktemp("one")
            assert main([*sft_args(tiny_dir, lora), f"output_dir={runs[lora]}"]) == 0
        return runs[lora]
    return run


@pytest.mark.parametrize("zero_stage,lora", [(0, True), (1, True), ("configs/accelerate/fsdp.yaml", True), (2, False)])
def test_an_sft_step_on_two_ranks_equals_one_process(tiny_dir, one_process_sft, tmp_path, zero_stage, lora):
    """One SFT step over 16 conversations, 8 per rank: the logged loss is the whole batch's token
    mean and the trained weights (adapter, or whole model) equal one process's; metrics are written
    once. With zero_stage 1 each rank updates its shard of the parameters and broadcasts it; with
    2 and 3 (FSDP) each holds a shard of the weights and the checkpoint gathers them. Stage 3 comes
    from `accelerate launch` with the FSDP config file, as a user would launch it."""
    args = sft_args(tiny_dir, lora)
    (tmp_path / "one").symlink_to(one_process_sft(lora), target_is_directory=True)
    if isinstance(zero_stage, int):
        launch(["-m", "steprl.cli", *args, f"output_dir={tmp_path / 'two'}", f"runtime.zero_stage={zero_stage}"], world=2)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPRL_NO_PROGRESS": "1"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", zero_stage, "--num_processes", "2",
               f"--main_process_port={free_port()}", "-m", "steprl.cli", *args, f"output_dir={tmp_path / 'two'}"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "zero_stage: 3" in (tmp_path / "two" / "t" / "config.yaml").read_text()
    rows = {k: [json.loads(x) for x in (tmp_path / k / "t" / "sft" / "metrics.jsonl").read_text().splitlines()]
            for k in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1]
    assert rows["two"][0]["loss"] == pytest.approx(rows["one"][0]["loss"], abs=1e-5)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    one = load_file(str(tmp_path / "one" / "t" / "sft" / "checkpoint" / name))
    two = load_file(str(tmp_path / "two" / "t" / "sft" / "checkpoint" / name))
    start = load_file(str(tiny_dir / "model.safetensors"))
    assert one.keys() == two.keys() and one
    if not lora:  # the step moved the weights, for the comparison to see
        assert max((one[n] - start[n]).abs().max().item() for n in one) > 1e-4
    for n in one:
        torch.testing.assert_close(two[n], one[n], atol=1e-5, rtol=0)


# The reward-model stage end to end, two kinds: a classifier under LoRA pooling every assistant
# token (its final checkpoint merged from the gathered weights), and an implicit RM, fully trained
# against its frozen reference; a checkpoint after the first of two steps.
RM_WORKER = r'''
import sys
from pathlib import Path
from steprl.config import LoraConfig, RMConfig, RunConfig
from steprl.recipes import rm
from steprl.runtime import Runtime, leave_process_group

model_dir, out, zero_stage = sys.argv[1:4]
prepare = Runtime.prepare


def recorded(rt, model):  # what the recipe trains: sharded (FSDP's DTensors) or whole
    model = prepare(rt, model)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"sharded{rt.rank}").write_text(str(hasattr(next(model.parameters()), "full_tensor")))
    return model


Runtime.prepare = recorded
for name, c in [("mean", RMConfig(pooling="mean", lora=LoraConfig(enabled=True, r=4, alpha=8))),
                ("implicit", RMConfig(type="implicit", lora=LoraConfig(enabled=False)))]:
    c.n_pairs, c.n_test_pairs, c.epochs, c.batch_size, c.warmup_steps, c.save_every, c.log_every = 16, 8, 1, 8, 0, 1, 1
    cfg = RunConfig(name=name, output_dir=out, stages=["rm"], report_to=[], rm=c)
    cfg.model.name_or_path = model_dir
    cfg.runtime.device, cfg.runtime.zero_stage = "cpu", int(zero_stage)
    cfg.doctor.enabled = False
    rm.run(cfg)
leave_process_group()
'''


def test_a_reward_model_sharded_over_two_ranks_equals_one_process(tiny_dir, tmp_path):
    """Two RM steps of 8 pairs each, 4 per rank under zero_stage 3 (FSDP): the logged losses and
    held-out accuracy are the whole batch's, each step is logged once, and the final reward model
    (whole, in Hugging Face format) equals one process's within 1e-5."""
    worker = tmp_path / "worker.py"
    worker.write_text(RM_WORKER)
    for name, world, zero_stage in [("one", 1, 0), ("fsdp", 2, 3)]:
        launch([str(worker), str(tiny_dir), str(tmp_path / name), str(zero_stage)], world=world)
    assert [(tmp_path / "fsdp" / f"sharded{r}").read_text() for r in (0, 1)] == ["True", "True"]
    assert (tmp_path / "one" / "sharded0").read_text() == "False"
    start = load_file(str(tiny_dir / "model.safetensors"))
    for kind in ("mean", "implicit"):
        runs = {k: tmp_path / k / kind / "rm" for k in ("one", "fsdp")}
        rows = {k: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for k, d in runs.items()}
        assert [r["step"] for r in rows["fsdp"]] == [r["step"] for r in rows["one"]] == [1, 2]
        for one, two in zip(rows["one"], rows["fsdp"]):
            assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
        assert rows["fsdp"][-1]["eval/accuracy"] == rows["one"][-1]["eval/accuracy"]
        one = load_file(str(runs["one"] / "checkpoint" / "model.safetensors"))
        two = load_file(str(runs["fsdp"] / "checkpoint" / "model.safetensors"))
        assert one.keys() == two.keys()
        trunk = [n for n in one if n in start and one[n].shape == start[n].shape]
        assert max((one[n] - start[n]).abs().max().item() for n in trunk) > 1e-5  # trained (LoRA merged in)
        for n in one:
            torch.testing.assert_close(two[n], one[n], atol=1e-5, rtol=0)


# Three AdamW steps of a tiny model on fixed batches, the optimiser rebuilt from a checkpoint after
# the first: under ZeRO stage 1 each rank holds part of the moments, and the consolidated
# checkpoint resumes them.
ZERO_WORKER = r'''
import sys
from pathlib import Path

import torch
from steprl.config import RunConfig, TaskConfig
from steprl.models.loading import load_policy
from steprl.monitor.autofix import local
from steprl.runtime import leave_process_group, setup_runtime
from steprl.training.common import load_state, save_resumable

model_dir, out, zero_stage = sys.argv[1:4]
cfg = RunConfig(task=TaskConfig(name="calc"))
cfg.runtime.device, cfg.runtime.zero_stage = "cpu", int(zero_stage)
rt = setup_runtime(cfg)
model = rt.prepare(load_policy(model_dir)[0].train())
params = list(model.parameters())
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(4, 300, (4, 12), generator=gen) for _ in range(3)]

def step(optimizer, batch):
    mine = torch.stack(rt.shard(list(batch)))  # equal rows of equal length: the mean of rank means is the batch's
    loss = model(input_ids=mine, labels=mine).loss
    optimizer.zero_grad()
    loss.backward()
    rt.sync_gradients(params)
    optimizer.step()

optimizer = rt.adamw(params, lr=0.01)
step(optimizer, batches[0])
save_resumable(Path(out + "ckpt"), rt, 1, optimizer, lambda directory, weights: None, model=model)
rt.barrier()
state = load_state(Path(out + "ckpt"))
optimizer = rt.adamw(params, lr=0.01)
rt.load_optimizer_state(model, optimizer, state["optimizer"])
moments = [s["exp_avg"] for s in getattr(optimizer, "optim", optimizer).state.values()]
held = sum(local(m).numel() for m in moments)  # FSDP's DTensor: this rank's shard
for batch in batches[1:]:
    step(optimizer, batch)
weights = rt.full_state_dict(model) or {n: q.detach().clone() for n, q in model.named_parameters()}
if "sharded" in state["optimizer"]:  # each rank wrote its part: count the parameters and each part's bytes
    from torch.distributed.checkpoint import FileSystemReader
    shards = Path(state["optimizer"]["sharded"])
    saved = sum(k.endswith(".exp_avg") for k in FileSystemReader(shards).read_metadata().state_dict_metadata)
    parts = sorted(p.stat().st_size for p in shards.glob("*.distcp"))
else:
    saved, parts = len(state["optimizer"]["state"]), []
torch.save({"params": weights, "held": held, "saved": saved, "parts": parts}, out + str(rt.rank))
del optimizer  # before leaving the group, as a recipe's optimizer is gone when the CLI leaves it
leave_process_group()
'''


@pytest.fixture(scope="module")
def whole_copies(tiny_dir, tmp_path_factory) -> dict:
    """ZERO_WORKER's steps on two ranks that each keep everything (zero_stage 0), rank 0's result."""
    out = tmp_path_factory.mktemp("whole")
    (out / "worker.py").write_text(ZERO_WORKER)
    launch([str(out / "worker.py"), str(tiny_dir), str(out / "whole"), "0"], world=2)
    return torch.load(out / "whole0")


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_zero_stages_shard_the_optimizer_and_resume_like_whole_copies(tiny_dir, whole_copies, tmp_path, zero_stage):
    """Two ranks under `runtime.zero_stage` 1 (AdamW's moments sharded) or 3 (FSDP: weights,
    gradients and moments): each rank holds part of the moments, the checkpoint all of them (under
    FSDP written by each rank, its own part), and
    after a resume from it the weights equal those of two ranks that each keep everything
    (zero_stage 0), within 1e-6. (Against one process, AdamW's m / sqrt(v) turns the float rounding
    of a two-rank gradient mean into differences of ~1e-5 on near-zero gradients after three steps.)"""
    worker = tmp_path / "worker.py"
    worker.write_text(ZERO_WORKER)
    launch([str(worker), str(tiny_dir), str(tmp_path / "zero"), str(zero_stage)], world=2)
    whole = whole_copies
    ranks = [torch.load(tmp_path / f"zero{r}") for r in (0, 1)]
    n, total = len(whole["params"]), whole["held"]
    assert whole["saved"] == n and total == sum(v.numel() for v in whole["params"].values())
    assert ranks[0]["saved"] == n and 0 < ranks[0]["held"] < total and ranks[0]["held"] + ranks[1]["held"] == total
    if zero_stage == 3:  # each rank wrote its own part of the moments (8 bytes a parameter in all), none gathered
        parts = ranks[0]["parts"]
        assert len(parts) == 2 and parts[0] > 0.4 * sum(parts) and sum(parts) > 8 * total
    for name, value in whole["params"].items():
        if zero_stage == 1:  # whole copies on both ranks (under FSDP rank 0 alone gathers them)
            assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], value, atol=1e-6, rtol=0)


def test_an_accelerate_launch_asks_for_its_zero_stage_or_is_refused_in_one_line(monkeypatch):
    from steprl.runtime import launch_zero_stage
    assert launch_zero_stage(1) == 1  # no accelerate config: the run's own
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for version, env, stage in [("1", {"FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, 3),
                                ("1", {"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, 2),
                                ("2", {"FSDP_RESHARD_AFTER_FORWARD": "true"}, 3),
                                ("2", {"FSDP_RESHARD_AFTER_FORWARD": "false"}, 2)]:
        with monkeypatch.context() as m:
            m.setenv("FSDP_VERSION", version)
            for k, v in env.items():
                m.setenv(k, v)
            assert launch_zero_stage(0) == stage
            assert launch_zero_stage(stage) == stage
            with pytest.raises(ValueError, match="make them agree"):
                launch_zero_stage(1)
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(ValueError, match="FSDP's HYBRID_SHARD, which steprl does not run"):
        launch_zero_stage(0)


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_an_accelerate_deepspeed_config_asks_for_its_zero_stage(monkeypatch, name, stage):
    """accelerate's own `launch` of configs/accelerate/<name>, up to the environment it would start
    the workers with (starting them needs the deepspeed package): that environment asks for the
    file's ZeRO stage, which steprl runs with torch."""
    import accelerate.commands.launch as accelerate_launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from steprl.runtime import launch_zero_stage
    workers = {}
    monkeypatch.setattr(accelerate_launch, "deepspeed_launcher",
                        lambda args: workers.update(prepare_deepspeed_cmd_env(args)[1]))
    config = str(ROOT / "configs" / "accelerate" / name)
    accelerate_launch.launch_command(accelerate_launch.launch_command_parser().parse_args(
        ["--config_file", config, "--num_processes", "2", "x.py"]))
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in workers.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert launch_zero_stage(0) == stage
    with pytest.raises(ValueError, match=f"asks for DeepSpeed's ZeRO stage {stage}: leave runtime.zero_stage at 0"):
        launch_zero_stage(1)


def test_a_deepspeed_json_config_is_read_and_offloading_refused(monkeypatch, tmp_path):
    from steprl.runtime import launch_zero_stage
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launch_zero_stage(0) == 2  # accelerate's default stage
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert launch_zero_stage(0) == 1
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ValueError, match="DeepSpeed's offloading to the CPU or NVMe, which steprl does not run"):
        launch_zero_stage(0)
    ds.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        launch_zero_stage(0)


def test_a_launch_steprl_cannot_run_is_refused_before_a_stage_starts(tmp_path, capsys, monkeypatch):
    from steprl.cli import main
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme")
    assert main(["run", "configs/toy.yaml", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed's offloading to the CPU or NVMe, which steprl does not run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "toy").exists()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_torchrun_pipeline_writes_once_and_resumes_after_a_kill(tmp_path, zero_stage):
    """`torchrun --nproc_per_node 2 -m steprl.cli run configs/toy.yaml`: killed (SIGKILL, the whole
    launch) after GRPO's first checkpoint, then the same command again: every stage's metrics are
    its steps exactly once. With whole copies and under FSDP (zero_stage 3: every stage sharded,
    GRPO sampling from its whole copy, auto-fix on and keeping its shards of the weights; then a
    reward model and PPO with a separate critic, full fine-tuning, scored by that reward model)."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}",
           "-m", "steprl.cli", "run", "configs/toy.yaml", f"output_dir={out}", "eval_after=[]", "report_to=[]",
           "grpo.steps=6", "grpo.save_every=2", f"runtime.zero_stage={zero_stage}",
           *(["doctor.auto_fix=true", "stages=[pretrain,sft,grpo,rm,ppo]", "rm.n_pairs=16", "rm.n_test_pairs=8",
              "rm.epochs=1", "rm.batch_size=8", "ppo.steps=2", "ppo.prompts_per_step=4", "ppo.minibatch_size=4",
              "ppo.max_new_tokens=12", "ppo.critic=separate", "ppo.lora.enabled=false",
              "ppo.reward.functions=[{name: accuracy}, {model: rm, weight: 0.1}]"] if zero_stage else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPRL_NO_PROGRESS": "1"}
    state = out / "toy" / "grpo" / "checkpoint" / "trainer_state.pt"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert state.exists(), "GRPO never checkpointed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "toy" / "grpo" / "done.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    later = [("rm", None), ("ppo", [1, 2])] if zero_stage else []
    for stage, logged in (("grpo", list(range(1, 7))), ("sft", None), ("pretrain", None), *later):
        steps = [json.loads(x)["step"] for x in (out / "toy" / stage / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps, (stage, steps)
        if logged:
            assert steps == logged
    assert json.loads((out / "toy" / "summary.json").read_text())["name"] == "toy"


FAILING_TASK = '''
import os
from steprl.tasks.calc import CalcTask

class FailOnRank1(CalcTask):
    def prompt_messages(self, problem):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("the tool server is unreachable")
        return super().prompt_messages(problem)
'''


def test_a_rank_that_raises_ends_the_launch_with_its_error_named(tmp_path):
    """One rank raises mid-stage while the other waits in a collective: the launch ends (no hang
    until the 30-minute collective timeout), the failing rank says which it is and why in one line,
    and torchrun's summary gives that error as the first failure."""
    (tmp_path / "failing_task.py").write_text(FAILING_TASK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}",
           "-m", "steprl.cli", "run", "configs/toy.yaml", f"output_dir={tmp_path / 'runs'}", "eval_after=[]",
           "report_to=[]", "stages=[pretrain]", "pretrain.steps=2", "task.name=failing_task:FailOnRank1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPRL_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "steprl: rank 1 of 2 failed: RuntimeError: the tool server is unreachable" in out, out[-3000:]
    root = out[out.index("Root Cause"):]
    assert "rank      : 1" in root and "RuntimeError: the tool server is unreachable" in root, root

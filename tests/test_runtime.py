"""The runtime: device and precision chosen at run time, seeds and threads set once per stage."""
import json

import pytest
import torch

from steprl import runtime
from steprl.config import load_config


def test_auto_precision_measures_once_per_machine_and_picks_the_faster(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "CACHE", tmp_path / "precision.json")
    speeds = {torch.float32: 200.0, torch.bfloat16: 1900.0}  # an AMX CPU
    calls = []
    monkeypatch.setattr(runtime, "matmul_gflops", lambda dtype, device: calls.append(dtype) or speeds[dtype])
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert len(calls) == 2  # measured once (both dtypes), then read from the cache
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert next(iter(cached.values())) == {"precision": "bf16", "fp32_gflops": 200.0, "bf16_gflops": 1900.0}
    (tmp_path / "precision.json").unlink()
    speeds[torch.bfloat16] = 0.3  # a CPU without bf16 units
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert runtime.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: no measurement


def test_a_missing_cuda_device_is_one_clear_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="runtime.device: cuda was asked for"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto").type == "cpu"


def test_setup_runtime_seeds_threads_and_rank(monkeypatch):
    """One process: rank 0 of 1 and no process group (tests/test_distributed.py launches two)."""
    cfg = load_config(None, ["seed=7", "runtime.threads=1", "runtime.device=cpu", "runtime.precision=fp32"])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        rt = runtime.setup_runtime(cfg)
        first = torch.rand(3)
        runtime.setup_runtime(cfg)
        assert torch.equal(first, torch.rand(3)) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert (rt.device.type, rt.precision, rt.rank, rt.world_size, rt.is_main) == ("cpu", "fp32", 0, 1, True)
    assert not torch.distributed.is_initialized()
    assert rt.shard([1, 2, 3]) == [1, 2, 3] and rt.gather([4]) == [4] and rt.weight(5.0) == 1.0


def test_shard_splits_contiguously_and_refuses_uneven_groups():
    parts = [runtime.Runtime(torch.device("cpu"), "fp32", rank=r, world_size=3).shard(list(range(7)), even=False)
             for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="prompts_per_step of 7 does not split evenly over 3 processes"):
        runtime.Runtime(torch.device("cpu"), "fp32", rank=0, world_size=3).shard(list(range(7)), "prompts_per_step")


def test_bf16_autocast_keeps_fp32_weights_and_the_loss_in_fp32():
    rt = runtime.Runtime(torch.device("cpu"), "bf16")
    layer = torch.nn.Linear(8, 8)
    with rt.autocast():
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    assert torch.log_softmax(out.float(), -1).dtype == torch.float32
    with runtime.Runtime(torch.device("cpu"), "fp32").autocast():
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_a_bf16_training_pass_gives_fp32_logprobs_near_fp32s_and_fp32_gradients(tiny):
    """Autocast bf16 through the lean training passes (grouped attention, the MLP tail's own
    backward): log-probs come out in fp32, within bf16 rounding of the fp32 pass, and every
    gradient is finite and fp32 (the master weights)."""
    import copy

    from steprl.models.lean import lean_training
    from steprl.rollout.episodes import Trajectory
    from steprl.tasks.base import Problem
    from steprl.training.passes import completion_logprobs

    model = lean_training(copy.deepcopy(tiny[0])).train()
    gen = torch.Generator().manual_seed(0)
    trajs = [Trajectory(Problem("p", "q", "1"), torch.randint(4, 300, (20,), generator=gen).tolist(),
                        ids=torch.randint(4, 300, (k,), generator=gen).tolist(), mask=[1] * k) for k in (5, 9, 12)]
    with torch.no_grad():
        fp32, _ = completion_logprobs(model, trajs)
    with runtime.Runtime(torch.device("cpu"), "bf16").autocast():
        bf16, _ = completion_logprobs(model, trajs)
    assert bf16.dtype == torch.float32
    assert 0 < (bf16 - fp32).abs().max() < 0.15 and (bf16 - fp32).abs().mean() < 0.03  # bf16 ran, and is close
    bf16.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

"""Where a stage's tensors live and how they compute: device, precision, seed, threads, and which
process of a launch this is (torchrun / accelerate set RANK and WORLD_SIZE).

    rt = setup_runtime(cfg)            once per stage, before anything random happens
    model.to(rt.device)                every tensor a recipe builds goes there too
    with rt.autocast(): ...            bf16 matmuls where precision is bf16; fp32 master weights

Precision "auto" measures once per machine whether a bf16 matmul beats fp32 here (CPUs with AMX
and GPUs: several times; CPUs without bf16 units: hundreds of times slower) and caches the answer.
Log-probs, KL and values are always computed from fp32 logits (`.float()` before log_softmax).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steprl.config import RunConfig
from steprl.memory import keep_freed_memory

CACHE = Path(os.environ.get("STEPRL_CACHE", Path.home() / ".cache" / "steprl")) / "precision.json"


@dataclass
class Runtime:
    device: torch.device
    precision: str  # "fp32" | "bf16"
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory and prints."""
        return self.rank == 0

    def autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device: cuda was asked for, but torch sees no CUDA device (runtime.device=cpu or auto)")
    return torch.device(name)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 1024, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: kernel selection, first-touch
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def machine_key(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda:" + torch.cuda.get_device_name(device)
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown"
    return f"cpu:{model}:{torch.get_num_threads()} threads"


def resolve_precision(name: str, device: torch.device) -> str:
    """fp32 or bf16; "auto" picks bf16 where its matmul runs at least 1.5x fp32's here."""
    if name != "auto":
        return name
    key = machine_key(device)
    cached = json.loads(CACHE.read_text()) if CACHE.is_file() else {}
    if key not in cached:
        fp32, bf16 = matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)
        cached[key] = {"precision": "bf16" if bf16 >= 1.5 * fp32 else "fp32",
                       "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1)}
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cached, indent=1))
        except OSError:
            pass  # a read-only home only costs the measurement next time
    return cached[key]["precision"]


def setup_runtime(cfg: RunConfig) -> Runtime:
    """Threads, seeds, device and precision for one stage."""
    r = cfg.runtime
    if r.threads > 0:
        torch.set_num_threads(r.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(r.device)
    if device.type == "cpu":
        keep_freed_memory()  # training passes reuse freed activations instead of page-faulting fresh ones
    return Runtime(device, resolve_precision(r.precision, device), cfg.seed,
                   int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

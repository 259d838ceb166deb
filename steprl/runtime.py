"""Where a stage's tensors live and how they compute: device, precision, seed, threads, and which
process of a launch this is (torchrun / accelerate launch set RANK, WORLD_SIZE and LOCAL_RANK).

    rt = setup_runtime(cfg)            once per stage, before anything random happens
    model.to(rt.device)                every tensor a recipe builds goes there too
    with rt.autocast(): ...            bf16 matmuls where precision is bf16; fp32 master weights

Data parallel across processes is torch.distributed's (gloo on CPUs, NCCL on GPUs), the same
all-reduce DDP does, called where a recipe needs it:

    mine = rt.shard(batch)             this rank's equal, contiguous part of a global batch
    rt.sync_gradients(params, ok)      gradients averaged over ranks; False (all skip) if any rank's were not finite
    rt.mean_metrics(metrics)           every logged number averaged over ranks
    rt.gather(items)                   every rank's items, in rank order, on every rank
    rt.adamw(params, lr=...)           AdamW; under zero_stage 1, its moments split over ranks (ZeRO-1)
    model = rt.prepare(model)          on the device; under zero_stage 2/3, its parameters split over ranks (FSDP)

With one process each of these returns its input: no process group, no cost.

Precision "auto" measures once per machine whether a bf16 matmul beats fp32 here (CPUs with AMX
and GPUs: several times; CPUs without bf16 units: hundreds of times slower) and caches the answer.
Log-probs, KL and values are always computed from fp32 logits (`.float()` before log_softmax).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

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
    zero_stage: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory and prints."""
        return self.rank == 0

    def autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def rollout_precision(self, asked: str) -> str:
        """`rollout.precision`: fp32 or bf16 as asked; auto samples in the training passes' precision."""
        return self.precision if asked == "auto" else asked

    # ------------------------------------------------------------ data parallel (identity on one process)

    @property
    def shards_parameters(self) -> bool:
        """zero_stage 2 or 3 on several processes: parameters, gradients and moments split over ranks."""
        return self.zero_stage >= 2 and self.world_size > 1

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this process's device; under zero_stage 2 or 3 on several processes, sharded
        with FSDP (torch's `fully_shard`): each transformer block, then the whole model, is a unit
        whose parameters are gathered for its forward and backward and whose gradients are
        reduce-scattered, averaged, as sync_gradients would. Stage 3 frees a block's gathered
        parameters after its forward (gathered again for the backward), stage 2 keeps them until
        the backward. Collect the parameters for the optimiser after this: FSDP replaces them."""
        model.to(self.device)
        if not self.shards_parameters:
            return model
        from torch.distributed.fsdp import fully_shard

        # HF's name for a transformer block, declared by the model or (PPO's critic) the trunk inside it
        blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
        units = [m for m in model.modules() if type(m).__name__ in blocks]
        if not units:
            raise ValueError(f"runtime.zero_stage={self.zero_stage}: {type(model).__name__} names no transformer "
                             f"block (_no_split_modules) to shard by; use zero_stage 1")
        for unit in units:
            fully_shard(unit, reshard_after_forward=self.zero_stage == 3)
        # the rest (embeddings, final norm, LM head) stays gathered from the forward to the backward:
        # the backward starts there, and sft_loss applies the LM head after the forward returns
        return fully_shard(model, reshard_after_forward=False)

    def full_state_dict(self, model: torch.nn.Module) -> dict | None:
        """Under sharded parameters, the whole model's state dict, gathered on rank 0 (on the CPU;
        other ranks get {}); every rank must call it. None otherwise: model.state_dict() is whole."""
        if not self.shards_parameters:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied weight once, under its parameter's name (the LM head that is the embedding), as save_pretrained does
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return {k: v for k, v in whole.items() if k in names}

    def optimizer_state_dict(self, model: torch.nn.Module, optimizer, shards_to: Path | None = None) -> dict:
        """The optimiser's state for a checkpoint; every rank must call it. Under zero_stage 2/3 each
        rank writes its own shard into the directory `shards_to` (torch.distributed.checkpoint, by
        parameter name: nothing is gathered) and the state is {"sharded": its name}; under 1
        rank 0 collects the other ranks' shards; else it is rank 0's state."""
        if self.shards_parameters:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=shards_to)
            return {"sharded": shards_to.name}  # found beside trainer_state.pt (load_state)
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            return self._gather_zero1_state(optimizer)
        return optimizer.state_dict() if self.is_main else {}

    def _gather_zero1_state(self, optimizer: ZeroRedundancyOptimizer) -> dict:
        """ZeRO-1's whole state on rank 0 in torch's consolidated format (indexed by the parameters'
        global order, as its load_state_dict reads it): each rank sends rank 0 the moments of the
        parameters it owns, tensor by tensor. torch's own consolidate_state_dict pickles every
        shard through a broadcast: 66 s and +5 GB on the sending rank for SmolLM2's 135M
        parameters over gloo (docs/benchmarks.md, "Sharded training")."""
        index = optimizer._param_to_index  # torch's own numbering of the parameters
        mine = {index[q]: state for q, state in optimizer.optim.state.items()}
        layouts = [None] * self.world_size  # which state each rank holds: names, shapes, dtypes
        dist.all_gather_object(layouts, {i: {k: ("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else v
                                             for k, v in state.items()} for i, state in mine.items()})
        whole = {}
        for rank, layout in enumerate(layouts):
            for i, entry in sorted(layout.items()):
                if rank == 0:
                    whole[i] = mine.get(i) if self.is_main else None
                    continue
                got = {}
                for k, spec in entry.items():
                    if not (isinstance(spec, tuple) and spec[:1] == ("tensor",)):
                        got[k] = spec
                    elif self.rank == rank:
                        dist.send(mine[i][k].contiguous(), dst=0)
                    elif self.is_main:
                        got[k] = torch.empty(spec[1], dtype=spec[2], device=self.device)
                        dist.recv(got[k], src=rank)
                whole[i] = got
        if not self.is_main:
            return {}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[q] for q in g["params"]]}
                  for g in optimizer.param_groups]
        return {"state": whole, "param_groups": groups}

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, saved: dict | None) -> None:
        """Restore what optimizer_state_dict saved (each rank keeps its own share of it). None: a
        stage's last checkpoint, which has none (nothing steps after it)."""
        if saved is None:
            return
        sharded = "sharded" in saved
        if sharded != self.shards_parameters:
            raise ValueError("this checkpoint's optimizer state was saved with parameters "
                             f"{'sharded' if sharded else 'whole'} (runtime.zero_stage), this launch has them "
                             f"{'sharded' if self.shards_parameters else 'whole'}: resume it with runtime.zero_stage "
                             f"{'2 or 3 on several processes' if sharded else '0 or 1'}")
        if sharded:  # each rank reads its part, whatever the number of ranks that wrote it
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            optimizer.zero_grad(set_to_none=True)  # torch builds the state to fill with a step on zero gradients, only when none are left
            state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, checkpoint_id=saved["sharded"])
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(saved)

    def adamw(self, params, **kwargs) -> torch.optim.Optimizer:
        """torch's AdamW; under `zero_stage: 1` on several processes, ZeRO stage 1: each rank keeps
        the moments of its 1/world_size of the parameters, updates them and broadcasts them
        (torch's ZeroRedundancyOptimizer, after sync_gradients has averaged every gradient).
        Under 2/3 the parameters are FSDP's shards already, and so are their moments."""
        if self.zero_stage == 1 and self.world_size > 1:
            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def rank_seed(self, seed: int) -> int:
        """The seed of this rank's sampling: rank 0 keeps `seed`, the others their own streams."""
        return seed + (self.rank << 32)

    def shard(self, items: list, what: str = "batch", even: bool = True) -> list:
        """This rank's contiguous part of `items`: 1/world_size of them, so that groups of
        consecutive items stay together when their size divides it; with even=False, parts that
        differ by at most one item (possibly none)."""
        if self.world_size == 1:
            return items
        if even and len(items) % self.world_size:
            raise ValueError(f"{what} of {len(items)} does not split evenly over {self.world_size} processes")
        n, extra = divmod(len(items), self.world_size)
        lo = self.rank * n + min(self.rank, extra)
        return items[lo:lo + n + (self.rank < extra)]

    def weight(self, n: float) -> float:
        """This rank's weight in a launch-wide mean, n * world_size / sum_r n_r: a rank's mean loss
        over its n items times it, averaged over ranks by sync_gradients, is the mean over all items."""
        if self.world_size == 1:
            return 1.0
        return n * self.world_size / max(self.sum(n), 1e-12)

    def agree(self, ok: bool) -> bool:
        """True on every rank when it is True on every rank."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(flag)
        return flag.item() == 0

    def sync_gradients(self, params, ok: bool = True) -> bool:
        """Average the gradients of `params` over ranks, as DDP does after backward. Every rank
        calls it once per optimiser step; if any rank's loss was not finite, all skip (False).
        FSDP's backward averaged its own (sharded) parameters' gradients already; the rest, such as
        PPO's value head beside a sharded policy, are averaged here."""
        if not self.agree(ok):
            return False
        if self.world_size == 1:
            return True
        params = [q for q in params if q.requires_grad and not isinstance(q, DTensor)]
        if not params:
            return True
        for q in params:
            if q.grad is None:  # a parameter this rank's batch did not reach still joins the sum
                q.grad = torch.zeros_like(q)
        flat = torch.cat([q.grad.reshape(-1).float() for q in params])  # one collective, not one per tensor
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for q in params:
            q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
            offset += q.numel()
        return True

    def gather(self, items: list) -> list:
        """Every rank's `items` concatenated in rank order, on every rank."""
        if self.world_size == 1:
            return items
        parts = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def mean_metrics(self, metrics: dict) -> dict:
        """Numbers averaged over the ranks that logged them (ranks roll out equal shares, so a
        mean of means is the batch's mean); events from any rank are kept."""
        if self.world_size == 1:
            return metrics
        parts = [None] * self.world_size
        dist.all_gather_object(parts, metrics)
        out = {}
        for part in parts:
            for k, v in part.items():
                if isinstance(v, str):
                    out.setdefault(k, v)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(k, []).append(float(v))
                else:
                    out.setdefault(k, v)
        return {k: (sum(v) / len(v) if isinstance(v, list) else v) for k, v in out.items()}

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    """cpu, or this process's GPU (LOCAL_RANK's, under a launcher)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device: cuda was asked for, but torch sees no CUDA device (runtime.device=cpu or auto)")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def launch_zero_stage(asked: int) -> int:
    """The ZeRO stage of this launch: the config's, or the one an `accelerate launch` config asks
    for when the config leaves it at 0. FSDP: FULL_SHARD / resharding after forward 3,
    SHARD_GRAD_OP 2, NO_SHARD 0. DeepSpeed: its zero_stage, run by torch (1: ZeRO-1's
    ZeroRedundancyOptimizer, 2 and 3: FSDP), not by DeepSpeed's engine; offloading is refused."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage, what = deepspeed_zero_stage(env), "DeepSpeed's ZeRO stage"
    elif env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        stage, what = fsdp_zero_stage(env), "FSDP's stage"
    else:
        return asked
    if asked not in (0, stage):
        raise ValueError(f"runtime.zero_stage={asked}, but the accelerate config asks for {what} {stage}: "
                         f"leave runtime.zero_stage at 0 or make them agree")
    return stage


def fsdp_zero_stage(env) -> int:
    """The ZeRO stage an accelerate FSDP config's environment asks for (configs/accelerate/fsdp.yaml)."""
    if env.get("FSDP_VERSION") == "2":
        return 2 if env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "false" else 3
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    stages = {"FULL_SHARD": 3, "1": 3, "SHARD_GRAD_OP": 2, "2": 2, "NO_SHARD": 0, "3": 0}
    if strategy not in stages:
        raise ValueError(f"accelerate asked for FSDP's {strategy}, which steprl does not run: "
                         f"FULL_SHARD, SHARD_GRAD_OP or NO_SHARD (configs/accelerate/fsdp.yaml)")
    return stages[strategy]


def deepspeed_zero_stage(env) -> int:
    """The ZeRO stage an accelerate DeepSpeed config's environment asks for: its zero_stage, or
    zero_optimization.stage in the DeepSpeed JSON it names (configs/accelerate/deepspeed_zero3.yaml)."""
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # accelerate's default
    offload = [env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{part}_DEVICE", "none").lower() for part in ("OPTIMIZER", "PARAM")]
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        path = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        try:
            zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
        except (OSError, ValueError) as err:
            raise ValueError(f"accelerate's deepspeed_config_file {path}: cannot be read as JSON ({err})") from None
        stage = zero.get("stage", 0)
        offload = [str(zero.get(f"offload_{part}", {}).get("device", "none")).lower() for part in ("optimizer", "param")]
    if str(stage) not in ("0", "1", "2", "3"):
        raise ValueError(f"accelerate asked for DeepSpeed's ZeRO stage {stage!r}: steprl runs 0, 1, 2 or 3")
    if any(device not in ("none", "") for device in offload):
        raise ValueError("accelerate asked for DeepSpeed's offloading to the CPU or NVMe, which steprl does not run: "
                         "set offload_optimizer_device and offload_param_device to none")
    return int(stage)


def is_main_process() -> bool:
    """Rank 0 of a launch, or the only process."""
    return int(os.environ.get("RANK", 0)) == 0


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment; joins its process group once."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # a rank that dies makes the launcher stop the others; the timeout bounds a wait on a hung one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    if rank != 0 and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; every rank's errors still reach stderr
        os.environ["STEPRL_NO_PROGRESS"] = "1"
    return rank, world


def leave_process_group() -> None:
    """Once every rank is done: leave the process group. A process that exits inside it can abort
    at exit (SIGABRT from gloo's threads; seen in 1 of 4 launches after ZeRO's broadcasts), which
    the launcher reports as a failed rank."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


BF16_MIN_SPEEDUP = 1.5  # bf16 is chosen where its matmul runs at least this much faster than fp32's


def faster_precision(fp32_gflops: float, bf16_gflops: float) -> str:
    """bf16 where its measured matmul speed is at least BF16_MIN_SPEEDUP x fp32's, else fp32."""
    return "bf16" if bf16_gflops >= BF16_MIN_SPEEDUP * fp32_gflops else "fp32"


def resolve_precision(name: str, device: torch.device) -> str:
    """fp32 or bf16; "auto" picks the faster here (`faster_precision`), measured once per machine."""
    if name != "auto":
        return name
    key = machine_key(device)
    cached = json.loads(CACHE.read_text()) if CACHE.is_file() else {}
    if key not in cached:
        fp32, bf16 = matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)
        cached[key] = {"precision": faster_precision(fp32, bf16),
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
    zero_stage = launch_zero_stage(r.zero_stage)
    device = resolve_device(r.device)
    if device.type == "cpu":
        keep_freed_memory()  # training passes reuse freed activations instead of page-faulting fresh ones
    rank, world = init_distributed(device)
    precision = [resolve_precision(r.precision, device) if rank == 0 else None]
    if world > 1:  # rank 0's measurement decides for all: ranks that disagreed would not be data parallel
        dist.broadcast_object_list(precision, src=0)
    return Runtime(device, precision[0], cfg.seed, rank, world, zero_stage)

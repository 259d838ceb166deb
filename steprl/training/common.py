"""Small pieces every recipe uses: stage directories, schedules, the optimiser, resumable state."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from steprl.config import RunConfig


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    path = cfg.run_dir / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def previous_checkpoint(cfg: RunConfig, stage: str) -> str:
    """What a stage starts from: the last earlier stage of this run that trains a policy."""
    order = [s for s in cfg.stages if s != "rm"]
    before = order[: order.index(stage)] if stage in order else []
    return str(cfg.run_dir / before[-1] / "checkpoint") if before else cfg.model.name_or_path


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR: linear warm-up over `warmup` steps, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def wsd_lr(step: int, total: int, warmup: int, decay_fraction: float = 0.2, min_ratio: float = 0.0) -> float:
    """Warm-up, stable, decay: linear warm-up, the peak LR held, then a linear decay to `min_ratio`
    over the last `decay_fraction` of the steps. Holding the peak longer lets abrupt skills
    (copying) appear sooner than under cosine, which starts lowering the LR at once."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total - int(decay_fraction * total)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total - decay_start)
    return 1.0 - (1.0 - min_ratio) * min(1.0, progress)


def adamw(params, rt=None, **kwargs) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over each tensor instead of ~10 foreach kernels):
    0.05 s against 0.86 s per step for SmolLM2's 135M parameters on 2 cores. The update is the
    same up to float rounding. The RL recipes use it; pretrain, SFT and RM keep torch's default
    kernel, because the embedded demo's outcome turned out to hang on that rounding: the same
    pretraining with the fused kernel gave a model whose SFT reached 0.37 instead of 0.84-0.91
    (docs/experiments.md, "Reproducibility"), and their step is cheap either way. Under
    `runtime.zero_stage: 1` each rank keeps a shard of the state (`Runtime.adamw`)."""
    if rt is not None:
        return rt.adamw(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, fused=True, **kwargs)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def progress_bar(total: int, desc: str, initial: int = 0):
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                disable=os.environ.get("STEPRL_NO_PROGRESS") == "1")


# ------------------------------------------------------------------ resume and completion
#
# A stage's checkpoint directory is only ever replaced whole: commit_checkpoint writes the new one
# into a temporary sibling and renames it into place, so a kill at any moment leaves either the
# previous checkpoint or the new one, never a mix of the two. A periodic checkpoint carries
# trainer_state.pt (step, optimiser, random streams); the final one keeps it (without the
# optimiser: nothing steps after it) until done.json is written, so a kill in between resumes at
# the last step and only saves again.

STATE_FILE = "trainer_state.pt"
OPTIMIZER_SHARDS = "optimizer"  # under zero_stage 2/3: each rank's part of the optimizer state (torch.distributed.checkpoint)
DONE_FILE = "done.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a file that a reader (or a rerun after a kill) sees whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit_checkpoint(directory: Path, write, staged: bool = False) -> None:
    """`write(tmp)` fills a temporary sibling of `directory`, which then replaces it (`staged`:
    the sibling exists already, holding what the other ranks wrote into it).

    Two renames (the old one aside, the new one in): a kill between them leaves only the old one,
    aside, and recover_checkpoint puts it back. Atomic against a killed process, not a power cut
    (nothing is fsync'ed).
    """
    tmp, old = _siblings(directory)
    if not staged:
        empty_staging(directory)
    write(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def empty_staging(directory: Path) -> Path:
    """The temporary sibling a new checkpoint of `directory` is written into, created empty."""
    tmp = _siblings(directory)[0]
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def recover_checkpoint(directory: Path) -> None:
    """Undo what a kill inside commit_checkpoint left: a half-written temporary directory is dropped,
    the previous checkpoint put back if it was set aside and the new one not yet in place."""
    tmp, old = _siblings(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not directory.exists():
        with contextlib.suppress(FileNotFoundError):  # every rank of a launch recovers; one rename wins
            os.replace(old, directory)
    shutil.rmtree(old, ignore_errors=True)


def _siblings(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")


def random_streams(*own) -> dict:
    """This process's random state: python's and torch's global generators (CUDA's too, once used)
    and a stage's own (torch.Generator or random.Random), so that a resumed run draws what the
    uninterrupted run would have drawn."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "own": [g.get_state() if isinstance(g, torch.Generator) else g.getstate() for g in own]}


def restore_streams(state: dict, rank: int, world_size: int, *own) -> None:
    """Continue the streams a checkpoint saved for this rank (`state["streams"]`: one
    random_streams per rank). Called right before the training loop, so that whatever the setup
    drew does not shift them. A launch with another number of processes keeps its fresh seeds."""
    streams = state.get("streams") or []
    if len(streams) != world_size:
        return
    saved = streams[rank]
    random.setstate(saved["python"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    for g, s in zip(own, saved["own"]):
        if isinstance(g, torch.Generator):
            g.set_state(s)
        else:
            g.setstate(s)


def save_state(directory: Path, step: int, optimizer_state: dict, streams: list[dict], extra: dict | None = None) -> None:
    """Step, optimiser state and every rank's random streams (a list of random_streams, in rank
    order), into a checkpoint directory being written (see commit_checkpoint)."""
    state = {"step": step, "optimizer": optimizer_state, "streams": streams, "extra": extra or {}}
    torch.save(state, directory / STATE_FILE)


def save_resumable(ckpt: Path, rt, step: int, optimizer, write_model, *own, extra: dict | None = None,
                   model=None, last: bool = False) -> None:
    """A checkpoint a stage resumes from: every rank's random streams (`own`: the stage's own
    generators) and the optimiser's state gathered (under zero_stage 2/3 each rank writes its own
    part into the new checkpoint instead), then rank 0 commits `write_model(directory, weights)`
    and the trainer state whole. `weights` is `model`'s whole state dict when its
    parameters are sharded over ranks (gathered here), else None (the model holds them whole).
    `last`: the stage's final save, after which nothing steps, so no optimiser state (under
    sharding, gathering it on rank 0 would be the run's memory peak). Every rank calls it."""
    streams = rt.gather([random_streams(*own)])
    weights = rt.full_state_dict(model) if model is not None else None
    staging, staged = _siblings(ckpt)[0], rt.shards_parameters and not last
    if staged:  # every rank writes its optimizer shard into the new checkpoint
        if rt.is_main:
            empty_staging(ckpt)
        rt.barrier()
    optimizer_state = None if last else rt.optimizer_state_dict(model, optimizer, staging / OPTIMIZER_SHARDS)
    if not rt.is_main:
        return

    def write(directory: Path) -> None:
        write_model(directory, weights)
        save_state(directory, step, optimizer_state, streams, extra)

    commit_checkpoint(ckpt, write, staged=staged)


def load_state(directory: Path) -> dict | None:
    """The trainer state of an interrupted stage, None when there is none (a fresh start). A kill
    inside commit_checkpoint is undone first."""
    recover_checkpoint(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if isinstance(state["optimizer"], dict) and "sharded" in state["optimizer"]:
        state["optimizer"]["sharded"] = str(directory / state["optimizer"]["sharded"])
    return state


def trainable_weights(model) -> dict:
    """The parameters that train, by name: what a resume needs when the base is rebuilt from its
    own checkpoint (load back with model.load_state_dict(weights, strict=False)). Whole tensors:
    under FSDP each is gathered from its shards, so every rank must call it."""
    return {n: (q.full_tensor() if isinstance(q, DTensor) else q).detach().clone()
            for n, q in model.named_parameters() if q.requires_grad}


def mark_done(directory: Path, info: dict) -> None:
    write_atomic(directory / DONE_FILE, json.dumps(info))


def finish(directory: Path, ckpt: Path, info: dict) -> dict:
    """A stage's last act: done.json, then the trainer state its final checkpoint kept until now."""
    mark_done(directory, info)
    (ckpt / STATE_FILE).unlink(missing_ok=True)
    return info


def done_info(directory: Path) -> dict | None:
    path = directory / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

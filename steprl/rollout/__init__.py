"""Rollouts: engines that sample turns (engine.py: the seam; native.py, hf.py) and the agent loop
that plays episodes with them (episodes.py)."""
from __future__ import annotations

import torch

from steprl.rollout.engine import RolloutEngine, Turn
from steprl.rollout.hf import HFEngine
from steprl.rollout.native import NativeEngine

ENGINES = ("native", "hf")


def make_engine(name: str, model, tokenizer, device: str = "cpu", release_memory: bool = False,
                precision: str = "fp32"):
    """`rollout.engine`: "native", "hf", or "auto" (native where it supports the model and device),
    sampling in `precision` (fp32 or bf16; log-probs from fp32 logits either way)."""
    if name not in (*ENGINES, "auto"):
        raise ValueError(f"rollout.engine: unknown engine '{name}' (allowed: auto, {', '.join(ENGINES)})")
    if name == "auto":
        name = "native" if NativeEngine.supports(model, device) else "hf"
    if name == "native":
        if device != "cpu":
            raise ValueError(f"rollout.engine: native runs on the CPU only, not {device}; use hf")
        return NativeEngine(model, tokenizer, release_memory, torch.bfloat16 if precision == "bf16" else torch.float32)
    return HFEngine(model, tokenizer, precision)


__all__ = ["ENGINES", "HFEngine", "NativeEngine", "RolloutEngine", "Turn", "make_engine"]

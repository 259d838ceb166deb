#!/usr/bin/env python
"""Where a training pass of SmolLM2 spends its time, by torch op: one forward + backward of 16
sequences x 250 tokens (the LM head on the last 64 positions, as completions are scored), under
LoRA r16 on attention (`lora`), on every linear layer (`lora_all`) or full fine-tuning (`full`),
in bf16 autocast or fp32.

    python benchmarks/pass_profile.py --mode lora_all --precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

from steprl.config import LoraConfig
from steprl.memory import keep_freed_memory
from steprl.models.hub import load_causal_lm
from steprl.models.loading import apply_lora, unwrap_peft

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["lora", "lora_all", "full"], default="lora_all")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--rows", type=int, default=18)
    a = ap.parse_args()
    keep_freed_memory()  # as the RL recipes run
    model, _ = load_causal_lm("smollm2")
    if a.mode != "full":
        modules = ATTENTION + (["gate_proj", "up_proj", "down_proj"] if a.mode == "lora_all" else [])
        model = apply_lora(model, LoraConfig(enabled=True, r=16, alpha=32, target_modules=modules))
    model.train()
    lm = unwrap_peft(model)
    ids = torch.randint(100, 40000, (16, 250), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        amp = (torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16"
               else contextlib.nullcontext())
        with amp:
            logits = lm.lm_head(lm.model(input_ids=ids).last_hidden_state[:, -64:])
        torch.log_softmax(logits.float(), -1).mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(2):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"{a.mode} {a.precision}: forward + backward {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=44))


if __name__ == "__main__":
    main()

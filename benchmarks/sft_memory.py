#!/usr/bin/env python
"""SFT steps of SmolLM2 under each malloc setting: seconds per step and resident memory.

    python benchmarks/sft_memory.py calc keep 10      # the task's config: configs/smollm2_calc.yaml
    python benchmarks/sft_memory.py gsm8k free 40     # configs/gsm8k_smollm2.yaml

Settings: `free` is glibc's behaviour with a fixed 128 KB mmap threshold (every large block goes
back to the OS when freed; `sft.keep_freed_memory: false`), `keep` is the RL stages' setting
(`memory.keep_freed_memory`; `sft.keep_freed_memory: true`), `mmapN` keeps blocks below N MB in
the heap and maps larger ones. Batches of 8 of the task's cold-start conversations, LoRA and
max_length from the config, bf16 autocast, AdamW. Prints one line per 5 steps.
"""
from __future__ import annotations

import argparse
import ctypes
import random
import resource
import time

import torch

from steprl.config import load_config
from steprl.memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
from steprl.models.loading import apply_lora, load_policy, resolve
from steprl.recipes.sft import cold_start, collate, sft_loss, tokenize_conversations
from steprl.tasks import get_task

CONFIGS = {"calc": "configs/smollm2_calc.yaml", "gsm8k": "configs/gsm8k_smollm2.yaml"}


def resident_gb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=sorted(CONFIGS))
    ap.add_argument("mode", help="free | keep | mmapN")
    ap.add_argument("steps", type=int)
    a = ap.parse_args()
    keep_freed_memory(a.mode == "keep")
    if a.mode.startswith("mmap"):  # heap below N MB, trimmed above 32 MB of free top
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, int(a.mode[4:]) << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 32 << 20)
    cfg = load_config(CONFIGS[a.task])
    s = cfg.sft
    model, tokenizer = load_policy(resolve(cfg.model.name_or_path))
    task = get_task(cfg.task.name, **cfg.task.args)
    examples = tokenize_conversations(task, tokenizer, cold_start(task, 8 * a.steps, 0.0, seed=0), s.max_length)
    random.Random(0).shuffle(examples)
    model = apply_lora(model, s.lora).train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for k in range(a.steps):
        start = time.perf_counter()
        ids, attn, labels = collate(examples[8 * k: 8 * k + 8], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sft_loss(model, ids, attn, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if (k + 1) % 5 == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(f"{a.task} {a.mode} step {k + 1}: width {ids.shape[1]}, {sum(times[-5:]) / 5:.2f} s/step "
                  f"(last 5), RSS {resident_gb():.2f} GB, peak {peak:.2f} GB", flush=True)


if __name__ == "__main__":
    main()

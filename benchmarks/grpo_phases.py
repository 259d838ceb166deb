#!/usr/bin/env python
"""Where a GRPO step's time and memory go: our step on SmolLM2 (the benchmark's settings: 4 prompts x
4 generations, <= 64 new tokens, kl_coef 0.04), each phase timed and its peak RSS read.

    python benchmarks/grpo_phases.py [--full] [--steps 5] [--micro-batch 4] [--release-memory] [--default-malloc]
                                     [--precision bf16]

Phases: rollout (prefill + decode), reference (the KL reference's log-probs), forward (the
training forward, inside forward+backward), forward+backward, optimizer. The first step is a
warm-up and is printed apart. --default-malloc leaves glibc's malloc as it is; without it the
step runs as the RL recipes run it (`memory.keep_freed_memory`).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the benchmark's set-up: offline, same step, same settings)
import torch  # noqa: E402

from steprl.recipes import grpo  # noqa: E402
from steprl.training import rl  # noqa: E402
from steprl.memory import keep_freed_memory  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE / 1e9


class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h), all size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


try:
    LIBC = ctypes.CDLL("libc.so.6")
    LIBC.mallinfo2.restype = MallInfo2
except (OSError, AttributeError):  # not glibc (or older than 2.33)
    LIBC = None


def live_heap_gb() -> float:
    """Bytes malloc has handed out and not got back, in the heap and in own mappings (counted
    whole: MKL's packed weights touch a quarter of theirs); 0 where not glibc."""
    if LIBC is None:
        return 0.0
    info = LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 1e9


class Phases:
    """Wall time per call of some functions, and the peaks of the RSS and of the live heap (what
    malloc has handed out) seen while each ran, sampled every 5 ms. Their difference is what the
    heap keeps resident beyond its live blocks, plus what lives outside malloc (the policy's
    weights, mapped from their file; the libraries)."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.peak: dict[str, float] = {}
        self.live: dict[str, float] = {}
        self.current = "other"
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            name, rss, live = self.current, resident_gb(), live_heap_gb()
            self.peak[name] = max(self.peak.get(name, 0.0), rss)
            self.live[name] = max(self.live.get(name, 0.0), live)
            time.sleep(0.005)

    def wrap(self, owner, attr: str, name: str):
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            outer, self.current = self.current, name
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times.setdefault(name, []).append(time.perf_counter() - start)
                self.current = outer
        setattr(owner, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA r16 on q,k,v,o)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    ap.add_argument("--micro-batch", type=int, default=0, help="micro_batch_size (0: the 16 sequences in one pass)")
    ap.add_argument("--release-memory", action="store_true", help="rollout.release_memory")
    ap.add_argument("--default-malloc", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: passes under autocast, the rollout decoding in bf16")
    a = ap.parse_args()
    if not a.default_malloc:
        keep_freed_memory()
    phases = Phases()
    phases.wrap(rl, "run_episodes", "rollout")
    phases.wrap(grpo, "reference_logprobs", "reference")
    phases.wrap(grpo, "minibatch_backward", "forward+backward")
    phases.wrap(grpo, "policy_loss", "forward")  # nested in forward+backward
    phases.wrap(torch.optim.AdamW, "step", "optimizer")
    settings = {"prompts": 4, "generations": 4, "max_new_tokens": 64}
    row = bench.bench_grpo_ours("smollm2", bench.smollm2_factory(), not a.full, settings, a.steps, 1.0,
                                micro_batch_size=a.micro_batch, release_memory=a.release_memory,
                                precision=a.precision)
    print(f"GRPO step, SmolLM2, {'full' if a.full else 'LoRA r16'}, {a.precision}, micro-batch {a.micro_batch or 16}, "
          f"release_memory {a.release_memory}, "
          f"malloc {'default' if a.default_malloc else 'keep_freed_memory'}")
    print("  step s (after the warm-up): " + ", ".join(f"{t:.2f}" for t in row["step_seconds_all"])
          + f" (median {row['step_seconds']:.2f})")
    for name, ts in phases.times.items():
        calls_per_step = len(ts) // (a.steps + 1)
        per_step = [sum(ts[i * calls_per_step:(i + 1) * calls_per_step]) for i in range(a.steps + 1)]
        print(f"  {name:17s} warm-up {per_step[0]:6.2f} s, then median {statistics.median(per_step[1:]):6.2f} s "
              f"({', '.join(f'{t:.2f}' for t in per_step[1:])}); peak RSS {phases.peak.get(name, 0):.2f} GB, "
              f"live heap {phases.live.get(name, 0):.2f} GB")
    print(f"  peak RSS of the steps {row['peak_rss_gb_steps']:.2f} GB")


if __name__ == "__main__":
    main()

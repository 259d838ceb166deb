#!/usr/bin/env python
"""The rollout engine's two halves on SmolLM2, each A/B in one process, alternating (drift hits
both sides alike): the prefill packed without padding (`LlamaDecoder.extend`) against HF's padded
passes, and the decode step's attention in torch's fused kernel (`decoder.attend`) against
matmuls (`decoder.attend_matmul`). The benchmark's prompts (`run.task_prompts`).

    python benchmarks/prefill_decode.py [--shapes 64x1,16x4,16x1] [--repeats 5] [--steps 32]

Prefill: seconds to fill the cache for B / G prompts x G copies. Decode: ms per step over
`--steps` steps after the prefill (no sampling: the same token fed to every row).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (offline set-up, the benchmark's prompts)
import torch  # noqa: E402

from steprl.memory import keep_freed_memory  # noqa: E402
from steprl.rollout import decoder as dec  # noqa: E402
from steprl.rollout.sampling import prefill  # noqa: E402


def alternate(variants: dict, repeats: int) -> dict:
    """Median seconds of each variant's callable, one warm-up each, order alternating per repeat."""
    times = {name: [] for name in variants}
    for r in range(repeats + 1):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            start = time.perf_counter()
            variants[name]()
            if r:
                times[name].append(time.perf_counter() - start)
    return times


def decode_steps(model, rows, pad_id, steps: int, attend) -> float:
    """Seconds per decode step over `steps` steps after the prefill, with `attend` as the attention."""
    decoder = dec.LlamaDecoder.for_model(model)
    cache, _, mask, positions, shared = prefill(model, rows, pad_id, steps, decoder)
    decoder.pack(len(rows))
    full = torch.cat([mask, torch.ones(len(rows), steps, dtype=mask.dtype)], dim=1)
    position, token = positions[:, -1] + 1, torch.full((len(rows),), 100)
    kept, dec.attend = dec.attend, attend
    try:
        start = time.perf_counter()
        for t in range(steps):
            decoder.step(token, position + t, cache, full[:, :mask.shape[1] + t + 1], shared)
        return (time.perf_counter() - start) / steps
    finally:
        dec.attend = kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="64x1,16x4,16x1", help="B x G: B rows, B / G distinct prompts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    keep_freed_memory()  # as the RL recipes run
    model, tok = bench.smollm2_factory()()
    model.eval()
    for shape in a.shapes.split(","):
        b, g = (int(x) for x in shape.split("x"))
        prompts, _, _ = bench.task_prompts(tok, b // g)
        rows = [p for p in prompts for _ in range(g)]
        with torch.inference_mode():
            decoder = dec.LlamaDecoder.for_model(model)
            pre = alternate({"packed": lambda: prefill(model, rows, tok.pad_token_id, 64, decoder),
                             "HF": lambda: prefill(model, rows, tok.pad_token_id, 64)}, a.repeats)
            steps = {"fused": [], "matmul": []}
            for r in range(a.repeats):
                for name in (("fused", "matmul") if r % 2 == 0 else ("matmul", "fused")):
                    attend = dec.attend if name == "fused" else dec.attend_matmul
                    steps[name].append(decode_steps(model, rows, tok.pad_token_id, a.steps, attend))
        print(f"{shape}: prefill packed {statistics.median(pre['packed']):.2f} s, HF {statistics.median(pre['HF']):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in pre['packed'])} / {', '.join(f'{x:.2f}' for x in pre['HF'])}); "
              f"decode step, attention fused {1e3 * statistics.median(steps['fused']):.1f} ms, "
              f"matmul {1e3 * statistics.median(steps['matmul']):.1f} ms", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Which weight layout makes the decode step fastest: the model's own weights through `F.linear`
(what `rollout.decoder` does), oneDNN's packed copies (`mkldnn_linear`, an earlier choice), or transposed copies (`x @ W^T`). Two measurements:

  1. the real thing: SmolLM2 generation (64 sampled tokens), each layout in turn, interleaved
     ("MKL packed" is the decoder's own packing, LM head included, packing time included);
  2. one layer shape streamed from memory: 60 different [1536, 576] weights (212 MB, more than any
     cache), so each is read from DRAM as in a decode step, against the machine's read bandwidth.

    python benchmarks/decode_layouts.py [--batch 16] [--group 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from steprl.rollout import decoder as dec  # noqa: E402
from steprl.rollout.sampling import SamplingParams, generate  # noqa: E402


def onednn(x, wb):
    return torch._C._nn.mkldnn_linear(x.to_mkldnn(), wb[0], None).to_dense()


def transposed(x, wb):
    return x @ wb[0]


ROWS = 16  # the batch the MKL-packed layout is packed for (main sets it)


def mkl_packed(x, wb):
    packed, weight = wb[0]
    return torch.ops.mkl._mkl_linear(x, packed, weight, None, ROWS)


LAYOUTS = {  # name: (how a weight is stored, how the step applies it)
    "F.linear": (None, None),
    "oneDNN": (lambda w: w.to_mkldnn(), onednn),
    "transposed": (lambda w: w.t().contiguous(), transposed),
    "MKL packed": (lambda w: (torch.ops.mkl._mkl_reorder_linear_weight(w, ROWS), w), mkl_packed),
}


def use_layout(decoder, name: str) -> None:
    """Re-store the decoder's projection weights in a layout (no biases in these models)."""
    store, apply = LAYOUTS[name]
    for layer in decoder.layers:
        for p in dec.PROJECTIONS:
            w = layer[p][0] if name == "F.linear" else store(layer[p][0])
            layer[p] = (w, None) if apply is None else _Applied(w, apply)


class _Applied(tuple):
    """(weight, None) that the step's `linear` hands to `apply`."""

    def __new__(cls, weight, apply):
        obj = super().__new__(cls, (weight, None))
        obj.apply = apply
        return obj


def streamed(M: int, how: str, reps: int = 7) -> float:
    weights = [torch.randn(1536, 576) for _ in range(60)]
    stored = [LAYOUTS[how][0](w) if LAYOUTS[how][0] else w for w in weights]
    x = torch.randn(M, 576)
    apply = LAYOUTS[how][1] or (lambda x, wb: F.linear(x, wb[0]))

    def once():
        for w in stored:
            apply(x, (w, None))
    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=4, help="rows per prompt (the GRPO shape)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    global ROWS
    ROWS = a.batch

    plain_linear = dec.LlamaDecoder.linear
    dec.LlamaDecoder.linear = lambda self, x, wb: (wb.apply(x, wb) if isinstance(wb, _Applied)
                                                   else plain_linear(self, x, wb))
    model, tok = bench.smollm2_factory()()
    prompts, _, _ = bench.task_prompts(tok, a.batch)
    rows = [p for p in prompts[:a.batch // a.group] for _ in range(a.group)]
    params = SamplingParams(max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0)
    results: dict[str, list[float]] = {}
    with torch.inference_mode():
        for r in range(a.repeats + 1):  # round 0 warms up
            for name in (list(LAYOUTS) if r % 2 else list(LAYOUTS)[::-1]):
                dec.LlamaDecoder.forget(model)
                dec.MKL_PACKED = name == "MKL packed"  # the decoder's own packing (its head too)
                use_layout(dec.LlamaDecoder.for_model(model), "F.linear" if dec.MKL_PACKED else name)
                t = time.perf_counter()
                generate(model, tok, rows, params, stop=bench.NoStop(), generator=torch.Generator().manual_seed(0))
                if r:
                    results.setdefault(name, []).append(time.perf_counter() - t)
    print(f"SmolLM2 generation, {a.batch // a.group} prompts x {a.group}, 64 new tokens, seconds:")
    for name, ts in results.items():
        print(f"  {name:11s} median {statistics.median(ts):6.2f}  ({', '.join(f'{t:.2f}' for t in ts)})")

    big = torch.randn(135_000_000)  # 540 MB, SmolLM2's weights
    big.sum()
    t = time.perf_counter()
    big.sum()
    read = 540e6 / (time.perf_counter() - t) / 1e9
    print(f"read bandwidth (sum of 540 MB): {read:.1f} GB/s")
    nbytes = 60 * 1536 * 576 * 4
    for M in (1, 16, 64):
        ROWS = M
        line = ", ".join(f"{how} {nbytes / streamed(M, how) / 1e9:5.1f} GB/s" for how in LAYOUTS)
        print(f"  60 weights [1536, 576] streamed at {M:2d} rows: {line}")


if __name__ == "__main__":
    main()

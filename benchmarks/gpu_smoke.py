"""The GPU path in a few minutes: cold-start SFT and 3 GRPO steps of SmolLM2-135M-Instruct (the
tiny random model with --tiny), bf16 autocast, the hf rollout engine; one JSON line of step times,
tokens/s and peak GPU memory.

    python benchmarks/gpu_smoke.py                     # on a GPU machine (runtime.device: cuda)
    python benchmarks/gpu_smoke.py --device cpu --tiny # the same path on the CPU, to check it runs
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steprl.config import load_config  # noqa: E402
from steprl.recipes import pipeline  # noqa: E402


def read_metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--tiny", action="store_true", help="the toy config's tiny model (pretrained for a few steps)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    common = [f"output_dir={out}", f"runtime.device={args.device}", f"runtime.precision={args.precision}",
              "rollout.engine=hf", "eval_after=[]", "report_to=[]", "grpo.steps=3", "grpo.save_every=0"]
    if args.tiny:
        cfg = load_config(ROOT / "configs/toy.yaml", [*common, "name=smoke", "stages=[pretrain,sft,grpo]"])
    else:
        cfg = load_config(ROOT / "configs/smollm2_calc.yaml",
                          [*common, "name=smoke", "sft.n_examples=128", "sft.epochs=1", "sft.batch_size=16",
                           "grpo.prompts_per_step=8", "grpo.num_generations=4", "grpo.minibatch_size=32",
                           "grpo.micro_batch_size=16"])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = pipeline.run(cfg)
    wall = time.perf_counter() - t0
    sft, grpo = read_metrics(cfg.run_dir / "sft"), read_metrics(cfg.run_dir / "grpo")
    episodes = cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    stages = {r["name"]: r["wall_seconds"] for r in summary["stages"]}
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct",
        "precision": args.precision,
        "sft_seconds": stages.get("sft"),
        "sft_step_seconds": sft[-1].get("step_time"),
        "grpo_step_seconds": [round(m["step_time"], 3) for m in grpo],
        "grpo_rollout_seconds": [round(m["rollout_time"], 3) for m in grpo],
        # sampled tokens per second of rollout: episodes x mean completion length / rollout time
        "rollout_tokens_per_second": [round(episodes * m["completions/mean_length"] / m["rollout_time"], 1)
                                      for m in grpo],
        "grpo_reward": [round(m["reward"], 3) for m in grpo],
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
        "wall_seconds": round(wall, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

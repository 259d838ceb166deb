#!/usr/bin/env python
"""What each rank holds under runtime.zero_stage 0, 1 and 3: full-parameter SFT, reward model,
GRPO or PPO of SmolLM2 on the calculator task, launched with torchrun over N CPU processes (gloo), fp32.

    python benchmarks/sharded_memory.py                 # SFT, 2 processes, stages 0 1 3
    python benchmarks/sharded_memory.py --nproc 2 --stages 0 3 --examples 30
    python benchmarks/sharded_memory.py --recipe grpo --stages 0 3 --steps 2
    python benchmarks/sharded_memory.py --recipe rm --stages 0 3 --examples 32
    python benchmarks/sharded_memory.py --recipe ppo --stages 0 3 --steps 2

Each stage runs `steprl sft|rm|grpo|ppo configs/smollm2_calc.yaml` (LoRA off; the RM a classifier
on SmolLM2's trunk, --examples generated pairs in batches of 8; GRPO from SmolLM2 itself, 8
prompts x 4 episodes of <= 64 tokens a step, micro-batches of 8, the KL's frozen reference on;
PPO the same with 8 episodes a step, one per prompt, and a separate critic) in a fresh launch and
prints one JSON line: the largest peak RSS of any process of the launch
(`ru_maxrss` of the waited-for children), the wall time of the launch (model loading and the
checkpoint included), and the final loss. Memory on the CPU counts everything a process maps (Python, torch, the tokenizer, the
conversations), so the saving shows as a difference between stages, not as a ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(stage: int, args, out: Path) -> dict:
    """One torchrun launch, in a child python so that its ru_maxrss covers this launch only."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "-m", "steprl.cli", args.recipe, "configs/smollm2_calc.yaml", f"output_dir={out}", f"name=z{stage}",
           "report_to=[]", "eval_after=[]", "runtime.precision=fp32", f"runtime.zero_stage={stage}"]
    if args.recipe == "sft":
        cmd += ["sft.lora.enabled=false", f"sft.n_examples={args.examples}", "sft.batch_size=8",
                "sft.keep_freed_memory=false", "sft.log_every=1"]
    elif args.recipe == "rm":
        cmd += ["stages=[rm]", "rm.lora.enabled=false", f"rm.n_pairs={args.examples}", "rm.n_test_pairs=16",
                "rm.epochs=1", "rm.batch_size=8", "rm.save_every=0", "rm.log_every=1"]
    elif args.recipe == "grpo":
        cmd += ["stages=[grpo]", "grpo.lora.enabled=false", f"grpo.steps={args.steps}", "grpo.save_every=0"]
    else:
        cmd += ["stages=[ppo]", "ppo.lora.enabled=false", f"ppo.steps={args.steps}", "ppo.save_every=0",
                "ppo.prompts_per_step=8", "ppo.minibatch_size=8", "ppo.max_new_tokens=64", "ppo.critic=separate"]
    probe = ("import resource, subprocess, sys, json; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(json.dumps({'rc': rc, 'kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "STEPRL_NO_PROGRESS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"zero_stage {stage} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / f"z{stage}" / args.recipe / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"recipe": args.recipe, "zero_stage": stage, "processes": args.nproc,
            "peak_rss_gb_max_rank": round(result["kb"] / 2**20, 3), "wall_s": round(wall, 1),
            "steps": len(losses), "final_loss": round(losses[-1], 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=["sft", "rm", "grpo", "ppo"], default="sft")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="GRPO / PPO steps")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--examples", type=int, default=30,
                    help="SFT conversations (90%% trained on) or RM pairs, batches of 8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            print(json.dumps(launch(stage, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()

"""The algorithm experiments of docs/experiments.md, several seeds each, from one pretrained base.

    python benchmarks/experiments.py --base runs/demo --seeds 0 1 2 [--only agentic pbrft ...] [--set k=v ...]

Every arm starts from the base run's pretrained model (its `pretrain/` directory is copied, so
the pipeline skips that stage; the demo-config arm also reuses its `sft/` unless an override changes
SFT) and runs its own SFT and RL stages with `steprl run`, one process per arm, so wall time and
peak memory are the arm's own. Arms:

  agentic       configs/demo.yaml:   SFT -> GRPO with the calculator (T <= 3)
  pbrft         configs/pbrft.yaml:  SFT -> GRPO, no tools, one turn (T = 1)
  ppo           configs/demo_ppo.yaml: SFT -> PPO with the calculator
  credit-*      configs/credit.yaml: one calculator call per operation (2-3 calls),
                GRPO or PPO with credit: turn or credit: trajectory; credit-grpo-needed: GRPO
                (turn) with the call bonus paid only for the calls the solution needs;
                credit-grpo-sparse / credit-ppo-sparse: GRPO / PPO (turn) with no call bonus;
                credit-grpo-autofix: GRPO (turn) with doctor.auto_fix on

Results: a JSON line per arm and seed in OUT/results.jsonl, and a markdown table on stdout
(mean and spread over seeds of held-out accuracy, wall seconds and peak RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# arms whose SFT stage is the demo's (same config, seed 0) reuse the base run's sft/ when it has one
SHARES_BASE_SFT = {"agentic"}
ARMS = {
    "agentic": ("configs/demo.yaml", ["stages=[pretrain,sft,grpo]"]),
    "pbrft": ("configs/pbrft.yaml", ["stages=[pretrain,sft,grpo]"]),
    "ppo": ("configs/demo_ppo.yaml", ["stages=[pretrain,sft,ppo]"]),
    "credit-grpo-turn": ("configs/credit.yaml", ["stages=[pretrain,sft,grpo]", "grpo.credit=turn"]),
    "credit-grpo-trajectory": ("configs/credit.yaml", ["stages=[pretrain,sft,grpo]", "grpo.credit=trajectory"]),
    # the call bonus paid only for the calls the problem's solution makes (2-3), not up to the cap 0.3
    "credit-grpo-needed": ("configs/credit.yaml", ["stages=[pretrain,sft,grpo]", "grpo.credit=turn",
                                                   "grpo.reward.tool_success_needed_only=true"]),
    # no call bonus at all: the answer's reward alone
    "credit-grpo-sparse": ("configs/credit.yaml", ["stages=[pretrain,sft,grpo]", "grpo.credit=turn",
                                                   "grpo.reward.tool_success=0.0"]),
    # the doctor acting live: its turn_limit finding drops the call bonus mid-run
    "credit-grpo-autofix": ("configs/credit.yaml", ["stages=[pretrain,sft,grpo]", "grpo.credit=turn",
                                                    "doctor.auto_fix=true"]),
    "credit-ppo-turn": ("configs/credit.yaml", ["stages=[pretrain,sft,ppo]", "ppo.credit=turn"]),
    "credit-ppo-sparse": ("configs/credit.yaml", ["stages=[pretrain,sft,ppo]", "ppo.credit=turn",
                                                  "ppo.reward.tool_success=0.0"]),
    "credit-ppo-trajectory": ("configs/credit.yaml", ["stages=[pretrain,sft,ppo]", "ppo.credit=trajectory"]),
}


def run_arm(arm: str, seed: int, base: Path, out: Path, extra: list[str]) -> dict:
    config, overrides = ARMS[arm]
    name = f"{arm}-s{seed}"
    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(base / "pretrain", run_dir / "pretrain")
        # arms of the same config share one SFT run (the first one's), so they differ only in RL
        # (the base's own SFT only where no override changes what SFT does)
        sft_changed = any(o.startswith(("sft.", "task.", "model.")) for o in extra)
        donors = ([base / "sft"] if arm in SHARES_BASE_SFT and not sft_changed
                  else [out / f"{a}-s0" / "sft" for a in ARMS if ARMS[a][0] == config])
        sft_donor = next((d for d in donors if (d / "done.json").is_file()), None)
        if sft_donor is not None:
            shutil.copytree(sft_donor, run_dir / "sft")
            (run_dir / "sft" / "eval.json").unlink(missing_ok=True)  # re-evaluate with this arm's eval settings
        cmd = [sys.executable, "-m", "steprl.cli", "run", config, f"name={name}", f"output_dir={out}",
               f"seed={seed}", "eval_after=[sft,grpo,ppo]", *overrides, *extra]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(run_dir / "log.txt", "w"))
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"{name} failed (see {run_dir / 'log.txt'})")
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["stages"]}
    rl = rows.get("grpo") or rows["ppo"]
    return {"arm": arm, "seed": seed, "sft_accuracy": rows["sft"]["eval"]["accuracy"],
            "accuracy": rl["eval"]["accuracy"], "rl_seconds": rl["wall_seconds"],
            "peak_rss_gb": rl.get("peak_rss_gb"), "run_dir": str(run_dir)}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a run whose pretrain/ stage is done")
    ap.add_argument("--out", type=Path, default=Path("runs/experiments"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="config overrides applied to every arm (e.g. grpo.steps=20)")
    args = ap.parse_args()
    if not (args.base / "pretrain" / "done.json").is_file():
        raise SystemExit(f"--base {args.base}: no finished pretrain stage there")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(args.out / "results.jsonl", "a") as log:
        for arm in args.only:
            for seed in args.seeds:
                row = run_arm(arm, seed, args.base, args.out, args.overrides)
                log.write(json.dumps(row) + "\n")
                log.flush()
                results.append(row)
    print("| arm | seeds | SFT accuracy | RL held-out accuracy | RL wall s | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for arm in args.only:
        rows = [r for r in results if r["arm"] == arm]
        print(f"| {arm} | {len(rows)} | {spread([r['sft_accuracy'] for r in rows])} | "
              f"{spread([r['accuracy'] for r in rows])} | {statistics.mean(r['rl_seconds'] for r in rows):.0f} | "
              f"{max(r['peak_rss_gb'] or 0 for r in rows):.2f} |")


if __name__ == "__main__":
    main()

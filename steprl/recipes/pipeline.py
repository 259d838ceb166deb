"""`steprl run`: the config's stages in order, an evaluation after each, and summary.json.

A stage that finished earlier (its done.json exists) is skipped, so re-running the same command
after a crash picks up where the run stopped; a stage killed midway resumes from its last
checkpoint.
"""
from __future__ import annotations

import json
import resource
import time

from steprl.config import RunConfig, save_config
from steprl.runtime import Runtime, is_main_process, setup_runtime
from steprl.training.common import done_info, mark_done, stage_dir, write_atomic


def stage_runner(stage: str):
    from steprl.recipes import grpo, ppo, pretrain, rm, sft

    runners = {"pretrain": pretrain.run, "sft": sft.run, "rm": rm.run, "grpo": grpo.run, "ppo": ppo.run}
    if stage not in runners:
        raise NotImplementedError(f"stage '{stage}' is not available yet")
    return runners[stage]


def evaluate_stage(cfg: RunConfig, stage: str, rt: Runtime) -> dict:
    """Held-out accuracy of a stage's checkpoint; over a multi-process launch each rank plays its
    share of the problems and rank 0 scores them all."""
    from steprl.models.loading import load_policy
    from steprl.recipes.evaluate import eval_metrics, evaluate
    from steprl.tasks import get_task

    out = stage_dir(cfg, stage)
    cached = out / "eval.json"  # the rm stage writes its pairwise accuracy here itself
    if cached.is_file():
        return json.loads(cached.read_text())
    if stage == "rm":
        return {"accuracy": 0.0, "n": 0}
    model, tokenizer = load_policy(str(out / "checkpoint"))
    model.to(rt.device)
    e, task = cfg.eval, get_task(cfg.task.name, **cfg.task.args)
    problems = rt.shard(task.problems(e.split, e.limit), even=False)
    _, trajs = evaluate(model, tokenizer, task, e.split, e.limit, e.batch_size, e.max_new_tokens, e.max_turns,
                        problems=problems, engine=cfg.rollout.engine)
    metrics = eval_metrics(task, rt.gather(trajs))
    if rt.is_main:
        write_atomic(cached, json.dumps(metrics))  # read back on a rerun: never half a file
    return metrics


def run_stage(cfg: RunConfig, stage: str) -> dict:
    """Run (or skip, if done) one stage, evaluate it if asked, and return its summary row."""
    rt = setup_runtime(cfg)
    cfg.runtime.zero_stage = rt.zero_stage  # config.yaml records the stage an accelerate FSDP config asked for
    if rt.is_main:  # rank 0 alone writes the run directory
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
    rt.barrier()  # every rank sees the same done.json files
    out = stage_dir(cfg, stage)
    info = done_info(out)
    if info is None:
        t0 = time.perf_counter()
        info = stage_runner(stage)(cfg)
        info["wall_seconds"] = time.perf_counter() - t0
        if rt.is_main:
            mark_done(out, info)
        rt.barrier()  # the next stage starts from this one's checkpoint on every rank
    else:
        print(f"{stage}: already done ({out}), skipping")
    # the process's peak so far (Linux reports KiB): a stage run alone in its process gets its own
    row = {"name": stage, "wall_seconds": info.get("wall_seconds", 0.0),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if stage in cfg.eval_after:
        t0 = time.perf_counter()
        row["eval"] = evaluate_stage(cfg, stage, rt)
        row["eval_seconds"] = time.perf_counter() - t0
        what = "pairwise accuracy" if stage == "rm" else "held-out accuracy"
        unit = "pairs" if stage == "rm" else "problems"
        print(f"{stage}: {what} {row['eval']['accuracy']:.3f} on {row['eval']['n']} {unit}")
    return row


def run(cfg: RunConfig) -> dict:
    t0 = time.perf_counter()
    rows = [run_stage(cfg, stage) for stage in cfg.stages]
    summary = {"name": cfg.name, "stages": rows,
               "wall_seconds": sum(r["wall_seconds"] + r.get("eval_seconds", 0.0) for r in rows),
               "session_seconds": time.perf_counter() - t0}
    if is_main_process():
        (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)  # other ranks print nowhere
    return summary


def print_table(summary: dict) -> None:
    print(f"\n{'stage':<10} {'seconds':>8} {'accuracy':>9} {'n':>5} {'tool calls':>10}")
    for row in summary["stages"]:
        ev = row.get("eval") or {}
        acc = f"{ev['accuracy']:.3f}" if "accuracy" in ev else "-"
        calls = f"{ev['tool_calls_per_episode']:.2f}" if "tool_calls_per_episode" in ev else "-"
        print(f"{row['name']:<10} {row['wall_seconds']:>8.1f} {acc:>9} {ev.get('n', '-'):>5} {calls:>10}")
    print(f"{'total':<10} {summary['wall_seconds']:>8.1f}")

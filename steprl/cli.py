"""The `steprl` command: one sub-command per stage, plus run, eval, inspect, doctor, report, compare."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STAGE_COMMANDS = ("pretrain", "sft", "rm", "grpo", "ppo")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steprl", description="Train LLM agents with reinforcement learning.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stages listed in a config")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="key=value, e.g. grpo.learning_rate=5e-5")
    for stage in STAGE_COMMANDS:
        s = sub.add_parser(stage, help=f"run only the {stage} stage of a config")
        s.add_argument("config")
        s.add_argument("overrides", nargs="*")
    ev = sub.add_parser("eval", help="held-out accuracy of a model, stage or run directory")
    ev.add_argument("model", help="model dir, alias (smollm2), stage dir or run dir")
    ev.add_argument("--task", default="calc")
    ev.add_argument("--data", default=None, help="JSONL of problems (task-specific)")
    ev.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a task argument, such as tools=false (gsm8k's single-turn arm); overrides a run's own")
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int, default=300)
    ev.add_argument("--max-turns", type=int, default=3)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--engine", default="auto", choices=["auto", "native", "hf"],
                    help="rollout engine: native (our CPU engine, Llama-family) or hf (transformers' generate)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--json", action="store_true")
    ins = sub.add_parser("inspect", help="show a sampled trajectory with trained tokens highlighted")
    ins.add_argument("path", help="a samples.jsonl, a stage dir or a run dir")
    ins.add_argument("--index", type=int, default=-1, help="which sample (default: the last)")
    ins.add_argument("--no-color", action="store_true")
    doc = sub.add_parser("doctor", help="diagnose a run or stage from its metrics")
    doc.add_argument("path")
    doc.add_argument("--json", action="store_true")
    rep = sub.add_parser("report", help="write RUN_DIR/report.html")
    rep.add_argument("run_dir")
    cmp_ = sub.add_parser("compare", help="overlay the curves of several runs")
    cmp_.add_argument("runs", nargs="+")
    cmp_.add_argument("--out", default=None)
    return p


def _load(config: str, overrides: list[str]):
    from steprl.config import load_config

    return load_config(config, overrides)


def _resolve_eval_model(path: str) -> str:
    """A run dir evaluates its last stage's checkpoint; a stage dir its checkpoint."""
    p = Path(path)
    summary = p / "summary.json"
    if summary.is_file():
        stages = [s for s in json.loads(summary.read_text())["stages"] if s["name"] != "rm"]
        return str(p / stages[-1]["name"] / "checkpoint")
    if (p / "config.yaml").is_file() and not (p / "checkpoint").is_dir():
        import yaml

        stages = yaml.safe_load((p / "config.yaml").read_text()).get("stages", [])
        done = [s for s in stages if s != "rm" and (p / s / "checkpoint").is_dir()]
        if done:
            return str(p / done[-1] / "checkpoint")
    return path


def _run_task_args(path: str, task_name: str) -> dict:
    """A run's own task arguments (e.g. tools: false for PBRFT), so its model is evaluated on the
    task it was trained for; {} for a plain model directory or another task."""
    for candidate in (Path(path) / "config.yaml", Path(path).parent.parent / "config.yaml",
                      Path(path).parent / "config.yaml"):
        if candidate.is_file():
            import yaml

            task = (yaml.safe_load(candidate.read_text()) or {}).get("task") or {}
            return dict(task.get("args") or {}) if task.get("name") == task_name else {}
    return {}


def _parse_task_args(items: list[str]) -> dict:
    """--task-arg KEY=VALUE pairs; each value is read as YAML (false, 3, [a, b])."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-arg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_eval(args) -> int:
    from steprl.models.loading import load_policy
    from steprl.recipes.evaluate import evaluate
    from steprl.tasks import get_task

    task_args = {**_run_task_args(args.model, args.task), **_parse_task_args(args.task_arg)}
    if args.data:
        task_args["data"] = args.data
    task = get_task(args.task, **task_args)
    from steprl.runtime import resolve_device

    model, tokenizer = load_policy(_resolve_eval_model(args.model))
    model.to(resolve_device(args.device))
    metrics, trajs = evaluate(model, tokenizer, task, args.split, args.limit, args.batch_size,
                              args.max_new_tokens, args.max_turns, engine=args.engine)
    metrics["engine"] = args.engine
    if not args.json:
        for t in trajs[:2]:
            print("---", t.problem.question, "| expected", t.problem.answer)
            for m in t.messages[1:]:
                print(f"[{m['role']}] {m['content']}")
    print(f"accuracy {metrics['accuracy']:.3f} on {metrics['n']} problems", file=sys.stderr)
    print(json.dumps(metrics) if args.json else metrics)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from steprl.config import ConfigError
    from steprl.runtime import leave_process_group

    try:
        if args.command == "run":
            from steprl.recipes.pipeline import run

            run(_load(args.config, args.overrides))
            leave_process_group()
        elif args.command in STAGE_COMMANDS:
            from steprl.recipes.pipeline import print_table, run_stage

            cfg = _load(args.config, args.overrides)
            print_table({"stages": [run_stage(cfg, args.command)], "wall_seconds": 0.0})
            leave_process_group()
        elif args.command == "eval":
            return cmd_eval(args)
        elif args.command == "inspect":
            from steprl.monitor.inspect import main_inspect

            return main_inspect(args.path, args.index, color=not args.no_color)
        elif args.command == "doctor":
            from steprl.monitor import main_doctor

            return main_doctor(args.path, args.json)
        elif args.command == "report":
            from steprl.monitor import main_report

            return main_report(args.run_dir)
        elif args.command == "compare":
            from steprl.monitor import write_compare

            print(write_compare(args.runs, args.out))
    except (ConfigError, ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"steprl: error{_which_process()}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if _which_process():  # one line per rank, above the launcher's summary of who failed first
            what = ("stopped: another process of the launch ended (its error comes first)"
                    if _peer_gone(err) else f"failed: {type(err).__name__}: {err}")
            print(f"steprl: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} {what}", file=sys.stderr)
        raise
    return 0


def _which_process() -> str:
    """The suffix ' (rank 1 of 2)' inside a multi-process launch, '' otherwise."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world != "1" else ""


def _peer_gone(err: Exception) -> bool:
    """A collective that failed because another rank exited: the consequence, not the cause."""
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL communicator was aborted"))


def entry() -> int:
    """The console script: under torchrun, `record` hands a failing rank's error to the launcher,
    whose summary then names the first rank that failed and why."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(main)()
    return main()


if __name__ == "__main__":
    sys.exit(entry())

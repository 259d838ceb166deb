#!/usr/bin/env python
"""A/B of two versions of steprl in one process: native generation at batch 64 and the GRPO step
on SmolLM2-135M (LoRA r16 on q,k,v,o; 4 prompts x 4 generations, <= 64 new tokens, beta 0.04),
interleaved so that the machine's drift hits both alike.

    python benchmarks/ab.py --base REV [--repeats 5] [--parts gen,grpo] [--json]

A is `git archive REV` of steprl, B the working tree. Each version's modules are imported apart and
put in place of the other's while it runs. Both sample from the same model with the same seeds, and
the GRPO step's learning rate is 0, so that both do exactly the same work: the script checks that
A and B sample the same tokens, and reports B / A medians (below 1: B is faster).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


class Version:
    """One copy of the steprl package, imported under its own name-space of sys.modules entries."""

    def __init__(self, root: Path, label: str):
        self.root, self.label, self.modules = root, label, {}
        with self.active():
            importlib.import_module("steprl")

    @contextlib.contextmanager
    def active(self):
        others = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "steprl" or k.startswith("steprl.")}
        sys.modules.update(self.modules)
        sys.path.insert(0, str(self.root))
        try:
            yield self
        finally:
            sys.path.remove(str(self.root))
            self.modules = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "steprl" or k.startswith("steprl.")}
            sys.modules.update(others)

    def __getitem__(self, name: str):
        with self.active():
            return importlib.import_module(name)


def checkout(rev: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="steprl-ab-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "steprl"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


class NoStop:
    """Rows never end early: every row yields exactly max_new_tokens tokens, on both sides."""
    stop_strings = ()
    eos_ids = {-1}

    def is_eos(self, token):
        return False

    def hits_stop_string(self, tokens):
        return False


def interleaved(fns: dict, repeats: int) -> dict:
    """Seconds of each callable: one warm-up each, then `repeats` rounds in alternating order."""
    for fn in fns.values():
        fn(-1)
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[k](r)
            times[k].append(time.perf_counter() - t)
    return times


def generation_ab(versions, model, tok, prompts, shape, repeats):
    """The native engine's `generate`, batch 64 (64 distinct prompts, or 16 prompts x 4 copies)."""
    group = 4 if shape == "16x4" else 1
    rows = [p for p in prompts[:64 // group] for _ in range(group)]
    outputs = {}

    def run(v):
        sampling = v["steprl.rollout.sampling"]
        params = sampling.SamplingParams(max_new_tokens=64, temperature=1.0)

        def call(r):
            with v.active(), torch.inference_mode():
                tokens, _, _ = sampling.generate(model, tok, rows, params, stop=NoStop(),
                                                 generator=torch.Generator().manual_seed(r))
            outputs[(v.label, r)] = tokens
        return call

    times = interleaved({v.label: run(v) for v in versions}, repeats)
    same = all(outputs[("A", r)] == outputs[("B", r)] for r in range(-1, repeats))
    return {"part": f"generation {shape}", "same_tokens": same, **summary(times)}


def grpo_ab(versions, model, tok, repeats):
    """grpo_step of each version on the same LoRA model (lr 0: the weights never move)."""
    outputs, steps = {}, {}
    for v in versions:
        config, grpo = v["steprl.config"], v["steprl.recipes.grpo"]
        cfg = config.RunConfig(task=config.TaskConfig(name="calc"))
        g = cfg.grpo
        g.prompts_per_step, g.num_generations, g.max_new_tokens, g.max_turns, g.kl_coef = 4, 4, 64, 1, 0.04
        g.minibatch_size, g.micro_batch_size, g.num_iterations, g.learning_rate = 16, 0, 1, 0.0
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)
        task = v["steprl.tasks"].get_task("calc")
        problems = task.problems("train", 1000, seed=0)
        make = new_step if hasattr(grpo, "RLState") else old_step  # after the seam, or before it
        steps[v.label] = make(v, model, tok, g, optimizer, params, task, problems)

    def run(v):
        def call(r):
            with v.active():
                metrics, trajs = steps[v.label](r)
            outputs[(v.label, r)] = [t.ids for t in trajs]
        return call

    times = interleaved({v.label: run(v) for v in versions}, repeats)
    same = all(outputs[("A", r)] == outputs[("B", r)] for r in range(-1, repeats))
    return {"part": "grpo step (SmolLM2, LoRA, 4x4, 64 new tokens, beta 0.04)", "same_tokens": same, **summary(times)}


def old_step(v, model, tok, g, optimizer, params, task, problems):
    """The step's signature before the seam: positional arguments and a Knobs object."""
    grpo, autofix = v["steprl.recipes.grpo"], v["steprl.monitor.autofix"]
    tools, renderer, suffix = v["steprl.recipes.evaluate"].tool_setup(task, tok)
    knobs = autofix.Knobs(g.learning_rate, g.kl_coef, g.micro_batch_size or g.minibatch_size, g.num_generations,
                          g.max_new_tokens, g.max_grad_norm, g.gradient_checkpointing)
    return lambda r: grpo.grpo_step(model, None, tok, optimizer, params, task, tools, renderer, suffix, problems,
                                    max(r, 0), g, knobs, torch.Generator().manual_seed(r), random.Random(r))


def new_step(v, model, tok, g, optimizer, params, task, problems):
    grpo, rl = v["steprl.recipes.grpo"], v["steprl.training.rl"]
    tools, renderer, suffix = v["steprl.rollout.chat"].tool_setup(task, tok)
    policy = v["steprl.training.policy"].Policy(model, tok, None, "", params, optimizer, None)
    runtime = v["steprl.runtime"].Runtime(torch.device("cpu"), "fp32")
    engine = v["steprl.rollout"].NativeEngine(model, tok)

    def step(r):
        state = rl.RLState(g, policy, runtime, engine, task, tools, renderer, suffix, problems,
                           generator=torch.Generator().manual_seed(r), rng=random.Random(r), step=max(r, 0))
        return grpo.grpo_step(state)
    return step


def summary(times: dict) -> dict:
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    return {"a_seconds": times["A"], "b_seconds": times["B"], "a_median": a, "b_median": b, "b_over_a": b / a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision of version A")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="gen,grpo", help="gen (= gen64,gen16x4), gen64, gen16x4, grpo")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    versions = [Version(checkout(a.base), "A"), Version(ROOT, "B")]
    new = versions[1]
    new["steprl.memory"].keep_freed_memory()  # process-wide, as the runtime sets it for every stage
    model, tok = new["steprl.models.hub"].load_causal_lm("smollm2")
    new["steprl.models.lean"].lean_training(model)  # as the RL stages build the policy
    rows = []
    shapes = [shape for shape in ("64", "16x4") if {"gen", "gen" + shape} & set(a.parts.split(","))]
    if shapes:
        task = new["steprl.tasks"].get_task("calc")
        tools, renderer, suffix = new["steprl.rollout.chat"].tool_setup(task, tok)
        env = new["steprl.envs.tool_env"].make_envs(task, tools, new["steprl.config"].RewardConfig(), 1, 1, suffix)[0]
        prompts = [renderer.prompt_ids(env.reset(p)) for p in task.problems("train", 64, seed=0)]
        for shape in shapes:
            rows.append(generation_ab(versions, model, tok, prompts, shape, a.repeats))
            report(rows[-1])
    if "grpo" in a.parts.split(","):
        lora = new["steprl.config"].LoraConfig(enabled=True, r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = new["steprl.models.loading"].apply_lora(model, lora)
        rows.append(grpo_ab(versions, model, tok, a.repeats))
        report(rows[-1])
    if a.json:
        print(json.dumps({"base": a.base, "repeats": a.repeats, "rows": rows}))


def report(row: dict) -> None:
    print(f"{row['part']}: A {row['a_median']:.2f} s, B {row['b_median']:.2f} s, B/A {row['b_over_a']:.3f}, "
          f"same tokens: {row['same_tokens']}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

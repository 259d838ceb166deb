#!/usr/bin/env python
"""steprl's performance benchmark: our rollout engine and GRPO step against HF `generate` and TRL's
`GRPOTrainer`, side by side in one process, with the compute roofline measured in the same run.

    python benchmarks/run.py --json            # everything (SmolLM2-135M + tiny model, TRL if installed)
    python benchmarks/run.py --quick --json    # smoke check (< 1 min): tiny model, tiny sizes, 1 repeat

Every side runs at its best precision, and each precision of `--precision` side by side: bf16 and
fp32 where a bf16 matmul runs at least 1.5x fp32's here (CPUs with AMX, GPUs), else fp32 alone
(CPUs without bf16 units run bf16 hundreds of times slower). Peers are always compared at the same
precision, and roofline fractions are taken against that precision's measured peak.

Parts (docs/benchmarks.md has the method and the FLOP conventions):
  1. roofline   GFLOP/s of a large matmul in fp32 and in bf16 (bf16 inputs), median of several reps
  2. generation tokens/s of `steprl.rollout.sampling.generate` vs HF `model.generate(do_sample=True)`,
                same prompts and sampling settings, exactly the same number of new tokens per row, at
                batch 16 and 64: B distinct prompts, and the GRPO shape B/G prompts x G copies (ours
                shares their prefix; HF gets `num_return_sequences=G`). bf16: ours decodes with
                `dtype=torch.bfloat16` (bf16 weights and KV cache), HF runs a bf16 copy of the model
  3. GRPO step  `steprl.recipes.grpo.grpo_step` (4 prompts x 4 generations, <= 64 new tokens,
                kl_coef 0.04), full fine-tuning and LoRA r16 on q,k,v,o; bf16: `Runtime(cpu, "bf16")`
                (autocast, fp32 master weights) and the native engine decoding in bf16
  4. TRL        `trl.GRPOTrainer` with identical settings (`bf16=True` for bf16), timed per step (only
                if `import trl` works: `pip install -e '.[bench]'`, TRL 1.16)
  5. memory     peak RSS of each GRPO part's steps, read in this process (Linux resets the high-water
                mark through /proc/self/clear_refs; elsewhere ru_maxrss, an upper bound)

Roofline fractions: generation 2P FLOPs per generated token; the training passes (reference + update)
2P + 6P per real token for full fine-tuning, 2P + 4P + 6P_A under LoRA (the frozen base gets
activation gradients but no weight gradients; P_A = adapter parameters), over the step time
after the rollout.

With --json the LAST line printed is one JSON object. Headline keys, all at `precision` (bf16 when it
ran, else fp32) with peers at the same precision:
  precision, gen_speedup_vs_hf, grpo_step_speedup_vs_trl (null when TRL is absent or failed, with
  grpo_step_speedup_vs_trl_reason; the slower of LoRA and full), gen_roofline_fraction,
  train_roofline_fraction, and their _grouped / _full / _lora variants;
  fp32_matmul_gflops, bf16_matmul_gflops, matmul_gflops (the headline precision's);
  grpo_step_seconds_bf16, grpo_step_seconds_fp32 ({"lora": s, "full": s} of our step, null when that
  precision did not run), grpo_step_bf16_speedup_vs_fp32 (ours, per mode); peak_rss_gb (our GRPO
  steps, every precision). `by_precision` holds the headline keys of each precision that ran; the raw
  numbers (gen_tok_s, grpo_step_seconds, peak_rss_gb_grpo) are keyed ".../<precision>".
Progress goes to stderr, the table and the JSON line to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("STEPRL_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GB = 1e9  # decimal gigabytes: the 4 GB target is checked against 4e9 bytes


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


def peak_rss_gb(who=resource.RUSAGE_SELF) -> float:
    """ru_maxrss, the peak since the process started: kilobytes on Linux, bytes on macOS."""
    r = resource.getrusage(who).ru_maxrss
    return (r if sys.platform == "darwin" else r * 1024) / GB


def free_memory() -> None:
    """Collect garbage and give freed heap back to the OS (glibc's malloc_trim), so that what an
    earlier part left cached does not count in a later part's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the process's resident high-water mark (Linux: write 5 to /proc/self/clear_refs), so
    that one part's peak can be read on its own, in this process. False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_gb(was_reset: bool) -> float:
    """VmHWM since `reset_peak_rss` (GB); without a reset, ru_maxrss (an upper bound)."""
    if was_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    return peak_rss_gb()


# --------------------------------------------------------------------------------- 1. roofline

def matmul_gflops(n: int, reps: int, precision: str = "fp32") -> dict:
    """GFLOP/s of an [n, n] @ [n, n] matmul in `precision` (2 n^3 FLOPs; bf16 inputs and output for
    bf16), median of `reps` after a warm-up. Where the precision has no fast kernels here (bf16 on
    CPUs without bf16 units: ~0.3 GFLOP/s, a minute per 2048^3 product), n is halved until a product
    should take under 2 s, judged from a 256^3 probe."""
    dtype = DTYPES[precision]
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(256, 256, generator=gen).to(dtype)
    probe @ probe  # warm-up: kernel selection
    t = time.perf_counter()
    probe @ probe
    probe_gflops = 2 * 256 ** 3 / (time.perf_counter() - t) / 1e9
    while n > 256 and 2 * n ** 3 / (probe_gflops * 1e9) > 2.0:
        n //= 2
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t)
    gflops = [2 * n ** 3 / t / 1e9 for t in times]
    return {"precision": precision, "size": n, "reps": reps, "gflops": statistics.median(gflops),
            "gflops_all": gflops, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------- FLOP counting

def flop_params(model) -> dict:
    """Parameters that take part in matmuls, each tensor once.

    matmul: every nn.Linear weight (the LM head included; with tied embeddings the embedding IS the
            LM head and is counted once; an untied input embedding is a lookup and is not counted);
    head:   the LM head alone (its FLOPs are only needed on positions whose logits are used);
    body:   matmul - head.
    """
    seen, matmul = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            matmul += m.weight.numel()
    head_mod = model.get_output_embeddings()
    head = head_mod.weight.numel() if head_mod is not None else 0
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"matmul": matmul, "head": head, "body": matmul - head, "total": total}


def lora_params(model) -> int:
    """Trainable adapter parameters (lora_A + lora_B)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


PHASES = ("rollout", "reference", "update")


def per_token_flops(P: dict, P_A: int, kl: bool, lora: bool, body_only: bool = False) -> dict:
    """FLOPs per token of each phase of a GRPO step (P_A = 0 without LoRA):

      rollout   2(P + P_A)                 a forward (the adapters run unmerged)
      reference 2P, only when kl           a forward of the frozen reference
      update    full: 6P; LoRA: 4P + 6P_A  forward 2P + backward 4P: 2P for the activation gradients and
                                           2P for the weight gradients. Under LoRA the frozen base needs
                                           no weight gradients, only the activation gradients (adapters
                                           sit in every layer down to the first), and the adapters cost
                                           their own 2 + 2 + 2 P_A: an update is ~2/3 of full fine-tuning's
                                           work, so at equal speed LoRA shows a lower roofline fraction.
    body_only: the same without the LM head (positions where no logit is needed).
    """
    p = P["body"] if body_only else P["matmul"]
    pa = P_A if lora else 0
    return {"rollout": 2 * (p + pa), "reference": 2 * p if kl else 0,
            "update": 4 * p + 6 * pa if lora else 6 * p}


def grpo_step_flops(P: dict, trajs, group_size: int, kl: bool, lora: bool, P_A: int) -> dict:
    """FLOPs of each phase of one GRPO step, under two conventions (docs/benchmarks.md, "FLOP conventions").

    simple (the issue's: 2P per generated token, 6P per trained token): every real (non-padding)
      token of every sequence, prompt included, at `per_token_flops`.
    min_work: what any implementation has to compute: a group's shared prompt once per pass (not once
      per generation) and without the LM head (no logit is needed there); completion tokens in full.
      An engine that shares prefixes or skips the head can exceed 100% of the roofline under
      "simple"; under "min_work" it cannot, so savings show up as speed, not as inflated utilisation.
    Returns {"simple": {phase: flops}, "min_work": {phase: flops}}.
    """
    full = per_token_flops(P, P_A, kl, lora)
    body = per_token_flops(P, P_A, kl, lora, body_only=True)
    n_tokens = sum(len(t.prompt_ids) + len(t.ids) for t in trajs)
    simple = {k: n_tokens * full[k] for k in PHASES}
    min_work = dict.fromkeys(PHASES, 0.0)
    for lo in range(0, len(trajs), group_size):
        group = trajs[lo:lo + group_size]
        shared = all(t.prompt_ids == group[0].prompt_ids for t in group)
        prompt_tokens = len(group[0].prompt_ids) if shared else sum(len(t.prompt_ids) for t in group)
        completion_tokens = sum(len(t.ids) for t in group)
        for k in PHASES:
            min_work[k] += prompt_tokens * body[k] + completion_tokens * full[k]
    return {"simple": simple, "min_work": min_work}


# --------------------------------------------------------------------------------- models

def build_tiny(quick: bool):
    """The embedded-style tiny Llama: a BPE tokenizer trained on the calc corpus, hidden 128, 4 layers.
    Returns a factory giving a fresh (identically initialised) model and the shared tokenizer."""
    from steprl.models.tiny import render_chatml, tiny_llama, train_tokenizer
    from steprl.tasks.calc import CalcTask

    task = CalcTask()
    n_docs, n_proto = (200, 50) if quick else (2000, 300)
    texts = task.pretrain_corpus(n_docs) + [render_chatml(m) for m in task.cold_start(n_proto)] * 4
    tok = train_tokenizer(texts, vocab_size=1024)

    def factory():
        return tiny_llama(tok, hidden_size=128, num_layers=4, num_heads=4, seed=0).eval(), tok

    return factory


def smollm2_factory():
    from steprl.models.hub import load_causal_lm

    def factory():
        return load_causal_lm("smollm2")

    return factory


def task_prompts(tokenizer, n: int):
    """(prompt ids, chat messages, problems) of the first n calc training problems, rendered exactly
    as a GRPO step renders them (system prompt + tool description for models that need it)."""
    from steprl.config import RewardConfig
    from steprl.envs.tool_env import make_envs
    from steprl.rollout.chat import tool_setup
    from steprl.tasks import get_task

    task = get_task("calc")
    tools, renderer, suffix = tool_setup(task, tokenizer)
    env = make_envs(task, tools, RewardConfig(), 1, 1, suffix)[0]
    problems = task.problems("train", max(n, 1000), seed=0)[:n]
    messages = [env.reset(p) for p in problems]
    return [renderer.prompt_ids(m) for m in messages], messages, problems


# --------------------------------------------------------------------------------- 2. generation

class NoStop:
    """A stop checker that never ends a row, so every row yields exactly max_new_tokens tokens (HF's
    side gets `min_new_tokens`). It has the real checker's `eos_ids` (an id no token has), so that
    `generate` takes the same vectorised path as in training."""

    stop_strings = ()
    eos_ids = {-1}

    def is_eos(self, token: int) -> bool:
        return False

    def hits_stop_string(self, tokens) -> bool:
        return False


def bench_generation(name, model, hf_model, tok, prompts, batch, new_tokens, repeats, precision, peak_gflops,
                     group=1, seed=0):
    """Tokens/s of our `generate` and HF's `model.generate` on the same prompts, same sampling
    settings (temperature 1, top_p 1, top_k 0), exactly `new_tokens` per row on both sides, each at
    its best in `precision`: ours decodes the fp32 `model` with `dtype` bf16 or fp32, HF runs
    `hf_model`, the model itself for fp32 and a bf16 copy of it for bf16.

    group = 1: `batch` distinct prompts. group = G > 1: the GRPO shape, batch / G prompts x G copies:
    ours gets the copies as rows (its prefill shares their common prefix), HF gets the distinct
    prompts with `num_return_sequences=G` (HF's own way to sample a group; it prefills every copy).
    """
    from steprl.rollout.sampling import SamplingParams, generate, left_pad

    assert batch % group == 0, f"batch {batch} is not a multiple of the group size {group}"
    distinct = [prompts[i % len(prompts)] for i in range(batch // group)]
    rows = [p for p in distinct for _ in range(group)]  # consecutive copies, as grpo_step makes them
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    ids, mask, _ = left_pad(distinct, tok.pad_token_id)

    def ours():
        gen = torch.Generator().manual_seed(seed)
        tokens, _, _ = generate(model, tok, rows, params, stop=NoStop(), generator=gen, dtype=DTYPES[precision])
        assert len(tokens) == batch and all(len(t) == new_tokens for t in tokens), "ours: not exactly N tokens"

    def hf():
        torch.manual_seed(seed)
        out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, num_return_sequences=group,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert out.shape == (batch, ids.shape[1] + new_tokens), "HF: not exactly N tokens per row"

    with torch.inference_mode():
        ours(), hf()  # warm-up
        t_ours, t_hf = [], []
        for r in range(repeats):  # interleaved, alternating order: drift hits both equally
            for which in ((ours, hf) if r % 2 == 0 else (hf, ours)):
                t = time.perf_counter()
                which()
                (t_ours if which is ours else t_hf).append(time.perf_counter() - t)
    P = flop_params(model)
    n_new = batch * new_tokens
    s_ours, s_hf = median(t_ours), median(t_hf)
    prompt_tokens = sum(len(r) for r in distinct)  # each distinct prompt once: the least any prefill needs
    prefill = 2 * P["body"] * prompt_tokens  # + the head once per row, ignored
    peak = peak_gflops * 1e9
    row = {
        "model": name, "precision": precision, "batch": batch, "group": group, "new_tokens": new_tokens,
        "repeats": repeats,
        "prompt_tokens_mean": sum(len(r) for r in rows) / batch, "padded_width": int(ids.shape[1]),
        "params_matmul": P["matmul"],
        "ours_seconds": s_ours, "hf_seconds": s_hf, "ours_seconds_all": t_ours, "hf_seconds_all": t_hf,
        "ours_tok_s": n_new / s_ours, "hf_tok_s": n_new / s_hf, "speedup": s_hf / s_ours,
        # the issue's convention: 2 x params per generated token (prefill not credited)
        "ours_roofline_fraction": 2 * P["matmul"] * n_new / s_ours / peak,
        "hf_roofline_fraction": 2 * P["matmul"] * n_new / s_hf / peak,
        # the prefill credited too (each distinct prompt's real tokens once, not padding)
        "ours_roofline_fraction_incl_prefill": (prefill + 2 * P["matmul"] * n_new) / s_ours / peak,
        "hf_roofline_fraction_incl_prefill": (prefill + 2 * P["matmul"] * n_new) / s_hf / peak,
    }
    shape = f"{batch // group}x{group}" if group > 1 else f"{batch}"
    log(f"generation {name} {precision} batch {shape}: ours {row['ours_tok_s']:.1f} tok/s, "
        f"HF {row['hf_tok_s']:.1f} tok/s, x{row['speedup']:.2f}")
    return row


# --------------------------------------------------------------------------------- 3. our GRPO step

def bench_grpo_ours(name, factory, lora: bool, s: dict, repeats: int, peak_gflops: float,
                    kl_coef: float = 0.04, lr: float = 1e-6, max_turns: int = 1, micro_batch_size: int = 0,
                    release_memory: bool = False, precision: str = "fp32") -> dict:
    """`grpo_step` timed: one warm-up step, then `repeats` steps; the rollout's share from the step's
    own `rollout_time`, the passes (reference + update) are the rest. Peak RSS of the steps alone
    (model, reference and optimiser state resident) and of the whole part (loading included).
    `precision` bf16: the passes under bf16 autocast (fp32 master weights), the rollout decoding in
    bf16, as a run with runtime.precision bf16 builds them."""
    from steprl.config import LoraConfig, RunConfig, TaskConfig, validate
    from steprl.models.lean import lean_training
    from steprl.models.loading import apply_lora
    from steprl.models.mapped import frozen_reference
    from steprl.recipes.grpo import grpo_step
    from steprl.rollout import NativeEngine
    from steprl.rollout.chat import tool_setup
    from steprl.runtime import Runtime
    from steprl.tasks import get_task
    from steprl.training.common import adamw
    from steprl.training.policy import Policy
    from steprl.training.rl import RLState

    cfg = RunConfig(task=TaskConfig(name="calc"))
    g = cfg.grpo
    g.prompts_per_step, g.num_generations = s["prompts"], s["generations"]
    g.max_new_tokens, g.max_turns, g.kl_coef = s["max_new_tokens"], max_turns, kl_coef
    g.minibatch_size = s["prompts"] * s["generations"]  # one optimiser step per GRPO step, like TRL
    g.micro_batch_size, g.num_iterations, g.learning_rate = micro_batch_size, 1, lr
    g.temperature, g.top_p, g.top_k = 1.0, 1.0, 0
    g.lora = LoraConfig(enabled=lora, r=16, alpha=32, dropout=0.0, target_modules=list(LORA_TARGETS))
    validate(cfg)

    free_memory()
    part_reset = reset_peak_rss()
    torch.manual_seed(cfg.seed)
    model, tok = factory()
    lean_training(model)  # as the recipes build it
    P = flop_params(model)
    ref_model = None
    if lora:
        model = apply_lora(model, g.lora)
    elif g.kl_coef > 0:
        ref_model = frozen_reference(model, model.name_or_path)  # as the recipes build it
    P_A = lora_params(model) if lora else 0
    task = get_task("calc")
    tools, renderer, suffix = tool_setup(task, tok)
    problems = task.problems("train", 1000, seed=0)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = adamw(params, lr=g.learning_rate, weight_decay=0.0)  # as the recipes build it
    runtime = Runtime(torch.device("cpu"), precision)  # bf16: the passes under autocast
    engine = NativeEngine(model, tok, release_memory, DTYPES[precision])  # bf16: bf16 weights and KV cache
    state = RLState(g, Policy(model, tok, ref_model, "", params, optimizer, None), runtime, engine,
                    task, tools, renderer, suffix, problems,
                    generator=torch.Generator().manual_seed(cfg.seed), rng=random.Random(cfg.seed))
    rss_part = peak_rss_since_reset_gb(part_reset)  # loading and set-up
    steps_reset = reset_peak_rss()

    times, rollout, flops, lengths, prompt_lens = [], [], [], [], []
    for step in range(1 + repeats):  # step 0 is the warm-up
        t = time.perf_counter()
        state.step = step
        metrics, trajs = grpo_step(state)
        dt = time.perf_counter() - t
        log(f"grpo ours {name} {precision} {'lora' if lora else 'full'} step {step}"
            f"{' (warm-up)' if step == 0 else ''}: "
            f"{dt:.2f} s (rollout {metrics['rollout_time']:.2f} s)")
        if step == 0:
            continue
        times.append(dt)
        rollout.append(metrics["rollout_time"])
        flops.append(grpo_step_flops(P, trajs, g.num_generations, kl_coef > 0, lora, P_A))
        lengths.append(sum(len(t.ids) for t in trajs) / len(trajs))
        prompt_lens.append(sum(len(t.prompt_ids) for t in trajs) / len(trajs))
    rss_steps = peak_rss_since_reset_gb(steps_reset)
    rss_part = max(rss_part, rss_steps)
    del model, ref_model, optimizer, params, state, engine
    free_memory()
    peak, total_s, total_rollout = peak_gflops * 1e9, sum(times), sum(rollout)
    total_passes = total_s - total_rollout

    def summed(conv, phases=PHASES):
        return sum(f[conv][k] for f in flops for k in phases)

    n_seq = s["prompts"] * s["generations"]
    return {
        "impl": "steprl", "model": name, "precision": precision, "mode": "lora" if lora else "full",
        "repeats": repeats,
        "step_seconds": median(times), "step_seconds_all": times, "rollout_seconds": median(rollout),
        "passes_seconds": median([a - b for a, b in zip(times, rollout)]),
        "mean_completion_tokens": statistics.mean(lengths), "mean_prompt_tokens": statistics.mean(prompt_lens),
        "completion_tokens_per_s": statistics.mean(lengths) * n_seq * len(times) / total_s,
        "params_matmul": P["matmul"], "params_lora": P_A, "max_turns": max_turns,
        "micro_batch_size": g.micro_batch_size or g.minibatch_size,
        "step_flops_simple": summed("simple") / len(flops), "step_flops_min_work": summed("min_work") / len(flops),
        # the training step: reference + update FLOPs over the time after the rollout
        "roofline_fraction": summed("simple", ("reference", "update")) / total_passes / peak,
        "roofline_fraction_min_work": summed("min_work", ("reference", "update")) / total_passes / peak,
        # the whole step, rollout included, over the whole step time
        "step_roofline_fraction": summed("simple") / total_s / peak,
        "step_roofline_fraction_min_work": summed("min_work") / total_s / peak,
        "peak_rss_gb_steps": rss_steps, "peak_rss_gb_part": rss_part, "peak_rss_exact": steps_reset,
    }


# --------------------------------------------------------------------------------- 4. TRL

def trl_status() -> tuple[object, str | None]:
    try:
        import trl  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return None, (f"TRL not importable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                      "install the benchmark extra: .venv/bin/pip install -e '.[bench]' (TRL 1.16)")
    return trl, None


def bench_grpo_trl(name, factory, lora: bool, s: dict, repeats: int, peak_gflops: float,
                   kl_coef: float = 0.04, lr: float = 1e-6, precision: str = "fp32") -> dict:
    """trl.GRPOTrainer with the settings of bench_grpo_ours: same prompts in the same order, same
    group size and lengths, beta, precision (bf16: `bf16=True`, the Trainer's bf16 autocast over
    fp32 master weights), no gradient checkpointing, one optimiser step per step."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from steprl.tasks.base import answers_match, extract_answer

    free_memory()
    part_reset = reset_peak_rss()
    model, tok = factory()
    workdir = tempfile.mkdtemp(prefix="steprl-bench-trl-")
    source = str(model.config._name_or_path)
    if not (source and Path(source).is_dir()):  # Path("") is ".", a directory
        # TRL reloads the reference model from config._name_or_path: give it a real directory
        model.save_pretrained(workdir + "/model")
        tok.save_pretrained(workdir + "/model")
        model = AutoModelForCausalLM.from_pretrained(workdir + "/model", dtype=torch.float32)
    P = flop_params(model)
    n_seq = s["prompts"] * s["generations"]
    _, messages, problems = task_prompts(tok, s["prompts"] * (repeats + 1))
    dataset = Dataset.from_list([{"prompt": m, "answer": p.answer} for m, p in zip(messages, problems)])
    # the prompts as TRL tokenises them (its own call of the chat template)
    trl_prompt_lens = [len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)
                           ["input_ids"]) for m in messages]

    def correctness(completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if answers_match(extract_answer(t), a) else 0.0 for t, a in zip(texts, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.ends, self.steps_reset, self.setup_rss = None, [], False, 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.setup_rss = peak_rss_since_reset_gb(part_reset)  # loading and the trainer's set-up
            self.steps_reset = reset_peak_rss()  # the steps' own peak from here
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            log(f"grpo trl {name} {precision} {'lora' if lora else 'full'} step {len(self.ends) - 1}"
                f"{' (warm-up)' if len(self.ends) == 1 else ''}: "
                f"{self.ends[-1] - (self.ends[-2] if len(self.ends) > 1 else self.begin):.2f} s")

    want = dict(
        output_dir=workdir + "/out", per_device_train_batch_size=n_seq, gradient_accumulation_steps=1,
        num_generations=s["generations"], max_completion_length=s["max_new_tokens"], beta=kl_coef,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, num_iterations=1, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", max_steps=repeats + 1, logging_steps=1,
        report_to="none", save_strategy="no", bf16=precision == "bf16", fp16=False, gradient_checkpointing=False,
        use_cpu=True, shuffle_dataset=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False,
    )
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    args = trl.GRPOConfig(**{k: v for k, v in want.items() if k in fields})
    peft_config = None
    if lora:
        peft_config = PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                     task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[correctness], args=args, train_dataset=dataset,
                              processing_class=tok, peft_config=peft_config, callbacks=[timer])
    P_A = lora_params(trainer.model) if lora else 0
    gen_times = []
    if callable(getattr(trainer, "_generate", None)):  # time TRL's generation (a private method: optional)
        generate = trainer._generate

        def timed_generate(*a, **kw):
            t = time.perf_counter()
            out = generate(*a, **kw)
            gen_times.append(time.perf_counter() - t)
            return out

        trainer._generate = timed_generate
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log dicts: keep stdout for the table
            trainer.train()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rss_steps = peak_rss_since_reset_gb(timer.steps_reset)
    rss_part = max(timer.setup_rss, rss_steps)
    times = [b - a for a, b in zip(timer.ends, timer.ends[1:])]  # step 0 (warm-up) dropped
    gen = gen_times[1:1 + len(times)] if len(gen_times) == len(times) + 1 else []
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    lengths = [h["completions/mean_length"] for h in logs[1:]] or [h["completions/mean_length"] for h in logs]
    mean_len = statistics.mean(lengths) if lengths else float(s["max_new_tokens"])
    del trainer, model
    free_memory()
    # FLOPs under the "simple" convention, with TRL's logged mean completion length (approximate)
    mean_prompt = statistics.mean(trl_prompt_lens)
    per_tok = per_token_flops(P, P_A, kl_coef > 0, lora)
    step_flops = n_seq * (mean_prompt + mean_len) * sum(per_tok.values())
    pass_flops = n_seq * (mean_prompt + mean_len) * (per_tok["reference"] + per_tok["update"])
    total_s, peak = sum(times), peak_gflops * 1e9
    total_passes = total_s - sum(gen) if gen else None
    dropped = sorted(k for k in want if k not in fields)
    return {
        "impl": "trl", "trl_version": trl.__version__, "model": name, "precision": precision,
        "mode": "lora" if lora else "full",
        "repeats": len(times), "step_seconds": median(times), "step_seconds_all": times,
        "rollout_seconds": median(gen), "passes_seconds": median([a - b for a, b in zip(times, gen)]) if gen else None,
        "mean_completion_tokens": mean_len, "mean_prompt_tokens": mean_prompt,
        "completion_tokens_per_s": mean_len * n_seq * len(times) / total_s if total_s else None,
        "params_matmul": P["matmul"], "params_lora": P_A,
        "step_flops_simple": step_flops,
        "roofline_fraction": pass_flops * len(times) / total_passes / peak if total_passes else None,
        "step_roofline_fraction": step_flops * len(times) / total_s / peak if total_s else None,
        "config_keys_not_in_this_trl": dropped,
        "peak_rss_gb_steps": rss_steps, "peak_rss_gb_part": rss_part, "peak_rss_exact": timer.steps_reset,
    }


# --------------------------------------------------------------------------------- report

def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "transformers", "peft", "trl", "accelerate"):
        try:
            import importlib.metadata as md

            versions[dist] = md.version(dist)
        except Exception:
            versions[dist] = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gb": mem_gb,
            "python": platform.python_version(), "platform": platform.platform(), **versions}


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    mm = res["matmul"]
    print("\nroofline: " + ", ".join(f"{m['precision']} matmul {m['size']}^3 -> {m['gflops']:.1f} GFLOP/s"
                                     for m in res["matmuls"].values())
          + f" (median of {mm['reps']}, {mm['threads']} threads); each row's roofline is its precision's")
    if res["generation"]:
        r0 = res["generation"][0]
        print(f"\ngeneration: exactly {r0['new_tokens']} new tokens per row, temperature 1, top_p 1, "
              f"median of {r0['repeats']} after a warm-up; batch PxG = P prompts x G copies "
              f"(HF: num_return_sequences=G); roofline = 2 x params per generated token")
        print(f"{'model':<9}{'prec':<6}{'batch':>7}{'prompt':>8}{'ours tok/s':>12}{'HF tok/s':>10}{'speedup':>9}"
              f"{'ours roof':>11}{'HF roof':>9}{'ours roof+pre':>15}")
        for r in res["generation"]:
            shape = f"{r['batch'] // r['group']}x{r['group']}" if r["group"] > 1 else str(r["batch"])
            print(f"{r['model']:<9}{r['precision']:<6}{shape:>7}{r['prompt_tokens_mean']:>8.0f}{r['ours_tok_s']:>12.1f}"
                  f"{r['hf_tok_s']:>10.1f}{r['speedup']:>9.2f}{r['ours_roofline_fraction']:>11.1%}"
                  f"{r['hf_roofline_fraction']:>9.1%}{r['ours_roofline_fraction_incl_prefill']:>15.1%}")
    if res["grpo"]:
        s = res["settings"]["grpo"]
        print(f"\nGRPO step: {s['prompts']} prompts x {s['generations']} generations, <= {s['max_new_tokens']} "
              f"new tokens, beta {s['kl_coef']}, median of timed steps after a warm-up step.\n"
              "train roof: (reference 2P + update) FLOPs per real token / (step - rollout) seconds, update = 6P "
              "full, 4P + 6P_A LoRA (no weight gradients\nfor the frozen base); step roof: the same plus the "
              "rollout's 2(P + P_A), over the whole step; min-work: shared prompts once, no LM head on them")
        print(f"{'impl':<8}{'model':<9}{'prec':<6}{'mode':<6}{'step s':>8}{'rollout s':>11}{'passes s':>10}"
              f"{'compl len':>11}{'train roof':>12}{'min-work':>10}{'step roof':>11}{'RSS GB':>8}")
        for r in res["grpo"]:
            print(f"{r['impl']:<8}{r['model']:<9}{r['precision']:<6}{r['mode']:<6}{fmt(r['step_seconds']):>8}"
                  f"{fmt(r.get('rollout_seconds')):>11}{fmt(r.get('passes_seconds')):>10}"
                  f"{fmt(r['mean_completion_tokens'], '.1f'):>11}{fmt(r['roofline_fraction'], '.1%'):>12}"
                  f"{fmt(r.get('roofline_fraction_min_work'), '.1%'):>10}{fmt(r['step_roofline_fraction'], '.1%'):>11}"
                  f"{fmt(r['peak_rss_gb_steps']):>8}")
    for err in res["errors"]:
        print(f"error: {err}")
    h = res
    bf16_vs_fp32 = h["grpo_step_bf16_speedup_vs_fp32"]
    if bf16_vs_fp32:
        print("\nour GRPO step, bf16 vs fp32: " + ", ".join(f"{m} x{v:.2f}" for m, v in bf16_vs_fp32.items()))
    print(f"\nheadline ({h['precision']}, peers at {h['precision']}): "
          f"generation x{fmt(h['gen_speedup_vs_hf'])} vs HF ({h['gen_headline']}), "
          f"{fmt(h['gen_roofline_fraction'], '.1%')} of roofline; GRPO step "
          f"x{fmt(h['grpo_step_speedup_vs_trl'])} vs TRL"
          f"{' (' + h['grpo_step_speedup_vs_trl_reason'] + ')' if h.get('grpo_step_speedup_vs_trl_reason') else ''}, "
          f"training passes {fmt(h['train_roofline_fraction'], '.1%')} of roofline; "
          f"peak RSS of the GRPO step {fmt(h['peak_rss_gb'])} GB\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke check (< 1 min): tiny model only, batch 4 (and 2x2), 4 new tokens, 1 repeat, "
                         "a 2x2 GRPO step of 4 tokens, 1 torch thread, a 1024^3 roofline; precisions as without it")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--skip-trl", action="store_true", help="do not run TRL's GRPOTrainer")
    ap.add_argument("--parts", default="gen,grpo,trl",
                    help="comma-separated parts to run: gen (generation), grpo (our step), trl (TRL's step)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc at its defaults. Without it the whole process, peers included, "
                         "runs with the setting steprl's runtime uses on the CPU (memory.keep_freed_memory)")
    ap.add_argument("--skip-smollm2", action="store_true", help="tiny model only (GRPO on the tiny model)")
    ap.add_argument("--precision", default=None,
                    help="comma-separated precisions to run, each side at its best in each: fp32, bf16 "
                         "(default: bf16,fp32 where a bf16 matmul runs >= 1.5x fp32's here, else fp32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median), after one warm-up")
    ap.add_argument("--batches", default="16,64", help="generation batch sizes")
    ap.add_argument("--group", type=int, default=4,
                    help="also time each batch in the GRPO shape, batch/G prompts x G copies (1: don't)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per row in the generation part")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default, all cores; --quick uses 1)")
    ap.add_argument("--grpo-prompts", type=int, default=4)
    ap.add_argument("--grpo-generations", type=int, default=4)
    ap.add_argument("--grpo-max-new-tokens", type=int, default=64)
    ap.add_argument("--grpo-micro-batch", type=int, default=0,
                    help="our GRPO step's micro_batch_size (0 = the whole minibatch of P x G in one pass)")
    ap.add_argument("--grpo-release-memory", action="store_true",
                    help="our GRPO step with release_memory (the heap's free pages returned before each rollout)")
    ap.add_argument("--grpo-max-turns", type=int, default=1,
                    help="our GRPO step's max_turns (1 = single turn, like TRL)")
    a = ap.parse_args(argv)
    if a.quick:
        a.skip_smollm2, a.repeats, a.batches, a.new_tokens, a.group = True, 1, "4", 4, min(a.group, 2)
        a.grpo_prompts, a.grpo_generations, a.grpo_max_new_tokens = 2, 2, 4
        a.matmul_size = min(a.matmul_size, 1024)
        a.threads = a.threads or 1  # a smoke check: light on a shared machine, immune to oversubscription
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    parts = set(a.parts.split(","))
    precisions = list(dict.fromkeys(p for p in (a.precision or "").split(",") if p))  # empty: decided by the roofline
    if any(p not in DTYPES for p in precisions):
        ap.error(f"--precision: a comma-separated list of {', '.join(DTYPES)}, not '{a.precision}'")
    if not a.default_malloc:
        from steprl.memory import keep_freed_memory

        keep_freed_memory()  # process-wide: HF generate and TRL run under it too
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_start is not None and load_start > 0.5 and not a.quick:
        log(f"warning: load average {load_start:.2f} at start: other processes share the CPU, timings "
            "will be slow and noisy (2 torch threads on 2 busy cores can be 10x slower)")
    batches = [int(b) for b in a.batches.split(",") if b]
    t_start = time.perf_counter()
    errors: list[str] = []

    # 1. roofline, in both precisions: it also decides which precisions run by default
    from steprl.runtime import faster_precision

    log(f"matmul roofline ({a.matmul_size}^3, fp32 and bf16)")
    matmuls = {p: matmul_gflops(a.matmul_size, 3 if a.quick else 7, p) for p in DTYPES}
    peaks = {p: m["gflops"] for p, m in matmuls.items()}
    log("matmul: " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in peaks.items()))
    bf16_fast = faster_precision(peaks["fp32"], peaks["bf16"]) == "bf16"  # as runtime.precision auto decides
    precisions = precisions or (["bf16", "fp32"] if bf16_fast else ["fp32"])
    headline = "bf16" if "bf16" in precisions else "fp32"

    models = []  # (name, factory)
    log("building the tiny model (tokenizer trained on the calc corpus)")
    models.append(("tiny", build_tiny(a.quick)))
    if not a.skip_smollm2:
        try:
            from steprl.models.hub import resolve_model_path

            resolve_model_path("smollm2")
            models.insert(0, ("smollm2", smollm2_factory()))
        except Exception as err:
            errors.append(f"smollm2 unavailable, skipped: {type(err).__name__}: {err}")
            log(errors[-1])

    # 2. generation: distinct prompts, then the GRPO shape (P prompts x G copies), in each precision
    gen_rows = []
    for name, factory in (models if "gen" in parts else []):
        model, tok = factory()
        prompts, _, _ = task_prompts(tok, max(batches))
        for precision in precisions:
            # HF at its best in bf16: a bf16 copy of the model (ours decodes the fp32 model in bf16)
            hf_model = model if precision == "fp32" else copy.deepcopy(model).to(DTYPES[precision])
            for b in batches:
                for group in sorted({1, a.group if a.group > 1 and b % a.group == 0 else 1}):
                    gen_rows.append(bench_generation(name, model, hf_model, tok, prompts, b, a.new_tokens, a.repeats,
                                                     precision, peaks[precision], group=group))
            del hf_model
            free_memory()
        del model
        free_memory()
    rss_after_gen = peak_rss_gb()

    # 3. our GRPO step (LoRA first: where the peak cannot be reset, ru_maxrss only grows, and each
    #    reading then bounds that part's peak)
    s = {"prompts": a.grpo_prompts, "generations": a.grpo_generations, "max_new_tokens": a.grpo_max_new_tokens}
    grpo_name, grpo_factory = models[0]
    grpo_rows = []
    for lora in ((True, False) if "grpo" in parts else ()):
        for precision in precisions:
            try:
                grpo_rows.append(bench_grpo_ours(grpo_name, grpo_factory, lora, s, a.repeats, peaks[precision],
                                                 max_turns=a.grpo_max_turns, micro_batch_size=a.grpo_micro_batch,
                                                 release_memory=a.grpo_release_memory, precision=precision))
            except Exception as err:
                errors.append(f"our GRPO step ({'lora' if lora else 'full'}, {precision}) failed: "
                              f"{type(err).__name__}: {err}")
                log(errors[-1] + "\n" + traceback.format_exc())
            free_memory()

    # 4. TRL
    trl_reason = None
    if a.skip_trl or "trl" not in parts:
        trl_reason = "skipped (--skip-trl or --parts)"
    else:
        trl, trl_reason = trl_status()
        if trl is not None:
            for lora in (True, False):
                for precision in precisions:
                    try:
                        grpo_rows.append(bench_grpo_trl(grpo_name, grpo_factory, lora, s, a.repeats, peaks[precision],
                                                        precision=precision))
                    except Exception as err:
                        msg = (f"TRL GRPOTrainer ({'lora' if lora else 'full'}, {precision}) failed: "
                               f"{type(err).__name__}: {err}")
                        errors.append(msg)
                        log(msg + "\n" + traceback.format_exc())
                    free_memory()
        else:
            log(trl_reason)

    # headline numbers: one set per precision, peers at that precision
    def pick(rows, model, grouped=False):
        mine = [r for r in rows if r["model"] == model and (r["group"] > 1) == grouped]
        return max(mine, key=lambda r: r["batch"]) if mine else None

    def ours_by_mode(precision):
        return {r["mode"]: r for r in grpo_rows if r["impl"] == "steprl" and r["precision"] == precision}

    def summary(precision: str) -> dict:
        gen = [r for r in gen_rows if r["precision"] == precision]
        head = pick(gen, "smollm2") or pick(gen, "tiny")
        head_grouped = pick(gen, "smollm2", True) or pick(gen, "tiny", True)
        ours = ours_by_mode(precision)
        theirs = {r["mode"]: r for r in grpo_rows if r["impl"] == "trl" and r["precision"] == precision}
        speedups = {m: theirs[m]["step_seconds"] / ours[m]["step_seconds"] for m in ours
                    if m in theirs and theirs[m]["step_seconds"] and ours[m]["step_seconds"]}
        reason = None
        if not speedups:
            reason = trl_reason or f"TRL ran but produced no comparable step time in {precision} (see errors)"
        fractions = [r["roofline_fraction"] for r in ours.values()]
        return {
            "gen_speedup_vs_hf": head["speedup"] if head else None,
            "grpo_step_speedup_vs_trl": min(speedups.values()) if speedups else None,
            "grpo_step_speedup_vs_trl_reason": reason,
            "gen_roofline_fraction": head["ours_roofline_fraction"] if head else None,
            "train_roofline_fraction": min(fractions) if fractions else None,
            "gen_headline": f"{head['model']} batch {head['batch']}" if head else None,
            "gen_speedup_vs_hf_grouped": head_grouped["speedup"] if head_grouped else None,
            "gen_roofline_fraction_grouped": head_grouped["ours_roofline_fraction"] if head_grouped else None,
            "gen_headline_grouped": (f"{head_grouped['model']} batch {head_grouped['batch'] // head_grouped['group']}"
                                     f"x{head_grouped['group']}") if head_grouped else None,
            "grpo_step_speedup_vs_trl_full": speedups.get("full"),
            "grpo_step_speedup_vs_trl_lora": speedups.get("lora"),
            "train_roofline_fraction_full": ours.get("full", {}).get("roofline_fraction"),
            "train_roofline_fraction_lora": ours.get("lora", {}).get("roofline_fraction"),
            "train_roofline_fraction_min_work": min((r["roofline_fraction_min_work"] for r in ours.values()),
                                                    default=None),
            "step_roofline_fraction": min((r["step_roofline_fraction"] for r in ours.values()), default=None),
            "matmul_gflops": peaks[precision],
        }

    def our_step_seconds(precision):  # {"lora": s, "full": s}, None where that precision did not run
        return {m: r["step_seconds"] for m, r in ours_by_mode(precision).items()} or None

    by_precision = {p: summary(p) for p in precisions}
    step_bf16, step_fp32 = our_step_seconds("bf16"), our_step_seconds("fp32")
    bf16_vs_fp32 = None
    if step_bf16 and step_fp32:
        bf16_vs_fp32 = {m: step_fp32[m] / step_bf16[m] for m in step_bf16 if m in step_fp32} or None
    rss = [r["peak_rss_gb_steps"] for r in grpo_rows if r["impl"] == "steprl"]

    def key(*parts):
        return "/".join(str(x) for x in parts if x is not None)

    result = {
        "precision": headline,
        **by_precision[headline],
        "peak_rss_gb": max(rss) if rss else None,
        "grpo_model": grpo_name,
        "fp32_matmul_gflops": peaks["fp32"],
        "bf16_matmul_gflops": peaks["bf16"],
        "grpo_step_seconds_bf16": step_bf16,
        "grpo_step_seconds_fp32": step_fp32,
        "grpo_step_bf16_speedup_vs_fp32": bf16_vs_fp32,
        "by_precision": by_precision,
        "gen_tok_s": {key(r["model"], f"b{r['batch']}", f"g{r['group']}" if r["group"] > 1 else None, r["precision"]):
                      {"ours": r["ours_tok_s"], "hf": r["hf_tok_s"]} for r in gen_rows},
        "grpo_step_seconds": {key(r["impl"], r["mode"], r["precision"]): r["step_seconds"] for r in grpo_rows},
        "peak_rss_gb_grpo": {key(r["impl"], r["mode"], r["precision"]): r["peak_rss_gb_steps"] for r in grpo_rows},
        "peak_rss_exact": all(r["peak_rss_exact"] for r in grpo_rows) if grpo_rows else None,
        "peak_rss_gb_after_generation": rss_after_gen,
        # the whole process's peak: the largest reading of any part (a reset also resets ru_maxrss)
        "peak_rss_gb_process": max([rss_after_gen, peak_rss_gb()] + [r["peak_rss_gb_part"] for r in grpo_rows]),
        "peak_rss_gb_children": peak_rss_gb(resource.RUSAGE_CHILDREN),
        "matmul": matmuls[headline],
        "matmuls": matmuls,
        "generation": gen_rows,
        "grpo": grpo_rows,
        "settings": {"quick": a.quick, "parts": sorted(parts), "precisions": precisions,
                     "default_malloc": a.default_malloc,
                     "repeats": a.repeats, "batches": batches, "group": a.group,
                     "new_tokens": a.new_tokens,
                     "grpo": {**s, "kl_coef": 0.04, "max_turns": a.grpo_max_turns, "lora_r": 16,
                              "lora_targets": LORA_TARGETS, "learning_rate": 1e-6,
                              "micro_batch_size": a.grpo_micro_batch}},
        "machine": {**machine_info(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "errors": errors,
        "wall_seconds": time.perf_counter() - t_start,
    }
    print_table(result)
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

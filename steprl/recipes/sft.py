"""Stage 2, cold-start SFT: imitate successful trajectories, loss on the assistant's tokens only.

    L = -(1 / |y|) sum_{t in assistant tokens} log P(y_t | x, y_<t)

Conversations are tokenised exactly as rollouts will see them (ChatRenderer.conversation_ids, with
the same tool descriptions in the system prompt):
system, user and tool messages are context (mask 0); each assistant turn and its end-of-turn
token are trained (mask 1). LoRA through peft, or full fine-tuning.

Data: a JSONL file (`sft.data`), or the task's generated successful trajectories, of which
`sft.no_tool_fraction` answer without their tool calls (a teacher that knows some answers: the
student learns that habit too, and RL has to learn that the tool pays).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from steprl.config import RunConfig
from steprl.memory import keep_freed_memory
from steprl.models.loading import apply_lora, forward_with_hidden, load_policy, resolve, save_checkpoint
from steprl.monitor import MetricsLogger
from steprl.training.common import (Timer, cosine_lr, finish, load_state, previous_checkpoint, progress_bar,
                                   restore_streams, save_resumable, set_lr, stage_dir)
from steprl.training.policy import load_weights
from steprl.envs.tool_env import with_system_suffix
from steprl.rollout.chat import tool_setup
from steprl.runtime import setup_runtime
from steprl.tasks import get_task


def load_conversations(path: str) -> list[list[dict]]:
    """JSONL of {"messages": [...]} or {"prompt": str, "completion": str}."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            out.append(row["messages"])
        elif "prompt" in row and "completion" in row:
            out.append([{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["completion"]}])
        else:
            raise ValueError(f"{path}:{n}: expected 'messages' or 'prompt'+'completion' keys")
    return out


def without_tools(conversation: list[dict]) -> list[dict]:
    """The same episode answered without tools: the context (system and user messages) and the
    final assistant message; the tool calls and their results are dropped."""
    context = [m for m in conversation if m["role"] in ("system", "user")]
    final = [m for m in conversation if m["role"] == "assistant"][-1:]
    return context + final


def cold_start(task, n: int, no_tool_fraction: float, seed: int) -> list[list[dict]]:
    """The task's n successful trajectories; round(no_tool_fraction * n) of them, chosen by the
    seed, answer directly (`without_tools`)."""
    conversations = task.cold_start(n, seed=seed)
    direct = set(random.Random(f"no_tool/{seed}").sample(range(len(conversations)),
                                                        round(no_tool_fraction * len(conversations))))
    return [without_tools(c) if i in direct else c for i, c in enumerate(conversations)]


def tokenize_conversations(task, tokenizer, conversations: list[list[dict]], max_length: int):
    """(ids, mask) per conversation, as rollouts will see it (the same system prompt, tools
    described), cut at max_length."""
    _, renderer, suffix = tool_setup(task, tokenizer)
    examples = [renderer.conversation_ids(with_system_suffix(c, suffix)) for c in conversations]
    return [(ids[:max_length], mask[:max_length]) for ids, mask in examples]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 wherever the mask is 0)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        labels[i, : len(x)] = torch.where(torch.tensor(m) == 1, torch.tensor(x), -100)
    return ids, attn, labels


def run(cfg: RunConfig) -> dict:
    rt = setup_runtime(cfg)
    s, out = cfg.sft, stage_dir(cfg, "sft")
    # conversations of every length fragment a heap that is never trimmed: SmolLM2 on GSM8K grew
    # 0.2 GB a step (8 -> 14 GB in 25 steps, even trimmed every 10); by default SFT frees its blocks to the OS.
    # The host heap holds the activations only on the CPU, as setup_runtime's setting assumes.
    if rt.device.type == "cpu":
        keep_freed_memory(s.keep_freed_memory)
    base = resolve(previous_checkpoint(cfg, "sft"))
    model, tokenizer = load_policy(base)
    task = get_task(cfg.task.name, **cfg.task.args)
    conversations = (load_conversations(s.data) if s.data
                     else cold_start(task, s.n_examples, s.no_tool_fraction, seed=cfg.seed))
    examples = tokenize_conversations(task, tokenizer, conversations, s.max_length)
    random.Random(cfg.seed).shuffle(examples)
    n_eval = max(1, len(examples) // 10) if len(examples) >= 20 else 0
    eval_set, train_set = examples[:n_eval], examples[n_eval:]

    if s.lora.enabled:
        model = apply_lora(model, s.lora)
    ckpt, start = out / "checkpoint", 0
    state = load_state(ckpt)
    if state:  # an interrupted run: its weights (before sharding, which splits them), optimiser and step
        load_weights(model, ckpt)
        start = state["step"]
    model = rt.prepare(model).train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = rt.adamw(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    if state:
        rt.load_optimizer_state(model, optimizer, state["optimizer"])
    steps_per_epoch = (len(train_set) + s.batch_size - 1) // s.batch_size
    total = steps_per_epoch * s.epochs
    warmup = int(s.warmup_ratio * total) if s.warmup_ratio > 0 else s.warmup_steps
    logger = MetricsLogger(out, "sft", report_to=cfg.report_to, live_doctor=cfg.doctor.enabled,
                           doctor_context={"learning_rate": s.learning_rate}, write=rt.is_main)
    logger.truncate_after(start + 1)  # a fresh start drops what a killed run logged
    bar = progress_bar(total, f"sft ({'LoRA r=%d' % s.lora.r if s.lora.enabled else 'full'}, "
                              f"{len(train_set)} conversations)", initial=start)

    def save(step: int) -> None:
        save_resumable(ckpt, rt, step, optimizer,
                       lambda d, weights: save_checkpoint(model, tokenizer, d, base, weights), model=model,
                       last=step == total)

    timer, rng, step = Timer(), random.Random(cfg.seed), start
    if state:  # last: nothing the setup drew shifts the streams
        restore_streams(state, rt.rank, rt.world_size)
    for epoch in range(s.epochs):
        order = list(range(len(train_set)))
        rng.shuffle(order)  # every epoch's, also on resume: the same orders as an uninterrupted run
        for b in range(steps_per_epoch):
            if epoch * steps_per_epoch + b < start:
                continue
            lr = s.learning_rate * cosine_lr(step, total, warmup)
            set_lr(optimizer, lr)
            batch = [train_set[i] for i in order[b * s.batch_size:(b + 1) * s.batch_size]]
            mine = rt.shard(batch, even=False)  # this rank's share; a rank left without any weighs 0
            ids, attn, labels = (x.to(rt.device) for x in collate(mine or batch[:1], tokenizer.pad_token_id))
            with rt.autocast():  # sft_loss takes fp32 logits
                loss = sft_loss(model, ids, attn, labels)
            # the token mean over the whole batch, whichever rank holds which tokens
            loss = loss * rt.weight(float((labels[:, 1:] != -100).sum()) if mine else 0.0)
            optimizer.zero_grad(set_to_none=True)
            finite = rt.agree(bool(torch.isfinite(loss)))  # all ranks run the backward or none: FSDP's is collective
            if finite:
                loss.backward()
            if not rt.sync_gradients(params, finite):
                logger.log({"loss": float("nan"), "event": "nan_skip"}, step + 1)
                step += 1
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            step += 1
            bar.update(1)
            metrics = {}
            if step % s.log_every == 0 or step == total:
                metrics = {"loss": loss.item(), "learning_rate": lr, "grad_norm": grad_norm.item(),
                           "epoch": epoch + (b + 1) / steps_per_epoch, "step_time": timer.seconds / (step - start)}
            if eval_set and (b + 1 == steps_per_epoch):
                metrics["eval/loss"] = eval_loss(model, eval_set, tokenizer.pad_token_id, s.batch_size)
            if metrics:
                metrics = rt.mean_metrics(metrics)
                logger.log(metrics, step)
                bar.set_postfix(loss=f"{metrics.get('loss', loss.item()):.3f}")
            if s.save_every and step % s.save_every == 0 and step < total:
                save(step)
    bar.close()
    logger.close()
    info = {"checkpoint": str(ckpt), "base": base, "examples": len(train_set), "steps": total}
    save(total)  # its trainer state goes once done.json is written
    if rt.is_main:
        finish(out, ckpt, info)
    return info


def sft_loss(model, ids, attn, labels) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (assistant) tokens, HF's causal-LM loss.

    The vocabulary projection runs only where a label is: prompts, system messages and tool results
    are most of a real conversation's tokens, and their [tokens x vocab] logits (49k wide for
    SmolLM2) were most of a step's memory and a good part of its time. So the model's own forward
    projects the last position only and the trunk's hidden states are taken on their way out
    (through the model's forward, so that FSDP gathers its weights). Logits are fp32 for the loss.
    """
    _, hidden = forward_with_hidden(model, input_ids=ids, attention_mask=attn, logits_to_keep=1)
    hidden, target = hidden[:, :-1], labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        device = next(model.parameters()).device
        ids, attn, labels = (x.to(device) for x in collate(examples[i:i + batch_size], pad_id))
        n = int((labels[:, 1:] != -100).sum())
        total += sft_loss(model, ids, attn, labels).item() * n
        count += n
    model.train()
    return total / max(count, 1)

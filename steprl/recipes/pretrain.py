"""Stage 1, pretraining: next-token NLL on the task's plain-text corpus.

    L = -(1/N) sum_t log P(x_t | x_<t)

Documents are joined with <|endoftext|> and packed into fixed-length blocks (no padding).
For the embedded default ("tiny") this stage also trains the tokenizer and builds the model;
for any other model it continues pretraining from the given weights.
"""
from __future__ import annotations

import random

import torch

from steprl.config import RunConfig
from steprl.models.loading import load_policy, save_checkpoint
from steprl.models.tiny import render_chatml, tiny_llama, train_tokenizer
from steprl.monitor import MetricsLogger
from steprl.training.common import (Timer, cosine_lr, finish, wsd_lr, load_state, progress_bar, restore_streams,
                                   save_resumable, set_lr, stage_dir)
from steprl.runtime import setup_runtime
from steprl.tasks import get_task


def pack(token_lists: list[list[int]], sep_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents with a separator and cut into [n_blocks, seq_len]."""
    flat = [t for ids in token_lists for t in (*ids, sep_id)]
    n_blocks = len(flat) // seq_len
    if n_blocks == 0:
        raise ValueError(f"pretrain: corpus has {len(flat)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(flat[: n_blocks * seq_len]).view(n_blocks, seq_len)


def build_model(cfg: RunConfig, task, docs: list[str]):
    if cfg.model.name_or_path != "tiny":
        return load_policy(cfg.model.name_or_path)
    # The tokenizer sees the tool protocol too, so calls and answers become a few tokens each.
    protocol = [render_chatml(m) for m in task.cold_start(min(500, len(docs)), seed=cfg.seed + 99)]
    tokenizer = train_tokenizer(docs[:20000] + protocol * 4, vocab_size=cfg.model.vocab_size)
    m = cfg.model
    model = tiny_llama(tokenizer, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                       max_position_embeddings=m.max_position_embeddings, seed=cfg.seed)
    return model, tokenizer


def compiled(model):
    """torch.compile for the fixed-shape training step; a machine where compilation fails (no C
    compiler, say) runs the same step eagerly instead of stopping."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model)


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def run(cfg: RunConfig) -> dict:
    rt = setup_runtime(cfg)
    p, out = cfg.pretrain, stage_dir(cfg, "pretrain")
    ckpt = out / "checkpoint"
    task = get_task(cfg.task.name, **cfg.task.args)
    docs = task.pretrain_corpus(p.n_docs, seed=cfg.seed)
    state = load_state(ckpt)
    model, tokenizer = load_policy(str(ckpt)) if state else build_model(cfg, task, docs)
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sep = sep if isinstance(sep, int) and sep != tokenizer.unk_token_id else tokenizer.eos_token_id
    docs = [d if isinstance(d, str) else tokenizer.apply_chat_template(d, tokenize=False) for d in docs]
    random.Random(cfg.seed).shuffle(docs)
    n_eval = max(1, len(docs) // 50)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    train_blocks, eval_blocks = pack(ids[n_eval:], sep, p.seq_len), pack(ids[:n_eval], sep, p.seq_len)[:64]
    train_blocks, eval_blocks = train_blocks.to(rt.device), eval_blocks.to(rt.device)

    model = rt.prepare(model).train()  # sharded under zero_stage 2/3: collect the parameters after
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.dim() < 2]
    optimizer = rt.adamw([{"params": decay, "weight_decay": p.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}], lr=p.learning_rate, betas=(0.9, 0.95))
    start = 0
    if state:
        rt.load_optimizer_state(model, optimizer, state["optimizer"])
        start = state["step"]
    logger = MetricsLogger(out, "pretrain", report_to=cfg.report_to, live_doctor=cfg.doctor.enabled,
                           doctor_context={"learning_rate": p.learning_rate}, write=rt.is_main)
    logger.truncate_after(start + 1)  # a fresh start drops what a killed run logged
    forward = compiled(model) if p.compile else model
    n_params = sum(q.numel() for q in model.parameters())
    bar = progress_bar(p.steps, f"pretrain ({n_params / 1e6:.2f}M params)", initial=start)
    timer, gen = Timer(), torch.Generator().manual_seed(cfg.seed)
    if state:  # last: nothing the setup drew shifts the streams
        restore_streams(state, rt.rank, rt.world_size, gen)

    def save(step: int) -> None:
        save_resumable(ckpt, rt, step, optimizer,
                       lambda d, weights: save_checkpoint(model, tokenizer, d, state_dict=weights), gen, model=model,
                       last=step == p.steps)

    for step in range(start, p.steps):
        if p.schedule == "wsd":
            lr = p.learning_rate * wsd_lr(step, p.steps, p.warmup_steps, p.decay_fraction, p.min_lr_ratio)
        else:
            lr = p.learning_rate * cosine_lr(step, p.steps, p.warmup_steps, p.min_lr_ratio)
        set_lr(optimizer, lr)
        # every rank draws the same global batch and trains on its share (full blocks: equal token counts)
        pick = torch.randint(0, len(train_blocks), (p.batch_size,), generator=gen)
        batch = train_blocks[rt.shard(pick, "pretrain.batch_size")]
        with rt.autocast():  # HF's loss upcasts the logits to fp32
            loss = forward(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        finite = rt.agree(bool(torch.isfinite(loss)))  # all ranks run the backward or none: FSDP's is collective
        if finite:
            loss.backward()
        if not rt.sync_gradients(model.parameters(), finite):
            logger.log({"loss": float("nan"), "event": "nan_skip"}, step + 1)
            optimizer.zero_grad(set_to_none=True)
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
        optimizer.step()
        bar.update(1)
        metrics = {}
        if (step + 1) % p.log_every == 0 or step + 1 == p.steps:
            metrics = {"loss": loss.item(), "learning_rate": lr, "grad_norm": grad_norm.item(),
                       "tokens_per_second": (step + 1 - start) * batch.numel() * rt.world_size / timer.seconds}
        if (step + 1) % p.eval_every == 0 or step + 1 == p.steps:
            metrics["eval/loss"] = eval_loss(model, eval_blocks, p.batch_size)
        if metrics:
            metrics = rt.mean_metrics(metrics)
            logger.log(metrics, step + 1)
            bar.set_postfix(loss=f"{metrics.get('loss', loss.item()):.3f}")
        if (step + 1) % p.save_every == 0 and step + 1 < p.steps:
            save(step + 1)
    bar.close()
    logger.close()
    info = {"checkpoint": str(ckpt), "params": n_params, "steps": p.steps}
    save(p.steps)  # its trainer state goes once done.json is written
    if rt.is_main:
        finish(out, ckpt, info)
    return info

"""Stage `rm`, a Bradley-Terry reward model: a scalar head on the language model, trained so the
preferred conversation of each pair scores higher.

    r(x, y)  = w . h_last  (type "classifier", pooling "last": AutoModelForSequenceClassification, 1 label)
             = sum_t m_t w . h_t / sum_t m_t  (pooling "mean": m_t = 1 on the tokens the assistant wrote)
             = beta * sum_t m_t [log pi_theta(y_t | y_<t) - log pi_ref(y_t | y_<t)]  (type "implicit")
    L        = mean_pairs[ -log sigmoid(r(x, y_w) - r(x, y_l) - m) ] + c * mean_pairs[ (r_w + r_l)^2 ]

The implicit reward model has no head: the language model scores with its own token
probabilities against the frozen base's (DPO's implicit reward; summed per turn it is a process
reward, Yuan et al. 2024). It starts at r = 0 and learns from the same loss. Where the ranking
hangs on whether a digit was copied right, the LM already knows where each digit should come from,
while a head on one pooled position has to learn that from the pairs.

m is an optional per-pair margin (use_margin), c the reward-centring coefficient (Eisenstein et
al. 2023: pins the reward's free offset near 0). Eval: pairwise accuracy P(r_w > r_l) on held-out
pairs -> eval/accuracy (also written to eval.json, which the pipeline reports).

Pairs come from JSONL ({"prompt", "chosen", "rejected"} as text or as messages) or, for tasks
with `solution_messages`, are generated: chosen = a correct tool-use solution, rejected = the same
episode corrupted (a wrong number copied into the call, a wrong final answer, no <answer> tag,
or a malformed call) and replayed through the environment so its rule reward is lower.
The checkpoint is always a full model in Hugging Face format (LoRA is merged before saving), so
`rewards.RewardModelScorer(path)` loads it with one `from_pretrained` (an implicit RM keeps its reference
beside it, in `checkpoint/reference`).
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from steprl.algos import bradley_terry_loss
from steprl.config import ConfigError, RewardConfig, RunConfig
from steprl.envs.tool_env import ToolEnv
from steprl.models.loading import apply_lora, load_policy, resolve
from steprl.monitor import MetricsLogger
from steprl.rewards.reward_model import INFO_FILE, as_messages, score_fn
from steprl.rollout.chat import tool_setup
from steprl.runtime import setup_runtime
from steprl.tasks import get_task
from steprl.training.common import (Timer, cosine_lr, finish, load_state, previous_checkpoint, progress_bar,
                                    restore_streams, save_resumable, set_lr, stage_dir, trainable_weights,
                                    write_atomic)


# ----------------------------------------------------------------------------- preference data

def load_pairs(path: str) -> list[dict]:
    """JSONL rows {"prompt"?, "chosen", "rejected", "margin"?} -> {"chosen", "rejected", "margin", "kind"}."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "chosen" not in row or "rejected" not in row:
            raise ValueError(f"{path}:{n}: expected 'chosen' and 'rejected' keys (and optionally 'prompt', 'margin')")
        pairs.append({"chosen": as_messages(row.get("prompt"), row["chosen"]),
                      "rejected": as_messages(row.get("prompt"), row["rejected"]),
                      "margin": float(row.get("margin", 0.0)), "kind": "data"})
    return pairs


def rule_reward(task, tools, problem, messages: list[dict]) -> float:
    """Replay a conversation's assistant turns through the environment: the sum of its rewards."""
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    env = ToolEnv(task, tools, RewardConfig(), max_turns=len(turns))
    env.reset(problem)
    total = 0.0
    for text in turns:
        result = env.step(text)
        total += result.reward
        if result.done:
            break
    return total


def generated_pairs(task, tools, suffix: str, problems, kinds: list[str], seed: int) -> list[dict]:
    """One pair per problem, corruption kinds in turn; deterministic given `seed`."""
    rng, pairs = random.Random(f"rm/{seed}"), []
    for i, p in enumerate(problems):
        env = ToolEnv(task, tools, RewardConfig(), 1, suffix)
        prompt = env.reset(p)  # the same (system-suffixed) prompt rollouts see
        chosen = prompt + task.solution_messages(p)[len(task.prompt_messages(p)):]
        kind = kinds[i % len(kinds)]
        rejected = task.corrupt(chosen, kind, tools, rng)
        gap = rule_reward(task, tools, p, chosen) - rule_reward(task, tools, p, rejected)
        if gap > 0:
            pairs.append({"chosen": chosen, "rejected": rejected, "margin": gap, "kind": kind})
    return pairs


# ----------------------------------------------------------------------------- model

def reward_model_from(base: str):
    """(AutoModelForSequenceClassification with 1 label, tokenizer) from a causal-LM checkpoint
    (adapters merged): same trunk weights, a fresh score head."""
    causal, tokenizer = load_policy(base)
    config = copy.deepcopy(causal.config)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id  # the head pools the last non-pad token
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config)
    missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
    if any(not k.startswith("score.") for k in missing):
        raise ValueError(f"rm: the reward model does not match its base {base}: missing {missing[:3]}")
    return model.float(), tokenizer


def rm_model(base: str, c):
    """(the reward model to train, tokenizer): the implicit RM's language model or a classifier
    (`reward_model_from`), with LoRA where asked (the classifier's score head trains whole)."""
    implicit = c.type == "implicit"
    model, tokenizer = load_policy(base) if implicit else reward_model_from(base)
    if c.lora.enabled and implicit:
        model = apply_lora(model, c.lora)
    elif c.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        model = get_peft_model(model, PeftLoraConfig(
            r=c.lora.r, lora_alpha=c.lora.alpha, lora_dropout=c.lora.dropout, task_type="SEQ_CLS",
            target_modules=list(c.lora.target_modules),
            modules_to_save=["score", *getattr(c.lora, "modules_to_save", [])]))
    return model, tokenizer


def encode_pair(renderer, pair: dict, max_length: int) -> None:
    """Token ids and assistant masks of both sides, cut at max_length."""
    for side in ("chosen", "rejected"):
        ids, mask = renderer.conversation_ids(pair[side])
        pair[f"{side}_ids"], pair[f"{side}_mask"] = ids[:max_length], mask[:max_length]


def pair_scores(score, batch: list[dict]) -> torch.Tensor:
    """Scores [2 x len(batch)]: every chosen side, then every rejected side. `score(seqs, masks)`
    is the reward model as a function (see `score_fn`)."""
    seqs = [p["chosen_ids"] for p in batch] + [p["rejected_ids"] for p in batch]
    masks = [p["chosen_mask"] for p in batch] + [p["rejected_mask"] for p in batch]
    return score(seqs, masks)


@torch.no_grad()
def pairwise_eval(model, score, pairs: list[dict], batch_size: int) -> dict:
    """eval/accuracy = P(r_w > r_l) on encoded pairs, eval/loss = the BT loss, accuracy per kind."""
    was_training = model.training
    model.eval()
    rc, rr = [], []
    for lo in range(0, len(pairs), batch_size):
        batch = pairs[lo:lo + batch_size]
        s = pair_scores(score, batch)
        rc.append(s[: len(batch)])
        rr.append(s[len(batch):])
    model.train(was_training)
    rc, rr = torch.cat(rc), torch.cat(rr)
    wins = (rc > rr).float()
    by_kind = {}
    for kind in sorted({p["kind"] for p in pairs}):
        idx = torch.tensor([p["kind"] == kind for p in pairs], device=wins.device)
        by_kind[kind] = wins[idx].mean().item()
    return {"accuracy": wins.mean().item(), "loss": bradley_terry_loss(rc, rr).item(), "n": len(pairs),
            "by_kind": by_kind}


# ----------------------------------------------------------------------------- the stage

def rm_base(cfg: RunConfig) -> str:
    """What the RM starts from: rm.init_from, else the last policy stage listed before rm."""
    if cfg.rm.init_from:
        return cfg.rm.init_from
    if "rm" in cfg.stages:
        before = [s for s in cfg.stages[: cfg.stages.index("rm")] if s != "rm"]
        return str(cfg.run_dir / before[-1] / "checkpoint") if before else cfg.model.name_or_path
    return previous_checkpoint(cfg, "rm")


def run(cfg: RunConfig) -> dict:
    rt = setup_runtime(cfg)
    c, out = cfg.rm, stage_dir(cfg, "rm")
    base = resolve(rm_base(cfg))
    implicit = c.type == "implicit"
    model, tokenizer = rm_model(base, c)
    task = get_task(cfg.task.name, **cfg.task.args)
    bad = [k for k in c.corruptions if k not in task.corruptions]
    if bad:
        raise ConfigError(f"rm.corruptions: unknown '{bad[0]}' for task '{task.name}' (allowed: {', '.join(task.corruptions)})")
    tools, renderer, suffix = tool_setup(task, tokenizer)
    if c.data:
        train = load_pairs(c.data)
        test = load_pairs(c.test_data) if c.test_data else []
        if not test:
            random.Random(cfg.seed).shuffle(train)
            n_test = max(1, len(train) // 10)
            test, train = train[:n_test], train[n_test:]
    else:
        train = generated_pairs(task, tools, suffix, task.problems("train", c.n_pairs, seed=30_000 + cfg.seed),
                                c.corruptions, cfg.seed)
        test = load_pairs(c.test_data) if c.test_data else generated_pairs(
            task, tools, suffix, task.problems("test", c.n_test_pairs), c.corruptions, cfg.seed + 1)
    for p in train + test:
        encode_pair(renderer, p, c.max_length)

    reference = None  # implicit: a frozen copy of the base (under LoRA: the base with adapters disabled)
    if implicit and not c.lora.enabled:
        reference = copy.deepcopy(model).requires_grad_(False).to(rt.device)
    # a periodic checkpoint holds the trained parameters in its trainer state only; the final one
    # is the reward model in Hugging Face format (write_final)
    ckpt, start = out / "checkpoint", 0
    state = load_state(ckpt)
    if state:  # an interrupted run: its weights (before sharding), optimiser and step
        model.load_state_dict(state["extra"]["weights"], strict=False)
    model = rt.prepare(model).train()  # sharded under zero_stage 2/3: collect the parameters after
    pad_id = tokenizer.pad_token_id
    score = score_fn(model, pad_id, c.type, c.pooling, reference, c.beta)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = rt.adamw(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    steps_per_epoch = (len(train) + c.batch_size - 1) // c.batch_size
    total = steps_per_epoch * c.epochs
    if state:
        rt.load_optimizer_state(model, optimizer, state["optimizer"])
        start = state["step"]
    logger = MetricsLogger(out, "rm", report_to=cfg.report_to, live_doctor=cfg.doctor.enabled,
                           doctor_context={"learning_rate": c.learning_rate}, write=rt.is_main)
    logger.truncate_after(start + 1)  # a fresh start drops what a killed run logged
    bar = progress_bar(total, f"rm ({c.type}, {'LoRA r=%d' % c.lora.r if c.lora.enabled else 'full'}, "
                              f"{len(train)} pairs, {len(test)} held out)", initial=start)

    def save(step: int, write_model=lambda directory, weights: None) -> None:
        save_resumable(ckpt, rt, step, optimizer, write_model, extra={"weights": trainable_weights(model)},
                       model=model, last=step == total)

    timer, rng, step = Timer(), random.Random(cfg.seed), start
    if state:  # last: nothing the setup drew shifts the streams
        restore_streams(state, rt.rank, rt.world_size)
    for epoch in range(c.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)  # every epoch's, also on resume: the same orders as an uninterrupted run
        for b in range(steps_per_epoch):
            if epoch * steps_per_epoch + b < start:
                continue
            lr = c.learning_rate * cosine_lr(step, total, c.warmup_steps)
            set_lr(optimizer, lr)
            batch = [train[i] for i in order[b * c.batch_size:(b + 1) * c.batch_size]]
            mine = rt.shard(batch, even=False)  # this rank's share; a rank left without any weighs 0
            share = rt.weight(len(mine))
            batch = mine or batch[:1]
            with rt.autocast():
                s = pair_scores(score, batch).float()
            r_w, r_l = s[: len(batch)], s[len(batch):]
            margin = torch.tensor([p["margin"] for p in batch], device=s.device) if c.use_margin else None
            loss = bradley_terry_loss(r_w, r_l, margin) + c.center_rewards_coefficient * ((r_w + r_l) ** 2).mean()
            loss = loss * share  # the mean over the whole batch, whichever rank holds which pairs
            optimizer.zero_grad(set_to_none=True)
            step += 1
            finite = rt.agree(bool(torch.isfinite(loss)))  # all ranks run the backward or none: FSDP's is collective
            if finite:
                loss.backward()
            if not rt.sync_gradients(params, finite):
                logger.log({"loss": float("nan"), "event": "nan_skip"}, step)
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            optimizer.step()
            bar.update(1)
            metrics = {}
            if step % c.log_every == 0 or step == total:
                metrics = {"loss": loss.item(), "accuracy": (r_w > r_l).float().mean().item(),
                           "reward_margin": (r_w - r_l).mean().item(), "reward_mean": s.mean().item(),
                           "learning_rate": lr, "grad_norm": float(grad_norm), "epoch": epoch + (b + 1) / steps_per_epoch,
                           "step_time": timer.seconds / (step - start)}
            if b + 1 == steps_per_epoch and test:
                ev = pairwise_eval(model, score, test, c.eval_batch_size)
                metrics.update({"eval/accuracy": ev["accuracy"], "eval/loss": ev["loss"]})
            if metrics:
                metrics = rt.mean_metrics(metrics)
                logger.log(metrics, step)
                bar.set_postfix(loss=f"{loss.item():.3f}", **({"eval_acc": f"{metrics['eval/accuracy']:.2f}"}
                                                             if "eval/accuracy" in metrics else {}))
            if c.save_every and step % c.save_every == 0 and step < total:
                save(step)
    bar.close()
    logger.close()
    ev = pairwise_eval(model, score, test, c.eval_batch_size) if test else {"accuracy": 0.0, "n": 0}

    def write_final(directory, weights):
        final = model
        if weights is not None:  # sharded: the whole weights, gathered on rank 0, into a fresh copy
            final = rm_model(base, c)[0]
            final.load_state_dict(weights, strict=False)  # all but a tied LM head (its embedding), as saved
        final = final.merge_and_unload() if c.lora.enabled else final
        final.config.steprl_rm_pooling = c.pooling  # RewardModelScorer pools the same way
        final.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if implicit:  # the scorer needs pi_ref too: the base, as it was before training
            (reference if reference is not None else load_policy(base)[0]).save_pretrained(directory / "reference")
        (directory / INFO_FILE).write_text(json.dumps({"task": cfg.task.name, "task_args": cfg.task.args,
                                                       "type": c.type, "beta": c.beta}))

    save(total, write_final)  # rank 0 writes; its trainer state goes once done.json is written
    info = {"checkpoint": str(ckpt), "base": base, "pairs": len(train), "steps": total, "eval": ev}
    if rt.is_main:
        write_atomic(out / "eval.json", json.dumps({**ev, "metric": "pairwise_accuracy"}))
        finish(out, ckpt, info)
    return info

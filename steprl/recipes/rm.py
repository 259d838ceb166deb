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
`RewardModelScorer(path)` loads it with one `from_pretrained` (an implicit RM keeps its reference
beside it, in `checkpoint/reference`).
"""
from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from steprl.algos import bradley_terry_loss
from steprl.config import RewardConfig, RunConfig
from steprl.envs.tool_env import ToolEnv
from steprl.models.loading import apply_lora, load_policy, load_tokenizer, resolve, unwrap_peft
from steprl.monitor import MetricsLogger
from steprl.recipes.common import Timer, cosine_lr, mark_done, progress_bar, set_lr, setup_torch, stage_dir
from steprl.recipes.evaluate import tool_setup
from steprl.recipes.grpo import completion_logprobs, right_aligned
from steprl.recipes.rm_config import CORRUPTIONS
from steprl.recipes.sft import previous_checkpoint
from steprl.tasks import get_task
from steprl.rollout.episodes import Trajectory
from steprl.tools import execute_tool_call, parse_tool_calls

INFO_FILE = "steprl_rm.json"  # beside the checkpoint: which task's chat rendering to score with


# ----------------------------------------------------------------------------- preference data

def as_messages(prompt, completion) -> list[dict]:
    """A conversation from a prompt and a completion, each text or messages (TRL's formats)."""
    if completion is None:
        raise ValueError("missing completion")
    head = [] if prompt is None else [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return head + tail


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


def _change_digit(text: str, rng: random.Random) -> str:
    """One digit of one number in `text` replaced by another (no new leading zero)."""
    spans = [m.span() for m in re.finditer(r"\d+", text)]
    lo, hi = rng.choice(spans)
    i = rng.randrange(lo, hi)
    choices = [d for d in "0123456789" if d != text[i] and not (d == "0" and i == lo and hi - lo > 1)]
    return text[:i] + rng.choice(choices) + text[i + 1:]


def corrupt(solution: list[dict], kind: str, tools: dict, rng: random.Random) -> list[dict]:
    """A worse version of a solved episode [..prompt, call, tool result, answer], or of a
    single-turn one [..prompt, answer] (PBRFT: no call to corrupt, so the answer is)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"rm: unknown corruption '{kind}'")
    answer = re.search(r"<answer>(.*?)</answer>", solution[-1]["content"]).group(1)
    wrong = _change_digit(answer, rng)
    if kind == "missing_answer":  # right number, no <answer> tag
        return solution[:-1] + [{"role": "assistant", "content": f"The answer is {answer}."}]
    if not any(m["role"] == "tool" for m in solution):  # single turn: a wrong worked answer
        text = solution[-1]["content"].replace(f"<answer>{answer}</answer>", f"<answer>{wrong}</answer>")
        if kind == "wrong_number":  # the worked result is wrong too, not only the copy of it
            text = text.replace(f"= {answer}", f"= {wrong}")
        return solution[:-1] + [{"role": "assistant", "content": text}]
    *prompt, call, _, final = solution
    if kind == "wrong_number":  # a number copied wrongly into the call: the tool computes garbage
        bad = call["content"]
        for _ in range(20):
            bad = _change_digit(call["content"], rng)
            result, ok = execute_tool_call(parse_tool_calls(bad)[0], tools)
            if ok and result != answer:
                return prompt + [{"role": "assistant", "content": bad}, {"role": "tool", "content": result},
                                 {"role": "assistant", "content": f"<answer>{result}</answer>"}]
        kind = "wrong_answer"
    if kind == "wrong_answer":  # right call, wrong number in the answer
        return solution[:-1] + [{"role": "assistant", "content": f"<answer>{wrong}</answer>"}]
    # malformed_call: broken JSON or no closing tag, then a guess
    text = call["content"]
    bad = rng.choice([text.replace("}}", "}", 1), text.replace("</tool_call>", ""), text.replace('"', "'")])
    error, _ = execute_tool_call(parse_tool_calls(bad)[0], tools) if parse_tool_calls(bad) else ("Error: no call", False)
    return prompt + [{"role": "assistant", "content": bad}, {"role": "tool", "content": error},
                     {"role": "assistant", "content": f"<answer>{wrong}</answer>"}]


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
    if not hasattr(task, "solution_messages"):
        raise ValueError(f"rm: task '{task.name}' cannot generate pairs (no solution_messages); set rm.data")
    rng, pairs = random.Random(f"rm/{seed}"), []
    for i, p in enumerate(problems):
        env = ToolEnv(task, tools, RewardConfig(), 1, suffix)
        prompt = env.reset(p)  # the same (system-suffixed) prompt rollouts see
        chosen = prompt + task.solution_messages(p)[len(task.prompt_messages(p)):]
        kind = kinds[i % len(kinds)]
        rejected = corrupt(chosen, kind, tools, rng)
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


def padded(seqs: list[list[int]], pad_id: int, masks: list[list[int]] | None = None):
    """Right-padded (ids, attention mask[, loss mask]) tensors, [N, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
    if masks is None:
        return ids, attn
    m = torch.zeros((len(seqs), width))
    for i, mask in enumerate(masks):
        m[i, : len(mask)] = torch.tensor(mask[: width], dtype=m.dtype)
    return ids, attn, m


def scores(model, seqs: list[list[int]], pad_id: int, masks: list[list[int]] | None = None) -> torch.Tensor:
    """r for each token sequence, [N], right-padded batch. Without `masks` the head reads the last
    real token; with them, r is the mean of the head's per-token scores where the mask is 1."""
    if masks is None:
        ids, attn = padded(seqs, pad_id)
        return model(input_ids=ids, attention_mask=attn).logits[:, 0].float()
    ids, attn, m = padded(seqs, pad_id, masks)
    inner = unwrap_peft(model)
    hidden = getattr(inner, inner.base_model_prefix)(input_ids=ids, attention_mask=attn).last_hidden_state
    per_token = inner.score(hidden)[..., 0].float()  # [N, T]
    return (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)


def as_trajectories(seqs: list[list[int]], masks: list[list[int]]) -> list[Trajectory]:
    """Each conversation cut where the assistant first writes: the prompt before, the rest after,
    which is the form `grpo.completion_logprobs` takes (it computes a prompt shared by several
    conversations once, and the beginning common to all, such as the system prompt, once)."""
    out = []
    for ids, mask in zip(seqs, masks):
        k = next((i for i, m in enumerate(mask) if m), len(ids) - 1)
        k = min(max(k, 1), len(ids) - 1)  # the first token has nothing to be predicted from
        out.append(Trajectory(problem=None, prompt_ids=ids[:k], ids=ids[k:], mask=list(mask[k:len(ids)])))
    return out


def masked_logprob_sums(model, seqs: list[list[int]], masks: list[list[int]]) -> torch.Tensor:
    """sum_t m_t log p(y_t | y_<t) per sequence, [N]."""
    trajs = as_trajectories(seqs, masks)
    logp, _ = completion_logprobs(model, trajs)
    return (logp * right_aligned([t.mask for t in trajs], logp.shape[1])).sum(-1)


def implicit_scores(model, reference, seqs: list[list[int]], masks: list[list[int]], beta: float) -> torch.Tensor:
    """r = beta * sum_t m_t [log pi_theta(y_t | .) - log pi_ref(y_t | .)], [N]. `reference` None
    means `model` is a PEFT model whose base (adapters disabled) is the reference."""
    policy = masked_logprob_sums(model, seqs, masks)
    with torch.no_grad():
        if reference is None:
            with model.disable_adapter():
                ref = masked_logprob_sums(model, seqs, masks)
        else:
            ref = masked_logprob_sums(reference, seqs, masks)
    return beta * (policy - ref)


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


def score_fn(model, pad_id: int, type: str = "classifier", pooling: str = "last", reference=None, beta: float = 1.0):
    """The reward model as `f(seqs, masks) -> r [N]`, whichever its type."""
    if type == "implicit":
        return lambda seqs, masks: implicit_scores(model, reference, seqs, masks, beta)
    return lambda seqs, masks: scores(model, seqs, pad_id, masks if pooling == "mean" else None)


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
        idx = torch.tensor([p["kind"] == kind for p in pairs])
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
    setup_torch(cfg)
    c, out = cfg.rm, stage_dir(cfg, "rm")
    base = resolve(rm_base(cfg))
    implicit = c.type == "implicit"
    model, tokenizer = load_policy(base) if implicit else reward_model_from(base)
    task = get_task(cfg.task.name, **cfg.task.args)
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

    reference = None  # implicit under LoRA: the base with adapters disabled
    if c.lora.enabled and implicit:
        model = apply_lora(model, c.lora)
    elif c.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        model = get_peft_model(model, PeftLoraConfig(
            r=c.lora.r, lora_alpha=c.lora.alpha, lora_dropout=c.lora.dropout, task_type="SEQ_CLS",
            target_modules=list(c.lora.target_modules),
            modules_to_save=["score", *getattr(c.lora, "modules_to_save", [])]))
    elif implicit:
        reference = copy.deepcopy(model).requires_grad_(False)
    model.train()
    pad_id = tokenizer.pad_token_id
    score = score_fn(model, pad_id, c.type, c.pooling, reference, c.beta)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    steps_per_epoch = (len(train) + c.batch_size - 1) // c.batch_size
    total = steps_per_epoch * c.epochs
    logger = MetricsLogger(out, "rm", report_to=cfg.report_to, live_doctor=cfg.doctor.enabled,
                           doctor_context={"learning_rate": c.learning_rate})
    bar = progress_bar(total, f"rm ({c.type}, {'LoRA r=%d' % c.lora.r if c.lora.enabled else 'full'}, "
                              f"{len(train)} pairs, {len(test)} held out)")
    timer, rng, step = Timer(), random.Random(cfg.seed), 0
    for epoch in range(c.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for b in range(steps_per_epoch):
            lr = c.learning_rate * cosine_lr(step, total, c.warmup_steps)
            set_lr(optimizer, lr)
            batch = [train[i] for i in order[b * c.batch_size:(b + 1) * c.batch_size]]
            s = pair_scores(score, batch)
            r_w, r_l = s[: len(batch)], s[len(batch):]
            margin = torch.tensor([p["margin"] for p in batch]) if c.use_margin else None
            loss = bradley_terry_loss(r_w, r_l, margin) + c.center_rewards_coefficient * ((r_w + r_l) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if not torch.isfinite(loss):
                logger.log({"loss": float("nan"), "event": "nan_skip"}, step)
                continue
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            optimizer.step()
            bar.update(1)
            metrics = {}
            if step % c.log_every == 0 or step == total:
                metrics = {"loss": loss.item(), "accuracy": (r_w > r_l).float().mean().item(),
                           "reward_margin": (r_w - r_l).mean().item(), "reward_mean": s.mean().item(),
                           "learning_rate": lr, "grad_norm": float(grad_norm), "epoch": epoch + (b + 1) / steps_per_epoch,
                           "step_time": timer.seconds / step}
            if b + 1 == steps_per_epoch and test:
                ev = pairwise_eval(model, score, test, c.eval_batch_size)
                metrics.update({"eval/accuracy": ev["accuracy"], "eval/loss": ev["loss"]})
            if metrics:
                logger.log(metrics, step)
                bar.set_postfix(loss=f"{loss.item():.3f}", **({"eval_acc": f"{metrics['eval/accuracy']:.2f}"}
                                                             if "eval/accuracy" in metrics else {}))
    bar.close()
    logger.close()
    ev = pairwise_eval(model, score, test, c.eval_batch_size) if test else {"accuracy": 0.0, "n": 0}
    if c.lora.enabled:
        model = model.merge_and_unload()
    ckpt = out / "checkpoint"
    model.config.steprl_rm_pooling = c.pooling  # RewardModelScorer pools the same way
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    if implicit:  # the scorer needs pi_ref too: the base, as it was before training
        (reference if reference is not None else load_policy(base)[0]).save_pretrained(ckpt / "reference")
    (ckpt / INFO_FILE).write_text(json.dumps({"task": cfg.task.name, "task_args": cfg.task.args,
                                              "type": c.type, "beta": c.beta}))
    (out / "eval.json").write_text(json.dumps({**ev, "metric": "pairwise_accuracy"}))
    info = {"checkpoint": str(ckpt), "base": base, "pairs": len(train), "steps": total, "eval": ev}
    mark_done(out, info)
    return info


class RewardModelScorer:
    """A trained RM as a reward function with TRL's signature: f(prompts, completions, **kw) -> list[float].

    Scores whole conversations: each trajectory's messages when `trajectories` is passed (tool
    calls and results included), else prompt + completion (text or messages). Conversations are
    rendered with the chat template (and tool schemas) of the task the RM was trained on. Either
    type: a classifier head, or an implicit RM (the LM against `checkpoint/reference`).
    """

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 1024):
        path = resolve(path)
        info = Path(path) / INFO_FILE
        meta = json.loads(info.read_text()) if info.is_file() else {}
        self.tokenizer = load_tokenizer(path)
        if meta.get("type") == "implicit":
            load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
            self.model, reference = load(path), load(Path(path) / "reference")
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
            reference = None
        if meta:
            _, self.renderer, _ = tool_setup(get_task(meta["task"], **meta["task_args"]), self.tokenizer)
        else:
            from steprl.rollout.episodes import ChatRenderer

            self.renderer = ChatRenderer(self.tokenizer)
        self.batch_size, self.max_length = batch_size, max_length
        self.score = score_fn(self.model, self.tokenizer.pad_token_id, meta.get("type", "classifier"),
                              getattr(self.model.config, "steprl_rm_pooling", "last"), reference, meta.get("beta", 1.0))
        self.__name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts, completions, trajectories=None, **kwargs) -> list[float]:
        if trajectories is not None:
            conversations = [t.messages for t in trajectories]
        else:
            conversations = [as_messages(p, c) for p, c in zip(prompts, completions)]
        encoded = [self.renderer.conversation_ids(m) for m in conversations]
        seqs = [ids[: self.max_length] for ids, _ in encoded]
        masks = [mask[: self.max_length] for _, mask in encoded]
        out = []
        for lo in range(0, len(seqs), self.batch_size):
            out += self.score(seqs[lo:lo + self.batch_size], masks[lo:lo + self.batch_size]).tolist()
        return out

"""A trained reward model as a reward function, and the scoring both its training (recipes/rm.py)
and its use in RL share.

    classifier, pooling "last":  r(x, y) = w . h_last
    classifier, pooling "mean":  r(x, y) = sum_t m_t w . h_t / sum_t m_t   (m_t = 1 on the assistant's tokens)
    implicit:                    r(x, y) = beta * sum_t m_t [log pi_theta(y_t | .) - log pi_ref(y_t | .)]
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from steprl.models.loading import forward_with_hidden, load_tokenizer, resolve, unwrap_peft
from steprl.rollout.chat import ChatRenderer, tool_setup
from steprl.rollout.episodes import Trajectory
from steprl.tasks import get_task
from steprl.training.passes import completion_logprobs, right_aligned

INFO_FILE = "steprl_rm.json"  # beside the checkpoint: which task's chat rendering to score with


def as_messages(prompt, completion) -> list[dict]:
    """A conversation from a prompt and a completion, each text or messages (TRL's formats)."""
    if completion is None:
        raise ValueError("missing completion")
    head = [] if prompt is None else [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return head + tail


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
    device = next(model.parameters()).device
    if masks is None:
        ids, attn = (x.to(device) for x in padded(seqs, pad_id))
        return model(input_ids=ids, attention_mask=attn).logits[:, 0].float()
    ids, attn, m = (x.to(device) for x in padded(seqs, pad_id, masks))
    _, hidden = forward_with_hidden(model, input_ids=ids, attention_mask=attn)
    per_token = unwrap_peft(model).score(hidden)[..., 0].float()  # [N, T]
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


def score_fn(model, pad_id: int, type: str = "classifier", pooling: str = "last", reference=None, beta: float = 1.0):
    """The reward model as `f(seqs, masks) -> r [N]`, whichever its type."""
    if type == "implicit":
        return lambda seqs, masks: implicit_scores(model, reference, seqs, masks, beta)
    return lambda seqs, masks: scores(model, seqs, pad_id, masks if pooling == "mean" else None)


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

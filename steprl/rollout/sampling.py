"""Batched decoding with a KV cache: left-padded prefill, then one token per step for all rows.

`generate` returns, per row, exactly the token ids the model sampled and their log-probs under
the temperature-scaled policy (what the loss later recomputes), so no re-tokenisation and no
extra forward pass is needed to get old log-probs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()


def sample_next(logits: torch.Tensor, params: SamplingParams, generator=None):
    """One fused sampling step: returns (tokens [B], log-probs [B] under softmax(logits / T))."""
    if params.temperature == 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = logp.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits.float() / params.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if params.top_k > 0:
        kth = torch.topk(filtered, min(params.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) > params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(filtered, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class StopChecker:
    """Ends a row on EOS or when its decoded text ends with a stop string."""

    def __init__(self, tokenizer, stop_strings):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.eos_ids = {tokenizer.eos_token_id}
        for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                self.eos_ids.add(tid)
        self.eos_ids.discard(None)
        # only tokens whose text ends a stop string's last character can finish one
        last_chars = {s[-1] for s in self.stop_strings}
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.may_stop = torch.zeros(len(tokenizer), dtype=torch.bool)
        for i, piece in enumerate(vocab):
            text = tokenizer.convert_tokens_to_string([piece]) if piece else ""
            if text and text[-1] in last_chars:
                self.may_stop[i] = True

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def hits_stop_string(self, tokens: list[int]) -> bool:
        if not self.stop_strings or not self.may_stop[tokens[-1]]:
            return False
        tail = self.tokenizer.decode(tokens[-16:])
        return tail.endswith(self.stop_strings)


def left_pad(sequences: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, position_ids) for a left-padded batch."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams,
             stop: StopChecker | None = None, generator=None):
    """Sample a continuation for every prompt. Returns (tokens, logps, finish) per row, where
    finish is "eos", "stop" (a stop string) or "length"."""
    stop = stop or StopChecker(tokenizer, params.stop_strings)
    pad_id = tokenizer.pad_token_id
    ids, mask, positions = left_pad(prompts, pad_id)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    finish = ["length"] * n
    alive = torch.ones(n, dtype=torch.bool)
    next_pos = positions[:, -1] + 1
    for _ in range(params.max_new_tokens):
        new, new_logp = sample_next(logits, params, generator)
        new_list, lp_list = new.tolist(), new_logp.tolist()
        for i in torch.nonzero(alive).flatten().tolist():
            tokens[i].append(new_list[i])
            logps[i].append(lp_list[i])
            if stop.is_eos(new_list[i]):
                finish[i], alive[i] = "eos", False
            elif stop.hits_stop_string(tokens[i]):
                finish[i], alive[i] = "stop", False
        if not alive.any():
            break
        new = torch.where(alive, new, torch.full_like(new, pad_id))
        mask = torch.cat([mask, alive[:, None].long()], dim=1)
        out = model(input_ids=new[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens, logps, finish

"""Batched decoding with a KV cache, for rollouts.

`generate` returns, per row, exactly the token ids the model sampled and their log-probs under
the temperature-scaled policy (what the loss later recomputes), so no re-tokenisation and no
extra forward pass is needed to get old log-probs.

What makes it faster than a plain loop (every trick keeps the computation exact):
* prefix sharing: rows that begin alike (the G samples of a GRPO group, on every turn) have
  their common beginning prefilled once, its cache rows repeated, then each row's own rest run
  on top (`shared_stems`, `prefill`); each row then samples independently;
* a preallocated KV cache (`SlotLayer`): a decode step writes one column in place instead of
  `torch.cat`-ing the whole cache, and the attention mask is one preallocated tensor we slice;
* finished rows leave the batch: once a quarter of the rows are done, the cache, mask and
  positions are compacted to the live rows, so late steps cost what the live rows cost;
* multi-turn episodes stay in the batch (`NativeSession`): a row whose turn ends gets its tool
  result fed into its own cache, one token per step, while the other rows decode, and is
  never prefilled again;
* decode steps of Llama-family models run through `decoder.LlamaDecoder` (LoRA merged, the
  weights packed for MKL's GEMM at the batch's size, grouped-query attention without copying
  keys, the common stem's keys and values read once per step, not once per row), and so do
  their prefill passes that continue one row (or none), packed without padding; others
  through HF;
* sampling draws one uniform number per row against the cumulative distribution
  (`inverse_cdf_sample`), not `torch.multinomial`, which costs ~16 ms per call at V = 49k;
* the EOS and stop-string bookkeeping is vectorised; the (slow) text check of stop strings only
  runs for rows whose last token can end one.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from steprl.rollout.decoder import FUSED_ATTENTION, LlamaDecoder

# the forward's name for the KV cache, in and out: transformers 5 renamed past_key_values to cache
# (the old name warns, and goes in 5.40)
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


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
    scaled = logits.float() if params.temperature == 1.0 else logits.float() / params.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if params.top_k > 0:
        kth = torch.topk(filtered, min(params.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        p_sorted = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = p_sorted.cumsum(-1) - p_sorted > params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    # unfiltered, the probabilities are exp(logp): no second softmax over the vocabulary
    probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
    tokens = inverse_cdf_sample(probs, generator)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row drawn from `probs` [B, V]: the first index whose cumulative probability
    exceeds u ~ U(0, total). Exact, one random number per row; `torch.multinomial` costs ~16 ms
    per call at V = 49k, 30x more. Tokens of probability 0 are never drawn (side="right")."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, side="right").clamp(max=probs.shape[-1] - 1).squeeze(-1)


_CHECKERS = weakref.WeakKeyDictionary()  # tokenizer -> {stop strings: StopChecker}


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

    @classmethod
    def cached(cls, tokenizer, stop_strings) -> "StopChecker":
        """One checker per tokenizer and stop strings: building one scans the whole vocabulary
        (~0.5 s at 49k tokens), and engines need one per rollout or per turn."""
        per_tokenizer = _CHECKERS.setdefault(tokenizer, {})
        key = tuple(stop_strings)
        if key not in per_tokenizer:
            per_tokenizer[key] = cls(tokenizer, key)
        return per_tokenizer[key]

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


class SlotLayer(DynamicLayer):
    """One layer's keys and values in a buffer allocated once for the whole generation.

    HF's DynamicLayer `torch.cat`s the whole cache at every step (a copy that grows with the
    context); here a step writes its column in place and attention reads a view of the filled part.
    """

    def __init__(self, capacity: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.capacity, self.length = capacity, 0
        self.dtype = dtype  # None: the first keys' dtype

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.dtype, self.device = self.dtype or key_states.dtype, key_states.device
        self.key_buf = key_states.new_empty(b, h, self.capacity, d, dtype=self.dtype)
        self.value_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1], dtype=self.dtype)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # multi-turn rows outgrow the first turn's room: copy once into more
            self.capacity = max(end, self.capacity + self.capacity // 2)
            grown = [buf.new_empty(*buf.shape[:2], self.capacity, buf.shape[-1]) for buf in (self.key_buf, self.value_buf)]
            for old, buf in zip((self.key_buf, self.value_buf), grown):
                buf[:, :, :self.length] = old[:, :, :self.length]
            self.key_buf, self.value_buf = grown
        self.key_buf[:, :, self.length:end] = key_states
        self.value_buf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        if self.dtype != key_states.dtype:  # HF's forward on a bf16 decoder's cache: a copy in its dtype
            return self.keys.to(key_states.dtype), self.values.to(value_states.dtype)
        return self.keys, self.values

    def scatter(self, key_states, value_states, rows, columns, batch: int, width: int) -> None:
        """Add `width` columns and grow to `batch` rows: packed tokens' keys and values [T, heads,
        d] go to (`rows`, `columns`); the columns before come from the one row this cache held
        (every new row continues it); new columns not written are zero (padding: masked, but
        finite for the attention's products). `LlamaDecoder.extend` writes this way."""
        grown = []
        for old, new in ((getattr(self, "key_buf", None), key_states), (getattr(self, "value_buf", None), value_states)):
            buf = new.new_empty(batch, new.shape[1], self.capacity, new.shape[-1], dtype=self.dtype or new.dtype)
            if self.is_initialized:
                buf[:, :, :self.length] = old[:1, :, :self.length]
            buf[:, :, self.length:self.length + width] = 0
            buf[rows, :, columns] = new
            grown.append(buf)
        self.key_buf, self.value_buf = grown
        self.dtype, self.device, self.is_initialized = grown[0].dtype, key_states.device, True
        self.length += width
        self.keys, self.values = self.key_buf[:, :, :self.length], self.value_buf[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) rows: `indices` may drop finished rows or repeat a shared prefix."""
        if self.is_initialized:
            self.key_buf = self.key_buf[indices]
            self.value_buf = self.value_buf[indices]
            self.keys, self.values = self.key_buf[:, :, :self.length], self.value_buf[:, :, :self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.key_buf.shape[0]).repeat_interleave(repeats))


def new_cache(model, capacity: int, dtype: torch.dtype | None = None) -> Cache:
    """A cache of SlotLayers (in `dtype`, else the first keys') when every layer is plain full
    attention, else HF's DynamicCache (sliding-window or linear-attention layers need their own
    cache classes)."""
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    plain = all(t == "full_attention" for t in types) if types else not getattr(cfg, "sliding_window", None)
    if not plain:
        return DynamicCache(config=cfg)
    return Cache(layers=[SlotLayer(capacity, dtype) for _ in range(cfg.num_hidden_layers)])


def common_prefix(a: list[int], b: list[int]) -> int:
    k, m = 0, min(len(a), len(b))
    while k < m and a[k] == b[k]:
        k += 1
    return k


def shared_stems(prompts: list[list[int]]):
    """Split prompts that begin alike into a stem, prefilled once, and each row's own suffix.

    Two levels of sharing. Every prompt of a rollout usually begins with the same system prompt
    (and tool description): that beginning, common to all, starts every stem. After it, the G
    samples of a GRPO prompt are identical on the first turn, and on later turns they still begin
    with the same prompt (then each has its own turns and tool results). Sorted, such rows are
    neighbours; we cut the sorted rows into runs that each share one stem (the run's common prefix,
    leaving every row at least one suffix token to read its next-token logits from), choosing
    the runs that save the most prefill tokens (a small dynamic programme over the cut points).
    A run's stem covers at least half of its longest row after the common beginning, so the
    suffix pass (padded to the longest suffix) stays short. When no run has two rows, the common
    beginning is the one stem. `prefill` computes the common beginning once and each stem's rest
    once. Returns (stems, stem index per row, suffixes, prefill tokens saved).
    """
    n = len(prompts)
    order = sorted(range(n), key=lambda i: prompts[i])
    lcp = [common_prefix(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]
    common = min(lcp + [len(p) - 1 for p in prompts]) if n > 1 else 0
    saved, start = [0] * (n + 1), list(range(-1, n))  # best over order[:j]; start of its last run
    for j in range(1, n + 1):
        saved[j], start[j] = saved[j - 1], j - 1
        k, longest = len(prompts[order[j - 1]]) - 1, len(prompts[order[j - 1]])
        for i in range(j - 2, -1, -1):  # the run order[i:j] shares k tokens, `common` of them with all
            k = min(k, lcp[i], len(prompts[order[i]]) - 1)
            longest = max(longest, len(prompts[order[i]]))
            if 2 * (k - common) < longest - common:  # a short stem means long suffixes: padding eats the saving
                break
            if saved[i] + (j - i - 1) * (k - common) > saved[j]:
                saved[j], start[j] = saved[i] + (j - i - 1) * (k - common), i
    if saved[n] == 0 and common:  # no two rows share more than the common beginning: one stem
        return [prompts[0][:common]], torch.zeros(n, dtype=torch.long), [p[common:] for p in prompts], (n - 1) * common
    stems, stem_of, suffixes, j = [], [0] * n, [None] * n, n
    while j > 0:
        run = order[start[j]:j]
        k = min(len(prompts[i]) for i in run) - 1 if len(run) > 1 else len(prompts[run[0]]) - 1
        if len(run) > 1:
            k = min(k, min(lcp[start[j]:j - 1]))
        for i in run:
            stem_of[i], suffixes[i] = len(stems), prompts[i][k:]
        stems.append(prompts[run[0]][:k])
        j = start[j]
    return stems, torch.tensor(stem_of, dtype=torch.long), suffixes, saved[n] + (n - 1) * common


MIN_SAVED_TOKENS = 16  # a prefill pass is worth it when it spares at least this many tokens


def prefill(model, prompts: list[list[int]], pad_id: int, max_new: int, decoder: LlamaDecoder | None = None):
    """A cache holding every prompt, with room for `max_new` more tokens. Returns (cache, last
    logits [B, V], attention mask [B, width], positions of the last pass [B, w], shared), where
    the first `shared` cache columns are the same unpadded tokens in every row (0 if none).

    Rows that begin alike are prefilled in up to three passes, each on top of the cache of the
    one before: the beginning common to every stem (a system prompt, a tool description) once;
    each stem's rest once (a GRPO group's prompt), the cache's rows repeated for its rows after;
    each row's own suffix. Otherwise one pass. With the model's `decoder`, the passes that
    continue one row (or none) run packed, without padding (`LlamaDecoder.extend`).
    """
    stems, stem_of, suffixes, saved = shared_stems(prompts)
    dtype = decoder.dtype if decoder is not None else None  # the cache in the decoder's precision
    if saved < len(prompts) or not all(stems):  # not worth a second pass
        cache = new_cache(model, max(len(p) for p in prompts) + max_new, dtype)
        logits, mask, positions = extend(model, cache, prompts, torch.zeros(len(prompts), 0, dtype=torch.long), pad_id,
                                         decoder=packing(decoder, cache))
        return cache, logits[:, -1], mask, positions, 0
    u = len(stems)
    common = len(stems[0]) if u == 1 else min(min(common_prefix(stems[0], x) for x in stems),
                                               min(len(x) for x in stems) - 1)  # every stem keeps a token
    if u > 1 and (u - 1) * common < MIN_SAVED_TOKENS:  # an extra pass costs more than it saves
        common = 0
    cache = new_cache(model, common + max(len(x) - common for x in stems) + max(len(x) for x in suffixes) + max_new,
                      dtype)
    decoder = packing(decoder, cache)
    past = torch.zeros(1 if common else u, 0, dtype=torch.long)  # the attention mask of what the cache holds
    if common:
        _, past, _ = extend(model, cache, [stems[0][:common]], past, pad_id, decoder=decoder)
    if u > 1:  # each stem's rest (on the one row of the common beginning), then its rows' copies
        _, past, _ = extend(model, cache, [x[common:] for x in stems], past, pad_id, decoder=decoder)
        cache.batch_select_indices(stem_of)
        past = past[stem_of]
    logits, mask, positions = extend(model, cache, suffixes, past, pad_id, decoder=decoder)
    return cache, logits[:, -1], mask, positions, common


def slotted(cache) -> bool:
    """Every layer of `cache` is a SlotLayer, which our decoder reads and writes (`new_cache`
    makes them for models whose layers are all full attention)."""
    return all(isinstance(x, SlotLayer) for x in cache.layers)


def packing(decoder: LlamaDecoder | None, cache) -> LlamaDecoder | None:
    """The decoder, if it can run packed passes into `cache` (SlotLayers, torch's fused attention)."""
    return decoder if decoder is not None and FUSED_ATTENTION is not None and slotted(cache) else None


def extend(model, cache, seqs: list[list[int]], past: torch.Tensor, pad_id: int = 0, keep: int = 1,
           decoder: LlamaDecoder | None = None):
    """Run `seqs` (left-padded) through `model` on top of `cache`, whose rows have attention mask
    `past` [B, L]; positions continue each row's sequence. A cache of one row (`past` [1, L]) is
    continued by every row of `seqs`. Returns (logits of the last `keep` positions, the attention
    mask now [B, L + w], the positions of the new tokens [B, w]).

    With a `decoder` and keep = 1, a pass over an empty cache or one unpadded row runs packed
    (`LlamaDecoder.extend`): the same logits, cache and mask, without computing the padding."""
    ids, mask, positions = (x.to(past.device) for x in left_pad(seqs, pad_id))
    one_row = past.shape[0] == 1 and len(seqs) > 1  # every row continues the cache's one row
    packed = decoder is not None and keep == 1 and (past.shape[1] == 0 or past.shape[0] == 1) and bool(past.all())
    past = past.expand(len(seqs), -1)
    if packed:
        return decoder.extend(seqs, cache)[:, None], torch.cat([past, mask], dim=1), positions + past.shape[1]
    if one_row:
        cache.batch_select_indices(torch.zeros(len(seqs), dtype=torch.long, device=past.device))
    attn = torch.cat([past, mask], dim=1)
    positions = positions + past.sum(-1, keepdim=True)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, **{CACHE: cache},
                use_cache=True, logits_to_keep=keep)
    return out.logits, attn, positions


class NativeSession:
    """Episodes decoding together in one batch, turn after turn (continuous batching).

    `step()` runs one decode step for every row and returns the turns that ended at it, as
    (row, tokens, logps, finish) with finish "eos", "stop" (a stop string) or "length"
    (`max_new_tokens`). Before the next `step()` the caller settles each of them: `resume(row,
    ids)` feeds `ids` (the turn's closing, a tool's result, the next assistant header) before
    the row samples again, `finish(row)` ends it. Fed tokens go in one per decode step, like
    sampled tokens but not sampled: the row keeps its place in the batch and its KV cache, so
    later turns are never prefilled again, and rows in different turns decode together. Each
    turn gets its own `max_new_tokens`. `dtype` bf16 decodes with bf16 weights and KV cache
    (`LlamaDecoder`); models it does not support decode through HF's forward as they are.
    """

    @torch.inference_mode()
    def __init__(self, model, tokenizer, prompts: list[list[int]], params: SamplingParams,
                 stop: StopChecker | None = None, generator=None, dtype: torch.dtype = torch.float32):
        self.model, self.params, self.generator = model, params, generator
        self.stop = stop or StopChecker.cached(tokenizer, params.stop_strings)
        n, max_new = len(prompts), params.max_new_tokens
        decoder = LlamaDecoder.for_model(model, dtype)  # None where HF's forward must run (architecture, training mode)
        if decoder is not None:
            decoder.pack(n)  # before the prefill, whose passes use what is packed for any rows (bf16)
        self.cache, self.logits, prompt_mask, positions, self.shared = prefill(
            model, prompts, tokenizer.pad_token_id, max_new, decoder)
        self.width = prompt_mask.shape[1]
        # the mask of every row: its prompt's, then ones (a finished row's later tokens are never read)
        self.mask = torch.ones(n, self.width + max_new, dtype=torch.long)
        self.mask[:, :self.width] = prompt_mask
        self.next_pos = positions[:, -1] + 1
        self.decoder = decoder if slotted(self.cache) else None
        eos_ids = getattr(self.stop, "eos_ids", None)
        self.is_eos = (lambda x: x in eos_ids) if eos_ids is not None else self.stop.is_eos  # duck-typed checkers
        self.may_stop = getattr(self.stop, "may_stop", None) if self.stop.stop_strings else None
        self.turn_tokens, self.turn_logps = [[] for _ in range(n)], [[] for _ in range(n)]
        self.to_feed = [[] for _ in range(n)]  # tokens a row reads before it samples again
        self.rows = torch.arange(n)  # original index of each row still in the batch
        self.alive = [True] * n  # per batch position
        self.unsettled: set[int] = set()  # rows whose ended turn awaits resume() or finish()
        self.tokens = None  # what the next forward reads, per batch position
        self.t = 0  # columns after the prompt, the same for every row
        self.live = n  # episodes not finished

    def resume(self, row: int, ids: list[int]) -> None:
        self.unsettled.discard(row)
        self.to_feed[row] = list(ids)

    def finish(self, row: int) -> None:
        self.unsettled.discard(row)
        self.alive[self.rows.tolist().index(row)] = False
        self.live -= 1

    @torch.inference_mode()
    def step(self) -> list[tuple[int, list[int], list[float], str]]:
        if self.unsettled:
            raise RuntimeError(f"rows {sorted(self.unsettled)} ended a turn: resume() or finish() them first")
        if self.tokens is not None:
            self._forward()
        new, new_logp = sample_next(self.logits, self.params, self.generator)
        tokens, logps = new.tolist(), new_logp.tolist()
        may_stop, stop = self.may_stop, self.stop
        stoppable = may_stop[new.clamp(max=len(may_stop) - 1)].tolist() if may_stop is not None else None
        ended = []
        for i, r in enumerate(self.rows.tolist()):
            if not self.alive[i]:
                continue
            if self.to_feed[r]:
                tokens[i] = self.to_feed[r].pop(0)
                continue
            self.turn_tokens[r].append(tokens[i])
            self.turn_logps[r].append(logps[i])
            if self.is_eos(tokens[i]):
                how = "eos"
            elif stop.stop_strings and (stoppable is None or stoppable[i]) and stop.hits_stop_string(self.turn_tokens[r]):
                how = "stop"
            elif len(self.turn_tokens[r]) >= self.params.max_new_tokens:
                how = "length"
            else:
                continue
            ended.append((r, self.turn_tokens[r], self.turn_logps[r], how))
            self.turn_tokens[r], self.turn_logps[r] = [], []
        self.unsettled = {r for r, *_ in ended}
        self.tokens = tokens
        return ended

    def _forward(self) -> None:
        """Read the last step's tokens into the cache: the logits the next step samples from."""
        new = torch.tensor(self.tokens, dtype=torch.long)
        if sum(self.alive) <= 0.75 * len(self.alive):  # compact: finished rows leave the batch
            keep = torch.tensor([i for i, a in enumerate(self.alive) if a])
            self.cache.batch_select_indices(keep)
            self.rows, self.mask, self.next_pos, new = self.rows[keep], self.mask[keep], self.next_pos[keep], new[keep]
            self.alive = [True] * len(keep)
        width, t, max_new = self.width, self.t, self.params.max_new_tokens
        if width + t + 1 > self.mask.shape[1]:  # a later turn: room for another max_new columns
            self.mask = torch.cat([self.mask, torch.ones(self.mask.shape[0], max_new, dtype=self.mask.dtype)], dim=1)
        if self.decoder is not None:
            self.logits = self.decoder.step(new, self.next_pos, self.cache, self.mask[:, :width + t + 1], self.shared)
        else:
            out = self.model(input_ids=new[:, None], attention_mask=self.mask[:, :width + t + 1],
                             position_ids=self.next_pos[:, None], **{CACHE: self.cache}, use_cache=True)
            self.logits = out.logits[:, -1]
        self.next_pos = self.next_pos + 1
        self.t += 1


def generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams,
             stop: StopChecker | None = None, generator=None, dtype: torch.dtype = torch.float32):
    """One turn for every prompt: (tokens, logps, finish) per row (`NativeSession`, each row
    finished when its turn ends)."""
    session = NativeSession(model, tokenizer, prompts, params, stop, generator, dtype)
    results = [None] * len(prompts)
    while session.live:
        for row, tokens, logps, how in session.step():
            results[row] = (tokens, logps, how)
            session.finish(row)
    return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

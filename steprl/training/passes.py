"""The training passes of the RL stages: log-probs of sampled completions under the policy (with
a graph, for the loss) and under the reference (without), batched so that what rows share is
computed once.

    completion_logprobs(model, trajs)   [B, K] right-aligned log-probs (and entropy) of each completion
    Beginning                           the prompts' common beginning, once for all micro-batches
    batched_logprobs / reference_logprobs   the no-grad passes over a whole batch
    by_length                           micro-batches of similar length: little padding
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule
from transformers.cache_utils import DynamicCache

from steprl.algos import entropy_from_logits, logprobs_and_entropy, token_logprobs
from steprl.models.loading import is_peft
from steprl.models.mapped import release_reference
from steprl.rollout.episodes import Trajectory
from steprl.rollout.sampling import CACHE, common_prefix, extend, left_pad

REFERENCE_BATCHES = 4  # training micro-batches per reference pass (see reference_logprobs)


def plain_passes(model) -> bool:
    """One plain pass per micro-batch, nothing shared through a KV cache: under activation
    checkpointing, which turns the cache off, and under FSDP, where every rank must run the same
    forwards (its collectives pair them up) and a gradient that reaches a block through the cache
    bypasses the hook that gathers the block's weights for the backward (docs/benchmarks.md)."""
    return getattr(model, "is_activation_checkpointing", False) or isinstance(model, FSDPModule)


def whole_episodes(trajs: list[Trajectory], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, positions) of prompt + completion per row, left-padded: the
    completions end together, as right_aligned places them."""
    return tuple(x.to(device) for x in left_pad([t.prompt_ids + t.ids for t in trajs], pad_id=0))


def right_aligned(rows: list[list], width: int, fill=0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Rows placed at the right edge of a [len(rows), width] tensor (completions end together)."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r):] = torch.tensor(r, dtype=dtype)
    return out.to(device) if device is not None else out


def by_length(trajs: list[Trajectory], idx) -> list[int]:
    """`idx` ordered so that consecutive runs of it make cheap micro-batches: the G episodes of a
    prompt side by side (a micro-batch computes their shared prompt once, `completion_logits`), and
    groups sorted by length (prompt + the group's longest completion), so that padding each
    micro-batch to its longest wastes little compute. With no repeated prompt this is plain
    sorting by sequence length."""
    longest: dict[tuple, int] = {}
    for i in idx:
        key = tuple(trajs[i].prompt_ids)
        longest[key] = max(longest.get(key, 0), len(trajs[i].ids))

    def order(i):
        prompt = tuple(trajs[i].prompt_ids)
        return len(prompt) + longest[prompt], prompt, len(trajs[i].ids)
    return sorted(idx, key=order)


def completion_logits(model, trajs: list[Trajectory], width: int, beginning=None) -> torch.Tensor:
    """Logits [B, width, V] that predict each completion token, completions right-aligned to `width`.

    What the rows share is computed once, in up to three passes through one KV cache, each run
    on top of the cache of the one before (rows left-padded, the padding masked, positions
    continuing the row's sequence):
      1. the beginning common to every prompt (a system prompt, a tool description), once;
      2. each distinct prompt's rest, minus its last token, once per prompt (the G episodes of a
         GRPO group share it), the cache's rows repeated for its episodes afterwards;
      3. each episode's last prompt token + completion; the LM head runs here only.
    The logits are those of one plain pass over prompt + completion, to float rounding, and the
    gradient flows through the shared keys and values into every episode's loss. Passes 1 and 2
    are skipped when they would not save tokens (distinct prompts: one plain pass, LM head on
    the last width + 1 positions only).

    `beginning` = (ids, [(keys, values) per layer]) replaces pass 1 with keys and values computed
    once for several micro-batches (`Beginning`); every prompt must start with `ids`.
    """
    index: dict[tuple, int] = {}
    stem_of = [index.setdefault(tuple(t.prompt_ids), len(index)) for t in trajs]
    bodies = [list(p[:-1]) for p in index]  # the last prompt token goes with the completion
    n, u = len(trajs), len(bodies)
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    if beginning is not None:  # pass 1 done already: its keys and values seed the cache
        ids, kv = beginning
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys, values, layer)
        cache.batch_select_indices(torch.zeros(u, dtype=torch.long, device=device))
        bodies, past = [b[len(ids):] for b in bodies], torch.ones(u, len(ids), dtype=torch.long, device=device)
    else:
        shared = min(common_prefix(bodies[0], b) for b in bodies)
        common = min(shared, min(len(b) for b in bodies) - 1)  # every prompt keeps a token
        cost = {"plain": n * max(len(t.prompt_ids) + len(t.ids) for t in trajs),
                "per_prompt": u * max(len(b) for b in bodies) + n * (width + 1),
                "common": common + u * max(len(b) - common for b in bodies) + n * (width + 1)}
        plan = min(cost, key=cost.get)
        if plan == "plain" or min(len(b) for b in bodies) < 1 or plain_passes(model):
            ids, attn, pos = whole_episodes(trajs, device)
            return model(input_ids=ids, attention_mask=attn, position_ids=pos,
                         logits_to_keep=width + 1).logits[:, :-1]
        past = torch.zeros(u, 0, dtype=torch.long, device=device)  # the attention mask of what the cache holds
        if plan == "common" and common > 0:
            _, past, _ = extend(model, cache, [bodies[0][:common]], past[:1])
            cache.batch_select_indices(torch.zeros(u, dtype=torch.long, device=device))
            bodies, past = [b[common:] for b in bodies], past.expand(u, -1)
    _, past, _ = extend(model, cache, bodies, past)
    rows = torch.tensor(stem_of, device=device)
    cache.batch_select_indices(rows)
    logits, _, _ = extend(model, cache, [[t.prompt_ids[-1]] + t.ids for t in trajs], past[rows], keep=width + 1)
    return logits[:, :-1]


class Beginning:
    """The prompts' common beginning (a system prompt and tool description), run once for all the
    micro-batches of a minibatch instead of once per micro-batch.

    With gradients, its keys and values enter each micro-batch as leaves (`kv`), whose gradients
    accumulate over the micro-batches; `backward()` then sends the sum through the beginning's
    graph once. By the chain rule the parameters get the gradient of one pass over everything.
    That graph is built only then, by running the beginning again (same weights and random
    state, so the same keys and values): the first run keeps no activations, so none are held
    while the micro-batches run (SmolLM2's 152 tokens: ~0.16 GB, for one more forward of them).
    Empty (`ids` = []) when the prompts share fewer than MIN_BEGINNING tokens or there is one
    micro-batch only (`completion_logits` then shares what it can within the pass).
    """

    MIN_BEGINNING = 16

    def __init__(self, model, trajs: list[Trajectory], micro_batches: int):
        prompts = [t.prompt_ids for t in trajs]
        k = min(min(common_prefix(prompts[0], p) for p in prompts), min(len(p) for p in prompts) - 2)
        self.ids = list(prompts[0][:k]) if micro_batches > 1 and k >= self.MIN_BEGINNING and not plain_passes(model) else []
        self.model, self.kv = None, None
        if self.ids:
            grad, self.rng = torch.is_grad_enabled(), torch.get_rng_state()  # dropout draws again alike
            with torch.no_grad():
                self.kv = [tuple(x.requires_grad_(grad) for x in pair) for pair in self.keys_values(model)]
            self.model = model if grad else None

    def keys_values(self, model) -> list[tuple]:
        out = model(input_ids=torch.tensor([self.ids], device=next(model.parameters()).device), use_cache=True,
                    logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in getattr(out, CACHE).layers]

    def of(self):
        """The `beginning` argument of completion_logits (None when there is none)."""
        return (self.ids, self.kv) if self.ids else None

    def backward(self) -> None:
        """Send the gradients the micro-batches left on the keys and values through the beginning."""
        leaves = [x for pair in self.kv or [] for x in pair]
        if self.model is None or all(x.grad is None for x in leaves):
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            graph = [x for pair in self.keys_values(self.model) for x in pair]
        pairs = [(x, leaf.grad) for x, leaf in zip(graph, leaves) if leaf.grad is not None]
        torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])


def completion_logprobs(model, trajs: list[Trajectory], with_entropy: bool = False, temperature: float = 1.0,
                        beginning=None):
    """Log-probs of every completion token under softmax(logits / T), [B, K] right-aligned,
    K = longest completion. T must be the sampling temperature, so that the first ratio is 1.

    A shared prompt is computed once per micro-batch and the LM head runs on completion positions
    only (`completion_logits`).
    """
    width = max(len(t.ids) for t in trajs)
    logits = completion_logits(model, trajs, width, beginning).float()
    if temperature != 1.0:  # skipped at 1: a copy of [B, K, V] for nothing
        logits = logits / temperature
    targets = right_aligned([t.ids for t in trajs], width, dtype=torch.long, device=logits.device)
    if not torch.is_grad_enabled():  # reference / old log-probs: never the [B, K, V] log-softmax
        return token_logprobs(logits, targets), (entropy_from_logits(logits) if with_entropy else None)
    return logprobs_and_entropy(logits, targets, with_entropy)


@torch.no_grad()
def batched_logprobs(model, trajs: list[Trajectory], batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of all completions, [N, K] right-aligned with K the longest in the whole batch;
    computed in batches of similar length (`by_length`), like the training pass."""
    width = max(len(t.ids) for t in trajs)
    out = torch.zeros(len(trajs), width, device=next(model.parameters()).device)
    order = by_length(trajs, range(len(trajs)))
    starts = range(0, len(order), batch_size)
    beginning = Beginning(model, trajs, len(starts))
    for lo in starts:
        idx = order[lo:lo + batch_size]
        logp, _ = completion_logprobs(model, [trajs[i] for i in idx], temperature=temperature,
                                      beginning=beginning.of())
        out[idx, width - logp.shape[1]:] = logp
    return out


def reference_logprobs(model, ref_model, trajs: list[Trajectory], micro_batch_size: int,
                       temperature: float = 1.0) -> torch.Tensor:
    """Log-probs under the reference policy: the same network with its LoRA adapters disabled,
    or, for full fine-tuning, the frozen copy `ref_model` (a mapped one gives its pages back
    after each module, so that they are not resident on top of the heap's high-water mark).

    The pass holds no activations for a backward, so it runs REFERENCE_BATCHES micro-batches at
    once: its memory is mostly the logits ([B, K, V], log-probs taken one row at a time), below a
    training micro-batch's saved activations, and larger batches run the matmuls faster (SmolLM2,
    16 sequences: 1.68 s in one pass against 2.15 s in 4, `benchmarks/reference_pass.py`)."""
    batch_size = REFERENCE_BATCHES * micro_batch_size
    if is_peft(model):
        with model.disable_adapter():
            return batched_logprobs(model, trajs, batch_size, temperature)
    logp = batched_logprobs(ref_model, trajs, batch_size, temperature)
    release_reference(ref_model)
    return logp

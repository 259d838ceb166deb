"""Our own forward passes for Llama-family models (Llama, Qwen2, Mistral without sliding window),
over the model's own weights and the preallocated cache of `sampling`: the decode step (`step`, one
new token per row, keys and values written in place) and the packed prefill (`extend`, many
tokens per row, no padding).

Why not HF's forward for decoding: at rollout batch sizes a decode step is a few small matmuls
per layer, and HF's generic forward spends as long again around them (mask building, grouped-query
attention through repeated keys, ~30 small kernels per layer). This step runs the same arithmetic
with fewer kernels: fused RMSNorm (`F.rms_norm`), grouped-query attention in torch's fused CPU
kernel over the cache as it is (the query heads of one key head side by side, no copy of keys;
the common stem's columns read once for all rows, `attend`), one additive mask per step for all
layers, and under LoRA the adapters merged into the weights once per weight version instead of
three matmuls per projection per token. A decode step streams every weight from memory once,
with few rows: MKL's GEMM on weights packed for the batch's size (`pack`, at the start of each
`generate`) streams them 15-27% faster at 16-64 rows than on the model's own layout, with the same
results; oneDNN's packed copy was 5-20% slower, transposed copies no faster (docs/benchmarks.md,
"The decode step's weights"). The packed copy lives as long as the decoder, which the RL
steps drop after each rollout.

Why not HF's forward for the prefill: a batch of prompts is left-padded to its longest, and the
linears compute the padding too (64 prompts after one system prompt: 3520 tokens for 2602). The
packed pass runs the rows' tokens as one [T, D] batch, attention per row (`extend`).

Per layer, with h the residual stream of the new token and t its position:
    x = rms_norm(h) * w_in;  q, k, v = x Wq, x Wk, x Wv;  q, k = rope(q, t), rope(k, t)
    K[:, :, t], V[:, :, t] = k, v
    h = h + softmax(q K^T * scale + mask) V Wo
    x = rms_norm(h) * w_post;  h = h + (silu(x Wg) * (x Wu)) Wd
logits = (rms_norm(h) * w_final) W_head.  The logits equal HF's to float rounding (tested).

In bf16 (`dtype`, the rollout's precision) the weights, activations and KV cache are bf16: a
decode step streams half the bytes, and the linears run in oneDNN's bf16 GEMM (AMX on CPUs that
have it) instead of MKL's packed fp32 one; the logits come out in fp32. The sampled log-probs
then differ from the fp32 training pass's by bf16 rounding (the RL step logs that gap).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from steprl.memory import own_mappings
from steprl.models.loading import unwrap_peft

SUPPORTED = {"llama", "qwen2", "mistral"}
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
# oneDNN's packed bf16 linear needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: it raises on other CPUs (AVX2 EPYCs)
ONEDNN_PACKED = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
# (out, log-normaliser) of softmax(q K^T scale + mask) V in one kernel, private to torch: without it
# `attend` falls back to matmuls
FUSED_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
MIN_PACKED_ROWS = 8  # below, a decode step is a few GEMVs and packing would not pay for itself
# model -> (weight version, its decoder). Outside the model, so that copying a model copies no
# decoder (a copy's would be stale, and MKL-packed tensors cannot be copied).
DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def effective_linear(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear as its forward applies it in eval mode: a PEFT LoRA layer's
    active adapters are merged into the base weight (W + scaling * B A); a plain Linear as is."""
    base = getattr(module, "base_layer", module)
    weight = base.weight
    if hasattr(module, "lora_A") and not getattr(module, "disable_adapters", False) and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name)
    return weight.detach(), None if base.bias is None else base.bias.detach()


class LlamaDecoder:
    """Decode steps of one model at one version of its weights (`for_model` rebuilds it when an
    optimiser step or a LoRA toggle changes them), in `dtype`: fp32, or bf16 (weights, activations
    and KV cache in bf16, half the bytes a memory-bound decode step streams; the logits in fp32)."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        lm = unwrap_peft(model)
        cfg = lm.config
        self.dtype = dtype
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layers = []
        for layer in lm.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "norm_in": self.cast(layer.input_layernorm.weight.detach()),
                "norm_post": self.cast(layer.post_attention_layernorm.weight.detach()),
                "q": self.linear_of(att.q_proj), "k": self.linear_of(att.k_proj),
                "v": self.linear_of(att.v_proj), "o": self.linear_of(att.o_proj),
                "gate": self.linear_of(mlp.gate_proj), "up": self.linear_of(mlp.up_proj),
                "down": self.linear_of(mlp.down_proj), "scale": att.scaling, "head_dim": att.head_dim,
            })
        self.norm = self.cast(lm.model.norm.weight.detach())
        self.rotary = lm.model.rotary_emb
        self.embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.head = self.linear_of(head) if type(head) is torch.nn.Linear else head
        # packed weights (`pack`): MKL's for batches of packed_rows rows (fp32), oneDNN's for any (None, bf16)
        self.packed, self.packed_rows = {}, 0

    def cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.dtype)

    def linear_of(self, module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return tuple(self.cast(t) for t in effective_linear(module))

    def pack(self, rows: int) -> None:
        """Pack every weight for a GEMM that reads a prepared layout, at `rows` rows; `generate`
        calls it with its batch size. Under LoRA the merged weights are packed. A packed copy of
        the weights, freed with the decoder.

        fp32: MKL's packed GEMM, for batches of exactly `rows` rows (`F.linear` for others, and
        nothing packed below MIN_PACKED_ROWS or when packed for `rows` already): packing SmolLM2
        takes ~0.2 s, and its decode linears at 16-64 rows then run 15-27% faster, with the same
        results (docs/benchmarks.md, "The decode step's weights").
        bf16: oneDNN's packed layout (AMX's tiles where the CPU has them), once, for any number of
        rows: bit-identical to `F.linear` in bf16, which re-lays the weight out at every call and
        so runs at half the speed at 16-64 rows (docs/benchmarks.md, "bf16")."""
        weights = [w[p] for w in self.layers for p in PROJECTIONS]
        weights += [self.head] if isinstance(self.head, tuple) else []
        if self.dtype == torch.bfloat16:
            if ONEDNN_PACKED and not self.packed:
                self.packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, rows) for w, _ in weights}
                self.packed_rows = None  # any
            return
        if rows == self.packed_rows or rows < MIN_PACKED_ROWS or not MKL_PACKED or self.dtype != torch.float32:
            return
        self.packed = {}  # the old packing first: old and new together would double its memory
        with own_mappings():  # MKL asks for 4x what it fills: keep that out of the heap
            self.packed = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w, _ in weights}
        self.packed_rows = rows

    @staticmethod
    def supports(model) -> bool:
        lm = unwrap_peft(model)
        cfg = getattr(lm, "config", None)
        if cfg is None or cfg.model_type not in SUPPORTED:  # sliding windows: `new_cache` decides
            return False
        layer = lm.model.layers[0]
        rms_norm = type(layer.input_layernorm).__name__.endswith("RMSNorm")
        return getattr(cfg, "hidden_act", "silu") == "silu" and rms_norm and not getattr(cfg, "mlp_bias", False)

    @staticmethod
    def version(model) -> tuple:
        """Changes whenever a weight the step reads changes: in-place updates (optimiser steps,
        `load_state_dict`) bump a tensor's version counter, a replaced tensor has a new address,
        toggling LoRA adapters changes which weights count. (Writes through `.data` bump nothing:
        call `LlamaDecoder.forget(model)` after them.)"""
        flags = tuple(getattr(m, "disable_adapters", None) for m in model.modules() if hasattr(m, "lora_A"))
        return tuple((p.data_ptr(), p._version) for p in model.parameters()) + flags

    @staticmethod
    def forget(model) -> None:
        DECODERS.pop(model, None)

    @classmethod
    def for_model(cls, model, dtype: torch.dtype = torch.float32) -> LlamaDecoder | None:
        """The model's decoder in `dtype`, built once per weight version; None where HF's forward
        must decode (unsupported architecture, or training mode, where dropout is live)."""
        if model.training or not cls.supports(model):
            return None
        version = cls.version(model)
        cached = DECODERS.get(model)
        if cached is not None and cached[0] == version and cached[1].dtype == dtype:
            return cached[1]
        cls.forget(model)  # free the stale copy first: old and new together would double its memory
        decoder = cls(model, dtype)
        DECODERS[model] = (version, decoder)
        return decoder

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor,
             shared: int = 0) -> torch.Tensor:
        """Logits [B, V] of the next token after `tokens` [B] at `positions` [B]; `mask` [B, L + 1]
        is the attention mask over the cache's L filled columns and the new one. The first
        `shared` columns hold the same unmasked prefix in every row (the prompts' common stem):
        attention reads them from one row instead of every row's copy (`attend`)."""
        b = tokens.shape[0]
        h = self.embed(tokens).to(self.dtype)  # [B, D]
        cos, sin = self.rotary(h, positions[:, None])  # [B, 1, d] against [B, heads, d]
        bias = torch.zeros(mask.shape, dtype=h.dtype).masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
        groups = self.n_heads // self.n_kv
        for w, slot in zip(self.layers, cache.layers):
            q, k, v = self.attention_inputs(h, w, cos, sin)
            keys, values = slot.update(k[:, :, None], v[:, :, None])  # [B, n_kv, L + 1, d], views of the cache
            q = q.view(b, self.n_kv, groups, -1)  # the query heads that read one key head, side by side
            h = self.after_attention(h, attend(q, keys, values, bias, w["scale"], shared), w)
        return self.logits(h)

    @torch.inference_mode()
    def extend(self, seqs: list[list[int]], cache) -> torch.Tensor:
        """Run `seqs` (one per row) on top of a cache that holds one row (a stem every row
        continues) or nothing, without padding: the rows' tokens are packed into one [T, D] batch
        for the linears, so none of their FLOPs goes to padding (64 distinct prompts after a
        system prompt: 2602 tokens where a padded pass runs 3520). Attention per token: its
        row's earlier tokens, causal (the rows right-padded into one fused-kernel call), and the
        stem's columns for all tokens in one call, the two merged by their log-normalisers as in
        `attend`. Keys and values land in the cache left-padded, as `sampling.extend` leaves them.
        Returns the logits [B, V] after each row's last token."""
        lengths = torch.tensor([len(s) for s in seqs])
        rows = torch.repeat_interleave(torch.arange(len(seqs)), lengths)  # the row of each packed token
        index = torch.arange(len(rows)) - (lengths.cumsum(0) - lengths)[rows]  # its index in its row
        stem, width = cache.get_seq_length(), int(lengths.max())
        columns = stem + width - lengths[rows] + index  # its cache column, rows left-padded
        slots = rows * width + index  # its place in the rows right-padded to `width`, flattened
        h = self.embed(torch.tensor([t for s in seqs for t in s])).to(self.dtype)  # [T, D]
        cos, sin = self.rotary(h, (stem + index)[:, None])  # [T, 1, d] against [T, heads, d]
        t, groups = h.shape[0], self.n_heads // self.n_kv
        for w, slot in zip(self.layers, cache.layers):
            q, k, v = self.attention_inputs(h, w, cos, sin)
            out, lse = attend_own_rows(q, k, v, slots, len(seqs), width, w["scale"])
            out, lse = out.view(t, self.n_kv, groups, -1), lse.view(t, self.n_kv, groups)
            if stem:  # and the stem's columns, for every token at once
                out = merged(*attend_stem(q.view(out.shape), slot.keys[:1], slot.values[:1], w["scale"]), out, lse)
            slot.scatter(k, v, rows, columns, len(seqs), width)
            h = self.after_attention(h, out, w)
        return self.logits(h[lengths.cumsum(0) - 1])

    def attention_inputs(self, h, w, cos, sin):
        """q [N, heads, d], k and v [N, n_kv, d] of one layer for N tokens' residual streams h [N, D]."""
        n, d = h.shape[0], w["head_dim"]
        x = F.rms_norm(h, h.shape[-1:], w["norm_in"], self.eps)
        q = rope(self.linear(x, w["q"]).view(n, self.n_heads, d), cos, sin)
        k = rope(self.linear(x, w["k"]).view(n, self.n_kv, d), cos, sin)
        return q, k, self.linear(x, w["v"]).view(n, self.n_kv, d)

    def after_attention(self, h, out, w):
        """The layer's rest, given the attention's output `out` [N, n_kv, g, d]: the residual
        h + out Wo, then h + MLP(rms_norm(h))."""
        h = h + self.linear(out.reshape(h.shape[0], -1), w["o"])
        x = F.rms_norm(h, h.shape[-1:], w["norm_post"], self.eps)
        return h + self.linear(F.silu(self.linear(x, w["gate"])) * self.linear(x, w["up"]), w["down"])

    def logits(self, h):
        """fp32 logits [N, V]: sampling and its log-probs read them in fp32 whatever the dtype."""
        h = F.rms_norm(h, h.shape[-1:], self.norm, self.eps)
        if isinstance(self.head, tuple):
            return self.linear(h, self.head).float()
        return self.head(h.to(next(self.head.parameters()).dtype)).float()

    def linear(self, x: torch.Tensor, wb) -> torch.Tensor:
        packed = self.packed.get(id(wb[0]))
        if packed is None or (self.packed_rows is not None and x.shape[0] != self.packed_rows):
            return F.linear(x, *wb)
        if self.packed_rows is None:  # oneDNN's bf16 layout, any rows
            return torch.ops.mkldnn._linear_pointwise(x, packed, wb[1], "none", [], "")
        return torch.ops.mkl._mkl_linear(x, packed, wb[0], wb[1], self.packed_rows)


def attend(q, keys, values, bias, scale: float, shared: int = 0) -> torch.Tensor:
    """softmax(q K^T * scale + bias) V for one new token per row, grouped-query: q [B, n_kv, g, d]
    (the g query heads of each key head side by side), keys and values [B, n_kv, L, d].

    With `shared` = S > 0, the first S columns of K and V are the same in every row. Their part
    comes from one pass of all rows' queries over row 0's copy ([1, n_kv, B g, d] against
    [1, n_kv, S, d]): at a rollout's shapes (64 rows, a 152-token system prompt, ~250 columns) that
    reads the cache's stem once instead of 64 times. The two parts, each softmax-normalised over
    its own columns, merge exactly by their log-normalisers (`merged`); the row's own part always
    holds its new token, unmasked, so its log-normaliser is finite. Each part runs in torch's fused
    CPU attention kernel, which returns the log-normaliser; without it, matmuls (`attend_matmul`)."""
    if FUSED_ATTENTION is None:
        return attend_matmul(q, keys, values, bias, scale, shared)
    if not shared:
        return FUSED_ATTENTION(q, keys, values, attn_mask=bias, scale=scale)[0]
    out, lse = FUSED_ATTENTION(q, keys[:, :, shared:], values[:, :, shared:], attn_mask=bias[..., shared:],
                               scale=scale)
    return merged(*attend_stem(q, keys[:1, :, :shared], values[:1, :, :shared], scale), out, lse)


def attend_stem(q, keys, values, scale: float):
    """(out, log-normaliser) of every row's queries q [B, n_kv, g, d] over one copy of the columns
    all rows share, keys and values [1, n_kv, S, d]: one fused call of B g queries per key head."""
    b, n_kv, g, d = q.shape
    out, lse = FUSED_ATTENTION(q.transpose(0, 1).reshape(1, n_kv, b * g, d), keys, values, scale=scale)
    return out.view(n_kv, b, g, d).transpose(0, 1), lse.view(n_kv, b, g).transpose(0, 1)


def merged(out_a, lse_a, out_b, lse_b):
    """Attention over two sets of columns from each set's own (out, log-normaliser):
    (e^l_a out_a + e^l_b out_b) / (e^l_a + e^l_b) = lerp(out_a, out_b, sigmoid(l_b - l_a)).
    (The fused kernel's log-normalisers are fp32 whatever the outputs' dtype.)"""
    return torch.lerp(out_a, out_b, torch.sigmoid(lse_b - lse_a).unsqueeze(-1).to(out_a.dtype))


def attend_matmul(q, keys, values, bias, scale: float, shared: int = 0) -> torch.Tensor:
    """`attend` with matmuls and one softmax over the stem's and the row's columns together."""
    if not shared:
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale + bias
        return torch.matmul(torch.softmax(scores, dim=-1), values)
    b, n_kv, g, d = q.shape
    rows = q.transpose(0, 1).reshape(n_kv, b * g, d)  # every row's queries, per key head
    stem = torch.matmul(rows, keys[0, :, :shared].transpose(-1, -2))  # [n_kv, B g, S]
    stem = stem.view(n_kv, b, g, shared).transpose(0, 1)  # [B, n_kv, g, S]
    rest = torch.matmul(q, keys[:, :, shared:].transpose(-1, -2))  # [B, n_kv, g, L - S]
    probs = torch.softmax(torch.cat([stem, rest], dim=-1) * scale + bias, dim=-1)
    p_stem = probs[..., :shared].transpose(0, 1).reshape(n_kv, b * g, shared)
    out = torch.matmul(p_stem, values[0, :, :shared]).view(n_kv, b, g, d).transpose(0, 1)
    return out + torch.matmul(probs[..., shared:], values[:, :, shared:])


def attend_own_rows(q, k, v, slots, batch: int, width: int, scale: float):
    """Causal attention of packed tokens over their own row's tokens: q [T, heads, d], k and v
    [T, n_kv, d]; token i sits at `slots`[i] = row * width + index in its row. Rows are
    right-padded to `width` for one fused call: causal, a real token never sees the padding after
    it. Returns (out [T, heads, d], log-normaliser [T, heads])."""
    heads, n_kv, d = q.shape[1], k.shape[1], q.shape[-1]
    pq, pk, pv = (x.new_zeros(batch * width, x.shape[1], d).index_copy_(0, slots, x).view(batch, width, -1, d)
                  for x in (q, k, v))
    if heads > n_kv:  # grouped-query: the kernel wants a key head per query head
        pk, pv = pk.repeat_interleave(heads // n_kv, dim=2), pv.repeat_interleave(heads // n_kv, dim=2)
    out, lse = FUSED_ATTENTION(pq.transpose(1, 2), pk.transpose(1, 2), pv.transpose(1, 2), is_causal=True, scale=scale)
    out = out.transpose(1, 2).reshape(batch * width, heads, d).index_select(0, slots)
    return out, lse.transpose(1, 2).reshape(batch * width, heads).index_select(0, slots)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF applies it: x cos + rotate_half(x) sin, rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

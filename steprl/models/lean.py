"""Training passes that save less for their backward, with HF's arithmetic (Llama-family models).

The peak memory of an RL step is the training pass's saved activations on top of the weights,
gradients and AdamW's moments. Two of HF's modules save more than their backward needs:

* Grouped-query attention. HF's SDPA path repeats each key and value head for the g query heads
  that read it (`repeat_kv`), and SDPA keeps those copies for its backward: g copies of every
  row's keys and values, the shared prompt's columns included. `grouped_attention` lays the g
  query heads of one key head end to end instead, as g x L query rows of one head against the
  keys as they are, with the mask tiled g times: one fused kernel call, the same products, no
  copies of keys or values.
* The MLP, down(silu(gate(x)) * up(x)). Autograd saves gate(x), silu(gate(x)), up(x) and the
  product, 4 x [tokens, intermediate]. `GatedMLPTail` saves gate(x) and up(x) and recomputes
  the other two in the backward, element-wise.

SmolLM2, GRPO micro-batches of 4 completions: 0.611 -> 0.404 GB saved per micro-batch, and the
forward + backward is faster, not slower (no copies): 9.27 -> 8.76 s for 16 completions, the
gradients equal to float rounding (`benchmarks/training_passes.py`; docs/benchmarks.md,
"Lean training passes").
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED = "steprl_grouped"  # the name `lean_training` gives the attention implementation


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """HF's attention-function signature: query [B, H, L, d], key and value [B, n_kv, S, d], the
    mask [B, 1, L, S] (bool, True = attend) or None (causal, as HF's SDPA path reads it). Returns
    ([B, L, H, d], None).

    Query head h = k g + j reads key head k. Its rows go to rows j L .. j L + L - 1 of head k in a
    [B, n_kv, g L, d] query, and the mask is tiled g times along the query rows, so that each row
    keeps its own position's mask. Where this does not apply (one query head per key head,
    arguments it does not know) it is HF's SDPA path."""
    b, heads, length, d = query.shape
    n_kv, width = key.shape[1], key.shape[2]
    g = heads // n_kv
    if g == 1 or any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "sinks")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    mask = attention_mask
    if mask is None and length > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        # HF left the causal mask out: top-left aligned, as SDPA's is_causal (columns >= L unseen)
        key, value, width = key[:, :, :length], value[:, :, :length], length
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    if mask is not None:
        mask = tiled(mask, (b, 1, length, width), g, query.dtype)
    out = F.scaled_dot_product_attention(query.reshape(b, n_kv, g * length, d), key, value, attn_mask=mask,
                                         dropout_p=dropout, scale=scaling)
    return out.reshape(b, heads, length, d).transpose(1, 2).contiguous(), None


_last_tiled: list = [None, None]  # (a mask HF passed, its tiled additive form)


def tiled(mask: torch.Tensor, shape: tuple, g: int, dtype: torch.dtype) -> torch.Tensor:
    """`mask` expanded to `shape` [B, 1, L, S] and tiled g times along the query rows, as an additive
    float mask (0 or -inf; SDPA turns a bool mask into that itself, once per call). HF passes one
    mask object to every layer of a forward: it is tiled once, and the backward keeps one copy."""
    if _last_tiled[0] is not mask:
        tiles = mask.expand(shape).repeat(1, 1, g, 1)
        if tiles.dtype == torch.bool:
            tiles = torch.zeros(tiles.shape, dtype=dtype, device=tiles.device).masked_fill_(~tiles, float("-inf"))
        _last_tiled[:] = [mask, tiles]
    return _last_tiled[1]


AttentionInterface.register(GROUPED, grouped_attention)
AttentionMaskInterface.register(GROUPED, sdpa_mask)


class GatedMLPTail(torch.autograd.Function):
    """y = (silu(g) * u) W^T for g = gate(x), u = up(x), saving g, u and W only. Backward, with
    p = silu(g) * u recomputed: dW = dy^T p, dp = dy W, du = dp * silu(g), dg = silu'(g) (dp * u)."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        w = weight.to(grad.dtype)  # under autocast the forward ran in bf16 (grad's dtype) on fp32 weights
        act = F.silu(gate)
        grad_product = grad.matmul(w)
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = grad.flatten(0, -2).t().mm((act * up).flatten(0, -2).to(grad.dtype)).to(weight.dtype)
        return (torch.ops.aten.silu_backward((grad_product * up).to(gate.dtype), gate),
                (grad_product * act).to(up.dtype), grad_weight)


def lean_mlp_forward(self, x):
    """A Llama MLP's forward: through `GatedMLPTail` when a backward will follow and down_proj is
    a plain Linear (not LoRA-wrapped); HF's forward otherwise."""
    down = self.down_proj
    if torch.is_grad_enabled() and type(down) is torch.nn.Linear and down.bias is None:
        return GatedMLPTail.apply(self.gate_proj(x), self.up_proj(x), down.weight)
    return type(self).forward(self, x)  # the class's own (HF's) forward


def lean_training(model):
    """Switch a Llama-family model (SiLU MLPs, SDPA attention) to the leaner training passes: the
    attention implementation `GROUPED`, each MLP's forward `lean_mlp_forward`. Other models are
    left as they are. Returns the model."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "hidden_act", None) != "silu" or cfg._attn_implementation != "sdpa":
        return model
    mlps = [m for m in model.modules() if all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    if not mlps:
        return model
    model.set_attn_implementation(GROUPED)
    for mlp in mlps:
        mlp.forward = types.MethodType(lean_mlp_forward, mlp)
    return model

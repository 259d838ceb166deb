"""Losses: KL penalties, Bradley-Terry, PPO clipped surrogate and value loss, loss aggregation,
entropy and token log-probs. Pure torch functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3), elementwise.

        "k1": logp - ref_logp                                   (unbiased, can be negative)
        "k2": 0.5 (logp - ref_logp)^2                           (biased, >= 0)
        "k3": exp(ref_logp - logp) - (ref_logp - logp) - 1      (unbiased, >= 0; GRPO's choice)
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin=None) -> torch.Tensor:
    """Reward-model loss: L = mean(-log sigmoid(r_chosen - r_rejected - margin)); margin 0 if None."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
) -> torch.Tensor:
    """PPO clipped policy loss, elementwise, no reduction.

        rho = exp(logp - old_logp)
        L   = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)

    eps_low = clip_eps; eps_high = clip_eps_high if given (DAPO's clip-higher), else clip_eps.
    advantages may have fewer dims than logp ([B] against [B, T]): they are broadcast over the
    trailing dims. The gradient is zero where the clipped term is the smaller one.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages
    while adv.dim() < logp.dim():
        adv = adv.unsqueeze(-1)
    rho = torch.exp(logp - old_logp)
    unclipped = rho * adv
    clipped = torch.clamp(rho, 1 - clip_eps, 1 + eps_high) * adv
    return -torch.min(unclipped, clipped)


def truncated_is_weight(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weight of each token for a sampler whose arithmetic is not the
    trainer's (bf16 rounding, other kernels), no gradient:

        w = min(pi_old / pi_sampler, cap) = min(exp(old_logp - sampler_logp), cap)

    The sampler's log-probs as PPO's old log-probs would make rho = pi / pi_sampler, unbounded
    where the two disagree on a token with A < 0 (the clip bounds rho only on the side that
    helps); with the trainer's own old log-probs rho starts at 1 and w, bounded by `cap`,
    carries the mismatch (TIS)."""
    return torch.exp(old_logp - sampler_logp).clamp(max=cap).detach()


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, kind: str = "grpo", max_len=None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar over the tokens where mask [B, T] is set.

        "grpo":    (1/B) sum_i [ sum_t m_it l_it / sum_t m_it ]   (per-sequence mean, then mean;
                   a sequence with no mask tokens contributes 0)
        "dapo":    sum_it m_it l_it / sum_it m_it                  (token-level mean)
        "dr_grpo": sum_it m_it l_it / (B * max_len)                (Dr. GRPO: constant normaliser;
                   max_len defaults to T = per_token_loss.shape[1])
    """
    m = mask.to(per_token_loss.dtype)
    summed = per_token_loss * m
    if kind == "grpo":
        n = m.sum(dim=1)
        per_seq = summed.sum(dim=1) / torch.where(n > 0, n, torch.ones_like(n))
        return per_seq.mean()
    if kind == "dapo":
        n = m.sum()
        return summed.sum() / torch.where(n > 0, n, torch.ones_like(n))
    if kind == "dr_grpo":
        length = per_token_loss.shape[1] if max_len is None else max_len
        return summed.sum() / (per_token_loss.shape[0] * length)
    raise ValueError(f"kind must be one of {AGGREGATIONS}, got {kind!r}")


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO value loss, elementwise: 0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the last dim: H = logsumexp(z) - sum_v softmax(z)_v z_v.

    Same as -sum p log p. z is shifted by its max first (H does not change), so large logits
    neither overflow nor lose precision. Logits must be finite.
    """
    z = logits - logits.max(dim=-1, keepdim=True).values.detach()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[token] = z_token - logsumexp(z), for logits [B, T, V] and tokens [B, T].

    Without autograd (reference / old log-probs) logsumexp runs one sequence at a time and never
    materialises the [B, T, V] log-softmax: the extra memory is one [T, V] temporary. With
    autograd it is `logprobs_and_entropy`'s one fused log-softmax. Precision is fp32's at the
    logits' magnitude. Returns [B, T].
    """
    if logits.dim() > 2 and not (logits.requires_grad and torch.is_grad_enabled()):
        picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return logprobs_and_entropy(logits, tokens, with_entropy=False)[0]


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = True):
    """(log pi(token) [B, T], entropy [B, T] or None) from one log-softmax l = log softmax(z):

        log pi(token) = l_token,    H = -sum_v e^(l_v) l_v   (no gradient: a metric).

    The training passes' loss head. Fused log-softmax and its backward read the [B, T, V] logits
    about half as often as logsumexp's max, subtract, exp, sum and their backward, plus a
    separate entropy (SmolLM2's vocabulary, 16 x 65 positions, forward + backward + entropy:
    314 ms against 615 ms, `benchmarks/loss_head.py`). It keeps l for the backward where logsumexp kept the logits, so
    memory is the same. Logits must be finite."""
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(dim=-1)
    return picked, entropy

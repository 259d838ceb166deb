"""Advantage estimators: GRPO group baselines, discounted returns, GAE, turn-level credit.

All functions are pure: no state, no side effects. Tensors in, tensors out, except where a
signature says lists (per-turn rewards of ragged multi-turn trajectories are plain lists).
"""

from __future__ import annotations

import torch

EPS = 1e-4  # added to the std in group_advantages, as in the brief
SCALES = ("group", "batch", "none")


def _std(x: torch.Tensor, dim=None) -> torch.Tensor:
    """torch.std (Bessel-corrected), but 0 instead of NaN when there is a single element."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim))
    return x.std() if dim is None else x.std(dim)


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def group_advantages(rewards, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO advantages: each reward against the mean of its group.

    rewards [N] holds N / group_size consecutive groups; group g is rewards[g*G:(g+1)*G].

        "group": A_i = (r_i - mean_g) / (std_g + 1e-4)
        "batch": A_i = (r_i - mean_g) / (std(r_1..r_N) + 1e-4)
        "none":  A_i =  r_i - mean_g

    std is torch.std's default (Bessel-corrected, divides by n - 1). The std of a single
    element (group_size 1, or N = 1 for "batch") is defined as 0 instead of torch's NaN, so a
    group of one gives A = 0 / (0 + 1e-4) = 0. A group whose rewards are all equal gives A = 0.
    """
    _check_scale(scale)
    r = torch.as_tensor(rewards).float()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(r.shape)}")
    n = r.shape[0]
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"number of rewards ({n}) must be a positive multiple of group_size ({group_size})")
    grouped = r.reshape(-1, group_size)  # [N/G, G]
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centered
    if scale == "group":
        std = _std(grouped, dim=1).repeat_interleave(group_size)
    else:
        std = _std(r)
    return centered / (std + EPS)


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """Return-to-go of each step: G_t = sum_{k>=t} gamma^(k-t) r_k  (so G_t = r_t + gamma G_{t+1})."""
    out, g = [], 0.0
    for r in reversed(rewards):
        g = float(r) + gamma * g
        out.append(g)
    return out[::-1]


def trajectory_returns(turn_rewards: list[list[float]], gamma: float) -> list[float]:
    """Discounted return of each whole episode: R = G_0 = sum_t gamma^t r_t (0.0 for an empty one).

    For "credit: trajectory": feed these to group_advantages.
    """
    return [discounted_returns(rs, gamma)[0] if rs else 0.0 for rs in turn_rewards]


def gae(rewards, values, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) for one trajectory.

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1},   A_T = 0
        R_t     = A_t + V_t                      (the value target)

    rewards [T], values [T+1]; values[T] is the bootstrap value of the state after the last step
    (0 at a terminal). With T = 1: A_0 = r_0 + gamma V_1 - V_0. Leading batch dimensions also work
    (rewards [..., T], values [..., T+1]). The result carries no gradient (advantages and value
    targets are constants for the loss). Returns (advantages [T], returns [T]).
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).detach()
    v = torch.as_tensor(values, dtype=torch.float32).detach()
    T = r.shape[-1]
    if v.shape[-1] != T + 1:
        raise ValueError(f"values must have T + 1 = {T + 1} entries (last one the bootstrap), got {v.shape[-1]}")
    deltas = r + gamma * v[..., 1:] - v[..., :-1]
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[..., 0])
    for t in reversed(range(T)):
        last = deltas[..., t] + gamma * lam * last
        adv[..., t] = last
    return adv, adv + v[..., :-1]


def turn_level_group_advantages(
    turn_rewards: list[list[float]], group_size: int, gamma: float, scale: str = "group"
) -> list[list[float]]:
    """Per-turn GRPO advantages for "credit: turn": each turn's return-to-go against its peers.

    For trajectory i with per-turn rewards r_{i,0..T_i-1}: G_{i,t} = sum_{k>=t} gamma^(k-t) r_{i,k}.
    Trajectories form groups of group_size consecutive entries (same prompt). For turn t of
    trajectory i in group g, with P_t = {j in g : T_j > t} (the group's trajectories that have a
    turn t):

        |P_t| >= 2:  b = mean_{j in P_t} G_{j,t},  s = std_{j in P_t} G_{j,t}
        |P_t| == 1:  b = mean_{j in g} G_{j,0},    s = std of every G_{j,u} of the group
                     (no peer reached this turn: fall back to the whole-episode baseline, which
                     is what "credit: trajectory" would use; with a sparse final reward and
                     gamma = 1 this gives the lone turn the trajectory's own advantage. s spans
                     all the group's returns, so it is 0 only when they are all equal, and then
                     G_{i,t} - b = 0 too: no blow-up from dividing by 1e-4.)

        "group": A_{i,t} = (G_{i,t} - b) / (s + 1e-4)
        "batch": A_{i,t} = (G_{i,t} - b) / (std of every G_{j,t} in the batch + 1e-4)
        "none":  A_{i,t} =  G_{i,t} - b

    std is Bessel-corrected, 0 for a single element. A group of one trajectory (group_size 1)
    has no peers at all and gets all-zero advantages, as in group_advantages. Empty trajectories
    give [] and have no turn 0 (their G_0 counts as 0 in the fallback baseline). Returns one list
    of floats per trajectory.
    """
    _check_scale(scale)
    n = len(turn_rewards)
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"number of trajectories ({n}) must be a positive multiple of group_size ({group_size})")
    returns = [discounted_returns(rs, gamma) for rs in turn_rewards]
    if group_size == 1:
        return [[0.0] * len(g) for g in returns]
    all_g = [x for g in returns for x in g]
    batch_std = _std(torch.tensor(all_g, dtype=torch.float64)).item() if all_g else 0.0

    out: list[list[float]] = []
    for start in range(0, n, group_size):
        group = returns[start:start + group_size]
        g0 = torch.tensor([g[0] if g else 0.0 for g in group], dtype=torch.float64)
        group_all = torch.tensor([x for g in group for x in g], dtype=torch.float64)
        fallback = (g0.mean().item(), _std(group_all).item())
        stats = {}  # turn index -> (baseline, std)
        for t in range(max(len(g) for g in group)):
            peers = torch.tensor([g[t] for g in group if len(g) > t], dtype=torch.float64)
            stats[t] = (peers.mean().item(), _std(peers).item()) if len(peers) >= 2 else fallback
        for g in group:
            adv = []
            for t, g_t in enumerate(g):
                b, s = stats[t]
                if scale == "group":
                    adv.append((g_t - b) / (s + EPS))
                elif scale == "batch":
                    adv.append((g_t - b) / (batch_std + EPS))
                else:
                    adv.append(g_t - b)
            out.append(adv)
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over dim (all elements when dim is None); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    num = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    den = mask.sum() if dim is None else mask.sum(dim)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, total=None) -> torch.Tensor:
    """Whiten x over the masked entries: (x - mu) / sqrt(var + 1e-8), mu and var masked.

    var is Bessel-corrected (sum(mask (x - mu)^2) / (n - 1), n = sum(mask)), 0 when n < 2.
    With shift_mean=False the mean is added back: (x - mu) / sqrt(var + 1e-8) + mu.
    Only entries where mask is set are meaningful in the output. `total` sums a scalar tensor
    over the processes of a data-parallel launch, so that mu and var are the whole batch's.
    """
    total = total or (lambda t: t)
    mask = mask.to(x.dtype)
    n = total(mask.sum())
    mu = total((x * mask).sum()) / n.clamp(min=1)
    sq = total(((x - mu) ** 2 * mask).sum())
    var = sq / (n - 1) if n >= 2 else torch.zeros_like(sq)
    out = (x - mu) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mu

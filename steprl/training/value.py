"""PPO's value model and the passes that read it.

    critic "separate": Critic, a copy of the policy's trunk + a linear value head, fully trained;
    critic "shared":   ValueHead on the policy's own last hidden state (`policy_forward`: one
                       trunk pass gives log-probs, entropy and values).
V_j is read at the position before action token j: the state in which token j is sampled.
"""
from __future__ import annotations

import torch

from steprl.algos import logprobs_and_entropy
from steprl.models.loading import forward_with_hidden
from steprl.training.passes import completion_logprobs, right_aligned, whole_episodes


class ValueHead(torch.nn.Module):
    """V = w . h + b on a hidden state; zero-initialised so every value starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.v = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.v.weight)
        torch.nn.init.zeros_(self.v.bias)

    def forward(self, hidden):
        return self.v(hidden).squeeze(-1)


def completion_hidden(trunk, trajs) -> torch.Tensor:
    """Last hidden state at the position before each completion token, [B, K, H] right-aligned."""
    width = max(len(t.ids) for t in trajs)
    device = next(trunk.parameters()).device
    ids, attn, pos = whole_episodes(trajs, device)
    hidden = trunk(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    return hidden[:, -(width + 1):-1]


class Critic(torch.nn.Module):
    """critic "separate": its own copy of the policy's trunk and a value head."""

    def __init__(self, trunk, hidden_size: int):
        super().__init__()
        self.trunk, self.head = trunk, ValueHead(hidden_size)

    def forward(self, trajs):
        # a copy, not the head's squeezed view: FSDP cannot hook an in-place op on a returned view, and warns
        return self.head(completion_hidden(self.trunk, trajs)).clone()


def policy_forward(model, trajs, head=None, temperature: float = 1.0):
    """(log-probs, entropy, values or None), each [B, K], log-probs under softmax(logits / T);
    with a shared head one trunk pass gives all."""
    if head is None:
        logp, entropy = completion_logprobs(model, trajs, with_entropy=True, temperature=temperature)
        return logp, entropy, None
    width = max(len(t.ids) for t in trajs)
    device = next(model.parameters()).device
    ids, attn, pos = whole_episodes(trajs, device)
    # the LM head on the completion's positions only; the trunk's states at them feed the value head
    out, hidden = forward_with_hidden(model, input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                                      logits_to_keep=width + 1)
    hidden = hidden[:, -(width + 1):-1]
    logits = out.logits[:, :-1].float() / temperature
    targets = right_aligned([t.ids for t in trajs], hidden.shape[1], dtype=torch.long, device=logits.device)
    logp, entropy = logprobs_and_entropy(logits, targets)
    return logp, entropy, head(hidden)


@torch.no_grad()
def batched(fn, trajs, batch_size: int) -> torch.Tensor:
    """fn(minibatch) -> [b, k] right-aligned, stitched into [N, K] for the whole batch."""
    width = max(len(t.ids) for t in trajs)
    out = None
    for lo in range(0, len(trajs), batch_size):
        x = fn(trajs[lo:lo + batch_size])
        out = torch.zeros(len(trajs), width, device=x.device) if out is None else out
        out[lo:lo + x.shape[0], width - x.shape[1]:] = x
    return out

"""Pure RL math: advantages, returns, losses, KL control. Torch tensors in and out unless stated."""

from steprl.algos.advantages import (
    discounted_returns,
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
    trajectory_returns,
    turn_level_group_advantages,
)
from steprl.algos.kl_control import AdaptiveKLController, FixedKLController
from steprl.algos.losses import (
    aggregate_loss,
    bradley_terry_loss,
    clipped_surrogate,
    clipped_value_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_and_entropy,
    token_logprobs,
    truncated_is_weight,
)

__all__ = [
    "group_advantages",
    "discounted_returns",
    "gae",
    "turn_level_group_advantages",
    "trajectory_returns",
    "masked_mean",
    "masked_whiten",
    "kl_penalty",
    "bradley_terry_loss",
    "clipped_surrogate",
    "aggregate_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "token_logprobs",
    "logprobs_and_entropy",
    "truncated_is_weight",
    "FixedKLController",
    "AdaptiveKLController",
]

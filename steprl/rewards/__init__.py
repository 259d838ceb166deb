"""Reward functions with TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`."""

from steprl.rewards.library import (
    LIBRARY,
    accuracy,
    add_final_rewards,
    accuracy_reward,
    apply_rewards,
    combine,
    completion_text,
    format_reward,
    length_over_target,
    length_penalty,
    resolve_reward,
    resolve_rewards,
    step_bonus,
    step_reward,
    tool_success,
    tool_success_reward,
    trajectory_rewards,
)

__all__ = ["LIBRARY", "add_final_rewards", "accuracy", "accuracy_reward", "apply_rewards", "combine", "completion_text",
           "format_reward", "length_over_target", "length_penalty", "resolve_reward", "resolve_rewards", "step_bonus",
           "step_reward",
           "tool_success", "tool_success_reward", "trajectory_rewards"]

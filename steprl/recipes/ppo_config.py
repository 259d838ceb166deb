"""Hyper-parameters of the `ppo` stage (recipes/ppo.py). Names match GRPOConfig where the meaning does."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal



@dataclass
class PPOConfig:
    steps: int = 60
    prompts_per_step: int = 32
    num_generations: int = 1  # episodes per prompt (PPO needs no group; >1 only for more data)
    max_new_tokens: int = 64  # per assistant turn
    max_turns: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    learning_rate: float = 1e-4
    critic_learning_rate: float | None = None  # None = learning_rate
    kl_coef: float = 0.05  # beta (initial value when adaptive_kl); 0 and not adaptive = no reference pass
    kl_in_reward: bool = True  # True: r_j -= beta * k1_j on every token; False: + beta * KL_est in the loss
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # for the loss (kl_in_reward False) and the `kl` metric
    adaptive_kl: bool = False  # Ziegler et al.: steer beta so that the measured KL tracks target_kl
    target_kl: float = 0.05  # per-token KL target of the adaptive controller
    kl_horizon: float = 10000.0  # episodes over which the controller corrects a 20% error
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 2  # mu: optimisation epochs over each batch of rollouts
    minibatch_size: int = 32  # episodes per optimiser step
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"  # policy-loss aggregation; "dapo" = token mean
    credit: Literal["trajectory", "turn"] = "trajectory"  # see recipes/ppo.py and docs/algorithms.md
    gamma: float = 1.0  # discount between turns
    gae_lambda: float = 0.95
    critic: Literal["separate", "shared"] = "separate"  # own trunk (copy of the policy) or a head on the policy
    vf_coef: float = 0.5
    value_clip: float = 0.2  # clipped value loss: V within V_old +- value_clip
    whiten_advantages: bool = True
    truncation_penalty: float = 0.0  # added to the final reward of an episode with a turn cut at max_new_tokens
    max_grad_norm: float = 1.0
    release_memory: bool = False  # free heap pages back to the OS before each rollout: lower peak RSS, slower passes
    warmup_steps: int = 0
    log_every: int = 1
    save_every: int = 20
    n_samples_logged: int = 4
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())
    reward: RewardConfig = field(default_factory=lambda: RewardConfig())


# Imported last, and used lazily above, so that steprl.config can import this module (for RunConfig)
# and this module can import steprl.config, whichever is imported first.
from steprl.config import LoraConfig, RewardConfig  # noqa: E402

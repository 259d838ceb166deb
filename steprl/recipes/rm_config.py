"""Hyper-parameters of the `rm` stage (recipes/rm.py): a Bradley-Terry reward model.

Field names follow TRL's RewardConfig where it has one (center_rewards_coefficient, max_length).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CORRUPTIONS = ("wrong_number", "wrong_answer", "missing_answer", "malformed_call")


@dataclass
class RMConfig:
    data: str | None = None  # JSONL {"prompt", "chosen", "rejected"[, "margin"]}, text or messages; None = generated pairs
    test_data: str | None = None  # held-out JSONL; None = generated test pairs (or 10% of `data`)
    n_pairs: int = 400  # generated training pairs, one per train problem
    n_test_pairs: int = 200  # generated held-out pairs, from the task's test split
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))  # kinds of rejected answers
    epochs: int = 2
    batch_size: int = 16  # pairs per optimiser step
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_length: int = 512  # tokens per conversation (longer ones are cut at the end)
    use_margin: bool = False  # per-pair margin: JSONL "margin", or the rule-reward gap for generated pairs
    center_rewards_coefficient: float = 0.0  # + c * mean((r_w + r_l)^2): keeps rewards centred on 0
    # r from the last token's score ("last", as TRL) or the mean score over the tokens the assistant
    # wrote ("mean": each token can flag what it got wrong, e.g. a digit that does not match the tool result)
    pooling: Literal["last", "mean"] = "last"
    # "classifier": the scalar head above. "implicit": no head, the LM itself scores (DPO's implicit
    # reward, Rafailov et al. 2023; as a process reward, Yuan et al. 2024):
    #     r(x, y) = beta * sum_{t in assistant tokens} [log pi_theta(y_t | .) - log pi_ref(y_t | .)]
    # pi_theta starts as the base and is trained with the same Bradley-Terry loss; pi_ref is the base
    # (under LoRA: adapters disabled). pooling does not apply.
    type: Literal["classifier", "implicit"] = "classifier"
    beta: float = 0.05  # implicit only: the scale of the log-ratio
    init_from: str | None = None  # default: the last policy stage before rm (else model.name_or_path)
    log_every: int = 5
    eval_batch_size: int = 64
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())  # LoRA (task SEQ_CLS, score head trained) or full


# Imported last, and used lazily above, so that steprl.config can import this module (for RunConfig)
# and this module can import steprl.config, whichever is imported first.
from steprl.config import LoraConfig  # noqa: E402

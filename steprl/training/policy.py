"""The trainable policy of an RL stage (grpo, ppo): start weights, LoRA, KL reference, optimiser,
and its checkpoint (with PPO's value model beside it).

Both RL recipes start the same way, so they share this one function: what differs between them
(PPO's value model) is passed in, and the order of the steps is fixed here, because it decides
which random numbers LoRA's initialisation draws and so the results of a seed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from safetensors.torch import load_file, save_file

from steprl.config import LoraConfig, RunConfig
from steprl.models.lean import lean_training
from steprl.models.loading import apply_lora, is_peft, load_policy, resolve, save_checkpoint
from steprl.models.mapped import frozen_reference
from steprl.training.common import adamw, load_state, previous_checkpoint

VALUE_FILE = "value_model.safetensors"  # PPO's critic (or shared value head), beside the checkpoint


@dataclass
class Policy:
    model: torch.nn.Module  # the trained network (a PEFT model under LoRA)
    tokenizer: object
    ref_model: torch.nn.Module | None  # frozen copy for full fine-tuning; None under LoRA (adapters off) or no KL
    base: str  # the checkpoint it starts from (an adapter checkpoint points at it)
    params: list  # the policy's trainable parameters (for gradient clipping)
    optimizer: torch.optim.Optimizer  # group 0: the policy; group 1: the value model, if any
    state: dict | None  # trainer_state.pt of an interrupted run: policy weights and optimiser restored
    value_model: torch.nn.Module | None = None
    # under sharded parameters (FSDP), a whole copy on every rank for the rollout engine to sample
    # from, refreshed from the trained shards before each rollout (sync_sampler)
    whole_copy: torch.nn.Module | None = None

    @property
    def sampler(self) -> torch.nn.Module:
        """The network the rollout engine samples from: the policy, or its whole copy."""
        return self.whole_copy if self.whole_copy is not None else self.model

    @property
    def trained(self) -> torch.nn.Module:
        """Everything the optimiser trains, as one module: the policy, or {"policy", "value"} with
        PPO's value model (a sharded checkpoint names each weight by its place in it)."""
        if self.value_model is None:
            return self.model
        return torch.nn.ModuleDict({"policy": self.model, "value": self.value_model})

    def sync_sampler(self) -> None:
        """Under FSDP, gather each trained parameter and copy it into the whole copy; every rank calls
        it. (A rollback by auto-fix changes the shards too: hence before each rollout, not after a step.)"""
        if self.whole_copy is None:
            return
        whole = dict(self.whole_copy.named_parameters())
        with torch.no_grad():
            for name, q in self.model.named_parameters():
                if q.requires_grad:
                    whole[name].copy_(q.full_tensor())

    def save(self, directory: Path, weights: dict | None = None) -> None:
        """The policy in Hugging Face format (adapter or full model), the value model beside it.
        `weights`: `trained`'s whole state dict, which save_resumable gathers when the parameters
        are sharded (FSDP), else None (the modules hold them whole)."""
        critic = self.value_model.state_dict() if self.value_model is not None else None
        if weights is not None and self.value_model is not None:
            critic = {k.removeprefix("value."): v for k, v in weights.items() if k.startswith("value.")}
            weights = {k.removeprefix("policy."): v for k, v in weights.items() if k.startswith("policy.")}
        save_checkpoint(self.model, self.tokenizer, directory, base_path=self.base, state_dict=weights)
        if critic is not None:
            save_file({k: v.detach().contiguous() for k, v in critic.items()}, str(directory / VALUE_FILE))


def setup_policy(cfg: RunConfig, stage: str, lora: LoraConfig, learning_rate: float, need_ref: bool,
                 ckpt: Path, value_model: Callable | None = None, value_lr: float | None = None,
                 *, rt) -> Policy:
    """Load the previous stage's checkpoint, add LoRA (or a frozen reference copy when a KL term
    needs one), build AdamW, and resume from `ckpt` if an interrupted run left its state there.

    Under LoRA the reference is the same network with its adapters disabled: no second copy.
    `value_model(model)` (PPO) builds a value model from the loaded network before LoRA goes in,
    so that a separate critic copies the plain trunk; it trains in a second optimiser group at
    `value_lr`. Everything lands on the runtime's device.
    """
    base = resolve(previous_checkpoint(cfg, stage))
    model, tokenizer = load_policy(base)
    lean_training(model)  # training passes that save no repeated keys, half the MLP's activations
    critic = value_model(model) if value_model is not None else None
    ref_model = None
    if lora.enabled:
        model = apply_lora(model, lora)
    elif need_ref:
        ref_model = frozen_reference(model, base)  # views into the checkpoint file when it is plain
    state = load_state(ckpt)
    if state:
        load_weights(model, ckpt)
        if critic is not None:
            critic.load_state_dict(load_file(str(ckpt / VALUE_FILE)))
    # the engines read whole weights: under FSDP they sample from a whole copy (memory: the
    # weights once more on each rank; the gradients and moments stay sharded)
    whole_copy = copy.deepcopy(model).to(rt.device) if rt.shards_parameters else None
    model = rt.prepare(model)
    if critic is not None:  # a separate critic, a trunk of its own, shards as the policy does; a value head stays whole
        critic = rt.prepare(critic) if hasattr(critic, "trunk") else critic.to(rt.device)
    if ref_model is not None:
        ref_model.to(rt.device)
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [{"params": params, "lr": learning_rate}]
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr": value_lr or learning_rate})
    optimizer = adamw(groups, rt, weight_decay=0.0)
    policy = Policy(model, tokenizer, ref_model, base, params, optimizer, state, critic, whole_copy)
    if state:
        peaks = [group["lr"] for group in optimizer.param_groups]
        rt.load_optimizer_state(policy.trained, optimizer, state["optimizer"])
        for group, lr in zip(optimizer.param_groups, peaks):  # the saved lr was scheduled; train_rl scales the peak
            group["lr"] = lr
    return policy


def load_weights(model, directory) -> None:
    """Restore trained weights (adapter or full model) saved by save_checkpoint, for resuming."""
    from safetensors.torch import load_file

    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    else:
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)

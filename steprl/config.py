"""Every hyperparameter of a run, in one typed schema.

A run is one YAML file. `load_config(path, overrides)` reads it, applies `a.b=value`
overrides, and checks every key, type and value against the dataclasses below: a mistake stops
with one line that names the key and what is allowed. Field names follow TRL where TRL has one
(learning_rate, num_generations, num_iterations, loss_type, scale_rewards, temperature ...).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import yaml

STAGES = ("pretrain", "sft", "rm", "grpo", "ppo")


class ConfigError(ValueError):
    """A bad key, type or value in a config; its message is one line."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # fully trained beside the adapter, e.g. [embed_tokens] when new tokens must be learned
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    # "tiny" = the embedded default, built from scratch by the pretrain stage; otherwise a local
    # Hugging Face directory, a known alias such as "smollm2", or a hub id such as "Qwen/Qwen3-0.6B"
    name_or_path: str = "tiny"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 1024
    max_position_embeddings: int = 512


@dataclass
class TaskConfig:
    name: str = "calc"  # a registered task, or "module:Class"
    args: dict = field(default_factory=dict)


@dataclass
class PretrainConfig:
    steps: int = 600
    batch_size: int = 32
    seq_len: int = 256
    n_docs: int = 60000
    learning_rate: float = 3e-3
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd = warm-up, stable, decay
    decay_fraction: float = 0.2  # wsd only: the share of steps spent decaying
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 200
    compile: bool = False  # torch.compile the training step: -10% wall time (docs/benchmarks.md, "The demo's time"), but runs stop being bit-reproducible


@dataclass
class SFTConfig:
    n_examples: int = 200
    data: str | None = None  # optional JSONL of {"messages": [...]} or {"prompt", "completion"}
    # fraction of the generated cold-start trajectories that give the right answer without calling
    # a tool, as a teacher that knows some answers by heart would: the habit RL must unlearn
    no_tool_fraction: float = 0.0
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    warmup_ratio: float = 0.0  # > 0: warm up over this share of the steps instead of warmup_steps (TRL's name)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    log_every: int = 5
    save_every: int = 50  # optimiser steps between checkpoints a killed run resumes from; 0 = only the final one
    # reuse freed activations in the heap (memory.keep_freed_memory), as the RL stages do: ~2x faster
    # steps on short conversations (SmolLM2 on calc: 4.5 s against 9.5 s); off by default because
    # conversations of varied lengths fragment the untrimmed heap (SmolLM2 on GSM8K: 11 -> 17 GB in 40 steps)
    keep_freed_memory: bool = False
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True))


@dataclass
class RewardConfig:
    correct: float = 1.0  # sparse: +1 for a correct final answer
    tool_success: float = 0.1  # dense: per successful tool call ...
    tool_success_cap: float = 0.2  # ... capped per episode
    # ... and paid only for the calls a solved episode needs (the task's calls_needed, where it
    # knows them): at most tool_success x calls_needed, so a call beyond the solution never pays
    tool_success_needed_only: bool = False
    format_penalty: float = -0.2  # no parsable <answer> at the end of the episode
    functions: list[dict] = field(default_factory=list)  # [{"name": "module:fn", "weight": 1.0}]


@dataclass
class GRPOConfig:
    steps: int = 60
    prompts_per_step: int = 16
    num_generations: int = 8
    max_new_tokens: int = 64  # per assistant turn
    max_turns: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    learning_rate: float = 1e-4
    kl_coef: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    # the sampler's arithmetic is not the training pass's (bf16, kernels): the ratio's old log-probs
    # come from the training pass, and each token's loss is weighted by min(pi_old / pi_sampler, cap)
    # (truncated importance sampling; TRL's vllm_importance_sampling_correction)
    importance_sampling_correction: bool = True
    importance_sampling_cap: float = 2.0
    num_iterations: int = 1  # mu: optimisation epochs over each batch of rollouts
    minibatch_size: int = 64  # trajectories per optimiser step
    micro_batch_size: int = 0  # trajectories per forward pass (gradient accumulation); 0 = minibatch_size
    gradient_checkpointing: bool = False
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    credit: Literal["trajectory", "turn"] = "trajectory"
    gamma: float = 1.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    log_every: int = 1
    save_every: int = 20
    n_samples_logged: int = 4
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class EvalConfig:
    split: str = "test"
    limit: int = 300
    batch_size: int = 128
    max_new_tokens: int = 64
    max_turns: int = 3


@dataclass
class DoctorConfig:
    enabled: bool = True
    auto_fix: bool = False


@dataclass
class PPOConfig:
    """The `ppo` stage (recipes/ppo.py); names match GRPOConfig where the meaning does."""
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
    # as in GRPO: old log-probs from the training pass, each token weighted by min(pi_old / pi_sampler, cap)
    importance_sampling_correction: bool = True
    importance_sampling_cap: float = 2.0
    num_iterations: int = 2  # mu: optimisation epochs over each batch of rollouts
    minibatch_size: int = 32  # episodes per optimiser step
    micro_batch_size: int = 0  # episodes per forward pass (gradient accumulation); 0 = minibatch_size
    gradient_checkpointing: bool = False
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
    warmup_steps: int = 0
    log_every: int = 1
    save_every: int = 20
    n_samples_logged: int = 4
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())
    reward: RewardConfig = field(default_factory=lambda: RewardConfig())


@dataclass
class RMConfig:
    """The `rm` stage (recipes/rm.py), a Bradley-Terry reward model; names follow TRL's RewardConfig
    where it has one (center_rewards_coefficient, max_length)."""
    data: str | None = None  # JSONL {"prompt", "chosen", "rejected"[, "margin"]}, text or messages; None = generated pairs
    test_data: str | None = None  # held-out JSONL; None = generated test pairs (or 10% of `data`)
    n_pairs: int = 400  # generated training pairs, one per train problem
    n_test_pairs: int = 200  # generated held-out pairs, from the task's test split
    corruptions: list[str] = field(default_factory=lambda: ["wrong_number", "wrong_answer", "missing_answer", "malformed_call"])  # the task's kinds of rejected answers
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
    save_every: int = 50  # optimiser steps between checkpoints a killed run resumes from; 0 = only the final one
    eval_batch_size: int = 64
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())  # LoRA (task SEQ_CLS, score head trained) or full


@dataclass
class RuntimeConfig:
    """Where and how the tensors compute; every stage reads it (steprl/runtime.py)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    # bf16 = autocast with fp32 master weights and optimizer state; log-probs from fp32 logits
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    threads: int = 0  # torch threads on the CPU; 0 = all cores
    # on a multi-process launch, what each rank keeps 1/world_size of (docs/scaling.md):
    # 0 = nothing (whole copies), 1 = AdamW's moments (torch's ZeroRedundancyOptimizer, every stage),
    # 2 / 3 = parameters, gradients and moments (FSDP, every stage): 3 frees each block's
    # gathered weights after its forward, 2 keeps them for the backward
    zero_stage: Literal[0, 1, 2, 3] = 0


@dataclass
class RolloutConfig:
    """Which engine samples episodes (steprl/rollout/): native = our batched KV-cache engine for
    Llama-family models on the CPU; hf = transformers' generate, any causal LM on any device."""
    engine: Literal["auto", "native", "hf"] = "auto"  # auto: native where it supports model and device
    # free the heap's pages back to the OS before each rollout (native engine on glibc):
    # a lower peak RSS, paid for by page faults in the next training passes
    release_memory: bool = False
    tool_workers: int = 8  # threads that run the tools of the turns ending at one decode step
    # a tool call still running after this many seconds is abandoned and answers "Error: ... timed
    # out" (a failed call; the episode goes on); 0 = wait forever
    tool_timeout_s: float = 10.0
    # the sampler's precision; auto = runtime.precision's choice. bf16: the native engine's weights
    # and KV cache in bf16 (half the bytes per decode step), the hf engine under autocast.
    # Evaluation always decodes in fp32, so that accuracies compare across precisions.
    precision: Literal["auto", "fp32", "bf16"] = "auto"




@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["pretrain", "sft", "grpo"])
    eval_after: list[str] = field(default_factory=lambda: ["pretrain", "sft", "grpo"])
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    task: TaskConfig = field(default_factory=TaskConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ----------------------------------------------------------------------------- parsing

def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed (allowed: {', '.join(map(repr, args))})")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # a str too: YAML 1.1 reads "5e-3" as a string
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        if number is not None:
            return number
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown key {full!r} (allowed: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def validate(cfg: RunConfig) -> RunConfig:
    """Checks that span fields: values that parse but make no sense."""
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"stages: unknown stage {bad[0]!r} (allowed: {', '.join(STAGES)})")
    bad = [s for s in cfg.eval_after if s not in STAGES]
    if bad:
        raise ConfigError(f"eval_after: unknown stage {bad[0]!r} (allowed: {', '.join(STAGES)})")
    g = cfg.grpo
    positive = {"grpo.steps": g.steps, "grpo.prompts_per_step": g.prompts_per_step,
                "grpo.max_new_tokens": g.max_new_tokens, "grpo.max_turns": g.max_turns,
                "grpo.num_iterations": g.num_iterations, "grpo.minibatch_size": g.minibatch_size,
                "pretrain.steps": cfg.pretrain.steps, "pretrain.batch_size": cfg.pretrain.batch_size,
                "sft.batch_size": cfg.sft.batch_size, "eval.batch_size": cfg.eval.batch_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if g.num_generations < 2:
        raise ConfigError(f"grpo.num_generations: must be >= 2 (GRPO compares answers in a group), got {g.num_generations}")
    if g.temperature <= 0:
        raise ConfigError(f"grpo.temperature: must be > 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"grpo.top_p: must be in (0, 1], got {g.top_p}")
    if not 0 <= g.gamma <= 1:
        raise ConfigError(f"grpo.gamma: must be in [0, 1], got {g.gamma}")
    if not g.importance_sampling_cap >= 1:
        raise ConfigError(f"grpo.importance_sampling_cap: must be >= 1, got {g.importance_sampling_cap}")
    p, r = cfg.ppo, cfg.rm
    positive = {"ppo.steps": p.steps, "ppo.prompts_per_step": p.prompts_per_step,
                "ppo.num_generations": p.num_generations, "ppo.max_new_tokens": p.max_new_tokens,
                "ppo.max_turns": p.max_turns, "ppo.num_iterations": p.num_iterations,
                "ppo.minibatch_size": p.minibatch_size, "rm.epochs": r.epochs, "rm.batch_size": r.batch_size,
                "rm.max_length": r.max_length, "rm.eval_batch_size": r.eval_batch_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.rollout.tool_timeout_s < 0:
        raise ConfigError(f"rollout.tool_timeout_s: must be >= 0 (0 = no limit), got {cfg.rollout.tool_timeout_s}")
    if not 0 <= cfg.sft.warmup_ratio < 1:
        raise ConfigError(f"sft.warmup_ratio: must be in [0, 1), got {cfg.sft.warmup_ratio}")
    if not 0 <= cfg.sft.no_tool_fraction <= 1:
        raise ConfigError(f"sft.no_tool_fraction: must be in [0, 1], got {cfg.sft.no_tool_fraction}")
    if not r.data and r.n_pairs < 1:
        raise ConfigError(f"rm.n_pairs: must be >= 1 when rm.data is not set, got {r.n_pairs}")
    if not r.corruptions:
        raise ConfigError("rm.corruptions: must name at least one of the task's corruptions")
    if r.type == "implicit" and r.pooling != "last":
        raise ConfigError("rm.pooling: applies to rm.type classifier only (an implicit RM sums log-ratios over the assistant's tokens)")
    if r.type == "implicit" and not r.beta > 0:
        raise ConfigError(f"rm.beta: must be > 0, got {r.beta}")
    for key, value in {"ppo.gamma": p.gamma, "ppo.gae_lambda": p.gae_lambda}.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}: must be in [0, 1], got {value}")
    if p.temperature <= 0:
        raise ConfigError(f"ppo.temperature: must be > 0, got {p.temperature}")
    if not p.importance_sampling_cap >= 1:
        raise ConfigError(f"ppo.importance_sampling_cap: must be >= 1, got {p.importance_sampling_cap}")
    if p.adaptive_kl and not (p.target_kl > 0 and p.kl_horizon > 0):
        raise ConfigError("ppo.target_kl and ppo.kl_horizon: must be > 0 with ppo.adaptive_kl")
    if p.kl_coef < 0 or p.vf_coef < 0 or p.value_clip <= 0:
        raise ConfigError("ppo.kl_coef and ppo.vf_coef must be >= 0 and ppo.value_clip > 0")
    for key, lr in {"pretrain": cfg.pretrain.learning_rate, "sft": cfg.sft.learning_rate,
                    "grpo": g.learning_rate, "ppo": p.learning_rate, "rm": r.learning_rate}.items():
        if not lr > 0:
            raise ConfigError(f"{key}.learning_rate: must be > 0, got {lr}")
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. grpo.learning_rate=5e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a date like 2020-13-45
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply `a.b=value` overrides, build and check the typed config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: a date like 2020-13-45
            raise ConfigError(f"{path}: not valid YAML ({(str(err).splitlines() or [''])[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:  # absent, or an empty section ("grpo:" with nothing under it)
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return validate(_build(RunConfig, data))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

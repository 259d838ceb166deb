"""Load, wrap and save policies. Everything is a Hugging Face directory on disk.

A stage's checkpoint is either a full model (pretrain, full fine-tuning) or a PEFT adapter whose
`adapter_config.json` names its base. `load_policy` accepts either (and aliases such as
"smollm2") and returns a plain model: adapters from an earlier stage are merged in, so the next
stage starts from one set of weights and its own LoRA (if any) has that as its reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steprl.config import LoraConfig


def resolve(name_or_path: str) -> str:
    """A local model directory, or an alias converted once and cached (see models.hub)."""
    path = Path(name_or_path)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return str(path)
    if (path / "checkpoint").is_dir():  # a stage directory
        return resolve(str(path / "checkpoint"))
    from steprl.models.hub import resolve_model_path

    return resolve_model_path(name_or_path)


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(name_or_path: str):
    """(model, tokenizer) in fp32, train mode off; PEFT adapters merged into their base."""
    path = resolve(name_or_path)
    adapter_cfg = Path(path) / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        base, _ = load_policy(base_path)
        # PEFT froze the base; merged, it is a plain model again, trainable like a full checkpoint
        model = PeftModel.from_pretrained(base, path).merge_and_unload().requires_grad_(True)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, load_tokenizer(path)


def apply_lora(model, lora: LoraConfig):
    """Wrap `model` with a fresh LoRA adapter; the frozen base doubles as the KL reference."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                              modules_to_save=list(lora.modules_to_save) or None,
                              ensure_weight_tying=tied and bool(lora.modules_to_save))
    return get_peft_model(model, peft_cfg)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (its LoRA layers still active), or the model."""
    return model.get_base_model() if is_peft(model) else model


def forward_with_hidden(model, **inputs):
    """(model(**inputs), the decoder's last hidden state [B, T, H]): the trunk's output taken on its
    way to the head, through the model's own forward, so that FSDP gathers a sharded model's weights
    (calling the decoder directly would skip the embeddings' gather)."""
    trunk = []
    hook = unwrap_peft(model).get_decoder().register_forward_hook(
        lambda module, args, out: trunk.append(out.last_hidden_state))
    try:
        out = model(**inputs)
    finally:
        hook.remove()
    return out, trunk[0]


def save_checkpoint(model, tokenizer, directory: Path, base_path: str | None = None,
                    state_dict: dict | None = None) -> None:
    """Hugging Face format: the full model, or the adapter with an absolute base path.
    `state_dict`: the model's whole weights when its own are sharded over ranks (FSDP)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    if is_peft(model) and base_path is not None:
        cfg_path = directory / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(Path(base_path).resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2))

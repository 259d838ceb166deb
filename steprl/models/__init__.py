"""Models: the embedded tiny Llama, real Hugging Face models (local dirs or aliases), LoRA."""
from steprl.models.hub import KNOWN_ALIASES, cache_dir, load_causal_lm, resolve_model_path
from steprl.models.loading import apply_lora, is_peft, load_policy, resolve, save_checkpoint

__all__ = ["KNOWN_ALIASES", "cache_dir", "load_causal_lm", "resolve_model_path", "apply_lora", "is_peft",
           "load_policy", "resolve", "save_checkpoint"]

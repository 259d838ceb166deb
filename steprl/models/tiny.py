"""The embedded default model: a tiny Llama initialised from scratch and a BPE tokenizer trained
on the task's own text. Both are plain Hugging Face objects, saved with `save_pretrained`.

The tokenizer splits digits one by one, so copying a number from the question into a tool call
is copying digits, which small attention models learn sooner than copying rare multi-digit tokens
(measured: 3-digit chunks copied worse at equal tokens, see docs/experiments.md). It is byte-level,
so any text round-trips. Its ChatML template knows the system,
user, assistant and tool roles.

The template writes a tool message's content after a space (`<|im_start|>tool\n 17`): the model
copies the result into its answer, and in the pretraining prose every number it learned to copy
from follows ' ' ("... = 17. The answer is 17."); after '\n' it never does. One fresh pipeline
without the space copied every call right and most results wrong (SFT 0.16; docs/experiments.md,
"The token before a copied number"). The calc task's calls get the same treatment (`tasks.calc.tool_call_text`).
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (' ' if message['role'] == 'tool' else '') + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit pre-tokenisation, wrapped for transformers.
    `texts` are strings or chats (lists of messages, rendered as ChatML)."""
    texts = [t if isinstance(t, str) else render_chatml(t) for t in texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token=None, additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        chat_template=CHATML_TEMPLATE, padding_side="left", model_max_length=1024,
    )


def tiny_llama(tokenizer, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
               intermediate_size: int | None = None, max_position_embeddings: int = 512,
               seed: int = 0) -> LlamaForCausalLM:
    """A small Llama with tied embeddings, fp32, initialised from `seed`."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def render_chatml(messages: list[dict]) -> str:
    """The same text CHATML_TEMPLATE renders; used to train the tokenizer before it exists."""
    return "".join(f"<|im_start|>{m['role']}\n{' ' if m['role'] == 'tool' else ''}{m['content']}<|im_end|>\n"
                   for m in messages)

"""The `hf` rollout engine: transformers' `generate`, for any causal LM on any device.

Each turn is one `generate` call over the rows' whole contexts (left-padded), so it works for
every architecture and cache transformers supports, at the price of prefilling each context
again every turn (the native engine keeps its cache across turns). Log-probs are taken from the
raw logits in fp32, log_softmax(logits / T) at the sampled token, as the training pass computes
them; top-k / top-p only choose which tokens can be drawn. Sampling draws from torch's global
generator on the model's device, seeded from the caller's `generator`, so a seed gives the same
episodes twice. In bf16 it generates under bf16 autocast (the model's weights stay fp32).
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig

from steprl.rollout.engine import Turn, TurnBatches
from steprl.rollout.sampling import SamplingParams, StopChecker, left_pad


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, precision: str = "fp32"):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision

    def start(self, prompts: list[list[int]], params: SamplingParams, generator=None) -> TurnBatches:
        return TurnBatches(self, prompts, params, generator)

    def sleep(self) -> None:
        pass  # it holds nothing between rollouts

    def sync_weights(self) -> None:
        pass  # it samples from the trained model itself

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, generator=None) -> list[Turn]:
        """One turn per prompt: the sampled ids up to and including the EOS or the stop string's
        last token, their log-probs, and why the turn ended."""
        tok, model = self.tokenizer, self.model
        stop = StopChecker.cached(tok, params.stop_strings)
        device = next(model.parameters()).device
        ids, mask, _ = left_pad(prompts, tok.pad_token_id)
        greedy = params.temperature == 0
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
            top_k=None if greedy or not params.top_k else params.top_k,
            eos_token_id=sorted(stop.eos_ids), pad_token_id=tok.pad_token_id,
            stop_strings=list(params.stop_strings) or None, output_logits=True, return_dict_in_generate=True)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 tokenizer=tok)
        new = out.sequences[:, ids.shape[1]:].cpu()
        logits = torch.stack(out.logits, dim=1).float()  # [B, steps, V], raw: before any warper
        if not greedy:
            logits = logits / params.temperature
        logps = torch.log_softmax(logits, dim=-1).gather(-1, new[:, :, None].to(logits.device)).squeeze(-1).cpu()
        return [self._turn(new[i].tolist(), logps[i].tolist(), stop, params) for i in range(len(prompts))]

    @staticmethod
    def _turn(tokens: list[int], logps: list[float], stop: StopChecker, params: SamplingParams) -> Turn:
        """Cut a row where its turn ended: generate pads finished rows up to the longest."""
        for j, token in enumerate(tokens):
            if stop.is_eos(token):
                return Turn(tokens[:j + 1], logps[:j + 1], "eos")
            if stop.stop_strings and stop.hits_stop_string(tokens[:j + 1]):
                return Turn(tokens[:j + 1], logps[:j + 1], "stop")
        return Turn(tokens, logps, "length")

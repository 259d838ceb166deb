"""The `native` rollout engine: our batched KV-cache engine (rollout/sampling.py, decoder.py) behind
the seam of rollout/engine.py. Everything it does for the CPU's sake stays in here."""
from __future__ import annotations

import torch

from steprl.memory import release_free_memory
from steprl.rollout.decoder import LlamaDecoder
from steprl.rollout.engine import Turn
from steprl.rollout.sampling import NativeSession, SamplingParams, StopChecker


class NativeEngine:
    """Our engine (module docstring). `release_memory`: give the heap's free pages back to the OS
    before each rollout (glibc), so the rollout's packed weights do not come on top of the
    training passes' high-water mark; the next passes fault them in again. `dtype`: the decode
    steps' precision (bf16: bf16 weights and KV cache, `LlamaDecoder`)."""

    name = "native"

    def __init__(self, model, tokenizer, release_memory: bool = False, dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.release_memory, self.dtype = model, tokenizer, release_memory, dtype

    @staticmethod
    def supports(model, device: str = "cpu") -> bool:
        return device == "cpu" and LlamaDecoder.supports(model)

    def start(self, prompts: list[list[int]], params: SamplingParams, generator=None):
        if self.release_memory:
            release_free_memory()
        session = NativeSession(self.model, self.tokenizer, prompts, params,
                                StopChecker.cached(self.tokenizer, params.stop_strings), generator, self.dtype)
        return _TurnsOf(session)

    def sleep(self) -> None:
        LlamaDecoder.forget(self.model)  # its merged and packed weight copies: memory the passes need

    def sync_weights(self) -> None:
        LlamaDecoder.forget(self.model)  # rebuilt from the new weights at the next rollout


class _TurnsOf:
    """NativeSession's ended turns as (row, Turn)."""

    def __init__(self, session: NativeSession):
        self.session = session

    @property
    def live(self) -> int:
        return self.session.live

    def step(self) -> list[tuple[int, Turn]]:
        return [(row, Turn(tokens, logps, how)) for row, tokens, logps, how in self.session.step()]

    def resume(self, row: int, ids: list[int]) -> None:
        self.session.resume(row, ids)

    def finish(self, row: int) -> None:
        self.session.finish(row)

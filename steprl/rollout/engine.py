"""The seam between the agent loop and whatever samples tokens: token ids in, token ids out.

    engine.start(prompts, params, generator) -> session      one row per episode
    session.step() -> [(row, Turn)]                          the turns that ended
    session.resume(row, ids) | session.finish(row)           settle each before the next step
    engine.sleep()                                           free what sampling holds (before training)
    engine.sync_weights()                                    the policy's weights changed

A Turn is what the policy sampled in one assistant turn: its token ids, their log-probs under
softmax(logits / T) from fp32 logits, and why it ended ("eos", "stop" on a stop string, "length"
at max_new_tokens). Engines:

    native  our batched KV-cache engine for Llama-family models on the CPU (rollout/native.py over
            sampling.py and decoder.py): continuous batching across turns, shared-prefix and
            packed prefill, packed weights, fp32 or bf16 (`rollout.precision`); its memory handling
            lives there, not in the recipes.
    hf      transformers' `generate`, for any causal LM on any device (rollout/hf.py).

An engine that generates whole turns from token ids (hf; a vLLM engine would be one) gets its
sessions from `TurnBatches`: each step generates the next turn of every row waiting for one.
`steprl.rollout.make_engine` picks one by the config's `rollout.engine`.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Protocol

from steprl.rollout.sampling import SamplingParams


@dataclass
class Turn:
    ids: list[int]
    logps: list[float]
    finish: str  # "eos" | "stop" | "length"


class Session(Protocol):
    live: int  # episodes not finished

    def step(self) -> list[tuple[int, Turn]]: ...
    def resume(self, row: int, ids: list[int]) -> None: ...
    def finish(self, row: int) -> None: ...


class RolloutEngine(Protocol):
    name: str

    def start(self, prompts: list[list[int]], params: SamplingParams, generator=None) -> Session: ...
    def sleep(self) -> None: ...
    def sync_weights(self) -> None: ...


class TurnBatches:
    """A session over `engine.generate(contexts, params, generator) -> [Turn]`: rows waiting for a
    turn generate it together, each from its whole context (prompt, turns, observations)."""

    def __init__(self, engine, prompts: list[list[int]], params: SamplingParams, generator=None):
        self.engine, self.params, self.generator = engine, params, generator
        self.context = [list(p) for p in prompts]
        self.waiting = list(range(len(prompts)))  # rows that sample next
        self.live = len(prompts)

    def step(self) -> list[tuple[int, Turn]]:
        rows, self.waiting = self.waiting, []
        if not rows:
            raise RuntimeError("no row waits for a turn: resume() or finish() the ended ones")
        turns = self.engine.generate([self.context[r] for r in rows], self.params, self.generator)
        for r, turn in zip(rows, turns):
            self.context[r] += turn.ids
        return list(zip(rows, turns))

    def resume(self, row: int, ids: list[int]) -> None:
        self.context[row] += ids
        self.waiting.append(row)

    def finish(self, row: int) -> None:
        self.live -= 1

"""Multi-turn rollouts: many episodes advance together in one batched `generate`, each at its own turn.

Each trajectory is one flat token sequence after the prompt. Tokens the model sampled are kept
exactly as sampled (trained, mask 1, with their log-probs); the turn's closing tokens, the tool
messages and the next assistant header are rendered by the chat template and appended as
context (mask 0): observation tokens are never trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from steprl.envs.tool_env import ToolEnv
from steprl.rollout.sampling import SamplingParams, StopChecker, generate
from steprl.tasks.base import Problem

STOP_STRINGS = ("</tool_call>", "</answer>")


@dataclass
class Trajectory:
    problem: Problem
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the policy
    logps: list[float] = field(default_factory=list)  # sampling log-probs (0.0 where mask 0)
    turn_index: list[int] = field(default_factory=list)  # turn of each token (-1 for observations)
    turn_rewards: list[float] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    correct: bool = False
    answered: bool = False
    n_tool_calls: int = 0
    n_tool_failures: int = 0
    truncated: bool = False  # some turn hit max_new_tokens
    done: bool = False

    @property
    def reward(self) -> float:
        return sum(self.turn_rewards)

    @property
    def n_turns(self) -> int:
        return len(self.turn_rewards)

    def extend(self, ids, mask, logps, turn):
        self.ids += ids
        self.mask += [mask] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)
        self.turn_index += [turn if mask else -1] * len(ids)


class ChatRenderer:
    """Token ids for prompts and for what follows an assistant turn, from the model's own template."""

    def __init__(self, tokenizer, tools_schema: list[dict] | None = None):
        self.tok = tokenizer
        self.tools_schema = tools_schema
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "@@END@@"}]
        rendered = self._render(probe, add_generation_prompt=False)
        self.turn_end = rendered.split("@@END@@", 1)[1]  # e.g. "<|im_end|>\n"
        self._probe = probe
        self._probe_text = rendered

    def _render(self, messages, add_generation_prompt):
        kwargs = {"tools": self.tools_schema} if self.tools_schema else {}
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self._render(messages, add_generation_prompt=True))

    def observation_ids(self, tool_messages: list[dict], finished_with_eos: bool) -> list[int]:
        """Closing of the assistant turn (the part not sampled) + tool messages + next header."""
        full = self._render(self._probe + tool_messages, add_generation_prompt=True)
        after = full[len(self._probe_text):]
        closing = self.turn_end
        if finished_with_eos and self.tok.eos_token and closing.startswith(self.tok.eos_token):
            closing = closing[len(self.tok.eos_token):]
        return self.encode(closing + after)

    def conversation_ids(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation, segmented exactly as a rollout produces it:
        prompt, then per assistant turn its content + EOS (mask 1) and what follows (mask 0)."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise ValueError("conversation has no assistant message to train on")
        ids = self.prompt_ids(messages[: turns[0]])
        mask = [0] * len(ids)
        for k, i in enumerate(turns):
            sampled = self.encode(messages[i]["content"]) + [self.tok.eos_token_id]
            ids += sampled
            mask += [1] * len(sampled)
            if k + 1 < len(turns):
                obs = self.observation_ids(messages[i + 1: turns[k + 1]], finished_with_eos=True)
                ids += obs
                mask += [0] * len(obs)
        return ids, mask


def run_episodes(model, tokenizer, envs: list[ToolEnv], problems: list[Problem],
                 params: SamplingParams, renderer: ChatRenderer | None = None,
                 generator=None, max_context: int | None = None) -> list[Trajectory]:
    """Play one episode per (env, problem), all in one batched `generate`: when an episode's turn
    ends, its environment steps right away and the observation tokens are fed into the same row
    (continuous batching across turns; nothing is prefilled twice)."""
    renderer = renderer or ChatRenderer(tokenizer)
    params = SamplingParams(**{**params.__dict__, "stop_strings": STOP_STRINGS})
    stop = StopChecker(tokenizer, params.stop_strings)
    trajs = []
    for env, problem in zip(envs, problems):
        messages = env.reset(problem)
        trajs.append(Trajectory(problem, renderer.prompt_ids(messages), messages=list(messages)))

    def turn_end(i: int, tokens: list[int], logps: list[float], how: str) -> list[int] | None:
        """The environment's step after episode i's turn: the tokens to feed next, or None when it ends."""
        traj, env = trajs[i], envs[i]
        turn = traj.n_turns
        traj.extend(tokens, 1, logps, turn)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        traj.turn_texts.append(text)
        traj.messages.append({"role": "assistant", "content": text})
        traj.truncated |= how == "length"
        result = env.step(text)
        traj.turn_rewards.append(result.reward)
        too_long = max_context is not None and len(traj.prompt_ids) + len(traj.ids) >= max_context
        if result.done or too_long:
            traj.done = True
            traj.correct, traj.answered = env.correct, env.answer is not None
            traj.n_tool_calls, traj.n_tool_failures = env.n_calls, env.n_failures
            return None
        traj.messages += result.observation
        observation = renderer.observation_ids(result.observation, how == "eos")
        traj.extend(observation, 0, None, turn)
        return observation

    generate(model, tokenizer, [t.prompt_ids for t in trajs], params, stop, generator, on_turn_end=turn_end)
    return trajs

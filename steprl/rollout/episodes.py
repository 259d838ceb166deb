"""Multi-turn rollouts: the agent loop (`run_episodes`), over any rollout engine, many episodes at once.

Each trajectory is one flat token sequence after the prompt. Tokens the model sampled are kept
exactly as sampled (trained, mask 1, with their log-probs); the turn's closing tokens, the tool
messages and the next assistant header are rendered by the chat template and appended as
context (mask 0): observation tokens are never trained on.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from steprl.envs.tool_env import ToolEnv
from steprl.rollout.chat import ChatRenderer
from steprl.rollout.sampling import SamplingParams
from steprl.tasks.base import Problem

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

    def add_turn(self, turn, text: str, reward: float) -> None:
        """An assistant turn the policy sampled (an engine's Turn), decoded, and its reward."""
        self.extend(turn.ids, 1, turn.logps, self.n_turns)
        self.turn_texts.append(text)
        self.messages.append({"role": "assistant", "content": text})
        self.truncated |= turn.finish == "length"
        self.turn_rewards.append(reward)

    def end(self, env: ToolEnv) -> None:
        self.done = True
        self.correct, self.answered = env.correct, env.answer is not None
        self.n_tool_calls, self.n_tool_failures = env.n_calls, env.n_failures

    def extend(self, ids, mask, logps, turn):
        self.ids += ids
        self.mask += [mask] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)
        self.turn_index += [turn if mask else -1] * len(ids)


def run_episodes(engine, tokenizer, envs: list[ToolEnv], problems: list[Problem], params: SamplingParams,
                 renderer: ChatRenderer | None = None, generator=None, max_context: int | None = None,
                 tool_workers: int = 8) -> list[Trajectory]:
    """The agent loop: one episode per (env, problem), all advancing together.

        s_0 = env.reset(problem)                           every episode's prompt
        loop: the engine samples until some turns end     a_t, with its log-probs
              env.step(a_t) for each ended turn            tools run, reward r_t, o_{t+1}
              o_{t+1}'s tokens appended with mask 0        never trained on
              the episode goes on with them, or ends       answer, no call, max_turns, max_context

    The tools of the turns that end at one engine step run concurrently in a thread pool
    (`tool_workers`): slow tools (a sandboxed interpreter) overlap instead of adding up, and
    never run inside a decode step. The loop waits for them before the engine steps again,
    which keeps a seed's episodes the same from run to run.
    """
    renderer = renderer or ChatRenderer(tokenizer)
    if not params.stop_strings and envs:  # a turn ends where the environment's protocol says
        params = replace(params, stop_strings=tuple(envs[0].stop_strings))
    trajs = []
    for env, problem in zip(envs, problems):
        messages = env.reset(problem)
        trajs.append(Trajectory(problem, renderer.prompt_ids(messages), messages=list(messages)))
    session = engine.start([t.prompt_ids for t in trajs], params, generator)
    with ThreadPoolExecutor(tool_workers) as pool:
        while session.live:
            ended = session.step()
            texts = [tokenizer.decode(turn.ids, skip_special_tokens=True) for _, turn in ended]
            steps = [(envs[row].step, text) for (row, _), text in zip(ended, texts)]
            results = list(pool.map(lambda a: a[0](a[1]), steps)) if len(steps) > 1 else [f(x) for f, x in steps]
            for (row, turn), text, result in zip(ended, texts, results):
                traj = trajs[row]
                traj.add_turn(turn, text, result.reward)
                too_long = max_context is not None and len(traj.prompt_ids) + len(traj.ids) >= max_context
                if result.done or too_long:
                    traj.end(envs[row])
                    session.finish(row)
                    continue
                traj.messages += result.observation
                observation = renderer.observation_ids(result.observation, turn.finish == "eos")
                traj.extend(observation, 0, None, traj.n_turns - 1)
                session.resume(row, observation)
    return trajs

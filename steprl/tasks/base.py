"""What a task is: problems with checkable answers, a system prompt, tools, and data for each stage."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # canonical final answer, e.g. "42"
    meta: dict = field(default_factory=dict)


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer> in `text`, or None."""
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def to_number(text: str | None) -> Fraction | None:
    """Parse '1,234', '$12', '12.50', '-3' into an exact Fraction; None when it is not a number."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, expected: str, rel_tol: float = 0.0) -> bool:
    """Numeric comparison when both parse as numbers (exact, or within rel_tol), else exact text."""
    if predicted is None:
        return False
    p, e = to_number(predicted), to_number(expected)
    if p is None or e is None:
        return predicted.strip() == expected.strip()
    if rel_tol == 0.0:
        return p == e
    return abs(p - e) <= rel_tol * max(abs(e), 1)


class Task:
    """A task gives problems by split, checks answers, and names its tools.

    Subclasses set `name`, `system_prompt`, `tool_names` and implement `problems`.
    `cold_start` (successful trajectories as chat messages) and `pretrain_corpus`
    (plain text) are optional: only tasks that feed those stages need them.
    A task with no tools and `max_turns = 1` is single-turn (PBRFT): the environment caps every
    episode at its `max_turns` whatever the run's config says. `turns_needed` is how many turns
    a solved episode takes; a run allowing fewer gets a warning (it could never succeed).
    """

    name = "task"
    system_prompt = ""
    tool_names: tuple[str, ...] = ()
    max_turns: int | None = None  # hard cap on turns per episode; None = the config decides
    turns_needed: int = 1

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        raise NotImplementedError

    def check(self, problem: Problem, completion: str) -> bool:
        return answers_match(extract_answer(completion), problem.answer)

    def prompt_messages(self, problem: Problem) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": problem.question}]

    def cold_start(self, n: int, seed: int = 0) -> list[list[dict]]:
        raise NotImplementedError(f"task '{self.name}' has no cold-start trajectories")

    def pretrain_corpus(self, n_docs: int, seed: int = 0) -> list[str | list[dict]]:
        """Documents: plain strings, or chats (lists of messages) that the pretrain stage renders
        with the model's own chat template."""
        raise NotImplementedError(f"task '{self.name}' has no pretraining corpus")

"""What a task is: problems with checkable answers, and the protocol the model speaks for them.

A task owns its protocol; nothing outside tasks/ knows it: the system prompt and the answer
format, the stop strings that end a turn, how an answer is found in the model's text and
checked, the worked trajectories of a cold start, and the corruptions that turn a solution into
a worse one for a reward model's preference pairs. The default protocol is the Hermes/Qwen tool
call (`<tool_call>{...}</tool_call>`) and a final `<answer>...</answer>`."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

from steprl.tools import execute_tool_call, parse_tool_calls

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_EXPONENT_DIGITS = 3  # "1e999" is a number; "1e999999999" is not an answer, and Fraction would build it


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # canonical final answer, e.g. "42"
    meta: dict = field(default_factory=dict)


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer> in `text`, stripped, or None.

    str.find rather than a regex: `<answer>\\s*(.*?)\\s*</answer>` backtracks cubically on an
    "<answer>" followed by whitespace with no closing tag (minutes for 5,000 spaces)."""
    found, pos = None, 0
    while (start := text.find(ANSWER_OPEN, pos)) != -1:
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end == -1:  # no closing tag after this one, so none after any later one either
            break
        found, pos = text[start + len(ANSWER_OPEN):end], end + len(ANSWER_CLOSE)
    return None if found is None else found.strip()


def to_number(text: str | None) -> Fraction | None:
    """Parse '1,234', '$12', '12.50', '-3' into an exact Fraction; None when it is not a number."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    exponent = cleaned.lower().partition("e")[2]
    if len(exponent.lstrip("+-").lstrip("0")) > MAX_EXPONENT_DIGITS:
        return None
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
    answer_format = "Give the final answer as <answer>NUMBER</answer>."  # told to models not trained on it
    stop_strings: tuple[str, ...] = ("</tool_call>", "</answer>")  # a turn ends on these (or EOS)
    tool_names: tuple[str, ...] = ()
    max_turns: int | None = None  # hard cap on turns per episode; None = the config decides
    turns_needed: int = 1
    corruptions: tuple[str, ...] = ("wrong_number", "wrong_answer", "missing_answer", "malformed_call")

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        raise NotImplementedError

    def extract_answer(self, text: str) -> str | None:
        """The final answer in a turn's text, or None when it gives none."""
        return extract_answer(text)

    def check(self, problem: Problem, completion: str) -> bool:
        return answers_match(self.extract_answer(completion), problem.answer)

    def check_lenient(self, problem: Problem, completion: str) -> bool:
        """What a lenient grader accepts (answers outside the requested format); strict by default."""
        return self.check(problem, completion)

    def prompt_messages(self, problem: Problem) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": problem.question}]

    def solution_messages(self, problem: Problem) -> list[dict]:
        """A successful episode as chat messages: the prompt, tool calls and results, the answer."""
        raise NotImplementedError(f"task '{self.name}' has no worked solutions")

    def calls_needed(self, problem: Problem) -> int | None:
        """How many tool calls the problem's worked solution makes; None when the task has none."""
        try:
            solution = self.solution_messages(problem)
        except NotImplementedError:
            return None
        return None if solution is None else sum(m["role"] == "tool" for m in solution)

    def cold_start(self, n: int, seed: int = 0) -> list[list[dict]]:
        raise NotImplementedError(f"task '{self.name}' has no cold-start trajectories")

    def pretrain_corpus(self, n_docs: int, seed: int = 0) -> list[str | list[dict]]:
        """Documents: plain strings, or chats (lists of messages) that the pretrain stage renders
        with the model's own chat template."""
        raise NotImplementedError(f"task '{self.name}' has no pretraining corpus")

    def corrupt(self, solution: list[dict], kind: str, tools: dict, rng: random.Random) -> list[dict]:
        """A worse version of a solved episode [..prompt, call, tool result, answer], or of a
        single-turn one [..prompt, answer] (no call to corrupt, so the answer is):
            wrong_number    a number copied wrongly into the call (the tool computes garbage)
            wrong_answer    the right call, a wrong number in the answer
            missing_answer  the right number without the answer tag
            malformed_call  broken call JSON or no closing tag, then a guess"""
        if kind not in self.corruptions:
            raise ValueError(f"task '{self.name}': unknown corruption '{kind}' (allowed: {', '.join(self.corruptions)})")
        answer = extract_answer(solution[-1]["content"])
        wrong = _change_digit(answer, rng)
        if kind == "missing_answer":
            return solution[:-1] + [{"role": "assistant", "content": f"The answer is {answer}."}]
        if not any(m["role"] == "tool" for m in solution):  # single turn: a wrong worked answer
            text = solution[-1]["content"].replace(f"<answer>{answer}</answer>", f"<answer>{wrong}</answer>")
            if kind == "wrong_number":  # the worked result is wrong too, not only the copy of it
                text = text.replace(f"= {answer}", f"= {wrong}")
            return solution[:-1] + [{"role": "assistant", "content": text}]
        *prompt, call, _, final = solution
        if kind == "wrong_number":
            for _ in range(20):
                bad = _change_digit(call["content"], rng)
                result, ok = execute_tool_call(parse_tool_calls(bad)[0], tools)
                if ok and result != answer:
                    return prompt + [{"role": "assistant", "content": bad}, {"role": "tool", "content": result},
                                     {"role": "assistant", "content": f"<answer>{result}</answer>"}]
            kind = "wrong_answer"
        if kind == "wrong_answer":
            return solution[:-1] + [{"role": "assistant", "content": f"<answer>{wrong}</answer>"}]
        text = call["content"]
        bad = rng.choice([text.replace("}}", "}", 1), text.replace("</tool_call>", ""), text.replace('"', "'")])
        calls = parse_tool_calls(bad)
        error, _ = execute_tool_call(calls[0], tools) if calls else ("Error: no call", False)
        return prompt + [{"role": "assistant", "content": bad}, {"role": "tool", "content": error},
                         {"role": "assistant", "content": f"<answer>{wrong}</answer>"}]


def _change_digit(text: str, rng: random.Random) -> str:
    """One digit of one number in `text` replaced by another (no new leading zero)."""
    spans = [m.span() for m in re.finditer(r"\d+", text)]
    lo, hi = rng.choice(spans)
    i = rng.randrange(lo, hi)
    choices = [d for d in "0123456789" if d != text[i] and not (d == "0" and i == lo and hi - lo > 1)]
    return text[:i] + rng.choice(choices) + text[i + 1:]

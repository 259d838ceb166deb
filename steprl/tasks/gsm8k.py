"""GSM8K: grade-school math word problems with real calculator trajectories (Cobbe et al., 2021;
MIT licence, steprl/tasks/data/gsm8k/LICENSE).

Data: JSONL rows {"question", "answer"}, the answer a worked solution whose calculator steps are
written `<<48/2=24>>` and whose last line is `#### 72`. The train split ships with steprl
(`steprl/tasks/data/gsm8k/train.jsonl.gz`); `data=PATH` reads another file (the test split, say),
and `data=openai/gsm8k` loads a `datasets` hub id for users with a network.

Splits:
    train       the train split minus validation
    validation  VALIDATION_SIZE problems carved from train by a hash of the question: the same on
                every machine, never trained on; what stages evaluate on
    test        the file given as `data=PATH` (`steprl eval ... --data PATH`), else validation

The protocol is the calc task's: calculator calls `<tool_call>{...}</tool_call>`, then the final
answer `<answer>N</answer>`. A worked trajectory turns each `<<expr=result>>` into a call whose
observation is the calculator's own output (problems where it disagrees with the annotation are
dropped and counted in `dropped`); `tools=False` is the single-turn PBRFT arm: the solution's
chain of thought with the annotations removed, then the answer.

Grading: `check` is strict (`<answer>N</answer>`, the requested format, the headline);
`check_lenient` also accepts `#### N`, "the answer is N" and, last, the final number in the text.
Numbers compare exactly after normalisation: commas, `$`, `%`, units, a trailing `.0`, negatives
and simple fractions.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from fractions import Fraction
from pathlib import Path

from steprl.tasks.base import Problem, Task, extract_answer
from steprl.tools.calculator import calculator
from steprl.tools.parsing import format_tool_call

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl.gz"
VALIDATION_SIZE = 500
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
NUMBER = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")  # ".5" is 0.5, not 5
MINUS = "\u2212"  # the typographic minus sign, read as "-"
TOOL_PROMPT = ("Solve the problem. Use the calculator for the arithmetic, then give the final answer "
               "as <answer>NUMBER</answer>.")
DIRECT_PROMPT = "Solve the problem step by step, then give the final answer as <answer>NUMBER</answer>."


def to_number(text: str | None) -> Fraction | None:
    """'1,234', '$12.50', '-3', '45%', '7 apples', '5.0', '3/4' -> an exact Fraction; None otherwise."""
    if text is None:
        return None
    found = NUMBER.search(text.replace(MINUS, "-"))
    if found is None:
        return None
    cleaned = found.group().replace(",", "").replace("$", "")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(solution: str) -> str:
    """The number after '####' of a GSM8K solution, as written there (commas removed)."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def lenient_answer(text: str) -> str | None:
    """The answer a lenient grader reads: <answer>, '#### N', 'the answer is N', the last number."""
    tagged = extract_answer(text)
    if to_number(tagged) is not None:
        return tagged
    for pattern in (r"####\s*([^\n]+)", r"[Tt]he (?:final )?answer is[:\s]*([^\n]+)"):
        found = re.findall(pattern, text)
        if found and to_number(found[-1]) is not None:
            return found[-1]
    numbers = NUMBER.findall(text.replace(MINUS, "-"))
    return numbers[-1] if numbers else None


def same_number(predicted: str | None, expected: str) -> bool:
    p, e = to_number(predicted), to_number(expected)
    return p is not None and p == e


def agrees(tool_output: str, annotated: str) -> bool:
    """The calculator's output equals the annotation, to the decimals the annotation writes."""
    got, want = to_number(tool_output), to_number(annotated)
    if got is None or want is None or tool_output.startswith("Error"):
        return False
    decimals = len(annotated.strip().split(".", 1)[1]) if "." in annotated.strip() else 0
    return got == want or round(float(got), decimals) == float(want)


def read_rows(data: str | Path) -> list[dict]:
    """JSONL (plain or .gz) rows, or a `datasets` hub id's train split ("openai/gsm8k")."""
    path = Path(data)
    if path.is_file():
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(data)):
        from datasets import load_dataset

        rows = list(load_dataset(str(data), "main", split="train"))
    else:
        raise ValueError(f"gsm8k: data '{data}' is not a JSONL file or a datasets hub id")
    bad = [i for i, r in enumerate(rows, 1) if "question" not in r or "####" not in str(r.get("answer", ""))]
    if bad:
        raise ValueError(f"gsm8k: {data}: row {bad[0]} needs 'question' and an 'answer' ending in '#### N'")
    return rows


class Gsm8kTask(Task):
    name = "gsm8k"
    system_prompt = TOOL_PROMPT
    tool_names = ("calculator",)

    def __init__(self, data: str | None = None, tools: bool = True, train_data: str | None = None):
        if not isinstance(tools, bool):
            raise ValueError(f"gsm8k: tools must be true or false, got {tools!r}")
        self.data, self.use_tools = data, tools
        self.train_path = train_data or DATA
        if not tools:  # PBRFT: one turn, no calculator
            self.tool_names, self.system_prompt, self.max_turns = (), DIRECT_PROMPT, 1
        self.dropped = 0  # worked trajectories whose calculator output disagreed with the annotation
        self._splits: dict[str, list[Problem]] | None = None

    def _load(self) -> dict[str, list[Problem]]:
        if self._splits is None:
            rows = read_rows(self.train_path)
            problems = [self._problem(f"train-{i}", r) for i, r in enumerate(rows)]
            ranked = sorted(problems, key=lambda p: hashlib.sha256(p.question.encode()).hexdigest())
            held = {p.id for p in ranked[:VALIDATION_SIZE]}
            self._splits = {"validation": [p for p in problems if p.id in held],
                            "train": [p for p in problems if p.id not in held]}
            if self.data is not None:
                self._splits["test"] = [self._problem(f"test-{i}", r) for i, r in enumerate(read_rows(self.data))]
        return self._splits

    @staticmethod
    def _problem(pid: str, row: dict) -> Problem:
        solution = str(row["answer"])
        return Problem(pid, str(row["question"]), final_answer(solution),
                       {"solution": solution, "n_steps": len(ANNOTATION.findall(solution))})

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        splits = self._load()
        split = "test" if split == "test" and "test" in splits else "validation" if split == "test" else split
        if split not in splits:
            raise ValueError(f"gsm8k: unknown split '{split}' (allowed: train, validation, test)")
        problems = splits[split]
        if split == "train" and seed:  # another order of the same problems
            problems = sorted(problems, key=lambda p: hashlib.sha256(f"{seed}/{p.id}".encode()).hexdigest())
        return problems[:n] if n else list(problems)

    def check(self, problem: Problem, completion: str) -> bool:
        return same_number(self.extract_answer(completion), problem.answer)

    def check_lenient(self, problem: Problem, completion: str) -> bool:
        return same_number(lenient_answer(completion), problem.answer)

    def solution_messages(self, problem: Problem) -> list[dict] | None:
        """The annotated solution as an episode: text up to each <<expr=result>>, the calculator
        call, its real output as the tool's message, the text after it; then <answer>N</answer>.
        None when the calculator disagrees with an annotation (counted in `dropped`)."""
        body = problem.meta["solution"].rsplit("####", 1)[0].strip()
        final = f"<answer>{problem.answer}</answer>"
        if not self.use_tools:
            text = ANNOTATION.sub("", body)
            return self.prompt_messages(problem) + [{"role": "assistant", "content": f"{text} {final}"}]
        turns, start = [], 0
        for m in ANNOTATION.finditer(body):
            expression, annotated = m.group(1).strip(), m.group(2).strip()
            output = calculator(expression)
            if not agrees(output, annotated):
                self.dropped += 1
                return None
            text = body[start:m.start()]
            turns += [{"role": "assistant", "content": text + format_tool_call("calculator", {"expression": expression})},
                      {"role": "tool", "content": output}]
            start = m.end()
        return self.prompt_messages(problem) + turns + [{"role": "assistant", "content": f"{body[start:]} {final}"}]

    def calls_needed(self, problem: Problem) -> int:
        """The calculator annotations of the reference solution (one call each)."""
        return problem.meta["n_steps"] if self.use_tools else 0

    def cold_start(self, n: int, seed: int = 0) -> list[list[dict]]:
        out = []
        for p in self.problems("train", seed=seed):
            messages = self.solution_messages(p)
            if messages is not None:
                out.append(messages)
            if len(out) == n:
                break
        return out

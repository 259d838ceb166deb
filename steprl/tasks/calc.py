"""The embedded default task: arithmetic word problems solved with a calculator tool.

Problems chain 1-3 operations (+ - * /) on integers of up to 4 digits; every intermediate
result is a whole positive number. Each split is generated deterministically from its own
seed, and the training splits exclude every test question, so held-out accuracy is honest.

A solved episode looks like (ChatML):

    user:      Mia has 12 shells. She finds 5 more. Then she splits them into 3 equal groups
               and keeps one group. How many shells does Mia have now?
    assistant: <tool_call>{"name": "calculator", "arguments": {"expression": " (12 + 5) / 3"}}</tool_call>
    tool:      ...
    assistant: <answer>...</answer>

The model must copy the question's numbers into the call, pick the operators from the words
and copy the tool's result into the answer: the calculator does the arithmetic.

Variants, selected by task args, for the experiments in docs/experiments.md:

    tools=False           single-turn PBRFT: no tools, one turn (T = 1); the model writes
                          "We compute (12 + 5) / 3 = 6. <answer>6</answer>" and must do the
                          arithmetic itself. Same problems, same held-out split.
    one_call_per_op=True  one calculator call per operation: turn 1 `12 + 5` -> 17, turn 2
                          `17 / 3` -> 6, then the answer: a 3-op problem takes 3 calls and 4 turns,
                          so per-turn (dense) rewards and credit assignment matter.
    cumulative=True       (with one_call_per_op) each call extends the previous one by an
                          operation: `12 + 5` -> 17, then `(12 + 5) / 3` -> 6. The calls are
                          prefixes of the chained expression that the demo's pretraining text
                          writes, so the k-th call needs no pointer to the question's k-th number.

And one for the pretraining text: quoted=True adds `The expression is "(12 + 5) / 3".` before
a fifth of the worked stories, so that a quote before a number is not first seen in a tool call
(docs/experiments.md, "The token before a copied number"). And varied=True (the demo's setting) frames half the
worked solutions differently ("Compute ...", 'The expression is " ..."', "Expression: ...", ...):
the pretrained model then copies the question's numbers in contexts other than "We compute",
which is what a tool call asks of it (cold start 0.91 and 0.95 from two pretraining runs,
against 0.16-0.60 without; docs/experiments.md, "The token before a copied number").
"""
from __future__ import annotations

import random
from fractions import Fraction

from steprl.tasks.base import Problem, Task
from steprl.tools.parsing import format_tool_call

NAMES = [("Sam", "He"), ("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Omar", "He"),
         ("Zoe", "She"), ("Ben", "He"), ("Lily", "She"), ("Noah", "He"), ("Emma", "She")]
ITEMS = ["apples", "coins", "stamps", "books", "shells", "marbles", "cards", "pens", "stones", "beads"]
OP_PHRASES = {
    "+": ["{he} finds {b} more.", "{he} buys {b} more.", "{he} gets {b} more."],
    "-": ["{he} gives away {b}.", "{he} sells {b}.", "{he} loses {b}."],
    "*": ["{he} ends up with {b} times as many.", "The number grows {b} times."],
    "/": ["{he} splits them into {b} equal groups and keeps one group.",
          "{he} keeps one out of every {b}."],
}
OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
# varied=True: half the worked solutions frame the expression differently, so that copying the
# question's numbers is learned in more contexts than after "We compute"
FRAMINGS = ['Compute {e} = {a}. The answer is {a}.', 'The expression is " {e}", which is {a}.',
            'Expression: {e} = {a}.', '{e} = {a}. So {a}.', 'In numbers, {e} gives {a}.',
            'Write " {e}" and get {a}.', 'It is {e}, that is {a}.']
MAX_VALUE = 10**7  # intermediate results stay below this so answers stay short
SYSTEM_PROMPT = "Use the calculator, then give the answer."
PER_OP_PROMPT = "Use the calculator for each step, then give the answer."
DIRECT_PROMPT = "Answer directly, without a calculator."
TEST_SEED, TRAIN_SEED = 1_000_003, 7


def _operand(rng: random.Random, low: int = 1) -> int:
    digits = rng.randint(1, 4)
    return rng.randint(max(low, 10 ** (digits - 1)), 10**digits - 1)


def _apply(op: str, x: int, y: int) -> Fraction:
    return {"+": Fraction(x + y), "-": Fraction(x - y), "*": Fraction(x * y), "/": Fraction(x, y)}[op]


def sample_chain(rng: random.Random, n_ops: int) -> tuple[int, list[tuple[str, int]], int] | None:
    """(start, [(op, operand)...], result) with whole positive intermediates, or None to retry."""
    value = start = _operand(rng)
    steps = []
    for _ in range(n_ops):
        op = rng.choice("+-*/")
        if op == "-":
            if value < 2:
                return None
            b = rng.randint(1, min(value - 1, 9999))
        elif op == "/":
            divisors = [d for d in range(2, min(value, 9999) + 1) if value % d == 0 and d != value]
            if not divisors:
                return None
            b = rng.choice(divisors)
        else:
            b = _operand(rng, low=2 if op == "*" else 1)
        result = _apply(op, value, b)
        if result.denominator != 1 or not 0 < result < MAX_VALUE:
            return None
        value = int(result)
        steps.append((op, b))
    return start, steps, value


def chain_expression(start: int, steps: list[tuple[str, int]]) -> str:
    """Left-to-right chain, earlier steps always parenthesised: ((a + b) * c) - d."""
    expr = str(start)
    for i, (op, b) in enumerate(steps):
        expr = f"({expr}) {op} {b}" if i > 0 else f"{expr} {op} {b}"
    return expr


def chain_steps(start: int, steps: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """One (expression, result) per operation: [("12 + 5", 17), ("17 / 3", 6)]."""
    out, value = [], start
    for op, b in steps:
        result = int(_apply(op, value, b))
        out.append((f"{value} {op} {b}", result))
        value = result
    return out


def tool_call_text(expression: str) -> str:
    """The calculator call of a worked trajectory, its expression written after a space:
    `{"expression": " (12 + 5) / 3"}`.

    The space is for the copy. Pretraining prose writes "We compute (12 + 5) / 3", so the first
    number follows the token ' (' (or ' ((' or ' '); written as `"(12`, the call would put it
    after ' "(', a token that never precedes a number in pretraining, and the pretrained model
    miscopies exactly that number. Same pretrained model, same SFT: 0.54 held-out without the
    space, 0.81 with it (docs/experiments.md, "The token before a copied number"). The calculator
    strips the space.
    """
    return format_tool_call("calculator", {"expression": " " + expression})


def render_question(rng: random.Random, start: int, steps: list[tuple[str, int]]) -> str:
    name, he = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    sentences = [f"{name} has {start} {item}."]
    for i, (op, b) in enumerate(steps):
        phrase = rng.choice(OP_PHRASES[op]).format(he=he, b=b)
        sentences.append(("Then " + phrase[0].lower() + phrase[1:]) if i > 0 else phrase)
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences)


class CalcTask(Task):
    name = "calc"
    system_prompt = SYSTEM_PROMPT
    tool_names = ("calculator",)
    turns_needed = 2  # a call, then the answer

    def __init__(self, min_ops: int = 1, max_ops: int = 3, test_size: int = 500, tools: bool = True,
                 one_call_per_op: bool = False, quoted: bool = False, varied: bool = False,
                 cumulative: bool = False):
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"calc: need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
        for key, value in {"tools": tools, "one_call_per_op": one_call_per_op, "quoted": quoted,
                           "varied": varied, "cumulative": cumulative}.items():
            if not isinstance(value, bool):
                raise ValueError(f"calc: {key} must be true or false, got {value!r}")
        if cumulative and not one_call_per_op:
            raise ValueError("calc: cumulative applies to one_call_per_op only")
        self.min_ops, self.max_ops, self.test_size = min_ops, max_ops, test_size
        self.use_tools, self.one_call_per_op, self.quoted = tools, one_call_per_op, quoted
        self.varied, self.cumulative = varied, cumulative
        # per-op prose ("12 + 5 = 17. 17 / 3 = 6.") when the calls work one operation at a time on
        # the previous result; cumulative calls extend the chain, as the chained prose does
        self.per_op_prose = one_call_per_op and not cumulative
        if not self.use_tools:  # PBRFT: s_0 = prompt, one answer y, reward r(s_0, y)
            self.tool_names, self.system_prompt, self.max_turns, self.turns_needed = (), DIRECT_PROMPT, 1, 1
        elif self.one_call_per_op:
            self.system_prompt, self.turns_needed = PER_OP_PROMPT, max_ops + 1
        self._test: list[Problem] | None = None

    def _generate(self, seed: int, n: int, split: str, exclude: set[str]) -> list[Problem]:
        rng = random.Random(f"calc/{split}/{seed}/{self.min_ops}-{self.max_ops}")
        exclude = set(exclude)  # grows: no question twice within a split either
        out: list[Problem] = []
        while len(out) < n:
            chain = sample_chain(rng, rng.randint(self.min_ops, self.max_ops))
            if chain is None:
                continue
            start, steps, result = chain
            question = render_question(rng, start, steps)
            if question in exclude:
                continue
            exclude.add(question)
            meta = {"expression": chain_expression(start, steps), "n_steps": len(steps),
                    "start": start, "steps": steps}
            out.append(Problem(f"{split}-{seed}-{len(out)}", question, str(result), meta))
        return out

    def _test_problems(self) -> list[Problem]:
        if self._test is None:
            self._test = self._generate(TEST_SEED, self.test_size, "test", set())
        return self._test

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        if split == "test":
            problems = self._test_problems()
            return problems[:n] if n else problems
        if split != "train":
            raise ValueError(f"calc: unknown split '{split}' (allowed: train, test)")
        exclude = {p.question for p in self._test_problems()}
        return self._generate(TRAIN_SEED + seed, n or 1000, "train", exclude)

    def worked_solution(self, problem: Problem) -> str:
        """The arithmetic in words: "We compute (12 + 5) / 3 = 6." or, one operation at a time,
        "We compute 12 + 5 = 17. 17 / 3 = 6."."""
        if self.per_op_prose:
            return "We compute " + " ".join(f"{e} = {r}." for e, r in self._steps(problem))
        return f"We compute {problem.meta['expression']} = {problem.answer}."

    def _steps(self, problem: Problem) -> list[tuple[str, int]]:
        return chain_steps(problem.meta["start"], problem.meta["steps"])

    def _calls(self, problem: Problem) -> list[tuple[str, int]]:
        """(expression, result) of each calculator call of a worked trajectory."""
        if not self.one_call_per_op:
            return [(problem.meta["expression"], int(problem.answer))]
        if self.cumulative:  # "12 + 5" -> 17, then "(12 + 5) / 3" -> 6
            start, steps = problem.meta["start"], problem.meta["steps"]
            return [(chain_expression(start, steps[:k]), r)
                    for k, (_, r) in enumerate(self._steps(problem), 1)]
        return self._steps(problem)

    def solution_messages(self, problem: Problem) -> list[dict]:
        """A successful trajectory: the direct answer (no tools), one calculator call per
        operation (one_call_per_op), or one call with the chain expression; then the answer."""
        final = {"role": "assistant", "content": f"<answer>{problem.answer}</answer>"}
        if not self.use_tools:
            return self.prompt_messages(problem) + [
                {"role": "assistant", "content": f"{self.worked_solution(problem)} {final['content']}"}]
        turns = []
        for expression, result in self._calls(problem):
            turns += [{"role": "assistant", "content": tool_call_text(expression)},
                      {"role": "tool", "content": str(result)}]
        return self.prompt_messages(problem) + turns + [final]

    def cold_start(self, n: int, seed: int = 0) -> list[list[dict]]:
        return [self.solution_messages(p) for p in self.problems("train", n, seed=10_000 + seed)]

    def pretrain_corpus(self, n_docs: int, seed: int = 0) -> list[str | list[dict]]:
        """Text about numbers and arithmetic: worked stories (as prose, or as a user/assistant chat
        answered in words), and number facts. No tools and no tool protocol: calling the
        calculator is what cold-start SFT teaches. tools=False reads the same corpus as the agentic
        task, so both arms of the PBRFT-vs-agentic comparison pretrain on the same text;
        one_call_per_op works the problems one operation at a time, as its calls do (cumulative
        calls read the chained solutions, as the default does)."""
        rng = random.Random(f"calc/pretrain/{seed}")
        docs = []
        for p in self.problems("train", n_docs, seed=20_000 + seed):
            solution = f"{self.worked_solution(p)} The answer is {p.answer}."
            if self.varied and not self.per_op_prose and rng.random() < 0.5:
                solution = rng.choice(FRAMINGS).format(e=p.meta["expression"], a=p.answer)
            roll = rng.random()
            if self.quoted and roll < 0.2:  # the expression in quotes, as text quotes it (and a call will)
                docs.append(f'{p.question} The expression is "{p.meta["expression"]}". {solution}')
            elif roll < 0.4:
                docs.append(f"{p.question} {solution}")
            elif roll < 0.8:  # the same worked solution as a chat, rendered by the model's template
                docs.append([{"role": "user", "content": p.question},
                             {"role": "assistant", "content": f"{solution} <answer>{p.answer}</answer>"}])
            else:
                a, b = _operand(rng), _operand(rng)
                op = rng.choice("+-*")
                value = _apply(op, a, b)
                docs.append(f"{a} {OP_WORDS[op]} {b} is {value}. So {a} {op} {b} = {value}.")
        return docs

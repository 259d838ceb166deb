from fractions import Fraction

import pytest

from steprl.tasks import get_task
from steprl.tasks.base import answers_match, extract_answer
from steprl.tasks.calc import CalcTask, chain_expression
from steprl.tools import calculator


def test_deterministic_and_disjoint():
    a, b = CalcTask(), CalcTask()
    assert [p.question for p in a.problems("test", 50)] == [p.question for p in b.problems("test", 50)]
    test = {p.question for p in a.problems("test")}
    assert len(test) == 500
    train = a.problems("train", 3000)
    assert not test & {p.question for p in train}


def test_answers_are_whole_and_match_the_calculator():
    for p in CalcTask().problems("train", 500):
        assert 1 <= p.meta["n_steps"] <= 3
        assert calculator(p.meta["expression"]) == p.answer
        assert Fraction(p.answer).denominator == 1 and int(p.answer) > 0


def test_chain_expression_parenthesises_left_to_right():
    assert chain_expression(12, [("+", 5), ("*", 3), ("-", 4)]) == "((12 + 5) * 3) - 4"
    assert calculator("((12 + 5) * 3) - 4") == "47"


def test_answer_extraction_and_matching():
    assert extract_answer("so <answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("no answer") is None
    assert answers_match("1,234", "1234") and answers_match("12.0", "12")
    assert not answers_match("13", "12") and not answers_match(None, "12")


def test_cold_start_is_a_successful_tool_trajectory():
    conv = CalcTask().cold_start(1)[0]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool", "assistant"]
    assert "<tool_call>" in conv[2]["content"] and conv[4]["content"] == f"<answer>{conv[3]['content']}</answer>"


def test_unknown_task_and_split():
    import pytest

    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown split"):
        CalcTask().problems("valid")


def test_quoted_corpus_quotes_the_expression_and_changes_nothing_else():
    plain, quoted = CalcTask().pretrain_corpus(300), CalcTask(quoted=True).pretrain_corpus(300)
    said = [d for d in quoted if isinstance(d, str) and "The expression is" in d]
    assert 30 < len(said) < 90  # ~20% of the documents
    for doc in said:  # the quoted expression is the one the worked solution then computes
        expr = doc.split('The expression is "', 1)[1].split('"', 1)[0]
        assert f"We compute {expr} = " in doc
    assert not any(isinstance(d, str) and '"' in d for d in plain)  # pretraining shows no quote otherwise
    assert [p.question for p in CalcTask(quoted=True).problems("test")] == [p.question for p in CalcTask().problems("test")]
    with pytest.raises(ValueError, match="quoted must be true or false"):
        CalcTask(quoted="yes")


def test_a_calls_first_number_follows_a_token_that_precedes_numbers_in_pretraining(tiny):
    """The pretrained model copies the question's first number after ' (' / ' ((' / ' ' (prose:
    "We compute ((12 + 5) ..."). A call must put that number after one of those tokens, not after a
    quote merged with a parenthesis (' "(' never precedes a number in pretraining: the copy fails)."""
    _, tok, task = tiny

    def token_before_first_digit(text):
        pieces = [tok.decode([i]) for i in tok(text)["input_ids"]]
        return pieces[next(k for k, p in enumerate(pieces) if p.isdigit()) - 1]

    corpus = " ".join(d for d in task.pretrain_corpus(400) if isinstance(d, str))
    for p in task.problems("train", 30):
        call = task.solution_messages(p)[2]["content"]
        call_args = call.split('"expression":', 1)[1]
        before = token_before_first_digit(call_args)
        assert before == token_before_first_digit(f"We compute {p.meta['expression']}")
        assert before.strip() == "(" * (p.meta["n_steps"] - 1)
        assert before + p.meta["expression"].lstrip("(")[:1] in corpus  # seen before a digit in pretraining
        assert calculator(call_args.split('"')[1]) == p.answer  # the calculator strips the space


def test_varied_corpus_frames_the_same_expressions_differently():
    task, plain = CalcTask(varied=True), CalcTask()
    varied_docs = task.pretrain_corpus(400)
    texts = [d if isinstance(d, str) else d[1]["content"] for d in varied_docs]
    worked = [t for t in texts if " = " in t or " gives " in t or ", which is " in t]
    framed = [t for t in worked if "We compute" not in t and " plus " not in t and " minus " not in t
              and " times " not in t]
    assert 0.3 < len(framed) / len(worked) < 0.7  # about half the worked solutions
    assert len({f.split(" ", 1)[0] for f in framed}) >= 4  # several framings, not one
    problems = {p.question: p for p in plain.problems("train", 400, seed=20_000)}
    stories = 0
    for d in varied_docs:  # every story still carries its own expression and answer
        text = d if isinstance(d, str) else d[0]["content"] + " " + d[1]["content"]
        question = next((q for q in problems if text.startswith(q)), None)
        if question is not None:
            stories += 1
            assert problems[question].meta["expression"] in text and problems[question].answer in text
    assert stories > 250
    assert any(' " (' in t or ' " ' in t for t in framed)  # the spaced quote a call writes
    with pytest.raises(ValueError, match="varied must be true or false"):
        CalcTask(varied=1)


def test_no_tool_cold_start_answers_a_fraction_directly_and_stays_successful():
    from steprl.recipes.sft import cold_start, without_tools
    task = CalcTask()
    full = task.cold_start(20, seed=0)
    mixed = cold_start(task, 20, 0.6, seed=0)
    direct = [c for c in mixed if not any(m["role"] == "tool" for m in c)]
    assert len(direct) == 12 and len(mixed) == 20
    for conv, original in zip(mixed, full):
        # the same problems in the same order; a direct one is the original minus its tool turns
        assert conv[:2] == original[:2] and conv[-1] == original[-1]
        assert conv in (original, without_tools(original))
    assert [m["role"] for m in direct[0]] == ["system", "user", "assistant"]
    assert direct[0][-1]["content"].startswith("<answer>")
    # still successful trajectories: every final answer is the problem's answer
    problems = task.problems("train", 20, seed=10_000)
    assert all(task.check(p, c[-1]["content"]) for p, c in zip(problems, mixed))
    assert cold_start(task, 20, 0.6, seed=0) == mixed  # deterministic by seed
    assert cold_start(task, 20, 0.6, seed=1) != mixed
    assert cold_start(task, 20, 0.0, seed=0) == full

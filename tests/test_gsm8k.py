"""The gsm8k task on the real train split: splits, grading, real calculator trajectories, eval."""
import json
from fractions import Fraction

import pytest

from steprl.rewards import combine, length_over_target, resolve_rewards, step_bonus
from steprl.tasks import get_task
from steprl.tasks.gsm8k import VALIDATION_SIZE, Gsm8kTask, lenient_answer, to_number
from steprl.tools import calculator, parse_tool_calls


@pytest.fixture(scope="module")
def task():
    return Gsm8kTask()


def test_validation_is_carved_from_train_deterministically_and_never_trained_on(task):
    train, val = task.problems("train"), task.problems("validation")
    assert len(val) == VALIDATION_SIZE and len(train) + len(val) == 7473
    assert not {p.question for p in train} & {p.question for p in val}
    again = Gsm8kTask()
    assert [p.id for p in again.problems("validation")] == [p.id for p in val]
    assert task.problems("test", 5) == val[:5]  # no --data: the test split is the validation split
    assert {p.id for p in task.problems("train", seed=3)} == {p.id for p in train}  # reordered, same problems
    first = train[0]
    assert first.question.startswith("Natalia sold clips") and first.answer == "72" and first.meta["n_steps"] == 2


@pytest.mark.parametrize("text, value", [
    ("1,234", 1234), ("$12.50", Fraction(25, 2)), ("-3", -3), ("45%", 45), ("7 apples", 7), ("5.0", 5),
    ("3/4", Fraction(3, 4)), (" 18 dollars.", 18), ("no number", None), (None, None)])
def test_numbers_normalise(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize("completion, strict, lenient", [
    ("She has <answer>72</answer>", True, True),
    ("<answer>$72.00</answer>", True, True),
    ("<answer>72 clips</answer>", True, True),
    ("<answer>7,2</answer>", True, True),
    ("48 + 24 = 72\n#### 72", False, True),
    ("So the answer is 72.", False, True),
    ("She sold 48 and 24, 72 in all", False, True),
    ("<answer>71</answer> but really 72", False, False),
    ("The answer is 70.", False, False),
])
def test_strict_and_lenient_grading(task, completion, strict, lenient):
    p = task.problems("train", 1)[0]  # answer 72
    assert task.check(p, completion) is strict
    assert task.check_lenient(p, completion) is lenient


def test_lenient_answer_prefers_the_requested_format():
    assert lenient_answer("12 then <answer>5</answer> and 7") == "5"
    assert lenient_answer("first 3, #### 9\nthen 4") == "9"


def test_worked_trajectories_call_the_real_calculator(task):
    p = task.problems("train", 1)[0]
    messages = task.solution_messages(p)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    calls = [parse_tool_calls(m["content"]) for m in messages if m["role"] == "assistant"][:2]
    assert [c[0].arguments["expression"] for c in calls] == ["48/2", "48+24"]
    assert [m["content"] for m in messages if m["role"] == "tool"] == ["24", "72"]
    assert messages[2]["content"].startswith("Natalia sold 48/2 = <tool_call>")
    assert messages[-1]["content"].endswith("<answer>72</answer>") and "####" not in messages[-1]["content"]
    assert task.check(p, messages[-1]["content"])


def test_cold_start_keeps_only_trajectories_the_calculator_agrees_with():
    task = Gsm8kTask()
    convs = task.cold_start(400)
    assert len(convs) == 400
    for conv in convs:
        for call_msg, tool_msg in zip(conv, conv[1:]):
            if tool_msg["role"] == "tool":
                expression = parse_tool_calls(call_msg["content"])[0].arguments["expression"]
                assert tool_msg["content"] == calculator(expression) and not tool_msg["content"].startswith("Error")
    assert 400 + task.dropped < 520
    dropped = task.dropped  # an annotation the calculator disagrees with drops its trajectory, counted
    wrong = task._problem("wrong", {"question": "2 + 2?", "answer": "2+2 = <<2+2=5>>5\n#### 5"})
    assert task.solution_messages(wrong) is None and task.dropped == dropped + 1


def test_single_turn_pbrft_variant_writes_the_chain_of_thought_without_annotations():
    task = Gsm8kTask(tools=False)
    p = task.problems("train", 1)[0]
    messages = task.solution_messages(p)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] and task.max_turns == 1
    assert "<<" not in messages[-1]["content"] and "<tool_call>" not in messages[-1]["content"]
    assert task.tool_names == () and task.check(p, messages[-1]["content"])


def test_bad_data_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match="row 1 needs 'question' and an 'answer' ending in '#### N'"):
        Gsm8kTask(data=str(bad)).problems("test")
    with pytest.raises(ValueError, match="tools must be true or false"):
        get_task("gsm8k", tools="yes")


def test_eval_with_data_reads_the_given_split(tmp_path, tiny, capsys):
    """`steprl eval MODEL --task gsm8k --data PATH --limit N --json` on a local model: the last line
    is the contract's JSON, with strict and lenient accuracy and the breakdown by calculator steps."""
    from steprl.cli import main

    model, tok, _ = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = <<{a}+{a}={2 * a}>>{2 * a}\n#### {2 * a}"}
            for a in range(1, 7)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(tmp_path / "m"), "--task", "gsm8k", "--data", str(data), "--limit", "4",
                 "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["accuracy"] <= result["accuracy_lenient"] <= 1
    assert result["accuracy_by_steps"]["1"]["n"] == 4


def test_eval_takes_task_args_on_the_command_line(monkeypatch, capsys):
    """`--task-arg tools=false` reaches the task as a YAML value (the single-turn arm of a plain model);
    a pair without '=' is one line and exit status 2."""
    import steprl.tasks
    from steprl.cli import main

    seen = {}

    def fake_get_task(name, **kwargs):
        seen.update(kwargs, name=name)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(steprl.tasks, "get_task", fake_get_task)
    assert main(["eval", "some_model", "--task", "gsm8k", "--task-arg", "tools=false", "--task-arg", "x=[1, 2]"]) == 2
    assert seen == {"name": "gsm8k", "tools": False, "x": [1, 2]}
    assert main(["eval", "some_model", "--task", "gsm8k", "--task-arg", "tools"]) == 2
    assert "--task-arg expects KEY=VALUE, got 'tools'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the source's rewards

ANSWERS = ["72", "72", "72"]


def test_length_over_target_penalises_correct_answers_only():
    f = length_over_target(alpha=0.001, target=200)
    long_right = "x" * 500 + " <answer>72</answer>"  # 520 characters: 320 over the target
    short_right = "<answer>72</answer>"
    long_wrong = "x" * 500 + " <answer>71</answer>"
    assert f(None, [long_right, short_right, long_wrong], answer=ANSWERS) == pytest.approx([-0.32, 0.0, 0.0])


def test_step_bonus_counts_successful_calls_capped_on_correct_answers():
    f = step_bonus(beta=0.1, cap=3)

    def episode(n_ok, n_bad, final):
        msgs = []
        for k in range(n_ok + n_bad):
            msgs += [{"role": "assistant", "content": "<tool_call>...</tool_call>"},
                     {"role": "tool", "content": "Error: bad" if k >= n_ok else "24"}]
        return msgs + [{"role": "assistant", "content": final}]

    completions = [episode(2, 1, "<answer>72</answer>"), episode(5, 0, "<answer>72</answer>"),
                   episode(2, 0, "<answer>70</answer>"), "Step one.\nStep two.\n<answer>72</answer>"]
    assert f(None, completions, answer=ANSWERS + ["72"]) == pytest.approx([0.2, 0.3, 0.0, 0.3])


def test_the_sources_combined_reward_by_name_in_config():
    """accuracy 1.0, length 0.5, step 0.3, as the source combines them; computed by hand."""
    fns = resolve_rewards([{"name": "accuracy", "weight": 1.0},
                           {"name": "length_over_target", "weight": 0.5, "args": {"alpha": 0.001, "target": 200}},
                           {"name": "step_bonus", "weight": 0.3, "args": {"beta": 0.1, "cap": 3}}])
    total = combine([f for _, f, _ in fns], [w for _, _, w in fns])
    right = [{"role": "assistant", "content": "<tool_call>a</tool_call>"}, {"role": "tool", "content": "24"},
             {"role": "assistant", "content": "y" * 300 + "<answer>72</answer>"}]
    wrong = [{"role": "assistant", "content": "<answer>7</answer>"}]
    # right: 1.0 + 0.5 * -0.001 * (24 + 300 + 19 - 200) + 0.3 * 0.1 * 1 ; wrong: 0
    assert total(None, [right, wrong], answer=["72", "72"]) == pytest.approx([1.0 - 0.0715 + 0.03, 0.0])

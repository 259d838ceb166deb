"""Bad and hostile input. The tool-call parser, the calculator, answer grading and the config
loader never raise, answer in bounded time, and on valid input agree with an independent
reference (property-based, 1,000 generated cases each). A reward function that raises or
returns NaN, a tool that hangs and a NaN loss are each counted, and the run goes on."""
import copy
import dataclasses
import logging
import math
import operator
import random
import subprocess
import sys
import threading
import time
import typing
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import steprl.recipes.grpo as grpo
import steprl.rollout.episodes as episodes
import steprl.training.rl as rl
from steprl.config import ConfigError, LoraConfig, RewardConfig, RolloutConfig, RunConfig, TaskConfig, load_config
from steprl.envs.tool_env import ToolEnv
from steprl.tasks.base import Problem, answers_match, extract_answer
from steprl.tasks.calc import CalcTask
from steprl.tasks.gsm8k import Gsm8kTask, lenient_answer, same_number, to_number
from steprl.rewards import library
from steprl.tools import calculator, execute_tool_call, format_tool_call, parse_tool_calls
from steprl.tools.calculator import MAX_LENGTH, MAX_VALUE
from steprl.tools.parsing import CLOSE, OPEN

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 1.0  # bound on one call on hostile input (a loaded 2-core machine; the bugs took minutes)
CASES = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])

# Texts a policy might write, at their worst: protocol tags, JSON punctuation, whitespace runs,
# numbers with every decoration, each piece possibly repeated thousands of times.
FRAGMENTS = [OPEN, CLOSE, "<answer>", "</answer>", "####", "The answer is", "{", "}", "[", "]", '"', ":", ",",
             '"name"', '"arguments"', "calculator", '"expression"', " ", "\n", "\t", "$", "%", "-", "\u2212", ".",
             "/", "e", "9", "0", "1e999999999", "\\", "\x00", "\u00e9", "**", "(", ")"]
piece = st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6))
hostile_text = st.lists(st.one_of(piece, st.tuples(piece, st.integers(1, 3000)).map(lambda p: p[0] * p[1])),
                        max_size=8).map("".join)
# pinned worst cases: a regex that backtracks on whitespace, JSON nested past the recursion
# limit, an integer over Python's 4,300 digits, an exponent that builds a billion-digit number
WORST = ["<answer>" + " " * 2000, "<answer>" * 4000, OPEN + "[" * 100_000 + CLOSE,
         OPEN + '{"name": "calculator", "arguments": ' + "1" * 5000 + "}" + CLOSE,
         OPEN + '{"name": "calculator", "arguments": "' + "{" * 100_000 + '"}' + CLOSE,
         "<answer>1e999999999</answer>", "The answer is " + "\n" * 5000, "#### " + " " * 5000]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"{fn.__name__} took {elapsed:.2f}s"
    return out


# ----------------------------------------------------------------------------- the tool-call parser

def env_for(tools, timeout_s=10.0, max_turns=3):
    env = ToolEnv(CalcTask(), tools, RewardConfig(), max_turns=max_turns, tool_timeout_s=timeout_s)
    env.reset(Problem("p", "What is 1 + 2?", "3", {}))
    return env


@CASES
@given(hostile_text)
@example(WORST[2]).via("pinned")
@example(WORST[3]).via("pinned")
@example(WORST[4]).via("pinned")
@example(OPEN + '{"name": "calculator", "arguments": {"expression": "1+2"}}' + CLOSE + OPEN).via("pinned")
def test_parser_reads_one_call_per_opening_tag_and_never_raises(text):
    calls = timed(parse_tool_calls, text)
    assert len(calls) == text.count(OPEN)
    pos = 0
    for call in calls:  # each call's text, in order, without overlaps
        at = text.find(call.raw, pos)
        assert call.raw.startswith(OPEN) and at >= pos
        pos = at + len(call.raw)
        if call.error is None:
            assert isinstance(call.name, str) and call.name.strip() and isinstance(call.arguments, dict)
        answer, ok = execute_tool_call(call, {"calculator": calculator})
        assert isinstance(answer, str) and (ok or answer.startswith("Error: "))
        assert not (call.error and ok)
    result = timed(env_for({"calculator": calculator}).step, text)  # what the environment makes of it
    assert all(m["role"] == "tool" and isinstance(m["content"], str) for m in result.observation)
    assert math.isfinite(result.reward)


tag_or_text = st.lists(st.one_of(st.text(max_size=10), st.sampled_from([OPEN, CLOSE, "<answer>", '"', "\\", "\n"])),
                       max_size=6).map("".join)


@CASES
@given(name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True), expression=tag_or_text,
       before=st.text(max_size=30), after=st.text(max_size=30))
@example(name="run_python", expression='print("</tool_call>")', before="", after="").via("pinned")
def test_a_formatted_call_parses_back_to_its_name_and_arguments(name, expression, before, after):
    text = before.replace(OPEN, "") + format_tool_call(name, {"expression": expression}) + after.replace(OPEN, "")
    calls = parse_tool_calls(text)
    assert len(calls) == 1 and calls[0].error is None
    assert (calls[0].name, calls[0].arguments) == (name, {"expression": expression})


# ----------------------------------------------------------------------------- the calculator

ARITHMETIC_TEXT = st.text(alphabet="0123456789.+-*/%()eE_x\u00d7 ^,", max_size=250)


@CASES
@given(st.one_of(hostile_text, ARITHMETIC_TEXT))
@example("9**9**9").via("pinned")
@example("2**64**64").via("pinned")
@example("1e308*10").via("pinned")
@example("1/0").via("pinned")
@example("0**-1").via("pinned")
@example("(" * 99 + "1" + ")" * 99).via("pinned")
@example("-" * 199 + "1").via("pinned")
@example("99999999999999999999!").via("pinned")
@example("(1/3)**64").via("pinned")
def test_calculator_answers_one_line_within_bounded_time(expression):
    out = timed(calculator, expression)
    assert isinstance(out, str) and "\n" not in out
    if not out.startswith("Error: "):
        Fraction(out)  # a number, e.g. "24", "0.333333333333" or "5.42101086243e-20"


# An independent reference for valid expressions: the tree is built together with its exact
# value (Python's Fraction operators), or the reason the calculator must refuse it.
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
       "%": operator.mod}


def checked(value):
    value = Fraction(value)
    return "too large" if abs(value.numerator) > MAX_VALUE or value.denominator > MAX_VALUE else value


def literal(parts):
    n, places = parts
    text = str(n) if places == 0 else f"{n // 10**places}.{n % 10**places:0{places}d}"
    return text, Fraction(n, 10**places)


def binary(parts):
    (lt, lv), op, (rt, rv) = parts
    text = f"({lt} {op} {rt})"
    for side in (lv, rv):  # left to right, as the calculator evaluates
        if isinstance(side, str):
            return text, side
    try:
        return text, checked(OPS[op](lv, rv))
    except ZeroDivisionError:
        return text, "division by zero"


def power(parts):
    (bt, bv), exponent = parts
    text = f"({bt} ** {exponent})"
    if isinstance(bv, str):
        return text, bv
    try:
        return text, checked(bv ** exponent)
    except ZeroDivisionError:
        return text, "division by zero"


def negate(node):
    text, value = node
    return f"(-{text})", value if isinstance(value, str) else -value


leaf = st.tuples(st.integers(0, 10**5), st.integers(0, 3)).map(literal)
arithmetic = st.recursive(leaf, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(list(OPS)), inner).map(binary),
    st.tuples(inner, st.integers(-4, 4)).map(power),
    inner.map(negate)), max_leaves=8)


@CASES
@given(arithmetic)
@example(("(0.1 + 0.2)", Fraction(3, 10))).via("pinned")
@example(("(7 // (-2))", Fraction(-4))).via("pinned")
@example(("((-7) % 3)", Fraction(2))).via("pinned")
def test_calculator_equals_exact_arithmetic(case):
    text, want = case
    want = "longer than" if len(text) > MAX_LENGTH else want
    out = calculator(text)
    if isinstance(want, str):
        assert out.startswith("Error: ") and want in out, (text, out)
    elif want.denominator == 1:
        assert out == str(want.numerator), (text, out)
    else:  # 12 decimal places, rounded
        assert abs(Fraction(out) - want) <= Fraction(1, 2 * 10**12), (text, out)


# ----------------------------------------------------------------------------- GSM8K answers

GSM8K = Gsm8kTask()


@CASES
@given(hostile_text)
@example(WORST[0]).via("pinned")
@example(WORST[1]).via("pinned")
@example(WORST[5]).via("pinned")
@example(WORST[6]).via("pinned")
@example(WORST[7]).via("pinned")
def test_answer_grading_never_raises_within_bounded_time(text):
    problem = Problem("p", "?", "72", {})
    assert timed(GSM8K.check, problem, text) in (True, False)
    assert timed(GSM8K.check_lenient, problem, text) in (True, False)
    assert timed(lenient_answer, text) is None or isinstance(lenient_answer(text), str)
    assert timed(to_number, text) is None or isinstance(to_number(text), Fraction)
    answer = timed(extract_answer, text)  # every other task's grading
    assert answer is None or answer == answer.strip()
    assert timed(answers_match, answer, "72") in (True, False)


@st.composite
def written_number(draw):
    """(the number as a model might write it, as the dataset writes it): commas, $, %, a
    trailing .0, one or two decimals, a minus sign either way."""
    whole, cents = draw(st.integers(0, 10**12)), draw(st.sampled_from([0, draw(st.integers(1, 99))]))
    negative = draw(st.booleans()) and whole + cents > 0
    digits = f"{whole:,}" if draw(st.booleans()) else str(whole)
    if cents:
        decimals = f"{cents:02d}"
        digits += "." + (decimals[0] if decimals[1] == "0" and draw(st.booleans()) else decimals)
    elif draw(st.booleans()):
        digits += draw(st.sampled_from([".0", ".00"]))
    unit = draw(st.sampled_from(["", "$", "%"]))
    sign = draw(st.sampled_from(["-", "\u2212"])) if negative else ""
    text = f"{sign}${digits}" if unit == "$" else f"{sign}{digits}{unit}"
    canonical = ("-" if negative else "") + str(whole) + (f".{cents:02d}" if cents else "")
    return text, canonical


WRAPPERS = ["<answer>{}</answer>", "<answer> {} </answer>", "#### {}", "The answer is {}.", "The final answer is: {}",
            "so the total comes to {}"]


@CASES
@given(number=written_number(), wrapper=st.sampled_from(WRAPPERS),
       before=st.text(alphabet="abc 0123456789+=.\n", max_size=40))
@example(number=(".5", "0.5"), wrapper="<answer>{}</answer>", before="").via("pinned")
@example(number=("\u22123", "-3"), wrapper="#### {}", before="").via("pinned")
@example(number=("$1,234.50", "1234.5"), wrapper="The answer is {}.", before="").via("pinned")
def test_a_number_written_in_any_accepted_form_is_read_back(number, wrapper, before):
    written, canonical = number
    text = f"{before}\n{wrapper.format(written)}\n"
    assert same_number(lenient_answer(text), canonical), (text, lenient_answer(text))
    if wrapper.startswith("<answer>"):
        assert GSM8K.check(Problem("p", "?", canonical, {}), text)


# ----------------------------------------------------------------------------- the config loader

def dotted_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        yield path
        if dataclasses.is_dataclass(tp):
            yield from dotted_keys(tp, path + ".")


KEYS = list(dotted_keys(RunConfig))
VALUES = ["1", "-1", "0", "7", "1e3", "5e-5", ".nan", ".inf", "-.inf", "nan", "true", "null", "~", "[]", "{}",
          "[1, 2]", "{a: 1}", "2020-13-45", "2020-01-01", "'x'", '"', "[", "{", ":", "- a", "!!binary aGk=",
          "!!python/object:os.system", "&a [*a]", "\x00", "1" * 5000, "[" * 50, "1" + "0" * 400, "grpo", "a\nb"]
override = st.one_of(
    st.tuples(st.one_of(st.sampled_from(KEYS), st.sampled_from(["", ".", "a\nb", "grpo.", "task.args.x.y", "grpo..x"]),
                        st.text(max_size=12)),
              st.one_of(st.sampled_from(VALUES), st.text(max_size=12))).map("=".join),
    st.text(max_size=12))  # often without "="


def finite_floats(cfg):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from finite_floats(value)
        elif isinstance(value, float):
            yield f.name, math.isfinite(value)


def load_or_one_line_error(path, overrides):
    try:
        cfg = timed(load_config, path, overrides)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err), repr(str(err))
        return None
    bad = [name for name, ok in finite_floats(cfg) if not ok]
    assert not bad, f"accepted non-finite {bad}"
    return cfg


@CASES
@given(st.lists(override, max_size=4))
@example(["grpo.temperature=.nan"]).via("pinned")
@example(["name=2020-13-45"]).via("pinned")
@example(["a\nb=1"]).via("pinned")
@example(["stages=[\"a\\nb\"]"]).via("pinned")
@example(["grpo.max_grad_norm=" + "1" + "0" * 400]).via("pinned")
@example(["grpo.steps=" + "[" * 1000]).via("pinned")  # past the YAML parser's recursion limit
def test_config_overrides_load_or_fail_with_one_line(overrides):
    load_or_one_line_error(None, overrides)


yaml_line = st.tuples(st.sampled_from(["", "  ", "    ", "\t", "- "]),
                      st.one_of(st.sampled_from(KEYS).map(lambda k: k.split(".")[-1]), st.text(max_size=8)),
                      st.sampled_from([": ", ":", " ", ": {", ": [", ""]),
                      st.one_of(st.sampled_from(VALUES), st.text(max_size=8))).map("".join)


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("yaml")


@CASES
@given(text=st.lists(yaml_line, max_size=6).map("\n".join), overrides=st.lists(override, max_size=2))
@example(text="- a", overrides=["grpo.steps=3"]).via("pinned")
@example(text="hello", overrides=["grpo.steps=3"]).via("pinned")
@example(text="[" * 1000, overrides=[]).via("pinned")
@example(text="name: 2020-13-45", overrides=[]).via("pinned")
@example(text='"a\\nb": 1', overrides=[]).via("pinned")
def test_config_files_load_or_fail_with_one_line(yaml_dir, text, overrides):
    path = yaml_dir / "config.yaml"
    path.write_text(text)
    load_or_one_line_error(path, overrides)


def test_an_empty_section_takes_overrides(yaml_dir):
    path = yaml_dir / "empty_section.yaml"
    path.write_text("grpo:\n")
    assert load_config(path, ["grpo.steps=3"]).grpo.steps == 3


def test_steprl_run_with_a_bad_key_prints_one_line_and_fails():
    proc = subprocess.run([sys.executable, "-m", "steprl.cli", "run", "configs/toy.yaml", "grpo.no_such_key=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steprl: error: unknown key 'grpo.no_such_key'"), proc.stderr


# ----------------------------------------------------------------------------- a tool that hangs

def test_a_hung_tool_times_out_into_an_error_and_the_episode_goes_on(caplog):
    release = threading.Event()

    def stall(seconds: int) -> str:
        """Waits.

        Args:
            seconds: How long.
        """
        release.wait(60)
        return "late"

    env = env_for({"calculator": calculator, "stall": stall}, timeout_s=0.2)
    text = format_tool_call("stall", {"seconds": 600}) + format_tool_call("calculator", {"expression": "1+2"})
    try:
        with caplog.at_level(logging.WARNING, logger="steprl.tools"):
            start = time.perf_counter()
            first = env.step(text)
            second = env.step(format_tool_call("stall", {"seconds": 1}))
            elapsed = time.perf_counter() - start
    finally:
        release.set()  # let the abandoned threads finish
    assert elapsed < 2.0  # two timeouts of 0.2 s, not two minutes
    assert [m["content"] for m in first.observation] == ["Error: stall timed out after 0.2s", "3"]
    assert not first.done and not second.done  # the model gets the error and can go on
    assert (env.n_calls, env.n_failures) == (3, 2)  # counted as failed calls
    assert sum("stall" in r.getMessage() for r in caplog.records) == 1  # logged once per tool
    third = env.step("<answer>3</answer>")
    assert third.done and env.correct


def test_the_tool_timeout_is_a_config_knob():
    assert load_config(None, ["rollout.tool_timeout_s=0.5"]).rollout.tool_timeout_s == 0.5
    with pytest.raises(ConfigError, match="rollout.tool_timeout_s"):
        load_config(None, ["rollout.tool_timeout_s=-1"])


# ----------------------------------------------------------------------------- GRPO steps under fire

def grpo_state(tiny, **state_args):
    """A GRPO state on the tiny model: 2 prompts x 2 episodes, one minibatch of 2 micro-batches."""
    from steprl.rollout import NativeEngine
    from steprl.rollout.chat import tool_setup
    from steprl.runtime import Runtime
    from steprl.training.policy import Policy
    from steprl.training.rl import RLState

    model, tok, task = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
    g = RunConfig(task=TaskConfig(name="calc")).grpo
    g.prompts_per_step, g.num_generations, g.max_new_tokens, g.max_turns = 2, 2, 4, 2
    g.minibatch_size, g.micro_batch_size, g.num_iterations, g.kl_coef = 4, 2, 1, 0.0
    g.lora = LoraConfig(enabled=False)
    tools, renderer, suffix = tool_setup(task, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    policy = Policy(model, tok, None, "", params, torch.optim.AdamW(params, lr=1e-2), None)
    return RLState(settings=g, policy=policy, runtime=Runtime(torch.device("cpu"), "fp32"),
                   engine=NativeEngine(model, tok), task=task, tools=tools, renderer=renderer, system_suffix=suffix,
                   problems=task.problems("train", 10), generator=torch.Generator().manual_seed(0),
                   rng=random.Random(0), **state_args)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_broken_reward_functions_count_as_zero_and_the_step_trains(tiny, monkeypatch, caplog):
    """A function that raises, or returns NaN, adds 0 to the episode's reward (its other rewards,
    the environment's, stay), is counted per function, is logged once, and the update goes on."""
    def raises(prompts, completions, **kw):
        raise RuntimeError("reward server down")

    def nan_for_the_first(prompts, completions, **kw):
        return [math.nan] + [1.0] * (len(completions) - 1)

    monkeypatch.setattr(library, "_WARNED", set())  # warned once per process: start afresh
    state = grpo_state(tiny, reward_fns=[("raises", raises, 1.0), ("nan", nan_for_the_first, 1.0)],
                       rollout=RolloutConfig(tool_timeout_s=0.25, tool_workers=3))
    envs_made, env_rewards = [], []
    real_make_envs, real_add = rl.make_envs, grpo.add_final_rewards
    monkeypatch.setattr(rl, "make_envs", lambda *a, **kw: envs_made.extend(real_make_envs(*a, **kw)) or envs_made)
    monkeypatch.setattr(grpo, "add_final_rewards",
                        lambda fns, trajs: env_rewards.extend(t.reward for t in trajs) or real_add(fns, trajs))
    pools, real_pool = [], episodes.ThreadPoolExecutor
    monkeypatch.setattr(episodes, "ThreadPoolExecutor", lambda n: pools.append(n) or real_pool(n))
    before = weights(state.policy.model)
    with caplog.at_level(logging.WARNING, logger="steprl.rewards"):
        metrics, trajs = grpo.grpo_step(state)
    assert metrics["rewards/raises/failures"] == 4 and metrics["rewards/nan/failures"] == 1
    assert [t.reward for t in trajs] == pytest.approx([env_rewards[0]] + [r + 1.0 for r in env_rewards[1:]])
    assert all(math.isfinite(t.reward) for t in trajs) and math.isfinite(metrics["reward"])
    assert math.isfinite(metrics["loss"]) and "skipped_minibatches" not in metrics
    assert any(not torch.equal(before[n], p) for n, p in state.policy.model.named_parameters())  # trained
    assert {r.getMessage().split("'")[1] for r in caplog.records if r.name == "steprl.rewards"} == {"raises", "nan"}
    assert {env.tool_timeout_s for env in envs_made} == {0.25}  # the run's tool timeout reaches the envs
    assert pools == [3]  # and its tool_workers the agent loop's thread pool


def test_a_nan_loss_or_gradient_skips_the_update_and_the_next_step_trains(tiny, monkeypatch):
    state = grpo_state(tiny)
    model = state.policy.model
    real_aggregate = grpo.aggregate_loss
    monkeypatch.setattr(grpo, "aggregate_loss", lambda *a, **kw: real_aggregate(*a, **kw) * math.nan)
    before = weights(model)
    metrics, _ = grpo.grpo_step(state)
    assert metrics["skipped_minibatches"] == 1 and metrics["event"] == "nan_skip" and "grad_norm" not in metrics
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no optimizer step
    assert not state.policy.optimizer.state

    monkeypatch.setattr(grpo, "aggregate_loss", real_aggregate)  # a finite loss, a NaN gradient
    hook = next(p for p in model.parameters() if p.requires_grad).register_hook(lambda grad: grad * math.nan)
    metrics, _ = grpo.grpo_step(state)
    hook.remove()
    assert metrics["skipped_minibatches"] == 1 and "grad_norm" not in metrics
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    metrics, _ = grpo.grpo_step(state)  # the run goes on
    assert "skipped_minibatches" not in metrics and math.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

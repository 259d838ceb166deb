"""Tools: exact calculator, tool-call parsing, schemas, execution and the Python sandbox."""
import os
import secrets
import tempfile
import time

import pytest

from steprl.tools import (TOOLS, ToolCall, ToolResult, calculator, execute_tool_call, format_tool_call,
                          function_schema, get_tools, parse_tool_calls, run_python)
from steprl.tools.sandbox import isolation_mode


# calculator ----------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("48/2", "24"), ("0.1+0.2", "0.3"), ("2**10", "1024"), ("(3+4)*5 - 6/4", "33.5"), ("-3 + 5", "2"),
    ("7 % 3", "1"), ("1/3", "0.333333333333"), ("2/3", "0.666666666667"), ("10/3", "3.333333333333"),
    ("1/5", "0.2"), ("-1/4", "-0.25"), ("3 x 4", "12"), ("3×4", "12"), ("10÷4", "2.5"), ("2**-3", "0.125"),
    ("-2**2", "-4"), ("1.5e3", "1500"), ("16**0.5", "4"), ("3.0", "3"), ("  12  ", "12"),
    ("10**30", "1" + "0" * 30), ("560//10", "56"), ("7.5 // 2", "3"),
])
def test_calculator_exact(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression", [
    "import os", "__import__('os')", "1/0", "9**9**9", "", "   ", "a+b", "1" * 300, None, 42, "1,234",
    "2^3", "10**31", "2**0.5", "[1, 2]", "1 < 2", "'a'", "open('x')", "1e400", "(" * 150 + "1", "1_000", "1 << 2", "5 & 3",
])
def test_calculator_errors(expression):
    start = time.monotonic()
    result = calculator(expression)
    assert time.monotonic() - start < 1.0
    assert isinstance(result, str) and result.startswith("Error: ") and "\n" not in result


# parsing -------------------------------------------------------------------------------------

def test_parse_single_call_with_whitespace():
    text = 'Let me compute.\n<tool_call>\n  {"name": "calculator",\n "arguments": {"expression": "48/2"}}\n</tool_call>'
    [call] = parse_tool_calls(text)
    assert (call.name, call.arguments, call.error) == ("calculator", {"expression": "48/2"}, None)
    assert call.raw.startswith("<tool_call>") and call.raw.endswith("</tool_call>")


def test_parse_two_calls_and_string_arguments():
    text = ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> then '
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [("a", {"x": 1}, None), ("b", {"y": 2}, None)]


@pytest.mark.parametrize("text, reason", [
    ('<tool_call>{"name": "calculator", "arguments": {</tool_call>', "invalid JSON"),
    ('<tool_call>{"arguments": {"expression": "1"}}</tool_call>', "no 'name'"),
    ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "calculator", "arguments": "not json"}</tool_call>', "invalid JSON"),
    ('<tool_call>["calculator"]</tool_call>', "JSON object"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}', "unclosed"),
])
def test_parse_malformed(text, reason):
    [call] = parse_tool_calls(text)
    assert call.error and reason in call.error


def test_parse_unclosed_then_valid():
    calls = parse_tool_calls('<tool_call>{"name": "a" <tool_call>{"name": "b", "arguments": {}}</tool_call>')
    assert calls[0].error and "unclosed" in calls[0].error
    assert (calls[1].name, calls[1].error) == ("b", None)


@pytest.mark.parametrize("text", ["", "no calls here", "</tool_call>", None])
def test_parse_no_call(text):
    assert parse_tool_calls(text) == []


def test_format_tool_call_round_trip():
    text = format_tool_call("calculator", {"expression": "1 + 2"})
    assert text == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 2"}}\n</tool_call>'
    [call] = parse_tool_calls(text)
    assert (call.name, call.arguments, call.error) == ("calculator", {"expression": "1 + 2"}, None)


# schema and execution ------------------------------------------------------------------------

def lookup(city: str, days: int, units: list[str], metric: bool = True, limit: float | None = None) -> str:
    """Look up the weather
    for a city.

    More detail the model does not need.

    Args:
        city: Name of the city.
        days (int): How many days
            to forecast.
        units: Units to report.
        metric: Use metric units.
        limit: Optional cap.

    Returns:
        A forecast.
    """
    return f"{city}:{days}"


def test_function_schema():
    schema = function_schema(lookup)
    assert schema == {"type": "function", "function": {
        "name": "lookup",
        "description": "Look up the weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "Name of the city."},
            "days": {"type": "integer", "description": "How many days to forecast."},
            "units": {"type": "array", "items": {"type": "string"}, "description": "Units to report."},
            "metric": {"type": "boolean", "description": "Use metric units."},
            "limit": {"type": "number", "description": "Optional cap."},
        }, "required": ["city", "days", "units"]}}}
    assert function_schema(calculator)["function"]["parameters"]["required"] == ["expression"]
    assert function_schema(run_python)["function"]["parameters"]["required"] == ["code"]


def test_function_schema_errors():
    def no_doc(x: int) -> int:
        return x

    def no_hint(x):
        """Doc."""

    with pytest.raises(ValueError, match="docstring"):
        function_schema(no_doc)
    with pytest.raises(ValueError, match="type hint"):
        function_schema(no_hint)


def boom(x: int) -> int:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise RuntimeError("kaput")


@pytest.mark.parametrize("call, fragment", [
    (ToolCall("nope", {}), "unknown tool"),
    (ToolCall(None, {}, "invalid JSON in tool call"), "invalid JSON"),
    (ToolCall("calculator", {}), "missing"),
    (ToolCall("calculator", {"expression": "1", "extra": 2}), "unexpected"),
    (ToolCall("calculator", {"expression": 5}), "must be string"),
    (ToolCall("boom", {"x": 1}), "kaput"),
    (ToolCall("calculator", {"expression": "1/0"}), "division by zero"),
    (ToolCall("run_python", {"code": "1/0", "timeout_s": 2}), "ZeroDivisionError"),
])
def test_execute_tool_call_failures(call, fragment):
    text, ok = execute_tool_call(call, {**TOOLS, "boom": boom})
    assert not ok and text.startswith("Error: ") and fragment in text


def test_execute_tool_call_success():
    assert execute_tool_call(ToolCall("calculator", {"expression": "48/2"}), TOOLS) == ("24", True)
    assert execute_tool_call(ToolCall("run_python", {"code": "print(6*7)"}), TOOLS) == ("42\n", True)
    assert execute_tool_call(ToolCall("lookup", {"city": "Oslo", "days": 2, "units": []}), {"lookup": lookup}) \
        == ("Oslo:2", True)


def test_get_tools():
    assert get_tools(["calculator"]) == {"calculator": calculator}
    assert get_tools([f"{__name__}:lookup"]) == {"lookup": lookup}
    with pytest.raises(ValueError, match="calculator, run_python"):
        get_tools(["search"])
    with pytest.raises(ValueError, match="cannot load"):
        get_tools([f"{__name__}:missing"])


# sandbox -------------------------------------------------------------------------------------

def timed(code, timeout_s=1.0):
    start = time.monotonic()
    result = run_python(code, timeout_s=timeout_s)
    assert isinstance(result, ToolResult)
    assert time.monotonic() - start < timeout_s + 3
    return result


def test_run_python_prints():
    result = timed("print(sum(range(10)))", timeout_s=5)
    assert (result.ok, result.output, result.error) == (True, "45\n", None)


def test_run_python_exception():
    result = timed("print('before')\nraise ValueError('bad value')", timeout_s=5)
    assert not result.ok and result.error == "ValueError: bad value" and "before" in result.output


@pytest.mark.parametrize("code", [
    "while True: pass",
    "import time\ntime.sleep(60)",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
])
def test_run_python_runaways_end(code):
    result = timed(code)
    assert not result.ok and result.error


def test_run_python_memory_hog():
    result = timed("x = bytearray(4 * 1024**3)\nprint('allocated')", timeout_s=5)
    assert not result.ok and "allocated" not in result.output


def test_run_python_huge_file():
    result = timed("open('big.bin', 'wb').write(b'x' * 100_000_000)\nprint('wrote')", timeout_s=5)
    assert not result.ok and "wrote" not in result.output


def test_run_python_output_truncated():
    result = timed("print('y' * 50_000)", timeout_s=5)
    assert result.ok and len(result.output) < 4200 and "truncated" in result.output


def test_run_python_cannot_write_outside(tmp_path):
    if isolation_mode() == "plain":
        pytest.skip("no namespaces on this machine: the sandbox can only limit, not isolate, the filesystem")
    name = f"steprl_escape_test_{secrets.token_hex(6)}"
    canary = tmp_path / "canary.txt"
    canary.write_text("keep")
    code = (
        "import os\n"
        f"for path in ['/tmp/{name}', '../{name}', '../../{name}', '/{name}']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "    except OSError:\n"
        "        pass\n"
        f"try:\n    os.remove({str(canary)!r})\nexcept OSError:\n    pass\n"
        f"os.system('rm -f {canary} 2>/dev/null')\n"
        "print('done')\n"
    )
    result = timed(code, timeout_s=5)
    assert result.ok and "done" in result.output
    for directory in {"/tmp", tempfile.gettempdir(), "/", os.path.dirname(tempfile.gettempdir())}:
        assert not os.path.exists(os.path.join(directory, name))
    assert canary.read_text() == "keep"


def test_run_python_bad_input():
    assert not run_python(None).ok
    assert not run_python("print(1)", timeout_s=-1).ok

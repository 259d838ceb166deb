"""Plain Python functions as tools: their JSON schema, and running a parsed call against them.

A tool is any function with type hints and a Google-style docstring. `function_schema` turns it
into the OpenAI / Hugging Face `tools=[...]` format that chat templates render into the prompt;
`execute_tool_call` runs a `ToolCall` and always answers with text, because whatever the policy
writes, the environment has to reply with an observation rather than crash the rollout.
"""
from __future__ import annotations

import inspect
import logging
import re
import threading
import types
import typing
from typing import Any, Callable

from .parsing import ToolCall
from .sandbox import ToolResult

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}
log = logging.getLogger("steprl.tools")
_TIMED_OUT: set[str] = set()  # tools whose timeout was logged already


class _Overran(Exception):
    """A tool call still running at its timeout (not TimeoutError: a tool may raise that itself)."""


def function_schema(fn: Callable) -> dict:
    """The JSON schema of `fn`; ValueError when a parameter has no type hint or fn no docstring."""
    name = getattr(fn, "__name__", repr(fn))
    doc = inspect.getdoc(fn)
    if not doc:
        raise ValueError(f"tool {name!r} needs a docstring: its first paragraph is the description the model sees")
    description, arg_docs = _parse_docstring(doc)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise ValueError(f"tool {name!r}: cannot resolve type hints ({e})") from None
    properties, required = {}, []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"tool {name!r}: *args / **kwargs cannot be described to the model")
        if param.name not in hints:
            raise ValueError(f"tool {name!r}: parameter {param.name!r} needs a type hint")
        prop = _type_schema(hints[param.name], f"tool {name!r}, parameter {param.name!r}")
        if param.name in arg_docs:
            prop["description"] = arg_docs[param.name]
        properties[param.name] = prop
        if param.default is param.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph joined into one line, {arg name: description}) from a Google docstring."""
    description = " ".join(doc.split("\n\n", 1)[0].split())
    args, current, in_args = {}, None, False
    for line in doc.splitlines():
        if re.fullmatch(r"(Args|Arguments|Parameters):\s*", line):
            in_args = True
            continue
        if not in_args:
            continue
        if line.strip() and not line[0].isspace():  # next section ("Returns:") ends Args
            break
        match = re.match(r"\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
        if match and (current is None or _indent(line) <= _indent(args[current][0])):
            current = match.group(1).lstrip("*")
            args[current] = [line, match.group(2).strip()]
        elif current and line.strip():  # continuation of the previous argument's description
            args[current][1] += " " + line.strip()
    return description, {k: v[1] for k, v in args.items()}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _type_schema(hint: Any, where: str) -> dict:
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None describe X
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _type_schema(options[0], where)
        return {"anyOf": [_type_schema(a, where) for a in options]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if hint in (list, tuple) or origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0], where)} if args else {"type": "array"}
    if hint is dict or origin is dict:
        return {"type": "object"}
    raise ValueError(f"{where}: unsupported type hint {hint!r} (use str, int, float, bool, list, dict)")


def execute_tool_call(call: ToolCall, tools: dict[str, Callable], timeout_s: float = 0.0) -> tuple[str, bool]:
    """Run `call` with `tools`; (text for the model, success). Never raises.

    Success is False for a malformed call, an unknown tool, bad arguments, an exception, a call
    still running after `timeout_s` seconds (0 = no limit), a failed `ToolResult`, or a tool answer
    starting with "Error:" (the calculator's way of failing).
    """
    if call.error:
        return f"Error: {call.error}", False
    fn = tools.get(call.name) if isinstance(tools, dict) else None
    if fn is None:
        return f"Error: unknown tool {call.name!r}; available tools: {', '.join(tools or {}) or 'none'}", False
    problem = _check_arguments(fn, call.arguments)
    if problem:
        return f"Error: bad arguments for {call.name}: {problem}", False
    try:
        result = _call_with_timeout(fn, call.arguments, timeout_s)
    except _Overran:
        if call.name not in _TIMED_OUT:
            _TIMED_OUT.add(call.name)
            log.warning("tool '%s' ran past %gs: its calls answer with a timeout error and the episode "
                        "goes on (warned once)", call.name, timeout_s)
        return f"Error: {call.name} timed out after {timeout_s:g}s", False
    except Exception as e:
        return f"Error: {call.name} raised {type(e).__name__}: {e}", False
    if isinstance(result, ToolResult):
        if result.ok:
            return result.output, True
        text = f"Error: {result.error}"
        return (f"{text}\n{result.output}" if result.output else text), False
    text = str(result)
    return text, not text.startswith("Error:")


def _call_with_timeout(fn: Callable, arguments: dict, timeout_s: float):
    """fn(**arguments), or _Overran when it has not returned after timeout_s seconds.

    A Python thread cannot be stopped, so a call that overruns is abandoned: it finishes (or not)
    in a daemon thread and its result is dropped. The rollout waits timeout_s at most, instead of
    forever on a tool that hangs. (run_python also kills its own process at its own timeout.)
    """
    if not timeout_s:
        return fn(**arguments)
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn(**arguments)
        except BaseException as e:  # handed to the caller, which treats it as if raised there
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"tool-{getattr(fn, '__name__', 'call')}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _Overran
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _check_arguments(fn: Callable, arguments: dict) -> str | None:
    """Why `arguments` do not fit `fn` (missing, extra, or plainly wrong simple types), or None."""
    if not isinstance(arguments, dict):
        return "arguments must be an object"
    try:
        signature = inspect.signature(fn)
        signature.bind(**arguments)
    except TypeError as e:
        return str(e)
    except ValueError:
        return None  # builtins without a signature: let the call decide
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    for key, value in arguments.items():
        expected = hints.get(key)
        if expected in _SIMPLE and not _fits(value, expected):
            return f"{key!r} must be {_SIMPLE[expected]}, got {type(value).__name__}"
    return None


def _fits(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)

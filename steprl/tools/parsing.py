"""Tool calls in the Hermes/Qwen format, in and out of model text.

A call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Parsing never raises: a
policy under RL writes broken calls all the time, and each one must come back as a `ToolCall`
with `error` set so the environment can answer with the reason (and the reward can count it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str | None
    arguments: dict = field(default_factory=dict)
    error: str | None = None  # None when the call is well formed, else a short reason
    raw: str = ""  # the call's text as it appeared, tags included


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` in `text`, in order; [] when there is none."""
    if not isinstance(text, str):
        return []
    calls, pos = [], 0
    while (start := text.find(OPEN, pos)) != -1:
        body_start = start + len(OPEN)
        end = text.find(CLOSE, body_start)
        reopen = text.find(OPEN, body_start)
        if end == -1 or (reopen != -1 and reopen < end):  # no closing tag before the next call
            stop = len(text) if reopen == -1 else reopen
            calls.append(ToolCall(None, {}, "unclosed <tool_call> (missing </tool_call>)", text[start:stop]))
            pos = stop
            continue
        calls.append(_parse_body(text[body_start:end], text[start : end + len(CLOSE)]))
        pos = end + len(CLOSE)
    return calls


def _parse_body(body: str, raw: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, {}, f"invalid JSON in tool call: {e.msg} at char {e.pos}", raw)
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits, [[[... nested too deep
        return ToolCall(None, {}, f"invalid JSON in tool call: {_first_line(e)}", raw)
    if not isinstance(obj, dict):
        return ToolCall(None, {}, "tool call must be a JSON object with 'name' and 'arguments'", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCall(None, {}, "tool call has no 'name'", raw)
    args = obj.get("arguments", obj.get("parameters", {}))  # Llama-style "parameters" accepted
    if isinstance(args, str):  # some templates put the arguments in a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(name, {}, f"invalid JSON in 'arguments' string: {e.msg}", raw)
        except (ValueError, RecursionError) as e:
            return ToolCall(name, {}, f"invalid JSON in 'arguments' string: {_first_line(e)}", raw)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCall(name, {}, f"'arguments' must be a JSON object, got {type(args).__name__}", raw)
    return ToolCall(name, args, None, raw)


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:120]


def format_tool_call(name: str, arguments: dict) -> str:
    """The canonical text of one call, as used in SFT data and prompts. A tag inside an argument
    (code that prints "</tool_call>") is written with JSON's escape for "<", so the call still
    parses back whole."""
    body = json.dumps({"name": name, "arguments": arguments})
    body = body.replace(OPEN, "\\u003c" + OPEN[1:]).replace(CLOSE, "\\u003c" + CLOSE[1:])
    return f"{OPEN}\n{body}\n{CLOSE}"

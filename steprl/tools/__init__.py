"""Tools an agent can call: the built-ins, the call format, schemas and execution.

Any plain function with type hints and a Google-style docstring is a tool. Configs name tools
as strings: a built-in ("calculator", "run_python") or "module:function" for your own.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .calculator import calculator
from .parsing import ToolCall, format_tool_call, parse_tool_calls
from .sandbox import ToolResult, run_python
from .schema import execute_tool_call, function_schema

TOOLS: dict[str, Callable] = {"calculator": calculator, "run_python": run_python}

__all__ = ["TOOLS", "ToolCall", "ToolResult", "calculator", "execute_tool_call", "format_tool_call",
           "function_schema", "get_tools", "parse_tool_calls", "run_python"]


def get_tools(names: list[str]) -> dict[str, Callable]:
    """{name the model calls: function} for built-in names and "module:function" references.

    Each tool's schema is derived here, so a missing docstring or type hint fails at config time.
    """
    if isinstance(names, str):
        names = [names]
    tools = {}
    for name in names or []:
        if name in TOOLS:
            fn = TOOLS[name]
        elif isinstance(name, str) and ":" in name:
            fn = _import_function(name)
        else:
            raise ValueError(f"unknown tool {name!r}; allowed: {', '.join(TOOLS)}, or 'module:function' for your own")
        function_schema(fn)
        tools[fn.__name__ if ":" in name else name] = fn
    return tools


def _import_function(ref: str) -> Callable:
    module_name, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load tool {ref!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"tool {ref!r} is not callable")
    return fn

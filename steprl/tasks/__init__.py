"""Tasks by name. A task outside steprl is named "module:Class" in the config."""
from __future__ import annotations

import importlib

from steprl.tasks.base import Problem, Task, answers_match, extract_answer
from steprl.tasks.calc import CalcTask
from steprl.tasks.gsm8k import Gsm8kTask

TASKS = {"calc": CalcTask, "gsm8k": Gsm8kTask}


def get_task(name: str, **kwargs) -> Task:
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"task '{name}': cannot import ({err})") from None
    elif name in TASKS:
        cls = TASKS[name]
    else:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(sorted(TASKS))}, or module:Class)")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"task '{name}': bad arguments ({err})") from None


__all__ = ["Problem", "Task", "TASKS", "get_task", "answers_match", "extract_answer"]

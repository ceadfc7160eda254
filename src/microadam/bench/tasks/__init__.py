"""Built-in tasks for ``microadam compare``, each a small module registered by name.

A task module is imported only when a plan names it, so a missing optional
dependency (transformers, a data package) fails only that task, with the
command that installs it.
"""

from __future__ import annotations

import importlib

from microadam.bench.tasks.base import MissingDependency, Task, TaskSize, Workload

__all__ = ["TASKS", "MissingDependency", "Task", "TaskSize", "Workload", "get_task", "task_class"]

# name -> "module:attribute"
TASKS = {
    "digits": "microadam.bench.tasks.digits:DigitsTask",
    "tweets": "microadam.bench.tasks.tweets:TweetsTask",
    "fashion": "microadam.bench.tasks.fashion:FashionTask",
    "charlm": "microadam.bench.tasks.charlm:CharLMTask",
    "fortunes": "microadam.bench.tasks.fortunes:FortunesTask",
    "text-classification": "microadam.bench.tasks.textcls:TextClassificationTask",
}


def task_class(name: str) -> type[Task]:
    """The class of task ``name`` (its module imported, none of its optional dependencies)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def get_task(name: str, **options: object) -> Task:
    """Build the task ``name`` with its options (the plan's ``[task_options]`` table)."""
    return task_class(name)(**options)

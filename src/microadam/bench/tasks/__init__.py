"""Built-in tasks for ``microadam compare``, each a small module registered by name, and the user's own.

A task module is imported only when a plan names it, so a missing optional
dependency (transformers, a data package) fails only that task, with the
command that installs it. A plan's ``task = "file.py:Class"`` or ``"package.module:Class"``
names a :class:`Task` subclass of the user's (``docs/compare.md``, "Your own task").
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys

from microadam.bench.tasks.base import MissingDependency, Task, TaskSize, Workload

__all__ = [
    "TASKS",
    "MissingDependency",
    "Task",
    "TaskSize",
    "Workload",
    "get_task",
    "task_class",
    "task_file",
]

# name -> "module:attribute"
TASKS = {
    "digits": "microadam.bench.tasks.digits:DigitsTask",
    "tweets": "microadam.bench.tasks.tweets:TweetsTask",
    "fashion": "microadam.bench.tasks.fashion:FashionTask",
    "charlm": "microadam.bench.tasks.charlm:CharLMTask",
    "fortunes": "microadam.bench.tasks.fortunes:FortunesTask",
    "text-classification": "microadam.bench.tasks.textcls:TextClassificationTask",
}


_HOW = "see docs/compare.md, 'Your own task'"


def task_file(name: str) -> str | None:
    """The Python file a user task ``"path/to/file.py:Class"`` names (absolute, ``~`` expanded); None for
    a built-in task or a ``"package.module:Class"``."""
    if name in TASKS or ":" not in name:
        return None
    module = name.rsplit(":", 1)[0]
    if module.endswith(".py") or "/" in module or os.sep in module:
        return os.path.abspath(os.path.expanduser(module))
    return None


def _user_module(name: str) -> object:
    """The module of a user task ``name`` ("file.py:Class" or "package.module:Class"), imported.

    Errors are ValueErrors that say what failed: a missing file or module, or what its import raised.
    """
    module = name.rsplit(":", 1)[0]
    path = task_file(name)
    if path is None:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise ValueError(f"task {name!r}: importing {module} raised ModuleNotFoundError: {e}") from e
            leaf = module.rsplit(".", 1)[-1]
            raise ValueError(
                f"task {name!r}: no module {module!r} can be imported here ({e}); give the task's file instead "
                f"(task = 'path/to/{leaf}.py:{name.rsplit(':', 1)[1]}', relative to the current directory), or "
                f"install the package; {_HOW}"
            ) from e
        except Exception as e:
            raise ValueError(f"task {name!r}: importing {module} raised {type(e).__name__}: {e}") from e
    if not os.path.isfile(path):
        raise ValueError(f"task {name!r}: the file {path} does not exist (paths are relative to the current "
                         f"directory, {os.getcwd()}); {_HOW}")  # fmt: skip
    # One module per file and contents: the same file is run once per process, an edited one again,
    # and two files with the same text stay two modules (each with its own __file__).
    with open(path, "rb") as f:
        digest = hashlib.sha256(path.encode() + b"\0" + f.read()).hexdigest()[:16]
    key = f"{_USER_PACKAGE}.task_{digest}"
    if key in sys.modules:
        return sys.modules[key]
    # Where the module's file is, for this process's finder and for those of processes it starts: a
    # DataLoader worker started by "spawn" or "forkserver" imports the classes it unpickles by module
    # name, and inherits the environment (the name's parent packages, imported first, install the finder).
    files = _user_files()
    files[digest] = path
    os.environ[_USER_FILES_VAR] = json.dumps(files)
    try:
        return importlib.import_module(key)
    except Exception as e:
        sys.modules.pop(key, None)
        raise ValueError(f"task {name!r}: importing {path} raised {type(e).__name__}: {e}") from e
    except BaseException:
        sys.modules.pop(key, None)
        raise


# User task modules are named {_USER_PACKAGE}.task_<digest of path and contents>.
_USER_PACKAGE = "microadam.bench.tasks.user"
_USER_FILES_VAR = "MICROADAM_USER_TASK_FILES"  # {digest: path}, JSON


def _user_files() -> dict[str, str]:
    try:
        files = json.loads(os.environ.get(_USER_FILES_VAR, "{}"))
    except ValueError:
        return {}
    return files if isinstance(files, dict) else {}


class _UserTaskFinder(importlib.abc.MetaPathFinder):
    """Finds ``{_USER_PACKAGE}`` (an empty package) and its ``task_<digest>`` modules, each the user's file
    of that digest, with the file's folder put on the import path (as ``python file.py`` would have
    it: a task may import its helpers from next to it; their code is not in the run key)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == _USER_PACKAGE:
            return importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        prefix = _USER_PACKAGE + ".task_"
        if not fullname.startswith(prefix):
            return None
        digest = fullname[len(prefix) :]
        file = _user_files().get(digest)
        if file is None:
            return None
        with open(file, "rb") as f:
            if hashlib.sha256(file.encode() + b"\0" + f.read()).hexdigest()[:16] != digest:
                raise ImportError(f"{file} changed while a run used it; run the compare again", name=fullname)
        folder = os.path.dirname(file)
        if folder not in sys.path:
            sys.path.append(folder)
        return importlib.util.spec_from_file_location(fullname, file)


if not any(isinstance(f, _UserTaskFinder) for f in sys.meta_path):
    sys.meta_path.append(_UserTaskFinder())


def task_class(name: str) -> type[Task]:
    """The class of task ``name`` (its module imported, none of its optional dependencies).

    ``name`` is a built-in task, or ``"file.py:Class"`` / ``"package.module:Class"`` naming a subclass
    of :class:`Task` (the file's path relative to the current directory).
    """
    if name in TASKS:
        module, attr = TASKS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    if ":" not in name:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, or your own as "
            f"'file.py:ClassName' ({_HOW})"
        )
    attr = name.rsplit(":", 1)[1]
    mod = _user_module(name)
    cls = getattr(mod, attr, None)
    if cls is None:
        found = sorted(n for n, v in vars(mod).items() if isinstance(v, type) and issubclass(v, Task) and v is not Task)
        raise ValueError(
            f"task {name!r}: {attr!r} is not defined there; its Task subclasses are {found or 'none'}; {_HOW}"
        )
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(
            f"task {name!r}: {attr} must be a subclass of microadam.bench.tasks.Task (with a build() that "
            f"returns a Workload), got {cls!r}; {_HOW}"
        )
    if not isinstance(cls.metric, str) or not cls.metric:
        raise ValueError(f"task {name!r}: metric must name a value of what evaluate() returns, got {cls.metric!r}")
    if not isinstance(cls.higher_is_better, bool):
        # A string "False" is truthy: a loss would be judged as an accuracy, and a worse candidate pass.
        raise ValueError(
            f"task {name!r}: higher_is_better must be True (an accuracy) or False (a loss), got "
            f"{cls.higher_is_better!r}"
        )
    if not isinstance(cls.default_lr, dict):
        raise ValueError(
            f"task {name!r}: default_lr must be a dict of learning rates by optimizer name ('*' for the "
            f"others), got {cls.default_lr!r}"
        )
    return cls


def get_task(name: str, **options: object) -> Task:
    """Build the task ``name`` with its options (the plan's ``[task_options]`` table)."""
    return task_class(name)(**options)

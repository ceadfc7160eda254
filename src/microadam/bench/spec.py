"""A comparison plan: baseline, candidates, metrics, acceptance bar and stages, fixed before the run.

Plans are TOML files (see ``docs/compare.md``) or the built-in ``QUICK_PLAN``. Every
key is checked; a mistake gets a ``PlanError`` naming the key, what was found and
what was expected.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Criteria", "Plan", "PlanError", "Stage", "QUICK_PLAN", "device_kind", "load_plan", "parse_plan"]


class PlanError(ValueError):
    """The plan is malformed; the message names the key and what was expected."""


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    train_examples: int | None = None
    eval_examples: int | None = None
    eval_every: int = 0


@dataclass(frozen=True)
class Criteria:
    """The acceptance bar. ``None`` means the criterion is not checked.

    Attributes:
        max_metric_drop: for an accuracy metric, accuracy points (x100) the
            candidate's mean may fall below the baseline's; for a loss metric,
            percent the candidate's mean loss may exceed the baseline's.
        max_state_ratio: candidate optimizer-state bytes / baseline's.
        max_step_time_ratio: candidate median training-step time / baseline's.
        max_peak_memory_ratio: candidate peak memory / baseline's.
    """

    max_metric_drop: float | None = 0.5
    max_state_ratio: float | None = 0.2
    max_step_time_ratio: float | None = 2.0
    max_peak_memory_ratio: float | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    task: str
    baseline: str
    candidates: tuple[str, ...]
    stages: tuple[Stage, ...]
    criteria: Criteria = field(default_factory=Criteria)
    task_options: dict[str, Any] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "auto"
    lr_schedule: str = "constant"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # Plans written before lr_schedule existed keep their fingerprint (and their records).
        if d["lr_schedule"] == "constant":
            del d["lr_schedule"]
        return d

    def base_optimizer(self, name: str) -> str:
        """The registered optimizer behind ``name`` (a variant table names it with ``optimizer = ...``)."""
        return self.optimizers.get(name, {}).get("optimizer", name)

    def overrides(self, name: str) -> dict[str, Any]:
        """Constructor arguments of ``name`` from its ``[optimizers.NAME]`` table (``optimizer`` removed)."""
        return {k: v for k, v in self.optimizers.get(name, {}).items() if k != "optimizer"}

    def fingerprint(self) -> str:
        """A short hash of the whole plan (criteria included)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def run_key(self, stage: Stage, optimizer: str, seed: int) -> str:
        """Identity of one run: changes whenever a setting of the plan that shapes that run changes.

        A resumed ``compare`` reuses a record only under the same key, and the report and the
        verdict read only the records under the current plan's keys. Everything that can change a
        run's result is here: the task and its options, the stage (its name, steps, batch, data and
        evaluation subsets, evaluation interval), the optimizer with its arguments, the seed, the
        lr schedule, the kind of device ``device`` resolves to on this machine ("auto" is CUDA
        on one machine and the CPU on another) and the contents of the files and folders the task
        options name (a data file's bytes; a model folder's file names, sizes and times). The
        criteria, the plan's name and the other optimizers are not: they judge or name runs without
        changing them. Nor is the code's version: after changing an optimizer, use a new output folder.
        """
        what = dict(
            task=self.task,
            task_options=self.task_options,
            stage={k: v for k, v in asdict(stage).items() if k != "seeds"},
            optimizer=optimizer,
            overrides=self.optimizers.get(optimizer, {}),
            seed=seed,
            device=device_kind(self.device),
        )
        # Left out when constant, so records made before lr_schedule existed keep their keys.
        if self.lr_schedule != "constant":
            what["lr_schedule"] = self.lr_schedule
        # A data file or model folder rewritten under the same path is another run: its contents
        # are in the key. Left out when no option names one, so the built-in tasks keep their keys.
        data = self.data_digests()
        if data:
            what["data"] = data
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def data_digests(self) -> dict[str, str]:
        """The digests of the files and folders the task options name (and of a user's task file) that
        :meth:`run_key` holds: as they are now, or as :meth:`freeze_data` fixed them."""
        frozen = self.__dict__.get("_frozen_data")
        if frozen is not None:
            return dict(frozen)
        data = {k: _path_digest(p) for k, v in sorted(self.task_options.items()) if (p := _local_path(v)) is not None}
        # A task of the user's file: its code makes the run as much as its data does.
        from microadam.bench.tasks import task_file

        if (code := task_file(self.task)) is not None and Path(code).is_file():
            data["task:code"] = _path_digest(Path(code))
        return data

    def freeze_data(self) -> None:
        """Fix :meth:`data_digests` (and so the run keys) for this plan object at their current values.

        ``compare`` calls it before any run: a task that writes into its own data folder while it runs
        (a cache, a log) must not change the keys of this compare's runs, or the report would not find
        them. A later compare takes the folder as it finds it then (a changed folder is a rerun).
        """
        object.__setattr__(self, "_frozen_data", None)
        object.__setattr__(self, "_frozen_data", self.data_digests())  # frozen dataclass: a cache, not a field


def device_kind(device: str) -> str:
    """``"cpu"`` or ``"cuda"``: the kind of device the plan's ``device`` runs on, here ("auto" resolved)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _local_path(value: Any) -> Path | None:
    """The file or folder a task option names, if it is a string naming one that exists here."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) for the many run keys of one process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


# In every compare output folder (``--out``), made before any run key is computed. In a folder that
# holds it, the files compare writes there (OUTPUT_FILES) are left out of a task option folder's
# contents: an ``--out`` inside (or equal to) ``root = "."`` would otherwise change the run keys with
# every record written (each run "not run" in the report, and a resume rerunning everything). The
# folder's other files count, as anywhere else: a data file there is data.
OUTPUT_MARKER = ".microadam-compare"
OUTPUT_FILES = frozenset(
    {OUTPUT_MARKER, ".lock", "records.jsonl", "report.md", "report.html", "report.md.tmp", "report.html.tmp"}
)


def _path_digest(path: Path) -> str:
    """What a run depends on in the file or folder ``path`` (a task option's, :func:`_local_path`).

    A file (a data set): its bytes. A folder (a model): each file's name, size and modification
    time, not its bytes (gigabytes of weights), so a copy or a touch is a change too: a rerun, never
    a stale reuse. The files of compare output folders in it (``OUTPUT_MARKER``) are left out.
    """
    if path.is_file():
        return _file_digest(path)
    outputs = {m.parent for m in path.rglob(OUTPUT_MARKER)}
    listing = sorted(
        (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in path.rglob("*")
        if f.is_file() and not (f.name in OUTPUT_FILES and f.parent in outputs)
    )
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


# The built-in plan: `microadam compare` with no argument. Sized for <= 5 minutes on 2 CPU
# cores (MiniLM is about 0.5 s per training step at batch 16 there; measured 2026-11-28):
# 3 optimizers x 2 seeds x 30 steps, then the candidates still in x 2 seeds x 60 steps.
QUICK_PLAN: dict[str, Any] = {
    "name": "quick-tweets",
    "task": "tweets",
    "baseline": "adamw",
    "candidates": ["microadam", "adamw8bit"],
    "criteria": {"max_metric_drop": 0.5, "max_state_ratio": 0.2, "max_step_time_ratio": 2.0},
    "stages": [
        {"name": "small", "steps": 30, "batch_size": 16, "train_examples": 480, "eval_examples": 300, "seeds": [0, 1]},
        {"name": "medium", "steps": 60, "batch_size": 16, "train_examples": 960, "eval_examples": 300, "seeds": [0, 1]},
    ],
}

_TOP = {
    "name",
    "task",
    "baseline",
    "candidates",
    "stages",
    "criteria",
    "task_options",
    "optimizers",
    "device",
    "lr_schedule",
}
LR_SCHEDULES = ("constant", "linear", "cosine")
_STAGE = {"name", "steps", "batch_size", "seeds", "train_examples", "eval_examples", "eval_every"}


def _where(path: str) -> str:
    return f"plan key '{path}'"


def _expect(value: Any, types: type | tuple[type, ...], path: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise PlanError(f"{_where(path)}: expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise PlanError(f"{_where(path)}: expected {what}, got {type(value).__name__} {value!r}")
    return value


def _plain_values(value: Any, path: str) -> None:
    """Every value of the plan is a string, number, boolean, list or table: the plan is written to the
    records as JSON, and its run keys are hashes of JSON (a TOML date raised a traceback there)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _plain_values(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain_values(v, f"{path}[{i}]")
    elif not isinstance(value, (str, int, float, bool)):
        raise PlanError(
            f"{_where(path)}: expected a string, number, boolean, list or table, got {type(value).__name__} "
            f"{value!r}; write a date or time as a string (in quotes)"
        )


def _positive_int(value: Any, path: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    _expect(value, int, path, "a positive integer")
    if value < 1:
        raise PlanError(f"{_where(path)}: expected a positive integer, got {value}")
    return value


def _unknown(table: dict[str, Any], allowed: set[str], path: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise PlanError(f"{_where(path + extra[0])}: unknown key; expected one of {', '.join(sorted(allowed))}")


def _dotted_name(name: str, table: dict[str, Any], known: bool) -> None:
    """Raise if TOML read a dot in an optimizer's name as nesting: ``[optimizers.microadam-lr1.5e-3]``
    is the table ``5e-3`` inside the table ``microadam-lr1``, which would otherwise be reported as an
    unknown optimizer named ``microadam-lr1`` (or passed on as a keyword argument ``lr1``). ``known``:
    whether ``name`` is an optimizer or a variant (a table with ``optimizer = ...``)."""
    for key, inner in table.items():
        if not isinstance(inner, dict):
            continue
        full = f"{name}.{key}"
        while len(inner) == 1 and isinstance(next(iter(inner.values())), dict):
            key = next(iter(inner))
            full, inner = f"{full}.{key}", inner[key]
        # A dict-valued keyword argument of a known optimizer is left to it; the dot's nesting shows as
        # an unknown name, or as an inner table that names an optimizer or an lr.
        if known and not {"optimizer", "lr"} & set(inner):
            continue
        raise PlanError(
            f"{_where('optimizers.' + full)}: TOML reads the dots in {full!r} as tables inside tables; quote "
            f'the name ([optimizers."{full}"]) or write it without dots (e.g. [optimizers.{full.replace(".", "_")}])'
        )


def parse_plan(data: dict[str, Any]) -> Plan:
    """Validate a plan given as a dict (as read from TOML) and build a :class:`Plan`."""
    from microadam.bench.optimizers import OPTIMIZERS
    from microadam.bench.tasks import TASKS

    _expect(data, dict, "<root>", "a table")
    _plain_values(data, "")
    _unknown(data, _TOP, "")
    for key in ("task", "baseline", "candidates", "stages"):
        if key not in data:
            raise PlanError(f"{_where(key)}: missing; a plan needs task, baseline, candidates and stages")
    task = _expect(data["task"], str, "task", "a task name")
    if task not in TASKS and ":" not in task:
        raise PlanError(
            f"{_where('task')}: unknown task {task!r}; expected one of {', '.join(sorted(TASKS))}, "
            "or your own as 'file.py:ClassName' (docs/compare.md, 'Your own task')"
        )
    optimizers = _expect(data.get("optimizers", {}), dict, "optimizers", "a table of per-optimizer tables")
    for name, table in optimizers.items():
        _expect(table, dict, f"optimizers.{name}", "a table of keyword arguments (lr = ..., ...)")
        _dotted_name(name, table, known=name in OPTIMIZERS or "optimizer" in table)
        base = _expect(table.get("optimizer", name), str, f"optimizers.{name}.optimizer", "an optimizer name")
        if name not in OPTIMIZERS and "optimizer" not in table:
            raise PlanError(
                f"{_where('optimizers.' + name)}: unknown optimizer; expected one of {', '.join(OPTIMIZERS)}, "
                f'or a variant: a table with optimizer = "<one of them>" (e.g. [optimizers.microadam-lr3e-4])'
            )
        if base not in OPTIMIZERS:
            raise PlanError(
                f"{_where('optimizers.' + name + '.optimizer')}: unknown optimizer {base!r}; "
                f"expected one of {', '.join(OPTIMIZERS)}"
            )
        if "lr" in table:
            _expect(table["lr"], (int, float), f"optimizers.{name}.lr", "a number")
            if not (math.isfinite(table["lr"]) and table["lr"] > 0):
                raise PlanError(
                    f"{_where('optimizers.' + name + '.lr')}: expected a finite number > 0, got {table['lr']}"
                )
    known = set(OPTIMIZERS) | set(optimizers)
    baseline = _expect(data["baseline"], str, "baseline", "an optimizer name")
    candidates = _expect(data["candidates"], list, "candidates", "a list of optimizer names")
    if not candidates:
        raise PlanError(f"{_where('candidates')}: expected at least one optimizer name")
    for i, name in enumerate([baseline, *candidates]):
        path = "baseline" if i == 0 else f"candidates[{i - 1}]"
        _expect(name, str, path, "an optimizer name")
        if name not in known:
            raise PlanError(f"{_where(path)}: unknown optimizer {name!r}; expected one of {', '.join(sorted(known))}")
    if baseline in candidates:
        raise PlanError(f"{_where('candidates')}: the baseline {baseline!r} cannot also be a candidate")
    if len(set(candidates)) != len(candidates):
        raise PlanError(f"{_where('candidates')}: names repeat: {candidates!r}")

    stages_raw = _expect(data["stages"], list, "stages", "a list of [[stages]] tables")
    if not stages_raw:
        raise PlanError(f"{_where('stages')}: expected at least one [[stages]] table")
    stages = []
    for i, s in enumerate(stages_raw):
        p = f"stages[{i}]."
        _expect(s, dict, f"stages[{i}]", "a table")
        _unknown(s, _STAGE, p)
        for key in ("steps", "batch_size", "seeds"):
            if key not in s:
                raise PlanError(f"{_where(p + key)}: missing; every stage needs steps, batch_size and seeds")
        seeds = _expect(s["seeds"], list, p + "seeds", "a list of integer seeds")
        if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise PlanError(f"{_where(p + 'seeds')}: expected a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise PlanError(f"{_where(p + 'seeds')}: seeds repeat: {seeds!r}")
        eval_every = s.get("eval_every", 0)
        _expect(eval_every, int, p + "eval_every", "an integer >= 0")
        if eval_every < 0:
            raise PlanError(
                f"{_where(p + 'eval_every')}: expected an integer >= 0 (every this many steps; 0: only at the end), "
                f"got {eval_every}"
            )
        stages.append(
            Stage(
                name=_expect(s.get("name", f"stage{i + 1}"), str, p + "name", "a string"),
                steps=_positive_int(s["steps"], p + "steps"),
                batch_size=_positive_int(s["batch_size"], p + "batch_size"),
                seeds=tuple(seeds),
                train_examples=_positive_int(s.get("train_examples"), p + "train_examples", allow_none=True),
                eval_examples=_positive_int(s.get("eval_examples"), p + "eval_examples", allow_none=True),
                eval_every=eval_every,
            )
        )
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise PlanError(f"{_where('stages')}: stage names repeat: {names}")

    crit_raw = _expect(data.get("criteria", {}), dict, "criteria", "a table")
    allowed = {f for f in Criteria.__dataclass_fields__}
    _unknown(crit_raw, allowed, "criteria.")
    crit = {}
    for key, value in crit_raw.items():
        if value is False:  # TOML has no null: false switches a criterion off
            crit[key] = None
            continue
        _expect(value, (int, float), f"criteria.{key}", "a number, or false to not check it")
        # NaN compares false with everything: "value <= nan" would fail every candidate.
        if math.isnan(value) or value < 0:
            raise PlanError(f"{_where('criteria.' + key)}: expected a number >= 0, got {value}")
        crit[key] = float(value)
    defaults = asdict(Criteria())
    criteria = Criteria(**{**defaults, **crit}) if crit_raw else Criteria()

    task_options = _expect(data.get("task_options", {}), dict, "task_options", "a table")
    _check_task_options(task, task_options)
    device = _expect(data.get("device", "auto"), str, "device", "'auto', 'cpu' or 'cuda'")
    _check_device(device)
    for name, table in optimizers.items():
        base = table.get("optimizer", name)
        kwargs = {k: v for k, v in table.items() if k not in ("optimizer", "lr")}
        _check_optimizer_args(name, base, float(table.get("lr", 1e-3)), kwargs)
    lr_schedule = _expect(data.get("lr_schedule", "constant"), str, "lr_schedule", f"one of {LR_SCHEDULES}")
    if lr_schedule not in LR_SCHEDULES:
        raise PlanError(f"{_where('lr_schedule')}: unknown schedule {lr_schedule!r}; expected one of {LR_SCHEDULES}")
    _check_learning_rates(task, task_options, [baseline, *candidates], optimizers)
    name = _expect(data.get("name", "plan"), str, "name", "a string")
    # The name is the default output folder (runs/<name>): it must not climb out of it.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise PlanError(f"{_where('name')}: expected a folder name without '/', '\\' or NUL, got {name!r}")
    return Plan(
        name=name,
        task=task,
        baseline=baseline,
        candidates=tuple(candidates),
        stages=tuple(stages),
        criteria=criteria,
        task_options=dict(task_options),
        optimizers={k: dict(v) for k, v in optimizers.items()},
        device=device,
        lr_schedule=lr_schedule,
    )


def _check_task_options(task: str, options: dict[str, Any]) -> None:
    """Each ``[task_options]`` key must be an argument of the task's constructor, which must accept the values."""
    from microadam.bench.tasks import TASKS, task_class

    try:
        cls = task_class(task)
    except ValueError as e:
        raise PlanError(f"{_where('task')}: {e}") from e
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [
            n
            for n, p in params.items()
            if n != "self" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        for key in options:
            if key not in accepted:
                raise PlanError(
                    f"{_where('task_options.' + key)}: the {task} task has no option {key!r}; "
                    + (f"expected one of {', '.join(accepted)}" if accepted else "it takes no options")
                )
    try:
        cls(**options)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{_where('task_options')}: the {task} task rejects {options}: {e}") from e
    except Exception as e:  # a task of the user's may raise anything
        if task in TASKS:
            raise
        raise PlanError(f"{_where('task_options')}: {task}({options}) raised {type(e).__name__}: {e}") from e


def _check_learning_rates(
    task: str, options: dict[str, Any], names: list[str], optimizers: dict[str, dict[str, Any]]
) -> None:
    """Each optimizer that runs has a learning rate: its table's ``lr``, or the task's ``default_lr``
    (by optimizer, or ``"*"``). A task of the user's may have none; a run would fail with a KeyError."""
    from microadam.bench.tasks import task_class

    task_obj = task_class(task)(**options)  # _check_task_options built it already
    for name in names:
        table = optimizers.get(name, {})
        if "lr" in table:
            continue
        try:
            task_obj.lr_for(table.get("optimizer", name))
        except KeyError:
            raise PlanError(
                f"{_where('optimizers.' + name)}: no learning rate for {name!r}: the {task} task's default_lr has "
                f"neither it nor '*'; set lr = ... in [optimizers.{name}], or default_lr in the task"
            ) from None


def _check_device(device: str) -> None:
    """The device must be one the runner knows how to time and measure: the CPU or a CUDA GPU.
    Whether a GPU is there is checked when the run starts (a plan may be read on another machine)."""
    import torch

    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise PlanError(
            f"{_where('device')}: unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N' "
            '(e.g. device = "cuda" for the first GPU)'
        )


def _check_optimizer_args(name: str, base: str, lr: float, kwargs: dict[str, Any]) -> None:
    """Build ``base`` with ``kwargs`` on a tiny model, so a misspelt or out-of-range argument stops the
    plan here instead of failing every run of that optimizer after the baseline's.

    The dummy decides only when the optimizer builds on it without the arguments: one that needs
    another kind of model or device (or is not installed) is left to its runs, which record the error.
    """
    import torch

    from microadam.bench.optimizers import build_optimizer, get_spec

    spec = get_spec(base)
    if not kwargs or not spec.installed():
        return

    def failure(kw: dict[str, Any]) -> Exception | None:
        try:
            build_optimizer(base, torch.nn.Linear(4, 4), lr, **kw)
        except Exception as e:  # third-party constructors raise anything: TypeError, ValueError, AssertionError...
            return e
        return None

    if failure({}) is not None or (error := failure(kwargs)) is None:
        return
    for key, value in kwargs.items():
        if (e := failure({key: value})) is not None:
            raise PlanError(
                f"{_where(f'optimizers.{name}.{key}')}: {spec.label} rejects {key} = {value!r} "
                f"({type(e).__name__}: {e}); correct or remove it"
            ) from e
    raise PlanError(
        f"{_where('optimizers.' + name)}: {spec.label} rejects these arguments together: {kwargs} "
        f"({type(error).__name__}: {error}); correct or remove one of them"
    ) from error


def load_plan(path: str | Path) -> Plan:
    """Read and validate a TOML plan file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise PlanError("reading a TOML plan on Python 3.10 needs tomli: pip install tomli") from e
    path = Path(path)
    if not path.exists():
        raise PlanError(f"plan file {str(path)!r} does not exist")
    if not path.is_file():
        raise PlanError(f"plan file {str(path)!r} is a directory, not a file; give the path of a .toml plan")
    try:
        # TOML is UTF-8 by its specification; the locale's encoding would misread it on some systems.
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PlanError(f"plan file {str(path)!r} is not UTF-8 text ({e}); save it as UTF-8") from e
    except OSError as e:
        raise PlanError(f"plan file {str(path)!r} cannot be read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"plan file {str(path)!r} is not valid TOML: {e}") from e
    return parse_plan(data)

"""The Python API: what the commands do, as functions (the CLI calls these).

    import tunelab
    task = tunelab.load_task("examples/tasks/sst2.yaml")
    run = tunelab.train(task, method="prompt-tuning", out="runs/x", steps=100, lr=0.3)
    model = tunelab.load("runs/x")
    model.predict(["a gripping film"])
    results = tunelab.compare(task, methods=["zero-shot", "prompt-tuning", "lora"], out="cmp")
    tunelab.advise(tasks=10, memory_gb=16, results="cmp")

Settings are keyword arguments with the names and checks of `--set` (`lr`, `batch_size`,
`reparameterize`, ...). Bad input raises `TunelabError` (a bad setting: `SettingError`, whose
`key` names it); nothing here calls `sys.exit`. Progress (the lines the commands print while
they work, and progress bars) goes to the terminal unless `progress=False`; results are
returned, not printed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from tunelab.compare.advise import Advice
from tunelab.compare.run import DEFAULT_METHODS, CompareResult
from tunelab.errors import TunelabError
from tunelab.pipeline import TrainResult
from tunelab.tasks import TaskSpec

__all__ = [
    "Advice",
    "CompareResult",
    "TrainResult",
    "advise",
    "compare",
    "load",
    "load_task",
    "train",
]


def load_task(path_or_builtin_name: str | Path, **overrides) -> TaskSpec:
    """A task from a YAML file, or a built-in task by name (`demo`). `overrides` replace
    top-level keys of the file (e.g. `calibrate="content-free"`), checked like the file."""
    from tunelab.tasks.spec import load_task as read

    return read(path_or_builtin_name, overrides=overrides or None)


def train(
    task: TaskSpec | str | Path,
    method: str = "prompt-tuning",
    *,
    out: str | Path,
    steps: int | None = None,
    seed: int | None = None,
    model: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    baseline: bool = False,
    calibrate: bool = False,
    eval_split: str | None = None,
    limit: int | None = None,
    validate_only: bool = False,
    validation_log: str | Path | None = None,
    **settings,
) -> TrainResult | None:
    """Train `method` on `task` and write the artifact to `out` (`tunelab train`).

    `steps`, `seed` and `settings` are training and method settings (default 200 steps, seed
    42; `tunelab train --help` lists them all). `model`: hub id, local directory or .gguf
    (default the built-in SmolLM2-135M-Instruct). `resume` continues the run in `out`;
    `overwrite` replaces what `out` holds. `baseline` also scores the untrained model;
    `calibrate` measures and stores content-free calibration; `eval_split` chooses what is
    reported; `limit` keeps the first N rows of it and of validation (a quick look);
    `validate_only` never reads the reported split; `validation_log` gets each validation result
    as a JSON line. Returns the result on rank 0 (None on the other ranks of a distributed
    run)."""
    from tunelab.pipeline import make_request, train_task

    if steps is not None:
        settings["steps"] = steps
    if seed is not None:
        settings["seed"] = seed
    request = make_request(
        _task(task),
        method,
        out,
        settings,
        calibrate=calibrate,
        model=model,
        resume=resume,
        overwrite=overwrite,
        baseline=baseline,
        eval_split=eval_split,
        limit=limit,
        validate_only=validate_only,
        validation_log=Path(validation_log) if validation_log else None,
        progress=progress,
    )
    return train_task(request, say=print if progress else _silent)


def load(path: str | Path, **kw):
    """Open an artifact for inference: the tuned model with the task it was trained on
    (template, verbalizer, demonstrations, max_length). See tunelab/evaluate/loaded.py."""
    from tunelab.evaluate.loaded import load as open_artifact

    return open_artifact(path, **kw)


def compare(
    task: TaskSpec | str | Path,
    methods: list[str] | str = DEFAULT_METHODS,
    *,
    out: str | Path,
    seeds: list[int] | str | None = None,
    tune: int | None = None,
    model: str | None = None,
    eval_split: str | None = None,
    demos: int = 1,
    limit: int | None = None,
    calibrate: bool = False,
    label_words: str = "task",
    search: list[str] | str = (),
    prune: str = "median",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    **settings,
) -> CompareResult:
    """Train and score every method on the same data, budget and seeds, each in its own
    process (`tunelab compare`); results.json, report.md and report.html go to `out`.

    `seeds` default to 42 (with `tune`: 1, 2, 3). `tune=N` first searches each trained
    method's settings with N trials (`search`: up to two knobs besides the learning rate).
    `settings` are the training settings every trained method shares (`steps`, `batch_size`,
    ...). `command` is recorded in results.json (default: the equivalent command line)."""
    from tunelab.compare.run import make_comparison, run_comparison
    from tunelab.train.config import setting_text

    task_ref = _task_file(task)
    pairs = [f"{k}={setting_text(v)}" for k, v in settings.items()]
    say = print if progress else _silent
    if command is None:
        command = _command_line(task_ref, methods, out, seeds, tune, model, pairs)
    comparison = make_comparison(
        task_ref,
        methods=methods,
        seeds=seeds,
        settings=pairs,
        tune=tune or 0,
        search=search,
        label_words=label_words,
        prune=prune,
        say=say,
        out=out,
        model=model,
        eval_split=eval_split,
        demos=demos,
        limit=limit,
        calibrate=calibrate,
        resume=resume,
        overwrite=overwrite,
        command=command,
    )
    return run_comparison(comparison, log=_stderr if progress else _silent, echo=progress)


def advise(
    *,
    memory_gb: float,
    tasks: int = 1,
    priority: str = "accuracy",
    results: str | Path | None = None,
    model: str | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
) -> Advice:
    """Recommend a method (`tunelab advise`) for `model`, `tasks` tasks to serve and
    `memory_gb` for training, by `priority` (accuracy, cost or flexibility); with `results`
    (a compare folder or its results.json) by the accuracy measured there. `batch_size` and
    `seq_len` (tokens per row) size the training memory estimate."""
    from tunelab.compare.advise import advise as recommend

    return recommend(
        model,
        memory_gb=memory_gb,
        tasks=tasks,
        priority=priority,
        results=Path(results) if results else None,
        batch_size=batch_size,
        seq_len=seq_len,
    )


def _task(task: TaskSpec | str | Path) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else load_task(task)


def _task_file(task: TaskSpec | str | Path) -> str:
    """The task file a comparison's runs read (each is a process of its own, reading a file)."""
    if not isinstance(task, TaskSpec):
        return str(task)
    if Path(task.source).is_file() and load_task(task.source) == task:
        return task.source
    raise TunelabError(
        f"{task.source}: compare runs every method in a process of its own, from the task "
        "file; this task differs from its file (overrides?): write it to a file and pass that"
    )


def _command_line(task_ref, methods, out, seeds, tune, model, pairs) -> str:
    """The `tunelab compare` command that runs the same comparison (kept in results.json)."""
    words = ["compare", "--task", task_ref]
    words += ["--methods", methods if isinstance(methods, str) else ",".join(methods)]
    words += ["--out", str(out)]
    if seeds is not None:
        words += ["--seeds", seeds if isinstance(seeds, str) else ",".join(map(str, seeds))]
    words += ["--tune", str(tune)] if tune else []
    words += ["--model", model] if model else []
    words += [x for kv in pairs for x in ("--set", kv)]
    return "tunelab " + shlex.join(words)


def _silent(*_a, **_k) -> None:
    pass


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)

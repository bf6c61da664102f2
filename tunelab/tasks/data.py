"""Load a task's splits: read files, check every row, carve holdout/validation, sample few-shot."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.tasks.readers import Record, read_dataset, read_rows
from tunelab.tasks.spec import TaskSpec


def _check_rows(task: TaskSpec, split: str, rows: list[Record]) -> None:
    if not rows:
        where = task.data.get(split, task.source)
        raise TunelabError(f"{where}: split {split!r} has no rows")
    needed = list(task.input_fields) + task.target_fields
    needed += [task.label_field] if task.label_field else []
    for r in rows:
        for name in needed:
            if name not in r.fields:
                present = ", ".join(map(str, r.fields)) or "none"
                raise TunelabError(f"{r.where}: missing field {name!r} (fields present: {present})")
            value = r.fields[name]
            if value is None or isinstance(value, (dict, list)):
                # it would go into the prompt as "" or as Python's repr of the structure
                raise TunelabError(
                    f"{r.where}: field {name!r} must be text or a number, got {value!r:.80}"
                )
        if task.label_field:
            label = str(r.fields[task.label_field])
            if label not in task.verbalizer:
                raise TunelabError(
                    f"{r.where}: label {label!r} is not in the verbalizer "
                    f"(labels: {', '.join(task.labels)})"
                )


def label_of(task: TaskSpec, record: Record) -> str:
    return str(record.fields[task.label_field])


def _per_class(task: TaskSpec, rows: list[Record], k: int, rng: random.Random):
    """Split rows into (k per class, the rest), drawn with rng."""
    by_label: dict[str, list[Record]] = defaultdict(list)
    for r in rows:
        by_label[label_of(task, r)].append(r)
    taken: list[Record] = []
    for label in task.labels:
        group = by_label.get(label, [])
        taken += rng.sample(group, min(k, len(group)))
    ids = {id(r) for r in taken}
    rng.shuffle(taken)
    return taken, [r for r in rows if id(r) not in ids]


def _carve(rows: list[Record], size: float, rng: random.Random):
    n = int(round(size * len(rows))) if size < 1 else int(size)
    n = min(n, len(rows) - 1)
    order = list(range(len(rows)))
    rng.shuffle(order)
    carved = set(order[:n])
    # carved rows stay shuffled: files are often sorted by label, and `--limit N` should then
    # still look at a fair sample
    return [rows[i] for i in order[:n]], [r for i, r in enumerate(rows) if i not in carved]


def _wanted(split: str, only: set[str] | None) -> bool:
    return only is None or split == "train" or split in only


def load_splits(task: TaskSpec, only: set[str] | None = None) -> dict[str, list[Record]]:
    """Every split of the task, checked, with holdout, few-shot and validation applied.

    With `only`, split files not named there are never opened (train always is): a search
    that selects on validation cannot read the split it will be reported on.

    Order (seeded, so every run sees the same rows): split files are read; `holdout` splits are
    carved from train; few-shot sampling keeps k rows per class of train; a missing validation
    split is carved from the remaining train rows (k per class under few-shot, as in LM-BFF).
    """
    if task.dataset:
        name, config = task.dataset["name"], task.dataset.get("config")
        names = [s for s in task.dataset.get("splits", ["train"]) if _wanted(s, only)]
        splits = {s: read_dataset(name, config, s) for s in names}
    else:
        files = {s: p for s, p in task.data.items() if _wanted(s, only)}
        splits = {s: read_rows(Path(p), task.encoding) for s, p in files.items()}
    for split, rows in splits.items():
        _check_rows(task, split, rows)

    rng = random.Random(task.validation.seed)
    train = splits["train"]
    for split, size in task.holdout.items():
        splits[split], train = _carve(train, size, rng)
    rest: list[Record] = []
    if task.few_shot is not None:
        if task.label_field is None:
            # keep k rows (carved, seeded); the rest may still give a validation split
            train, rest = _carve(train, task.few_shot.k, random.Random(task.few_shot.seed))
        else:
            train, rest = _per_class(
                task, train, task.few_shot.k, random.Random(task.few_shot.seed)
            )
    val_name = task.validation.split
    if val_name not in splits and task.validation.size > 0:
        if task.few_shot is not None and task.label_field is not None:
            val, _ = _per_class(task, rest, task.few_shot.k, rng)
        else:
            val, train = _carve(train, task.validation.size, rng)
        if val:  # too few rows to carve any: train without validation (no early stopping)
            splits[val_name] = val
    splits["train"] = train
    if only is not None:  # carved splits too: what was not asked for is not handed out
        splits = {s: rows for s, rows in splits.items() if _wanted(s, only)}
    for split, rows in splits.items():
        if not rows:
            raise TunelabError(f"{task.source}: split {split!r} is empty after sampling")
    return splits

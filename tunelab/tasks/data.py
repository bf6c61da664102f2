"""Load a task's splits: read files, check every row, carve holdout/validation, sample few-shot."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

from tunelab.errors import TunelabError
from tunelab.tasks.readers import Record, read_dataset, read_rows
from tunelab.tasks.spec import RowFilter, TaskSpec, is_blank


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


class Filtered(NamedTuple):
    """What `filter:` did to one split file."""

    kept: int
    read: int
    blank: int  # rows dropped for an empty value where min/max wanted a number
    tested: tuple[str, ...]  # the filter fields this file has
    absent: tuple[str, ...]  # those it lacks: their tests skipped here


def _filter_splits(task: TaskSpec, splits: dict[str, list[Record]]) -> dict[str, Filtered]:
    """Keep the rows of each split that pass every test of `filter:` whose field the split's
    rows have (a test file without an annotation column stays whole, and says so). A field no
    split has is an error: a typo, or the wrong column."""
    tests = task.row_filters()
    has = {s: {t.name for t in tests if any(t.name in r.fields for r in rows)}
           for s, rows in splits.items()}  # fmt: skip
    for t in tests:
        if splits and not any(t.name in names for names in has.values()):
            rows = next(iter(splits.values()))
            fields = ", ".join(map(str, rows[0].fields)) if rows else "none"
            raise TunelabError(
                f"{task.where('filter.' + t.name)}: filter.{t.name}: no row of "
                f"{', '.join(splits)} has a field {t.name!r} (fields: {fields})"
            )
    out = {}
    for split, rows in splits.items():
        applied = [t for t in tests if t.name in has[split]]
        splits[split], blank = _filter_rows(task, split, rows, applied)
        absent = tuple(t.name for t in tests if t.name not in has[split])
        names = tuple(t.name for t in applied)
        out[split] = Filtered(len(splits[split]), len(rows), blank, names, absent)
    return out


def _filter_rows(
    task: TaskSpec, split: str, rows: list[Record], tests: list[RowFilter], under: str = "filter"
) -> tuple[list[Record], int]:
    """The rows that pass every test (in file order), and how many were dropped for an empty
    value where `min`/`max` wanted a number; `under` is the task key the tests came from."""
    kept, blank = [], 0
    for r in rows:
        for t in tests:
            if t.name not in r.fields:
                raise TunelabError(f"{r.where}: missing field {t.name!r}, which `{under}:` tests")
            value = r.fields[t.name]
            try:
                if not t.keeps(value):
                    blank += t.numeric and is_blank(value)
                    break
            except ValueError:
                raise TunelabError(
                    f"{r.where}: field {t.name!r} is {value!r}, not a number "
                    f"({under}.{t.name} compares it with min/max)"
                ) from None
        else:
            kept.append(r)
    if rows and not kept:
        raise TunelabError(
            f"{rows[0].source}: split {split!r}: `{under}:` ({task.where(under)}) kept none "
            f"of its {len(rows):,} rows"
        )
    return kept, blank


def filter_summary(filtered: dict[str, Filtered]) -> list[str]:
    """`train: 18,132 of 38,158 rows kept by filter (5,460 dropped for an empty value)`, one
    line per split file (see `load_splits`)."""
    lines = []
    for split, f in filtered.items():
        if not f.tested:
            lines.append(f"{split}: not filtered (its rows have no {', '.join(f.absent)})")
            continue
        line = f"{split}: {f.kept:,} of {f.read:,} rows kept by filter"
        notes = [f"{f.blank:,} dropped for an empty value"] if f.blank else []
        notes += [f"no {', '.join(f.absent)} to test"] if f.absent else []
        lines.append(line + (f" ({'; '.join(notes)})" if notes else ""))
    return lines


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


def _count(size: float, rows: list[Record]) -> int:
    """`size` as a number of rows: a fraction (< 1) of `rows`, else a count."""
    return int(round(size * len(rows))) if size < 1 else int(size)


def _carve(rows: list[Record], size: float, rng: random.Random):
    n = _count(size, rows)
    n = min(n, len(rows) - 1)
    order = list(range(len(rows)))
    rng.shuffle(order)
    carved = set(order[:n])
    # carved rows stay shuffled: files are often sorted by label, and `--limit N` should then
    # still look at a fair sample
    return [rows[i] for i in order[:n]], [r for i, r in enumerate(rows) if i not in carved]


def _inputs(task: TaskSpec, r: Record) -> tuple:
    return tuple(str(r.fields.get(name)) for name in task.input_fields)


def _balanced(task: TaskSpec, split: str, rows: list[Record], size: float, rng: random.Random):
    """`holdout_balanced`: carve `size` rows (or a fraction) as the same number of each label,
    so that accuracy on the split weighs every class alike; too few of a label is an error."""
    n = _count(size, rows)
    per = n // len(task.labels)
    counts = Counter(label_of(task, r) for r in rows)
    short = [label for label in task.labels if counts[label] <= per]
    if per < 1 or short:
        raise TunelabError(
            f"{task.where('holdout.' + split)}: holdout.{split}: {n} rows balanced over "
            f"{len(task.labels)} labels needs more than {per} of each in train; "
            + ", ".join(f"{label!r} has {counts[label]}" for label in short or task.labels)
        )
    return _per_class(task, rows, per, rng)


def _wanted(split: str, only: set[str] | None) -> bool:
    return only is None or split == "train" or split in only


def load_splits(
    task: TaskSpec, only: set[str] | None = None, filtered: dict | None = None
) -> dict[str, list[Record]]:
    """Every split of the task, checked, with holdout, few-shot and validation applied.

    With `only`, split files not named there are never opened (train always is): a search
    that selects on validation cannot read the split it will be reported on. With `filter:`
    in the task, `filtered` (when given) receives what it did to each split file (Filtered).

    Order (seeded, so every run sees the same rows): split files are read and `filter:` keeps
    the rows that pass it; `holdout` splits are
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
    if task.filter:
        done = _filter_splits(task, splits)
        if filtered is not None:
            filtered.update(done)
    for split, rows in splits.items():
        _check_rows(task, split, rows)

    rng = random.Random(task.validation.seed)
    train = splits["train"]
    for split, size in task.holdout.items():
        pool = train
        if task.holdout_filter:  # carve only from the rows it keeps; train keeps the others too
            pool, _ = _filter_rows(task, "train", train, task.holdout_filters(), "holdout_filter")
        if task.holdout_balanced:
            splits[split], _ = _balanced(task, split, pool, size, rng)
        else:
            splits[split], _ = _carve(pool, size, rng)
        # a row whose inputs read the same as a held-out row's (a retweet, a repost) leaves
        # train too: the split then scores rows that nothing was trained on
        held = {_inputs(task, r) for r in splits[split]}
        train = [r for r in train if _inputs(task, r) not in held]
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

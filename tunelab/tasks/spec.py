"""The task spec: what a task YAML says, checked on load with errors that name file and line."""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError, at
from tunelab.tasks.schema import build
from tunelab.tasks.template import placeholders, template_problem
from tunelab.tasks.yamlfile import read_yaml

BUILTIN_DIR = Path(__file__).parent / "builtin"
CONTENT_FREE = ("N/A", "", "[MASK]")  # the inputs calibration measures the label bias on


@dataclass
class Demonstrations:
    """Worked examples placed in the prompt before the input (Brown et al. 2020; LM-BFF)."""

    k: int = 0  # per class; in all for generation
    select: str = "random"  # random | similar | same-database (text-to-SQL)
    separator: str = "\n\n"
    seed: int = 0
    template: str | None = None  # generation: how a demonstration's input reads (default: the
    # task's template; for SQL, e.g. without the schema, which would repeat per demonstration)
    train: bool = False  # training rows carry them too, drawn afresh each epoch (LM-BFF)


@dataclass
class FewShot:
    """Sample k training rows per class (LM-BFF's K-shot setting)."""

    k: int
    seed: int = 13


@dataclass
class Generation:
    """Greedy decoding for tasks with a `target:` template."""

    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=lambda: ["\n"])  # the output ends before any of these


@dataclass
class Sql:
    """Text-to-SQL: each row's database schema goes into the prompt as `{schema}`, and the
    output is judged by execution on generated SQLite databases (tunelab/evaluate/sql)."""

    tables: str  # a Spider tables.json; relative to the task file
    db_field: str = "db_id"
    schema_format: str = "compact"  # compact: table(col, ...) lines | create: CREATE TABLE
    databases: int = 3  # generated databases per schema; a prediction must match on all
    seed: int = 0
    timeout: float = 2.0  # seconds per query before it counts as wrong


@dataclass
class Validation:
    """Where validation rows come from: a named split, else carved from train (seeded)."""

    split: str = "validation"
    size: float = 0.1  # a fraction of train (< 1) or a row count; k per class under few_shot
    seed: int = 0


FILTER_OPERATORS = ("min", "max", "in", "not_in")


@dataclass(frozen=True)
class RowFilter:
    """One field's test under `filter:` (rows failing it are dropped before any splitting):
    `min`/`max` numeric and inclusive, `in`/`not_in` compared as text."""

    name: str  # the row field tested
    min: float | None = None
    max: float | None = None
    among: tuple[str, ...] | None = None  # `in`
    not_among: tuple[str, ...] = ()  # `not_in`

    @classmethod
    def parse(cls, name: str, ops: dict, where, under: str = "filter") -> RowFilter:
        """From `{min: 0.9}` or `{in: [a, b]}` under the task key `under`; `where(key)` names a
        key's file:line."""
        key = f"{under}.{name}"
        if not ops:
            raise TunelabError(
                f"{where(key)}: {key}: no operator (use {', '.join(FILTER_OPERATORS)})"
            )
        values: dict = {}
        for op, value in ops.items():
            if op not in FILTER_OPERATORS:
                raise TunelabError(
                    f"{where(f'{key}.{op}')}: {key}: unknown operator {op!r} (known: "
                    f"{', '.join(FILTER_OPERATORS)})"
                )
            if op in ("min", "max"):
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if not number or math.isnan(value):
                    raise TunelabError(
                        f"{where(f'{key}.{op}')}: {key}.{op}: expected a number, got {value!r}"
                    )
                values[op] = float(value)
                continue
            items = value if isinstance(value, list) else [value]
            if not items or any(isinstance(v, dict | list) or v is None for v in items):
                raise TunelabError(
                    f"{where(f'{key}.{op}')}: {key}.{op}: expected a value or a list of values, "
                    f"got {value!r}"
                )
            values["among" if op == "in" else "not_among"] = tuple(str(v) for v in items)
        if values.get("min", -math.inf) > values.get("max", math.inf):
            raise TunelabError(
                f"{where(key)}: {key}: min {values['min']:g} is above max {values['max']:g}: "
                "no row could pass"
            )
        return cls(name, **values)

    @property
    def numeric(self) -> bool:
        return self.min is not None or self.max is not None

    def keeps(self, value) -> bool:
        """Whether a row whose field holds `value` passes. An empty value (a blank CSV cell,
        JSON null) fails `min`/`max`; any other value they cannot read as a number raises
        ValueError."""
        if self.numeric:
            if is_blank(value):
                return False
            number = _number(value)
            if self.min is not None and number < self.min:
                return False
            if self.max is not None and number > self.max:
                return False
        text = "" if value is None else str(value)
        return (self.among is None or text in self.among) and text not in self.not_among


def is_blank(value) -> bool:
    """A missing value: JSON null, or a CSV cell of nothing but spaces."""
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value) -> float:
    """A field's value as a number: numbers as they are, text parsed (CSV cells are text)."""
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value) if isinstance(value, int | float) else float(str(value).strip())
    if math.isnan(number):
        raise ValueError(value)
    return number


@dataclass
class TaskSpec:
    name: str
    template: str
    input_fields: list[str]
    label_field: str | None = None
    verbalizer: dict[str, list[str]] = field(default_factory=dict)
    target: str | None = None  # generation: the text to produce after the prompt, a template
    generation: Generation = field(default_factory=Generation)
    sql: Sql | None = None
    data: dict[str, str] = field(default_factory=dict)  # split -> absolute file path
    dataset: dict | None = None  # {"name": ..., "config": ...} for Hugging Face datasets
    holdout: dict[str, float] = field(default_factory=dict)  # split -> rows (or a fraction)
    holdout_balanced: bool = False  # each holdout split: as many rows of every label
    # field -> tests, as `filter`: the rows a holdout split may take (train keeps the rest)
    holdout_filter: dict[str, dict] = field(default_factory=dict)
    answer_prefix: str = " "
    few_shot: FewShot | None = None
    # field -> {min, max, in, not_in}: rows kept before any splitting (see RowFilter)
    filter: dict[str, dict] = field(default_factory=dict)
    validation: Validation = field(default_factory=Validation)
    demonstrations: Demonstrations = field(default_factory=Demonstrations)
    encoding: str = "utf-8"
    calibrate: str | None = None  # content-free: divide out the label bias (Zhao et al. 2021)
    content_free: list[str] = field(default_factory=lambda: list(CONTENT_FREE))
    source: str = "<dict>"
    lines: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    @property
    def is_generation(self) -> bool:
        return self.target is not None

    def row_filters(self) -> list[RowFilter]:
        """`filter:` as one test per field (a row must pass them all)."""
        return [RowFilter.parse(name, ops, self.where) for name, ops in self.filter.items()]

    def holdout_filters(self) -> list[RowFilter]:
        """`holdout_filter:` as one test per field: the rows holdout splits are carved from."""
        return [
            RowFilter.parse(name, ops, self.where, "holdout_filter")
            for name, ops in self.holdout_filter.items()
        ]

    @property
    def target_fields(self) -> list[str]:
        return placeholders(self.target) if self.target else []

    def where(self, key: str) -> str:
        """`file:line` of a key of the task file, for error messages."""
        return at(self.source, self.lines.get(key))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("lines")
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>", lines: dict | None = None) -> TaskSpec:
        """Build and check a spec from a plain mapping (a YAML file or an artifact's copy)."""
        lines = lines or {}

        def where(key: str) -> str:
            # the line of the key, else of the nearest enclosing key that has one
            while key and key not in lines:
                key = key.rpartition(".")[0]
            return at(source, lines.get(key))

        d = {k: v for k, v in d.items() if k != "source"}
        spec = build(cls, d, where, skip=("source", "lines"))
        spec.source, spec.lines = source, lines
        spec.check()
        return spec

    def check(self) -> None:
        """Reject values that cannot work, naming the key's line."""
        if not self.name.strip():
            raise TunelabError(f"{self.where('name')}: name: must not be empty")
        if not self.input_fields or len(set(self.input_fields)) < len(self.input_fields):
            raise TunelabError(
                f"{self.where('input_fields')}: input_fields: expected distinct field names, "
                f"got {self.input_fields!r}"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise TunelabError(
                f"{self.where('encoding')}: encoding: unknown text encoding {self.encoding!r}"
            ) from None
        self._check_templates()
        self._check_kind()
        self._check_numbers()
        self.row_filters()  # a bad `filter:` raises here, naming its line
        self.holdout_filters()
        self._check_calibrate()
        if not self.data and not self.dataset:
            raise TunelabError(
                f"{self.source}: the task file needs `data:` (split: file) or `dataset:`"
            )
        if "train" not in self.data and not self.dataset:
            raise TunelabError(f"{self.where('data')}: `data:` needs a `train:` file")
        if self.dataset is not None and not isinstance(self.dataset.get("name"), str):
            raise TunelabError(
                f"{self.where('dataset')}: dataset: expected a mapping with `name:` (a Hugging "
                f"Face dataset id), got {self.dataset!r}"
            )
        selects = ("random", "similar") + (("same-database",) if self.sql else ())
        if self.demonstrations.select not in selects:
            raise TunelabError(
                f"{self.where('demonstrations.select')}: demonstrations.select must be "
                f"{' or '.join(map(repr, selects))}, got {self.demonstrations.select!r}"
            )
        if self.sql is not None:
            if self.target is None:
                raise TunelabError(f"{self.where('sql')}: `sql:` needs a `target:` (the query)")
            if self.sql.schema_format not in ("compact", "create"):
                raise TunelabError(
                    f"{self.where('sql.schema_format')}: sql.schema_format must be 'compact' or "
                    f"'create', got {self.sql.schema_format!r}"
                )
            if self.sql.databases < 1 or not 0 < self.sql.timeout < math.inf:
                raise TunelabError(
                    f"{self.where('sql')}: sql.databases must be >= 1 and sql.timeout > 0"
                )

    def _check_templates(self) -> None:
        """Every template a valid format string whose placeholders name input fields."""
        derived = ["schema"] if self.sql is not None else []  # filled in from the database id
        templates = [("template", self.template), ("target", self.target)]
        templates.append(("demonstrations.template", self.demonstrations.template))
        for key, text in templates:
            if text is None:
                continue
            problem = template_problem(text)
            if problem:
                raise TunelabError(f"{self.where(key)}: {key}: {problem}: {text!r}")
            if key == "target":  # the target reads the row's other fields (checked per row)
                continue
            for name in placeholders(text):
                if name not in self.input_fields and name not in derived:
                    raise TunelabError(
                        f"{self.where(key)}: template placeholder {{{name}}} names no input "
                        f"field (input_fields: {', '.join(self.input_fields)})"
                    )

    def _check_kind(self) -> None:
        """Classification (label_field and verbalizer) or generation (target), not both."""
        if self.target is not None:
            if self.label_field is not None or self.verbalizer:
                raise TunelabError(
                    f"{self.where('target')}: a task has either `target:` (generation) or "
                    "`label_field:` and `verbalizer:` (classification), not both"
                )
            if self.generation.max_new_tokens < 1:
                raise TunelabError(
                    f"{self.where('generation.max_new_tokens')}: max_new_tokens must be >= 1"
                )
        elif self.label_field is None:
            raise TunelabError(
                f"{self.source}: a task needs `label_field:` and `verbalizer:` (classification) "
                "or `target:` (generation)"
            )
        elif self.generation != Generation():  # it would be ignored
            raise TunelabError(
                f"{self.where('generation')}: `generation:` applies to generation tasks "
                "(`target:`), not to a classification task"
            )
        if self.label_field is None:
            return
        if not self.verbalizer:
            raise TunelabError(
                f"{self.where('label_field')}: a classification task needs a "
                "`verbalizer:` mapping each label to its label words"
            )
        owner: dict[str, str] = {}
        for label, words in self.verbalizer.items():
            if not words or any(not w.strip() for w in words):
                raise TunelabError(
                    f"{self.where('verbalizer.' + label)}: label {label!r} needs non-empty "
                    f"label words, got {words!r}"
                )
            for w in words:
                if owner.setdefault(w.strip(), label) != label:
                    raise TunelabError(
                        f"{self.where('verbalizer.' + label)}: label word {w!r} belongs to both "
                        f"{owner[w.strip()]!r} and {label!r}; the labels could not be told apart"
                    )

    def _check_numbers(self) -> None:
        """Counts, sizes and seeds in range (and finite)."""
        if self.demonstrations.k < 0:
            raise TunelabError(
                f"{self.where('demonstrations.k')}: demonstrations.k must be >= 0, "
                f"got {self.demonstrations.k}"
            )
        if self.demonstrations.train and self.demonstrations.k < 1:
            raise TunelabError(
                f"{self.where('demonstrations.train')}: demonstrations.train: true needs "
                f"demonstrations.k >= 1 (demonstrations per class), got {self.demonstrations.k}"
            )
        if self.few_shot is not None and self.few_shot.k < 1:
            raise TunelabError(
                f"{self.where('few_shot.k')}: few_shot.k must be >= 1, got {self.few_shot.k}"
            )
        if not 0 <= self.validation.size < math.inf:
            raise TunelabError(
                f"{self.where('validation.size')}: validation.size must be >= 0, "
                f"got {self.validation.size}"
            )
        if self.holdout_filter and not self.holdout:
            raise TunelabError(
                f"{self.where('holdout_filter')}: holdout_filter: needs a `holdout:` split"
            )
        if self.holdout_balanced and (not self.holdout or self.label_field is None):
            raise TunelabError(
                f"{self.where('holdout_balanced')}: holdout_balanced: needs a `holdout:` split "
                "and a classification task (`label_field`)"
            )
        for split, size in self.holdout.items():
            if not 0 < size < math.inf:
                raise TunelabError(
                    f"{self.where('holdout.' + split)}: holdout.{split} must be > 0 (rows, or a "
                    f"fraction < 1), got {size}"
                )

    def _check_calibrate(self) -> None:
        """`calibrate:` names a known method, on a classification task."""
        if self.calibrate is not None and self.calibrate != "content-free":
            raise TunelabError(
                f"{self.where('calibrate')}: calibrate: expected 'content-free' (or no key), "
                f"got {self.calibrate!r}"
            )
        if self.calibrate is not None and self.is_generation:
            raise TunelabError(
                f"{self.where('calibrate')}: calibrate: applies to classification (label "
                "probabilities), not to a generation task (`target:`)"
            )
        if not self.content_free:
            raise TunelabError(
                f"{self.where('content_free')}: content_free: expected at least one input, "
                "e.g. ['N/A', '', '[MASK]']"
            )


def _resolve_path(value: str, base: Path) -> str:
    """A data path: relative to the task file, or `pkg:NAME/sub/path` inside a package."""
    if value.startswith("pkg:"):
        package, _, rest = value[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TunelabError(f"{value}: package {package!r} is not installed")
        return str(Path(list(spec.submodule_search_locations)[0]) / rest)
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_task(ref: str | Path, overrides: dict | None = None) -> TaskSpec:
    """A task from a YAML file, or a built-in task by name (`demo`); `overrides` replace
    top-level keys of the file (data paths in them are relative to the working directory)."""
    path = Path(ref)
    if not path.suffix and (BUILTIN_DIR / f"{ref}.yaml").is_file():
        path = BUILTIN_DIR / f"{ref}.yaml"
    if not path.is_file():
        builtins = ", ".join(p.stem for p in sorted(BUILTIN_DIR.glob("*.yaml")))
        raise TunelabError(f"{ref}: no such task file (built-in tasks: {builtins})")
    raw, lines = read_yaml(path)
    data = raw.get("data")
    if data is not None:
        if not isinstance(data, dict):
            raise TunelabError(
                f"{at(path, lines.get('data'))}: `data:` must map split names to files"
            )
        for split, f in data.items():
            if not isinstance(f, str) or not f:
                raise TunelabError(
                    f"{at(path, lines.get(f'data.{split}'))}: data.{split}: expected a file "
                    f"path, got {f!r}"
                )
        raw["data"] = {str(split): _resolve_path(f, path.parent) for split, f in data.items()}
    sql = raw.get("sql")
    if isinstance(sql, dict) and isinstance(sql.get("tables"), str):
        sql["tables"] = _resolve_path(sql["tables"], path.parent)
    for key, value in (overrides or {}).items():
        if key == "data" and isinstance(value, dict):
            value = {str(k): _resolve_path(str(f), Path.cwd()) for k, f in value.items()}
        raw[key] = value
    return TaskSpec.from_dict(raw, source=str(path), lines=lines)

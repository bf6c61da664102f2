"""The one road from an artifact folder to predictions.

`load` opens an artifact for inference: the tuned model, and its task prepared with the
artifact's own template, verbalizer, demonstration pool, prompt length and calibration, so
that every prompt is built exactly as training built it. `tunelab eval`, `tunelab predict`,
the server's adapter store and compare's task-switch timing all go through it.

    model = load("runs/sst2")
    model.predict(["a lovely film"])        # [Prediction(label=..., probabilities=...)]
    model.evaluate(split="test")            # the metrics `tunelab eval` prints
    model.generate(["How many singers?"])   # generation tasks: the greedy continuations
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.artifact import META, load_artifact
from tunelab.device import autocast, resolve_device
from tunelab.errors import TunelabError
from tunelab.evaluate.calibrate import Calibration, apply, is_on, resolve
from tunelab.evaluate.predict import evaluate_split
from tunelab.lm.predict import predict_logprobs
from tunelab.methods.base import TunedLM
from tunelab.models import Backbone, load_backbone
from tunelab.tasks.encode import Example, encode
from tunelab.tasks.prepared import PreparedTask
from tunelab.tasks.readers import Record, json_object
from tunelab.tasks.spec import TaskSpec

# what an artifact fixes (so inference prompts exactly as training did) versus what another
# task file may change (which data to read)
PROMPT_KEYS = (
    "template",
    "input_fields",
    "label_field",
    "verbalizer",
    "answer_prefix",
    "demonstrations",
    "target",
    "generation",
    "calibrate",
    "content_free",
)


def pool(meta: dict) -> list[Record] | None:
    """The rows an artifact drew demonstrations from (None when it used none)."""
    rows = meta.get("demonstration_pool") or []
    return [Record(f, "demonstration_pool", i) for i, f in enumerate(rows, start=1)] or None


def max_length(meta: dict) -> int:
    """The prompt length the artifact was trained with (prompts are cut the same way)."""
    return (meta.get("train_config") or {}).get("max_length", 512)


def distribution(labels: list[str], probs: list[float]) -> tuple[str, dict[str, float]]:
    """The most probable label and every label's probability."""
    best = labels[max(range(len(probs)), key=probs.__getitem__)]
    return best, dict(zip(labels, (round(p, 6) for p in probs)))


def _fields(task: TaskSpec, text: str) -> dict | None:
    """The input fields a TEXT gives as a JSON object of them, else None."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and all(f in obj for f in task.input_fields):
        return obj
    return None


def record(task: TaskSpec, item: str | dict, i: int, json_input: bool = False) -> Record:
    """One input as a row: a dict of the task's fields, a text holding a JSON object of them,
    else plain text for a one-field task. `json_input`: every text must be such an object."""
    if isinstance(item, dict):
        missing = [f for f in task.input_fields if f not in item]
        if missing:
            raise TunelabError(f"input {i}: missing field {missing[0]!r}")
        return Record({k: str(v) for k, v in item.items()}, "input", i)
    text = item
    fields = _fields(task, text)
    if fields is None and json_input:
        obj = json_object(text, f"input {i}")
        missing = [f for f in task.input_fields if f not in obj]
        raise TunelabError(f"input {i}: missing field {missing[0]!r}: {text[:80]!r}")
    if fields is None:
        if len(task.input_fields) > 1:
            raise TunelabError(
                f"input {i}: this task has input fields {', '.join(task.input_fields)}; give a "
                f"JSON object of them per input, got {text[:80]!r}"
            )
        fields = {task.input_fields[0]: text}
    for name in task.input_fields:
        if fields[name] is None or isinstance(fields[name], (dict, list)):
            raise TunelabError(
                f"input {i}: field {name!r} must be text or a number, got {fields[name]!r:.80}"
            )
    return Record(fields, "input", i)


def records(task: TaskSpec, inputs: list, json_input: bool = False) -> list[Record]:
    """Every input as a row (see `record`), numbered from 1."""
    rows = [record(task, item, i, json_input) for i, item in enumerate(inputs, start=1)]
    for i, r in enumerate(rows, start=1):
        for k, v in r.fields.items():
            if not isinstance(v, str):
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
                raise TunelabError(f"input {i}: field {k!r} is not valid Unicode text") from None
    return rows


@dataclass
class Prediction:
    """One input's answer: its label and every label's probability (classification), or the
    generated text (generation)."""

    input: str | dict
    label: str | None = None
    probabilities: dict[str, float] | None = None
    output: str | None = None  # generation only

    def to_dict(self) -> dict:
        """As `tunelab predict --json` prints it."""
        if self.output is not None:
            return {"input": self.input, "output": self.output}
        return {"input": self.input, "label": self.label, "probabilities": self.probabilities}


@dataclass
class Evaluation:
    """One split's evaluation: its metrics and outputs ((N, C) label log-probabilities, or the
    generated texts), with the prepared task they came from."""

    split: str
    metrics: dict
    outputs: torch.Tensor | list[str]
    prep: PreparedTask
    calibration: Calibration | None


@dataclass
class LoadedModel:
    """A tuned model ready for inference, with its task prepared as the artifact trained it."""

    tuned: TunedLM
    prep: PreparedTask  # template, verbalizer, demonstrations, max_length; no data read
    meta: dict  # the artifact's tunelab.json ({} for the bare backbone)
    backbone: Backbone
    path: Path | None = None  # the artifact folder (None: the bare backbone)
    calibrate: bool = False  # whether label scores are calibrated
    calibration: Calibration | None = None  # what is divided out of them
    bf16: bool = False
    batch_size: int = 32

    @property
    def task(self) -> TaskSpec:
        return self.prep.task

    @property
    def method(self) -> str:
        """The artifact's method, else how the bare backbone is prompted."""
        k = self.task.demonstrations.k
        return self.meta.get("method") or ("in-context" if k else "zero-shot")

    @property
    def demos_from_data(self) -> bool:
        """Whether demonstrations are drawn from the task's training split (the artifact holds
        no pool of its own): only `evaluate`, which reads the data, has them."""
        return self.task.demonstrations.k > 0 and pool(self.meta) is None

    @property
    def source(self) -> str:
        """Where a stored calibration comes from (named in its errors)."""
        return str(self.path / META) if self.path is not None else "--calibrate"

    def set_calibration(self, on: bool, prep: PreparedTask | None = None) -> Calibration | None:
        """Turn calibration on or off: the artifact's stored label bias where it fits the
        prompts, else one measured now (one forward pass per content-free input)."""
        self.calibrate = on
        self.calibration = self._resolve(prep or self.prep)
        return self.calibration

    def _resolve(self, prep: PreparedTask) -> Calibration | None:
        return resolve(
            self.tuned,
            prep,
            self.meta,
            self.calibrate,
            self.source,
            batch_size=self.batch_size,
            bf16=self.bf16,
        )

    def encode(self, inputs: list, json_input: bool = False) -> list[Example]:
        """Token ids of each input's prompt (template, demonstrations, length limit)."""
        rows = records(self.task, inputs, json_input)
        if self.task.sql is not None:  # the prompt holds the row's database schema
            from tunelab.tasks.sql import attach_schemas

            attach_schemas(self.task, rows)
        prep = self.prep
        return encode(self.task, rows, prep.tokenizer, prep.demos, prep.max_length)

    def predict(self, inputs: list, json_input: bool = False) -> list[Prediction]:
        """Each input's label and label probabilities (calibrated where calibration is on),
        or its generated text for a generation task. An input is a text or a dict of the
        task's input fields; see `record`."""
        examples = self.encode(inputs, json_input)
        if self.calibrate and self.calibration is None and self.demos_from_data:
            self.calibration = self._resolve(self.prep)  # on the prompts predict builds
        if self.task.is_generation:
            texts = self._generate(examples)
            return [Prediction(x, output=t) for x, t in zip(inputs, texts)]
        logp = predict_logprobs(
            self.tuned,
            examples,
            self.prep.verbalizer,
            self.prep.tokenizer.pad_token_id,
            self.batch_size,
            bf16=self.bf16,
        )
        if self.calibration is not None:
            logp = apply(logp, self.calibration)
        labels = self.prep.verbalizer.labels
        out = []
        for x, row in zip(inputs, logp.exp().tolist()):
            best, dist = distribution(labels, row)
            out.append(Prediction(x, label=best, probabilities=dist))
        return out

    def generate(
        self, inputs: list, max_new_tokens: int | None = None, batch_size: int = 16
    ) -> list[str]:
        """The greedy continuation of each input's prompt, cut at the task's stop strings
        (up to `max_new_tokens`, default the task's `generation.max_new_tokens`)."""
        if not self.task.is_generation:
            raise TunelabError(
                f"task {self.task.name!r} is a classification task; generate is for "
                "generation tasks (`target:`); use predict"
            )
        if max_new_tokens is not None and max_new_tokens < 1:
            raise TunelabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return self._generate(self.encode(inputs), max_new_tokens, batch_size)

    def _generate(
        self, examples: list[Example], max_new_tokens: int | None = None, batch_size: int = 16
    ) -> list[str]:
        from tunelab.lm.generate import greedy_generate

        gen = self.task.generation
        with autocast(next(self.tuned.parameters()).device, self.bf16):
            return greedy_generate(
                self.tuned,
                examples,
                self.prep.tokenizer,
                max_new_tokens or gen.max_new_tokens,
                gen.stop,
                batch_size,
            )

    def evaluation(self, split: str | None = None, limit: int | None = None) -> Evaluation:
        """Read the task's data and evaluate one split (default: test, else validation),
        its first `limit` rows where given."""
        prep = PreparedTask.load(
            self.task, self.prep.tokenizer, self.prep.max_length, demo_pool=pool(self.meta)
        )
        split = prep.eval_split(split)
        prep.limit(split, limit)
        # demonstrations drawn from the data make other prompts than `predict`'s
        cal = self._resolve(prep) if self.demos_from_data else self.calibration
        metrics, outputs = evaluate_split(
            self.tuned, prep, split, self.batch_size, bf16=self.bf16, calibration=cal
        )
        return Evaluation(split, metrics, outputs, prep, cal)

    def evaluate(self, split: str | None = None, limit: int | None = None) -> dict:
        """The metrics `tunelab eval` prints for one split (default: test, else validation):
        accuracy, macro-F1 and the confusion matrix (exact match and token F1 for generation;
        execution accuracy for SQL), calibrated ones beside them where calibration is on."""
        return self.evaluation(split, limit).metrics


def load(
    path: str | Path | None = None,
    *,
    task: TaskSpec | str | Path | None = None,
    model: str | None = None,
    backbone: Backbone | None = None,
    demos: int | None = None,
    device: str | torch.device = "auto",
    calibrate: bool | None = None,
    bf16: bool = False,
    batch_size: int = 32,
    lora_name: str | None = None,
) -> LoadedModel:
    """Open an artifact folder for inference.

    `task`: read the data from this task (a TaskSpec, YAML file or built-in task name)
    instead of the artifact's own; the prompt (template, verbalizer, demonstrations, ...)
    stays the artifact's. Without `path`, the bare backbone on `task` (zero-shot, or
    in-context with demonstrations). `model`: the backbone to load (default: the
    artifact's); `backbone`: one already loaded, to share (the server's store keeps one).
    `demos`: demonstrations per class, overriding the task's. `calibrate`: contextual
    calibration on or off (None: where the task says `calibrate: content-free`).
    `lora_name`: a LoRA artifact joins the backbone's other adapters under this name.
    """
    if path is None and task is None:
        raise TunelabError("load needs an artifact folder, a task, or both")
    for name, value, least in (("demos", demos, 0), ("batch_size", batch_size, 1)):
        if value is not None and value < least:
            raise TunelabError(f"{name} must be >= {least}, got {value}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if backbone is None and (model or path is None):
        backbone = load_backbone(model)
    if path is None:
        tuned, own, meta = TunedLM(backbone.model), None, {}
    else:
        path = Path(path)
        tuned, own, meta, backbone = load_artifact(path, backbone, lora_name=lora_name)
    tuned.to(dev).eval()
    if isinstance(task, (str, Path)):
        from tunelab.tasks import load_task

        task = load_task(str(task))
    task = _prompted(task, own)
    if demos is not None:
        task = dataclasses.replace(
            task, demonstrations=dataclasses.replace(task.demonstrations, k=demos)
        )
    prep = PreparedTask.load(
        task, backbone.tokenizer, max_length(meta), splits={}, demo_pool=pool(meta)
    )
    loaded = LoadedModel(tuned, prep, meta, backbone, path, bf16=bf16, batch_size=batch_size)
    on = is_on(calibrate, task)
    if loaded.demos_from_data:
        loaded.calibrate = on  # measured on the prompts `evaluate` builds from the data
        if on:
            from tunelab.evaluate.calibrate import refuse_generation

            refuse_generation(task)
    else:
        loaded.set_calibration(on)
    return loaded


def _prompted(task: TaskSpec | None, own: TaskSpec | None) -> TaskSpec:
    """The task to run: `task`'s data with the artifact's prompt (`own`), or either alone."""
    if task is None or own is None:
        return task or own
    task = dataclasses.replace(task, **{k: getattr(own, k) for k in PROMPT_KEYS})
    if task.sql is not None and own.sql is not None:  # the schema reads as trained
        task.sql = dataclasses.replace(task.sql, schema_format=own.sql.schema_format)
    return task

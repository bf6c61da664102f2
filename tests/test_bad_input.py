"""Bad input of every kind ends with exit code 2 and one line naming the file, line, key and
value; never a traceback, never a silently wrong result. One table, run through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_task
from safetensors.torch import load_file, save_file

from tunelab.__main__ import main

TINY = ["--set", "steps=2", "--set", "batch_size=4", "--set", "eval_every=1"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A small prompt-tuning artifact (with its checkpoints) that the cases only read."""
    root = tmp_path_factory.mktemp("trained")
    task = make_task(root)
    out = root / "run"
    argv = ["train", "--task", task, "--model", tiny_model_dir, "--out", out, *TINY]
    assert main([str(a) for a in argv]) == 0
    return out


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


class Case:
    """A temporary task directory, the tiny model and the trained artifact, for one case."""

    def __init__(self, dir: Path, model: Path, artifact: Path):
        self.dir, self.model, self.artifact = dir, model, artifact
        self.task = make_task(dir)
        self.yaml = self.task.read_text()
        self.train_file = dir / "train.jsonl"

    def edit(self, old: str, new: str) -> Path:
        assert old in self.yaml, old
        self.task.write_text(self.yaml.replace(old, new, 1))
        return self.task

    def add(self, extra: str) -> Path:
        self.task.write_text(self.yaml + extra)
        return self.task

    def train(self, *extra, task: Path | None = None, out: Path | None = None) -> list:
        out = out or self.dir / "out"
        return ["train", "--task", task or self.task, "--model", self.model, "--out", out, *extra]

    def copy_artifact(self) -> Path:
        return shutil.copytree(self.artifact, self.dir / "artifact")


def _nan_artifact(c: Case) -> Path:
    art = c.copy_artifact()
    file = art / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["prompt_embeddings"][0, 0] = float("nan")
    save_file(tensors, str(file))
    return art


def _edit_meta(c: Case, change) -> Path:
    art = c.copy_artifact()
    meta = json.loads((art / "tunelab.json").read_text())
    (art / "tunelab.json").write_text(json.dumps(change(meta)))
    return art


def _generation(c: Case, extra: str = "") -> Path:
    """The tiny task as generation (the label as target text), with `extra` on line 10."""
    text = c.yaml.replace("label_field: label\n", 'target: " {label}"\n')
    c.task.write_text(text.replace("verbalizer:\n  positive: yes\n  negative: no\n", "") + extra)
    return c.task


def _rows(c: Case, text: str) -> Path:
    c.train_file.write_text(text)
    return c.task


T, Y = "task.yaml", '"{text} It was"'  # the tiny task file and its template line (line 7)
# (case id, argv from a Case, the fragments the one error line must hold: file:line, key, value)
CASES = [
    # the task file: types, with the key path and its line
    ("name-not-text", lambda c: c.train(task=c.edit("name: tiny", "name: [1, 2]")),
     [f"{T}:1:", "name:", "[1, 2]"]),
    ("name-empty", lambda c: c.train(task=c.edit("name: tiny", "name: ''")),
     [f"{T}:1:", "name:", "must not be empty"]),
    ("template-not-text", lambda c: c.train(task=c.edit(Y, "123")),
     [f"{T}:7:", "template:", "123"]),
    ("template-unclosed", lambda c: c.train(task=c.edit(Y, '"{text It was"')),
     [f"{T}:7:", "template:", "'{text It was'"]),
    ("template-conversion", lambda c: c.train(task=c.edit(Y, '"{text!z} It was"')),
     [f"{T}:7:", "template:", "!z"]),
    ("template-format-spec", lambda c: c.train(task=c.edit(Y, '"{text:>>>} It was"')),
     [f"{T}:7:", "template:", "{text:>>>}"]),
    ("template-positional", lambda c: c.train(task=c.edit(Y, '"{text} {} It was"')),
     [f"{T}:7:", "template:", "{}"]),
    ("template-index", lambda c: c.train(task=c.edit(Y, '"{text[0]} It was"')),
     [f"{T}:7:", "template:", "{text[0]}"]),
    ("template-lone-brace", lambda c: c.train(task=c.edit(Y, '"{text} It } was"')),
     [f"{T}:7:", "template:", "Single '}'"]),
    ("template-unknown-field", lambda c: c.train(task=c.edit(Y, '"{title}: {text}"')),
     [f"{T}:7:", "{title}", "input_fields: text"]),
    ("input-fields-number", lambda c: c.train(task=c.edit("[text]", "5")),
     [f"{T}:5:", "input_fields:", "5"]),
    ("input-fields-empty", lambda c: c.train(task=c.edit("[text]", "[]")),
     [f"{T}:5:", "input_fields:", "[]"]),
    ("input-fields-twice", lambda c: c.train(task=c.edit("[text]", "[text, text]")),
     [f"{T}:5:", "input_fields:", "['text', 'text']"]),
    ("verbalizer-not-mapping", lambda c: c.train(
        task=c.edit("verbalizer:\n  positive: yes\n  negative: no", "verbalizer: positive")),
     [f"{T}:8:", "verbalizer:", "'positive'"]),
    ("verbalizer-word-number", lambda c: c.train(task=c.edit("positive: yes", "positive: 5")),
     [f"{T}:9:", "verbalizer.positive:", "5"]),
    ("verbalizer-list-item", lambda c: c.train(task=c.edit("positive: yes", "positive: [yes, 3]")),
     [f"{T}:9:", "verbalizer.positive[1]:", "3"]),
    ("verbalizer-shared-word", lambda c: c.train(task=c.edit("negative: no", "negative: yes")),
     [f"{T}:10:", "'yes'", "'positive' and 'negative'"]),
    ("label-field-list", lambda c: c.train(task=c.edit("label_field: label", "label_field: [a]")),
     [f"{T}:6:", "label_field:", "['a']"]),
    ("answer-prefix-number", lambda c: c.train(task=c.add("answer_prefix: 5\n")),
     [f"{T}:13:", "answer_prefix:", "5"]),
    ("data-file-null", lambda c: c.train(task=c.edit("train: train.jsonl", "train: null")),
     [f"{T}:3:", "data.train:", "None"]),
    ("encoding-unknown", lambda c: c.train(task=c.add("encoding: klingon\n")),
     [f"{T}:13:", "encoding:", "'klingon'"]),
    ("few-shot-k-text", lambda c: c.train(task=c.add("few_shot: {k: many}\n")),
     [f"{T}:13:", "few_shot.k:", "'many'"]),
    ("few-shot-k-zero", lambda c: c.train(task=c.add("few_shot: {k: 0}\n")),
     [f"{T}:13:", "few_shot.k", "got 0"]),
    ("validation-size-text", lambda c: c.train(task=c.edit("size: 8", "size: big")),
     [f"{T}:12:", "validation.size:", "'big'"]),
    ("validation-size-negative", lambda c: c.train(task=c.edit("size: 8", "size: -1")),
     [f"{T}:12:", "validation.size", "-1"]),
    ("demonstrations-k-negative", lambda c: c.train(task=c.add("demonstrations: {k: -1}\n")),
     [f"{T}:13:", "demonstrations.k", "-1"]),
    ("demonstrations-select", lambda c: c.train(task=c.add("demonstrations: {select: best}\n")),
     [f"{T}:13:", "demonstrations.select", "'best'"]),
    ("holdout-text", lambda c: c.train(task=c.add("holdout: {dev: x}\n")),
     [f"{T}:13:", "holdout.dev:", "'x'"]),
    ("holdout-negative", lambda c: c.train(task=c.add("holdout: {dev: -5}\n")),
     [f"{T}:13:", "holdout.dev", "-5"]),
    ("unknown-key", lambda c: c.train(task=c.add("epochs: 3\n")),
     [f"{T}:13:", "unknown task key 'epochs'"]),
    ("duplicate-key", lambda c: c.train(task=c.add("name: other\n")),
     [f"{T}:13:", "'name' appears twice", "line 1"]),
    ("yaml-syntax", lambda c: c.train(task=c.add("template: [unclosed\n")),
     [f"{T}:", "not valid YAML"]),
    ("generation-on-classification", lambda c: c.train(task=c.add("generation: {stop: [x]}\n")),
     [f"{T}:13:", "generation:", "classification"]),
    ("dataset-not-mapping", lambda c: c.train(task=c.add("dataset: foo\n")),
     [f"{T}:13:", "dataset:", "'foo'"]),
    ("filter-unknown-operator", lambda c: c.train(task=c.add("filter:\n  label: {is: x}\n")),
     [f"{T}:14:", "filter.label", "unknown operator 'is'"]),
    ("filter-unknown-field", lambda c: c.train(task=c.add("filter:\n  stars: {min: 3}\n")),
     [f"{T}:14:", "filter.stars", "no row", "'stars'"]),
    ("filter-min-text", lambda c: c.train(task=c.add("filter: {label: {min: high}}\n")),
     [f"{T}:13:", "filter.label.min", "'high'"]),
    ("filter-not-mapping", lambda c: c.train(task=c.add("filter: {label: positive}\n")),
     [f"{T}:13:", "filter.label:", "'positive'"]),
    ("filter-min-above-max", lambda c: c.train(task=c.add("filter: {s: {min: 2, max: 1}}\n")),
     [f"{T}:13:", "filter.s", "min 2 is above max 1"]),
    ("calibrate-unknown", lambda c: c.train(task=c.add("calibrate: yes\n")),
     [f"{T}:13:", "calibrate:", "'content-free'", "'yes'"]),
    ("calibrate-not-text", lambda c: c.train(task=c.add("calibrate: true\n")),
     [f"{T}:13:", "calibrate:", "True"]),
    ("calibrate-on-generation", lambda c: c.train(task=_generation(c, "calibrate: content-free\n")),
     [f"{T}:10:", "calibrate:", "generation"]),
    ("content-free-empty", lambda c: c.train(task=c.add("content_free: []\n")),
     [f"{T}:13:", "content_free:", "at least one"]),
    ("content-free-number", lambda c: c.train(task=c.add("content_free: [N/A, 3]\n")),
     [f"{T}:13:", "content_free[1]:", "3"]),
    # data rows: file and line
    ("row-label-unknown", lambda c: _rows(c, '{"text": "a", "label": "pos"}\n') and c.train(),
     ["train.jsonl:1:", "label 'pos'"]),
    ("row-field-missing", lambda c: _rows(c, '{"txt": "a", "label": "positive"}\n') and c.train(),
     ["train.jsonl:1:", "missing field 'text'"]),
    ("row-field-object", lambda c: _rows(c, '{"text": {"a": 1}, "label": "positive"}\n')
     and c.train(), ["train.jsonl:1:", "field 'text'", "{'a': 1}"]),
    ("row-not-json", lambda c: _rows(c, '{"text": "a", "label": "positive"}\n{oops\n')
     and c.train(), ["train.jsonl:2:", "not valid JSON", "'{oops'"]),
    ("row-not-utf8", lambda c: c.train_file.write_bytes(b'{"text": "caf\xe9"}\n') and c.train(),
     ["train.jsonl:1:", "not valid utf-8", "\\xe9"]),
    ("row-filter-not-a-number", lambda c: _rows(
        c, '{"text": "a", "label": "positive", "s": 1}\n{"text": "b", "label": "positive", '
        '"s": "n/a"}\n') and c.train(task=c.add("filter: {s: {min: 0}}\n")),
     ["train.jsonl:2:", "field 's'", "'n/a'", "not a number"]),
    # --set: the key and the value
    ("set-lr-nan", lambda c: c.train("--set", "lr=.nan"), ["--set lr=.nan", "finite"]),
    ("set-lr-inf", lambda c: c.train("--set", "lr=.inf"), ["--set lr=.inf", "finite"]),
    ("set-lr-overflows", lambda c: c.train("--set", "lr=1e39"), ["lr", "1e+39", "finite"]),
    ("set-max-grad-norm-zero", lambda c: c.train("--set", "max_grad_norm=0"),
     ["max_grad_norm", "got 0"]),
    ("set-warmup-negative", lambda c: c.train("--set", "warmup=-1"), ["warmup", "-1"]),
    ("set-weight-decay-negative", lambda c: c.train("--set", "weight_decay=-0.1"),
     ["weight_decay", "-0.1"]),
    ("set-patience-negative", lambda c: c.train("--set", "patience=-1"), ["patience", "-1"]),
    ("set-device-unknown", lambda c: c.train("--set", "device=tpu"), ["device", "'tpu'"]),
    ("set-steps-text", lambda c: c.train("--set", "steps=many"), ["--set steps=many", "int"]),
    ("set-regex-broken", lambda c: c.train("--method", "freeze", "--set", "modules=["),
     ["modules='['", "not a regular expression"]),
    ("set-projection-hidden-zero",
     lambda c: c.train("--method", "prefix", "--set", "projection_hidden=0"),
     ["projection_hidden", "got 0"]),
    ("set-reparameterize-unknown", lambda c: c.train("--set", "reparameterize=mlp"),
     ["reparameterize must be one of none, residual", "'mlp'"]),
    ("set-bottleneck-zero",
     lambda c: c.train("--set", "reparameterize=residual", "--set", "bottleneck=0"),
     ["bottleneck", "got 0"]),
    ("set-bottleneck-text", lambda c: c.train("--set", "bottleneck=wide"),
     ["--set bottleneck=wide", "expected int"]),
    # train's --out and --resume
    ("out-is-a-file", lambda c: c.train(out=c.task), ["--out", T, "not a directory"]),
    ("out-under-a-file", lambda c: c.train(out=c.task / "run"), ["--out", T, "is a file"]),
    ("resume-without-checkpoint", lambda c: c.train("--resume"),
     ["--resume", "last.safetensors", "does not exist"]),
    ("resume-another-task", lambda c: c.train(
        "--resume", task=c.edit("name: tiny", "name: other"), out=c.artifact),
     ["--resume", "last.safetensors", "task 'tiny', not 'other'"]),
    ("resume-another-method", lambda c: c.train("--resume", "--method", "lora", out=c.artifact),
     ["--resume", "method 'prompt-tuning', not 'lora'"]),
    ("resume-and-overwrite", lambda c: c.train("--resume", "--overwrite"),
     ["--resume", "--overwrite"]),
    ("train-over-artifact", lambda c: c.train(out=c.artifact),
     ["--out", "run", "holds an artifact", "--overwrite"]),
    # eval and predict
    ("eval-demos-negative", lambda c: ["eval", "--adapter", c.artifact, "--demos", "-1"],
     ["--demos", "-1"]),
    ("eval-batch-size-zero", lambda c: ["eval", "--adapter", c.artifact, "--batch-size", "0"],
     ["--batch-size", "got 0"]),
    ("eval-metrics-is-a-directory", lambda c: ["eval", "--adapter", c.artifact, "--metrics", c.dir],
     ["--metrics", "is a directory"]),
    ("eval-predictions-under-a-file",
     lambda c: ["eval", "--adapter", c.artifact, "--predictions", c.task / "p.jsonl"],
     ["--predictions", T, "not a directory"]),
    ("eval-device-unknown", lambda c: ["eval", "--adapter", c.artifact, "--device", "tpu"],
     ["device 'tpu'"]),
    ("eval-split-unknown", lambda c: ["eval", "--adapter", c.artifact, "--split", "nosuch"],
     ["tunelab.json", "no split 'nosuch'"]),
    ("eval-nan-artifact", lambda c: ["eval", "--adapter", _nan_artifact(c)],
     ["adapter_model.safetensors", "'prompt_embeddings'", "NaN"]),
    ("eval-meta-method-unknown", lambda c: ["eval", "--adapter", _edit_meta(
        c, lambda m: {**m, "method": "magic"})], ["tunelab.json", "method:", "'magic'"]),
    ("eval-meta-not-object", lambda c: ["eval", "--adapter", _edit_meta(c, lambda m: [1])],
     ["tunelab.json", "expected a JSON object"]),
    ("predict-nan-artifact", lambda c: ["predict", "--adapter", _nan_artifact(c), "good"],
     ["adapter_model.safetensors", "'prompt_embeddings'", "NaN"]),
    ("predict-json-input-not-json",
     lambda c: ["predict", "--adapter", c.artifact, "--json-input", "{not json"],
     ["input 1", "not valid JSON", "'{not json'"]),
    ("predict-json-input-other-fields",
     lambda c: ["predict", "--adapter", c.artifact, "--json-input", '{"title": "x"}'],
     ["input 1", "missing field 'text'"]),
    ("predict-field-list", lambda c: ["predict", "--adapter", c.artifact, '{"text": [1]}'],
     ["input 1", "field 'text'", "[1]"]),
    ("train-calibrate-generation", lambda c: c.train("--calibrate", task=_generation(c)),
     ["--calibrate", "'tiny'", "generation task"]),
    ("eval-calibrate-generation", lambda c: ["eval", "--task", _generation(c), "--model", c.model,
                                             "--calibrate"],
     ["--calibrate", "'tiny'", "generation task"]),
    ("compare-calibrate-generation", lambda c: ["compare", "--task", _generation(c), "--out",
                                                c.dir / "cmp", "--calibrate"],
     ["--calibrate", "'tiny'", "generation task"]),
    ("eval-meta-calibration", lambda c: ["eval", "--adapter", _edit_meta(
        c, lambda m: {**m, "calibration": {"p_cf": {"positive": -1}}}), "--calibrate"],
     ["tunelab.json", "calibration:", "-1"]),
    ("predict-adapter-missing", lambda c: ["predict", "--adapter", c.dir / "nope", "good"],
     ["nope", "no such adapter directory"]),
]  # fmt: skip


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    name, argv, fragments, tiny_model_dir, trained, tmp_path, capsys
):
    case = Case(tmp_path, tiny_model_dir, trained)
    args = argv(case)
    capsys.readouterr()
    code, err = run_cli(args, capsys)  # any other exception fails the test: a traceback
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    # progress bars end in \r; the error is the one line that starts as `tunelab CMD: error:`
    errors = [line.split("\r")[-1] for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err[-2000:]
    assert errors[0].startswith(f"tunelab {args[0]}: error: "), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def test_a_run_whose_weights_become_nan_stops_before_writing(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """A finite loss can still leave NaN weights (an overflowing update): the run stops at that
    step, and neither a checkpoint nor an artifact holds them."""
    step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        out = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    task, out = make_task(tmp_path), tmp_path / "run"
    argv = ["train", "--task", task, "--model", tiny_model_dir, "--out", out]
    code, err = run_cli([*argv, *TINY, "--set", "save_every=1"], capsys)
    assert code == 2 and "non-finite (NaN or infinity) at step 1" in err
    assert not (out / "tunelab.json").exists()
    # the one checkpoint written holds the start (validated at step 0, before any update)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["best.safetensors"]
    best = load_file(str(out / "checkpoints" / "best.safetensors"))
    assert best and all(t.isfinite().all() for t in best.values())


THROUGH_PYTHON = [
    "template-unclosed",
    "row-field-object",
    "set-lr-nan",
    "resume-without-checkpoint",
    "eval-nan-artifact",
    "predict-json-input-not-json",
]


@pytest.mark.parametrize("name", THROUGH_PYTHON)
def test_bad_input_through_python_m_tunelab(name, tiny_model_dir, trained, tmp_path):
    """The same promise from a real process: stderr holds no traceback, its last line is the
    error, the exit code is 2."""
    _, argv, fragments = next(c for c in CASES if c[0] == name)
    args = [str(a) for a in argv(Case(tmp_path, tiny_model_dir, trained))]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith(f"tunelab {args[0]}: error: ")
    assert all(fragment in last for fragment in fragments), last

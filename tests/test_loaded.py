"""`load` (tunelab/evaluate/loaded.py): one road from an artifact folder to predictions, the
same one `tunelab eval`, `tunelab predict`, the server and compare's task-switch timing take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_task, write_jsonl

from tunelab.__main__ import main
from tunelab.errors import TunelabError
from tunelab.evaluate.loaded import load

# the artifact's demonstration pool: rows the task's own data never has ("zebra"), so a prompt
# shows whether its demonstrations came from the artifact
POOL = [
    {"text": "the zebra was good .", "label": "positive"},
    {"text": "the zebra was bad .", "label": "negative"},
]
INPUTS = ["the film was lovely .", "a dull and boring plot"]

GEN_TASK = """\
name: tiny-gen
data:
  train: train.jsonl
  test: test.jsonl
input_fields: [question]
template: "Question: {question}\\nSQL:"
target: " {query}"
generation:
  max_new_tokens: 6
  stop: ["\\n"]
validation:
  size: 0
"""


def _save(model_dir, task_path: Path, out: Path, pool=None, max_length=None) -> Path:
    """An untrained prompt-tuning artifact (random soft prompt), with a demonstration pool
    and the prompt length it was 'trained' with."""
    from tunelab import methods
    from tunelab.artifact import save_artifact
    from tunelab.models import load_backbone
    from tunelab.tasks import load_task
    from tunelab.tasks.readers import Record
    from tunelab.tasks.verbalizer import Verbalizer
    from tunelab.train.config import TrainConfig

    backbone = load_backbone(str(model_dir))
    task = load_task(str(task_path))
    cfg = methods.CONFIGS["prompt-tuning"](num_virtual_tokens=3, init="random")
    verbalizer = None if task.is_generation else Verbalizer.build(task, backbone.tokenizer)
    tuned = methods.get("prompt-tuning").build(backbone, cfg, verbalizer, 3)
    rows = [Record(r, "train", i) for i, r in enumerate(pool or [], start=1)]
    train_cfg = TrainConfig(max_length=max_length) if max_length else None
    save_artifact(out, "prompt-tuning", cfg, tuned, task, backbone, train_cfg, demo_pool=rows)
    return out


def _hand_encoded(model_dir, task_path: Path, texts, max_length: int):
    """The inputs' prompts built without `load`: the pool's demonstrations, cut to
    `max_length` tokens."""
    from tunelab.models import load_backbone
    from tunelab.tasks import load_task
    from tunelab.tasks.demonstrations import DemoSelector
    from tunelab.tasks.encode import encode
    from tunelab.tasks.readers import Record

    tok = load_backbone(str(model_dir)).tokenizer
    task = load_task(str(task_path))
    demos = DemoSelector(task, [Record(r, "train", i) for i, r in enumerate(POOL, start=1)])
    rows = [Record({"text": t}, "input", i) for i, t in enumerate(texts, start=1)]
    return tok, encode(task, rows, tok, demos, max_length)


@pytest.fixture(scope="module")
def demo_artifact(tiny_model_dir, tmp_path_factory):
    """(artifact, its task file, its max_length): demonstrations from POOL, and a prompt
    length that leaves room for one of the two, not both."""
    root = tmp_path_factory.mktemp("loaded")
    task_path = make_task(root, extra="demonstrations: {k: 1}\n")
    _, full = _hand_encoded(tiny_model_dir, task_path, INPUTS, 512)
    max_length = min(len(ex.ids) for ex in full) - 3
    out = _save(tiny_model_dir, task_path, root / "art", POOL, max_length)
    return out, task_path, max_length


def test_the_artifacts_demonstrations_and_max_length_shape_every_prompt(
    demo_artifact, tiny_model_dir
):
    from tunelab.lm.predict import predict_logprobs

    art, task_path, max_length = demo_artifact
    model = load(art, device="cpu")
    assert model.prep.max_length == max_length
    tok = model.backbone.tokenizer
    for ex in model.encode(INPUTS):
        prompt = tok.decode(ex.ids, skip_special_tokens=True)
        assert len(ex.ids) <= max_length  # cut as training cut it (512 would keep both)
        assert "zebra" in prompt  # one demonstration from the artifact's pool is left
    _, full = _hand_encoded(tiny_model_dir, task_path, INPUTS, 512)
    assert all(len(a.ids) < len(b.ids) for a, b in zip(model.encode(INPUTS), full))
    # the probabilities are those of the prompts built by hand the same way
    _, examples = _hand_encoded(tiny_model_dir, task_path, INPUTS, max_length)
    want = predict_logprobs(model.tuned, examples, model.prep.verbalizer, tok.pad_token_id)
    got = model.predict(INPUTS)
    for p, row in zip(got, want.exp().tolist()):
        assert list(p.probabilities.values()) == pytest.approx(row, abs=1e-6)
    # and they change without the demonstrations
    bare = load(art, device="cpu", demos=0).predict(INPUTS)
    assert [p.probabilities for p in bare] != [p.probabilities for p in got]


@pytest.mark.parametrize("calibrate", [None, True])
def test_predict_equals_tunelab_predict(demo_artifact, calibrate, capsys):
    art = demo_artifact[0]
    flag = ["--calibrate"] if calibrate else []
    capsys.readouterr()
    assert main(["predict", "--adapter", str(art), "--json", *flag, *INPUTS]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    model = load(art, device="cpu", calibrate=calibrate)
    assert (model.calibration is not None) == bool(calibrate)
    got = model.predict(INPUTS)
    assert [p.to_dict() for p in got] == printed
    assert {p.label for p in got} <= {"positive", "negative"}
    # a dict of the task's fields is the same input
    assert model.predict([{"text": INPUTS[0]}])[0].probabilities == got[0].probabilities


def test_evaluate_returns_what_tunelab_eval_prints(demo_artifact, tmp_path, capsys):
    art = demo_artifact[0]
    capsys.readouterr()
    code = main(["eval", "--adapter", str(art), "--metrics", str(tmp_path / "m.json")])
    assert code == 0
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "m.json").read_text())
    metrics = load(art, device="cpu").evaluate(split="test")
    for m in (written, metrics):
        m.pop("seconds")
    assert metrics == written
    assert f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}" in printed
    assert metrics["n"] == 16
    assert load(art, device="cpu").evaluate(limit=4)["n"] == 4


def test_a_generation_artifact_generates(tiny_model_dir, tmp_path, capsys):
    rows = [{"question": f"How many {t}?", "query": f"SELECT count(*) FROM {t}"} for t in "abcd"]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:2])
    (tmp_path / "task.yaml").write_text(GEN_TASK)
    art = _save(tiny_model_dir, tmp_path / "task.yaml", tmp_path / "gen")
    model = load(art, device="cpu")
    questions = ["How many a?", "How many b?"]
    texts = model.generate(questions)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert [p.output for p in model.predict(questions)] == texts
    capsys.readouterr()
    assert main(["predict", "--adapter", str(art), "--json", *questions]) == 0
    printed = [json.loads(x)["output"] for x in capsys.readouterr().out.splitlines()]
    assert printed == texts
    # each decoded token is one more character or more: 1 token is shorter than 6
    assert all(len(a) <= len(b) for a, b in zip(model.generate(questions, 1), texts))
    assert set(model.evaluate()) >= {"exact_match", "token_f1", "n"}
    with pytest.raises(TunelabError, match="generation task; calibration corrects"):
        load(art, device="cpu", calibrate=True)


def test_generate_refuses_a_classification_task(demo_artifact):
    with pytest.raises(TunelabError, match="classification task; generate is for generation"):
        load(demo_artifact[0], device="cpu").generate(["hi"])


def test_a_bad_path_raises_an_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(TunelabError, match=str(missing)):
        load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TunelabError, match=f"{empty}/tunelab.json: missing"):
        load(empty)
    with pytest.raises(TunelabError, match="load needs an artifact folder, a task, or both"):
        load()


def test_bad_inputs_are_errors_naming_the_input(demo_artifact):
    model = load(demo_artifact[0], device="cpu")
    with pytest.raises(TunelabError, match="input 2: missing field 'text'"):
        model.predict(["fine", {"words": "x"}])
    with pytest.raises(TunelabError, match="input 1: not valid JSON"):
        model.predict(["not json"], json_input=True)


def test_a_loaded_backbone_is_shared(demo_artifact, tiny_backbone):
    model = load(demo_artifact[0], backbone=tiny_backbone, device="cpu")
    assert model.backbone is tiny_backbone and model.tuned.model is tiny_backbone.model


def test_the_bare_backbone_on_a_task(demo_artifact, tiny_model_dir):
    task_path = demo_artifact[1]
    model = load(task=task_path, model=str(tiny_model_dir), device="cpu", demos=0)
    assert model.method == "zero-shot" and model.meta == {}
    assert model.evaluate()["n"] == 16


def test_the_task_switch_timing_takes_the_same_road(demo_artifact, monkeypatch):
    import tunelab.evaluate.loaded as loaded
    from tunelab.compare.switch import measure

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    real = loaded.load
    monkeypatch.setattr(loaded, "load", spy)
    try:
        times = measure(demo_artifact[0], repeats=1)
    finally:
        torch.set_grad_enabled(True)  # measure() turns gradients off for its process
    assert calls == [(demo_artifact[0],)]
    assert set(times) == {"activate_ms", "request_ms"} and times["request_ms"] > 0

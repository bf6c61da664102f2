"""Contextual calibration (tunelab/evaluate/calibrate.py): a label bias is divided out the
expected way, the bias measured after training travels in the artifact and eval, predict, serve
and compare apply it alike, and generation tasks refuse it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_task
from safetensors.torch import load_file, save_file

from tunelab.__main__ import main

TEXTS = ["the film was good .", "the plot was dull .", "the cast was superb .", "a poor song"]
HEAD = ["--method", "head", "--set", "steps=40", "--set", "batch_size=8", "--set", "lr=0.01"]


def _train(model: Path, task: Path, out: Path, *extra: str) -> Path:
    argv = ["train", "--task", task, "--model", model, "--out", out, *HEAD, *extra]
    assert main([str(a) for a in argv]) == 0
    return out


def _eval(artifact: Path, tmp: Path, name: str, *extra: str) -> tuple[list[dict], dict]:
    """(prediction rows, metrics) of `tunelab eval --adapter artifact`."""
    preds, metrics = tmp / f"{name}.jsonl", tmp / f"{name}.json"
    argv = ["eval", "--adapter", artifact, "--predictions", preds, "--metrics", metrics, *extra]
    assert main([str(a) for a in argv]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    return rows, json.loads(metrics.read_text())


def _margin(row: dict) -> float:
    """The row's evidence for negative over positive: log p(negative) - log p(positive)."""
    p = row["probabilities"]
    return float(torch.tensor(p["negative"]).log() - torch.tensor(p["positive"]).log())


def _bias_toward_positive(artifact: Path, amount: float) -> None:
    """Add `amount` to the head's positive logit: the same push on every input."""
    file = artifact / "trainable.safetensors"
    tensors = load_file(str(file))
    (bias,) = [k for k in tensors if k.endswith("bias")]
    tensors[bias][0] += amount  # labels are [positive, negative]
    save_file(tensors, str(file))


@pytest.fixture(scope="module")
def head_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calibrate")
    task = make_task(root, n_train=64, n_test=32)
    return _train(tiny_model_dir, task, root / "head")


def test_calibration_undoes_a_label_bias_the_expected_way(head_artifact, tmp_path, capsys):
    plain, _ = _eval(head_artifact, tmp_path, "plain")
    art = Path(str(head_artifact) + "-biased")
    import shutil

    shutil.copytree(head_artifact, art)
    _bias_toward_positive(art, 8.0)
    biased, biased_m = _eval(art, tmp_path, "biased")
    # the biased model answers positive to everything
    assert {r["predicted"] for r in biased} == {"positive"}
    assert biased_m["accuracy"] == 0.5 and "accuracy_calibrated" not in biased_m
    capsys.readouterr()

    fixed, fixed_m = _eval(art, tmp_path, "fixed", "--calibrate")
    out = capsys.readouterr().out
    assert "calibrated: accuracy" in out and "content-free label bias" in out
    # calibration brings the other class back, for the rows whose evidence favours it most:
    # every row it calls negative has a larger margin (before the bias) than every row it
    # calls positive
    negative = [_margin(p) for p, f in zip(plain, fixed) if f["predicted"] == "negative"]
    positive = [_margin(p) for p, f in zip(plain, fixed) if f["predicted"] == "positive"]
    assert negative and positive
    assert min(negative) > max(positive)
    assert fixed_m["accuracy"] == biased_m["accuracy"]  # the plain score is kept beside it
    assert fixed_m["accuracy_calibrated"] > biased_m["accuracy"]
    assert fixed_m["per_row_calibrated"] != fixed_m["per_row"]
    p_cf = fixed_m["calibration"]["p_cf"]
    assert p_cf["positive"] > 0.99 and fixed_m["calibration"]["inputs"] == ["N/A", "", "[MASK]"]

    # predict applies the same correction to the same rows
    rows = [json.loads(line) for line in (head_artifact.parent / "test.jsonl").open()][:6]
    texts = [r["text"] for r in rows]
    for flag, want in (("--calibrate", fixed), ("--no-calibrate", biased)):
        assert main(["predict", "--adapter", str(art), "--json", flag, *texts]) == 0
        got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [g["label"] for g in got] == [w["predicted"] for w in want[:6]]
        for g, w in zip(got, want):
            for label, p in g["probabilities"].items():
                assert p == pytest.approx(w["probabilities"][label], abs=1e-4)


def test_stored_bias_round_trips_and_eval_applies_it(tiny_model_dir, tmp_path, capsys):
    task = make_task(tmp_path, n_train=64, n_test=32)
    out = _train(tiny_model_dir, task, tmp_path / "run", "--calibrate", "--baseline")
    printed = capsys.readouterr().out
    assert "(calibrated " in printed and "content-free label bias" in printed
    meta = json.loads((out / "tunelab.json").read_text())
    cal = meta["calibration"]
    assert cal["method"] == "content-free" and cal["inputs"] == ["N/A", "", "[MASK]"]
    assert set(cal["p_cf"]) == {"positive", "negative"}
    assert sum(cal["p_cf"].values()) == pytest.approx(1.0)
    assert meta["task"]["calibrate"] == "content-free"  # so eval/predict/serve apply it
    trained = meta["metrics"]["test"]
    assert (
        "accuracy_calibrated" in trained
        and "accuracy_calibrated" in meta["metrics"]["zero_shot_test"]
    )

    # eval (calibrated by the artifact's own task) gives exactly training's calibrated rows
    rows, m = _eval(out, tmp_path, "again")
    assert m["per_row_calibrated"] == trained["per_row_calibrated"]
    assert m["accuracy_calibrated"] == trained["accuracy_calibrated"]
    assert m["calibration"] == cal
    # and it reads the stored bias rather than measuring its own: an edited bias moves it
    meta["calibration"]["p_cf"] = {"positive": 0.999999, "negative": 0.000001}
    (out / "tunelab.json").write_text(json.dumps(meta))
    rows, _ = _eval(out, tmp_path, "edited")
    assert {r["predicted"] for r in rows} == {"negative"}
    rows, m = _eval(out, tmp_path, "off", "--no-calibrate")
    assert "accuracy_calibrated" not in m and m["accuracy"] == trained["accuracy"]


def test_an_artifact_without_a_stored_bias_is_measured_at_load(head_artifact):
    from tunelab.artifact import load_artifact
    from tunelab.evaluate.calibrate import measure, resolve
    from tunelab.evaluate.loaded import pool
    from tunelab.tasks.prepared import PreparedTask

    tuned, task, meta, backbone = load_artifact(head_artifact)
    assert meta["calibration"] is None
    prep = PreparedTask.load(task, backbone.tokenizer, splits={}, demo_pool=pool(meta))
    assert resolve(tuned, prep, meta, on=False) is None
    cal = resolve(tuned, prep, meta, on=True)
    assert cal == measure(tuned, prep) and abs(cal.p_cf[0] - 0.5) > 1e-4


def test_serve_applies_the_same_correction_as_predict(head_artifact, tiny_model_dir, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.store import AdapterStore

    store = AdapterStore(load_backbone(str(tiny_model_dir)), torch.device("cpu"))
    store.load("plain", head_artifact)
    store.load("cal", head_artifact, calibrate=True)
    cfg = ServeConfig(admin_keys=("k",), adapter_root=head_artifact.parent)
    with TestClient(create_app(store, cfg)) as client:
        # a task loaded while serving is calibrated when the request says so
        load = {"name": "posted", "path": head_artifact.name, "calibrate": True}
        r = client.post("/v1/tasks", json=load, headers={"authorization": "Bearer k"})
        assert r.status_code == 201 and r.json()["calibrated"] is True
        info = {t["name"]: t["calibrated"] for t in client.get("/v1/tasks").json()}
        assert info == {"plain": False, "cal": True, "posted": True}
        got = {}
        for name in ("plain", "cal", "posted"):
            r = client.post("/v1/classify", json={"task": name, "inputs": TEXTS})
            got[name] = r.json()["results"]
    assert got["posted"] == got["cal"]
    for flag, name in (("--calibrate", "cal"), ("--no-calibrate", "plain")):
        assert main(["predict", "--adapter", str(head_artifact), "--json", flag, *TEXTS]) == 0
        want = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for g, w in zip(got[name], want):
            assert g["label"] == w["label"]
            for label, p in g["probabilities"].items():
                assert p == pytest.approx(w["probabilities"][label], abs=1e-4)
    assert got["plain"] != got["cal"]


def test_compare_reports_plain_and_calibrated_scores(tiny_model_dir, tmp_path, capsys):
    task = make_task(tmp_path)
    out = tmp_path / "cmp"
    args = (
        f"compare --task {task} --model {tiny_model_dir} --out {out} --calibrate "
        "--methods zero-shot,in-context,head --seeds 1 --set steps=3 --set batch_size=4"
    ).split()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "calibrated" in printed.splitlines()[0]
    results = json.loads((out / "results.json").read_text())
    assert results["calibrate"] is True
    for r in results["records"]:
        assert r["status"] == "ok", r
        assert {"accuracy", "accuracy_calibrated"} <= set(r["metrics"]), r["method"]
        assert len(r["per_row_calibrated"]) == len(r["per_row"])
    assert json.loads((out / "head-seed1" / "tunelab.json").read_text())["calibration"]
    assert "Calibrated accuracy" in (out / "report.md").read_text()


def test_content_free_inputs_are_prompted_like_a_row_with_its_demonstrations(
    tiny_model_dir, tmp_path
):
    from tunelab.evaluate.calibrate import content_free_examples
    from tunelab.models import load_backbone
    from tunelab.tasks import load_task
    from tunelab.tasks.prepared import PreparedTask

    extra = "demonstrations: {k: 1}\ncontent_free: [N/A, '']\n"
    task = load_task(make_task(tmp_path, extra=extra))
    tokenizer = load_backbone(str(tiny_model_dir)).tokenizer
    prep = PreparedTask.load(task, tokenizer)
    texts = [
        tokenizer.decode(ex.ids, skip_special_tokens=True) for ex in content_free_examples(prep)
    ]
    assert len(texts) == 2
    for text, cf in zip(texts, ["N/A", ""]):
        demos, _, prompt = text.rpartition("\n\n")
        assert prompt == f"{cf} It was"
        assert demos.count(" It was yes") == 1 and demos.count(" It was no") == 1

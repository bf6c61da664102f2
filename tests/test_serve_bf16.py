"""`tunelab serve --bf16`: bfloat16 serving answers as float32 serving does (labels, label
probabilities within rounding, generated text), `auto` resolves to what the hardware runs
natively, and /health says which precision is served."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import write_jsonl
from test_generation import SQL_TASK, TABLES, sql_rows
from test_serve import TEXTS, Server, _artifact, _task_file

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bf16-artifacts")
    plain = _task_file(root / "plain")
    review = _task_file(root / "review", template="Review: {text} Verdict: it was")
    sql = root / "sql"
    sql.mkdir()
    write_jsonl(sql / "train.jsonl", sql_rows(TABLES))
    write_jsonl(sql / "test.jsonl", sql_rows(TABLES[:2]))
    (sql / "task.yaml").write_text(SQL_TASK)
    m = tiny_model_dir
    return {
        "sst": _artifact(m, plain, root / "pt", "prompt-tuning", num_virtual_tokens=4),
        "prefix": _artifact(m, review, root / "prefix", "prefix", num_virtual_tokens=3),
        "lora": _artifact(m, review, root / "lora", "lora", r=2, dropout=0.0),
        "head": _artifact(m, plain, root / "head", "head", init="random"),
        "sql": _artifact(
            m, sql / "task.yaml", root / "sql-pt", "prompt-tuning", num_virtual_tokens=2
        ),
    }


def _store(model_dir, artifacts, bf16: bool):
    from tunelab.models import load_backbone
    from tunelab.serve.store import AdapterStore

    store = AdapterStore(load_backbone(str(model_dir)), torch.device("cpu"), bf16=bf16)
    for name, path in artifacts.items():
        store.load(name, path)
    return store


def test_bf16_serving_agrees_with_float32(tiny_model_dir, artifacts):
    from tunelab.serve.batcher import encode_inputs
    from tunelab.serve.decode import generate_mixed
    from tunelab.serve.forward import classify_mixed, head_of

    fp32, bf16 = (_store(tiny_model_dir, artifacts, b) for b in (False, True))
    pad = fp32.backbone.tokenizer.pad_token_id
    names = ["sst", "prefix", "lora", "head"]

    def classify(store):
        jobs = [(store.get(n), encode_inputs(store.get(n), TEXTS)) for n in names]
        return dict(zip(names, classify_mixed(jobs, pad)))

    want, got = classify(fp32), classify(bf16)
    for name in names:
        p, q = want[name].exp(), got[name].exp()
        assert got[name].dtype == torch.float32
        assert torch.allclose(p, q, atol=0.03), name  # bfloat16 keeps ~3 significant digits
        # the same label wherever float32 is not itself a coin toss
        top2 = p.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.06
        assert (p.argmax(-1) == q.argmax(-1))[clear].all(), name
    # bfloat16 really ran: the cached heads hold bf16 values (keys come out of the float32
    # rotary embedding) and the scores moved
    assert head_of(bf16.get("sst")).values.dtype == torch.bfloat16
    assert head_of(fp32.get("sst")).values.dtype == torch.float32
    assert not torch.equal(want["sst"], got["sst"])

    questions = [f"How many {t} rows are there?" for t in TABLES]
    texts = {
        b: generate_mixed([(s.get("sql"), encode_inputs(s.get("sql"), questions), 6, ())], pad)[0]
        for b, s in (("fp32", fp32), ("bf16", bf16))
    }
    assert all(texts["fp32"])  # the tiny model says something
    # greedy decoding of a random tiny model is stable here (same argmax at every step)
    assert texts["bf16"] == texts["fp32"]


def _args(model_dir, artifacts, bf16: str) -> argparse.Namespace:
    from tunelab.serve.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(
        ["--model", str(model_dir), "--adapter", f"sst={artifacts['sst']}", "--bf16", bf16]
    )


def test_health_shows_the_precision_auto_resolves_to(tiny_model_dir, artifacts):
    from tunelab.device import native_bf16
    from tunelab.serve.cli import build

    auto = "bfloat16" if native_bf16(torch.device("cpu")) else "float32"
    answers = {}
    for choice, want in (("auto", auto), ("false", "float32"), ("true", "bfloat16")):
        app, store = build(_args(tiny_model_dir, artifacts, choice))
        assert store.bf16 == (want == "bfloat16")
        with Server(app) as client:
            assert client.get("/health").json()["precision"] == want
            r = client.post("/v1/classify", json={"task": "sst", "inputs": TEXTS[:3]})
            assert r.status_code == 200, r.text
            answers[choice] = r.json()["results"]
    for a, b in zip(answers["false"], answers["true"]):
        for label, p in a["probabilities"].items():
            assert b["probabilities"][label] == pytest.approx(p, abs=0.03)


def test_cli_bf16_true_without_native_support_warns(tiny_model_dir, artifacts, capsys, monkeypatch):
    import uvicorn

    from tunelab.__main__ import main
    from tunelab.device import native_bf16

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # everything but listening
    args = ["serve", "--model", str(tiny_model_dir), "--adapter", f"sst={artifacts['sst']}"]
    assert main([*args, "--bf16", "true"]) == 0
    out, err = capsys.readouterr()
    assert "precision: bfloat16 (cpu)" in out
    emulated = not native_bf16(torch.device("cpu"))
    assert ("PyTorch emulates bfloat16" in err) == emulated
    assert main([*args, "--bf16", "auto"]) == 0
    out, err = capsys.readouterr()
    assert f"precision: {'float32' if emulated else 'bfloat16'} (cpu)" in out
    assert "emulates" not in err
    with pytest.raises(SystemExit) as exit:  # argparse's usage error
        main([*args, "--bf16", "maybe"])
    assert exit.value.code == 2
    assert "--bf16: invalid choice: 'maybe'" in capsys.readouterr().err

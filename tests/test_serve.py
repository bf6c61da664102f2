"""`tunelab serve` on a real HTTP server (uvicorn on a free loopback port) with tiny artifacts:
every endpoint, mixed-task batches against one-task batches and `tunelab predict`, the prefix
cache against the uncached path, hot load and unload, limits, auth, bad artifacts."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_task, write_jsonl
from test_generation import SQL_TASK, TABLES, sql_rows

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

TEXTS = [
    "the film was good .",
    "the plot was dull .",
    "the cast was superb .",
    "the song was poor .",
    "a lovely show",
    "the book was boring and the story was awful .",
]


def _task_file(dir: Path, template: str | None = None, pos="yes", neg="no") -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    path = make_task(dir, pos=pos, neg=neg)
    if template:
        text = path.read_text().replace('template: "{text} It was"', f'template: "{template}"')
        path.write_text(text)
    return path


def _artifact(model_dir: Path, task_path: Path, out: Path, method: str, **settings) -> Path:
    """An untrained artifact of `method` (its own initialisation): serving must reproduce it
    exactly, trained or not."""
    from tunelab import methods
    from tunelab.artifact import save_artifact
    from tunelab.models import load_backbone
    from tunelab.tasks import load_task
    from tunelab.tasks.verbalizer import Verbalizer

    backbone = load_backbone(str(model_dir))
    task = load_task(str(task_path))
    cfg = methods.CONFIGS[method](**settings)
    tuned = methods.get(method).build(backbone, cfg, Verbalizer.build(task, backbone.tokenizer), 3)
    if method in ("lora", "freeze", "hybrid"):  # off the base model's weights (LoRA's B is 0)
        torch.manual_seed(len(str(out)))
        with torch.no_grad():
            for _, p in tuned.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
    save_artifact(out, method, cfg, tuned, task, backbone)
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-artifacts")
    plain = _task_file(root / "plain")
    review = _task_file(root / "review", template="Review: {text} Verdict: it was")
    multi = _task_file(root / "multi", pos="[good, superb]", neg="[bad, boring]")
    sql = root / "sql"
    sql.mkdir()
    write_jsonl(sql / "train.jsonl", sql_rows(TABLES))
    write_jsonl(sql / "test.jsonl", sql_rows(TABLES[:2]))
    (sql / "task.yaml").write_text(SQL_TASK)
    return {
        "sst": _artifact(
            tiny_model_dir, plain, root / "a-pt", "prompt-tuning", num_virtual_tokens=4
        ),
        "review": _artifact(
            tiny_model_dir,
            review,
            root / "a-pt2",
            "prompt-tuning",
            num_virtual_tokens=6,
            init="random",
        ),
        "multi": _artifact(
            tiny_model_dir,
            multi,
            root / "a-multi",
            "prompt-tuning",
            num_virtual_tokens=3,
            insert="start",
        ),
        "prefix": _artifact(
            tiny_model_dir, review, root / "a-prefix", "prefix", num_virtual_tokens=3
        ),
        "head": _artifact(tiny_model_dir, plain, root / "a-head", "head", init="random"),
        "lora": _artifact(tiny_model_dir, review, root / "a-lora", "lora", r=2, dropout=0.0),
        "lora2": _artifact(
            tiny_model_dir, plain, root / "a-lora2", "lora", r=4, target_modules="q_proj,v_proj"
        ),
        "freeze": _artifact(tiny_model_dir, plain, root / "a-freeze", "freeze", train_top=1),
        "hybrid": _artifact(
            tiny_model_dir,
            review,
            root / "a-hybrid",
            "hybrid",
            r=2,
            num_virtual_tokens=3,
            dropout=0.0,
        ),
        "sql": _artifact(
            tiny_model_dir,
            sql / "task.yaml",
            root / "a-sql",
            "prompt-tuning",
            num_virtual_tokens=2,
            init="random",
        ),
        "sql-prefix": _artifact(
            tiny_model_dir, sql / "task.yaml", root / "a-sql-prefix", "prefix", num_virtual_tokens=2
        ),
        "sql-lora": _artifact(
            tiny_model_dir, sql / "task.yaml", root / "a-sql-lora", "lora", r=2, dropout=0.0
        ),
    }


@pytest.fixture(scope="module")
def store(tiny_model_dir, artifacts):
    from tunelab.models import load_backbone
    from tunelab.serve.store import AdapterStore

    s = AdapterStore(load_backbone(str(tiny_model_dir)), torch.device("cpu"))
    for name, path in artifacts.items():
        s.load(name, path)
    return s


def _examples(entry, texts):
    from tunelab.serve.batcher import encode_inputs

    return encode_inputs(entry, texts)


def test_mixed_batch_equals_one_task_batches_and_the_uncached_path(store):
    from tunelab.lm.predict import predict_logprobs
    from tunelab.serve.forward import classify_mixed, task_routing

    pad = store.backbone.tokenizer.pad_token_id
    names = [n for n in store.tasks if not store.get(n).task.is_generation]
    # each task its own slice of texts: rows of different lengths and tasks side by side
    jobs = [
        (store.get(n), _examples(store.get(n), TEXTS[i % 3 : i % 3 + 4]))
        for i, n in enumerate(names)
    ]
    mixed = classify_mixed(jobs, pad)
    for (entry, examples), got in zip(jobs, mixed):
        alone = classify_mixed([(entry, examples)], pad)[0]
        with task_routing(entry):  # the uncached path, without the head cache or mixing
            plain = predict_logprobs(entry.tuned, examples, entry.prep.verbalizer, pad)
        assert torch.allclose(got, alone, atol=1e-5), entry.name
        assert torch.allclose(got, plain, atol=1e-4), entry.name
        assert got.argmax(-1).tolist() == plain.argmax(-1).tolist()
    # same template and texts, different adapters: the routing really changes the scores
    same = {
        n: classify_mixed([(store.get(n), _examples(store.get(n), TEXTS))], pad)[0]
        for n in ("sst", "lora2", "head")
    }
    assert not torch.allclose(same["sst"], same["lora2"], atol=1e-3)
    assert not torch.allclose(same["head"], same["lora2"], atol=1e-3)


def test_mixed_generation_equals_one_task_generation(store):
    from tunelab.lm.generate import greedy_generate
    from tunelab.serve.decode import generate_mixed
    from tunelab.serve.forward import task_routing

    pad = store.backbone.tokenizer.pad_token_id
    questions = [f"How many {t} rows are there?" for t in TABLES] + ["Name every singer ."]
    # the same questions for three tasks, in one batch with a fourth request's shorter limit
    jobs = [
        (store.get(n), _examples(store.get(n), qs), limit, ())
        for n, qs, limit in [
            ("sql", questions[:3], 12),
            ("sql-prefix", questions[:3], 12),
            ("sql-lora", questions[:3], 12),
            ("sql", questions[2:], 3),
        ]
    ]
    mixed = generate_mixed(jobs, pad)
    for (entry, examples, limit, _), got in zip(jobs, mixed):
        with task_routing(entry):
            want = greedy_generate(
                entry.tuned, examples, entry.backbone.tokenizer, limit, entry.task.generation.stop
            )
        assert got == want, entry.name
    assert len({tuple(m) for m in mixed[:3]}) == 3  # each task's adapter makes a difference


def test_length_chunks_bound_padding():
    from tunelab.serve.forward import length_chunks

    lengths = [5, 40, 6, 41, 7, 90, 5, 39]
    chunks = length_chunks(lengths)
    assert sorted(i for c in chunks for i in c) == list(range(8))
    for c in chunks:
        width = max(lengths[i] for i in c)
        assert len(c) * width <= 1.2 * sum(lengths[i] for i in c) or len(c) == 1
    assert [sorted(lengths[i] for i in c) for c in chunks][0] == [5, 5, 6]


def test_head_cache_holds_the_fixed_part(store):
    from tunelab.serve.forward import head_of

    review = head_of(store.get("review"))
    tok = store.backbone.tokenizer
    # BOS, then the soft prompt, then "Review:" (the text before {text}, its last token held
    # back because it may merge with the input)
    assert review.token_ids[0] == tok.bos_token_id and review.prompt_at == 1
    assert review.n_prompt == 6 and len(review.token_ids) >= 2
    assert review.keys.shape[:3] == (2, 2, review.slots)  # (layers, kv heads, slots)
    prefix = head_of(store.get("prefix"))
    assert prefix.n_prefix == 3 and prefix.slots == 3 + len(prefix.token_ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return httpx.Client(base_url=self.url, timeout=60)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


ADMIN_KEY = "adm1n-k3y"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def client(store, artifacts):
    from tunelab.serve.app import ServeConfig, create_app

    # a long window, so that concurrent requests surely share a batch; loads from the folder
    # that holds the artifacts, with the admin key
    cfg = ServeConfig(
        window_ms=150,
        max_inputs=8,
        max_input_chars=200,
        max_body_bytes=4096,
        admin_keys=(ADMIN_KEY,),
        adapter_root=artifacts["sst"].parent,
    )
    with Server(create_app(store, cfg)) as c:
        yield c


def test_classify_matches_tunelab_predict(client, artifacts, capsys):
    from tunelab.__main__ import main

    for name in ("sst", "multi", "prefix", "lora", "lora2", "freeze", "hybrid"):
        r = client.post("/v1/classify", json={"task": name, "inputs": TEXTS[:4]})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert main(["predict", "--adapter", str(artifacts[name]), "--json", *TEXTS[:4]]) == 0
        want = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [g["label"] for g in got] == [w["label"] for w in want], name
        for g, w in zip(got, want):
            for label, p in w["probabilities"].items():
                assert g["probabilities"][label] == pytest.approx(p, abs=1e-4)


def test_concurrent_requests_of_different_tasks_share_batches(client):
    names = ["sst", "review", "multi", "prefix", "head", "lora", "lora2", "freeze"]
    alone = {
        n: client.post("/v1/classify", json={"task": n, "inputs": TEXTS}).json() for n in names
    }
    before = _metric(client, "tunelab_batch_requests_count")
    results: dict[str, dict] = {}

    def call(n):
        results[n] = client.post("/v1/classify", json={"task": n, "inputs": TEXTS}).json()

    threads = [threading.Thread(target=call, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches = _metric(client, "tunelab_batch_requests_count") - before
    assert batches < len(names)  # some requests ran in the same batch
    for n in names:
        got, want = results[n]["results"], alone[n]["results"]
        assert [g["label"] for g in got] == [w["label"] for w in want], n
        for g, w in zip(got, want):
            for label in w["probabilities"]:
                assert g["probabilities"][label] == pytest.approx(
                    w["probabilities"][label], abs=1e-4
                )


def _assert_same(got: dict, want: dict) -> None:
    got, want = got["results"], want["results"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want):
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-4)


def _metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_tasks_health_metrics_openapi_and_generate(client, artifacts, capsys):
    from tunelab.__main__ import main

    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()}
    assert set(tasks) >= {"sst", "review", "multi", "prefix", "head", "lora", "sql"}
    backbones = [tasks[n]["backbone"] for n in ("sst", "lora", "hybrid", "freeze")]
    assert backbones == ["shared", "shared", "shared", "own"]
    assert tasks["sst"]["labels"] == ["positive", "negative"]
    assert tasks["sql"]["kind"] == "generation"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["tasks"] == len(tasks) and health["model"]
    questions = ["How many singer rows are there?", "How many song rows are there?"]
    r = client.post("/v1/generate", json={"task": "sql", "inputs": questions})
    assert r.status_code == 200, r.text
    assert main(["predict", "--adapter", str(artifacts["sql"]), "--json", *questions]) == 0
    want = [json.loads(x)["output"] for x in capsys.readouterr().out.splitlines()]
    assert r.json()["outputs"] == want
    r = client.post("/v1/generate", json={"task": "sql", "inputs": questions, "max_tokens": 999})
    assert r.status_code == 422 and "at most 256" in r.text
    assert client.post("/v1/classify", json={"task": "sst", "inputs": ["good"]}).status_code == 200
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'tunelab_request_seconds_bucket{endpoint="classify",task="sst",le="+Inf"}' in (
        metrics.text
    )
    assert 'tunelab_requests_total{endpoint="generate",task="sql",status="200"}' in metrics.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/generate", "/v1/tasks", "/v1/tasks/{name}", "/health"} <= set(
        paths
    )


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"task": "nope", "inputs": ["x"]}, 404, "unknown task 'nope'"),
        ({"task": "sst", "inputs": ["x"] * 9}, 413, "at most 8 per request"),
        ({"task": "sst", "inputs": ["x" * 201]}, 422, "at most 200"),
        ({"task": "sst", "inputs": [{"title": "x"}]}, 422, "missing field 'text'"),
        ({"task": "sql", "inputs": ["x"]}, 422, "use /v1/generate"),
        ({"task": "sst", "inputs": []}, 422, "at least 1"),
        ({"task": "sst", "inputs": ["bad \ud800 text"]}, 422, "not valid Unicode"),
        ({"task": "sst", "inputs": ["y" * 150] * 8 * 4}, 413, "over 4096 bytes"),
    ],
)
def test_limits_and_bad_requests(client, body, status, message):
    # json.dumps escapes a lone surrogate as \ud800, as any JSON client may send it
    r = client.post(
        "/v1/classify", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert message in r.text
    assert client.get("/health").status_code == 200


def test_hot_load_unload_and_refused_artifacts(client, artifacts):
    import shutil

    # loads name a folder under --adapter-root (the artifacts' folder) and need the admin key
    root = artifacts["sst"].parent
    sst = artifacts["sst"].name

    def load(name, path):
        return client.post("/v1/tasks", json={"name": name, "path": path}, headers=ADMIN)

    r = load("sst-copy", sst)
    assert r.status_code == 201, r.text
    assert r.json()["backbone"] == "shared" and r.json()["cached_prefix_slots"] > 4
    assert r.json()["path"] == sst  # relative to the root, not the server's absolute path
    a = client.post("/v1/classify", json={"task": "sst-copy", "inputs": TEXTS}).json()
    b = client.post("/v1/classify", json={"task": "sst", "inputs": TEXTS}).json()
    assert [x["label"] for x in a["results"]] == [x["label"] for x in b["results"]]
    assert load("sst-copy", sst).status_code == 409

    pickled = shutil.copytree(artifacts["sst"], root / "pickled")
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    other = shutil.copytree(artifacts["sst"], root / "other-base")
    meta = json.loads((other / "tunelab.json").read_text())
    meta["base_model"]["fingerprint"] = "0" * 16
    (other / "tunelab.json").write_text(json.dumps(meta))
    shapes = shutil.copytree(artifacts["sst"], root / "shapes")
    meta = json.loads((shapes / "tunelab.json").read_text())
    meta["method_config"]["num_virtual_tokens"] = 5
    (shapes / "tunelab.json").write_text(json.dumps(meta))
    for path, message in [
        ("pickled", "pickled/adapter_model.bin: a pickle file; tunelab loads only safetensors"),
        ("other-base", "fingerprint"),
        ("shapes", "has shape (4, 32), but this model and config need (5, 32)"),
        ("missing", "missing: no such adapter directory"),
    ]:
        r = load("bad", path)
        assert r.status_code == 422 and message in r.json()["detail"], r.text
        assert str(root) not in r.text  # the server's folders stay private
        # still serving, and the refused artifact left nothing behind
        assert client.get("/health").json()["status"] == "ok"
        assert "bad" not in [t["name"] for t in client.get("/v1/tasks").json()]
    assert client.post("/v1/classify", json={"task": "sst", "inputs": ["good"]}).status_code == 200

    # a LoRA adapter joins the shared backbone beside the others, and leaves without a trace
    lora_before = client.post("/v1/classify", json={"task": "lora", "inputs": TEXTS}).json()
    r = load("lora.copy", artifacts["lora"].name)
    assert r.status_code == 201 and r.json()["backbone"] == "shared", r.text
    copy = client.post("/v1/classify", json={"task": "lora.copy", "inputs": TEXTS}).json()
    assert client.delete("/v1/tasks/lora.copy", headers=ADMIN).status_code == 200
    lora_after = client.post("/v1/classify", json={"task": "lora", "inputs": TEXTS}).json()
    _assert_same(copy, lora_before)
    _assert_same(lora_after, lora_before)

    assert client.delete("/v1/tasks/sst-copy", headers=ADMIN).json() == {"unloaded": "sst-copy"}
    gone = client.post("/v1/classify", json={"task": "sst-copy", "inputs": ["x"]})
    assert gone.status_code == 404
    assert client.delete("/v1/tasks/sst-copy", headers=ADMIN).status_code == 404


def test_bearer_token(store):
    from tunelab.serve.app import ServeConfig, create_app

    with Server(create_app(store, ServeConfig(api_keys=("s3cret", "0ther")))) as c:
        body = {"task": "sst", "inputs": ["good"]}
        assert c.post("/v1/classify", json=body).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert c.post("/v1/classify", json=body, headers=bad).status_code == 401
        assert c.get("/v1/tasks").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/classify", json=body, headers=ok).status_code == 200
        other = {"Authorization": "Bearer 0ther"}  # any of several inference keys
        assert c.post("/v1/classify", json=body, headers=other).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no token


def test_schemathesis_finds_no_schema_violations(tiny_model_dir, artifacts):
    """Property-based requests from /openapi.json (bounded), with no key, an inference key and
    the admin key: no 5xx, and every status, content type, header and body is documented."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.store import AdapterStore

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    own = AdapterStore(load_backbone(str(tiny_model_dir)), torch.device("cpu"), max_tasks=3)
    own.load("sst", artifacts["sst"])
    own.load("sql", artifacts["sql"])
    cfg = ServeConfig(
        window_ms=1,
        max_new_tokens=4,
        max_body_bytes=8192,
        api_keys=("inf3rence",),
        admin_keys=(ADMIN_KEY,),
        adapter_root=artifacts["sst"].parent,
    )
    seen = []
    with Server(create_app(own, cfg)) as c:
        url = str(c.base_url).rstrip("/")
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        for headers in ({}, {"Authorization": "Bearer inf3rence"}, ADMIN):
            for result in schema.get_all_operations():
                _conformance(result.ok(), url, headers, checks, seen)()
        assert client_ok(url)
    assert len(seen) >= 100 and {200, 401, 403, 404, 422} <= set(seen)


def _conformance(op, url: str, headers: dict, checks: list, seen: list):
    """A bounded hypothesis test of one operation: call it, check the response."""
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=op.as_strategy())
    def check(case):
        r = case.call(base_url=url, headers=headers)
        seen.append(r.status_code)
        case.validate_response(r, checks=checks, headers=headers)

    return check


def client_ok(url: str) -> bool:
    return httpx.get(url + "/health").json()["status"] == "ok"


def test_cli_serves_and_finishes_in_flight_requests_on_sigterm(tiny_model_dir, artifacts):
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = dict(os.environ, TUNELAB_API_KEY="k3y")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunelab",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            f"sst={artifacts['sst']}",
            "--adapter",
            f"prefix={artifacts['prefix']}",
            "--port",
            str(port),
            "--window-ms",
            "1500",
            "--adapter-root",
            str(artifacts["sst"].parent),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k3y"}
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(url + "/v1/tasks").status_code == 401  # TUNELAB_API_KEY applies
        tasks = httpx.get(url + "/v1/tasks", headers=auth).json()
        assert [t["path"] for t in tasks] == ["a-pt", "a-prefix"]  # relative to --adapter-root
        result = {}

        def call():
            body = {"task": "prefix", "inputs": TEXTS[:2]}
            result["r"] = httpx.post(url + "/v1/classify", json=body, headers=auth, timeout=60)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)  # the request now waits in the 1.5 s batching window
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["r"].status_code == 200
        assert len(result["r"].json()["results"]) == 2
        # uvicorn shuts down cleanly, then re-raises the signal so the process ends by it
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "Traceback" not in proc.stderr.read()
    assert "task sst: prompt-tuning (classification, shared backbone)" in out
    assert f"serving 2 task(s) on http://127.0.0.1:{port}" in out


def test_cli_bad_adapter_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    from tunelab.__main__ import main

    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", "nodir"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    args = ["serve", "--model", str(tiny_model_dir), "--adapter", f"x={tmp_path}"]
    assert main(args) == 2
    assert "tunelab.json: missing" in capsys.readouterr().err

"""The OpenAI-compatible endpoints on a real server (uvicorn on loopback), driven by the official
`openai` client: models, completions and chat of a classification and a generation task,
streamed and not (the streamed text joined equals the whole one, which equals /v1/generate's
and /v1/classify's answers), OpenAI-shaped errors, keys, and a client that goes away."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
from conftest import write_jsonl
from test_generation import SQL_TASK, TABLES, sql_rows
from test_serve import TEXTS, Server, _artifact, _task_file

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "inf3rence-k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = [f"How many {t} rows are there?" for t in TABLES]
# no stop string and room to run: this task's rows decode until their token limit
LONG_TASK = SQL_TASK.replace('stop: ["\\n"]', "stop: []").replace(
    "max_new_tokens: 48", "max_new_tokens: 40"
)
assert "stop: []" in LONG_TASK


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    from tunelab.models import load_backbone
    from tunelab.serve.store import AdapterStore

    root = tmp_path_factory.mktemp("openai-artifacts")
    plain = _task_file(root / "plain")
    long = root / "long"
    long.mkdir()
    write_jsonl(long / "train.jsonl", sql_rows(TABLES))
    write_jsonl(long / "test.jsonl", sql_rows(TABLES[:2]))
    (long / "task.yaml").write_text(LONG_TASK)
    s = AdapterStore(load_backbone(str(tiny_model_dir)), torch.device("cpu"))
    s.load(
        "sst",
        _artifact(tiny_model_dir, plain, root / "a-sst", "prompt-tuning", num_virtual_tokens=4),
    )
    s.load(
        "sql",
        _artifact(
            tiny_model_dir,
            long / "task.yaml",
            root / "a-sql",
            "prompt-tuning",
            num_virtual_tokens=2,
            init="random",
        ),
    )
    return s


@pytest.fixture(scope="module")
def server(store):
    from tunelab.serve.app import ServeConfig, create_app

    cfg = ServeConfig(window_ms=20, max_body_bytes=4096, max_inputs=8, api_keys=(KEY,))
    srv = Server(create_app(store, cfg))
    with srv as http:
        http.headers.update(AUTH)
        yield srv, http


@pytest.fixture(scope="module")
def http(server):
    return server[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _generate(http, inputs, max_tokens=None) -> list[str]:
    body = {"task": "sql", "inputs": inputs}
    if max_tokens:
        body["max_tokens"] = max_tokens
    r = http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_models_lists_the_tasks_with_their_kind(client):
    models = {m.id: m.to_dict() for m in client.models.list()}
    assert set(models) == {"sst", "sql"}
    assert models["sst"]["object"] == "model" and models["sst"]["owned_by"] == "tunelab"
    assert models["sst"]["kind"] == "classification" and models["sql"]["kind"] == "generation"
    assert models["sst"]["method"] == "prompt-tuning" and models["sst"]["created"] > 0
    assert models["sst"]["labels"] == ["positive", "negative"]


def test_openapi_documents_the_openai_endpoints(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/models"]["get"]["responses"]) == {"200", "401"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        error = responses["404"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/ErrorBody")


def test_completions_equal_generate_streamed_or_not(client, http):
    want = _generate(http, QUESTIONS)
    assert any(len(w) > 10 for w in want)  # something to stream
    got = client.completions.create(model="sql", prompt=QUESTIONS)
    assert got.object == "text_completion" and got.model == "sql"
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == want
    assert {c.finish_reason for c in got.choices} <= {"stop", "length"}
    assert got.usage.prompt_tokens > 4 * 5 and got.usage.completion_tokens > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    pieces: dict[int, list[str]] = {i: [] for i in range(4)}
    reasons = {}
    usage = None
    stream = client.completions.create(
        model="sql", prompt=QUESTIONS, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        assert chunk.object == "text_completion" and chunk.id.startswith("cmpl-")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces[c.index].append(c.text)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert ["".join(pieces[i]) for i in range(4)] == want
    assert reasons == {i: c.finish_reason for i, c in enumerate(got.choices)}
    assert max(len([p for p in ps if p]) for ps in pieces.values()) > 3  # token by token
    assert usage.completion_tokens == got.usage.completion_tokens


def test_max_tokens_and_stop(client, http):
    q = QUESTIONS[0]
    short = client.completions.create(model="sql", prompt=q, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].text == _generate(http, [q], max_tokens=3)[0]
    whole = _generate(http, [q])[0]
    stop = re.findall("[a-z]{2}", whole[len(whole) // 2 :])[0]  # letters from its second half
    want = whole[: whole.find(stop)].strip()
    got = client.completions.create(model="sql", prompt=q, stop=[stop])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="sql", prompt=q, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_chat_of_a_generation_task(client, http):
    want = _generate(http, [QUESTIONS[1]])[0]
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    got = client.chat.completions.create(model="sql", messages=messages)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="sql", messages=messages, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_classification_completion_is_the_label(client, http):
    r = http.post("/v1/classify", json={"task": "sst", "inputs": TEXTS[:4]})
    want = r.json()["results"]
    got = client.completions.create(model="sst", prompt=TEXTS[:4], logprobs=2)
    for c, w in zip(got.choices, want, strict=True):
        extra = c.to_dict()
        assert c.text == w["label"] and c.finish_reason == "stop"
        assert extra["label_probs"] == pytest.approx(w["probabilities"], abs=1e-6)
        assert c.logprobs.tokens == [w["label"]]
        top = c.logprobs.top_logprobs[0]
        assert {k: math.exp(v) for k, v in top.items()} == pytest.approx(
            w["probabilities"], abs=1e-5
        )
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens > 0
    # a JSON object of the task's fields, as text or as an object, reads as the same input
    as_json = client.completions.create(model="sst", prompt=json.dumps({"text": TEXTS[0]}))
    assert as_json.choices[0].text == want[0]["label"]
    r = http.post("/v1/completions", json={"model": "sst", "prompt": {"text": TEXTS[0]}})
    assert r.json()["choices"][0]["text"] == want[0]["label"]
    streamed = list(client.completions.create(model="sst", prompt=TEXTS[:4], stream=True))
    assert [c.choices[0].text for c in streamed] == [w["label"] for w in want]

    chat = client.chat.completions.create(
        model="sst", messages=[{"role": "user", "content": TEXTS[1]}], logprobs=True
    )
    assert chat.choices[0].message.content == want[1]["label"]
    tops = chat.choices[0].logprobs.content[0].top_logprobs
    assert {t.token for t in tops} == {"positive", "negative"}
    chunks = client.chat.completions.create(
        model="sst", messages=[{"role": "user", "content": TEXTS[1]}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want[1]["label"]


def test_errors_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    assert "'nope'" in e.value.message and "sst" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=server[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="sql", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sql", prompt="x", max_tokens=999)
    assert e.value.param == "max_tokens" and "at most 256" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sql", messages=[{"role": "system", "content": "x"}])
    assert "no user message" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sql", prompt="x", n=2)
    assert e.value.param == "n"


@pytest.mark.parametrize(
    "headers, body, status, code, words",
    [
        ({}, {"model": "sst", "prompt": "x"}, 401, "invalid_api_key", "bearer"),
        (AUTH, {"model": "nope", "prompt": "x"}, 404, "model_not_found", "'nope'"),
        (AUTH, {"model": "sst"}, 400, None, "prompt"),
        (AUTH, {"model": "sst", "prompt": "x", "max_tokens": 0}, 400, None, "max_tokens"),
        (AUTH, {"model": "sst", "prompt": ["x"] * 9}, 400, None, "at most 8"),
        (AUTH, {"model": "sst", "prompt": [{"title": "x"}]}, 400, None, "missing field 'text'"),
        (AUTH, {"model": "sst", "prompt": "y" * 5000}, 413, "request_too_large", "4096 bytes"),
    ],
)
def test_error_bodies(server, headers, body, status, code, words):
    url = server[0].url + "/v1/completions"
    r = httpx.post(url, json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and words in error["message"]
    assert error["type"] == "invalid_request_error"


def _cancelled(http) -> float:
    text = http.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("tunelab_cancelled_rows_total"))
    return float(line.split()[-1])


def test_a_client_that_goes_away_frees_its_row(server, http, client):
    q = QUESTIONS[2]
    whole = client.completions.create(model="sql", prompt=q, max_tokens=256)
    assert whole.choices[0].finish_reason == "length"  # left alone, it runs 256 tokens
    before = _cancelled(http)
    body = {"model": "sql", "prompt": q, "max_tokens": 256, "stream": True}
    with httpx.stream(
        "POST", server[0].url + "/v1/completions", json=body, headers=AUTH, timeout=60
    ) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
    # the connection is closed: the decoding loop drops the row at its next step (a row that
    # ran to its 256 tokens would end as "length" and not be counted; no wall-clock bound,
    # which a busy machine breaks)
    deadline = time.time() + 30
    while _cancelled(http) == before:
        assert time.time() < deadline, "the row was not cancelled"
        time.sleep(0.01)
    assert _cancelled(http) == before + 1


def test_static_batching_answers_the_same(store, http):
    from tunelab.serve.app import ServeConfig, create_app

    want = _generate(http, QUESTIONS[:2])
    cfg = ServeConfig(window_ms=20, static_batching=True, api_keys=(KEY,))
    with Server(create_app(store, cfg)) as static:
        url = str(static.base_url).rstrip("/")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        got = client.completions.create(model="sql", prompt=QUESTIONS[:2])
        assert [c.text for c in got.choices] == want and got.usage.completion_tokens > 0
        chunks = client.completions.create(model="sql", prompt=QUESTIONS[:2], stream=True)
        pieces = {0: "", 1: ""}
        for chunk in chunks:
            for c in chunk.choices:
                pieces[c.index] += c.text
        assert [pieces[0], pieces[1]] == want

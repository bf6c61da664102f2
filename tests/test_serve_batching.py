"""Continuous batching for generation (tunelab/serve/continuous.py): rows of any task join the
decoding batch at any step and leave as soon as they are done, with exactly the text of the
static path (`tunelab predict`'s `greedy_generate`); a short request does not wait for a long
one; a cancelled row leaves; rows of different tasks share each decoding step."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import write_jsonl
from test_generation import SQL_TASK, TABLES, sql_rows
from test_serve import Server, _artifact, _examples, artifacts, store  # noqa: F401 (fixtures)

pytest.importorskip("fastapi")

QUESTIONS = [
    "How many singer rows are there?",
    "Name every singer .",
    "How many concert rows are there?",
    "List the stadium names and song titles",
    "How many song rows are there?",
]


@pytest.fixture(scope="module")
def gen_store(tiny_model_dir, artifacts, tmp_path_factory):  # noqa: F811
    """The sql generation tasks (soft prompt, prefix, LoRA on the shared backbone; a
    fine-tuned top layer on its own copy) and a generation task without stop strings, whose
    rows run to their limit."""
    from tunelab.models import load_backbone
    from tunelab.serve.store import AdapterStore

    root = tmp_path_factory.mktemp("batching")
    sql = artifacts["sql"].parent / "sql" / "task.yaml"
    free = root / "free"
    free.mkdir()
    write_jsonl(free / "train.jsonl", sql_rows(TABLES))
    write_jsonl(free / "test.jsonl", sql_rows(TABLES[:2]))
    (free / "task.yaml").write_text(SQL_TASK.replace('  stop: ["\\n"]\n', ""))
    extra = {
        "sql-freeze": _artifact(tiny_model_dir, sql, root / "a-freeze", "freeze", train_top=1),
        "free": _artifact(
            tiny_model_dir,
            free / "task.yaml",
            root / "a-free",
            "prompt-tuning",
            num_virtual_tokens=3,
            init="random",
        ),
    }
    s = AdapterStore(load_backbone(str(tiny_model_dir)), torch.device("cpu"))
    for name in ("sql", "sql-prefix", "sql-lora"):
        s.load(name, artifacts[name])
    for name, path in extra.items():
        s.load(name, path)
    return s


def _static(entry, examples, limit):
    from tunelab.lm.generate import greedy_generate
    from tunelab.serve.forward import task_routing

    with task_routing(entry):
        return greedy_generate(
            entry.tuned, examples, entry.backbone.tokenizer, limit, entry.task.generation.stop
        )


def _rows(tasks, name, texts, limit, **kw):
    from tunelab.serve.continuous import Row

    entry = tasks.get(name)
    stop = list(entry.task.generation.stop)
    return [Row(entry, ex, limit, stop, **kw) for ex in _examples(entry, texts)]


def test_rows_joining_mid_decode_get_the_static_paths_text(gen_store):
    from tunelab.serve.continuous import Decoder
    from tunelab.serve.decode import generate_mixed

    pad = gen_store.backbone.tokenizer.pad_token_id
    steps: list[list[str]] = []
    decoder = Decoder(pad, on_step=lambda rows: steps.append([r.entry.name for r in rows]))
    # (step it joins at, task, texts, max_tokens)
    plan = [
        (0, "free", QUESTIONS[:2], 40),
        (0, "sql", QUESTIONS[1:4], 30),
        (0, "sql-freeze", QUESTIONS[:2], 20),
        (2, "sql-lora", QUESTIONS[2:], 25),
        (2, "free", QUESTIONS[3:], 3),
        (5, "sql-prefix", QUESTIONS, 30),
        (9, "free", QUESTIONS[4:], 1),
        (9, "sql", QUESTIONS[:1], 6),
    ]
    rows = {i: _rows(gen_store, n, t, limit) for i, (_, n, t, limit) in enumerate(plan)}
    done, step = [], 0
    while step == 0 or len(decoder):
        new = [r for i, (at, *_) in enumerate(plan) if at == step for r in rows[i]]
        done += decoder.step(new)
        step += 1
    assert len(done) == sum(len(r) for r in rows.values())
    for i, (_, name, texts, limit) in enumerate(plan):
        entry = gen_store.get(name)
        want = _static(entry, _examples(entry, texts), limit)
        assert [r.text for r in rows[i]] == want, (name, limit)
        # and what the server's static mixed-task batches return
        assert generate_mixed([(entry, _examples(entry, texts), limit, ())], pad)[0] == want
    lengths = {len(r.tokens) for rs in rows.values() for r in rs}
    assert 40 in lengths and 1 in lengths  # rows ran to different lengths
    assert len({r.text for rs in rows.values() for r in rs}) > 8  # tasks and inputs differ
    # rows of several tasks in one decoding pass, on the shared backbone; the fine-tuned copy
    # decodes in its own passes
    assert any(len(set(s)) >= 3 for s in steps)
    assert not any("sql-freeze" in s and len(set(s)) > 1 for s in steps)


def test_streamed_pieces_make_the_text_and_a_cancelled_row_leaves(gen_store):
    from tunelab.serve.continuous import Decoder

    pad = gen_store.backbone.tokenizer.pad_token_id
    sizes = []
    decoder = Decoder(pad, on_step=lambda rows: sizes.append(len(rows)))
    pieces: dict[int, list[str]] = {0: [], 1: []}
    streamed = [
        _rows(gen_store, "free", [q], 30, on_token=pieces[i].append)[0]
        for i, q in enumerate(QUESTIONS[:2])
    ]
    doomed = _rows(gen_store, "sql-lora", QUESTIONS[2:4], 30)
    finished = decoder.step(streamed + doomed)
    for _ in range(3):
        finished += decoder.step()
    assert len(decoder) == 4 and sizes[-1] == 4
    doomed[0].cancelled = True
    finished += decoder.step()
    assert doomed[0] in finished and sizes[-1] == 3  # it left before the next pass
    while len(decoder):
        finished += decoder.step()
    assert set(finished) == set(streamed + doomed)
    free = gen_store.get("free")
    want = _static(free, _examples(free, QUESTIONS[:2]), 30)
    assert [r.text for r in streamed] == want
    assert ["".join(pieces[0]), "".join(pieces[1])] == want
    assert len(pieces[0]) > 3  # token by token, not all at the end
    lora = gen_store.get("sql-lora")
    assert doomed[1].text == _static(lora, _examples(lora, QUESTIONS[3:4]), 30)[0]
    assert len(doomed[0].tokens) == 5  # one from its prefill, one per step it stayed


def test_held_back_text_never_streams_a_stop_strings_start():
    from tunelab.serve.continuous import held_back

    assert held_back("SELECT a \n", ["\n\n"]) == "SELECT a"
    assert held_back("SELECT a;\nEN", ["\nEND"]) == "SELECT a;"
    assert held_back("caf\ufffd", []) == "caf"
    assert held_back("SELECT a", ["\n"]) == "SELECT a"


async def _generate_both(batcher, entry, long_ex, short_ex, order: list[str], started):
    async def one(tag, ex, limit):
        out = await batcher.generate(entry, [ex], limit)
        order.append(tag)
        return out

    batcher.start()
    try:
        long = asyncio.create_task(one("long", long_ex, 40))
        while not started.is_set():  # the long row is decoding
            await asyncio.sleep(0.001)
        short = asyncio.create_task(one("short", short_ex, 2))
        return await long, await short
    finally:
        await batcher.stop()


@pytest.mark.parametrize("continuous", [True, False])
def test_a_short_request_does_not_wait_for_a_long_one(gen_store, continuous):
    from tunelab.serve.batcher import Batcher

    entry = gen_store.get("free")
    pad = gen_store.backbone.tokenizer.pad_token_id
    batcher = Batcher(pad, window_ms=0, continuous=continuous)
    started = threading.Event()

    def slow(rows):  # a slower machine: every decoding step takes 10 ms
        started.set()
        time.sleep(0.01)

    # both paths embed each step's new tokens once
    hook = entry.tuned.model.get_input_embeddings().register_forward_hook(lambda *a: slow(None))
    long_ex, short_ex = _examples(entry, QUESTIONS[:2])
    order: list[str] = []
    try:
        long, short = asyncio.run(_generate_both(batcher, entry, long_ex, short_ex, order, started))
    finally:
        hook.remove()
    assert long == _static(entry, [long_ex], 40) and short == _static(entry, [short_ex], 2)
    # continuous batching: the short request joins the running batch and finishes first;
    # static batching (the old way): it waits until the long batch has decoded to its end
    assert order == (["short", "long"] if continuous else ["long", "short"])


def test_server_batches_generation_continuously(gen_store):
    """Over HTTP: concurrent /v1/generate requests of different tasks and lengths get the
    static path's text; a short one sent while a long one decodes comes back first."""
    import httpx

    from tunelab.serve.app import ServeConfig, create_app

    app = create_app(gen_store, ServeConfig(window_ms=0))
    batcher = app.state.batcher
    assert batcher.continuous
    started, seen = threading.Event(), []

    def slow(rows):
        seen.append({r.entry.name for r in rows})
        started.set()
        time.sleep(0.03)  # margin for a busy machine

    batcher.decoder.on_step = slow
    results: dict[str, dict] = {}
    with Server(app) as client:

        def call(tag, task, text, limit):
            body = {"task": task, "inputs": [text], "max_tokens": limit}
            r = httpx.post(f"{client.base_url}/v1/generate", json=body, timeout=60)
            results[tag] = {
                "status": r.status_code,
                "out": r.json().get("outputs"),
                "t": time.time(),
            }

        long = threading.Thread(target=call, args=("long", "free", QUESTIONS[0], 40))
        long.start()
        assert started.wait(30)
        call("short", "sql-lora", QUESTIONS[1], 2)
        assert long.is_alive()  # the short request came back while the long one decodes
        long.join(60)
    assert results["short"]["t"] < results["long"]["t"]
    for tag, task, text, limit in [
        ("long", "free", QUESTIONS[0], 40),
        ("short", "sql-lora", QUESTIONS[1], 2),
    ]:
        entry = gen_store.get(task)
        assert results[tag]["status"] == 200
        assert results[tag]["out"] == _static(entry, _examples(entry, [text]), limit)
    assert {"free", "sql-lora"} in seen  # both tasks' rows in one decoding pass


def test_static_batching_flag(tiny_model_dir, monkeypatch):
    """`tunelab serve` batches generation continuously; `--static-batching` the old way."""
    import argparse

    from tunelab.serve.cli import add_arguments, build

    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    monkeypatch.delenv("TUNELAB_ADMIN_KEY", raising=False)
    for flags, continuous in [([], True), (["--static-batching"], False)]:
        p = argparse.ArgumentParser()
        add_arguments(p)
        app, _ = build(p.parse_args(["--model", str(tiny_model_dir), *flags]))
        assert app.state.batcher.continuous is continuous
        assert app.state.config.static_batching is not continuous


def test_unloading_a_task_lets_its_decoding_rows_finish(gen_store, artifacts):  # noqa: F811
    """A LoRA task unloaded while its row decodes: the row ends with its whole text (its
    adapter stays until then), and the task is gone afterwards."""
    import httpx
    from test_serve import ADMIN, ADMIN_KEY

    from tunelab.serve.app import ServeConfig, create_app

    entry = gen_store.get("sql-lora")
    want = _static(entry, _examples(entry, [QUESTIONS[3]]), 30)
    app = create_app(gen_store, ServeConfig(window_ms=0, admin_keys=(ADMIN_KEY,)))
    started = threading.Event()
    stepped = []

    def slow(rows):
        started.set()
        time.sleep(0.02)
        stepped.append(time.time())

    app.state.batcher.decoder.on_step = slow
    got = {}
    try:
        with Server(app) as client:

            def call():
                body = {"task": "sql-lora", "inputs": [QUESTIONS[3]], "max_tokens": 30}
                r = httpx.post(f"{client.base_url}/v1/generate", json=body, timeout=60)
                got["generate"] = (r.status_code, r.json())

            thread = threading.Thread(target=call)
            thread.start()
            assert started.wait(30)
            assert thread.is_alive()
            r = client.delete("/v1/tasks/sql-lora", headers=ADMIN)
            got["delete"] = (r.status_code, time.time())
            thread.join(60)
            assert (
                client.post("/v1/generate", json={"task": "sql-lora", "inputs": ["x"]}).status_code
                == 404
            )
    finally:
        if gen_store.get("sql-lora") is None:
            gen_store.load("sql-lora", artifacts["sql-lora"])
    assert got["delete"][0] == 200
    assert got["generate"] == (200, {"task": "sql-lora", "outputs": want})
    # the delete answered after the row's last decoding step (not the client threads' order:
    # both answers leave the server together)
    assert stepped[-1] <= got["delete"][1]


def test_batcher_stream_pieces_stop_strings_and_a_client_leaving(gen_store):
    from tunelab.serve.batcher import Batcher
    from tunelab.serve.decode import generate_mixed

    entry = gen_store.get("free")
    pad = gen_store.backbone.tokenizer.pad_token_id
    batcher = Batcher(pad, window_ms=0)
    sizes = []
    batcher.decoder.on_step = lambda rows: sizes.append(len(rows))
    ex = _examples(entry, QUESTIONS[:2])
    full = _static(entry, ex[:1], 30)[0]
    stop = next(c for c in full[1:] if c != "\ufffd")

    async def main():
        batcher.start()
        try:
            pieces = [p async for p in batcher.stream(entry, ex[0], 30)]
            cut = [p async for p in batcher.stream(entry, ex[0], 30, stop=[stop])]
            cut_whole = await batcher.generate(entry, ex[:1], 30, stop=[stop])
            # a client that leaves after two pieces while another request decodes
            other = asyncio.create_task(batcher.generate(entry, ex[1:], 30))
            gen = batcher.stream(entry, ex[0], 30)
            first = [await anext(gen), await anext(gen)]
            await gen.aclose()
            return pieces, cut, cut_whole, first, await other
        finally:
            await batcher.stop()

    sizes.clear()
    pieces, cut, cut_whole, first, other = asyncio.run(main())
    assert "".join(pieces) == full and len(pieces) > 3
    want_cut = generate_mixed([(entry, ex[:1], 30, [stop])], pad)[0]
    assert "".join(cut) == cut_whole[0] == want_cut[0] and len(want_cut[0]) < len(full)
    assert full.startswith("".join(first))
    assert other == _static(entry, ex[1:], 30)
    assert sizes[-1] == 1 and 2 in sizes  # the row of the client gone left the batch
    assert len(batcher.decoder) == 0

"""`tunelab serve`'s trust boundary on a real HTTP server: loads only from under
--adapter-root (no `..`, absolute paths or symlinks out, and no hint of what exists outside),
admin keys apart from inference keys, task and memory limits, bounded metric labels, and the
command's key sources and warnings."""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_serve import TEXTS, Server, _artifact, _task_file

pytest.importorskip("fastapi")

INFER, ADMIN = "inf3rence-k3y", "adm1n-k3y"
AS_INFER = {"Authorization": f"Bearer {INFER}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def tree(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """root/ with artifacts and links in it, and an artifact outside it."""
    base = tmp_path_factory.mktemp("serve-security")
    task = _task_file(base / "task")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    _artifact(tiny_model_dir, task, root / "sst", "prompt-tuning", num_virtual_tokens=4)
    _artifact(tiny_model_dir, task, root / "freeze", "freeze", train_top=1)
    _artifact(tiny_model_dir, task, outside / "art", "prompt-tuning", num_virtual_tokens=4)
    (root / "escape").symlink_to(outside / "art")  # a folder link out of the root
    (root / "inner").symlink_to(root / "sst")  # a link that stays inside
    sneaky = shutil.copytree(root / "sst", root / "sneaky")  # a file link out of the root
    (sneaky / "tunelab.json").unlink()
    (sneaky / "tunelab.json").symlink_to(outside / "art" / "tunelab.json")
    return {"root": root, "outside": outside, "model": tiny_model_dir}


@contextmanager
def serving(tree, max_tasks=None, max_bytes=None, startup=("sst",), **cfg):
    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.store import AdapterStore

    store = AdapterStore(load_backbone(str(tree["model"])), torch.device("cpu"), max_tasks)
    store.max_bytes = max_bytes
    for name in startup:
        store.load(name, tree["root"] / name)
    with Server(create_app(store, ServeConfig(window_ms=1, **cfg))) as client:
        yield client, store


def _load(client, path, name="new", headers=AS_ADMIN):
    return client.post("/v1/tasks", json={"name": name, "path": path}, headers=headers)


def _outside_paths(tree) -> list[str]:
    out = tree["outside"]
    return [
        "../outside/art",  # exists
        "../outside/nothing",  # does not
        "sst/../../outside/art",
        str(out / "art"),  # absolute, exists
        str(out / "nothing"),  # absolute, does not
        str(tree["root"] / "sst"),  # absolute even inside the root
        "/etc",
        "escape",  # a symlink out of the root
        "escape/",
        "sneaky",  # a folder whose tunelab.json links out
        "sst/\x00",
    ]


@pytest.mark.parametrize("keys", ["none", "admin-only", "admin-and-inference"])
def test_paths_outside_the_root_are_403_with_one_message(tree, keys):
    admin = () if keys == "none" else (ADMIN,)
    api = (INFER,) if keys == "admin-and-inference" else ()
    with serving(tree, adapter_root=tree["root"], admin_keys=admin, api_keys=api) as (c, store):
        bodies = set()
        for path in _outside_paths(tree):
            r = _load(c, path)
            assert r.status_code == 403, (path, r.text)
            assert str(tree["outside"]) not in r.text and str(tree["root"]) not in r.text
            bodies.add(r.text)
            if api:
                assert _load(c, path, headers=AS_INFER).status_code == 403
                assert _load(c, path, headers={}).status_code == 401
        # the same answer whether or not the path exists: nothing learned about the outside
        assert len(bodies) == 1, bodies
        want = "loading tasks is off" if keys == "none" else "under the server's --adapter-root"
        assert want in bodies.pop()
        assert [t["name"] for t in c.get("/v1/tasks", headers=AS_INFER).json()] == ["sst"]
        r = c.post("/v1/classify", json={"task": "sst", "inputs": TEXTS}, headers=AS_INFER)
        assert r.status_code == 200
        if admin:  # inside the root, also through a link that stays inside, it loads
            for name, path in (("a", "sst"), ("b", "inner"), ("c", "./escape/../sst")):
                r = _load(c, path, name)
                if path.count("..") == 0:
                    assert r.status_code == 201 and r.json()["path"] == "sst", r.text
                else:
                    assert r.status_code == 403  # any `..` is refused before looking


def test_inference_keys_cannot_load_or_unload_and_the_admin_key_can(tree):
    cfg = dict(adapter_root=tree["root"], admin_keys=(ADMIN,), api_keys=(INFER, "0ther-k3y"))
    with serving(tree, **cfg) as (c, store):
        for headers in (AS_INFER, {"Authorization": "Bearer 0ther-k3y"}):
            r = _load(c, "sst", "mine", headers=headers)
            assert r.status_code == 403 and "needs the admin key" in r.text
            r = c.delete("/v1/tasks/sst", headers=headers)
            assert r.status_code == 403 and "needs the admin key" in r.text
        assert _load(c, "sst", "mine", headers={}).status_code == 401
        wrong = {"Authorization": f"Bearer {ADMIN}x"}
        assert c.delete("/v1/tasks/sst", headers=wrong).status_code == 401
        assert store.get("sst") is not None and store.get("mine") is None

        r = _load(c, "sst", "mine")
        assert r.status_code == 201, r.text
        tasks = c.get("/v1/tasks", headers=AS_INFER)
        # start-up adapters show as "startup", loaded ones relative to the root
        assert {t["name"]: t["path"] for t in tasks.json()} == {"sst": "startup", "mine": "sst"}
        assert str(tree["root"]) not in tasks.text
        r = c.post("/v1/classify", json={"task": "mine", "inputs": TEXTS}, headers=AS_INFER)
        assert r.status_code == 200
        assert c.delete("/v1/tasks/mine", headers=AS_ADMIN).json() == {"unloaded": "mine"}
        assert c.delete("/v1/tasks/sst", headers=AS_ADMIN).status_code == 200
        assert c.get("/v1/tasks", headers=AS_ADMIN).json() == []  # the admin key may read too


def test_task_management_is_off_without_an_admin_key_and_loading_without_a_root(tree):
    with serving(tree, adapter_root=tree["root"], api_keys=(INFER,)) as (c, _):
        r = _load(c, "sst", headers=AS_INFER)
        assert r.status_code == 403 and "loading tasks is off" in r.text and "admin key" in r.text
        r = c.delete("/v1/tasks/sst", headers=AS_INFER)
        assert r.status_code == 403 and "unloading tasks is off" in r.text
    with serving(tree, admin_keys=(ADMIN,)) as (c, _):
        r = _load(c, "sst")
        assert r.status_code == 403 and "--adapter-root" in r.text
        assert c.delete("/v1/tasks/sst", headers=AS_ADMIN).status_code == 200


def test_a_load_past_the_memory_budget_is_507_and_serving_goes_on(tree):
    from tunelab.models import load_backbone
    from tunelab.serve.store import param_bytes

    base = param_bytes(load_backbone(str(tree["model"])).model)
    # the backbone and three copies of it fit, a fourth copy does not
    budget = int(base * 4.5)
    cfg = dict(adapter_root=tree["root"], admin_keys=(ADMIN,))
    with serving(tree, max_bytes=budget, **cfg) as (c, store):
        for i in range(1, 4):
            r = _load(c, "freeze", f"f{i}")
            assert r.status_code == 201 and r.json()["backbone"] == "own", r.text
            assert r.json()["param_bytes"] == base  # its own copy of the backbone
        assert store.get("f1").backbone.model is not store.backbone.model
        r = _load(c, "freeze", "f4")
        assert r.status_code == 507, r.text
        detail = r.json()["detail"]
        assert "its own copy of the backbone" in detail and "--max-memory-gb" in detail
        assert f"{base / 1e9:.3g} GB" in detail and f"{budget / 1e9:.3g} GB" in detail
        assert (
            store.get("f4") is None
            and store.held_bytes() == 4 * base + store.get("sst").added_bytes
        )
        # still serving: every task answers, and a small shared task still fits
        for name in ("sst", "f1", "f3"):
            r = c.post("/v1/classify", json={"task": name, "inputs": TEXTS})
            assert r.status_code == 200, r.text
        assert _load(c, "sst", "small").status_code == 201
        assert c.delete("/v1/tasks/f1", headers=AS_ADMIN).status_code == 200
        assert _load(c, "freeze", "f4").status_code == 201  # room again after an unload


def test_max_tasks_is_409_with_the_figure(tree):
    with serving(tree, max_tasks=2, adapter_root=tree["root"], admin_keys=(ADMIN,)) as (c, _):
        assert _load(c, "sst", "two").status_code == 201
        r = _load(c, "sst", "three")
        assert r.status_code == 409 and "2 tasks loaded; --max-tasks is 2" in r.text
        assert c.post("/v1/classify", json={"task": "two", "inputs": TEXTS}).status_code == 200


def test_unknown_task_names_share_one_metrics_label(tree):
    with serving(tree) as (c, _):
        for i in range(1000):
            name = f'x{i}"\\\n' + "n" * 200  # quotes, backslashes, newlines: none reach /metrics
            endpoint = "/v1/classify" if i % 2 else "/v1/generate"
            assert c.post(endpoint, json={"task": name, "inputs": ["a"]}).status_code == 404
        assert c.post("/v1/classify", json={"task": "sst", "inputs": ["a"]}).status_code == 200
        text = c.get("/metrics").text
    assert len(text.encode()) < 20_000, len(text)
    assert 'tunelab_requests_total{endpoint="classify",task="unknown",status="404"} 500' in text
    assert 'tunelab_requests_total{endpoint="generate",task="unknown",status="404"} 500' in text
    assert 'tunelab_requests_total{endpoint="classify",task="sst",status="200"} 1' in text
    assert "nnnn" not in text


def test_metric_labels_are_escaped():
    from tunelab.serve.metrics import Metrics

    m = Metrics()
    m.observe_request("classify", 'a"b\\c\nd', 200, 0.01, 1)
    text = m.render(1)
    assert 'task="a\\"b\\\\c\\nd"' in text
    # every sample is one line: name{label="value",...} number
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\\n]|\\["\\n])*",?)*\})? [0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line


def test_openapi_documents_every_status(tree):
    with serving(tree, admin_keys=(ADMIN,)) as (c, _):
        paths = c.get("/openapi.json").json()["paths"]
    want = {
        ("/v1/classify", "post"): {"200", "401", "404", "413", "422"},
        ("/v1/generate", "post"): {"200", "401", "404", "413", "422"},
        ("/v1/tasks", "get"): {"200", "401"},
        ("/v1/tasks", "post"): {"201", "401", "403", "409", "413", "422", "507"},
        ("/v1/tasks/{name}", "delete"): {"200", "401", "403", "404", "422"},  # FastAPI adds 422
        ("/metrics", "get"): {"200", "401"},
        ("/health", "get"): {"200"},
    }
    for (path, method), codes in want.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == codes, (path, method)
        for code in codes - {"200", "201"}:
            assert "application/json" in responses[code]["content"], (path, code)


def test_cli_keys_come_from_files_and_the_environment(tree, tmp_path, capsys, monkeypatch):
    import argparse

    from tunelab.__main__ import main
    from tunelab.serve.app import ServeConfig
    from tunelab.serve.cli import add_arguments, read_keys, warnings_for

    p = argparse.ArgumentParser()
    add_arguments(p)
    keys = tmp_path / "keys"
    keys.write_text("# inference keys\nk1\n\n  k2  \n")
    admin = tmp_path / "admin"
    admin.write_text("adm\n")
    env = {"TUNELAB_API_KEY": "k3, k4", "TUNELAB_ADMIN_KEY": "adm2"}
    args = p.parse_args(["--api-key-file", str(keys), "--admin-key-file", str(admin)])
    assert read_keys(args, env) == (["k3", "k4", "k1", "k2"], ["adm2", "adm"])

    model = ["serve", "--model", str(tree["model"])]
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    monkeypatch.delenv("TUNELAB_ADMIN_KEY", raising=False)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    for argv, message in [
        (["--api-key", "s3cret"], "shows in `ps`"),
        (["--api-key-file", str(tmp_path / "missing")], "--api-key-file"),
        (["--admin-key-file", str(empty)], "no keys in it"),
        (["--api-key-file", str(admin), "--admin-key-file", str(admin)], "also an inference"),
        (["--adapter-root", str(tmp_path / "missing")], "no such directory"),
        (["--max-memory-gb", "0"], "--max-memory-gb must be a positive number"),
        (["--max-tasks", "0"], "--max-tasks must be >= 1"),
        (["--max-memory-gb", "1e-9"], "the backbone alone holds"),
    ]:
        assert main(model + argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)

    # the command warns before it listens; uvicorn.run stands in for the server here
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert main(model + ["--host", "0.0.0.0"]) == 0
    assert "warning: serving on 0.0.0.0 with no inference key" in capsys.readouterr().err
    monkeypatch.setenv("TUNELAB_API_KEY", "k")
    assert main(model + ["--host", "0.0.0.0"]) == 0
    assert "warning" not in capsys.readouterr().err

    open_cfg = ServeConfig()
    assert any("no inference key" in w for w in warnings_for("0.0.0.0", open_cfg))
    assert any("no inference key" in w for w in warnings_for("example.org", open_cfg))
    assert not warnings_for("127.0.0.1", open_cfg) and not warnings_for("::1", open_cfg)
    assert not warnings_for("0.0.0.0", ServeConfig(api_keys=("k",)))

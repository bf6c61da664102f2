"""The server refuses an artifact holding NaN (422, as for other bad artifacts) and keeps
serving; at start-up the same artifact is one line and exit code 2."""

from __future__ import annotations

import pytest
import torch
from conftest import make_task
from safetensors.torch import load_file, save_file

from tunelab.__main__ import main

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-nan")
    task, good, bad = make_task(root), root / "good", root / "nan"
    for out in (good, bad):
        argv = ["train", "--task", task, "--model", tiny_model_dir, "--out", out]
        argv += ["--set", "steps=2"]
        assert main([str(a) for a in argv]) == 0
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    tensors["prompt_embeddings"][3] = float("inf")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    return good, bad


def test_store_and_http_refuse_a_nan_artifact(tiny_model_dir, artifacts):
    from fastapi.testclient import TestClient

    from tunelab.errors import TunelabError
    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.store import AdapterStore

    good, bad = artifacts
    store = AdapterStore(load_backbone(str(tiny_model_dir)), torch.device("cpu"))
    store.load("good", good)
    with pytest.raises(TunelabError, match="holds infinity"):
        store.load("bad", bad)
    # loading while serving: an admin key, and a path under the operator's --adapter-root
    config = ServeConfig(adapter_root=bad.parent, admin_keys=("admin-key",))
    with TestClient(create_app(store, config)) as client:
        admin = {"Authorization": "Bearer admin-key"}
        r = client.post("/v1/tasks", json={"name": "bad", "path": bad.name}, headers=admin)
        assert r.status_code == 422 and "'prompt_embeddings' holds infinity" in r.json()["detail"]
        assert [t["name"] for t in client.get("/v1/tasks").json()] == ["good"]
        r = client.post("/v1/classify", json={"task": "good", "inputs": ["the film was good ."]})
        assert r.status_code == 200, r.text


def test_serve_refuses_a_nan_artifact_at_start(tiny_model_dir, artifacts, capsys):
    _, bad = artifacts
    argv = ["serve", "--model", str(tiny_model_dir), "--adapter", f"bad={bad}", "--port", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tunelab serve: error: ") and "holds infinity" in err

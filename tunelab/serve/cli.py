"""`tunelab serve`: one backbone, many task artifacts, an HTTP API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tunelab.errors import TunelabError


def parse_adapter(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise TunelabError(f"--adapter {value!r}: expected NAME=DIR, e.g. sst2=runs/sst2")
    return name, Path(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="the backbone (default: the first adapter's base model, else the built-in one)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a task artifact to serve under NAME; repeatable",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--window-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its forward pass (5)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="inputs per forward pass (64)")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request (64)")
    p.add_argument("--max-input-chars", type=int, default=4000, help="characters per input (4000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size (1 MiB)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (default: $TUNELAB_API_KEY; unset: open)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def build(args: argparse.Namespace):
    """(FastAPI app, store) from the parsed arguments; artifacts loaded, errors as TunelabError."""
    from tunelab.artifact import read_meta
    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.store import AdapterStore
    from tunelab.train.loop import resolve_device

    adapters = [parse_adapter(a) for a in args.adapter]
    names = [n for n, _ in adapters]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise TunelabError(f"--adapter {dup}=...: the name is given twice")
    model = args.model
    if model is None and adapters:
        model = read_meta(adapters[0][1])["base_model"]["name"]
    cfg = ServeConfig(
        window_ms=args.window_ms,
        max_batch=args.max_batch,
        max_inputs=args.max_inputs,
        max_input_chars=args.max_input_chars,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("TUNELAB_API_KEY") or None,
    )
    store = AdapterStore(load_backbone(model), resolve_device(args.device))
    from tunelab.serve.forward import head_of

    for name, path in adapters:
        head_of(store.load(name, path))  # each task's cached head before the first request
    return create_app(store, cfg), store


def run(args: argparse.Namespace) -> None:
    """Serve task artifacts over HTTP on one backbone: POST /v1/classify, /v1/generate,
    GET/POST /v1/tasks, DELETE /v1/tasks/NAME, /health, /metrics, /openapi.json."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise TunelabError("serve needs its extra: pip install 'tunelab[serve]'") from None
    app, store = build(args)
    for info in store.describe():
        print(
            f"task {info['name']}: {info['method']} ({info['kind']}, {info['backbone']} backbone)"
        )
    print(f"serving {len(store.tasks)} task(s) on http://{args.host}:{args.port}", flush=True)
    # on SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish (up to 30 s),
    # then the app's shutdown drains the batch queue
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30
    )

"""`tunelab serve`: one backbone, many task artifacts, an HTTP API."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.serve.access import read_key_file, shown_path, split_env


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
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (127.0.0.1; any other without an inference key gets a warning)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--window-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its forward pass (5)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="inputs per forward pass (64)")
    p.add_argument(
        "--static-batching",
        action="store_true",
        help="generation: decode each gathered batch to its end before the next starts "
        "(default: continuous batching, rows join and leave the decoding batch at every step)",
    )
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request (64)")
    p.add_argument("--max-input-chars", type=int, default=4000, help="characters per input (4000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size (1 MiB)")
    p.add_argument(
        "--adapter-root",
        default=None,
        metavar="DIR",
        help="POST /v1/tasks may load folders under DIR, named by a relative path "
        "(default: none, loading over HTTP is off)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="inference keys, one per line, for `Authorization: Bearer KEY` (also "
        "$TUNELAB_API_KEY, comma-separated; none: inference is open)",
    )
    p.add_argument(
        "--admin-key-file",
        default=None,
        metavar="FILE",
        help="admin keys, one per line: only they may load and unload tasks (also "
        "$TUNELAB_ADMIN_KEY; none: task management is off)",
    )
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused: shows in ps
    p.add_argument("--max-tasks", type=int, default=None, help="tasks loaded at most (no limit)")
    p.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="parameter memory at most: the backbone, its copies and every task's tensors "
        "(no limit)",
    )
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="contextual calibration of every classification task (--no-calibrate: of none; "
        "default: where the artifact's task says `calibrate: content-free`); a task's stored "
        "label bias is used, else it is measured at load",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--bf16",
        choices=("auto", "true", "false"),
        default="auto",
        help="bfloat16 autocast, as `tunelab eval --bf16` (auto: where it runs natively: CUDA, "
        "or a CPU with avx512_bf16 or AMX; /health shows the precision)",
    )


def read_keys(args: argparse.Namespace, environ=os.environ) -> tuple[list[str], list[str]]:
    """(inference keys, admin keys) from the key files and the environment."""
    if args.api_key is not None:
        raise TunelabError(
            "--api-key: a key on the command line shows in `ps` and shell history; put it in "
            "a file (--api-key-file FILE) or in $TUNELAB_API_KEY"
        )
    inference = split_env(environ.get("TUNELAB_API_KEY"))
    admin = split_env(environ.get("TUNELAB_ADMIN_KEY"))
    if args.api_key_file:
        inference += read_key_file(args.api_key_file, "--api-key-file")
    if args.admin_key_file:
        admin += read_key_file(args.admin_key_file, "--admin-key-file")
    return list(dict.fromkeys(inference)), list(dict.fromkeys(admin))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def warnings_for(host: str, cfg) -> list[str]:
    """What an operator should hear before the server starts listening."""
    out = []
    if not is_loopback(host) and not cfg.keys.inference:
        out.append(
            f"warning: serving on {host} with no inference key: anyone who can reach this "
            "address can use the model (set --api-key-file or $TUNELAB_API_KEY)"
        )
    if cfg.keys.admin and cfg.adapter_root is None:
        out.append("note: an admin key but no --adapter-root: tasks can be unloaded, not loaded")
    return out


def _limits(args: argparse.Namespace) -> tuple[int | None, int | None]:
    if args.max_tasks is not None and args.max_tasks < 1:
        raise TunelabError(f"--max-tasks must be >= 1, got {args.max_tasks}")
    gb = args.max_memory_gb
    if gb is not None and not (gb > 0 and math.isfinite(gb)):
        raise TunelabError(f"--max-memory-gb must be a positive number, got {gb}")
    return args.max_tasks, None if gb is None else int(gb * 1e9)


def build(args: argparse.Namespace):
    """(FastAPI app, store) from the parsed arguments; artifacts loaded, errors as TunelabError."""
    from tunelab.artifact import read_meta
    from tunelab.device import resolve_bf16, resolve_device
    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.store import AdapterStore

    inference, admin = read_keys(args)
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
        static_batching=args.static_batching,
        max_inputs=args.max_inputs,
        max_input_chars=args.max_input_chars,
        max_body_bytes=args.max_body_bytes,
        api_keys=tuple(inference),
        admin_keys=tuple(admin),
        adapter_root=args.adapter_root,
    )
    max_tasks, max_bytes = _limits(args)
    device = resolve_device(args.device)
    bf16 = resolve_bf16(args.bf16, device)
    store = AdapterStore(
        load_backbone(model), device, max_tasks, max_bytes, args.calibrate, bf16=bf16
    )
    from tunelab.serve.forward import head_of

    for name, path in adapters:
        # each task's cached head before the first request
        head_of(store.load(name, path, shown_path(cfg.adapter_root, path)))
    return create_app(store, cfg), store


def run(args: argparse.Namespace) -> None:
    """Serve task artifacts over HTTP on one backbone: POST /v1/classify, /v1/generate,
    GET/POST /v1/tasks, DELETE /v1/tasks/NAME, /health, /metrics, /openapi.json."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise TunelabError("serve needs its extra: pip install 'tunelab[serve]'") from None
    from tunelab.device import emulated_bf16_warning, precision_name

    app, store = build(args)
    emulated = emulated_bf16_warning(store.device, store.bf16)
    for line in warnings_for(args.host, app.state.config) + ([emulated] if emulated else []):
        print(line, file=sys.stderr)
    for info in store.describe():
        calibrated = ", calibrated" if info["calibrated"] else ""
        print(
            f"task {info['name']}: {info['method']} ({info['kind']}, {info['backbone']} "
            f"backbone{calibrated})"
        )
    print(f"precision: {precision_name(store.bf16)} ({store.device.type})")
    print(f"serving {len(store.tasks)} task(s) on http://{args.host}:{args.port}", flush=True)
    # on SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish (up to 30 s),
    # then the app's shutdown drains the batch queue
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30
    )

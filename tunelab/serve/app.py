"""The HTTP API (FastAPI): classify, generate, task management, health, Prometheus metrics,
and OpenAI-compatible completions (openai_api.py).

Who may do what is decided here (see access.py): inference keys for the model, admin keys for
loading and unloading, loads only from under the adapter root."""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tunelab.device import precision_name
from tunelab.errors import TunelabError
from tunelab.serve.access import Keys, OutsideRoot, hide_root, resolve_under
from tunelab.serve.batcher import Batcher, encode_inputs
from tunelab.serve.forward import head_of, labelled
from tunelab.serve.metrics import Metrics
from tunelab.serve.openai_api import add_openai_routes
from tunelab.serve.openai_schemas import PATHS as OPENAI_PATHS
from tunelab.serve.openai_schemas import error_response
from tunelab.serve.schemas import (
    Classified,
    ClassifyRequest,
    ClassifyResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    TaskInfo,
    TaskLoad,
    Unloaded,
    errors,
)
from tunelab.serve.store import AdapterStore, OverMemory, TooManyTasks

OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer KEY)"


@dataclass
class ServeConfig:
    window_ms: float = 5.0  # how long a request waits for others to share its forward pass
    max_batch: int = 64  # inputs per forward pass
    max_inputs: int = 64  # inputs per request
    max_input_chars: int = 4000  # characters per input (all fields together)
    max_body_bytes: int = 1 << 20
    max_new_tokens: int = 256  # the most /v1/generate may ask for
    # generation decodes gathered batches to their end (the old way) instead of continuously
    static_batching: bool = False
    # keys stay out of repr, so a logged config shows none
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # inference (none: open)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # load/unload (none: off)
    adapter_root: Path | None = None  # POST /v1/tasks loads only from under it (None: off)
    keys: Keys = field(init=False, repr=False)

    def __post_init__(self):
        for name in ("max_batch", "max_inputs", "max_input_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise TunelabError(f"--{name.replace('_', '-')} must be >= 1")
        if self.window_ms < 0:
            raise TunelabError(f"--window-ms must be >= 0, got {self.window_ms}")
        self.keys = Keys(tuple(self.api_keys), tuple(self.admin_keys))
        if self.adapter_root is not None:
            if not Path(self.adapter_root).is_dir():
                raise TunelabError(f"--adapter-root {self.adapter_root}: no such directory")
            self.adapter_root = Path(os.path.realpath(self.adapter_root))


class _BodyLimit:
    """Refuse request bodies over `limit` bytes with 413 before the app reads them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                detail = f"request body over {self.limit} bytes (--max-body-bytes)"
                if scope["path"] in OPENAI_PATHS:
                    answer = error_response(413, detail)
                else:
                    answer = JSONResponse({"detail": detail}, 413)
                return await answer(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def create_app(store: AdapterStore, cfg: ServeConfig) -> FastAPI:
    metrics = Metrics()
    batcher = Batcher(
        store.backbone.tokenizer.pad_token_id,
        cfg.window_ms,
        cfg.max_batch,
        metrics,
        continuous=not cfg.static_batching,
    )

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()  # uvicorn has let in-flight requests finish; drain the queue

    app = FastAPI(
        title="tunelab serve",
        description="Many tasks on one frozen backbone, rows of different tasks in one batch.",
        version="1",
        lifespan=lifespan,
    )
    app.state.store, app.state.batcher, app.state.metrics = store, batcher, metrics
    app.state.config = cfg

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if cfg.keys.inference and request.url.path not in OPEN_PATHS:
            if cfg.keys.role(request.headers.get("authorization")) is None:
                if request.url.path in OPENAI_PATHS:
                    return error_response(401, UNAUTHORIZED, headers=_CHALLENGE)
                return _unauthorized()
        return await call_next(request)

    _add_inference_routes(app, store, batcher, metrics, cfg)
    add_openai_routes(app, store, batcher, metrics, cfg)
    _add_task_routes(app, store, batcher, cfg)
    _add_status_routes(app, store, metrics)
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)
    return app


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _unauthorized() -> JSONResponse:
    return JSONResponse({"detail": UNAUTHORIZED}, 401, headers=_CHALLENGE)


def _require_admin(cfg: ServeConfig, request: Request, action: str) -> None:
    if not cfg.keys.admin:
        raise HTTPException(
            403,
            f"{action} is off: start the server with an admin key (--admin-key-file FILE "
            "or TUNELAB_ADMIN_KEY)",
        )
    role = cfg.keys.role(request.headers.get("authorization"))
    if role is None:
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    if role != "admin":
        raise HTTPException(403, f"{action} needs the admin key; this key may only infer")


def _entry_for(store: AdapterStore, cfg: ServeConfig, name: str, kind: str, inputs: list):
    """The loaded task `name` of this kind and its inputs encoded, or the HTTP error why not."""
    entry = store.get(name)
    if entry is None:
        known = ", ".join(store.tasks) or "none"
        raise HTTPException(404, f"unknown task {name!r} (loaded: {known})")
    if entry.describe()["kind"] != kind:
        other = "/v1/generate" if kind == "classification" else "/v1/classify"
        raise HTTPException(422, f"task {name!r} is not a {kind} task; use {other}")
    if len(inputs) > cfg.max_inputs:
        raise HTTPException(
            413, f"{len(inputs)} inputs; at most {cfg.max_inputs} per request (--max-inputs)"
        )
    for i, item in enumerate(inputs, start=1):
        n = len(item) if isinstance(item, str) else sum(map(len, item.values()))
        if n > cfg.max_input_chars:
            raise HTTPException(
                422,
                f"input {i}: {n} characters; at most {cfg.max_input_chars} (--max-input-chars)",
            )
    try:
        return entry, encode_inputs(entry, inputs)
    except TunelabError as e:
        raise HTTPException(422, str(e)) from None


async def _timed(store: AdapterStore, metrics: Metrics, endpoint: str, req, work):
    """`await work()`, counted in the metrics under the request's task and status."""
    # a name no loaded task has is counted as "unknown": clients cannot add label values
    task = req.task if store.get(req.task) is not None else "unknown"
    start, status = time.perf_counter(), 500
    try:
        out = await work()
        status = 200
        return out
    except HTTPException as e:
        status = e.status_code
        raise
    finally:
        metrics.observe_request(
            endpoint, task, status, time.perf_counter() - start, len(req.inputs)
        )


def _add_inference_routes(app: FastAPI, store, batcher, metrics, cfg: ServeConfig) -> None:
    @app.post("/v1/classify", response_model=ClassifyResponse, responses=errors(401, 404, 413, 422))
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        """The label and every label's probability for each input."""

        async def work():
            entry, examples = _entry_for(store, cfg, req.task, "classification", req.inputs)
            logp = await batcher.classify(entry, examples)
            results = [
                Classified(label=best, probabilities=dist) for best, dist in labelled(entry, logp)
            ]
            return ClassifyResponse(task=req.task, results=results)

        return await _timed(store, metrics, "classify", req, work)

    @app.post("/v1/generate", response_model=GenerateResponse, responses=errors(401, 404, 413, 422))
    async def generate(req: GenerateRequest) -> GenerateResponse:
        """Greedy continuations (cut at the task's stop strings) for each input."""

        async def work():
            entry, examples = _entry_for(store, cfg, req.task, "generation", req.inputs)
            limit = req.max_tokens or entry.task.generation.max_new_tokens
            if limit > cfg.max_new_tokens:
                raise HTTPException(422, f"max_tokens {limit}; at most {cfg.max_new_tokens}")
            outputs = await batcher.generate(entry, examples, limit)
            return GenerateResponse(task=req.task, outputs=outputs)

        return await _timed(store, metrics, "generate", req, work)


def _add_task_routes(app: FastAPI, store, batcher, cfg: ServeConfig) -> None:
    root = cfg.adapter_root

    @app.get("/v1/tasks", response_model=list[TaskInfo], responses=errors(401))
    async def list_tasks() -> list[dict]:
        """The loaded tasks; `backbone` says whether a task shares the one backbone."""
        return store.describe()

    @app.post(
        "/v1/tasks",
        response_model=TaskInfo,
        status_code=201,
        responses=errors(401, 403, 409, 413, 422, 507),
    )
    async def load_task(req: TaskLoad, request: Request) -> dict:
        """Load an artifact folder under the adapter root while serving (admin key only); a
        bad artifact is refused (422) and nothing else changes."""
        _require_admin(cfg, request, "loading tasks")
        if root is None:
            raise HTTPException(403, "loading tasks is off: start the server with --adapter-root")
        try:
            path = resolve_under(root, req.path)
        except OutsideRoot as e:
            raise HTTPException(403, str(e)) from None
        if store.get(req.name) is not None:
            raise HTTPException(409, f"task {req.name!r} is already loaded")
        source = path.relative_to(root).as_posix()
        try:
            entry = await batcher.run(store.load, req.name, path, source, req.calibrate)
        except TooManyTasks as e:
            raise HTTPException(409, str(e)) from None
        except OverMemory as e:
            raise HTTPException(507, str(e)) from None
        except (TunelabError, OSError) as e:
            raise HTTPException(422, hide_root(str(e), root)) from None
        await batcher.run(head_of, entry)  # its cached head now, not in its first request
        return entry.describe()

    @app.delete("/v1/tasks/{name}", response_model=Unloaded, responses=errors(401, 403, 404))
    async def unload_task(name: str, request: Request) -> dict:
        """Unload a task (admin key only; requests already queued for it still finish)."""
        _require_admin(cfg, request, "unloading tasks")
        entry = store.get(name)
        if entry is None:
            raise HTTPException(404, f"unknown task {name!r}")
        await batcher.settle(entry)  # its generations decode step by step: let them end
        if store.get(name) is not entry:  # unloaded meanwhile
            raise HTTPException(404, f"unknown task {name!r}")
        await batcher.run(store.unload, name)
        return {"unloaded": name}


def _add_status_routes(app: FastAPI, store, metrics) -> None:
    @app.get("/health", response_model=Health)
    async def health() -> Health:
        precision = precision_name(store.bf16)
        return Health(
            status="ok", model=store.backbone.name, tasks=len(store.tasks), precision=precision
        )

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors(401))
    async def prometheus() -> PlainTextResponse:
        """Prometheus text: requests, inputs, latency histograms per task, batch sizes."""
        return PlainTextResponse(
            metrics.render(len(store.tasks)), media_type="text/plain; version=0.0.4"
        )

"""OpenAI-compatible endpoints: `GET /v1/models`, `POST /v1/completions`, `POST
/v1/chat/completions`, with `model` naming a loaded task, so that OpenAI clients work unchanged.

- A generation task's completion is its greedy continuation of the prompt with the task's
  template applied (the road of `/v1/generate`), cut at the task's stop strings and `stop`.
- A classification task's completion is the predicted label (the label of `/v1/classify`);
  every label's probability rides in `choices[i].label_probs`, and with `logprobs` set, in
  OpenAI's legacy shape: `logprobs.top_logprobs[0]` holds every label's log-probability.
  Chat completions answer the label as the assistant's message (`logprobs: true` gives the
  labels in `choice.logprobs.content[0].top_logprobs`).
- `stream: true` sends server-sent events as the tokens decode, then `data: [DONE]`.
- Decoding is greedy: sampling parameters (temperature, top_p, seed, ...) are accepted and
  ignored; `n` must be 1. `usage` counts the prompt's tokens (template applied, virtual tokens
  of a soft prompt not counted) and the tokens generated (none for a classification task).
- Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from tunelab.errors import TunelabError
from tunelab.evaluate.loaded import distribution
from tunelab.serve.batcher import encode_inputs
from tunelab.serve.forward import final_logprobs
from tunelab.serve.openai_schemas import (
    PATHS,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    ModelList,
    OpenAIError,
    documented,
    error_response,
)


def add_openai_routes(app: FastAPI, store, batcher, metrics, cfg) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        if request.url.path not in PATHS:
            return await request_validation_exception_handler(request, e)
        first = e.errors()[0]
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(where) or 'body'}: {first['msg']}"
        return error_response(400, message, where[0] if where else None)

    @app.get("/v1/models", response_model=None, responses=documented(ModelList, 401))
    async def models() -> dict:
        """The loaded tasks as OpenAI model objects (with their kind and method)."""
        data = [
            {
                "id": t["name"],
                "object": "model",
                "created": _created(store.get(t["name"]).path),
                "owned_by": "tunelab",
                "kind": t["kind"],
                "method": t["method"],
                "labels": t["labels"],
                "input_fields": t["input_fields"],
            }
            for t in store.describe()
        ]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=documented(Completion, 400, 401, 404, 413, stream=True),
    )
    async def completions(req: CompletionRequest):
        """A completion per prompt (a list of prompts gives a choice each); see the module's
        docstring for what a completion of each kind of task is."""
        prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
        return await answer(req, prompts, chat=False)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=documented(ChatCompletion, 400, 401, 404, 413, stream=True),
    )
    async def chat_completions(req: ChatRequest):
        """The task's answer to the last user message (the earlier messages are not read)."""
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise OpenAIError(400, "messages: no user message to answer", "messages")
        content = users[-1].content
        if isinstance(content, list):  # content parts: the text ones, joined
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        if not content:
            raise OpenAIError(400, "messages: the last user message has no text", "messages")
        return await answer(req, [content], chat=True)

    async def answer(req, prompts: list, chat: bool):
        start = time.perf_counter()
        task = req.model if store.get(req.model) is not None else "unknown"

        def observe(status: int) -> None:
            seconds = time.perf_counter() - start
            endpoint = "chat" if chat else "completions"
            metrics.observe_request(endpoint, task, status, seconds, len(prompts))

        try:
            entry, examples, limit = check(req, prompts)
        except OpenAIError as e:
            observe(e.status)
            raise
        reply = Reply(req, chat, sum(len(ex.ids) for ex in examples), entry.backbone.tokenizer)
        try:
            if entry.task.is_generation:
                return await generated(req, reply, entry, examples, limit, observe)
            logp = final_logprobs(entry, await batcher.classify(entry, examples))
        except Exception as e:  # a batch failed (its requests fail, the server goes on)
            observe(500)
            raise OpenAIError(500, f"the model failed on this batch: {e}") from None
        labels = entry.prep.verbalizer.labels
        rows = [dict(zip(labels, row)) for row in logp.tolist()]
        if req.stream:
            return _sse(reply.labelled_chunks(rows), observe)
        observe(200)
        return reply.labelled(rows)

    async def generated(req, reply, entry, examples, limit: int, observe):
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if req.stream:
            streams = [functools.partial(batcher.stream, entry, ex, limit, stop) for ex in examples]
            return _sse(reply.generated_chunks(streams), observe)
        out = await batcher.complete(entry, examples, limit, stop)
        observe(200)
        return reply.generated(out)

    def check(req, prompts: list):
        """The task, its encoded prompts and token limit, or the OpenAIError why not."""
        entry = store.get(req.model)
        if entry is None:
            known = ", ".join(store.tasks) or "none"
            raise OpenAIError(
                404, f"The model {req.model!r} does not exist (loaded: {known})", "model"
            )
        if req.n != 1:
            raise OpenAIError(400, "n: only 1 is served (decoding is greedy)", "n")
        param = "messages" if isinstance(req, ChatRequest) else "prompt"
        if not prompts:
            raise OpenAIError(400, "prompt: give at least one", param)
        if len(prompts) > cfg.max_inputs:
            raise OpenAIError(
                400, f"{len(prompts)} prompts; at most {cfg.max_inputs} (--max-inputs)", param
            )
        for i, p in enumerate(prompts, start=1):
            n = len(p) if isinstance(p, str) else sum(map(len, p.values()))
            if n > cfg.max_input_chars:
                raise OpenAIError(
                    400,
                    f"prompt {i}: {n} characters; at most {cfg.max_input_chars} "
                    "(--max-input-chars)",
                    param,
                )
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stop) > 4 or any(len(x) > cfg.max_input_chars for x in stop):
            raise OpenAIError(
                400, f"stop: at most 4 strings of {cfg.max_input_chars} characters", "stop"
            )
        limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if entry.task.is_generation:
            limit = limit or entry.task.generation.max_new_tokens
            if limit > cfg.max_new_tokens:
                raise OpenAIError(
                    400, f"max_tokens {limit}; at most {cfg.max_new_tokens}", "max_tokens"
                )
        try:
            return entry, encode_inputs(entry, prompts), limit
        except TunelabError as e:
            raise OpenAIError(400, str(e), param) from None


def _created(folder) -> int:
    """When the artifact was written (its tunelab.json's time), 0 if it is gone since."""
    try:
        return int((folder / "tunelab.json").stat().st_mtime)
    except OSError:
        return 0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -1e4  # JSON has no -Infinity


class Reply:
    """The response bodies and stream chunks of one request, in OpenAI's shapes."""

    def __init__(self, req, chat: bool, prompt_tokens: int, tokenizer):
        self.chat, self.model = chat, req.model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.tokenizer = tokenizer
        self.logprobs = req.logprobs  # completions: an int or None; chat: a bool
        self.usage_chunk = bool(req.stream_options and req.stream_options.include_usage)

    def _head(self, chunk: bool) -> dict:
        kind = "text_completion"
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _choice(self, i: int, text: str, reason: str | None, chunk: bool, **extra) -> dict:
        if not self.chat:
            body = {"index": i, "text": text}
        elif chunk:
            body = {"index": i, "delta": {"content": text} if text else {}}
        else:
            body = {"index": i, "message": {"role": "assistant", "content": text}}
        return {**body, "logprobs": extra.pop("logprobs", None), "finish_reason": reason, **extra}

    # generation: the batcher's Generated texts, or its streams' pieces

    def generated(self, out: list) -> dict:
        choices = [self._choice(i, g.text, _reason(g), chunk=False) for i, g in enumerate(out)]
        return {**self._head(False), "choices": choices, "usage": self._usage(self._spent(out))}

    async def generated_chunks(self, streams: list):
        """`streams[i](ended=list)` starts row i's stream (Batcher.stream)."""
        if self.chat:
            yield self._role_chunk()
        ends: list[list] = [[] for _ in streams]
        rows = [start(ended=end) for start, end in zip(streams, ends)]
        async for i, piece in _merged(rows):
            if piece is None:  # row i has ended
                yield self._chunk([self._choice(i, "", _reason(ends[i][0]), chunk=True)])
            else:
                yield self._chunk([self._choice(i, piece, None, chunk=True)])
        if self.usage_chunk:
            spent = self._spent([end[0] for end in ends])
            yield {**self._chunk([]), "usage": self._usage(spent)}

    def _spent(self, out: list) -> int:
        """Tokens generated; the static path (--static-batching) knows only the texts: their
        tokens then."""
        return sum(
            g.tokens
            if g.tokens is not None
            else len(self.tokenizer(g.text, add_special_tokens=False)["input_ids"])
            for g in out
        )

    # classification: the label, every label's probability beside it

    def _labelled_choice(self, i: int, row: dict[str, float], chunk: bool) -> dict:
        best, probs = distribution(list(row), [math.exp(v) for v in row.values()])
        extra = {"label_probs": probs}
        if self.chat and self.logprobs:
            top = [_token(label, v) for label, v in sorted(row.items(), key=lambda kv: -kv[1])]
            extra["logprobs"] = {"content": [{**_token(best, row[best]), "top_logprobs": top}]}
        elif not self.chat and self.logprobs is not None:
            extra["logprobs"] = {
                "tokens": [best],
                "token_logprobs": [_finite(row[best])],
                "top_logprobs": [{label: _finite(v) for label, v in row.items()}],
                "text_offset": [0],
            }
        return self._choice(i, best, None if chunk and self.chat else "stop", chunk, **extra)

    def labelled(self, rows: list[dict[str, float]]) -> dict:
        choices = [self._labelled_choice(i, row, chunk=False) for i, row in enumerate(rows)]
        return {**self._head(False), "choices": choices, "usage": self._usage(0)}

    async def labelled_chunks(self, rows: list[dict[str, float]]):
        if self.chat:
            yield self._role_chunk()
        for i, row in enumerate(rows):
            yield self._chunk([self._labelled_choice(i, row, chunk=True)])
            if self.chat:
                yield self._chunk([self._choice(i, "", "stop", chunk=True)])
        if self.usage_chunk:
            yield {**self._chunk([]), "usage": self._usage(0)}

    def _chunk(self, choices: list) -> dict:
        return {**self._head(True), "choices": choices}

    def _role_chunk(self) -> dict:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        return self._chunk([{**first, "logprobs": None, "finish_reason": None}])


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def _reason(generated) -> str:
    return "length" if generated.finish_reason == "length" else "stop"


async def _merged(streams):
    """(row, piece) as any row's pieces arrive; (row, None) once that row has ended."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for piece in stream:
                await queue.put((i, piece, None))
            await queue.put((i, None, None))
        except Exception as e:  # the batch failed: the response says so
            await queue.put((i, None, e))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, piece, error = await queue.get()
            if error is not None:
                raise error
            left -= piece is None
            yield i, piece
    finally:
        for p in pumps:
            p.cancel()


def _sse(chunks, observe) -> StreamingResponse:
    """Server-sent events: `data: {chunk}` per chunk, then `data: [DONE]`. A client that goes
    away closes the streams, whose rows then leave the decoding batch."""

    async def events():
        status = 499  # the client closed the connection first
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            status = 200
        except Exception as e:  # after the 200 went out: an error event, as OpenAI sends
            status = 500
            body = {"message": f"generation failed: {e}", "type": "server_error"}
            yield f"data: {json.dumps({'error': {**body, 'param': None, 'code': None}})}\n\n"
        finally:
            observe(status)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

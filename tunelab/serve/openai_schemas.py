"""The request, response and error shapes of tunelab's OpenAI-compatible endpoints
(tunelab/serve/openai_api.py), as OpenAI's API defines them, with tunelab's extra fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large"}

Prompt = str | dict[str, str]


class OpenAIError(Exception):
    """A request refused with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _CODES.get(status)


def error_response(status: int, message: str, param=None, code=None, headers=None):
    """`{"error": {"message", "type", "param", "code"}}` with `status`."""
    body = {
        "message": message,
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": code or _CODES.get(status),
    }
    return JSONResponse({"error": body}, status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model: str = Field(description="a loaded task's name (see GET /v1/models)")
    stop: str | list[str] | None = Field(
        default=None, description="stop strings on top of the task's own"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1


class CompletionRequest(_Common):
    prompt: Prompt | list[Prompt] = Field(
        description="the input text, or a JSON object of the task's input fields (as text or "
        "an object), or a list of them"
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="new tokens at most (default: the task's max_new_tokens)"
    )
    logprobs: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="classification: every label's log-probability"
    )


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False


# response bodies, for /openapi.json (the routes build them as dicts)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: str  # classification | generation
    method: str
    labels: list[str]
    input_fields: list[str]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    label_probs: dict[str, float] | None = Field(
        default=None, description="classification: every label's probability"
    )


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str
    label_probs: dict[str, float] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


_WHY = {
    400: "an invalid request or input",
    401: "missing or unknown bearer key (Authorization: Bearer KEY)",
    404: "no loaded task of that name (code: model_not_found)",
    413: "request body over --max-body-bytes",
}


def documented(ok: type[BaseModel] | None, *codes: int, stream: bool = False) -> dict:
    """FastAPI `responses=`: the 200 body (JSON, or server-sent events when streamed) and
    these error statuses, each with OpenAI's error body."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": "the answer"}
        if stream:
            sse = {"schema": {"type": "string"}, "example": "data: {...}\n\ndata: [DONE]\n\n"}
            out[200]["content"] = {"text/event-stream": sse}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": _WHY[code]}
        if code == 401:
            out[code]["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "required": True}
            }
    return out

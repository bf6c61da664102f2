"""The HTTP API's request and response bodies, and the error statuses each endpoint documents
in /openapi.json (so a client, or schemathesis, knows every status it may get)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

Input = str | dict[str, str]


class ClassifyRequest(BaseModel):
    task: str = Field(description="a loaded task's name (see GET /v1/tasks)")
    inputs: list[Input] = Field(
        min_length=1, description="texts, or objects of input field -> text"
    )


class Classified(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    task: str
    results: list[Classified]


class GenerateRequest(BaseModel):
    task: str
    inputs: list[Input] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="new tokens at most (default: the task's max_new_tokens)"
    )


class GenerateResponse(BaseModel):
    task: str
    outputs: list[str]


class TaskLoad(BaseModel):
    name: str = Field(description="the name requests will use")
    path: str = Field(description="an artifact folder, relative to the server's --adapter-root")
    calibrate: bool | None = Field(
        default=None,
        description="divide out the label bias measured on content-free inputs (default: the "
        "server's --calibrate, else the artifact's task's `calibrate:`)",
    )


class TaskInfo(BaseModel):
    name: str
    method: str
    kind: str  # classification | generation
    labels: list[str]
    input_fields: list[str]
    backbone: str  # shared (the one backbone) | own (a copy: LoRA, full fine-tuning, ...)
    path: str  # relative to --adapter-root, or "startup" for an --adapter outside it
    param_bytes: int  # parameter memory the task added (its tensors, its backbone copy)
    cached_prefix_slots: int | None  # key/value slots computed once per task (None: not yet)
    calibrated: bool = False  # its label probabilities are calibrated (content-free)


class Unloaded(BaseModel):
    unloaded: str


class Health(BaseModel):
    status: str
    model: str
    tasks: int
    precision: str  # what the model runs in: float32, or bfloat16 (`serve --bf16`)


class Problem(BaseModel):
    detail: str


class Invalid(BaseModel):
    detail: str | list[dict[str, Any]] = Field(
        description="a message, or FastAPI's list of what in the request body is invalid"
    )


_WHY = {
    401: "missing or unknown bearer key (Authorization: Bearer KEY)",
    403: "this key may not do this, task management is off, or the path is outside --adapter-root",
    404: "no loaded task of that name",
    409: "a task of that name is loaded already, or --max-tasks are loaded",
    413: "request body over --max-body-bytes, or more inputs than --max-inputs",
    422: "an invalid request, input or artifact",
    507: "the load would pass --max-memory-gb",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` documenting these error statuses, always as JSON (spelled out:
    a `model` would take the route's own media type, text/plain for /metrics)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        schema = (Invalid if code == 422 else Problem).model_json_schema()
        out[code] = {
            "description": _WHY[code],
            "content": {"application/json": {"schema": schema}},
        }
        if code == 401:
            out[code]["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "required": True}
            }
    return out

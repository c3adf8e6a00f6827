"""The OpenAPI 3.1 document of every endpoint, generated from the marshmallow schemas by apispec."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask

from .openai_schemas import ChatCompletionSchema, ModelListSchema, ModelSchema, OpenAIErrorEnvelopeSchema
from .schemas import ErrorEnvelopeSchema, GenerateResponseSchema, HealthSchema, ReadySchema, UsageSchema

NATIVE_ERRORS = {
    400: "The request is invalid (`details` names each field), or the upstream rejected it.",
    401: "No or wrong API key.",
    413: "The body is too large.",
    429: "Over a limit of this client, or the upstream is rate limiting; see Retry-After.",
    500: "The service failed unexpectedly.",
    502: "The upstream failed, or refused the service's own key.",
    503: "The local model is busy, the upstream quota is spent, its circuit is open, or limits cannot be checked.",
    504: "The upstream did not answer in time.",
}
OPENAI_ERRORS = {**NATIVE_ERRORS, 404: "The model is not served here (code model_not_found)."}
REQUEST_ID = {"X-Request-ID": {"description": "the caller's request id, or a fresh UUID", "schema": {"type": "string"}}}
_TEXT = {"schema": {"type": "string"}}
_INTEGER = {"schema": {"type": "integer"}}
CACHE = {
    "X-Cache": {"description": "HIT (from the response cache), MISS (stored) or BYPASS", **_TEXT},
    "Age": {"description": "on a HIT: the cached answer's age in seconds", **_INTEGER},
}
NATIVE_RATE = {
    "X-RateLimit-Limit": {"description": "the client's requests per window", **_INTEGER},
    "X-RateLimit-Remaining": {"description": "requests left in the window", **_INTEGER},
    "X-RateLimit-Reset": {"description": "when the window frees (Unix time, s)", **_INTEGER},
}
OPENAI_RATE = {
    f"x-ratelimit-{part}-{kind}": {
        "description": f"OpenAI's {part} header for {kind} (reset: a duration like 6m0s)",
        **_TEXT,
    }
    for kind in ("requests", "tokens")
    for part in ("limit", "remaining", "reset")
}
FALLBACK = {
    "X-Fallback-From": {"description": "with MODELS_FILE: the model asked for, when a fallback answered", **_TEXT}
}
SSE = {"schema": {"type": "string"}}


def _json(
    schema: str, description: str, *, stream: bool = False, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if stream:
        content["text/event-stream"] = SSE
    return {"description": description, "content": content, "headers": {**REQUEST_ID, **(headers or {})}}


def _errors(codes: dict[int, str], envelope: str, *only: int) -> dict[int, Any]:
    return {status: _json(envelope, text) for status, text in codes.items() if not only or status in only}


def _operation(
    summary: str,
    responses: dict[int, Any],
    *,
    body: str | None = None,
    secured: bool = False,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Return one operation; one with a body, or `secured`, takes an API key (Bearer or X-API-Key)."""
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if body is not None or secured:
        operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return operation


def build_document(app: Flask) -> dict[str, Any]:
    """Return the OpenAPI document of `app`'s endpoints, its request schemas bound to its limits."""
    schemas = app.extensions["llm_service.schemas"]
    spec = APISpec(
        title="llm-service",
        version="1.0.0",
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={"description": "An LLM behind a small, hardened HTTP API: a native API and an OpenAI-compatible one."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("apiKey", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    for name, schema in (
        ("GenerateRequest", schemas.generate),
        ("GenerateResponse", GenerateResponseSchema),
        ("Error", ErrorEnvelopeSchema),
        ("Usage", UsageSchema),
        ("Health", HealthSchema),
        ("Ready", ReadySchema),
        ("ChatCompletionRequest", schemas.chat),
        ("ChatCompletion", ChatCompletionSchema),
        ("Model", ModelSchema),
        ("ModelList", ModelListSchema),
        ("OpenAIError", OpenAIErrorEnvelopeSchema),
    ):
        spec.components.schema(name, schema=schema)
    paths: dict[str, tuple[str, dict[str, Any]]] = {
        "/generate": (
            "post",
            _operation(
                "Generate text for one prompt; with stream true, Server-Sent Events.",
                {
                    200: _json(
                        "GenerateResponse", "The answer, or its events", stream=True, headers={**CACHE, **NATIVE_RATE}
                    ),
                    **_errors(NATIVE_ERRORS, "Error"),
                },
                body="GenerateRequest",
            ),
        ),
        "/usage": (
            "get",
            _operation(
                "The calling client's own counters.",
                {200: _json("Usage", "Counters"), **_errors(NATIVE_ERRORS, "Error", 401, 500, 503)},
                secured=True,
            ),
        ),
        "/v1/chat/completions": (
            "post",
            _operation(
                "OpenAI-compatible chat completion; with stream true, chat.completion.chunk events.",
                {
                    200: _json(
                        "ChatCompletion",
                        "The completion, or its chunks",
                        stream=True,
                        headers={**CACHE, **OPENAI_RATE, **FALLBACK},
                    ),
                    **_errors(OPENAI_ERRORS, "OpenAIError"),
                },
                body="ChatCompletionRequest",
            ),
        ),
        "/v1/models": (
            "get",
            _operation(
                "The models clients may ask for.",
                {200: _json("ModelList", "Models"), **_errors(OPENAI_ERRORS, "OpenAIError", 401, 500)},
                secured=True,
            ),
        ),
        "/v1/models/{model}": (
            "get",
            _operation(
                "One model clients may ask for.",
                {200: _json("Model", "The model"), **_errors(OPENAI_ERRORS, "OpenAIError", 401, 404, 500)},
                secured=True,
                parameters=[{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            ),
        ),
        "/health": ("get", _operation("Liveness.", {200: _json("Health", "Alive")})),
        "/ready": (
            "get",
            _operation(
                "Readiness: 503 while the backend, Redis or a shutdown says no.",
                {200: _json("Ready", "Ready"), 503: _json("Error", "Not ready")},
            ),
        ),
        "/metrics": (
            "get",
            _operation(
                "Prometheus metrics of every worker; a Bearer METRICS_TOKEN when one is set.",
                {
                    200: {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    401: _json("Error", "A metrics token is required"),
                },
            ),
        ),
        "/openapi.json": (
            "get",
            _operation(
                "This document.",
                {200: {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}},
            ),
        ),
    }
    for path, (method, operation) in paths.items():
        spec.path(path=path, operations={method: operation})
    return spec.to_dict()

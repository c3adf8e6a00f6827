"""The OpenAI-compatible API: /v1/chat/completions and /v1/models, translated to the one generation call."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from flask import Blueprint, Response, jsonify

from ..errors import ModelNotFound, ServiceError
from ..generation import Generation
from ..providers.base import GenerationParams, Message
from .context import cache_directives, current_client, generate_plain, load_body, schemas, services
from .errors import openai_envelope
from .headers import cache_headers
from .openai_schemas import DEFAULT_MAX_TOKENS
from .record import current_record
from .sse import sse, stream_response

bp = Blueprint("openai", __name__, url_prefix="/v1")
# /v1/models says when each model was "created"; this service lists them from the moment it started.
STARTED_AT = int(time.time())
# A fixed text: the caller's model name is never echoed back (it could be anything, of any length).
MODEL_NOT_SERVED = "not served here; GET /v1/models lists the models that are."


def messages_hash(messages: tuple[Message, ...]) -> str:
    """Return the first 16 hex digits of the SHA-256 of the messages (roles and texts), never the text."""
    canonical = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def model_object(model: str) -> dict[str, Any]:
    """Return OpenAI's model object for one served model."""
    svc = services()
    owner = svc.catalog.routes.routes[model].upstream if svc.catalog.routes else svc.provider.name
    return {"id": model, "object": "model", "created": STARTED_AT, "owned_by": owner}


@bp.get("/models")
def models() -> Response:
    """List the models clients may ask for, in OpenAI's list shape."""
    current_client()
    return jsonify(object="list", data=[model_object(model) for model in services().catalog.allowed_models])


@bp.get("/models/<path:model>")
def retrieve_model(model: str) -> Response:
    """Describe one model clients may ask for; 404 model_not_found for any other."""
    current_client()
    require_served(model)
    return jsonify(model_object(model))


def require_served(model: str) -> None:
    """Raise 404 model_not_found unless `model` is one clients may ask for."""
    if model not in services().catalog.allowed_models:
        raise ModelNotFound(details={"model": [MODEL_NOT_SERVED]})


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """Answer one chat completion, plain or streamed, in OpenAI's shapes."""
    svc = services()
    record = current_record()
    client = current_client()
    body = load_body(schemas().chat)
    require_served(body["model"])
    messages = tuple(Message(m["role"], m["content"]) for m in body["messages"])
    params = GenerationParams(
        messages=messages,
        model=body["model"],
        temperature=body["temperature"],
        max_tokens=body["max_completion_tokens"] or body["max_tokens"] or DEFAULT_MAX_TOKENS,
        top_p=body["top_p"],
        stop=body["stop"] or (),
        seed=body["seed"],
        response_format=body["response_format"],
    )
    record.metrics_model = params.model
    record.fields.update(
        model=params.model,
        provider=svc.provider.name,
        prompt_hash=messages_hash(messages),
        prompt_length=params.input_chars,
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    directives = cache_directives()
    if body["stream"]:
        include_usage = bool((body["stream_options"] or {}).get("include_usage"))
        wire = ChunkWire(completion_id, created, params.model, include_usage)
        stream = svc.generation.stream(client, params, record.started_monotonic, record.admitted, directives)
        response = stream_response(record, stream, wire)
        response.headers.update(cache_headers(stream.cache))
        if stream.fallback_from and stream.model:  # known from the first item, before any chunk is written
            wire.model = stream.model
            response.headers["X-Fallback-From"] = stream.fallback_from
        record.token_window = svc.quotas.token_window(client)  # after the reservation, for x-ratelimit-*-tokens
        return response
    result = generate_plain(client, params, directives)
    record.fields.update(result.log_fields())
    record.token_window = svc.quotas.token_window(client)
    completion = result.completion
    response = jsonify(
        id=completion_id,
        object="chat.completion",
        created=created,
        model=completion.model,
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        usage=usage(result),
    )
    response.headers.update(cache_headers(result.cache))
    if completion.fallback_from:
        response.headers["X-Fallback-From"] = completion.fallback_from
    return response


def usage(generation: Generation) -> dict[str, Any] | None:
    """Return OpenAI's usage object, or None when the backend reported no usage."""
    tokens = generation.completion.usage
    if tokens is None:
        return None
    return {
        "prompt_tokens": tokens.input,
        "completion_tokens": tokens.output,
        "total_tokens": tokens.total,
        "prompt_tokens_details": {"cached_tokens": tokens.cached_input},
    }


class ChunkWire:
    """OpenAI's stream: chat.completion.chunk events, a usage chunk when asked, then [DONE]."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.completion_id, self.created, self.model = completion_id, created, model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI does: every chunk but the last has a null usage
        chunk.update(extra)
        return sse(chunk)

    def opening(self) -> Iterable[str]:
        yield self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta(self, text: str) -> str:
        return self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def done(self, generation: Generation) -> Iterable[str]:
        finish_reason = generation.completion.finish_reason or "stop"
        yield self._chunk([{"index": 0, "delta": {}, "finish_reason": finish_reason}])
        if self.include_usage:
            yield self._chunk([], usage=usage(generation))
        yield sse("[DONE]")

    def error(self, error: ServiceError) -> str:
        return sse(openai_envelope(error.status, error.code, error.message, error.details))

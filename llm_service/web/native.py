"""The native API: POST /generate and GET /usage, translated to and from the one generation call."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from flask import Blueprint, Response, jsonify

from ..errors import ServiceError
from ..generation import Generation
from ..providers.base import GenerationParams
from .context import cache_directives, current_client, generate_plain, load_body, schemas, services
from .errors import envelope
from .headers import cache_headers
from .record import current_record
from .sse import sse, stream_response

bp = Blueprint("native", __name__)


def prompt_hash(text: str) -> str:
    """Return the first 16 hex digits of the text's SHA-256: joinable in logs, not reversible to text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@bp.get("/usage")
def usage() -> Response:
    """Tell a client its own counters: requests and tokens in the current windows, spend today."""
    return jsonify(services().quotas.usage(current_client()))


@bp.post("/generate")
def generate() -> Response:
    """Generate text for one prompt."""
    svc = services()
    record = current_record()
    client = current_client()
    body = load_body(schemas().generate)
    params = GenerationParams.from_prompt(
        body["prompt"],
        model=body.get("model") or svc.catalog.default_model,
        system=body.get("system"),
        temperature=body["temperature"],
        max_tokens=body["max_tokens"],
    )
    record.metrics_model = params.model  # the requested model: one of ALLOWED_MODELS, so labels stay bounded
    record.fields.update(
        model=params.model,
        provider=svc.provider.name,
        prompt_hash=prompt_hash(body["prompt"]),
        prompt_length=params.input_chars,
    )
    directives = cache_directives()
    if body["stream"]:
        stream = svc.generation.stream(client, params, record.started_monotonic, record.admitted, directives)
        response = stream_response(record, stream, NativeWire())
        response.headers.update(cache_headers(stream.cache))
        return response
    result = generate_plain(client, params, directives)
    record.fields.update(result.log_fields())
    response = jsonify(request_id=record.request_id, output=result.completion.text, metadata=result.metadata())
    response.headers.update(cache_headers(result.cache))
    return response


class NativeWire:
    """/generate's events: `delta`, then `done` with the whole answer, or `error` with the envelope."""

    def __init__(self) -> None:
        self.request_id = current_record().request_id

    def opening(self) -> Iterable[str]:
        return ()

    def delta(self, text: str) -> str:
        return sse({"delta": text}, event="delta")

    def done(self, generation: Generation) -> Iterable[str]:
        answer = {
            "request_id": self.request_id,
            "output": generation.completion.text,
            "metadata": generation.metadata(),
        }
        yield sse(answer, event="done")

    def error(self, error: ServiceError) -> str:
        return sse(envelope(error.code, error.message, error.details, self.request_id), event="error")

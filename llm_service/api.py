"""HTTP views: load with a schema, call the service, dump; plus the per-request id and summary log."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context
from marshmallow import ValidationError

from .clients import Client
from .errors import InvalidRequest, ServiceError, Unauthorized, envelope
from .logs import request_id_var
from .providers.base import TextDelta
from .schemas import GenerateRequestSchema
from .service import Generation, GenerationService, prompt_hash

bp = Blueprint("api", __name__)
log = logging.getLogger("llm_service.request")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Paths polled by load balancers and scrapers: their summary lines go to DEBUG, not INFO.
QUIET_PATHS = frozenset({"/health"})


def service() -> GenerationService:
    """Return this app's GenerationService."""
    return current_app.extensions["llm_service"]  # type: ignore[no-any-return]


@bp.before_app_request
def start_request() -> None:
    """Take the caller's request id when it is safe, else make one; start the clock."""
    g.started_monotonic = time.monotonic()
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())
    g.request_id_token = request_id_var.set(g.request_id)
    g.log_fields = {}


@bp.after_app_request
def finish_request(response: Response) -> Response:
    """Tag the response with its request id and write the one summary line for it."""
    request_id = g.get("request_id")
    if request_id is None:  # a request that failed before start_request ran
        return response
    response.headers[REQUEST_ID_HEADER] = request_id
    for name, value in g.get("rate_headers", {}).items():
        response.headers.setdefault(name, value)
    if not g.get("log_deferred"):
        write_summary(response.status_code)
    return response


@bp.teardown_app_request
def forget_request_id(_: BaseException | None) -> None:
    """Clear the request id from the logging context of this thread."""
    token = g.pop("request_id_token", None)
    if token is not None:
        request_id_var.reset(token)


def write_summary(status: int | str, **extra: Any) -> None:
    """Log the request's summary line: ids, timings, counts, cost; never the prompt or the answer."""
    fields: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "latency_ms": round((time.monotonic() - g.started_monotonic) * 1000, 1),
        **g.log_fields,
        **extra,
    }
    error = g.get("service_error")
    if isinstance(error, ServiceError):
        fields["error_code"] = error.code
        if error.attempts is not None:
            fields["attempts"] = error.attempts
        if error.upstream_request_id is not None:
            fields["upstream_request_id"] = error.upstream_request_id
    elif g.get("error_code"):
        fields["error_code"] = g.error_code
    level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
    log.log(level, "request", extra=fields)


def load_body(schema: GenerateRequestSchema) -> dict[str, Any]:
    """Parse and validate the JSON body, or raise InvalidRequest with per-field details."""
    if not request.is_json:
        raise InvalidRequest("Content-Type must be application/json.")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    try:
        return schema.load(body)  # type: ignore[no-any-return]
    except ValidationError as error:
        details: dict[str, Any] = error.normalized_messages()  # type: ignore[no-untyped-call]
        raise InvalidRequest("The request has invalid fields.", details=details) from None


@bp.get("/health")
def health() -> Response:
    """Answer a liveness probe without touching the backend."""
    gen = service()
    return jsonify(status="ok", provider=gen.provider.name, default_model=gen.settings.default_model)


def current_client(gen: GenerationService) -> Client:
    """Return who is calling: the named owner of a valid key, or anonymous by IP when auth is off."""
    if not gen.auth.enabled:
        client = Client(None, request.remote_addr)
    else:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else request.headers.get("X-API-Key")
        name = gen.auth.identify(presented)
        if name is None:
            raise Unauthorized()
        client = Client(name, request.remote_addr)
    g.log_fields["client"] = client.label
    return client


@bp.get("/usage")
def usage() -> Response:
    """Tell a client its own counters: requests and tokens in the current windows, spend today."""
    gen = service()
    return jsonify(gen.quotas.usage(current_client(gen)))


@bp.post("/generate")
def generate() -> Response:
    """Generate text for one prompt."""
    gen = service()
    client = current_client(gen)
    g.rate_headers = gen.quotas.hit(client)
    body = load_body(current_app.extensions["llm_service.schema"])
    params = gen.params(body)
    g.log_fields.update(
        model=params.model,
        provider=gen.provider.name,
        prompt_hash=prompt_hash(params.prompt),
        prompt_length=len(params.prompt) + len(params.system or ""),
    )
    reservation = gen.quotas.reserve(client, params)
    if body["stream"]:
        return stream_response(gen.stream(params, reservation, g.started_monotonic))
    result = gen.generate(params, reservation, g.started_monotonic)
    g.log_fields.update(result.log_fields())
    return jsonify(request_id=g.request_id, output=result.completion.text, metadata=result.metadata())


def sse(event: str, data: dict[str, Any]) -> str:
    """Format one Server-Sent Event whose data is one JSON object."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_response(items: Iterator[TextDelta | Generation]) -> Response:
    """Answer with Server-Sent Events once the first text is in hand.

    Until then (validation, retries, waiting for the model) a failure is an ordinary JSON error;
    after it, a failure ends the stream with an `error` event.
    """
    first = next(items)
    time_to_first_token_ms = round((time.monotonic() - g.started_monotonic) * 1000, 1)
    g.log_deferred = True

    def events() -> Iterator[str]:
        status: int | str = 200
        try:
            item = first
            while isinstance(item, TextDelta):
                yield sse("delta", {"delta": item.text})
                item = next(items)
            g.log_fields.update(item.log_fields())
            done = {"request_id": g.request_id, "output": item.completion.text, "metadata": item.metadata()}
            yield sse("done", done)
        except ServiceError as error:
            g.service_error, status = error, error.status
            yield sse("error", envelope(error.code, error.message, error.details))
        except GeneratorExit:
            status = "client_closed"
            raise
        except Exception:
            log.exception("stream failed")
            g.service_error, status = ServiceError(), 500
            yield sse("error", envelope(ServiceError.code, ServiceError.message))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # stops the upstream read or the local model now, not when collected
            write_summary(status, stream=True, time_to_first_token_ms=time_to_first_token_ms)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(events()), status=200, mimetype="text/event-stream", headers=headers)

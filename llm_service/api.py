"""HTTP views: authenticate, load with a schema, call the service, dump (bookkeeping is in hooks.py)."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context
from marshmallow import ValidationError

from .clients import Client
from .errors import InvalidRequest, NotReady, ServiceError, Unauthorized, envelope
from .hooks import RequestRecord
from .logs import request_id_var
from .metrics import render
from .providers.base import TextDelta
from .quotas import Reservation
from .schemas import GenerateRequestSchema
from .service import Generation, GenerationService, prompt_hash

bp = Blueprint("api", __name__)
log = logging.getLogger("llm_service.api")


def service() -> GenerationService:
    """Return this app's GenerationService."""
    return current_app.extensions["llm_service"]  # type: ignore[no-any-return]


def load_body(schema: GenerateRequestSchema) -> dict[str, Any]:
    """Parse and validate the JSON body, or raise InvalidRequest with per-field details."""
    if not request.is_json:
        raise InvalidRequest("Content-Type must be application/json.")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nested past the parser's depth: not a ValueError, so `silent` lets it through
        raise InvalidRequest("The body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    try:
        return schema.load(body)  # type: ignore[no-any-return]
    except ValidationError as error:
        details: dict[str, Any] = error.normalized_messages()  # type: ignore[no-untyped-call]
        raise InvalidRequest("The request has invalid fields.", details=details) from None


@bp.get("/health")
def health() -> Response:
    """Answer a liveness probe without touching the backend: the original contract plus today's fields."""
    gen = service()
    return jsonify(
        status="healthy",
        service="llm-service",
        timestamp=int(time.time()),
        provider=gen.provider.name,
        default_model=gen.settings.default_model,
    )


def bearer_token() -> str | None:
    """Return the token of an `Authorization: Bearer` header, if there is one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def current_client(gen: GenerationService) -> Client:
    """Return who is calling: the named owner of a valid key, or anonymous by IP when auth is off."""
    if not gen.auth.enabled:
        client = Client(None, request.remote_addr)
    else:
        name = gen.auth.identify(bearer_token() or request.headers.get("X-API-Key"))
        if name is None:
            raise Unauthorized()
        client = Client(name, request.remote_addr)
    g.record.fields["client"] = client.label
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
    body = load_body(current_app.extensions["llm_service.schema"])
    params = gen.params(body)
    g.record.metrics_model = params.model  # the requested model: one of ALLOWED_MODELS, so labels stay bounded
    g.record.fields.update(
        model=params.model,
        provider=gen.provider.name,
        prompt_hash=prompt_hash(params.prompt),
        prompt_length=len(params.prompt) + len(params.system or ""),
    )
    reservation, g.rate_headers = gen.quotas.admit(client, params)
    if body["stream"]:
        return stream_response(gen.stream(params, reservation, g.record.started_monotonic), reservation)
    result = gen.generate(params, reservation, g.record.started_monotonic)
    g.record.fields.update(result.log_fields())
    return jsonify(request_id=g.request_id, output=result.completion.text, metadata=result.metadata())


def sse(event: str, data: dict[str, Any]) -> str:
    """Format one Server-Sent Event whose data is one JSON object."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_response(items: Iterator[TextDelta | Generation], reservation: Reservation) -> Response:
    """Answer with Server-Sent Events once the first text is in hand.

    Until then (validation, retries, waiting for the model) a failure is an ordinary JSON error;
    after it, a failure ends the stream with an `error` event. The request is logged when the stream
    ends, however it ends: done, failed, the client gone, or the response closed before it was read.
    """
    first = next(items)
    record: RequestRecord = g.record
    time_to_first_token_ms = round((time.monotonic() - record.started_monotonic) * 1000, 1)
    g.streaming = True

    def finish(status: int | str, error: ServiceError | None = None) -> None:
        getattr(items, "close", lambda: None)()  # stops the upstream read or the local model now
        estimate = reservation.estimate or {}  # a stream cut short is charged an estimate: say so
        record.finish(status, error, stream=True, time_to_first_token_ms=time_to_first_token_ms, **estimate)

    def events() -> Iterator[str]:
        token = request_id_var.set(record.request_id)  # Flask ran teardown when the view returned
        status: int | str = "client_closed"
        error: ServiceError | None = None
        try:
            item = first
            while isinstance(item, TextDelta):
                yield sse("delta", {"delta": item.text})
                item = next(items)
            record.fields.update(item.log_fields())
            status = 200
            yield sse(
                "done", {"request_id": record.request_id, "output": item.completion.text, "metadata": item.metadata()}
            )
        except ServiceError as failure:
            error, status = failure, failure.status
            yield sse("error", envelope(failure.code, failure.message, failure.details, record.request_id))
        except GeneratorExit:
            status = "client_closed"
            raise
        except Exception:
            log.exception("stream failed")
            error, status = ServiceError(), 500
            yield sse("error", envelope(ServiceError.code, ServiceError.message, None, record.request_id))
        finally:
            finish(status, error)
            request_id_var.reset(token)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    response = Response(stream_with_context(events()), status=200, mimetype="text/event-stream", headers=headers)
    response.call_on_close(lambda: finish("client_closed"))  # a response closed before it was ever read
    return response


@bp.get("/ready")
def ready() -> Response:
    """Answer 200 only when this instance can serve: backend ready, Redis answering, not shutting down."""
    gen = service()
    reasons = {}
    if current_app.extensions["llm_service.draining"].is_set():
        reasons["shutdown"] = "The instance is shutting down."
    if not gen.provider.is_ready():
        reasons["provider"] = f"The {gen.provider.name} backend is not ready."
    if gen.settings.redis_url:
        try:
            gen.quotas.ping()
        except Exception:
            reasons["redis"] = "Redis does not answer."
    if reasons:
        raise NotReady(details=reasons)
    return jsonify(status="ready", provider=gen.provider.name)


@bp.get("/metrics")
def metrics() -> Response:
    """Expose Prometheus metrics of every live worker; a Bearer METRICS_TOKEN is required when set."""
    token = service().settings.metrics_token
    if token:
        if not hmac.compare_digest((bearer_token() or "").encode(), token.encode()):
            raise Unauthorized("A valid metrics token is required.")
    body, content_type = render()
    return Response(body, content_type=content_type)

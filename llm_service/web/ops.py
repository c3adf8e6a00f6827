"""Operations endpoints: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import hmac
import time

from flask import Blueprint, Response, current_app, jsonify

from ..errors import NotReady, Unauthorized
from ..metrics import render
from .context import bearer_token, services

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health() -> Response:
    """Answer a liveness probe without touching the backend: the original contract plus today's fields."""
    svc = services()
    extra = {"models": list(svc.catalog.allowed_models)} if svc.catalog.routes else {}
    return jsonify(
        status="healthy",
        service="llm-service",
        timestamp=int(time.time()),
        provider=svc.provider.name,
        default_model=svc.catalog.default_model,
        **extra,
    )


@bp.get("/ready")
def ready() -> Response:
    """Answer 200 only when this instance can serve: backend ready, not shutting down, Redis as the limits need.

    A Redis outage makes an instance unready only when limits fail closed: with RATE_LIMIT_FAIL_OPEN every
    instance still serves (without limits), and taking them all out of the load balancer at once would turn a
    Redis outage into a full one. Such an instance answers 200 and says what is degraded.
    """
    svc = services()
    reasons: dict[str, str] = {}
    degraded: dict[str, str] = {}
    if svc.draining.is_set():
        reasons["shutdown"] = "The instance is shutting down."
    if not svc.provider.is_ready():
        reasons["provider"] = f"The {svc.provider.name} backend is not ready."
    if svc.settings.redis_url:
        try:
            svc.quotas.ping()
        except Exception:
            if svc.settings.rate_limit_fail_open:
                degraded["redis"] = "Redis does not answer: serving without limits (RATE_LIMIT_FAIL_OPEN)."
            else:
                reasons["redis"] = "Redis does not answer."
    if reasons:
        raise NotReady(details={**reasons, **degraded})
    # An open circuit is an upstream's outage, not this instance's: it stays ready and says which is open.
    circuit_states = getattr(svc.provider, "circuit_states", None)
    extra = {"circuits": circuit_states()} if circuit_states else {}
    if degraded:
        return jsonify(status="ready", provider=svc.provider.name, degraded=degraded, **extra)
    return jsonify(status="ready", provider=svc.provider.name, **extra)


@bp.get("/metrics")
def metrics() -> Response:
    """Expose Prometheus metrics of every live worker; a Bearer METRICS_TOKEN is required when set."""
    token = services().settings.metrics_token
    if token:
        if not hmac.compare_digest((bearer_token() or "").encode(), token.encode()):
            raise Unauthorized("A valid metrics token is required.")
    body, content_type = render()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    """Serve the OpenAPI 3.1 document of every endpoint, built from the schemas at start-up."""
    return jsonify(current_app.extensions["llm_service.openapi"])

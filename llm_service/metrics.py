"""Prometheus metrics, correct across gunicorn workers (prometheus_client's multiprocess mode).

Multiprocess mode is chosen by prometheus_client when it is first imported: PROMETHEUS_MULTIPROC_DIR must
be in the environment by then. gunicorn.conf.py sets it to a fresh directory per start, before any worker
forks, and removes each dead worker's live gauges in its child_exit hook.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60)
TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30)

REQUESTS = Counter("llm_requests_total", "HTTP requests answered.", ["endpoint", "status_code", "model", "client"])
REQUEST_DURATION = Histogram(
    "llm_request_duration_seconds",
    "Time to answer a request, streams until their end.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS_S,
)
UPSTREAM_DURATION = Histogram(
    "llm_upstream_duration_seconds",
    "Time of one upstream attempt.",
    ["provider", "model"],
    buckets=LATENCY_BUCKETS_S,
)
UPSTREAM_ATTEMPTS = Counter(
    "llm_upstream_attempts_total", "Upstream attempts by outcome, retries included.", ["provider", "outcome"]
)
TOKENS = Counter("llm_tokens_total", "Tokens reported by the backend.", ["model", "kind"])
COST = Counter("llm_cost_usd_total", "Cost of finished requests, USD.", ["model", "client"])
IN_FLIGHT = Gauge("llm_in_flight_requests", "Requests being answered now.", multiprocess_mode="livesum")
TIME_TO_FIRST_TOKEN = Histogram(
    "llm_time_to_first_token_seconds",
    "Time from request to first streamed text.",
    ["model"],
    buckets=TTFT_BUCKETS_S,
)
CACHE_REQUESTS = Counter(
    "llm_cache_requests_total",
    "Generation requests by how the response cache took part: hit, miss, bypass, or unavailable (store down).",
    ["result"],
)
COST_SAVED = Counter("llm_cost_saved_usd_total", "What cache hits would have cost, USD.", ["model", "client"])
CIRCUIT_STATE = Gauge(
    "llm_circuit_state",
    "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open (as this worker last saw it).",
    ["upstream"],
    multiprocess_mode="livemostrecent",
)
FALLBACKS = Counter("llm_fallbacks_total", "Requests answered by a fallback model.", ["from", "to"])
RETRIES_SKIPPED = Counter(
    "llm_retries_skipped_total", "Failed attempts answered without a retry because the retry budget was spent."
)
REJECTED = Counter("llm_rejected_total", "Requests refused before reaching the backend.", ["reason"])

# Error codes that mean the service refused the request itself, by rejection reason.
REJECTION_REASONS = {
    "invalid_request": "validation",
    "payload_too_large": "validation",
    "unauthorized": "auth",
    "rate_limited": "rate_limited",
    "token_limit_exceeded": "token_limit",
    "budget_exceeded": "budget",
}


def record_attempt(provider: str, model: str, outcome: str, duration_s: float) -> None:
    """Count one upstream attempt and its duration."""
    UPSTREAM_ATTEMPTS.labels(provider, outcome).inc()
    UPSTREAM_DURATION.labels(provider, model).observe(duration_s)


def record_request(endpoint: str, model: str, client: str, fields: dict[str, Any]) -> None:
    """Record a finished request from its summary-log fields, so logs and metrics never disagree."""
    REQUESTS.labels(endpoint, str(fields["status"]), model, client).inc()
    REQUEST_DURATION.labels(endpoint).observe(fields["latency_ms"] / 1000)
    reason = REJECTION_REASONS.get(fields.get("error_code") or "")
    if reason:
        REJECTED.labels(reason).inc()
    cache = fields.get("cache")
    if cache is not None:
        CACHE_REQUESTS.labels("unavailable" if fields.get("cache_reason") == "unavailable" else cache).inc()
        if fields.get("cost_saved_usd"):
            COST_SAVED.labels(model, client).inc(fields["cost_saved_usd"])
    if cache != "hit":  # a hit's tokens are the original answer's: the backend produced none now
        for kind in ("input", "cached_input", "output"):
            count = fields.get(f"tokens_{kind}")
            if count:
                TOKENS.labels(model, kind).inc(count)
    if fields.get("cost_usd"):
        COST.labels(model, client).inc(fields["cost_usd"])
    if fields.get("time_to_first_token_ms") is not None:
        TIME_TO_FIRST_TOKEN.labels(model).observe(fields["time_to_first_token_ms"] / 1000)


def render() -> tuple[bytes, str]:
    """Return the exposition text of every live worker (or of this process alone) and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (gunicorn's child_exit hook calls this)."""
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

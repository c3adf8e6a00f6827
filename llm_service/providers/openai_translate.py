"""What the openai client's failures mean for a client of this service, and which are worth retrying."""

from __future__ import annotations

import email.utils
import logging
import math
from datetime import UTC, datetime
from typing import Any

import httpx2
import openai

from ..errors import (
    ServiceError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from .base import TokenUsage
from .retry import Retryable

log = logging.getLogger("llm_service.providers.openai")

RETRYABLE_STATUSES = frozenset({408, 409, 429})
# Errors in reading a 200 body that the client's models do not catch themselves.
BAD_BODY_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)
# Everything reading an upstream answer can raise: the client's errors, the transport's, a bad body.
UPSTREAM_ERRORS = (openai.APIError, httpx2.HTTPError, *BAD_BODY_ERRORS)
# The longest wait an upstream may ask for that we repeat: a day. The retry loop never waits past the
# request's deadline anyway; this bounds the Retry-After header a client gets back.
MAX_RETRY_AFTER_S = 86400.0


def retry_after_s(headers: Any) -> float | None:
    """Return the upstream's requested wait, at most a day: retry-after-ms, else Retry-After (seconds or a date)."""
    wait_s = _requested_wait_s(headers)
    return None if wait_s is None else min(wait_s, MAX_RETRY_AFTER_S)


def _requested_wait_s(headers: Any) -> float | None:
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) / divisor
        except ValueError:
            if name == "retry-after":
                return _seconds_until_http_date(raw)
            continue
        if math.isfinite(value) and value >= 0:
            return value
    return None


def _seconds_until_http_date(raw: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def translate_status_error(error: openai.APIStatusError) -> ServiceError | Retryable:
    """Map an upstream HTTP error to the service error a client sees, wrapped if worth retrying."""
    status = error.status_code
    rid = error.request_id
    if status == 429:
        if error.code == "insufficient_quota":
            log.error("upstream quota exhausted", extra={"upstream_status": status})
            return UpstreamQuotaExceeded(upstream_request_id=rid)
        wait_s = retry_after_s(error.response.headers)
        return Retryable(
            UpstreamRateLimited(retry_after_s=wait_s or 1.0, upstream_request_id=rid), "rate_limited", wait_s
        )
    if status in (401, 403):
        log.error("upstream refused our credentials", extra={"upstream_status": status})
        return UpstreamAuthError(upstream_request_id=rid)
    if status == 408:
        return Retryable(UpstreamTimeout(upstream_request_id=rid), "timeout")
    if status >= 500 or status in RETRYABLE_STATUSES:
        return Retryable(UpstreamError(upstream_request_id=rid), f"status_{status}")
    if status in (400, 422):
        return UpstreamRejected(upstream_request_id=rid)
    log.error("upstream answered with an unexpected status", extra={"upstream_status": status})
    return UpstreamError(upstream_request_id=rid)


def translate(error: Exception) -> ServiceError | Retryable:
    """Map any exception from the openai client to a service error, wrapped if worth retrying."""
    if isinstance(error, (openai.APITimeoutError, httpx2.TimeoutException)):
        return Retryable(UpstreamTimeout(), "timeout")
    if isinstance(error, (openai.APIConnectionError, httpx2.TransportError)):
        return Retryable(UpstreamError(), "connection_error")
    if isinstance(error, openai.APIStatusError):
        return translate_status_error(error)
    return Retryable(UpstreamError(), "bad_body")


def token_usage(usage: Any) -> TokenUsage | None:
    """Return the reported token counts of a usage JSON object; None when the server sent none."""
    if usage is None:
        return None
    details = usage.get("prompt_tokens_details") or {}
    counts = TokenUsage(
        input=_token_count(usage.get("prompt_tokens")),
        output=_token_count(usage.get("completion_tokens")),
        cached_input=_token_count(details.get("cached_tokens") or 0),
    )
    if counts.cached_input > counts.input:
        raise ValueError("the upstream reported more cached input tokens than input tokens")
    return counts


def _token_count(value: Any) -> int:
    """Return a reported token count, or raise ValueError (a bad body) unless it is a whole number >= 0.

    The client's models are not validated, so a count can be anything the upstream sent: a negative one
    would lower the client's spend and break the token counters.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the upstream reported an invalid token count: {type(value).__name__}")
    return value

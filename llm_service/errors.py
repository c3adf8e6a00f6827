"""The exception tree: every error the service answers with, its status and code (no Flask here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RateWindow:
    """A client's standing in one limit: its size, what is left, and when (Unix time, s) it frees."""

    limit: int
    remaining: int
    reset_at: float


class ServiceError(Exception):
    """Root of every error the service answers with; subclasses fix the status and code."""

    status = 500
    code = "internal_error"
    message = "The service failed unexpectedly."

    def __init__(
        self,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
        attempts: int | None = None,
        upstream_request_id: str | None = None,
        extra_headers: dict[str, str] | None = None,
        rate_window: RateWindow | None = None,
    ) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.details = details
        self.retry_after_s = retry_after_s
        self.attempts = attempts
        self.upstream_request_id = upstream_request_id
        self.extra_headers = extra_headers or {}
        self.rate_window = rate_window  # the request limit that refused this request, for the API's headers
        self.transient = False  # set when retries of a passing fault ran out: another upstream may answer

    def headers(self) -> dict[str, str]:
        """Return the headers this error adds to its response."""
        if self.retry_after_s is None:
            return dict(self.extra_headers)
        return {**self.extra_headers, "Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class Unauthorized(ServiceError):
    status, code, message = 401, "unauthorized", "A valid API key is required."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="llm-service"'}


class RateLimited(ServiceError):
    status, code, message = 429, "rate_limited", "Too many requests for this client; retry later."


class TokenLimitExceeded(ServiceError):
    status, code, message = 429, "token_limit_exceeded", "This client's tokens per minute are spent; retry later."


class BudgetExceeded(ServiceError):
    status, code, message = 429, "budget_exceeded", "This client's budget for today is spent."


class NotReady(ServiceError):
    status, code, message = 503, "not_ready", "This instance cannot serve requests now."


class LimiterUnavailable(ServiceError):
    status, code, message = 503, "limiter_unavailable", "Usage limits cannot be checked right now; retry later."


class Overloaded(ServiceError):
    status, code, message = 503, "overloaded", "This instance is at capacity; retry shortly."


class RequestTimeout(ServiceError):
    status, code, message = 408, "request_timeout", "The request body did not arrive in time."


class InvalidRequest(ServiceError):
    status, code, message = 400, "invalid_request", "The request is invalid."


class ModelNotFound(ServiceError):
    status, code, message = 404, "model_not_found", "The model does not exist or is not allowed on this service."


class PayloadTooLarge(ServiceError):
    status, code, message = 413, "payload_too_large", "The request body is too large."


class UpstreamRateLimited(ServiceError):
    status, code, message = 429, "upstream_rate_limited", "The model provider is rate limiting; retry later."


class UpstreamQuotaExceeded(ServiceError):
    status, code, message = 503, "upstream_quota_exceeded", "The model provider's quota for this service is spent."


class UpstreamError(ServiceError):
    status, code, message = 502, "upstream_error", "The model provider failed to answer."


class UpstreamTimeout(ServiceError):
    status, code, message = 504, "upstream_timeout", "The model provider did not answer in time."


class ShuttingDown(ServiceError):
    status, code, message = 503, "shutting_down", "The service is restarting; retry the request."


class UpstreamUnavailable(ServiceError):
    status, code, message = 503, "upstream_unavailable", "The model provider is failing; retry after the pause."


class UpstreamAuthError(ServiceError):
    status, code, message = 502, "upstream_auth_error", "The service could not authenticate with the model provider."


class UpstreamRejected(ServiceError):
    status, code, message = 400, "upstream_rejected", "The model provider rejected the request."


class ClientClosed(ServiceError):
    # nginx's 499: the client closed its connection before its plain answer was ready. Written to a closed
    # connection, so no client reads it; the summary line says "client_closed".
    status, code, message = 499, "client_closed", "The client closed its connection before the answer was ready."


class LocalModelBusy(ServiceError):
    status, code, message = 503, "local_model_busy", "The local model is busy; retry later."

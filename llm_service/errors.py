"""One exception root, one error envelope, and the handlers that produce it."""

from __future__ import annotations

import logging
import math
from typing import Any

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("llm_service.errors")


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
    ) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.details = details
        self.retry_after_s = retry_after_s
        self.attempts = attempts
        self.upstream_request_id = upstream_request_id
        self.extra_headers = extra_headers or {}

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


class UpstreamAuthError(ServiceError):
    status, code, message = 502, "upstream_auth_error", "The service could not authenticate with the model provider."


class UpstreamRejected(ServiceError):
    status, code, message = 400, "upstream_rejected", "The model provider rejected the request."


class LocalModelBusy(ServiceError):
    status, code, message = 503, "local_model_busy", "The local model is busy; retry later."


# Werkzeug's own HTTP errors, translated into codes of this API.
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "invalid_request",
}


def envelope(
    code: str, message: str, details: dict[str, Any] | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """Return the one error body shape, with the request id (by default, the current request's)."""
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id or g.get("request_id")}
    if details:
        body["details"] = details
    return {"error": body}


def error_response(error: ServiceError) -> Response:
    """Render a ServiceError as the envelope, with its status and headers."""
    g.service_error = error
    response = jsonify(envelope(error.code, error.message, error.details))
    response.status_code = error.status
    response.headers.update(error.headers())
    return response


def _handle_service_error(error: ServiceError) -> Response:
    return error_response(error)


def _handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    g.error_code = code
    response = jsonify(envelope(code, error.description or "HTTP error"))
    response.status_code = status
    if status == 405 and error.get_headers():
        allow = dict(error.get_headers()).get("Allow")
        if allow:
            response.headers["Allow"] = allow
    return response


def _handle_unexpected(error: Exception) -> Response:
    log.exception("unhandled error", extra={"error_type": type(error).__name__})
    return error_response(ServiceError())


def register_error_handlers(app: Flask) -> None:
    """Send every non-2xx answer through the envelope."""
    app.register_error_handler(ServiceError, _handle_service_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)

"""Error handlers: every non-2xx answer in its API's one envelope, never with exception text."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import ServiceError
from .record import RequestRecord

log = logging.getLogger("llm_service.errors")

# Werkzeug's own HTTP errors, translated into codes of this service.
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "invalid_request",
}
# OpenAI's error types, by status: what its SDKs and clients expect to read.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
# The SDKs retry a 429 after its retry-after when that is at most a minute; a longer wait (a spent budget,
# a daily limit) would only be retried in vain, so such answers say x-should-retry: false.
SDK_MAX_RETRY_AFTER_S = 60.0
NOT_RETRYABLE_CODES = frozenset({"budget_exceeded", "upstream_quota_exceeded"})


def envelope(
    code: str, message: str, details: dict[str, Any] | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """Return the native API's error body, with the request id (by default, the current request's)."""
    if request_id is None:
        record: RequestRecord | None = g.get("record")
        request_id = record.request_id if record is not None else None
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return {"error": body}


def first_field(details: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """Return the dotted path of the first invalid field in marshmallow's details, and its first message."""
    path: list[str] = []
    node: Any = details
    while isinstance(node, dict) and node:
        key, node = next(iter(node.items()))
        if key != "_schema":
            path.append(str(key))
    message = node[0] if isinstance(node, list) and node and isinstance(node[0], str) else None
    return (".".join(path) or None), message


def openai_envelope(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return OpenAI's error body: message, type, param, code; a field error names the field."""
    param, field_message = first_field(details)
    if field_message:
        message = f"{message} {param + ': ' if param else ''}{field_message}"
    error_type = "insufficient_quota" if code == "budget_exceeded" else _OPENAI_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def should_retry_header(status: int, code: str, retry_after_s: float | None) -> dict[str, str]:
    """Return x-should-retry: false for an answer a retry cannot help, else nothing."""
    hopeless_wait = status == 429 and (retry_after_s is None or retry_after_s > SDK_MAX_RETRY_AFTER_S)
    return {"x-should-retry": "false"} if code in NOT_RETRYABLE_CODES or hopeless_wait else {}


def render(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    """Answer with the envelope of the current request's API."""
    record: RequestRecord | None = g.get("record")
    if record is not None and record.api == "openai":
        response = jsonify(openai_envelope(status, code, message, details))
    else:
        response = jsonify(envelope(code, message, details))
    response.status_code = status
    return response


def error_response(error: ServiceError) -> Response:
    """Render a ServiceError with its status and headers, and note it on the request record."""
    record: RequestRecord | None = g.get("record")
    if record is not None:
        record.error = error
    response = render(error.status, error.code, error.message, error.details)
    response.headers.update(error.headers())
    if record is not None and record.api == "openai":
        response.headers.update(should_retry_header(error.status, error.code, error.retry_after_s))
    return response


def _handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    record: RequestRecord | None = g.get("record")
    if record is not None:
        record.error_code = code
    response = render(status, code, error.description or "HTTP error")
    if status == 405 and error.get_headers():
        allow = dict(error.get_headers()).get("Allow")
        if allow:
            response.headers["Allow"] = allow
    return response


def _handle_unexpected(error: Exception) -> Response:
    log.exception("unhandled error", extra={"error_type": type(error).__name__})
    return error_response(ServiceError())


def register_error_handlers(app: Flask) -> None:
    """Send every non-2xx answer through its API's envelope."""
    app.register_error_handler(ServiceError, error_response)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)

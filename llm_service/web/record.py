"""The request record: the one object on flask.g, holding what a request's summary line and metrics need.

A plain answer is finished when Flask hands over the response; a stream when its body ends, however
it ends (see sse.py). Either way the record writes one summary line and its metrics, once.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, request

from ..errors import RateWindow, ServiceError
from ..logs import request_id_var
from ..metrics import IN_FLIGHT, record_request
from .headers import native_rate_headers, openai_rate_headers

log = logging.getLogger("llm_service.request")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Paths polled by load balancers and scrapers: their summary lines go to DEBUG, not INFO.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
# Methods that probe rather than use the API (CORS preflights, link checkers, HEAD health checks): no
# generation runs for them, so they are logged at DEBUG and kept out of the request metrics.
PROBE_METHODS = frozenset({"OPTIONS", "HEAD"})
OPENAI_PREFIX = "/v1/"


@dataclass
class RequestRecord:
    """One request's bookkeeping, kept so a stream can finish it after the view has returned."""

    request_id: str
    method: str
    path: str
    endpoint: str
    started_monotonic: float
    fields: dict[str, Any] = field(default_factory=dict)
    metrics_model: str = "none"
    # The client's standing in its request (and token) limits, for each API's rate-limit headers.
    request_window: RateWindow | None = None
    token_window: RateWindow | None = None
    error: ServiceError | None = None
    error_code: str | None = None  # of an HTTP error Werkzeug raised (404, 405, 413, ...)
    streaming: bool = False
    finished: bool = False
    _request_id_token: Token[str | None] | None = None

    @property
    def api(self) -> str:
        """Return which API the request speaks: 'openai' under /v1/, else 'native'."""
        return "openai" if self.path.startswith(OPENAI_PREFIX) else "native"

    @property
    def elapsed_ms(self) -> float:
        return round((time.monotonic() - self.started_monotonic) * 1000, 1)

    def admitted(self, request_window: RateWindow | None) -> None:
        """Note where the client stands in its request limit, once its request is admitted."""
        self.request_window = request_window

    def rate_headers(self) -> dict[str, str]:
        """Return the rate-limit headers of this request, in its API's spelling."""
        window = self.request_window or (self.error.rate_window if self.error else None)
        if self.api == "openai":
            return openai_rate_headers(window, self.token_window)
        return native_rate_headers(window)

    def finish(self, status: int | str, **extra: Any) -> None:
        """Write the summary line and record the metrics; never the prompt or the answer."""
        if self.finished:  # a response Flask renders twice (an error in an after_request hook) logs once
            return
        self.finished = True
        summary: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": status,
            "latency_ms": self.elapsed_ms,
            **self.fields,
            **extra,
        }
        if self.error is not None:
            summary["error_code"] = self.error.code
            if self.error.attempts is not None:
                summary["attempts"] = self.error.attempts
            if self.error.upstream_request_id is not None:
                summary["upstream_request_id"] = self.error.upstream_request_id
        elif self.error_code:
            summary["error_code"] = self.error_code
        try:
            probe = self.method in PROBE_METHODS
            log.log(logging.DEBUG if probe or self.path in QUIET_PATHS else logging.INFO, "request", extra=summary)
            if not probe:
                record_request(self.endpoint, self.metrics_model, summary.get("client", "anonymous"), summary)
        finally:  # whatever fails above, this request is no longer in flight
            IN_FLIGHT.dec()


def current_record() -> RequestRecord:
    """Return the record of the request being handled."""
    return g.record  # type: ignore[no-any-return]


def request_id_from(incoming: str) -> str:
    """Return the caller's request id when it is safe to log and echo, else a new one."""
    return incoming if _VALID_REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())


def start_request() -> None:
    """Take the caller's request id when it is safe, else make one; start the clock."""
    request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER, ""))
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    record = RequestRecord(request_id, request.method, request.path, endpoint, time.monotonic())
    record._request_id_token = request_id_var.set(request_id)
    g.record = record
    IN_FLIGHT.inc()


def finish_request(response: Response) -> Response:
    """Tag the response with its request id and rate-limit headers; finish the record unless it streams."""
    record: RequestRecord | None = g.get("record")
    if record is None:  # a request that failed before start_request ran
        return response
    response.headers[REQUEST_ID_HEADER] = record.request_id
    for name, value in record.rate_headers().items():
        response.headers.setdefault(name, value)
    if record.api == "openai":
        response.headers["openai-processing-ms"] = str(round(record.elapsed_ms))
    if not record.streaming:
        record.finish(response.status_code)
    return response


def forget_request_id(_: BaseException | None) -> None:
    """Clear the request id from this thread's logging context."""
    record: RequestRecord | None = g.get("record")
    if record is not None and record._request_id_token is not None:
        request_id_var.reset(record._request_id_token)
        record._request_id_token = None


def register_request_hooks(app: Flask) -> None:
    """Run the bookkeeping around every request of `app`."""
    app.before_request(start_request)
    app.after_request(finish_request)
    app.teardown_request(forget_request_id)

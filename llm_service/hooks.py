"""Per-request bookkeeping: the request id, the one summary log line, metrics, requests in flight."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, request

from .errors import ServiceError
from .logs import request_id_var
from .metrics import IN_FLIGHT, record_request

log = logging.getLogger("llm_service.request")

REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Paths polled by load balancers and scrapers: their summary lines go to DEBUG, not INFO.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class RequestRecord:
    """What the summary line and the metrics of one request need, kept so a stream can finish it later."""

    request_id: str
    method: str
    path: str
    endpoint: str
    started_monotonic: float
    fields: dict[str, Any] = field(default_factory=dict)
    metrics_model: str = "none"
    finished: bool = False

    def finish(
        self, status: int | str, error: ServiceError | None = None, error_code: str | None = None, **extra: Any
    ) -> None:
        """Write the summary line and record the metrics, once; never the prompt or the answer."""
        if self.finished:
            return
        self.finished = True
        summary: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": status,
            "latency_ms": round((time.monotonic() - self.started_monotonic) * 1000, 1),
            **self.fields,
            **extra,
        }
        if error is not None:
            summary["error_code"] = error.code
            if error.attempts is not None:
                summary["attempts"] = error.attempts
            if error.upstream_request_id is not None:
                summary["upstream_request_id"] = error.upstream_request_id
        elif error_code:
            summary["error_code"] = error_code
        log.log(logging.DEBUG if self.path in QUIET_PATHS else logging.INFO, "request", extra=summary)
        record_request(self.endpoint, self.metrics_model, summary.get("client", "anonymous"), summary)
        IN_FLIGHT.dec()


def start_request() -> None:
    """Take the caller's request id when it is safe, else make one; start the clock."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    g.record = RequestRecord(request_id, request.method, request.path, endpoint, time.monotonic())
    g.request_id = request_id  # what errors.envelope reads
    g.request_id_token = request_id_var.set(request_id)
    IN_FLIGHT.inc()


def finish_request(response: Response) -> Response:
    """Tag the response with its request id and rate-limit headers; finish it unless it streams."""
    record: RequestRecord | None = g.get("record")
    if record is None:  # a request that failed before start_request ran
        return response
    response.headers[REQUEST_ID_HEADER] = record.request_id
    for name, value in g.get("rate_headers", {}).items():
        response.headers.setdefault(name, value)
    if not g.get("streaming"):
        record.finish(response.status_code, g.get("service_error"), g.get("error_code"))
    return response


def forget_request_id(_: BaseException | None) -> None:
    """Clear the request id from this thread's logging context."""
    token = g.pop("request_id_token", None)
    if token is not None:
        request_id_var.reset(token)


def register_request_hooks(app: Flask) -> None:
    """Run the bookkeeping around every request of `app`."""
    app.before_request(start_request)
    app.after_request(finish_request)
    app.teardown_request(forget_request_id)

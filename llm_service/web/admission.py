"""WSGI middleware in front of the app: shed load past MAX_IN_FLIGHT, and read request bodies by a deadline.

Load is shed instead of queued: a worker already answering MAX_IN_FLIGHT requests answers the next one
503 `overloaded` with a Retry-After at once, so callers retry elsewhere instead of waiting into a timeout.
Probes (/health, /ready, /metrics) are never shed and never wait behind anything here.
"""

from __future__ import annotations

import http
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import Overloaded, RequestTimeout, ServiceError
from ..greenlets import cpu_turnstile, time_limit
from ..metrics import REJECTED
from .errors import envelope, openai_envelope
from .record import REQUEST_ID_HEADER, request_id_from

log = logging.getLogger("llm_service.admission")

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _BodyTooSlow(Exception):
    pass


class Admission:
    """Count this worker's requests in flight; refuse past the limit; read each body within its deadline."""

    def __init__(self, app: WSGIApp, max_in_flight: int, body_timeout_s: float, max_body_bytes: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.body_timeout_s = body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0
        self._lock = threading.Lock()  # a greenlet lock under gevent; a real one under gthread
        self._last_warning_monotonic = 0.0
        self._turnstile = cpu_turnstile()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in PROBE_PATHS:
            return self.app(environ, start_response)
        with self._lock:
            admitted = self.in_flight < self.max_in_flight
            if admitted:
                self.in_flight += 1
        if not admitted:  # refused at once: a refusal is cheap, and must not wait
            self._warn_overloaded()
            REJECTED.labels("overloaded").inc()
            return _refuse(Overloaded(retry_after_s=1.0), environ, start_response)
        self._turnstile.pass_through()  # a request's work up to its upstream call is heavy: take turns
        try:
            try:
                self._read_body(environ)
            except _BodyTooSlow:
                REJECTED.labels("request_timeout").inc()
                self._release()
                return _refuse(RequestTimeout(), environ, start_response)
            result = self.app(environ, start_response)
        except BaseException:
            self._release()
            raise
        return _Released(result, self._release)  # a stream stays in flight until its last event

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _read_body(self, environ: dict[str, Any]) -> None:
        """Read the whole body now, within BODY_TIMEOUT, so a client that trickles it cannot hold a request."""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return  # the app refuses it
        if not chunked and not 0 < length <= self.max_body_bytes:
            return  # no body, or one the app refuses (413) by its length alone
        with time_limit(self.body_timeout_s, _BodyTooSlow()):
            body = environ["wsgi.input"].read(length if not chunked else self.max_body_bytes + 1)
        environ["wsgi.input"] = io.BytesIO(body)
        if chunked:
            environ["CONTENT_LENGTH"] = str(len(body))  # the app sees a plain body, still held to its limit

    def _warn_overloaded(self) -> None:
        now = time.monotonic()
        if now - self._last_warning_monotonic >= 1.0:  # once a second, not once a refusal
            self._last_warning_monotonic = now
            log.warning("shedding load", extra={"max_in_flight": self.max_in_flight})


class _Released:
    """The app's response, whose close also ends the request's place in flight."""

    def __init__(self, result: Iterable[bytes], release: Callable[[], None]) -> None:
        self._result = result
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _refuse(error: ServiceError, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
    if str(environ.get("PATH_INFO", "")).startswith("/v1/"):  # each API answers in its own error shape
        document = openai_envelope(error.status, error.code, error.message)
    else:
        document = envelope(error.code, error.message, None, request_id)
    body = json.dumps(document).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        (REQUEST_ID_HEADER, request_id),
        *error.headers().items(),
    ]
    start_response(f"{error.status} {http.HTTPStatus(error.status).phrase}", headers)
    return [body]

"""gunicorn plug-ins (named in gunicorn.conf.py): the gevent worker and the access logger."""

from __future__ import annotations

import json
import re
import time
import uuid
from functools import partial
from typing import Any
from urllib.parse import unquote_plus

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker

# Query parameters whose values never reach a log line: a name containing one of these words.
_SECRET_NAME = re.compile(r"key|token|secret|passw|pwd|auth|signature|credential|session|cookie", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"([^?&;=\s]+)=([^&;#\s]*)")
# Request headers gunicorn offers as `{name}i` atoms that carry credentials.
_SECRET_HEADERS = ("{authorization}i", "{x-api-key}i", "{cookie}i", "{proxy-authorization}i")
REDACTED = "[REDACTED]"


def redact_query(text: str) -> str:
    """Replace the value of every secret-looking `name=value` pair in a URL, query string or request line."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"{name}={REDACTED}" if _SECRET_NAME.search(unquote_plus(name)) else match.group(0)

    return _QUERY_PARAM.sub(replace, text)


# gunicorn answers a request it cannot parse (or a worker's crash) itself, before the app sees it; these are
# its statuses, in this service's envelope. The message is fixed: gunicorn's own text quotes the request.
_GUNICORN_ERRORS = {
    400: ("invalid_request", "The request could not be parsed as HTTP/1.1."),
    403: ("forbidden", "The request was refused."),
    414: ("request_line_too_long", "The request line is longer than this service accepts."),
    417: ("invalid_request", "The Expect header is not supported."),
    431: ("headers_too_large", "The request's headers are larger or more numerous than this service accepts."),
    501: ("invalid_request", "The request's transfer coding is not supported."),
    500: ("internal_error", "The service failed unexpectedly."),
}


def write_error_envelope(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Write gunicorn's own error answer as JSON in the error envelope (replaces gunicorn.util.write_error).

    It carries `type` and `param` as well, so OpenAI's SDKs read it like their API's errors.
    """
    code, message = _GUNICORN_ERRORS.get(status_int, ("invalid_request", reason))
    request_id = str(uuid.uuid4())
    error = {"code": code, "message": message, "request_id": request_id, "type": "invalid_request_error"}
    if status_int >= 500:
        error["type"] = "server_error"
    body = json.dumps({"error": {**error, "param": None}}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def install_error_envelope() -> None:
    """Make gunicorn write its own error answers in the envelope, in this worker process."""
    util.write_error = write_error_envelope


class AccessLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, with the access log on only when `accesslog` is set, and secrets redacted from it.

    gunicorn turns its access log on whenever a logging config is given, which this service always gives.
    """

    @property
    def access_log_enabled(self) -> bool:
        return self.cfg.accesslog is not None

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for name in ("r", "q", "f"):  # request line, query string, referer
            if isinstance(atoms.get(name), str):
                atoms[name] = redact_query(atoms[name])
        for name in _SECRET_HEADERS:
            if name in atoms:
                atoms[name] = REDACTED
        return atoms


class GeventWorker(_GunicornGeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker, which also stops accepting the moment SIGTERM arrives.

    gunicorn's own checks for SIGTERM once a second and then closes its listening socket; connections the
    kernel completed meanwhile sit in the backlog and are reset when the last worker closes it. Here the
    backlog is served first and the socket closed at once, so a new connection is refused, never reset.
    """

    def run(self) -> None:
        self._servers = [self._serve(sock) for sock in self.sockets]
        while self.alive:
            self.notify()
            gevent.sleep(1.0)
        self._stop_accepting()
        graceful_end = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < graceful_end:
            if all(server.pool.free_count() == server.pool.size for server in self._servers):
                return
            self.notify()
            gevent.sleep(0.1)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in self._servers:
            server.stop(timeout=1)

    def _serve(self, sock: Any) -> StreamServer:
        sock.setblocking(1)
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        pool = Pool(self.worker_connections)
        server = StreamServer(sock, handle=partial(self.handle, sock), spawn=pool, **ssl_args)
        if self.cfg.workers > 1:
            # Workers share one listening socket. Taking gevent's 100 connections per wake-up, one worker would
            # take most of a burst; taking one, a burst's connections waited in the kernel's queue to be
            # accepted one per turn of the heavy work (turnstile), and a health probe behind 1,000 of them
            # waited up to 0.5 s. Four per wake-up keeps the workers even and a probe under 0.1 s.
            server.max_accept = 4
        server.start()
        return server

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        gevent.spawn(self._stop_accepting)  # out of the signal handler, as gunicorn does for SIGQUIT

    def _stop_accepting(self) -> None:
        for server in getattr(self, "_servers", []):
            if server.closed:
                continue
            server.stop_accepting()
            try:
                while accepted := server.do_read():  # what is already in the backlog is served, not reset
                    server.do_handle(*accepted)
            except OSError:
                pass  # the backlog is empty
            server.close()

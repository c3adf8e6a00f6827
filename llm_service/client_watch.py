"""Noticing that the client of a plain (non-streamed) answer has closed its connection, so the work stops.

A stream notices when a write fails; a plain answer writes nothing until it is whole, so while the backend
works the client's socket is watched instead. Readable with nothing to read (end of stream, or a reset)
means the client closed it: the work stops. Readable with data (a pipelined next request) tells nothing:
watching stops and the work goes on. This is nginx's default for proxied requests; a client that
half-closes its sending side after its request looks gone too.

Under gevent an io watcher on the socket, started only while the backend call runs, raises ClientGone in
the request's greenlet where that waits (the upstream's socket, the local model's channel), as gevent's own
Timeout does. Threads can't be interrupted: under gthread those two waits ask `raise_if_gone` every few
tenths of a second instead (`polled_watch`).
"""

from __future__ import annotations

import _socket  # the C module: gevent patches `socket`, never this
import functools
from contextvars import ContextVar, Token
from typing import Any

from greenlet import getcurrent as _getcurrent

from .greenlets import gevent_patched

# How often a thread waiting for the local model asks whether its client is still there.
LOCAL_POLL_S = 0.1
# How long a thread's upstream read waits before it asks (a read that ends sooner costs nothing more).
UPSTREAM_POLL_S = 0.25

_polled: ContextVar[ClientWatch | None] = ContextVar("polled_client_watch", default=None)


class ClientGone(BaseException):
    """The client closed its connection while its plain answer was being made.

    A BaseException, like gevent's Timeout: the code it interrupts lets it through (the SDK turns any
    Exception into a connection error, and retries it) up to the generation, which settles the request.
    """

    def __init__(self) -> None:
        super().__init__("the client closed its connection")
        # What the backend used before it stopped, when it knows (the local model): None is unknown.
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.log_fields: dict[str, Any] = {}  # what the generation charged, for the summary line


class ClientWatch:
    """One request's client socket, watched while the backend makes its plain answer (`with watch: ...`)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._told = False  # data came (a pipelined request): nothing more can be told, stop looking
        self._watcher: Any = None  # under gevent, while the block runs
        self._token: Token[ClientWatch | None] | None = None  # under gthread, while the block runs

    def __enter__(self) -> None:
        """Raise ClientGone in this block's waits if the client closes its connection meanwhile."""
        hub = _gevent_hub()
        if hub is None:
            self._token = _polled.set(self)
            return
        self._watcher = hub.loop.io(self._sock.fileno(), 1)  # 1: readable
        self._watcher.start(self._on_readable, self._watcher, _getcurrent())

    def __exit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.close()  # stopped on every way out: a stopped watcher's pending call is dropped too
            self._watcher = None
        elif self._token is not None:
            _polled.reset(self._token)
            self._token = None

    def _on_readable(self, watcher: Any, greenlet: Any) -> None:
        """(In gevent's hub, the request's greenlet waiting in the block) raise ClientGone there if the client left."""
        state = self._peek()
        if state is None:
            return  # woken for nothing: keep watching
        watcher.stop()
        if state:
            greenlet.throw(ClientGone())

    def raise_if_gone(self) -> None:
        """Raise ClientGone if the client has closed its connection (one non-blocking look, none once data came)."""
        if not self._told and self._peek():
            raise ClientGone()

    def _peek(self) -> bool | None:
        """Look at the socket without reading: True at its end, False with data waiting, None with nothing yet."""
        if self._told:
            return False
        # A plain socket object on the same descriptor, detached after: a gevent socket would wait, not fail.
        sock = self._sock
        probe = _socket.socket(sock.family, sock.type, 0, sock.fileno())
        try:
            gone = not probe.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:  # reset by the peer, or no longer connected
            return True
        finally:
            probe.detach()
        self._told = not gone
        return gone


@functools.cache
def _gevent_hub() -> Any:
    """Return the gevent hub when gevent has patched this process (the gevent worker), else None."""
    if not gevent_patched():  # looked up once, in a worker gunicorn has forked and gevent patched
        return None
    import gevent

    return gevent.get_hub()


def polled_watch() -> ClientWatch | None:
    """Return the watch a thread's waits must ask (under gthread, while a plain answer is made), else None."""
    return _polled.get()

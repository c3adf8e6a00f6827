"""An HTTP transport whose every socket operation ends by the current attempt's deadline.

httpx's read timeout restarts with each chunk, so an upstream that drips its body a byte at a time
would never time out. Here each connect, read and write gets at most the time left before a deadline
held in a context variable, and an operation that starts after it fails at once with a timeout.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpcore2
import httpx2
from httpcore2 import NetworkBackend, NetworkStream

from ..client_watch import UPSTREAM_POLL_S, ClientWatch, polled_watch
from ..greenlets import cpu_turnstile, readable_now

_deadline_var: ContextVar[float | None] = ContextVar("upstream_deadline", default=None)

# How long a response closed before its end may take to finish arriving, so that its connection is kept.
DRAIN_S = 0.05
# Request bytes held back to go out in one write with what follows them (a request's head and body).
UNSENT_MAX_BYTES = 64 * 1024


@contextmanager
def deadline(deadline_monotonic: float) -> Iterator[None]:
    """Bound every upstream socket operation in this block by `deadline_monotonic`."""
    token = _deadline_var.set(deadline_monotonic)
    try:
        yield
    finally:
        _deadline_var.reset(token)


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    limit = _deadline_var.get()
    if limit is None:
        return timeout
    remaining = limit - time.monotonic()
    if remaining <= 0:
        raise error("deadline reached")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(NetworkStream):
    """A connection's socket, bounded by the deadline, that sends a request's head and body in one write.

    httpcore writes a request's headers, then its body: two system calls (and two TCP segments) per call.
    Writes are held until the next read, when the response is awaited, or until there is plenty to send.
    """

    def __init__(self, inner: NetworkStream) -> None:
        self._inner = inner
        self._unsent: list[bytes] = []
        self._unsent_bytes = 0
        self._write_timeout: float | None = None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._send_unsent()
        bounded = _bounded(timeout, httpcore2.ReadTimeout)
        watch = polled_watch()  # under gthread, while a plain answer's client is watched
        if watch is None:
            data = self._inner.read(max_bytes, bounded)
        else:
            data = self._read_watching(max_bytes, bounded, watch)
        cpu_turnstile().pass_through()  # what follows an upstream answer (or event) is heavy: take turns
        return data

    def _read_watching(self, max_bytes: int, timeout: float | None, watch: ClientWatch) -> bytes:
        """Read in waits of UPSTREAM_POLL_S, asking between two whether the client is still there.

        A thread can't be interrupted; a read that times out leaves the socket (and a TLS session) as it was.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left_s = None if end is None else end - time.monotonic()
            if left_s is not None and left_s <= UPSTREAM_POLL_S:
                return self._inner.read(max_bytes, max(left_s, 0.001))
            try:
                return self._inner.read(max_bytes, UPSTREAM_POLL_S)
            except httpcore2.ReadTimeout:
                watch.raise_if_gone()

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self._unsent.append(buffer)
            self._unsent_bytes += len(buffer)
            self._write_timeout = timeout
        if self._unsent_bytes >= UNSENT_MAX_BYTES:
            self._send_unsent()

    def _send_unsent(self) -> None:
        if self._unsent:
            data = b"".join(self._unsent)
            self._unsent.clear()
            self._unsent_bytes = 0
            self._inner.write(data, _bounded(self._write_timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> NetworkStream:
        self._send_unsent()  # nothing is held then in practice (a proxy's CONNECT is answered first), but in order
        bounded = _bounded(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of every pooled connection a request passes: answered without a switch
            sock = self._inner.get_extra_info("socket")
            return sock is None or sock.fileno() < 0 or readable_now(sock.fileno())
        return self._inner.get_extra_info(info)


class _DeadlineBackend(NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore2.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> NetworkStream:
        bounded = _bounded(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> NetworkStream:
        bounded = _bounded(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlinePool(httpx2.HTTPTransport):
    """httpx's own transport, on a connection pool whose sockets obey the deadline.

    HTTPTransport takes no network backend, so its private `_pool` is replaced (httpx2 2.16);
    tests/test_library_hooks.py fails if an upgrade stops the transport from using it.
    """

    def __init__(self, *, ssl_context: Any, max_connections: int, max_keepalive_connections: int) -> None:
        super().__init__(verify=ssl_context)  # a context given is used as is, not loaded again
        self._pool = httpcore2.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=5.0,
            network_backend=_DeadlineBackend(),
        )


class _KeepAliveBody(httpx2.SyncByteStream):
    """A response body that, closed before its end, first reads what is left for a moment to keep its connection.

    The SDK's synchronous stream stops reading at `[DONE]` and closes the response, just before the chunked
    body's last bytes: httpcore then drops the connection, and every stream paid for a new one (a TCP
    connect and a threadpool name lookup here; a TLS handshake too against a real upstream).
    """

    def __init__(self, inner: httpx2.SyncByteStream) -> None:
        self._inner = inner
        self._chunks: Iterator[bytes] | None = None
        self._ended = False

    def __iter__(self) -> Iterator[bytes]:
        self._chunks = iter(self._inner)
        yield from self._chunks
        self._ended = True

    def close(self) -> None:
        try:
            if self._chunks is not None and not self._ended:
                limit = time.monotonic() + DRAIN_S
                with deadline(min(limit, _deadline_var.get() or limit)):
                    for _ in self._chunks:  # the rest of the body; a stream cut short by its reader times out here
                        pass
        except httpx2.HTTPError:
            pass  # not over in time, or broken: the connection is dropped, as before
        finally:
            self._inner.close()


class DeadlineTransport(httpx2.BaseTransport):
    """Upstream connections whose sockets obey the deadline, spread over small pools.

    httpcore's pool walks all of its connections (polling each idle one) on every request and every
    response close: with hundreds of calls in flight in one worker that walk is quadratic and ate a
    quarter of the CPU. Calls go round robin to pools of about `shard_size` connections instead.
    """

    def __init__(self, *, max_in_flight: int = 1000, shard_size: int = 32) -> None:
        shards = max(1, math.ceil(max_in_flight / shard_size))
        ssl_context = httpx2.create_ssl_context()  # loading the CA store takes tens of ms: once, shared
        self._shards = [
            _DeadlinePool(ssl_context=ssl_context, max_connections=max_in_flight, max_keepalive_connections=shard_size)
            for _ in range(shards)
        ]
        self._turn = itertools.count()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self._shards[next(self._turn) % len(self._shards)].handle_request(request)
        if isinstance(response.stream, httpx2.SyncByteStream):
            response.stream = _KeepAliveBody(response.stream)
        return response

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

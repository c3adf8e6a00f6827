"""The two places that override a library's internals; each test fails if an upgrade makes the override silent.

httpx2.HTTPTransport has no public way to give its connection pool a network backend, so DeadlineTransport
replaces the transport's `_pool`; limits' MemoryStorage has no public hook for its expiry timer, so
InlineExpiryMemoryStorage overrides a name-mangled method. Nothing fails loudly if either library renames
what is overridden: these tests do.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx2
import limits
import limits.storage
import limits.strategies
import pytest

from llm_service.providers.deadline import DeadlineTransport, deadline
from llm_service.quotas import InlineExpiryMemoryStorage


@pytest.fixture
def header_drip() -> Iterator[str]:
    """Serve a status line, then headers a byte every 50 ms: each read succeeds, the response never ends."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(5)
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for byte in b"X-Slow: " + b"a" * 400:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    stop.set()
    server.close()
    thread.join(5)


def test_deadline_transport_cuts_dripping_headers_at_the_deadline(header_drip: str) -> None:
    # httpx's own read timeout (5 s here) restarts with every byte, so only the deadline can stop this.
    client = httpx2.Client(transport=DeadlineTransport(), timeout=5.0)
    started = time.monotonic()
    with pytest.raises(httpx2.TimeoutException), deadline(time.monotonic() + 0.5):
        client.get(header_drip)
    assert time.monotonic() - started < 2.0
    client.close()


def test_memory_limiter_override_still_replaces_the_expiry_timer() -> None:
    # The override must name a method MemoryStorage still has, or it overrides nothing.
    assert callable(getattr(limits.storage.MemoryStorage, "_MemoryStorage__schedule_expiry", None))
    assert callable(getattr(limits.storage.MemoryStorage, "_MemoryStorage__expire_events", None))
    storage = InlineExpiryMemoryStorage()
    storage.timer.join(1)  # the one timer MemoryStorage starts when it is made
    limiter = limits.strategies.MovingWindowRateLimiter(storage)
    item = limits.parse("1000/minute")
    threads_before = threading.active_count()
    for number in range(200):
        assert limiter.hit(item, "test", f"client-{number % 7}")
    # The stock class starts a timer thread whenever the last one has finished: one per request or so.
    assert not storage.timer.is_alive()
    assert threading.active_count() == threads_before

"""An asyncio load generator on raw sockets: a thousand concurrent HTTP/1.1 calls from one process.

Each call opens a fresh connection (`Connection: close`), as independent clients would, and reads the
answer to its end. Also the hostile clients of the capacity benchmark: slowloris, idle keep-alive,
and clients that never close.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import resource
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed (requirements-dev.txt), else on asyncio's own loop.

    The load generator and the fake upstream share the machine's cores with the service they measure: uvloop
    cuts their CPU by about a third, which the service then has.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def raise_fd_limit() -> None:
    """Lift this process's open-files limit to the hard limit: a thousand sockets need more than 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Outcome:
    status: int
    latency_s: float
    body: bytes
    headers: dict[str, str]


def request_bytes(method: str, path: str, body: Any = None, keep_alive: bool = False) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode() + b"\r\n" + payload


async def call(port: int, method: str, path: str, body: Any = None, timeout_s: float = 60.0) -> Outcome:
    """Make one call on a fresh connection; status 0 means the connection failed or timed out."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request_bytes(method, path, body))
                raw = await reader.read(-1)  # Connection: close, so the answer ends at EOF
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return Outcome(0, time.perf_counter() - started, b"", {})
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Outcome(status, time.perf_counter() - started, payload, headers)


async def burst(port: int, clients: int, path: str, body: Any) -> list[Outcome]:
    """Start `clients` calls at once and wait for all of them."""
    return list(await asyncio.gather(*(call(port, "POST", path, body) for _ in range(clients))))


async def probes(port: int, count: int, interval_s: float, path: str = "/health") -> list[Outcome]:
    """Poll `path` from a fresh connection every `interval_s`, as a load balancer's health check does.

    The probes run in a process of their own, with blocking sockets: in this one they would wait their turn
    among the burst's thousand connections, and time this event loop as well as the service.
    """
    command = [sys.executable, __file__, "probe", str(port), str(count), str(interval_s), path]
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    return [Outcome(status, latency_s, b"", {}) for status, latency_s in json.loads(stdout)]


def _probe_loop(port: int, count: int, interval_s: float, path: str) -> list[tuple[int, float]]:
    results = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
            connection.request("GET", path, headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            status = response.status
            connection.close()
        except OSError:
            status = 0
        results.append((status, time.perf_counter() - started))
        time.sleep(interval_s)
    return results


async def hold_hostile(port: int, kind: str, clients: int, until_monotonic: float) -> int:
    """Keep `clients` hostile connections of `kind` open until the deadline, reopening any the server closes.

    slowloris: sends a request's headers a byte a second; idle: one keep-alive request, then silence;
    never_close: a `Connection: close` request whose answer is never read and whose socket is never closed.
    Returns how many connections were opened in all.
    """
    opened = 0

    async def one() -> None:
        nonlocal opened
        while time.monotonic() < until_monotonic:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            opened += 1
            try:
                if kind == "slowloris":
                    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
                        if time.monotonic() >= until_monotonic or reader.at_eof():
                            break
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(1.0)
                elif kind == "idle":
                    writer.write(request_bytes("GET", "/health", keep_alive=True))
                    await reader.readuntil(b"}\n")  # the end of the JSON answer (Flask ends it with a newline)
                    await asyncio.wait_for(reader.read(1), until_monotonic - time.monotonic())  # until closed
                else:  # never_close
                    writer.write(request_bytes("GET", "/health"))
                    await asyncio.sleep(max(until_monotonic - time.monotonic(), 0))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(clients)))
    return opened


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    port, count, interval_s, path = sys.argv[2:6]
    print(json.dumps(_probe_loop(int(port), int(count), float(interval_s), path)))

"""Capacity guards, through the Procfile's gunicorn: load shedding, probes, slow clients, SIGTERM, access log."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from llm_service.server import redact_query
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import Service, generate_in_background
from tests.test_observability import scrape, total

MAX_IN_FLIGHT = 3


def upstream_env(upstream: FakeOpenAI, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url, "RATE_LIMIT": "1000/minute", **extra}


@pytest.fixture
def small_service(upstream: FakeOpenAI, tmp_path: Path) -> Iterator[Service]:
    env = upstream_env(upstream, WEB_CONCURRENCY="1", MAX_IN_FLIGHT=str(MAX_IN_FLIGHT), BODY_TIMEOUT="1")
    with Service(env, tmp_path / "service.log") as running:
        yield running


def hold_in_flight(service: Service, upstream: FakeOpenAI, count: int, delay_s: float) -> list[Future]:
    """Start `count` /generate calls that the upstream answers after `delay_s`; return once all are in."""
    upstream.default = fake.ok(delay_s=delay_s)
    before = upstream.calls
    pool = ThreadPoolExecutor(count)
    futures = [pool.submit(service.generate, {"prompt": "hold"}) for _ in range(count)]
    pool.shutdown(wait=False)
    deadline = time.monotonic() + 10
    while upstream.calls < before + count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.calls == before + count, "the calls did not all reach the upstream"
    return futures


@pytest.mark.e2e
def test_requests_past_max_in_flight_are_shed_at_once_and_the_rest_finish(
    small_service: Service, upstream: FakeOpenAI
) -> None:
    held = hold_in_flight(small_service, upstream, MAX_IN_FLIGHT, delay_s=3.0)
    started = time.monotonic()
    status, body, headers = small_service.generate({"prompt": "one too many"}, headers={"X-Request-ID": "shed-1"})
    waited_s = time.monotonic() - started
    assert status == 503
    assert body["error"]["code"] == "overloaded"
    assert body["error"]["request_id"] == "shed-1" == headers["x-request-id"]
    assert int(headers["retry-after"]) >= 1
    assert waited_s < 2.0, "a shed request must not wait for a slot"
    assert upstream.calls == MAX_IN_FLIGHT  # nothing of the refused request reached the upstream
    for future in held:
        assert future.result()[0] == 200  # nothing in flight failed
    assert total(scrape(small_service), "llm_rejected_total", reason="overloaded") == 1
    assert small_service.generate({"prompt": "room again"})[0] == 200


@pytest.mark.e2e
def test_probes_are_never_shed(small_service: Service, upstream: FakeOpenAI) -> None:
    held = hold_in_flight(small_service, upstream, MAX_IN_FLIGHT, delay_s=2.0)
    assert small_service.request("GET", "/health")[0] == 200
    assert small_service.request("GET", "/ready")[0] == 200
    assert small_service.request("GET", "/metrics")[0] == 200
    assert small_service.generate({"prompt": "x"})[0] == 503  # the worker is indeed full
    assert [future.result()[0] for future in held] == [200] * MAX_IN_FLIGHT


@pytest.mark.e2e
def test_a_body_that_trickles_in_is_refused_408(small_service: Service) -> None:
    with socket.create_connection(("127.0.0.1", small_service.port), timeout=10) as sock:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head + b'{"prompt":')  # 10 of the 100 bytes, then nothing
        response = http.client.HTTPResponse(sock)  # the head and the body may come in separate packets
        response.begin()
        status, body = response.status, response.read()
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.e2e
def test_slowloris_headers_are_cut_off_and_others_still_served(small_service: Service) -> None:
    with socket.create_connection(("127.0.0.1", small_service.port), timeout=20) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 15:
            assert small_service.request("GET", "/health", timeout_s=5)[0] == 200
            try:
                sock.sendall(b"X")  # one more header byte, never a complete header block
            except OSError:
                closed = True
                break
            sock.settimeout(0.5)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed, "the server kept a connection that never finished its headers"
        assert time.monotonic() - started < 10  # keepalive (5 s) bounds reading the headers


@pytest.mark.e2e
def test_a_connection_opened_during_sigterm_is_refused_not_reset(small_service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok("finished", delay_s=2.0))
    caller, result = generate_in_background(small_service, {"prompt": "Hi"})
    time.sleep(0.5)
    assert small_service.process is not None
    small_service.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        status = small_service.request("GET", "/health", timeout_s=10)[0]
    except ConnectionRefusedError:
        status = None  # refused at once: a load balancer retries elsewhere
    assert status in (None, 200), "a connection accepted during shutdown must be answered"
    caller.join(10)
    assert result["answer"][0] == 200  # the request in flight finished
    assert small_service.process.wait(15) == 0


def test_secret_looking_query_values_are_redacted() -> None:
    line = "GET /usage?api_key=sk-1&model=gpt&token=abc&x_Secret=s&password=p&access%5Ftoken=q HTTP/1.1"
    redacted = redact_query(line)
    for secret in ("sk-1", "=abc", "=s&", "=p&", "=q "):
        assert secret not in redacted
    assert "model=gpt" in redacted and redacted.count("[REDACTED]") == 5


@pytest.mark.e2e
@pytest.mark.parametrize("access_log", ["", "1"])
def test_access_log_is_off_by_default_and_never_holds_query_secrets(
    upstream: FakeOpenAI, tmp_path: Path, access_log: str
) -> None:
    env = upstream_env(upstream, ACCESS_LOG=access_log, METRICS_TOKEN="scrape-me")
    with Service(env, tmp_path / "service.log") as service:
        service.request("GET", "/usage?api_key=query-secret-1&days=1")
        service.request("GET", "/metrics?token=query-secret-2", headers={"Authorization": "Bearer scrape-me"})
        service.stop()
        access = [r for r in service.log_records() if r.get("logger") == "gunicorn.access"]
        text = service.log_path.read_text()
    assert "query-secret-1" not in text and "query-secret-2" not in text
    if not access_log:
        assert access == []
    else:
        assert any("/usage?api_key=[REDACTED]&days=1" in r["message"] for r in access)


@pytest.mark.e2e
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_metrics_from_two_workers_on_an_upstream(upstream: FakeOpenAI, tmp_path: Path, worker_class: str) -> None:
    env = upstream_env(upstream, WEB_CONCURRENCY="2", WORKER_CLASS=worker_class)
    with Service(env, tmp_path / "service.log") as service:
        for _ in range(6):
            assert service.generate({"prompt": "Hi"})[0] == 200
        assert total(scrape(service), "llm_requests_total", endpoint="/generate", status_code="200") == 6


@pytest.mark.e2e
@pytest.mark.local_model
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_metrics_from_two_workers_on_the_local_model(tmp_path: Path, worker_class: str) -> None:
    env = {"WORKER_CLASS": worker_class, "WEB_CONCURRENCY": "2", "LOCAL_THREADS": "1"}
    with Service(env, tmp_path / "service.log") as service:
        for _ in range(4):
            assert service.generate({"prompt": "Hi", "max_tokens": 4})[0] == 200
        samples = scrape(service)
        assert total(samples, "llm_requests_total", endpoint="/generate", status_code="200") == 4
        assert total(samples, "llm_upstream_attempts_total", provider="local", outcome="ok") == 4


@pytest.mark.e2e
@pytest.mark.local_model
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_the_local_model_never_blocks_other_requests_of_its_worker(tmp_path: Path, worker_class: str) -> None:
    env = {"WORKER_CLASS": worker_class, "WEB_CONCURRENCY": "1", "LOCAL_THREADS": "1"}
    with Service(env, tmp_path / "service.log") as service:
        events: list[tuple[str, float]] = []

        def stream() -> None:
            conn = socket.create_connection(("127.0.0.1", service.port), timeout=60)
            body = json.dumps({"prompt": "Tell me a long story about a cat.", "max_tokens": 300, "stream": True})
            conn.sendall(
                f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
            )
            with conn, conn.makefile("rb") as answer:
                for line in answer:
                    if line.startswith(b"event: delta") and not events:
                        events.append(("first_delta", time.monotonic()))
                    if line.startswith(b"event: done"):
                        events.append(("done", time.monotonic()))

        reader = threading.Thread(target=stream)
        reader.start()
        while not events and reader.is_alive():
            time.sleep(0.01)
        assert service.request("GET", "/health", timeout_s=30)[0] == 200
        health_answered = time.monotonic()
        reader.join(60)
        assert [name for name, _ in events] == ["first_delta", "done"]
        assert health_answered < events[1][1], "/health waited for the model to finish"

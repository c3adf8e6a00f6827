"""Server-Sent Events from /generate: in-process for the contract, over a socket for timing and disconnects."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.config import Settings
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import Service

STREAM = {"prompt": "Say hello.", "stream": True}


def parse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_stream_sends_deltas_then_done_with_exact_usage(client: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream(["Hel", "lo", " world"], prompt_tokens=2000, completion_tokens=3, cached_tokens=1000))
    response = client.post("/generate", json=STREAM)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    events = parse_events(response.get_data(as_text=True))
    assert events[:3] == [("delta", {"delta": "Hel"}), ("delta", {"delta": "lo"}), ("delta", {"delta": " world"})]
    name, done = events[3]
    assert name == "done" and len(events) == 4
    assert done["output"] == "Hello world"
    assert done["request_id"] == response.headers["X-Request-ID"]
    meta = done["metadata"]
    assert meta["tokens"] == {"input": 2000, "output": 3, "total": 2003, "cached_input": 1000}
    assert meta["cost_usd"] == pytest.approx((1000 * 0.15 + 1000 * 0.075 + 3 * 0.60) / 1e6)
    assert (meta["provider"], meta["finish_reason"], meta["attempts"]) == ("openai", "stop", 1)
    assert upstream.requests[0].body["stream"] is True
    assert upstream.requests[0].body["stream_options"] == {"include_usage": True}


def test_finished_streams_keep_their_upstream_connection(
    make_settings: Callable[..., Settings], upstream: FakeOpenAI
) -> None:
    # The SDK stops reading at [DONE] and closes, before the chunked body's last bytes, which dropped the
    # connection: every stream opened a new one (a TLS handshake against a real upstream). MAX_IN_FLIGHT=32
    # gives one connection pool, so a kept connection serves every call.
    client = create_app(make_settings(max_in_flight=32)).test_client()
    for _ in range(3):
        upstream.enqueue(fake.stream(["Hel", "lo"]))
        assert parse_events(client.post("/generate", json=STREAM).get_data(as_text=True))[-1][0] == "done"
    client.post("/generate", json={"prompt": "Say hello."})
    assert len({seen.client_port for seen in upstream.requests}) == 1


def test_invalid_stream_request_is_an_ordinary_json_error(client: FlaskClient, upstream: FakeOpenAI) -> None:
    for payload in ({"prompt": "", "stream": True}, {"prompt": "Hi", "stream": "yes"}):
        response = client.post("/generate", json=payload)
        assert response.status_code == 400
        assert response.mimetype == "application/json"
        assert response.get_json()["error"]["code"] == "invalid_request"
    assert upstream.calls == 0


def test_failures_before_the_first_delta_are_retried(client: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.status(500), fake.stream(["x"], fail_after=0), fake.stream(["ok"]))
    response = client.post("/generate", json=STREAM)
    events = parse_events(response.get_data(as_text=True))
    assert [name for name, _ in events] == ["delta", "done"]
    assert events[-1][1]["metadata"]["attempts"] == 3
    assert upstream.calls == 3


def test_retries_spent_before_the_first_delta_give_a_json_error(client: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(*(fake.status(429, headers={"retry-after-ms": "1"}) for _ in range(4)))
    response = client.post("/generate", json=STREAM)
    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "upstream_rate_limited"
    assert "Retry-After" in response.headers
    assert upstream.calls == 4


def test_failure_after_text_ends_with_an_error_event_and_no_retry(client: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream(["one ", "two ", "three"], fail_after=2), fake.stream(["never"]))
    response = client.post("/generate", json=STREAM)
    assert response.status_code == 200
    events = parse_events(response.get_data(as_text=True))
    assert [name for name, _ in events] == ["delta", "delta", "error"]
    error = events[-1][1]["error"]
    assert error["code"] == "upstream_error"
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert upstream.calls == 1


def test_stall_after_text_is_cut_by_the_idle_timeout(
    make_settings: Callable[..., Settings], upstream: FakeOpenAI
) -> None:
    client = create_app(make_settings(timeout_s=0.3)).test_client()
    upstream.enqueue(fake.stream(["a", "b"], interval_s=2.0))
    started = time.monotonic()
    events = parse_events(client.post("/generate", json=STREAM).get_data(as_text=True))
    assert [name for name, _ in events] == ["delta", "error"]
    assert events[-1][1]["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 1.5


def test_stream_summary_log_line(client: FlaskClient, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    upstream.enqueue(fake.stream(["a", "b"], prompt_tokens=5, completion_tokens=2))
    caplog.set_level("INFO", logger="llm_service.request")
    client.post("/generate", json=STREAM).get_data()
    (record,) = [r for r in caplog.records if r.name == "llm_service.request"]
    assert record.status == 200
    assert record.stream is True
    assert record.time_to_first_token_ms >= 0
    assert (record.tokens_input, record.tokens_output, record.response_length) == (5, 2, 2)


# --- over a real socket, against the Procfile's gunicorn ---


@pytest.fixture
def service(upstream: FakeOpenAI, tmp_path: Path) -> Iterator[Service]:
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url, "WEB_CONCURRENCY": "2", "THREADS": "16"}
    with Service(env, tmp_path / "service.log") as running:
        yield running


def open_stream(service: Service, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def next_event(response: Any) -> tuple[str, dict[str, Any]]:
    lines = []
    while True:
        line = response.readline().decode().rstrip("\n")
        if not line:
            break
        lines.append(line)
    fields = dict(line.split(": ", 1) for line in lines)
    return fields["event"], json.loads(fields["data"])


@pytest.mark.e2e
def test_deltas_arrive_before_the_upstream_has_finished(service: Service, upstream: FakeOpenAI) -> None:
    chunks = [f"w{i} " for i in range(6)]
    upstream.enqueue(fake.stream(chunks, interval_s=0.4, prompt_tokens=9, completion_tokens=6))
    started = time.monotonic()
    conn, response = open_stream(service, STREAM)
    assert response.status == 200
    first = next_event(response)
    first_at_s = time.monotonic() - started
    assert first == ("delta", {"delta": "w0 "})
    assert first_at_s < 1.0  # the upstream needs 2.4 s to finish
    rest = [next_event(response) for _ in range(6)]
    conn.close()
    assert [name for name, _ in rest] == ["delta"] * 5 + ["done"]
    done = rest[-1][1]
    assert done["output"] == "".join(chunks)
    assert done["metadata"]["tokens"] == {"input": 9, "output": 6, "total": 15}
    assert done["metadata"]["cost_usd"] == pytest.approx((9 * 0.15 + 6 * 0.60) / 1e6)


@pytest.mark.e2e
def test_mid_stream_failure_yields_an_error_event(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream(["a", "b", "c"], fail_after=1))
    conn, response = open_stream(service, STREAM)
    events = [next_event(response), next_event(response)]
    conn.close()
    assert [name for name, _ in events] == ["delta", "error"]
    assert events[1][1]["error"]["code"] == "upstream_error"


@pytest.mark.e2e
def test_client_disconnect_closes_the_upstream_stream(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream([f"t{i}" for i in range(100)], interval_s=0.1))
    conn, response = open_stream(service, STREAM)
    assert next_event(response)[0] == "delta"
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    closed_at = time.monotonic()
    assert upstream.requests[0].disconnected.wait(5), "the upstream stream was left open"
    assert time.monotonic() - closed_at < 3  # 100 chunks would take 10 s
    service.stop()
    (summary,) = [r for r in service.log_records() if r.get("logger") == "llm_service.request" and r.get("stream")]
    assert summary["status"] == "client_closed"


@pytest.mark.e2e
def test_many_open_streams_do_not_starve_other_requests(service: Service, upstream: FakeOpenAI) -> None:
    streams = 20
    upstream.enqueue(*(fake.stream([f"s{i}" for i in range(40)], interval_s=0.1) for _ in range(streams)))
    opened = []
    for _ in range(streams):
        conn, response = open_stream(service, STREAM)
        opened.append(conn)
        assert next_event(response)[0] == "delta"
    try:
        upstream.default = fake.ok("quick")
        with ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            statuses = list(pool.map(lambda _: service.generate({"prompt": "Hi"}, timeout_s=5)[0], range(8)))
            elapsed_s = time.monotonic() - started
        assert statuses == [200] * 8
        assert elapsed_s < 2
        assert service.request("GET", "/health", timeout_s=2)[0] == 200
    finally:
        for conn in opened:
            conn.close()

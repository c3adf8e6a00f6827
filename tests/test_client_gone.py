"""A plain (non-streamed) request whose client closes its connection stops: over real sockets, on both workers."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from llm_service.providers.base import GenerationParams
from llm_service.quotas import estimate_input_tokens
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.routing_support import Upstreams
from tests.servers import Service
from tests.test_greenlets import run_patched
from tests.test_observability import scrape, total
from tests.test_quotas import clear_of_minute_boundary
from tests.test_redis_limits import SHARED_REDIS
from tests.test_routing_e2e import service_env as routing_env

WORKERS = ["gevent", "gthread"]
CUT_AFTER_S = 0.5
UPSTREAM_DELAY_S = 5.0  # the slow upstream's answer; a cut call must end well before it


def api_key() -> tuple[str, str]:
    """Return API_KEYS naming one fresh client, and its key: counters of earlier runs never count here."""
    name = f"gone{uuid.uuid4().hex[:8]}"
    secret = f"sk-{name}-0123456789"
    return f"{name}={secret}", secret


def send(sock: socket.socket, path: str, body: dict[str, Any], key: str) -> None:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {key}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)


def post_and_leave(service: Service, path: str, body: dict[str, Any], key: str) -> float:
    """Send a request, close the connection CUT_AFTER_S later, unanswered; return when it was closed."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    send(sock, path, body, key)
    time.sleep(CUT_AFTER_S)
    sock.close()
    return time.monotonic()


def read_response(reader: BinaryIO) -> tuple[int, dict[str, Any]]:
    """Read one HTTP/1.1 response with a Content-Length body; return its status and JSON body."""
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, json.loads(reader.read(length))


def summaries(service: Service, timeout_s: float = 5.0, count: int = 1) -> list[dict[str, Any]]:
    """Wait for `count` summary lines of generation requests; return them all."""
    end = time.monotonic() + timeout_s
    while True:
        lines = [
            r
            for r in service.log_records()
            if r.get("logger") == "llm_service.request" and r.get("path") in ("/generate", "/v1/chat/completions")
        ]
        if len(lines) >= count or time.monotonic() > end:
            return lines
        time.sleep(0.05)


def usage(service: Service, key: str) -> dict[str, Any]:
    status, _, raw = service.request("GET", "/usage", headers={"X-API-Key": key})
    assert status == 200
    return json.loads(raw)  # type: ignore[no-any-return]


@pytest.fixture
def slow_upstream() -> Iterator[FakeOpenAI]:
    upstream = FakeOpenAI().start()
    upstream.default = fake.ok(delay_s=UPSTREAM_DELAY_S)  # closes its side as soon as its caller does
    yield upstream
    upstream.stop()


def upstream_env(upstream: FakeOpenAI, worker: str, keys: str, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": upstream.url,
        "WEB_CONCURRENCY": "1",
        "WORKER_CLASS": worker,
        "THREADS": "8",
        "API_KEYS": keys,
        "DAILY_BUDGET_USD": "1",
        "TOKEN_LIMIT": "100000",
        **extra,
    }


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("worker", "path", "redis_url"),
    [
        ("gevent", "/generate", None),
        ("gthread", "/generate", None),
        ("gevent", "/v1/chat/completions", SHARED_REDIS),
        ("gthread", "/v1/chat/completions", SHARED_REDIS),
    ],
)
def test_a_client_that_leaves_closes_the_upstream_call(
    slow_upstream: FakeOpenAI, tmp_path: Path, worker: str, path: str, redis_url: str | None
) -> None:
    keys, key = api_key()
    extra = {"REDIS_URL": redis_url} if redis_url else {}
    body: dict[str, Any] = {"max_tokens": 200}
    if path == "/generate":
        body["prompt"] = "Tell me a long story."
        params = GenerationParams.from_prompt(body["prompt"], model="gpt-4o-mini", max_tokens=200)
    else:
        body.update(model="gpt-4o-mini", messages=[{"role": "user", "content": "Tell me a long story."}])
        params = GenerationParams.from_prompt("Tell me a long story.", model="gpt-4o-mini", max_tokens=200)
    with Service(upstream_env(slow_upstream, worker, keys, **extra), tmp_path / "service.log") as service:
        closed_at = post_and_leave(service, path, body, key)
        assert slow_upstream.requests[0].disconnected.wait(UPSTREAM_DELAY_S), "the upstream call ran on"
        assert time.monotonic() - closed_at < 1.5  # the upstream would have answered 4.5 s later
        (summary,) = summaries(service)
        assert summary["status"] == "client_closed" and "error_code" not in summary
        assert summary["cache"] == "bypass"  # as a cut stream says how the cache took part (sampled: not cached)
        assert summary["latency_ms"] < 1500
        # The answer never came, so its size is unknown: it is charged as reserved (prompt estimate + max_tokens).
        input_tokens = estimate_input_tokens(params)
        cost_usd = (input_tokens * 0.15 + 200 * 0.60) / 1e6  # gpt-4o-mini's prices per million tokens
        assert summary["tokens_estimated"] == input_tokens + 200
        assert summary["cost_usd_estimated"] == pytest.approx(cost_usd)
        spent = usage(service, key)
        assert spent["spend_usd_today"] == pytest.approx(cost_usd)
        metrics = scrape(service)
        assert total(metrics, "llm_requests_total", status_code="client_closed") == 1
        assert total(metrics, "llm_upstream_attempts_total", outcome="client_closed") == 1
        assert total(metrics, "llm_in_flight_requests") == 1  # the scrape itself
        # The worker serves the next request on a fresh upstream connection.
        slow_upstream.default = fake.ok("next")
        assert service.request("POST", path, body, headers={"X-API-Key": key}, timeout_s=5)[0] == 200
    assert slow_upstream.calls == 2


@pytest.mark.e2e
@pytest.mark.parametrize("worker", WORKERS)
def test_a_client_that_stays_or_pipelines_is_answered(slow_upstream: FakeOpenAI, tmp_path: Path, worker: str) -> None:
    keys, key = api_key()
    slow_upstream.default = fake.ok("slow answer", delay_s=1.0)
    with Service(upstream_env(slow_upstream, worker, keys), tmp_path / "service.log") as service:
        status, answer, _ = service.generate({"prompt": "Hi"}, headers={"X-API-Key": key}, timeout_s=10)
        assert (status, answer["output"]) == (200, "slow answer")
        # A second request sent on the same connection while the first is being made: data, not an end.
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            send(sock, "/generate", {"prompt": "first"}, key)
            time.sleep(CUT_AFTER_S)
            send(sock, "/generate", {"prompt": "second"}, key)
            reader = sock.makefile("rb")
            first, second = read_response(reader), read_response(reader)
        assert [first[0], second[0]] == [200, 200]
        assert first[1]["output"] == second[1]["output"] == "slow answer"
        assert [line["status"] for line in summaries(service, count=3)] == [200, 200, 200]
    assert not any(seen.disconnected.is_set() for seen in slow_upstream.requests)


@pytest.fixture
def local_model() -> None:
    pytest.importorskip("llama_cpp", reason="the local model is installed by `make test`")


@pytest.mark.e2e
@pytest.mark.local_model
@pytest.mark.parametrize("worker", WORKERS)
def test_a_client_that_leaves_frees_the_local_model_for_the_next_request(
    local_model: None, tmp_path: Path, worker: str
) -> None:
    keys, key = api_key()
    env = {
        "WEB_CONCURRENCY": "1",
        "WORKER_CLASS": worker,
        "THREADS": "8",
        "LOCAL_THREADS": "1",
        "CACHE_MODE": "off",
        "API_KEYS": keys,
        "TOKEN_LIMIT": "100000",
    }
    # At temperature 0 this answer is 651 tokens long: 14 s of this machine's model thread, when left to run.
    long = {"prompt": "Write a long essay on the history of Rome.", "max_tokens": 1500, "temperature": 0}
    with Service(env, tmp_path / "service.log") as service:
        clear_of_minute_boundary()  # the token counts below share one window
        post_and_leave(service, "/generate", long, key)
        started = time.monotonic()
        hi = {"prompt": "Hi", "max_tokens": 4}
        status, answer, _ = service.generate(hi, headers={"X-API-Key": key}, timeout_s=30)
        waited_s = time.monotonic() - started
        assert status == 200
        assert waited_s < 3, f"the next request waited {waited_s:.1f} s behind the abandoned generation"
        cut, answered = summaries(service, count=2)
        assert cut["status"] == "client_closed" and answered["status"] == 200
        # Charged what the model really used before it stopped: its prompt and the tokens it made, not 1,500.
        params = GenerationParams.from_prompt(long["prompt"], model="smollm2-135m-instruct", max_tokens=1500)
        assert 0 < cut["tokens_estimated"] < estimate_input_tokens(params) + 1500 - 1000
        assert usage(service, key)["tokens"]["used"] == cut["tokens_estimated"] + answer["metadata"]["tokens"]["total"]
        metrics = scrape(service)
        assert total(metrics, "llm_requests_total", status_code="client_closed") == 1
        assert total(metrics, "llm_upstream_attempts_total", outcome="client_closed") == 1


def test_watching_leaves_no_watcher_behind_however_the_block_ends() -> None:
    # Thousands of watched blocks under gevent, ended every way: normally, by an error, by the client
    # leaving (ClientGone raised in the block), by a pipelined request; no watcher stays active after.
    out = run_patched(
        """
        import gc
        import socket
        import gevent
        import greenlet
        from llm_service.client_watch import ClientGone, ClientWatch

        loop = gevent.get_hub().loop

        def greenlets():
            return sum(isinstance(o, greenlet.greenlet) for o in gc.get_objects())

        def one(kind):
            server, client = socket.socketpair()
            try:
                with ClientWatch(server):
                    if kind == "gone":
                        client.close()
                    elif kind == "data":
                        client.sendall(b"GET / HTTP/1.1\\r\\n")
                    elif kind == "error":
                        raise ValueError
                    gevent.sleep(0.001 if kind != "gone" else 5)
                return "ok"
            except ClientGone:
                return "gone"
            except ValueError:
                return "error"
            finally:
                server.close()
                client.close()

        gevent.sleep(0)
        before = (loop.activecnt, greenlets())
        results = [one(kind) for _ in range(500) for kind in ("plain", "gone", "data", "error")]
        gc.collect()
        print(sorted(set(results)), results.count("gone"), before == (loop.activecnt, greenlets()))
        """
    )
    assert out == "['error', 'gone', 'ok'] 500 True"


@pytest.mark.e2e
@pytest.mark.parametrize("redis_url", [None, SHARED_REDIS])
def test_a_probe_whose_client_leaves_gives_the_probe_back(
    upstreams: Upstreams, tmp_path: Path, redis_url: str | None
) -> None:
    # An open circuit lets one request probe the upstream; if that request's client leaves, the probe says
    # nothing of the upstream. Before, its claim was held until it lapsed (TIMEOUT + 1 s): 503s meanwhile.
    env = {
        **routing_env(upstreams, CIRCUIT_FAILURES="1", CIRCUIT_RESET_S="0.5", WEB_CONCURRENCY="1"),
        "REDIS_URL": redis_url or "",
    }
    lonely = {"prompt": "Say hello.", "model": "lonely"}  # no fallback: the circuit's verdict is the answer
    upstreams.primary.default = fake.status(500)
    with Service(env, tmp_path / "service.log") as service:
        assert service.generate(lonely)[0] == 502  # the circuit opens
        assert service.generate(lonely)[0] == 503
        time.sleep(0.6)  # past CIRCUIT_RESET_S: the next request is the probe
        upstreams.primary.default = fake.ok(delay_s=UPSTREAM_DELAY_S)
        post_and_leave(service, "/generate", lonely, "")
        assert upstreams.primary.requests[-1].disconnected.wait(UPSTREAM_DELAY_S), "the probe ran on"
        upstreams.primary.default = fake.ok("recovered")
        status, answer, _ = service.generate(lonely, timeout_s=5)
        assert (status, answer.get("output")) == (200, "recovered")  # a new probe went out, and closed the circuit
        assert json.loads(service.request("GET", "/ready")[2])["circuits"][upstreams.primary_name] == "closed"

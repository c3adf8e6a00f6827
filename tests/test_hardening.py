"""What a security sweep found (issue 9): bad inputs, lying upstreams and probes, against the Procfile's gunicorn."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import Service, free_port
from tests.test_observability import scrape, total

pytestmark = pytest.mark.e2e

MAX_RETRIES = 2
BASE_URL_PASSWORD = "base-url-password-must-never-be-logged"


@pytest.fixture(scope="module")
def module_upstream() -> Iterator[FakeOpenAI]:
    upstream = FakeOpenAI().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def upstream(module_upstream: FakeOpenAI) -> FakeOpenAI:
    """The module's fake upstream, with no replies left over from an earlier test."""
    module_upstream.script.clear()
    module_upstream.requests.clear()
    module_upstream.default = fake.ok()
    return module_upstream


@pytest.fixture(scope="module")
def service(module_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {
        "OPENAI_API_KEY": "sk-test",
        # Credentials in the URL, as some gateways take them: they must never reach the log.
        "OPENAI_BASE_URL": module_upstream.url.replace("http://", f"http://gateway-user:{BASE_URL_PASSWORD}@"),
        "WEB_CONCURRENCY": "1",  # one worker, so /usage reads the counters every request wrote to
        "THREADS": "8",
        "MAX_RETRIES": str(MAX_RETRIES),
        "RETRY_DELAY": "0.01",
        "RETRY_MAX_DELAY": "0.02",
        "DEADLINE": "5",
        "RATE_LIMIT": "1000/minute",
    }
    with Service(env, tmp_path_factory.mktemp("hardening") / "service.log") as running:
        yield running


def post_raw(service: Service, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST `body` to /generate as it is, for bodies json.dumps cannot write."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def records_of(service: Service, request_id: str) -> list[dict[str, Any]]:
    return [r for r in service.log_records() if r.get("request_id") == request_id]


def test_unpaired_surrogates_are_refused_before_the_upstream(service: Service, upstream: FakeOpenAI) -> None:
    before = scrape(service)
    for body, field in (({"prompt": "hi \udfff"}, "prompt"), ({"prompt": "hi", "system": "\ud800 be brief"}, "system")):
        status, answer, _ = service.generate(body)  # json.dumps writes the surrogate as a \\udXXX escape
        assert (status, answer["error"]["code"]) == (400, "invalid_request")
        assert field in answer["error"]["details"]
    assert upstream.calls == 0
    assert total(scrape(service), "llm_upstream_attempts_total") == total(before, "llm_upstream_attempts_total")

    status, _, _ = service.generate({"prompt": "a pair is fine: \U0001f600"})  # sent as \\ud83d\\ude00
    assert status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"prompt": "hi", "model": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
    ],
    ids=["array", "in-prompt", "in-model"],
)
def test_deeply_nested_json_is_a_400_without_a_traceback(service: Service, upstream: FakeOpenAI, raw: bytes) -> None:
    status, answer = post_raw(service, raw)
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    records = records_of(service, answer["error"]["request_id"])
    assert [r["status"] for r in records if r.get("logger") == "llm_service.request"] == [400]
    assert not [r for r in records if r["level"] == "ERROR" or "exc_info" in r]
    assert upstream.calls == 0


@pytest.mark.parametrize("value", [1, 0, 1.0, 0.0, "true", "false", [], None])
def test_stream_accepts_only_true_or_false(service: Service, upstream: FakeOpenAI, value: Any) -> None:
    status, answer, _ = service.generate({"prompt": "Hi", "stream": value})
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert "stream" in answer["error"]["details"]
    assert upstream.calls == 0


def test_stream_false_and_true_still_work(service: Service, upstream: FakeOpenAI) -> None:
    assert service.generate({"prompt": "Hi", "stream": False})[0] == 200
    upstream.enqueue(fake.stream(["Hel", "lo"]))
    status, headers, raw = service.request("POST", "/generate", {"prompt": "Hi", "stream": True})
    assert (status, headers["content-type"]) == (200, "text/event-stream; charset=utf-8")
    assert b"event: done" in raw


def test_a_stream_answered_with_plain_json_is_an_upstream_error(service: Service, upstream: FakeOpenAI) -> None:
    upstream.default = fake.ok("not an event stream")  # Content-Type: application/json, no SSE events
    status, headers, raw = service.request("POST", "/generate", {"prompt": "Hi", "stream": True})
    assert (status, headers["content-type"]) == (502, "application/json")
    answer = json.loads(raw)
    assert answer["error"]["code"] == "upstream_error"
    assert upstream.calls == MAX_RETRIES + 1  # retried like any unreadable body

    upstream.enqueue(fake.ok("still not a stream"))  # and the retry recovers when the next answer streams
    upstream.default = fake.stream(["Hel", "lo"])
    status, _, raw = service.request("POST", "/generate", {"prompt": "Hi", "stream": True})
    assert status == 200 and b'"output":"Hello"' in raw


def spend_usd(service: Service) -> float:
    status, _, raw = service.request("GET", "/usage")
    assert status == 200
    return float(json.loads(raw)["spend_usd_today"])


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt_tokens": -100_000},
        {"completion_tokens": -5},
        {"completion_tokens": 1.5},
        {"prompt_tokens": 10, "cached_tokens": 20},
    ],
    ids=["negative-input", "negative-output", "fractional", "cached-above-input"],
)
def test_invalid_upstream_usage_is_a_bad_body(service: Service, upstream: FakeOpenAI, bad: dict[str, Any]) -> None:
    spent_before = spend_usd(service)
    tokens_before = total(scrape(service), "llm_tokens_total")
    upstream.default = fake.ok(**bad)
    status, answer, _ = service.generate({"prompt": "Hi"})
    assert (status, answer["error"]["code"]) == (502, "upstream_error")
    assert upstream.calls == MAX_RETRIES + 1
    samples = scrape(service)
    assert total(samples, "llm_in_flight_requests") == 1  # only this scrape: nothing leaked
    assert total(samples, "llm_tokens_total") == tokens_before
    assert spend_usd(service) == spent_before

    upstream.enqueue(fake.ok(**bad))  # one bad body, then a good one: retried, and priced as reported
    upstream.default = fake.ok(prompt_tokens=1000, completion_tokens=100)
    status, answer, _ = service.generate({"prompt": "Hi"})
    assert (status, answer["metadata"]["attempts"], answer["metadata"]["tokens"]["total"]) == (200, 2, 1100)
    assert spend_usd(service) == pytest.approx(spent_before + answer["metadata"]["cost_usd"])


@pytest.mark.parametrize("header", ["Retry-After", "retry-after-ms"])
def test_an_upstream_retry_after_is_bounded(service: Service, upstream: FakeOpenAI, header: str) -> None:
    upstream.default = fake.status(429, headers={header: "1e308"})
    status, answer, headers = service.generate({"prompt": "Hi"})
    assert (status, answer["error"]["code"]) == (429, "upstream_rate_limited")
    assert headers["retry-after"] == "86400"  # a day, not a 309-digit number
    assert upstream.calls == 1  # a wait past the deadline is never started


def test_probes_stay_out_of_the_request_metrics(service: Service, upstream: FakeOpenAI) -> None:
    def counted(samples: dict[str, list]) -> float:
        return sum(total(samples, "llm_requests_total", endpoint=e) for e in ("/generate", "/health", "unmatched"))

    before = scrape(service)
    for method, path in (("OPTIONS", "/generate"), ("OPTIONS", "/health"), ("HEAD", "/health"), ("OPTIONS", "/x")):
        for _ in range(3):
            status, _, _ = service.request(method, path)
            assert status < 500
    assert counted(scrape(service)) == counted(before)
    assert service.generate({"prompt": "Hi"})[0] == 200
    after = scrape(service)
    assert counted(after) == counted(before) + 1  # real traffic still counts
    assert (
        total(after, "llm_requests_total", endpoint="/generate", status_code="200")
        == total(before, "llm_requests_total", endpoint="/generate", status_code="200") + 1
    )
    assert not [r for r in service.log_records() if r.get("method") in ("OPTIONS", "HEAD")]  # DEBUG, not INFO


def test_credentials_in_the_base_url_are_never_logged(service: Service, upstream: FakeOpenAI) -> None:
    assert service.generate({"prompt": "Hi"})[0] == 200  # the URL with credentials is used as given
    configured = [r for r in service.log_records() if r.get("message") == "service configured"]
    assert configured and all(r["openai_base_url"].startswith("http://***@127.0.0.1:") for r in configured)
    text = "\n".join(service.log_lines())
    assert BASE_URL_PASSWORD not in text and "gateway-user" not in text


@pytest.mark.parametrize("fail_open", ["true", "false"])
def test_usage_with_redis_down_is_503_limiter_unavailable(upstream: FakeOpenAI, tmp_path: Path, fail_open: str) -> None:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": upstream.url,
        "WEB_CONCURRENCY": "1",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        "RATE_LIMIT_FAIL_OPEN": fail_open,
    }
    with Service(env, tmp_path / "service.log") as down:
        status, headers, raw = down.request("GET", "/usage")
        assert (status, json.loads(raw)["error"]["code"]) == (503, "limiter_unavailable")
        assert int(headers["retry-after"]) >= 1
        expected = 200 if fail_open == "true" else 503  # /generate serves without limits only when failing open
        assert down.generate({"prompt": "Hi"})[0] == expected
        down.stop()
        assert not [r for r in down.log_records() if "exc_info" in r]

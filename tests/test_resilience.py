"""Faults injected at the HTTP layer; the real openai client and the real retry loop run."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.config import Settings
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI

PROMPT = {"prompt": "Say hello."}


def post(client: FlaskClient) -> tuple[int, dict, dict]:
    response = client.post("/generate", json=PROMPT)
    return response.status_code, response.get_json(), dict(response.headers)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (lambda: fake.status(429), 429, "upstream_rate_limited"),
        (lambda: fake.status(500), 502, "upstream_error"),
        (lambda: fake.status(502), 502, "upstream_error"),
        (lambda: fake.status(503), 502, "upstream_error"),
        (lambda: fake.status(409), 502, "upstream_error"),
        (lambda: fake.status(408), 504, "upstream_timeout"),
        (fake.reset, 502, "upstream_error"),
        (fake.bad_json, 502, "upstream_error"),
    ],
)
def test_retryable_fault_is_tried_max_retries_plus_one_times(
    client: FlaskClient, upstream: FakeOpenAI, fault: Callable[[], fake.Reply], status: int, code: str
) -> None:
    upstream.enqueue(*(fault() for _ in range(10)))
    got_status, body, _ = post(client)
    assert (got_status, body["error"]["code"]) == (status, code)
    assert upstream.calls == 4  # MAX_RETRIES=3 after the first attempt


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (lambda: fake.status(429, "insufficient_quota"), 503, "upstream_quota_exceeded"),
        (lambda: fake.status(401), 502, "upstream_auth_error"),
        (lambda: fake.status(403), 502, "upstream_auth_error"),
        (lambda: fake.status(400, "context_length_exceeded"), 400, "upstream_rejected"),
        (lambda: fake.status(422), 400, "upstream_rejected"),
        (lambda: fake.status(404), 502, "upstream_error"),
    ],
)
def test_final_fault_is_not_retried(
    client: FlaskClient, upstream: FakeOpenAI, fault: Callable[[], fake.Reply], status: int, code: str
) -> None:
    upstream.enqueue(fault(), fake.ok())
    got_status, body, _ = post(client)
    assert (got_status, body["error"]["code"]) == (status, code)
    assert upstream.calls == 1


@pytest.mark.parametrize("fault", [lambda: fake.status(429), lambda: fake.status(500), fake.reset, fake.bad_json])
def test_transient_fault_then_success(client: FlaskClient, upstream: FakeOpenAI, fault: Callable) -> None:
    upstream.enqueue(fault(), fault(), fake.ok("recovered"))
    got_status, body, _ = post(client)
    assert got_status == 200
    assert body["output"] == "recovered"
    assert body["metadata"]["attempts"] == 3
    assert upstream.calls == 3


def test_max_retries_zero_means_one_call(make_settings: Callable[..., Settings], upstream: FakeOpenAI) -> None:
    client = create_app(make_settings(max_retries=0)).test_client()
    upstream.enqueue(fake.status(500), fake.ok())
    assert client.post("/generate", json=PROMPT).status_code == 502
    assert upstream.calls == 1


def test_retry_after_ms_is_honoured(client: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.status(429, headers={"retry-after-ms": "300"}), fake.ok())
    started = time.monotonic()
    got_status, _, _ = post(client)
    assert got_status == 200
    assert time.monotonic() - started >= 0.3
    assert upstream.calls == 2


def test_retry_after_beyond_deadline_answers_429_at_once(
    make_settings: Callable[..., Settings], upstream: FakeOpenAI
) -> None:
    client = create_app(make_settings(deadline_s=2.0)).test_client()
    upstream.enqueue(fake.status(429, headers={"retry-after": "30"}), fake.ok())
    started = time.monotonic()
    got_status, body, headers = post(client)
    assert (got_status, body["error"]["code"]) == (429, "upstream_rate_limited")
    assert headers["Retry-After"] == "30"
    assert time.monotonic() - started < 1.0
    assert upstream.calls == 1


def test_slow_upstream_times_out_per_attempt_then_recovers(
    make_settings: Callable[..., Settings], upstream: FakeOpenAI
) -> None:
    client = create_app(make_settings(timeout_s=0.3, deadline_s=5.0)).test_client()
    upstream.enqueue(fake.ok(delay_s=1.0), fake.ok("fast"))
    got_status, body, _ = post(client)
    assert got_status == 200
    assert body["output"] == "fast"
    assert upstream.calls == 2


def test_dripping_body_is_cut_at_the_deadline(make_settings: Callable[..., Settings], upstream: FakeOpenAI) -> None:
    # Each byte arrives well within TIMEOUT, so only a whole-request deadline can stop this.
    client = create_app(make_settings(timeout_s=30.0, deadline_s=1.0)).test_client()
    upstream.enqueue(fake.drip(0.05))
    started = time.monotonic()
    got_status, body, _ = post(client)
    elapsed_s = time.monotonic() - started
    assert (got_status, body["error"]["code"]) == (504, "upstream_timeout")
    assert 0.9 <= elapsed_s < 1.5
    assert upstream.calls == 1


def test_timeout_on_every_attempt_gives_504(make_settings: Callable[..., Settings], upstream: FakeOpenAI) -> None:
    client = create_app(make_settings(timeout_s=0.2, deadline_s=5.0, max_retries=2)).test_client()
    upstream.enqueue(*(fake.ok(delay_s=0.6) for _ in range(3)))
    got_status, body, _ = post(client)
    assert (got_status, body["error"]["code"]) == (504, "upstream_timeout")
    assert upstream.calls == 3


def test_client_is_reused_across_requests(app, client: FlaskClient, upstream: FakeOpenAI) -> None:
    provider = app.extensions["llm_service"].provider
    first = provider.client()
    for _ in range(3):
        assert post(client)[0] == 200
    assert provider.client() is first
    assert first.max_retries == 0


@pytest.mark.parametrize(
    ("headers", "expected_s"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_forms(headers: dict[str, str], expected_s: float | None) -> None:
    from llm_service.providers.openai_translate import retry_after_s

    assert retry_after_s(headers) == expected_s


def test_retry_after_as_http_date() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from llm_service.providers.openai_translate import retry_after_s

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28 <= (retry_after_s({"retry-after": when}) or 0) <= 30

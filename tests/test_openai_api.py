"""The OpenAI-compatible API in-process: OpenAI's request, response, chunk, error and header shapes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.clients import parse_api_keys
from llm_service.config import Settings
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI

KEY = "openai-sdk-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}


@pytest.fixture
def keyed(make_settings: Callable[..., Settings]) -> Callable[..., FlaskClient]:
    def build(**overrides: Any) -> FlaskClient:
        return create_app(make_settings(api_keys=parse_api_keys(f"sdk={KEY}"), **overrides)).test_client()

    return build


@pytest.fixture
def chat(keyed: Callable[..., FlaskClient]) -> FlaskClient:
    return keyed()


def events(text: str) -> list[Any]:
    """Return the data of each Server-Sent Event, JSON decoded except the final [DONE]."""
    datas = [block.removeprefix("data: ") for block in text.strip().split("\n\n")]
    return [data if data == "[DONE]" else json.loads(data) for data in datas]


def test_completion_has_openai_shape_usage_and_headers(chat: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok("Hello!", prompt_tokens=20, completion_tokens=3, cached_tokens=8))
    response = chat.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["model"] == "gpt-4o-mini"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop", "logprobs": None}
    ]
    assert body["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 3,
        "total_tokens": 23,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert response.headers["x-request-id"]
    assert int(response.headers["openai-processing-ms"]) >= 0
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert response.headers["x-ratelimit-remaining-requests"] == "59"
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in response.headers  # no token limit applies


def test_request_fields_reach_the_upstream(chat: FlaskClient, upstream: FakeOpenAI) -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "Two"}]},
            {"role": "assistant", "content": "Yes?"},
            {"role": "user", "content": "Go on."},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 64,
        "stop": ["\n\n", "END"],
        "seed": 7,
        "user": "end-user-1",
        "n": 1,
        "response_format": {"type": "json_object"},
    }
    assert chat.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    sent = upstream.requests[0].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One\nTwo"},
        {"role": "assistant", "content": "Yes?"},
        {"role": "user", "content": "Go on."},
    ]
    assert (sent["temperature"], sent["top_p"], sent["stop"], sent["seed"]) == (0.2, 0.9, ["\n\n", "END"], 7)
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["max_tokens"] == 64  # a compatible base URL is sent max_tokens
    assert "user" not in sent and "n" not in sent


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_invalid_requests_are_400_naming_the_field(
    chat: FlaskClient, upstream: FakeOpenAI, change: dict[str, Any], param: str | None
) -> None:
    response = chat.post("/v1/chat/completions", json={**CHAT, **change}, headers=AUTH)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == (param or "messages.0.content.0.type")
    assert error["param"] in error["message"]
    assert upstream.calls == 0


def test_max_chars_counts_every_message(keyed: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    client = keyed(max_chars=10)
    messages = [{"role": "system", "content": "x" * 6}, {"role": "user", "content": "y" * 5}]
    response = client.post("/v1/chat/completions", json={**CHAT, "messages": messages}, headers=AUTH)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "messages"
    assert "11 characters" in response.get_json()["error"]["message"]
    assert upstream.calls == 0


def test_unknown_model_is_404_model_not_found(chat: FlaskClient, upstream: FakeOpenAI) -> None:
    asked = "<script>gpt-9</script>" * 100
    response = chat.post("/v1/chat/completions", json={**CHAT, "model": asked}, headers=AUTH)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "model_not_found"
    assert response.get_json()["error"]["param"] == "model"
    assert "script" not in response.get_data(as_text=True)  # the caller's text is never echoed back
    assert upstream.calls == 0
    model_response = chat.get(f"/v1/models/{asked}", headers=AUTH)
    assert model_response.status_code == 404 and "script" not in model_response.get_data(as_text=True)


def test_models_lists_the_allowed_models(keyed: Callable[..., FlaskClient]) -> None:
    client = keyed(allowed_models=("llama3", "qwen2"), default_model="llama3")
    assert client.get("/v1/models").status_code == 401
    body = client.get("/v1/models", headers=AUTH).get_json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [
        ("llama3", "model", "openai"),
        ("qwen2", "model", "openai"),
    ]
    assert all(isinstance(m["created"], int) for m in body["data"])


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_bad_key_is_401_in_openais_shape(chat: FlaskClient, upstream: FakeOpenAI, headers: dict[str, str]) -> None:
    response = chat.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["type"] == "authentication_error"
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert upstream.calls == 0


def test_unknown_path_under_v1_answers_in_openais_shape(chat: FlaskClient) -> None:
    response = chat.get("/v1/embeddings")
    assert response.status_code == 404
    assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}


def test_rate_limit_429_can_be_retried_after_its_retry_after(keyed: Callable[..., FlaskClient]) -> None:
    client = keyed(rate_limit="1/minute")
    assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 429
    assert response.get_json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert "x-should-retry" not in response.headers  # the SDK waits retry-after and tries again
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


def test_daily_limit_and_spent_budget_say_a_retry_cannot_help(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    daily = keyed(rate_limit="1/day")
    daily.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    response = daily.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert int(response.headers["retry-after"]) > 60

    broke = keyed(daily_budget_usd=Decimal("0.00001"))  # room for one small request's worst case
    small = {**CHAT, "max_tokens": 10}
    upstream.enqueue(fake.ok(prompt_tokens=1000, completion_tokens=1000))
    assert broke.post("/v1/chat/completions", json=small, headers=AUTH).status_code == 200
    response = broke.post("/v1/chat/completions", json=small, headers=AUTH)
    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "budget_exceeded"
    assert response.get_json()["error"]["type"] == "insufficient_quota"
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" in response.headers


def test_token_limit_adds_token_headers(keyed: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    client = keyed(token_limit=50_000)
    upstream.enqueue(fake.ok(prompt_tokens=30, completion_tokens=10))
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}, headers=AUTH)
    assert response.headers["x-ratelimit-limit-tokens"] == "50000"
    remaining = int(response.headers["x-ratelimit-remaining-tokens"])
    assert 50_000 - 100 <= remaining <= 50_000 - 40  # settled to the real usage (or a window just turned)
    assert response.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_stream_sends_chunks_a_usage_chunk_and_done(chat: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream(["Hel", "lo"], prompt_tokens=9, completion_tokens=2))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = chat.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    *chunks, done = events(response.get_data(as_text=True))
    assert done == "[DONE]"
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all("delta" in choice for chunk in chunks for choice in chunk["choices"])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_stream_without_include_usage_has_no_usage_chunk(chat: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream(["a"]))
    response = chat.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    *chunks, done = events(response.get_data(as_text=True))
    assert done == "[DONE]"
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)


def test_failure_after_the_first_chunk_is_an_error_event(chat: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream(["one ", "two ", "three"], fail_after=2))
    response = chat.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert response.status_code == 200
    *chunks, last = events(response.get_data(as_text=True))
    assert last == {
        "error": {
            "message": "The model provider failed to answer.",
            "type": "server_error",
            "param": None,
            "code": "upstream_error",
        }
    }
    assert "[DONE]" not in chunks


def test_failure_before_the_first_chunk_is_an_ordinary_json_error(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    client = keyed(max_retries=0)
    upstream.enqueue(fake.status(500))
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert response.status_code == 502
    assert response.mimetype == "application/json"
    assert response.get_json()["error"]["code"] == "upstream_error"


def test_summary_line_hashes_the_messages(
    chat: FlaskClient, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="llm_service.request")
    secret = "my secret question"
    chat.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": secret}]}, headers=AUTH)
    chat.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "system", "content": secret}]}, headers=AUTH)
    first, second = [r for r in caplog.records if r.name == "llm_service.request"]
    assert (first.path, first.status, first.client, first.model) == ("/v1/chat/completions", 200, "sdk", "gpt-4o-mini")
    assert first.prompt_length == len(secret) and (first.tokens_input, first.tokens_output) == (12, 7)
    assert len(first.prompt_hash) == 16
    assert first.prompt_hash != second.prompt_hash  # the roles count, not only the text
    assert first.prompt_hash != hashlib.sha256(secret.encode()).hexdigest()[:16]
    assert secret not in "\n".join(str(r.__dict__) for r in caplog.records)


@pytest.mark.parametrize(
    ("reply", "read", "status"),
    [
        (fake.stream(["a", "b", "c"]), True, 200),
        (fake.stream(["a", "b", "c"], fail_after=1), True, 502),
        (fake.stream([f"t{i} " for i in range(50)], interval_s=0.01), False, "client_closed"),
    ],
    ids=["done", "failed", "closed-after-the-first-event"],
)
def test_a_stream_is_logged_once_however_it_ends(
    chat: FlaskClient,
    upstream: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    reply: fake.Reply,
    read: bool,
    status: int | str,
) -> None:
    from prometheus_client import REGISTRY

    caplog.set_level("INFO", logger="llm_service.request")
    in_flight = REGISTRY.get_sample_value("llm_in_flight_requests")
    upstream.enqueue(reply)
    response = chat.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    if read:
        response.get_data()
    response.close()
    response.close()
    (summary,) = [r for r in caplog.records if r.name == "llm_service.request"]
    assert summary.status == status and summary.stream is True
    assert REGISTRY.get_sample_value("llm_in_flight_requests") == in_flight


def test_spent_upstream_quota_says_a_retry_cannot_help(chat: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.status(429, error_code="insufficient_quota"))
    response = chat.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_quota_exceeded"
    assert response.headers["x-should-retry"] == "false"
    assert upstream.calls == 1


def test_upstream_rate_limit_keeps_its_retry_after_for_the_sdk(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    client = keyed(max_retries=0)
    upstream.enqueue(fake.status(429, headers={"retry-after": "7"}))
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 429
    assert response.get_json()["error"]["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "7"
    assert "x-should-retry" not in response.headers

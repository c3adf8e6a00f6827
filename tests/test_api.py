"""The /generate and /health contract, as a client sees it."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.config import Settings
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI


def test_generate_answers_with_output_and_metadata(client: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok("Paris.", prompt_tokens=1000, completion_tokens=500, cached_tokens=400))
    response = client.post("/generate", json={"prompt": "Capital of France?", "system": "Be brief."})
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"request_id", "output", "metadata"}
    assert body["output"] == "Paris."
    assert body["request_id"] == response.headers["X-Request-ID"]
    meta = body["metadata"]
    assert meta["model"] == "gpt-4o-mini"
    assert meta["provider"] == "openai"
    assert meta["finish_reason"] == "stop"
    assert meta["attempts"] == 1
    assert meta["tokens"] == {"input": 1000, "output": 500, "total": 1500, "cached_input": 400}
    # (1000-400) * 0.15 + 400 * 0.075 + 500 * 0.60, per million tokens
    assert meta["cost_usd"] == pytest.approx(0.00042, abs=1e-12)
    assert meta["latency_ms"] > 0


def test_request_reaches_upstream_as_chat_messages(client: FlaskClient, upstream: FakeOpenAI) -> None:
    client.post(
        "/generate",
        json={"prompt": "Hi", "system": "Sys", "model": "gpt-4.1-nano", "temperature": 0, "max_tokens": 5},
    )
    sent = upstream.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"] == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}]
    assert sent.body["model"] == "gpt-4.1-nano"
    assert sent.body["temperature"] == 0
    assert sent.body["max_tokens"] == 5
    assert sent.headers["authorization"] == "Bearer sk-test-not-a-real-key-0000000000"


def test_defaults_are_applied(client: FlaskClient, upstream: FakeOpenAI) -> None:
    client.post("/generate", json={"prompt": "Hi"})
    sent = upstream.requests[0].body
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("gpt-4o-mini", 0.7, 1000)
    assert sent["messages"] == [{"role": "user", "content": "Hi"}]


def test_unpriced_model_reports_null_cost(make_settings: Callable[..., Settings], upstream: FakeOpenAI) -> None:
    client = create_app(make_settings(allowed_models=("llama3",), default_model="llama3")).test_client()
    body = client.post("/generate", json={"prompt": "Hi"}).get_json()
    assert body["metadata"]["model"] == "llama3"
    assert body["metadata"]["cost_usd"] is None
    assert body["metadata"]["tokens"]["total"] == 19


def test_snapshot_model_in_answer_is_priced(client: FlaskClient, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok(model="gpt-4o-mini-2024-07-18", prompt_tokens=1_000_000, completion_tokens=0))
    body = client.post("/generate", json={"prompt": "Hi"}).get_json()
    assert body["metadata"]["model"] == "gpt-4o-mini-2024-07-18"
    assert body["metadata"]["cost_usd"] == pytest.approx(0.15)


BAD_BODIES: list[tuple[Any, str]] = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n"}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    (
        {"prompt": "x" * 3000, "system": "y" * 1001},
        "prompt",
    ),  # the field clients write, not marshmallow's internal "_schema"
    ({"prompt": "Hi", "model": "gpt-unknown"}, "model"),
    ({"prompt": "Hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "Hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "Hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "Hi", "temperature": True}, "temperature"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 4001}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 10.5}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "Hi", "system": 1}, "system"),
    ({"prompt": "Hi", "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_BODIES)
def test_invalid_fields_are_400_with_details_and_never_reach_upstream(
    client: FlaskClient, upstream: FakeOpenAI, payload: dict, field: str
) -> None:
    response = client.post("/generate", json=payload)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert field in error["details"]
    assert upstream.calls == 0


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("not json", "application/json"),
        ("[1, 2]", "application/json"),
        ('"prompt"', "application/json"),
        ("null", "application/json"),
        ('{"prompt": NaN}', "application/json"),
        ('{"prompt": "Hi"}', "text/plain"),
        ("prompt=Hi", "application/x-www-form-urlencoded"),
    ],
)
def test_non_object_bodies_are_400(client: FlaskClient, upstream: FakeOpenAI, data: str, content_type: str) -> None:
    response = client.post("/generate", data=data, content_type=content_type)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert upstream.calls == 0


def test_prompt_at_exactly_max_chars_is_accepted(client: FlaskClient, upstream: FakeOpenAI) -> None:
    response = client.post("/generate", json={"prompt": "é" * 4000})
    assert response.status_code == 200


def test_huge_body_is_413_before_parsing(client: FlaskClient, upstream: FakeOpenAI) -> None:
    payload = json.dumps({"prompt": "x" * 200_000})
    response = client.post("/generate", data=payload, content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"
    assert upstream.calls == 0


def test_valid_incoming_request_id_is_kept(client: FlaskClient) -> None:
    response = client.post("/generate", json={"prompt": "Hi"}, headers={"X-Request-ID": "heroku-router:abc.123_x"})
    assert response.headers["X-Request-ID"] == "heroku-router:abc.123_x"
    assert response.get_json()["request_id"] == "heroku-router:abc.123_x"


@pytest.mark.parametrize("bad_id", ["", "x" * 129, "has space", "semi;colon", "new\\nline", "é"])
def test_unsafe_incoming_request_id_is_replaced_by_uuid4(client: FlaskClient, bad_id: str) -> None:
    response = client.get("/health", headers={"X-Request-ID": bad_id})
    assert uuid.UUID(response.headers["X-Request-ID"]).version == 4


def test_health_is_cheap_and_never_calls_upstream(client: FlaskClient, upstream: FakeOpenAI) -> None:
    before_s = int(time.time())
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    # The original specification's contract, plus today's fields.
    assert body == {
        "status": "healthy",
        "service": "llm-service",
        "timestamp": body["timestamp"],
        "provider": "openai",
        "default_model": "gpt-4o-mini",
    }
    assert isinstance(body["timestamp"], int) and before_s <= body["timestamp"] <= time.time()
    assert re.fullmatch(r"[0-9a-f-]{36}", response.headers["X-Request-ID"])
    assert upstream.calls == 0


def test_openapi_document_declares_the_headers_answers_carry(client: FlaskClient, upstream: FakeOpenAI) -> None:
    document = client.get("/openapi.json").get_json()
    answer = client.post("/generate", json={"prompt": "Hi", "temperature": 0})
    declared = document["paths"]["/generate"]["post"]["responses"]["200"]["headers"]
    sent = {name for name in answer.headers.keys() if name.lower().startswith(("x-", "age"))}
    assert {"X-Request-ID", "X-Cache", "X-RateLimit-Remaining"} <= sent <= set(declared)
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["headers"]
    assert {"X-Cache", "Age", "x-ratelimit-remaining-requests", "x-ratelimit-reset-tokens"} <= set(chat)


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b'{"prompt": "Hi",', "The body is not valid JSON."), (b'["Hi"]', "The body must be a JSON object.")],
)
def test_a_body_that_is_not_json_or_not_an_object_says_which(
    client: FlaskClient, upstream: FakeOpenAI, raw: bytes, message: str
) -> None:
    response = client.post("/generate", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["message"] == message
    assert upstream.calls == 0

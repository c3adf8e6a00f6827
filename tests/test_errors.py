"""Every non-2xx answer uses the one envelope and leaks nothing."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from llm_service.errors import (
    InvalidRequest,
    LocalModelBusy,
    PayloadTooLarge,
    ServiceError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)


def assert_envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("get", "/nowhere", 404, "not_found"),
        ("get", "/generate", 405, "method_not_allowed"),
        ("delete", "/health", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_use_the_envelope(client: FlaskClient, method: str, path: str, status: int, code: str) -> None:
    assert_envelope(getattr(client, method)(path), status, code)


@pytest.mark.parametrize(
    "error_class",
    [
        InvalidRequest,
        PayloadTooLarge,
        UpstreamRateLimited,
        UpstreamQuotaExceeded,
        UpstreamError,
        UpstreamTimeout,
        UpstreamAuthError,
        UpstreamRejected,
        LocalModelBusy,
        ServiceError,
    ],
)
def test_each_service_error_renders_its_status_and_code(app: Flask, error_class: type[ServiceError]) -> None:
    @app.get("/raise")
    def raise_it() -> None:
        raise error_class(retry_after_s=2.5)

    response = app.test_client().get("/raise")
    assert_envelope(response, error_class.status, error_class.code)
    assert response.headers["Retry-After"] == "3"


def test_unexpected_exception_is_500_without_its_text(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    app.config["TESTING"] = False
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail sk-live-should-not-leak")

    response = app.test_client().get("/boom")
    error = assert_envelope(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True)
    assert "RuntimeError" not in error["message"]
    assert any("secret detail" in (r.exc_text or "") for r in caplog.records)


def test_upstream_error_body_is_never_echoed(client: FlaskClient, upstream) -> None:
    from tests import fake_openai as fake

    upstream.enqueue(fake.status(400, "context_length_exceeded"))
    response = client.post("/generate", json={"prompt": "Hi"})
    assert_envelope(response, 400, "upstream_rejected")
    assert "fake error" not in response.get_data(as_text=True)

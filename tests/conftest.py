"""Shared fixtures: a fault-injecting OpenAI-compatible upstream, settings, app and client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.config import Settings
from tests.fake_openai import FakeOpenAI
from tests.routing_support import Upstreams, start_upstreams


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture
def make_settings(upstream: FakeOpenAI) -> Callable[..., Settings]:
    """Return a builder of Settings aimed at the fake upstream, with retry waits too short to notice."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            openai_api_key="sk-test-not-a-real-key-0000000000",
            openai_base_url=upstream.url,
            provider="openai",
            retry_delay_s=0.01,
            retry_max_delay_s=0.05,
            timeout_s=5.0,
            deadline_s=10.0,
        )
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> Flask:
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def upstreams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstreams]:
    """Return two fake upstreams behind a MODELS_FILE (tests.routing_support), with their keys in the environment."""
    monkeypatch.setenv("ROUTING_PRIMARY_KEY", "sk-primary-test")
    monkeypatch.setenv("ROUTING_BACKUP_KEY", "sk-backup-test")
    both = start_upstreams(tmp_path)
    yield both
    both.primary.stop()
    both.backup.stop()

"""MODELS_FILE routing: each model to its upstream, fallbacks, circuits and the retry budget, over real sockets."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.config import ConfigError
from llm_service.startup import load_env
from tests import fake_openai as fake
from tests.routing_support import BACKUP_PRICE, PRIMARY_PRICE, Upstreams
from tests.servers import ROOT
from tests.test_openai_api import events as chunk_events
from tests.test_streaming import parse_events

MAIN = {"prompt": "Say hello.", "model": "main"}
CHAT = {"model": "main", "messages": [{"role": "user", "content": "Say hello."}]}


def cost(price: dict[str, float], input_tokens: int = 12, output_tokens: int = 7) -> float:
    return (input_tokens * price["input"] + output_tokens * price["output"]) / 1e6


def client_of(upstreams: Upstreams, **overrides: Any) -> FlaskClient:
    return create_app(upstreams.settings(**overrides)).test_client()


def test_each_model_goes_to_its_upstream_under_its_upstream_name_at_its_price(upstreams: Upstreams) -> None:
    client = client_of(upstreams)
    main = client.post("/generate", json=MAIN).get_json()
    spare = client.post("/generate", json={**MAIN, "model": "spare"}).get_json()
    assert (main["metadata"]["model"], main["metadata"]["provider"]) == ("main", upstreams.primary_name)
    assert main["metadata"]["cost_usd"] == pytest.approx(cost(PRIMARY_PRICE))
    assert spare["metadata"]["cost_usd"] == pytest.approx(cost(BACKUP_PRICE))
    assert "fallback_from" not in main["metadata"]
    assert upstreams.primary.requests[0].body["model"] == "gpt-4o-mini"
    assert upstreams.backup.requests[0].body["model"] == "meta-llama/Llama-3.1-8B"
    assert upstreams.primary.requests[0].headers["authorization"] == "Bearer sk-primary-test"
    assert upstreams.backup.requests[0].headers["authorization"] == "Bearer sk-backup-test"
    assert client.post("/generate", json={**MAIN, "model": "gpt-4o"}).status_code == 400  # not in the file


def test_primary_500_is_answered_by_the_fallback_at_its_price(upstreams: Upstreams) -> None:
    upstreams.primary.default = fake.status(500)
    body = client_of(upstreams).post("/generate", json=MAIN).get_json()
    meta = body["metadata"]
    assert body["output"] == "Hello from the fake upstream."
    assert (meta["model"], meta["fallback_from"], meta["provider"]) == ("spare", "main", upstreams.backup_name)
    assert meta["attempts"] == 5  # four to the primary (MAX_RETRIES=3), one to the fallback
    assert meta["cost_usd"] == pytest.approx(cost(BACKUP_PRICE))
    assert (upstreams.primary.calls, upstreams.backup.calls) == (4, 1)


def test_native_stream_falls_back_before_its_first_delta(upstreams: Upstreams) -> None:
    upstreams.primary.default = fake.status(503)
    upstreams.backup.enqueue(fake.stream(["Hi ", "there"], prompt_tokens=12, completion_tokens=7))
    response = client_of(upstreams).post("/generate", json={**MAIN, "stream": True})
    stream_events = parse_events(response.get_data(as_text=True))
    assert [name for name, _ in stream_events] == ["delta", "delta", "done"]
    meta = stream_events[-1][1]["metadata"]
    assert (meta["model"], meta["fallback_from"], meta["attempts"]) == ("spare", "main", 5)
    assert meta["cost_usd"] == pytest.approx(cost(BACKUP_PRICE))


def test_stream_failing_after_its_first_delta_does_not_fall_back(upstreams: Upstreams) -> None:
    upstreams.primary.enqueue(fake.stream(["one ", "two"], fail_after=1))
    response = client_of(upstreams, max_retries=0).post("/generate", json={**MAIN, "stream": True})
    names = [name for name, _ in parse_events(response.get_data(as_text=True))]
    assert names == ["delta", "error"]
    assert upstreams.backup.calls == 0


def test_v1_answers_with_the_fallback_model_plain_and_streamed(upstreams: Upstreams) -> None:
    upstreams.primary.default = fake.reset()
    upstreams.backup.default = fake.auto("Fallback says hi")
    client = client_of(upstreams, circuit_failures=100)
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.get_json()["model"] == "spare"
    assert response.headers["X-Fallback-From"] == "main"
    document = client.get("/openapi.json").get_json()
    assert "X-Fallback-From" in document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["headers"]
    assert response.get_json()["choices"][0]["message"]["content"] == "Fallback says hi"
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert streamed.headers["X-Fallback-From"] == "main"
    chunks = chunk_events(streamed.get_data(as_text=True))
    assert {chunk["model"] for chunk in chunks[:-1]} == {"spare"}  # the last is [DONE]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert text == "Fallback says hi"
    assert (upstreams.primary.calls, upstreams.backup.calls) == (8, 2)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (lambda: fake.status(400, "context_length_exceeded"), 400, "upstream_rejected"),
        (lambda: fake.status(401), 502, "upstream_auth_error"),
        (lambda: fake.status(404), 502, "upstream_error"),
        (lambda: fake.status(422), 400, "upstream_rejected"),
    ],
)
def test_client_errors_of_the_primary_are_not_hidden_by_a_fallback(
    upstreams: Upstreams, fault: Any, status: int, code: str
) -> None:
    upstreams.primary.enqueue(fault())
    response = client_of(upstreams).post("/generate", json=MAIN)
    assert (response.status_code, response.get_json()["error"]["code"]) == (status, code)
    assert (upstreams.primary.calls, upstreams.backup.calls) == (1, 0)


def test_insufficient_quota_falls_back_but_the_fallbacks_own_is_answered(upstreams: Upstreams) -> None:
    upstreams.primary.default = fake.status(429, "insufficient_quota")
    client = client_of(upstreams)
    assert client.post("/generate", json=MAIN).get_json()["metadata"]["fallback_from"] == "main"
    upstreams.backup.enqueue(fake.status(429, "insufficient_quota"))
    response = client.post("/generate", json=MAIN)
    assert (response.status_code, response.get_json()["error"]["code"]) == (503, "upstream_quota_exceeded")
    assert response.get_json()["error"]["code"] == "upstream_quota_exceeded"


def test_fallback_is_logged_and_counted(upstreams: Upstreams, caplog: pytest.LogCaptureFixture) -> None:
    upstreams.primary.default = fake.status(500)
    client = client_of(upstreams)
    caplog.set_level("WARNING", logger="llm_service.router")
    response = client.post("/generate", json=MAIN, headers={"X-Request-ID": "fallback-req-1"})
    (record,) = [r for r in caplog.records if r.name == "llm_service.router"]
    assert (record.fallback_from, record.fallback_to, record.reason) == ("main", "spare", "upstream_error")  # type: ignore[attr-defined]
    assert response.headers["X-Request-ID"] == "fallback-req-1"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'llm_fallbacks_total{from="main",to="spare"}' in metrics


def test_fallback_answers_are_not_cached_as_the_primary(upstreams: Upstreams) -> None:
    client = client_of(upstreams, cache_mode="all")
    upstreams.primary.enqueue(*(fake.status(500) for _ in range(4)))
    assert client.post("/generate", json=MAIN).get_json()["metadata"]["fallback_from"] == "main"
    again = client.post("/generate", json=MAIN).get_json()["metadata"]
    assert (again["model"], again["cached"]) == ("main", False)  # the primary is back and answers itself
    assert client.post("/generate", json=MAIN).get_json()["metadata"]["cached"] is True


def test_circuit_opens_after_consecutive_failures_then_lets_one_probe_through(upstreams: Upstreams) -> None:
    client = client_of(upstreams, circuit_failures=3, circuit_reset_s=1.0, max_retries=0)
    upstreams.primary.default = fake.status(500)
    for _ in range(3):
        assert client.post("/generate", json={**MAIN, "model": "lonely"}).status_code == 502
    opened = time.monotonic()
    refused = client.post("/generate", json={**MAIN, "model": "lonely"})
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (503, "upstream_unavailable")
    assert refused.headers["Retry-After"] == "1"
    fell_back = client.post("/generate", json=MAIN).get_json()["metadata"]
    assert (fell_back["model"], fell_back["attempts"]) == ("spare", 1)  # straight to the fallback: no attempt
    assert upstreams.primary.calls == 3
    assert client.get("/ready").get_json()["circuits"][upstreams.primary_name] == "open"

    time.sleep(max(0.0, opened + 1.05 - time.monotonic()))
    upstreams.primary.default = fake.ok("probe answered", delay_s=0.5)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: client.post("/generate", json={**MAIN, "model": "lonely"}), range(6)))
    assert sorted(a.status_code for a in answers) == [200] + [503] * 5
    assert upstreams.primary.calls == 4  # exactly one probe while half-open
    assert client.post("/generate", json={**MAIN, "model": "lonely"}).status_code == 200  # closed again
    assert client.get("/ready").get_json()["circuits"][upstreams.primary_name] == "closed"


def test_failed_probe_opens_the_circuit_again(upstreams: Upstreams) -> None:
    client = client_of(upstreams, circuit_failures=2, circuit_reset_s=0.3, max_retries=0)
    upstreams.primary.default = fake.status(500)
    for _ in range(2):
        client.post("/generate", json={**MAIN, "model": "lonely"})
    time.sleep(0.35)
    assert client.post("/generate", json={**MAIN, "model": "lonely"}).status_code == 502  # the probe, failing
    assert client.post("/generate", json={**MAIN, "model": "lonely"}).status_code == 503
    assert upstreams.primary.calls == 3


def test_a_400_does_not_count_against_the_circuit(upstreams: Upstreams) -> None:
    client = client_of(upstreams, circuit_failures=2, max_retries=0)
    upstreams.primary.default = fake.status(400)
    statuses = {client.post("/generate", json={**MAIN, "model": "lonely"}).status_code for _ in range(5)}
    assert statuses == {400}
    assert upstreams.primary.calls == 5


def test_retry_budget_keeps_a_dead_upstream_to_about_one_attempt_a_request(upstreams: Upstreams) -> None:
    client = client_of(upstreams, circuit_failures=10_000, rate_limit="1000/minute")  # the budget alone
    upstreams.primary.default = fake.status(500)
    statuses = [client.post("/generate", json={**MAIN, "model": "lonely"}).status_code for _ in range(100)]
    assert statuses == [502] * 100
    # 100 requests with MAX_RETRIES=3 would make 400 attempts; the budget allows the floor of 30 retries in 10 s.
    assert upstreams.primary.calls <= 130
    assert "llm_retries_skipped_total" in client.get("/metrics").get_data(as_text=True)


def test_health_ready_and_models_list_the_files_models(upstreams: Upstreams) -> None:
    client = client_of(upstreams)
    health = client.get("/health").get_json()
    assert (health["models"], health["default_model"]) == (["main", "spare", "lonely"], "main")
    ready = client.get("/ready").get_json()
    assert ready["circuits"] == {upstreams.primary_name: "closed", upstreams.backup_name: "closed"}
    listed = client.get("/v1/models").get_json()["data"]
    assert [(m["id"], m["owned_by"]) for m in listed] == [
        ("main", upstreams.primary_name),
        ("spare", upstreams.backup_name),
        ("lonely", upstreams.primary_name),
    ]


def test_models_file_mistakes_are_named_in_one_error(upstreams: Upstreams, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "upstreams": {
                    "a": {"base_url": "ftp://x", "api_key_env": "NO_SUCH_KEY_VAR", "timeout_s": 0, "colour": 1},
                    "local": {"base_url": "http://x"},
                },
                "models": {
                    "m": {"upstream": "nowhere", "fallbacks": ["ghost", "m"], "price": {"input": "x", "output": 1}},
                    "n": {"upstream": "a", "extra": True},
                },
            }
        )
    )
    with pytest.raises(ConfigError) as raised:
        create_app(upstreams.settings(models_file=str(bad), default_model="gpt-4o"))
    message = str(raised.value)
    for expected in (
        "base_url",
        "NO_SUCH_KEY_VAR",
        "timeout_s",
        "'colour'",
        "reserved",
        "'nowhere'",
        "'ghost'",
        "cycle",
        "not a number",
        "'extra'",
    ):
        assert expected in message, expected


def test_default_and_allowed_models_must_be_the_files(upstreams: Upstreams) -> None:
    with pytest.raises(ConfigError, match="gpt-4o"):
        create_app(upstreams.settings(default_model="gpt-4o"))
    with pytest.raises(ConfigError, match="other"):
        create_app(upstreams.settings(allowed_models=("main", "other"), default_model="main"))
    narrowed = client_of(upstreams, allowed_models=("spare",))
    assert narrowed.get("/health").get_json()["default_model"] == "spare"
    assert narrowed.post("/generate", json=MAIN).status_code == 400


def test_readme_models_file_loads_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Several upstreams") :]
    start = section.index("```json\n") + len("```json\n")
    document = section[start : section.index("\n```", start)]
    path = tmp_path / "models.json"
    path.write_text(document)
    environ = {"MODELS_FILE": str(path), "OPENAI_API_KEY": "sk-x", "BACKUP_API_KEY": "bk-x"}
    settings, catalog = load_env(environ)
    assert catalog.allowed_models == ("gpt-4o-mini", "llama-3.1-8b", "smollm2")
    assert catalog.default_model == "gpt-4o-mini"
    assert catalog.routes is not None and catalog.routes.uses_local
    assert [route.model for route in catalog.routes.chain("gpt-4o-mini")] == ["gpt-4o-mini", "llama-3.1-8b", "smollm2"]
    assert catalog.routes.upstreams["backup"].api_key == "bk-x"
    with pytest.raises(ConfigError, match="BACKUP_API_KEY"):
        load_env({**environ, "BACKUP_API_KEY": ""})


def test_an_unpriced_fallback_is_not_charged_at_the_price_asked_for(upstreams: Upstreams, tmp_path: Path) -> None:
    document = json.loads(upstreams.models_file.read_text())
    document["models"]["main"]["fallbacks"] = ["unpriced"]
    document["models"]["unpriced"] = {"upstream": upstreams.backup_name}
    path = tmp_path / "unpriced.json"
    path.write_text(json.dumps(document))
    upstreams.primary.default = fake.status(500)
    meta = client_of(upstreams, models_file=str(path)).post("/generate", json=MAIN).get_json()["metadata"]
    assert (meta["model"], meta["cost_usd"]) == ("unpriced", None)

"""MODELS_FILE through the Procfile's gunicorn: circuits shared by instances, start-up mistakes, Redis down, local."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import redis

from llm_service import create_app
from tests import fake_openai as fake
from tests.routing_support import Upstreams, models_document
from tests.servers import Service, start_up_failure
from tests.test_redis_limits import SHARED_REDIS, PrivateRedis

LONELY = {"prompt": "Say hello.", "model": "lonely"}


def service_env(upstreams: Upstreams, **extra: str) -> dict[str, str]:
    return {
        "MODELS_FILE": str(upstreams.models_file),
        "ROUTING_PRIMARY_KEY": "sk-primary-test",
        "ROUTING_BACKUP_KEY": "sk-backup-test",
        "REDIS_URL": SHARED_REDIS,
        "WEB_CONCURRENCY": "2",
        "MAX_RETRIES": "0",
        "CACHE_MODE": "off",
        "RATE_LIMIT": "1000/minute",
        **extra,
    }


@pytest.mark.e2e
def test_two_instances_share_each_circuit_through_redis(upstreams: Upstreams, tmp_path: Path) -> None:
    env = service_env(upstreams, CIRCUIT_FAILURES="2", CIRCUIT_RESET_S="3")
    upstreams.primary.default = fake.status(500)
    with Service(env, tmp_path / "a.log") as a, Service(env, tmp_path / "b.log") as b:
        assert [a.generate(LONELY)[0] for _ in range(2)] == [502, 502]
        status, body, headers = b.generate(LONELY)  # the other instance: the circuit is open there too
        assert (status, body["error"]["code"]) == (503, "upstream_unavailable")
        assert headers["retry-after"] in ("2", "3")
        assert upstreams.primary.calls == 2
        ready = json.loads(b.request("GET", "/ready")[2])
        assert (ready["status"], ready["circuits"][upstreams.primary_name]) == ("ready", "open")
        metrics = b.request("GET", "/metrics")[2].decode()
        assert f'llm_circuit_state{{upstream="{upstreams.primary_name}"}} 1.0' in metrics

        # The fallback still answers, through the OpenAI SDK, without an attempt at the open upstream.
        sdk = openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{b.port}/v1", max_retries=0)
        answer = sdk.chat.completions.with_raw_response.create(
            model="main", messages=[{"role": "user", "content": "Hi"}]
        )
        assert (answer.parse().model, answer.headers["x-fallback-from"]) == ("spare", "main")
        assert upstreams.primary.calls == 2

        time.sleep(int(headers["retry-after"]) + 0.1)
        upstreams.primary.default = fake.ok("probe", delay_s=0.5)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: (a if i % 2 else b).generate(LONELY)[0], range(8)))
        assert sorted(statuses) == [200] + [503] * 7  # one probe across both instances and their four workers
        assert upstreams.primary.calls == 3
        assert [a.generate(LONELY)[0], b.generate(LONELY)[0]] == [200, 200]
    ttl_ms = redis.Redis.from_url(SHARED_REDIS).pttl(f"llm:circuit:{upstreams.primary_name}")
    assert 0 < ttl_ms <= 86_400_000  # forgotten after a day without attempts: no key outlives its upstream for long


@pytest.mark.e2e
def test_models_file_mistakes_stop_start_up_with_one_message(upstreams: Upstreams, tmp_path: Path) -> None:
    document = models_document("not a url", upstreams.backup.url, ("one", "two"), fallbacks=["nothing"])
    document["upstreams"]["two"]["api_key_env"] = "ROUTING_UNSET_KEY"
    bad = tmp_path / "bad-models.json"
    bad.write_text(json.dumps(document))
    message = start_up_failure({**service_env(upstreams), "MODELS_FILE": str(bad), "CIRCUIT_FAILURES": "0"}, tmp_path)
    for expected in ("upstream 'one': base_url", "ROUTING_UNSET_KEY", "fallback 'nothing'", "CIRCUIT_FAILURES"):
        assert expected in message


def test_breaker_fails_open_when_redis_stops(
    upstreams: Upstreams, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    try:
        settings = upstreams.settings(redis_url=private.url, circuit_failures=1, max_retries=0)
        client = create_app(settings).test_client()
        assert client.post("/generate", json=LONELY).status_code == 200
        private.stop()
        caplog.set_level("ERROR", logger="llm_service.circuit")
        started = time.monotonic()
        statuses = [client.post("/generate", json=LONELY).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]  # calls go through...
        assert time.monotonic() - started < 5  # ...without hanging on the dead Redis
        assert upstreams.primary.calls == 4
        assert any(r.name == "llm_service.circuit" and r.levelname == "ERROR" for r in caplog.records)
    finally:
        private.stop()


@pytest.mark.local_model
def test_local_model_answers_as_the_fallback(upstreams: Upstreams, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="the local model is installed by `make test`")
    document = models_document(upstreams.primary.url, upstreams.backup.url, ("a", "b"), fallbacks=["tiny"])
    document["models"]["tiny"] = {"upstream": "local"}
    path = tmp_path / "with-local.json"
    path.write_text(json.dumps(document))
    upstreams.primary.default = fake.status(502)
    client = create_app(upstreams.settings(models_file=str(path), local_threads=1)).test_client()
    question = {"prompt": "What is the capital of France?", "model": "main", "max_tokens": 8}
    body = client.post("/generate", json=question).get_json()
    meta = body["metadata"]
    assert body["output"].strip()  # real text from the real model
    assert (meta["model"], meta["fallback_from"], meta["provider"]) == ("tiny", "main", "local")
    assert meta["cost_usd"] == 0.0 and meta["tokens"]["output"] <= 8
    assert meta["attempts"] == 5

"""Limits shared through a real Redis: across workers and instances, atomic, and through a Redis outage."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from llm_service import create_app
from llm_service.clients import parse_api_keys
from llm_service.config import Settings
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import Service, free_port

SHARED_REDIS = "redis://127.0.0.1:6379/0"
HI = {"prompt": "Hi"}


@pytest.fixture(scope="module", autouse=True)
def shared_redis() -> None:
    try:
        redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError as error:  # `make test` starts one; a bare pytest run may not have it
        pytest.fail(f"no Redis answers at {SHARED_REDIS} (run `make test` or scripts/ensure-redis): {error}")


def unique_keys() -> tuple[str, str, str]:
    """Return API_KEYS with two fresh client names, so runs a minute apart never share counters."""
    suffix = uuid.uuid4().hex[:8]
    first, second = f"s1-{suffix}", f"s2-{suffix}"
    return f"c1{suffix}={first},c2{suffix}={second}", first, second


class PrivateRedis:
    """A redis-server of the test's own, on a free port, to stop and start at will."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (scripts/ensure-redis installs it)"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        raise AssertionError("private redis did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def service_env(upstream: FakeOpenAI, api_keys: str, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": upstream.url,
        "API_KEYS": api_keys,
        "REDIS_URL": SHARED_REDIS,
        "WEB_CONCURRENCY": "2",
        "THREADS": "16",
        **extra,
    }


@pytest.mark.e2e
def test_two_instances_share_one_limit(upstream: FakeOpenAI, tmp_path: Path) -> None:
    api_keys, first, second = unique_keys()
    env = service_env(upstream, api_keys, RATE_LIMIT="10/minute")
    with Service(env, tmp_path / "a.log") as a, Service(env, tmp_path / "b.log") as b:
        statuses = [(a if i % 2 else b).generate(HI, headers={"X-API-Key": first})[0] for i in range(30)]
        assert statuses.count(200) == 10
        assert statuses.count(429) == 20
        other = [(a if i % 2 else b).generate(HI, headers={"X-API-Key": second})[0] for i in range(4)]
        assert other == [200] * 4
    assert upstream.calls == 14


@pytest.mark.e2e
def test_fifty_concurrent_requests_admit_exactly_the_limit(upstream: FakeOpenAI, tmp_path: Path) -> None:
    api_keys, first, _ = unique_keys()
    upstream.default = fake.ok(delay_s=0.2)
    env = service_env(upstream, api_keys, RATE_LIMIT="10/minute", THREADS="32")
    with Service(env, tmp_path / "s.log") as service, ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: service.generate(HI, headers={"X-API-Key": first})[0], range(50)))
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40
    assert upstream.calls == 10


@pytest.mark.e2e
def test_budget_spent_on_one_instance_is_refused_on_the_other(upstream: FakeOpenAI, tmp_path: Path) -> None:
    api_keys, first, second = unique_keys()
    upstream.default = fake.ok(prompt_tokens=40_000, completion_tokens=10_000)  # 0.012 USD each
    env = service_env(upstream, api_keys, DAILY_BUDGET_USD="0.02", RATE_LIMIT="100/minute")
    with Service(env, tmp_path / "a.log") as a, Service(env, tmp_path / "b.log") as b:
        assert a.generate(HI, headers={"X-API-Key": first})[0] == 200
        assert b.generate(HI, headers={"X-API-Key": first})[0] == 200  # 0.012 spent < 0.02
        status, body, headers = a.generate(HI, headers={"X-API-Key": first})
        assert (status, body["error"]["code"]) == (429, "budget_exceeded")
        assert 0 < int(headers["retry-after"]) <= 86400
        status, usage_raw = b.request("GET", "/usage", headers={"X-API-Key": first})[::2]
        assert json.loads(usage_raw)["spend_usd_today"] == pytest.approx(0.024)
        assert b.generate(HI, headers={"X-API-Key": second})[0] == 200


@pytest.mark.e2e
def test_twenty_concurrent_requests_cannot_spend_past_the_budget(upstream: FakeOpenAI, tmp_path: Path) -> None:
    api_keys, first, _ = unique_keys()
    # gpt-4o-mini output is 0.60 USD per million tokens: 250,000 tokens cost 0.15 USD. The upstream
    # answers slowly, so all 20 requests are in flight together, each before any has been charged.
    upstream.default = fake.ok(prompt_tokens=0, completion_tokens=250_000, delay_s=0.5)
    body = {"prompt": "Hi", "max_tokens": 250_000}
    env = service_env(
        upstream, api_keys, DAILY_BUDGET_USD="1", RATE_LIMIT="10/minute", MAX_OUTPUT_TOKENS="250000", THREADS="32"
    )
    with Service(env, tmp_path / "s.log") as service, ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: service.generate(body, headers={"X-API-Key": first}), range(20)))
        usage = json.loads(service.request("GET", "/usage", headers={"X-API-Key": first})[2])
    served = [body for status, body, _ in answers if status == 200]
    refused = [body["error"]["code"] for status, body, _ in answers if status != 200]
    spent_usd = sum(Decimal(str(body["metadata"]["cost_usd"])) for body in served)
    assert spent_usd <= 1
    assert usage["spend_usd_today"] == pytest.approx(float(spent_usd))
    assert len(served) == 6  # each reserves 0.15 USD and a little for the prompt: six fit in 1 USD
    assert refused == ["budget_exceeded"] * 14
    assert upstream.calls == 6
    assert usage["requests"][0]["used"] == 6  # refusals for budget used up no request slot


def redis_settings(make_settings: Callable[..., Settings], url: str, **overrides: object) -> Settings:
    api_keys, _, _ = unique_keys()
    return make_settings(api_keys=parse_api_keys(api_keys), redis_url=url, **overrides)


def key_of(settings: Settings) -> dict[str, str]:
    # parse_api_keys keeps only digests; the secrets are the s1-/s2- names made by unique_keys.
    name = settings.api_keys[0].name
    return {"X-API-Key": "s1-" + name.removeprefix("c1")}


def test_redis_outage_fails_open_by_default_then_recovers(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    settings = redis_settings(make_settings, private_redis.url, rate_limit="2/minute")
    client = create_app(settings).test_client()
    headers = key_of(settings)
    assert client.post("/generate", json=HI, headers=headers).status_code == 200

    private_redis.stop()
    caplog.set_level("ERROR", logger="llm_service.quotas")
    started = time.monotonic()
    outage = [client.post("/generate", json=HI, headers=headers).status_code for _ in range(3)]
    assert outage == [200, 200, 200]  # served without limits...
    assert time.monotonic() - started < 5  # ...and without hanging on the dead Redis
    assert any(r.message == "usage limits unavailable" and r.levelname == "ERROR" for r in caplog.records)

    private_redis.start()  # an empty Redis: the limit counts from zero again
    statuses = [client.post("/generate", json=HI, headers=headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_redis_outage_fails_closed_when_configured(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis, upstream: FakeOpenAI
) -> None:
    settings = redis_settings(
        make_settings,
        private_redis.url,
        rate_limit_fail_open=False,
        token_limit=10_000,
        daily_budget_usd=Decimal("1"),
    )
    client = create_app(settings).test_client()
    headers = key_of(settings)
    assert client.post("/generate", json=HI, headers=headers).status_code == 200
    private_redis.stop()
    response = client.post("/generate", json=HI, headers=headers)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "limiter_unavailable"
    assert upstream.calls == 1
    private_redis.start()
    assert client.post("/generate", json=HI, headers=headers).status_code == 200

"""Client keys, request limits, token limits and budgets, in one process (memory counters)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.clients import parse_api_keys
from llm_service.config import ConfigError, Settings
from llm_service.startup import load_env
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI

ALICE = "alice-secret-0123456789"
BOB = "bob-secret-9876543210"
KEYS = f"alice={ALICE},bob=sha256:{hashlib.sha256(BOB.encode()).hexdigest()}"
HI = {"prompt": "Hi"}


def clear_of_minute_boundary() -> None:
    """Wait out the last seconds of a minute, so a token test's requests share one token window."""
    into_minute_s = time.time() % 60
    if into_minute_s > 55:
        time.sleep(60.2 - into_minute_s)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def keyed(make_settings: Callable[..., Settings]) -> Callable[..., FlaskClient]:
    def build(**overrides: object) -> FlaskClient:
        values: dict[str, object] = {"api_keys": parse_api_keys(KEYS)}
        values.update(overrides)
        return create_app(make_settings(**values)).test_client()

    return build


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), {"Authorization": ALICE}, {"Authorization": f"Basic {ALICE}"}, {"X-API-Key": "nope"}],
)
def test_missing_or_wrong_key_is_401_and_never_reaches_upstream(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI, headers: dict[str, str]
) -> None:
    response = keyed().post("/generate", json=HI, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert upstream.calls == 0


@pytest.mark.parametrize(
    "headers",
    [bearer(ALICE), {"X-API-Key": ALICE}, bearer(BOB), {"X-API-Key": BOB}, {"authorization": f"bearer {BOB}"}],
)
def test_plain_and_hashed_keys_are_accepted_by_either_header(
    keyed: Callable[..., FlaskClient], headers: dict[str, str]
) -> None:
    assert keyed().post("/generate", json=HI, headers=headers).status_code == 200


def test_health_needs_no_key_but_usage_does(keyed: Callable[..., FlaskClient]) -> None:
    client = keyed()
    assert client.get("/health").status_code == 200
    assert client.get("/usage").status_code == 401
    assert client.get("/usage", headers=bearer(ALICE)).get_json()["client"] == "alice"


def test_secrets_never_reach_the_log_but_the_name_does(
    keyed: Callable[..., FlaskClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    client = keyed()
    client.post("/generate", json=HI, headers=bearer(ALICE))
    client.post("/generate", json=HI, headers=bearer(BOB + "x"))
    text = "\n".join(str(record.__dict__) for record in caplog.records)
    assert ALICE not in text and BOB not in text
    summaries = [r for r in caplog.records if r.name == "llm_service.request"]
    assert summaries[0].client == "alice"
    assert not hasattr(summaries[1], "client")  # refused before it was known


def test_request_limit_refuses_with_true_retry_after(keyed: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    client = keyed(rate_limit="3/minute")
    responses = [client.post("/generate", json=HI, headers=bearer(ALICE)) for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    refused = responses[-1]
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert upstream.calls == 3
    assert client.post("/generate", json=HI, headers=bearer(BOB)).status_code == 200  # a second key is unaffected


def test_every_counted_generate_response_carries_rate_limit_headers(keyed: Callable[..., FlaskClient]) -> None:
    client = keyed(rate_limit="5/minute;100/hour")
    ok = client.post("/generate", json=HI, headers=bearer(ALICE))
    invalid = client.post("/generate", json={"prompt": ""}, headers=bearer(ALICE))
    again = client.post("/generate", json=HI, headers=bearer(ALICE))
    for response, remaining in ((ok, "4"), (again, "3")):  # the invalid request used up no slot
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert response.headers["X-RateLimit-Remaining"] == remaining
        assert int(response.headers["X-RateLimit-Reset"]) > time.time()
    assert invalid.status_code == 400 and "X-RateLimit-Remaining" not in invalid.headers


def test_concurrent_requests_cannot_exceed_the_limit(keyed: Callable[..., FlaskClient]) -> None:
    client = keyed(rate_limit="10/minute")
    with ThreadPoolExecutor(25) as pool:
        statuses = list(
            pool.map(lambda _: client.post("/generate", json=HI, headers=bearer(ALICE)).status_code, range(50))
        )
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40


def test_anonymous_clients_are_limited_per_ip(make_settings: Callable[..., Settings]) -> None:
    client = create_app(make_settings(rate_limit="2/minute")).test_client()
    statuses = [
        client.post("/generate", json=HI, environ_base={"REMOTE_ADDR": ip}).status_code
        for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2")
    ]
    assert statuses == [200, 200, 429, 200]


def test_forwarded_for_counts_only_through_trusted_hops(make_settings: Callable[..., Settings]) -> None:
    client = create_app(make_settings(rate_limit="1/minute", trusted_proxy_hops=1)).test_client()

    def post(forwarded: str) -> int:
        headers = {"X-Forwarded-For": forwarded}
        return client.post("/generate", json=HI, headers=headers, environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code

    # The proxy appends the real address; what a client writes before it is not believed.
    assert post("1.1.1.1, 203.0.113.5") == 200
    assert post("2.2.2.2, 203.0.113.5") == 429
    assert post("1.1.1.1, 203.0.113.6") == 200


def test_token_limit_reserves_then_settles_to_real_usage(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    clear_of_minute_boundary()
    client = keyed(token_limit=320)
    upstream.default = fake.ok(prompt_tokens=10, completion_tokens=140)  # 150 real tokens a request
    body = {"prompt": "Hi", "max_tokens": 150}  # reserves about 167 before the call
    first, second, third = (client.post("/generate", json=body, headers=bearer(ALICE)) for _ in range(3))
    assert (first.status_code, second.status_code) == (200, 200)  # 150 + 167 fits 320 only if settled
    assert third.status_code == 429
    assert third.get_json()["error"]["code"] == "token_limit_exceeded"
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert upstream.calls == 2
    tokens = client.get("/usage", headers=bearer(ALICE)).get_json()["tokens"]
    assert tokens["used"] == 300
    assert tokens["remaining"] == 20


def test_failed_request_gives_its_reservation_back(keyed: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    clear_of_minute_boundary()
    client = keyed(token_limit=200, max_retries=0)
    upstream.enqueue(fake.status(500))
    body = {"prompt": "Hi", "max_tokens": 150}
    assert client.post("/generate", json=body, headers=bearer(ALICE)).status_code == 502
    assert client.post("/generate", json=body, headers=bearer(ALICE)).status_code == 200


def test_request_that_can_never_fit_the_token_limit_is_400(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    response = keyed(token_limit=100).post("/generate", json={"prompt": "Hi", "max_tokens": 500}, headers=bearer(ALICE))
    assert response.status_code == 400
    assert "max_tokens" in response.get_json()["error"]["details"]
    assert upstream.calls == 0


def test_budget_is_spent_by_real_cost_then_refused_until_utc_midnight(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    from decimal import Decimal

    client = keyed(daily_budget_usd=Decimal("0.03"))
    # gpt-4o-mini: 40,000 x 0.15 + 10,000 x 0.60 per million = 0.012 USD a request
    upstream.default = fake.ok(prompt_tokens=40_000, completion_tokens=10_000)
    responses = [client.post("/generate", json=HI, headers=bearer(ALICE)) for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert sum(r.get_json()["metadata"]["cost_usd"] for r in responses[:3]) == pytest.approx(0.036)
    refused = responses[-1]
    assert refused.get_json()["error"]["code"] == "budget_exceeded"
    now = time.gmtime()
    to_midnight_s = 86400 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
    assert abs(int(refused.headers["Retry-After"]) - to_midnight_s) <= 2
    assert upstream.calls == 3
    usage = client.get("/usage", headers=bearer(ALICE)).get_json()
    assert usage["spend_usd_today"] == pytest.approx(0.036)
    assert usage["budget_left_usd"] == 0
    assert client.post("/generate", json=HI, headers=bearer(BOB)).status_code == 200


BIG = {"prompt": "Hi", "max_tokens": 250_000}  # gpt-4o-mini: reserves 0.15 USD and a little for the prompt


def spend(client: FlaskClient) -> float:
    return float(client.get("/usage", headers=bearer(ALICE)).get_json()["spend_usd_today"])


def test_budget_reservation_settles_to_the_real_cost(keyed: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    from decimal import Decimal

    client = keyed(daily_budget_usd=Decimal("0.2"), max_output_tokens=250_000)
    upstream.default = fake.ok(prompt_tokens=1000, completion_tokens=1000)  # 0.00075 USD
    statuses = [client.post("/generate", json=BIG, headers=bearer(ALICE)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]  # each settles to its real cost, so the next 0.15 fits again
    assert spend(client) == pytest.approx(3 * 0.00075)


def test_failed_or_rate_limited_requests_give_their_budget_reservation_back(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    from decimal import Decimal

    client = keyed(daily_budget_usd=Decimal("0.2"), max_output_tokens=250_000, max_retries=0, rate_limit="2/minute")
    upstream.enqueue(fake.status(500))
    assert client.post("/generate", json=BIG, headers=bearer(ALICE)).status_code == 502
    assert spend(client) == 0
    assert client.post("/generate", json=BIG, headers=bearer(ALICE)).status_code == 200
    refused = client.post("/generate", json=BIG, headers=bearer(ALICE))
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert spend(client) == pytest.approx((12 * 0.15 + 7 * 0.60) / 1e6)  # the served request's real cost only


def test_request_that_could_cost_more_than_the_budget_is_400(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    from decimal import Decimal

    client = keyed(daily_budget_usd=Decimal("0.1"), max_output_tokens=250_000)
    response = client.post("/generate", json=BIG, headers=bearer(ALICE))
    assert (response.status_code, response.get_json()["error"]["code"]) == (400, "invalid_request")
    assert "max_tokens" in response.get_json()["error"]["details"]
    assert upstream.calls == 0
    assert client.get("/usage", headers=bearer(ALICE)).get_json()["requests"][0]["used"] == 0


def test_budget_refusal_uses_no_request_slot_and_tells_where_the_limit_stands(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    from decimal import Decimal

    client = keyed(daily_budget_usd=Decimal("0.2"), max_output_tokens=250_000, rate_limit="5/minute")
    upstream.default = fake.ok(completion_tokens=250_000)  # 0.15 USD: the next 0.15 cannot fit
    assert client.post("/generate", json=BIG, headers=bearer(ALICE)).status_code == 200
    refused = [client.post("/generate", json=BIG, headers=bearer(ALICE)) for _ in range(3)]
    assert {r.get_json()["error"]["code"] for r in refused} == {"budget_exceeded"}
    assert {r.headers["X-RateLimit-Remaining"] for r in refused} == {"4"}  # only the served request counted
    assert client.post("/generate", json=HI, headers=bearer(ALICE)).status_code == 200  # a smaller one fits


def test_unpriced_model_spends_nothing_against_the_budget(
    make_settings: Callable[..., Settings], upstream: FakeOpenAI
) -> None:
    from decimal import Decimal

    settings = make_settings(
        api_keys=parse_api_keys(KEYS),
        daily_budget_usd=Decimal("0.000001"),
        allowed_models=("house-model",),
        default_model="house-model",
    )
    client = create_app(settings).test_client()
    statuses = [client.post("/generate", json=HI, headers=bearer(ALICE)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]  # its cost is unknown (null), so nothing is charged
    assert spend(client) == 0


def test_clients_file_overrides_limits_per_client(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps({"bob": {"rate_limit": "3/minute"}}))
    settings = Settings.from_env(
        {
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_BASE_URL": make_settings().openai_base_url or "",
            "API_KEYS": KEYS,
            "RATE_LIMIT": "1/minute",
            "CLIENTS_FILE": str(path),
        }
    )
    client = create_app(settings).test_client()
    alice = [client.post("/generate", json=HI, headers=bearer(ALICE)).status_code for _ in range(2)]
    bob = [client.post("/generate", json=HI, headers=bearer(BOB)).status_code for _ in range(4)]
    assert alice == [200, 429]
    assert bob == [200, 200, 200, 429]


def test_clients_file_naming_an_unknown_client_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps({"mallory": {"rate_limit": "3/minute"}}))
    with pytest.raises(ConfigError, match="mallory"):
        load_env({"OPENAI_API_KEY": "sk-x", "API_KEYS": KEYS, "CLIENTS_FILE": str(path)})


def test_usage_reports_the_clients_own_counters(keyed: Callable[..., FlaskClient]) -> None:
    client = keyed(rate_limit="10/minute", token_limit=5000)
    for _ in range(3):
        client.post("/generate", json=HI, headers=bearer(ALICE))
    usage = client.get("/usage", headers=bearer(ALICE)).get_json()
    assert usage["client"] == "alice"
    assert usage["requests"][0]["used"] == 3
    assert usage["requests"][0]["remaining"] == 7
    assert usage["tokens"]["limit_per_minute"] == 5000
    assert usage["spend_usd_today"] == pytest.approx(3 * (12 * 0.15 + 7 * 0.60) / 1e6)
    assert usage["daily_budget_usd"] is None
    bob = client.get("/usage", headers=bearer(BOB)).get_json()
    assert bob["requests"][0]["used"] == 0


def test_streams_are_limited_the_same_way(keyed: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    client = keyed(rate_limit="1/minute")
    upstream.enqueue(fake.stream(["a"]))
    assert client.post("/generate", json={**HI, "stream": True}, headers=bearer(ALICE)).status_code == 200
    refused = client.post("/generate", json={**HI, "stream": True}, headers=bearer(ALICE))
    assert refused.status_code == 429
    assert refused.mimetype == "application/json"


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"API_KEYS": "alice"}, "API_KEYS"),
        ({"API_KEYS": "a=1,a=2"}, "API_KEYS"),
        ({"API_KEYS": "a=sha256:abc"}, "API_KEYS"),
        ({"RATE_LIMIT": "ten per minute"}, "RATE_LIMIT"),
        ({"TOKEN_LIMIT": "0"}, "TOKEN_LIMIT"),
        ({"DAILY_BUDGET_USD": "free"}, "DAILY_BUDGET_USD"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"RATE_LIMIT_FAIL_OPEN": "perhaps"}, "RATE_LIMIT_FAIL_OPEN"),
        ({"TRUSTED_PROXY_HOPS": "-1"}, "TRUSTED_PROXY_HOPS"),
    ],
)
def test_bad_limit_settings_stop_start_up(environ: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_env({"OPENAI_API_KEY": "sk-x", **environ})


def test_abandoned_stream_is_charged_an_estimate(
    keyed: Callable[..., FlaskClient], upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    from decimal import Decimal

    caplog.set_level("INFO", logger="llm_service.request")
    clear_of_minute_boundary()
    client = keyed(daily_budget_usd=Decimal("1"), token_limit=100_000)
    upstream.enqueue(fake.stream([f"t{i} " for i in range(200)], interval_s=0.01))
    prompt = "x" * 3000  # estimated at 1016 input tokens
    response = client.post(
        "/generate", json={"prompt": prompt, "stream": True, "max_tokens": 500}, headers=bearer(ALICE), buffered=False
    )
    chunks = iter(response.response)
    for _ in range(3):
        next(chunks)
    response.close()  # the client goes away mid-stream
    usage = client.get("/usage", headers=bearer(ALICE)).get_json()
    (summary,) = [r for r in caplog.records if r.name == "llm_service.request" and getattr(r, "stream", False)]
    assert summary.status == "client_closed"
    deltas = summary.tokens_estimated - 1016
    assert 3 <= deltas <= 5
    assert summary.cost_usd_estimated == pytest.approx((1016 * 0.15 + deltas * 0.60) / 1e6)
    assert usage["spend_usd_today"] == pytest.approx(summary.cost_usd_estimated)
    assert usage["tokens"]["used"] == summary.tokens_estimated


def test_in_memory_limits_start_no_thread_per_request(
    keyed: Callable[..., FlaskClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    timers: list[object] = []
    real_timer = threading.Timer

    def counting_timer(*args: object, **kwargs: object) -> threading.Timer:
        timers.append(args)
        return real_timer(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(threading, "Timer", counting_timer)
    client = keyed(rate_limit="1000/minute")
    for _ in range(20):
        time.sleep(0.02)  # longer than the stock storage's 10 ms pruning timer
        client.post("/generate", json=HI, headers=bearer(ALICE))
    assert len(timers) <= 1  # the stock storage starts one timer thread per request here
    assert client.get("/usage", headers=bearer(ALICE)).get_json()["requests"][0]["used"] == 20

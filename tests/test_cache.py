"""The response cache: what is a hit, for whom, how Cache-Control steers it, streams, budgets, and Redis.

Every test that uses the shared Redis asks its own prompt (and its own client names), so its cache keys
are its own; the shared Redis is never flushed.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.cache import cache_key
from llm_service.clients import parse_api_keys
from llm_service.config import Settings
from llm_service.providers.base import GenerationParams
from llm_service.report import main as report_main
from llm_service.startup import backend_identity
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import Service
from tests.test_redis_limits import SHARED_REDIS, PrivateRedis, private_redis, shared_redis, unique_keys
from tests.test_streaming import parse_events

__all__ = ["private_redis", "shared_redis"]  # fixtures used here by name

STORES = {"memory": {}, "redis": {"redis_url": SHARED_REDIS}}


def question() -> str:
    """Return a prompt no other test (or earlier run) has asked, so its cache entry is this test's own."""
    return f"What is {uuid.uuid4().hex}?"


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(STORES[request.param])


@pytest.fixture
def build(make_settings: Callable[..., Settings]) -> Callable[..., FlaskClient]:
    def client(**overrides: Any) -> FlaskClient:
        # The anonymous client's request limit lives in the shared Redis: these tests are about the cache, so
        # it is set out of reach unless a test sets its own (a test suite run beside this one shares it).
        app = create_app(make_settings(**{"rate_limit": "100000/minute", **overrides}))
        app.config["TESTING"] = True
        return app.test_client()

    return client


def ask(client: FlaskClient, prompt: str, headers: dict[str, str] | None = None, **fields: Any) -> Any:
    return client.post("/generate", json={"prompt": prompt, "temperature": 0, **fields}, headers=headers or {})


def test_a_repeated_temperature_0_request_is_a_hit_with_one_upstream_call(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI, store: dict[str, Any]
) -> None:
    client = build(**store)
    prompt = question()
    upstream.enqueue(fake.ok("Forty-two.", prompt_tokens=1000, completion_tokens=500))
    first = ask(client, prompt)
    second = ask(client, prompt)
    assert (first.status_code, second.status_code) == (200, 200)
    assert upstream.calls == 1
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert "Age" not in first.headers and int(second.headers["Age"]) <= 1
    original, hit = first.get_json()["metadata"], second.get_json()["metadata"]
    assert second.get_json()["output"] == "Forty-two."
    assert (original["cached"], hit["cached"]) == (False, True)
    assert hit["tokens"] == original["tokens"] == {"input": 1000, "output": 500, "total": 1500}
    assert original["cost_usd"] == pytest.approx((1000 * 0.15 + 500 * 0.60) / 1e6)
    assert hit["cost_usd"] == 0
    assert hit["cost_saved_usd"] == original["cost_usd"]
    assert (hit["attempts"], hit["model"], hit["finish_reason"]) == (0, original["model"], "stop")


def test_temperature_above_0_is_cached_only_with_cache_mode_all(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    prompt = question()
    default = build()
    assert [ask(default, prompt, temperature=0.7).headers["X-Cache"] for _ in range(2)] == ["BYPASS", "BYPASS"]
    assert upstream.calls == 2
    every = build(cache_mode="all")
    assert [ask(every, prompt, temperature=0.7).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    assert upstream.calls == 3
    off = build(cache_mode="off")
    assert [ask(off, prompt).headers["X-Cache"] for _ in range(2)] == ["BYPASS", "BYPASS"]
    assert upstream.calls == 5


def test_two_clients_never_share_an_entry_under_client_scope(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI, store: dict[str, Any]
) -> None:
    api_keys, first, second = unique_keys()
    keys = parse_api_keys(api_keys)
    prompt = question()
    per_client = build(api_keys=keys, **store)
    upstream.enqueue(fake.ok("for the first client"), fake.ok("for the second client"))
    assert ask(per_client, prompt, {"X-API-Key": first}).headers["X-Cache"] == "MISS"
    other = ask(per_client, prompt, {"X-API-Key": second})
    assert (other.headers["X-Cache"], other.get_json()["output"]) == ("MISS", "for the second client")
    again = ask(per_client, prompt, {"X-API-Key": first})
    assert (again.headers["X-Cache"], again.get_json()["output"]) == ("HIT", "for the first client")
    assert upstream.calls == 2

    shared = build(api_keys=keys, cache_scope="shared", **store)
    prompt = question()
    assert ask(shared, prompt, {"X-API-Key": first}).headers["X-Cache"] == "MISS"
    assert ask(shared, prompt, {"X-API-Key": second}).headers["X-Cache"] == "HIT"
    assert upstream.calls == 3


def test_without_authentication_every_caller_shares_one_scope(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    client, prompt = build(redis_url=SHARED_REDIS), question()
    assert ask_from(client, prompt, "10.0.0.1").headers["X-Cache"] == "MISS"
    assert ask_from(client, prompt, "10.0.0.2").headers["X-Cache"] == "HIT"
    assert upstream.calls == 1


def ask_from(client: FlaskClient, prompt: str, address: str) -> Any:
    return client.post("/generate", json={"prompt": prompt, "temperature": 0}, environ_base={"REMOTE_ADDR": address})


def test_cache_control_no_cache_refreshes_the_entry(build: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    client, prompt = build(), question()
    upstream.enqueue(fake.ok("old answer"), fake.ok("new answer"))
    assert ask(client, prompt).get_json()["output"] == "old answer"
    fresh = ask(client, prompt, {"Cache-Control": "no-cache"})
    assert (fresh.headers["X-Cache"], fresh.get_json()["output"]) == ("MISS", "new answer")
    after = ask(client, prompt)
    assert (after.headers["X-Cache"], after.get_json()["output"]) == ("HIT", "new answer")
    assert upstream.calls == 2


def test_cache_control_no_store_neither_reads_nor_writes(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    client, prompt = build(), question()
    upstream.enqueue(fake.ok("private"), fake.ok("stored"))
    private = ask(client, prompt, {"Cache-Control": "No-Store"})  # directive names are case-insensitive
    assert (private.headers["X-Cache"], private.get_json()["metadata"]["cached"]) == ("BYPASS", False)
    assert ask(client, prompt).headers["X-Cache"] == "MISS"  # the no-store answer was not kept
    assert ask(client, prompt, {"Cache-Control": "no-store"}).headers["X-Cache"] == "BYPASS"  # nor read
    assert upstream.calls == 3


def test_cache_control_max_age_accepts_only_a_younger_entry(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, prompt = build(), question()
    upstream.enqueue(fake.ok("first"), fake.ok("second"))
    ask(client, prompt)
    assert ask(client, prompt, {"Cache-Control": "max-age=60"}).headers["X-Cache"] == "HIT"
    import llm_service.cache

    later = llm_service.cache.time.time() + 30  # the entry is now 30 s old, without waiting for it
    monkeypatch.setattr(llm_service.cache, "time", _Clock(later))
    aged = ask(client, prompt, {"Cache-Control": "max-age=10"})
    assert (aged.headers["X-Cache"], aged.get_json()["output"]) == ("MISS", "second")
    assert ask(client, prompt, {"Cache-Control": "max-age=60"}).headers["Age"] == "0"  # the fresh one
    assert upstream.calls == 2


class _Clock:
    """The time module, with Unix time fixed at a later moment (monotonic time runs on)."""

    def __init__(self, now: float) -> None:
        self._now, self.monotonic, self.sleep = now, time.monotonic, time.sleep

    def time(self) -> float:
        return self._now


@pytest.mark.parametrize(
    "reply",
    [fake.ok("filtered", finish_reason="content_filter"), fake.status(500), fake.ok("x" * 2000)],
    ids=["refusal", "error", "too-large"],
)
def test_only_successful_answers_that_fit_are_stored(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI, reply: fake.Reply
) -> None:
    client, prompt = build(max_retries=0, cache_max_entry_bytes=1000), question()
    upstream.enqueue(reply)
    ask(client, prompt)
    assert ask(client, prompt).headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Name a prime."}], "temperature": 0}


def test_the_key_covers_everything_that_changes_the_answer(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    client = build(redis_url=SHARED_REDIS)
    base = {**CHAT, "messages": [{"role": "user", "content": question()}]}
    variants = [
        {"messages": [{"role": "system", "content": "Be brief."}, *base["messages"]]},
        {"model": "gpt-4o"},
        {"top_p": 0.5},
        {"max_tokens": 10},
        {"stop": ["."]},
        {"seed": 7},
        {"response_format": {"type": "json_object"}},
    ]
    assert client.post("/v1/chat/completions", json=base).headers["X-Cache"] == "MISS"
    for variant in variants:
        assert client.post("/v1/chat/completions", json={**base, **variant}).headers["X-Cache"] == "MISS", variant
    assert client.post("/v1/chat/completions", json=base).headers["X-Cache"] == "HIT"
    assert upstream.calls == 1 + len(variants)


def test_another_upstream_is_another_key(make_settings: Callable[..., Settings]) -> None:
    params = GenerationParams.from_prompt("Hi", model="gpt-4o-mini", temperature=0)
    one = backend_identity(make_settings(openai_base_url="http://a.example/v1"))
    other = backend_identity(make_settings(openai_base_url="http://b.example/v1"))
    with_password = backend_identity(make_settings(openai_base_url="http://user:secret@a.example/v1"))
    assert cache_key("shared", one, params) != cache_key("shared", other, params)
    assert "secret" not in with_password


def test_the_openai_api_shares_the_cache_and_keeps_the_original_usage(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    client = build()
    prompt = question()
    upstream.enqueue(fake.ok("Seven.", prompt_tokens=30, completion_tokens=3))
    native = ask(client, prompt)
    assert native.headers["X-Cache"] == "MISS"
    chat = client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": prompt}]})
    assert chat.status_code == 200
    assert (chat.headers["X-Cache"], chat.headers["Age"]) == ("HIT", "0")
    body = chat.get_json()
    assert body["choices"][0]["message"]["content"] == "Seven."
    assert body["usage"]["total_tokens"] == 33
    assert upstream.calls == 1


def test_a_hit_counts_against_the_request_limit_but_not_tokens_or_budget(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI, store: dict[str, Any]
) -> None:
    api_keys, name, _ = unique_keys()
    client = build(
        api_keys=parse_api_keys(api_keys), rate_limit="3/minute", token_limit=100000, daily_budget_usd=1, **store
    )
    key, prompt = {"X-API-Key": name}, question()
    upstream.enqueue(fake.ok(prompt_tokens=1000, completion_tokens=1000))
    assert ask(client, prompt, key).headers["X-RateLimit-Remaining"] == "2"
    before = client.get("/usage", headers=key).get_json()
    hit = ask(client, prompt, key)
    assert (hit.headers["X-Cache"], hit.headers["X-RateLimit-Remaining"]) == ("HIT", "1")
    after = client.get("/usage", headers=key).get_json()
    assert before["spend_usd_today"] == pytest.approx((1000 * 0.15 + 1000 * 0.60) / 1e6)
    assert after["spend_usd_today"] == before["spend_usd_today"]
    assert after["tokens"]["used"] == before["tokens"]["used"] == 2000
    ask(client, prompt, key)
    assert ask(client, prompt, key).status_code == 429  # the fourth request, a hit, is over the limit
    assert upstream.calls == 1


def test_a_stream_hit_replays_as_events(build: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    client, prompt = build(), question()
    upstream.enqueue(fake.ok("One, two,  three."))
    original = ask(client, prompt).get_json()
    replay = ask(client, prompt, stream=True)
    assert (replay.status_code, replay.mimetype, replay.headers["X-Cache"]) == (200, "text/event-stream", "HIT")
    events = parse_events(replay.get_data(as_text=True))
    deltas = [data["delta"] for name, data in events if name == "delta"]
    assert deltas == ["One, ", "two,  ", "three."]
    name, done = events[-1]
    assert name == "done"
    assert done["output"] == "One, two,  three."
    assert done["metadata"]["cached"] is True
    assert done["metadata"]["cost_saved_usd"] == original["metadata"]["cost_usd"]
    assert upstream.calls == 1


def test_a_completed_stream_is_stored_for_streams_and_plain_requests_alike(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI
) -> None:
    client, prompt = build(), question()
    upstream.default = fake.auto("Streamed once, answered twice.")
    first = ask(client, prompt, stream=True)
    assert first.headers["X-Cache"] == "MISS"
    assert parse_events(first.get_data(as_text=True))[-1][1]["metadata"]["cached"] is False
    plain = ask(client, prompt)
    assert (plain.headers["X-Cache"], plain.get_json()["output"]) == ("HIT", "Streamed once, answered twice.")
    chat = {**CHAT, "messages": [{"role": "user", "content": prompt}], "stream": True}
    replay = client.post("/v1/chat/completions", json=chat)
    lines = [line.removeprefix("data: ") for line in replay.get_data(as_text=True).splitlines() if line]
    assert lines[-1] == "[DONE]"
    text = "".join(json.loads(line)["choices"][0]["delta"].get("content", "") for line in lines[:-1])
    assert (replay.headers["X-Cache"], text) == ("HIT", "Streamed once, answered twice.")
    assert upstream.calls == 1


def test_a_truncated_stream_is_never_stored(build: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    client, prompt = build(), question()
    upstream.enqueue(fake.stream(["Half", " an", " answer"], fail_after=2))
    events = parse_events(ask(client, prompt, stream=True).get_data(as_text=True))
    assert events[-1][0] == "error"
    assert ask(client, prompt).headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


@pytest.fixture
def slow_upstream(upstream: FakeOpenAI) -> Iterator[FakeOpenAI]:
    upstream.default = fake.ok("Worth waiting for.", delay_s=0.5)
    yield upstream


def test_identical_requests_in_flight_make_one_upstream_call(
    build: Callable[..., FlaskClient], slow_upstream: FakeOpenAI, store: dict[str, Any]
) -> None:
    client, prompt = build(**store), question()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(client, prompt), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert sorted(a.headers["X-Cache"] for a in answers) == ["HIT"] * 7 + ["MISS"]
    assert slow_upstream.calls == 1


def test_when_the_leader_fails_one_waiter_takes_over(
    build: Callable[..., FlaskClient], slow_upstream: FakeOpenAI, store: dict[str, Any]
) -> None:
    client, prompt = build(max_retries=0, **store), question()
    slow_upstream.enqueue(fake.status(500, delay_s=0.5))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: ask(client, prompt), range(6)))
    assert sorted(a.status_code for a in answers) == [200] * 5 + [502]
    assert slow_upstream.calls == 2


def test_waiters_for_an_answer_that_cannot_be_stored_ask_at_once_not_in_turn(
    build: Callable[..., FlaskClient], slow_upstream: FakeOpenAI, store: dict[str, Any]
) -> None:
    # Six calls of 0.5 s one after another would run past the 2 s deadline; side by side they do not.
    client, prompt = build(cache_max_entry_bytes=10, deadline_s=2.0, **store), question()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: ask(client, prompt), range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert {a.headers["X-Cache"] for a in answers} == {"MISS"}
    assert slow_upstream.calls == 6


def test_a_waiter_gives_up_at_its_own_deadline(build: Callable[..., FlaskClient], upstream: FakeOpenAI) -> None:
    # Two instances sharing Redis: the leader may take 5 s, the waiter only 0.5 s.
    patient, hasty = build(redis_url=SHARED_REDIS), build(redis_url=SHARED_REDIS, deadline_s=0.5)
    prompt = question()
    upstream.enqueue(fake.ok("slow but sure", delay_s=1.5))
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(ask, patient, prompt)
        while upstream.calls == 0 and not leader.done():  # the leader holds the lock once its call is out
            time.sleep(0.01)
        assert upstream.calls == 1, leader.result().get_json()
        waiter = pool.submit(ask, hasty, prompt)
        assert waiter.result().status_code == 504
        assert leader.result().status_code == 200
    assert upstream.calls == 1


def test_redis_stopped_the_cache_is_skipped_and_requests_still_succeed(
    build: Callable[..., FlaskClient],
    upstream: FakeOpenAI,
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llm_service.cache_store

    client, prompt = build(redis_url=private_redis.url), question()
    assert [ask(client, prompt).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    private_redis.stop()
    caplog.set_level(logging.INFO, logger="llm_service")
    during = [ask(client, prompt) for _ in range(3)]
    assert [(a.status_code, a.headers["X-Cache"]) for a in during] == [(200, "BYPASS")] * 3
    warnings = [r for r in caplog.records if r.name == "llm_service.cache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not once per request
    summaries = [r for r in caplog.records if r.name == "llm_service.request"][-3:]
    assert [(r.cache, r.cache_reason) for r in summaries] == [("bypass", "unavailable")] * 3

    private_redis.start()
    monkeypatch.setattr(llm_service.cache_store, "RETRY_AFTER_OUTAGE_S", 0.0)
    assert ask(client, prompt).headers["X-Cache"] == "MISS"  # the fresh Redis has no entry
    assert any(r.name == "llm_service.cache" and "available again" in r.getMessage() for r in caplog.records)
    assert upstream.calls == 5


def test_the_summary_line_and_metrics_show_hits_and_money_saved(
    build: Callable[..., FlaskClient], upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    client, prompt = build(), question()
    caplog.set_level(logging.INFO, logger="llm_service.request")

    def saved() -> float:
        text = client.get("/metrics").get_data(as_text=True)
        lines = [line for line in text.splitlines() if line.startswith("llm_cost_saved_usd_total{")]
        return sum(float(line.split()[-1]) for line in lines if 'model="gpt-4o-mini"' in line)

    before = saved()
    upstream.enqueue(fake.ok(prompt_tokens=1000, completion_tokens=1000))
    ask(client, prompt)
    ask(client, prompt)
    miss, hit = [r for r in caplog.records if r.name == "llm_service.request" and r.path == "/generate"]
    cost = (1000 * 0.15 + 1000 * 0.60) / 1e6
    assert (miss.cache, miss.cost_saved_usd, miss.cost_usd) == ("miss", 0.0, pytest.approx(cost))
    assert (hit.cache, hit.cost_saved_usd, hit.cost_usd) == ("hit", pytest.approx(cost), 0.0)
    assert saved() - before == pytest.approx(cost)
    assert 'llm_cache_requests_total{result="hit"}' in client.get("/metrics").get_data(as_text=True)


CACHE_LOG = [
    '{"logger":"llm_service.request","path":"/generate","status":200,"latency_ms":300.0,"model":"gpt-4o",'
    '"client":"web","tokens_input":100,"tokens_output":50,"tokens_total":150,"cost_usd":0.00075,"cache":"miss",'
    '"cost_saved_usd":0.0}',
    '{"logger":"llm_service.request","path":"/generate","status":200,"latency_ms":2.0,"model":"gpt-4o",'
    '"client":"web","tokens_input":100,"tokens_output":50,"tokens_total":150,"cost_usd":0.0,"cache":"hit",'
    '"cost_saved_usd":0.00075}',
    '{"logger":"llm_service.request","path":"/generate","status":200,"latency_ms":2.0,"model":"gpt-4o",'
    '"client":"batch","tokens_input":100,"tokens_output":50,"tokens_total":150,"cost_usd":0.0,"cache":"hit",'
    '"cost_saved_usd":0.00075}',
    '{"logger":"llm_service.request","path":"/generate","status":200,"latency_ms":200.0,"model":"gpt-4o-mini",'
    '"client":"web","tokens_input":10,"tokens_output":5,"tokens_total":15,"cost_usd":0.0000045,"cache":"bypass",'
    '"cache_reason":"not_deterministic","cost_saved_usd":0.0}',
]


def test_the_log_report_shows_hits_and_money_saved() -> None:
    out = io.StringIO()
    assert report_main(["--json"], stdin=io.StringIO("\n".join(CACHE_LOG)), stdout=out) == 0
    report = json.loads(out.getvalue())
    assert report["cache"] == {
        "hits": 2,
        "misses": 1,
        "bypassed": 1,
        "hit_rate": pytest.approx(2 / 3, abs=1e-4),
        "saved_usd": pytest.approx(0.0015),
        "saved_by_model": {"gpt-4o": pytest.approx(0.0015)},
        "saved_by_client": {"web": pytest.approx(0.00075), "batch": pytest.approx(0.00075)},
    }
    assert report["tokens"] == {"input": 110, "output": 55, "total": 165}  # a hit's tokens were not produced again
    text = io.StringIO()
    report_main([], stdin=io.StringIO("\n".join(CACHE_LOG)), stdout=text)
    assert "hits 2  misses 1  bypassed 1  hit rate 66.67%" in text.getvalue()
    assert "saved USD       0.00150000" in text.getvalue()


def two_instance_env(upstream: FakeOpenAI, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": upstream.url,
        "REDIS_URL": SHARED_REDIS,
        "WEB_CONCURRENCY": "2",
        "RATE_LIMIT": "1000/minute",
        **extra,
    }


@pytest.mark.e2e
@pytest.mark.parametrize("leader_fails", [False, True], ids=["leader-answers", "leader-fails"])
def test_twenty_identical_requests_over_two_instances_make_one_upstream_call(
    upstream: FakeOpenAI, tmp_path: Path, leader_fails: bool
) -> None:
    upstream.default = fake.ok("Shared by twenty.", delay_s=1.0)
    if leader_fails:
        upstream.enqueue(fake.status(500, delay_s=1.0))
    env = two_instance_env(upstream, MAX_RETRIES="0")
    body = {"prompt": question(), "temperature": 0}
    with Service(env, tmp_path / "a.log") as a, Service(env, tmp_path / "b.log") as b, ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: (a, b)[i % 2].generate(body), range(20)))
    statuses = sorted(status for status, _, _ in answers)
    if leader_fails:  # the leader's own answer is the failure; one waiter takes over, the rest wait for it
        assert statuses == [200] * 19 + [502]
        assert upstream.calls == 2
    else:
        assert statuses == [200] * 20
        assert upstream.calls == 1
    hits = [headers["x-cache"] for status, _, headers in answers if status == 200]
    assert hits.count("MISS") == 1 and hits.count("HIT") == len(hits) - 1
    assert {answer["output"] for status, answer, _ in answers if status == 200} == {"Shared by twenty."}

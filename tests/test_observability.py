"""Prometheus metrics across gunicorn workers, readiness and draining, the dashboard, the log report."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_service import create_app
from llm_service.config import Settings
from llm_service.report import main as report_main
from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import ROOT, Service, generate_in_background

DASHBOARD = ROOT / "deploy" / "observability" / "grafana-dashboard.json"


def scrape(service: Service, headers: dict[str, str] | None = None) -> dict[str, list]:
    status, _, raw = service.request("GET", "/metrics", headers=headers)
    assert status == 200
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def service(upstream: FakeOpenAI, tmp_path: Path) -> Iterator[Service]:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": upstream.url,
        "WEB_CONCURRENCY": "3",
        "THREADS": "8",
        "RETRY_DELAY": "0.01",
        "RATE_LIMIT": "1000/minute",
    }
    with Service(env, tmp_path / "service.log") as running:
        yield running


@pytest.mark.e2e
def test_requests_counted_once_across_three_workers(service: Service, upstream: FakeOpenAI) -> None:
    pids = set()
    requests = 30
    for i in range(requests):
        upstream.enqueue(fake.ok(prompt_tokens=100 + i, completion_tokens=10 + i, cached_tokens=i))
        status, body, _ = service.generate({"prompt": f"q{i}"})
        assert status == 200
    for line in service.log_records():
        if line.get("message", "").startswith("Booting worker"):
            pids.add(line["message"])
    assert len(pids) == 3
    samples = scrape(service)
    assert total(samples, "llm_requests_total", endpoint="/generate") == requests
    assert (
        total(
            samples,
            "llm_requests_total",
            endpoint="/generate",
            status_code="200",
            model="gpt-4o-mini",
            client="anonymous",
        )
        == requests
    )
    assert total(samples, "llm_request_duration_seconds_count", endpoint="/generate") == requests
    assert total(samples, "llm_upstream_attempts_total", provider="openai", outcome="ok") == requests
    assert total(samples, "llm_tokens_total", kind="input") == sum(100 + i for i in range(requests))
    assert total(samples, "llm_tokens_total", kind="output") == sum(10 + i for i in range(requests))
    assert total(samples, "llm_tokens_total", kind="cached_input") == sum(range(requests))


@pytest.mark.e2e
def test_cost_metric_matches_the_responses(service: Service, upstream: FakeOpenAI) -> None:
    costs = []
    for tokens in (1000, 2500, 40_000):
        upstream.enqueue(fake.ok(prompt_tokens=tokens, completion_tokens=tokens // 10))
        costs.append(service.generate({"prompt": "Hi"})[1]["metadata"]["cost_usd"])
    samples = scrape(service)
    assert total(samples, "llm_cost_usd_total", model="gpt-4o-mini", client="anonymous") == pytest.approx(sum(costs))


@pytest.mark.e2e
def test_failed_attempts_show_by_outcome(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.status(503), fake.status(429, headers={"retry-after-ms": "1"}), fake.ok())
    assert service.generate({"prompt": "Hi"})[0] == 200
    upstream.enqueue(fake.status(400))
    assert service.generate({"prompt": "Hi"})[0] == 400
    samples = scrape(service)
    for outcome, count in (("server_error", 1), ("rate_limited", 1), ("ok", 1), ("rejected", 1)):
        assert total(samples, "llm_upstream_attempts_total", outcome=outcome) == count, outcome
    assert total(samples, "llm_requests_total", endpoint="/generate", status_code="400") == 1


@pytest.mark.e2e
def test_every_metric_the_dashboard_queries_is_exported(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok(), fake.stream(["a", "b"]))
    service.generate({"prompt": "Hi"})
    service.request("POST", "/generate", {"prompt": "Hi", "stream": True})
    service.generate({"prompt": ""})  # a rejection
    for _ in range(4):  # temperature 0 is cached; four requests on three workers, so at least one is a hit
        service.generate({"prompt": "Cached?", "temperature": 0})
    exported = set(scrape(service))
    queried = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"\bllm_[a-z_]+", target["expr"]))
    assert len(queried) >= 9
    missing = sorted(name for name in queried if name not in exported)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"


@pytest.mark.e2e
def test_ready_turns_503_on_sigterm_while_in_flight_requests_finish(service: Service, upstream: FakeOpenAI) -> None:
    keep_alive = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    keep_alive.request("GET", "/ready")
    first = keep_alive.getresponse()
    assert (first.status, json.loads(first.read())["status"]) == (200, "ready")

    upstream.enqueue(fake.ok("finished", delay_s=2.0))
    caller, result = generate_in_background(service, {"prompt": "Hi"})
    time.sleep(0.5)
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    keep_alive.request("GET", "/ready")  # an open connection still reaches its worker while it drains
    draining = keep_alive.getresponse()
    body = json.loads(draining.read())
    assert draining.status == 503
    assert body["error"]["code"] == "not_ready"
    assert "shutdown" in body["error"]["details"]
    caller.join(10)
    status, answer, _ = result["answer"]
    assert (status, answer["output"]) == (200, "finished")
    assert service.process.wait(15) == 0


@pytest.mark.e2e
def test_dead_workers_leave_no_in_flight_behind(upstream: FakeOpenAI, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url, "WEB_CONCURRENCY": "1"}
    with Service(env, tmp_path / "s.log") as service:
        upstream.enqueue(fake.ok(delay_s=5))

        def slow_call() -> None:
            with contextlib.suppress(OSError):  # its worker is about to be killed
                service.generate({"prompt": "Hi"}, timeout_s=10)

        threading.Thread(target=slow_call, daemon=True).start()
        time.sleep(0.5)
        assert total(scrape(service), "llm_in_flight_requests") == 2  # the slow call and this scrape
        (worker_pid,) = [
            int(m)
            for r in service.log_records()
            for m in re.findall(r"Booting worker with pid: (\d+)", r.get("message", ""))
        ]
        os.kill(worker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                if service.request("GET", "/health", timeout_s=2)[0] == 200:
                    break
            except OSError:
                continue
        assert total(scrape(service), "llm_in_flight_requests") == 1  # only this scrape


def test_in_flight_gauge_drops_even_when_recording_a_request_fails(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_service.metrics import IN_FLIGHT
    from llm_service.web import record as hooks  # the request record moved to web/record.py

    def refuse(*args: object) -> None:
        raise ValueError("Counters can only be incremented by non-negative amounts.")

    monkeypatch.setattr(hooks, "record_request", refuse)
    app = create_app(make_settings())
    app.config["TESTING"] = False  # the unhandled-error path, as served
    before = IN_FLIGHT._value.get()
    assert app.test_client().get("/health").status_code == 500
    assert IN_FLIGHT._value.get() == before


def test_metrics_token_is_required_when_set(make_settings: Callable[..., Settings]) -> None:
    client = create_app(make_settings(metrics_token="scrape-me")).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert response.status_code == 200
    assert b"llm_requests_total" in response.data


def test_ready_is_503_with_reasons_when_redis_does_not_answer_and_limits_fail_closed(
    make_settings: Callable[..., Settings],
) -> None:
    from tests.servers import free_port

    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_fail_open=False)
    client = create_app(settings).test_client()
    response = client.get("/ready")
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "not_ready"
    assert set(error["details"]) == {"redis"}
    assert client.get("/health").status_code == 200  # liveness does not depend on Redis


def test_ready_stays_200_and_says_degraded_when_redis_is_down_but_limits_fail_open(
    make_settings: Callable[..., Settings],
) -> None:
    """Every replica still serves without limits: pulling them all from the load balancer would be an outage."""
    from tests.servers import free_port

    client = create_app(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    response = client.get("/ready")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready"
    assert set(body["degraded"]) == {"redis"}


def test_ready_is_200_when_everything_answers(client) -> None:
    response = client.get("/ready")
    assert (response.status_code, response.get_json()["status"]) == (200, "ready")


# --- the log report ---

HAND_LOG = [
    '{"level":"INFO","logger":"gunicorn.error","message":"Booting worker"}',
    "not json at all",
    '2026-11-27T10:00:00+00:00 app[web.1]: {"logger":"llm_service.request","request_id":"a","path":"/generate",'
    '"status":200,"latency_ms":100.0,"model":"gpt-4o-mini","client":"web","tokens_input":10,"tokens_output":5,'
    '"tokens_total":15,"cost_usd":0.0000045}',
    '{"logger":"llm_service.request","request_id":"b","path":"/generate","status":200,"latency_ms":300.0,'
    '"model":"gpt-4o","client":"web","tokens_input":100,"tokens_output":50,"tokens_total":150,"cost_usd":0.00075}',
    '{"logger":"llm_service.request","request_id":"c","path":"/generate","status":502,"latency_ms":2000.0,'
    '"model":"gpt-4o","client":"batch","error_code":"upstream_error"}',
    '{"logger":"llm_service.request","request_id":"d","path":"/generate","status":429,"latency_ms":1.0,'
    '"client":"batch","error_code":"rate_limited"}',
    '{"logger":"llm_service.request","request_id":"e","path":"/generate","status":200,"latency_ms":200.0,'
    '"model":"gpt-4o-mini","client":"batch","tokens_input":20,"tokens_output":10,"tokens_total":30,'
    '"cost_usd":0.000009}',
    '{"logger":"llm_service.request","request_id":"h","path":"/health","status":200,"latency_ms":0.2}',
]


def test_report_figures_match_a_hand_computed_log(tmp_path: Path) -> None:
    path = tmp_path / "service.log"
    path.write_text("\n".join(HAND_LOG) + "\n")
    out = io.StringIO()
    assert report_main(["--json", "--slowest", "2", str(path)], stdout=out) == 0
    report = json.loads(out.getvalue())
    assert report["requests"] == 5  # /health and non-summary lines left out
    assert report["errors"] == 2
    assert report["error_rate"] == 0.4
    assert report["errors_by_code"] == {
        "upstream_error": {"count": 1, "rate": 0.2},
        "rate_limited": {"count": 1, "rate": 0.2},
    }
    # sorted latencies 1, 100, 200, 300, 2000: nearest rank p50 = 3rd, p95 = p99 = 5th
    assert report["latency_ms"] == {"p50": 200.0, "p95": 2000.0, "p99": 2000.0, "max": 2000.0}
    assert report["tokens"] == {"input": 130, "output": 65, "total": 195}
    assert report["cost_usd"]["total"] == pytest.approx(0.0007635)
    assert report["cost_usd"]["by_model"] == pytest.approx({"gpt-4o": 0.00075, "gpt-4o-mini": 0.0000135})
    assert report["cost_usd"]["by_client"] == pytest.approx({"web": 0.0007545, "batch": 0.000009})
    assert [r["request_id"] for r in report["slowest"]] == ["c", "b"]


def test_report_reads_stdin_and_prints_text() -> None:
    out = io.StringIO()
    assert report_main([], stdin=io.StringIO("\n".join(HAND_LOG)), stdout=out) == 0
    text = out.getvalue()
    assert "requests        5" in text
    assert "error rate      40.00% (2 errors)" in text
    assert "upstream_error" in text and "0.00076350" in text


def test_report_on_a_missing_file_says_so_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_main([str(tmp_path / "service.log")], stdout=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "make run | tee service.log" in err and "Traceback" not in err


def test_report_on_an_empty_log_prints_dashes_not_none() -> None:
    out = io.StringIO()
    assert report_main([], stdin=io.StringIO(""), stdout=out) == 0
    assert "None" not in out.getvalue() and "p50 -" in out.getvalue()

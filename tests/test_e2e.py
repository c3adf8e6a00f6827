"""The Procfile's gunicorn, over a real socket, against the fault-injecting upstream."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import ROOT, Service, free_port, generate_in_background, start_up_failure

pytestmark = pytest.mark.e2e

SECRET_KEY = "sk-e2e-secret-key-must-never-be-logged-0123456789"
PROMPT = "A prompt that must never appear in the logs"
OUTPUT = "An answer that must never appear in the logs"


# Every test here runs on both worker models a deployment can choose (WORKER_CLASS): gevent, the default,
# and gthread.
@pytest.fixture(params=["gevent", "gthread"])
def service(request: pytest.FixtureRequest, upstream: FakeOpenAI, tmp_path: Path) -> Iterator[Service]:
    env = {
        "OPENAI_API_KEY": SECRET_KEY,
        "OPENAI_BASE_URL": upstream.url,
        "RETRY_DELAY": "0.01",
        "WEB_CONCURRENCY": "2",
        "WORKER_CLASS": request.param,
        "THREADS": "16",
        "DEADLINE": "10",
    }
    with Service(env, tmp_path / "service.log") as running:
        yield running


def summary_lines(service: Service) -> list[dict]:
    return [r for r in service.log_records() if r.get("logger") == "llm_service.request"]


def test_generate_over_http_and_every_log_line_is_json(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok(OUTPUT, prompt_tokens=100, completion_tokens=50))
    status, body, headers = service.generate({"prompt": PROMPT}, headers={"X-Request-ID": "e2e-1"})
    assert status == 200
    assert body["output"] == OUTPUT
    assert headers["x-request-id"] == "e2e-1"

    service.stop()
    lines = service.log_lines()
    assert lines, "the service wrote no log"
    for line in lines:
        json.loads(line)  # every line, gunicorn's included, is one JSON object
    text = "\n".join(lines)
    assert PROMPT not in text and OUTPUT not in text and SECRET_KEY not in text

    (summary,) = [r for r in summary_lines(service) if r["path"] == "/generate"]
    assert summary["request_id"] == "e2e-1"
    assert summary["status"] == 200
    assert summary["method"] == "POST"
    assert summary["model"] == "gpt-4o-mini"
    assert summary["provider"] == "openai"
    assert len(summary["prompt_hash"]) == 16
    assert summary["prompt_length"] == len(PROMPT)
    assert summary["response_length"] == len(OUTPUT)
    assert (summary["tokens_input"], summary["tokens_output"], summary["tokens_total"]) == (100, 50, 150)
    assert summary["cost_usd"] == pytest.approx((100 * 0.15 + 50 * 0.60) / 1e6)
    assert summary["attempts"] == 1
    assert summary["upstream_request_id"].startswith("req_fake_")
    assert summary["latency_ms"] > 0


def test_retries_are_logged_with_attempt_wait_and_reason(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.status(503), fake.ok())
    status, body, _ = service.generate({"prompt": "Hi"})
    assert status == 200 and body["metadata"]["attempts"] == 2
    service.stop()
    (retry,) = [r for r in service.log_records() if r.get("logger") == "llm_service.retry"]
    assert retry["level"] == "WARNING"
    assert (retry["attempt"], retry["reason"]) == (1, "status_503")
    assert retry["wait_s"] >= 0
    assert retry["request_id"] == body["request_id"]


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_readme_jq_recipes_run_on_the_raw_log(service: Service, upstream: FakeOpenAI) -> None:
    for tokens in (1000, 2000):
        upstream.enqueue(fake.ok(prompt_tokens=tokens, completion_tokens=0))
        service.generate({"prompt": "Hi"})
    service.stop()
    recipes = readme_jq_recipes()
    assert len(recipes) >= 3
    for recipe in recipes:
        result = subprocess.run(
            ["jq", *recipe], stdin=service.log_path.open("rb"), capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, (recipe, result.stderr)
    total_cost = subprocess.run(
        ["jq", *recipes[0]], stdin=service.log_path.open("rb"), capture_output=True, text=True, check=True
    ).stdout
    assert float(total_cost) == pytest.approx(3000 * 0.15 / 1e6)


def readme_jq_recipes() -> list[list[str]]:
    """Return the argument lists of the README's `jq ... < service.log` lines, in order."""
    import shlex

    recipes = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("jq ") and line.rstrip().endswith("< service.log"):
            recipes.append(shlex.split(line.removeprefix("jq ").rsplit("<", 1)[0]))
    return recipes


def test_sigterm_lets_in_flight_requests_finish(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok("finished", delay_s=1.5))
    caller, result = generate_in_background(service, {"prompt": "Hi"})
    time.sleep(0.5)
    assert service.process is not None
    service.process.terminate()
    caller.join(10)
    status, body, _ = result["answer"]
    assert (status, body["output"]) == (200, "finished")
    assert service.process.wait(15) == 0


def test_clients_that_never_finish_headers_do_not_block_others(service: Service, upstream: FakeOpenAI) -> None:
    if service.env["WORKER_CLASS"] != "gevent":
        pytest.skip("only gevent workers cut off slow clients (README, Capacity)")
    stalled = []
    for _ in range(12):
        sock = socket.create_connection(("127.0.0.1", service.port))
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        stalled.append(sock)
    try:
        started = time.monotonic()
        for _ in range(20):
            status, _, _ = service.generate({"prompt": "Hi"}, timeout_s=5)
            assert status == 200
        assert time.monotonic() - started < 10
    finally:
        for sock in stalled:
            sock.close()


def test_oversized_header_is_refused_by_gunicorn_in_the_envelope(service: Service) -> None:
    # limit_request_field_size in gunicorn.conf.py: 431 Request Header Fields Too Large, refused before the app.
    status, headers, raw = service.request("GET", "/health", headers={"X-Big": "x" * 9000})
    assert status == 431
    assert headers["content-type"] == "application/json"
    error = json.loads(raw)["error"]
    assert error["code"] == "headers_too_large"
    assert error["request_id"] == headers["x-request-id"]


def test_unparseable_request_is_answered_in_the_envelope_without_echoing_it(service: Service) -> None:
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(b"GET /health?api_key=sk-secret HTTP/9.9\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert b"sk-secret" not in answer


def test_bad_settings_stop_start_up_with_one_message(tmp_path: Path) -> None:
    message = start_up_failure({"OPENAI_API_KEY": "sk-x", "MAX_CHARS": "many", "TIMEOUT": "-1"}, tmp_path)
    assert "MAX_CHARS" in message and "TIMEOUT" in message


@pytest.mark.local_model
def test_a_missing_local_model_file_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    # Checked once the settings themselves are valid (a valid PORT too), still in gunicorn's master.
    message = start_up_failure({"LOCAL_MODEL_PATH": str(tmp_path / "nowhere.gguf"), "PORT": str(free_port())}, tmp_path)
    assert "LOCAL_MODEL_PATH" in message and "nowhere.gguf" in message


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_stream_still_running_at_the_end_of_a_shutdown_ends_with_an_error_event(
    upstream: FakeOpenAI, tmp_path: Path, worker_class: str
) -> None:
    # DEADLINE 2: gunicorn's grace period is 7 s, so a stream still running 5 s after SIGTERM is ended.
    upstream.enqueue(fake.stream([f"word{i} " for i in range(100)], interval_s=0.1))
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.url, "DEADLINE": "2", "WEB_CONCURRENCY": "1"}
    env["WORKER_CLASS"] = worker_class
    with Service(env, tmp_path / "service.log") as service:
        events: list[bytes] = []

        def read() -> None:
            conn = socket.create_connection(("127.0.0.1", service.port), timeout=30)
            body = json.dumps({"prompt": "Count.", "stream": True})
            conn.sendall(
                f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
            )
            with conn, conn.makefile("rb") as answer:
                events.extend(line for line in answer if line.startswith((b"event:", b"data:")))

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(1.0)
        assert service.process is not None
        service.process.terminate()
        reader.join(20)
        assert service.process.wait(20) == 0
    assert events[-2] == b"event: error\n"
    assert json.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "shutting_down"
    assert 20 < sum(line == b"event: delta\n" for line in events) < 100
    (summary,) = [r for r in summary_lines(service) if r["path"] == "/generate"]
    assert (summary["status"], summary["error_code"]) == (503, "shutting_down")

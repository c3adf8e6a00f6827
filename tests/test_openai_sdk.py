"""Real OpenAI clients against the Procfile's gunicorn: the Python SDK, the npm package from Node, schemathesis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import ROOT, Service

pytestmark = pytest.mark.e2e

KEY = "python-sdk-key-0123456789"
LIMITED_KEY = "limited-sdk-key-0123456789"
MAX_CHARS = 500
NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    server.default = fake.auto()
    yield server
    server.stop()


# The SDKs (Python and Node) and schemathesis drive both worker models a deployment can choose.
@pytest.fixture(scope="module", params=["gevent", "gthread"])
def service(
    request: pytest.FixtureRequest, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("sdk")
    clients_file = folder / "clients.json"
    clients_file.write_text(json.dumps({"limited": {"rate_limit": "2/minute"}}))
    env = {
        "OPENAI_API_KEY": "sk-test-not-a-real-key-0000000000",
        "OPENAI_BASE_URL": upstream.url,
        "API_KEYS": f"sdk={KEY},limited={LIMITED_KEY}",
        "CLIENTS_FILE": str(clients_file),
        "RATE_LIMIT": "100000/minute",
        "MAX_CHARS": str(MAX_CHARS),
        "MAX_RETRIES": "0",
        "WEB_CONCURRENCY": "2",
        "WORKER_CLASS": request.param,
    }
    with Service(env, folder / "service.log") as running:
        yield running


def sdk(service: Service, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/v1", api_key=key, max_retries=0, timeout=20)


def ask(client: openai.OpenAI, **options: object) -> object:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello."}], **options
    )


def test_python_sdk_plain_and_streamed_answers_agree(service: Service) -> None:
    client = sdk(service)
    plain = ask(client)
    assert plain.choices[0].message.content == "Hello from the fake upstream."
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (12, 7)
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_python_sdk_raises_a_failure_after_the_first_chunk(service: Service, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.stream(["one ", "two ", "three"], fail_after=2))
    received = []
    with pytest.raises(openai.APIError, match="The model provider failed to answer"):
        for chunk in ask(sdk(service), stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one two "  # what came before the failure, and no clean end after it


def test_python_sdk_reads_headers_and_lists_models(service: Service) -> None:
    raw = sdk(service).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
    )
    assert raw.headers["x-request-id"] and raw.request_id == raw.headers["x-request-id"]
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 100000
    models = [model.id for model in sdk(service).models.list()]
    assert "gpt-4o-mini" in models and "gpt-4o" in models
    assert sdk(service).models.retrieve("gpt-4o-mini").owned_by == "openai"
    with pytest.raises(openai.NotFoundError):
        sdk(service).models.retrieve("gpt-9")


def test_python_sdk_raises_its_own_errors(service: Service, upstream: FakeOpenAI) -> None:
    calls = upstream.calls
    with pytest.raises(openai.AuthenticationError) as bad_key:
        ask(sdk(service, key="wrong-key"))
    assert bad_key.value.status_code == 401 and bad_key.value.code == "unauthorized"
    with pytest.raises(openai.BadRequestError) as too_long:
        client = sdk(service)
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 600}])
    assert too_long.value.param == "messages"
    with pytest.raises(openai.NotFoundError):
        sdk(service).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    assert upstream.calls == calls  # none of these reached the upstream
    limited = sdk(service, key=LIMITED_KEY)
    ask(limited)
    ask(limited)
    with pytest.raises(openai.RateLimitError) as limited_error:
        ask(limited)
    assert limited_error.value.code == "rate_limited"
    assert 1 <= int(limited_error.value.response.headers["retry-after"]) <= 60


def test_summary_line_of_an_sdk_call(service: Service) -> None:
    raw = sdk(service).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Count to three."}]
    )
    request_id = raw.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [r for r in service.log_records() if r.get("logger") == "llm_service.request"]
        summary = next((r for r in lines if r.get("request_id") == request_id), None)
        if summary:
            break
        time.sleep(0.05)
    assert summary is not None
    assert (summary["path"], summary["status"], summary["client"]) == ("/v1/chat/completions", 200, "sdk")
    assert summary["tokens_total"] == 19 and len(summary["prompt_hash"]) == 16
    assert summary["cost_usd"] == pytest.approx((12 * 0.15 + 7 * 0.60) / 1e6)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_npm_openai_package_streams_from_node(service: Service) -> None:
    if not (NODE_DIR / "node_modules" / "openai").exists():
        pytest.fail("the npm openai package is not installed: run `make test` (npm ci --prefix tests/node)")
    env = {
        **os.environ,
        "SERVICE_URL": f"http://127.0.0.1:{service.port}/v1",
        "SERVICE_KEY": KEY,
        "SERVICE_MODEL": "gpt-4o-mini",
    }
    result = subprocess.run(
        ["node", str(NODE_DIR / "stream.mjs")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["text"] == "Hello from the fake upstream."
    assert seen["usage"]["total_tokens"] == 19
    assert seen["chunks"] >= 5  # a role chunk, a chunk a word, the finish chunk, the usage chunk


def test_schemathesis_finds_no_server_error_and_no_schema_violation(service: Service, tmp_path: Path) -> None:
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"http://127.0.0.1:{service.port}/openapi.json",
        "--checks",
        ",".join(checks),
        "--max-examples",
        "25",
        "--generation-deterministic",
        "--workers",
        "1",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--request-timeout",
        "20",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "8 selected / 8 total" in result.stdout
    assert " passed" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1]

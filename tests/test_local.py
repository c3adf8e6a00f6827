"""The embedded model, run for real: SmolLM2-135M-Instruct through llama.cpp."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from llm_service import create_app
from llm_service.client_watch import ClientGone, ClientWatch
from llm_service.config import Settings
from llm_service.errors import LocalModelBusy, UpstreamRejected, UpstreamTimeout
from llm_service.providers.base import Completion, GenerationParams
from llm_service.providers.local import LocalProvider
from tests.servers import Service

pytest.importorskip("llama_cpp", reason="the local model is installed by `make test`")
pytestmark = pytest.mark.local_model

QUESTION = "What is the capital of France?"
MODEL = "smollm2-135m-instruct"
LONG = GenerationParams.from_prompt(
    prompt="Write a long essay on the history of Rome.", model=MODEL, max_tokens=1500, temperature=0
)
SHORT = GenerationParams.from_prompt("Hi", model=MODEL, max_tokens=4)


@pytest.fixture(scope="module")
def local_settings() -> Settings:
    # The response cache off: these tests are about the model's own answers, not repeats served from memory.
    return Settings.from_env({"LOCAL_THREADS": "1", "CACHE_MODE": "off"})


@pytest.fixture(scope="module")
def local_client(local_settings: Settings) -> FlaskClient:
    return create_app(local_settings).test_client()


@pytest.fixture(scope="module")
def provider(local_settings: Settings) -> LocalProvider:
    local = LocalProvider(local_settings)
    local.warm_up()
    return local


def test_local_model_answers_with_real_text_and_token_counts(local_client: FlaskClient) -> None:
    response = local_client.post("/generate", json={"prompt": QUESTION, "max_tokens": 48})
    assert response.status_code == 200
    body = response.get_json()
    assert body["output"].strip()
    meta = body["metadata"]
    assert (meta["provider"], meta["model"]) == ("local", "smollm2-135m-instruct")
    tokens = meta["tokens"]
    assert 8 < tokens["input"] < 100  # the question inside the GGUF's chat template
    assert 0 < tokens["output"] <= 48
    assert tokens["total"] == tokens["input"] + tokens["output"]
    assert meta["finish_reason"] in ("stop", "length")
    assert meta["cost_usd"] == 0


def test_temperature_zero_is_deterministic(local_client: FlaskClient) -> None:
    outputs = {
        local_client.post("/generate", json={"prompt": QUESTION, "temperature": 0, "max_tokens": 24}).get_json()[
            "output"
        ]
        for _ in range(3)
    }
    assert len(outputs) == 1


def test_max_tokens_is_respected(local_client: FlaskClient) -> None:
    body = local_client.post(
        "/generate", json={"prompt": "Write a long story about a dragon.", "max_tokens": 5, "temperature": 0}
    )
    meta = body.get_json()["metadata"]
    assert meta["tokens"]["output"] == 5
    assert meta["finish_reason"] == "length"


def test_system_message_changes_the_prompt(local_client: FlaskClient) -> None:
    plain = local_client.post("/generate", json={"prompt": QUESTION, "max_tokens": 1}).get_json()
    with_system = local_client.post(
        "/generate", json={"prompt": QUESTION, "system": "You answer in one word.", "max_tokens": 1}
    ).get_json()
    assert plain["metadata"]["tokens"]["input"] != with_system["metadata"]["tokens"]["input"]


def test_generation_is_cut_at_the_deadline(provider: LocalProvider) -> None:
    params = GenerationParams.from_prompt(
        "Count from one to one thousand.", model="smollm2-135m-instruct", max_tokens=1500, seed=0
    )  # a fixed seed: an answer that runs long every time (a fresh seed may draw one that ends early)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        provider.complete(params, time.monotonic() + 0.5)
    assert time.monotonic() - started < 1.5


# About 1,600 tokens: evaluating it takes this machine over ten seconds, in pieces the deadline can cut.
LONG_PROMPT = GenerationParams.from_prompt(
    "The quick brown fox jumps over the lazy dog. " * 160, model=MODEL, max_tokens=10, temperature=0
)


def test_a_long_prompt_is_cut_at_the_deadline_before_any_token(provider: LocalProvider) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        provider.complete(LONG_PROMPT, time.monotonic() + 1.0)
    assert time.monotonic() - started < 2.5
    # The model is free again at once: a short request right after is answered.
    assert provider.complete(SHORT, time.monotonic() + 10).usage is not None


def test_a_long_prompt_stream_is_cut_at_the_deadline_before_its_first_token(provider: LocalProvider) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        list(provider.stream(LONG_PROMPT, time.monotonic() + 1.0))
    assert time.monotonic() - started < 2.5


def test_a_stream_runs_past_the_deadline_once_its_first_token_is_out(provider: LocalProvider) -> None:
    # DEADLINE bounds the wait for the first token only; STREAM_DEADLINE (300 s) bounds the rest. The first
    # token of this short prompt comes well inside 1.5 s; 300 tokens take about 6 s here (LOCAL_THREADS=1).
    started = time.monotonic()
    items = list(provider.stream(dataclasses.replace(LONG, max_tokens=300), time.monotonic() + 1.5))
    assert time.monotonic() - started > 1.5
    last = items[-1]
    assert isinstance(last, Completion) and last.finish_reason == "length"
    assert last.usage is not None and last.usage.output == 300


def test_waiting_for_a_busy_model_is_bounded_by_the_deadline(provider: LocalProvider) -> None:
    holder_done: list[float] = []

    def hold() -> None:
        try:
            provider.complete(LONG, time.monotonic() + 2.0)
        except UpstreamTimeout:
            pass
        holder_done.append(time.monotonic())

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(LocalModelBusy):
        provider.complete(SHORT, time.monotonic() + 0.3)
    rejected = time.monotonic()
    assert rejected - started < 1.0
    holder.join()
    assert holder_done[0] > rejected  # the model really was busy when the short request gave up


def test_prompt_beyond_the_context_window_is_rejected(provider: LocalProvider) -> None:
    params = GenerationParams.from_prompt("word " * 3000, model="smollm2-135m-instruct", max_tokens=100)
    with pytest.raises(UpstreamRejected):
        provider.complete(params, time.monotonic() + 10)


@pytest.fixture(scope="module")
def local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log_path: Path = tmp_path_factory.mktemp("local") / "service.log"
    env = {"WEB_CONCURRENCY": "2", "THREADS": "8", "LOCAL_THREADS": "1", "CACHE_MODE": "off"}
    with Service(env, log_path) as running:
        yield running


@pytest.mark.e2e
def test_procfile_starts_on_the_local_model_without_any_key(local_service: Service) -> None:
    status, body, _ = local_service.generate({"prompt": QUESTION, "max_tokens": 32})
    assert status == 200
    assert body["metadata"]["provider"] == "local"
    assert body["output"].strip()
    chosen = [r for r in local_service.log_records() if r.get("message") == "service configured"]
    assert chosen and chosen[0]["provider"] == "local"
    assert "no OPENAI_API_KEY" in chosen[0]["provider_reason"]


@pytest.mark.e2e
def test_eight_concurrent_requests_all_succeed(local_service: Service) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: local_service.generate({"prompt": f"Say {i}.", "max_tokens": 16}), range(8)))
    assert [status for status, _, _ in results] == [200] * 8
    assert all(body["output"].strip() for _, body, _ in results)


def test_local_model_streams_the_same_answer_with_the_same_token_counts(local_client: FlaskClient) -> None:
    body = {"prompt": QUESTION, "temperature": 0, "max_tokens": 40}
    whole = local_client.post("/generate", json=body).get_json()
    streamed = local_client.post("/generate", json={**body, "stream": True})
    assert streamed.mimetype == "text/event-stream"
    blocks = [b for b in streamed.get_data(as_text=True).split("\n\n") if b.strip()]
    events = [
        (b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: "))) for b in blocks
    ]
    deltas = [data["delta"] for name, data in events if name == "delta"]
    name, done = events[-1]
    assert name == "done" and len(deltas) > 1
    assert "".join(deltas) == done["output"] == whole["output"]
    assert done["metadata"]["tokens"] == whole["metadata"]["tokens"]
    assert done["metadata"]["finish_reason"] == whole["metadata"]["finish_reason"]


def test_abandoned_stream_frees_the_model_at_once(provider: LocalProvider) -> None:
    items = provider.stream(LONG, time.monotonic() + 5)
    next(items), next(items)
    items.close()  # what the view does when the client goes away
    started = time.monotonic()
    provider.complete(SHORT, time.monotonic() + 1.0)  # would be LocalModelBusy if the model ran on
    assert time.monotonic() - started < 1.0


@pytest.mark.e2e
def test_openai_sdk_gets_the_same_answer_plain_and_streamed_from_the_local_model(local_service: Service) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{local_service.port}/v1", api_key="unused", max_retries=0)
    request = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": QUESTION}],
        "temperature": 0,
        "seed": 3,
        "max_tokens": 40,
    }
    plain = client.chat.completions.create(**request)
    assert plain.model == MODEL and plain.choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage == plain.usage and plain.usage is not None and plain.usage.completion_tokens > 0
    assert [model.id for model in client.models.list()] == [MODEL]


@pytest.mark.e2e
def test_local_model_honours_stop_and_json_response_format(local_service: Service) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{local_service.port}/v1", api_key="unused", max_retries=0)
    counting = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    free = client.chat.completions.create(model=MODEL, messages=counting, temperature=0, max_tokens=40)
    assert "5" in (free.choices[0].message.content or "")
    stopped = client.chat.completions.create(model=MODEL, messages=counting, temperature=0, max_tokens=40, stop=["5"])
    assert "5" not in (stopped.choices[0].message.content or "")
    as_json = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with a field name set to Paris."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(as_json.choices[0].message.content or ""), dict)


def test_a_client_that_leaves_stops_the_running_generation(provider: LocalProvider) -> None:
    # The wait for the model asks the client's socket every 0.1 s (threads); its close stops the model.
    server, client = socket.socketpair()
    threading.Timer(1.0, client.close).start()  # the prompt takes about 0.4 s here, then tokens come
    started = time.monotonic()
    with server, pytest.raises(ClientGone) as gone, ClientWatch(server):
        provider.complete(LONG, time.monotonic() + 10)
    assert time.monotonic() - started < 1.5
    assert gone.value.output_tokens and gone.value.input_tokens  # it ran, and says how far
    started = time.monotonic()
    provider.complete(SHORT, time.monotonic() + 1.0)  # would be LocalModelBusy if the model ran on
    assert time.monotonic() - started < 1.0


def test_a_client_that_leaves_while_its_request_waits_its_turn_uses_nothing(provider: LocalProvider) -> None:
    holder = threading.Thread(
        target=lambda: provider.complete(dataclasses.replace(LONG, max_tokens=60), time.monotonic() + 10)
    )
    holder.start()
    time.sleep(0.2)
    server, client = socket.socketpair()
    client.close()
    with server, pytest.raises(ClientGone) as gone, ClientWatch(server):
        provider.complete(SHORT, time.monotonic() + 10)
    assert (gone.value.input_tokens, gone.value.output_tokens) == (0, 0)
    holder.join()

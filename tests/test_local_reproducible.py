"""The local model as a reproducible function: temperature 0 answers alike everywhere, sampling draws fresh seeds.

llama.cpp reused the previous prompt's KV cache, so at temperature 0 the same request answered differently
by what the worker had served before; and a fixed sampling seed made temperature 1 repeat itself.
The response cache is off here: these tests are about the model, not about repeats served from memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_service.config import Settings
from llm_service.providers.base import GenerationParams
from llm_service.providers.local import LocalProvider
from tests.servers import Service

pytest.importorskip("llama_cpp", reason="the local model is installed by `make test`")
pytestmark = pytest.mark.local_model

COLORS = {"prompt": "List three colors.", "max_tokens": 12}
# Other questions between the repeats, so that each worker has served something else before.
OTHERS = ["What is the capital of France?", "List three animals.", "Count to five."]


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    local = LocalProvider(Settings.from_env({"LOCAL_THREADS": "1"}))
    local.warm_up()
    return local


def test_the_same_prompt_twice_in_a_row_gives_the_same_answer(provider: LocalProvider) -> None:
    greedy = GenerationParams.from_prompt(
        "List three colors.", model="smollm2-135m-instruct", max_tokens=12, temperature=0
    )
    # Before the fix, the second answer differed: the prompt's KV cache was reused from the first.
    answers = [provider.complete(greedy, deadline_monotonic=time.monotonic() + 60).text for _ in range(3)]
    assert len(set(answers)) == 1


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log_path: Path = tmp_path_factory.mktemp("reproducible") / "service.log"
    env = {"WEB_CONCURRENCY": "2", "THREADS": "4", "LOCAL_THREADS": "1", "CACHE_MODE": "off"}
    with Service(env, log_path) as running:
        yield running


def answers(service: Service, body: dict[str, object], count: int) -> list[str]:
    """Ask `body` `count` times over fresh connections (so either worker may answer), other questions between."""
    outputs = []
    for index in range(count):
        if index % 2:
            service.generate({"prompt": OTHERS[index % len(OTHERS)], "max_tokens": 8, "temperature": 0})
        status, answer, _ = service.generate(body)
        assert status == 200, answer
        outputs.append(answer["output"])
    return outputs


@pytest.mark.e2e
def test_temperature_0_gives_one_answer_over_two_workers(two_workers: Service) -> None:
    assert len(set(answers(two_workers, {**COLORS, "temperature": 0}, 6))) == 1


@pytest.mark.e2e
def test_temperature_1_draws_a_fresh_seed_per_request(two_workers: Service) -> None:
    assert len(set(answers(two_workers, {**COLORS, "temperature": 1}, 6))) >= 2


@pytest.mark.e2e
def test_a_given_seed_samples_the_same_answer_again(two_workers: Service) -> None:
    chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": COLORS["prompt"]}]}
    body = {**chat, "max_tokens": 12, "temperature": 1, "seed": 1234}
    outputs = set()
    for _ in range(4):
        status, _, raw = two_workers.request("POST", "/v1/chat/completions", body)
        assert status == 200
        outputs.add(json.loads(raw)["choices"][0]["message"]["content"])
    assert len(outputs) == 1

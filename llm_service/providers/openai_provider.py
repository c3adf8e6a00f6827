"""The OpenAI-compatible backend: the official client, one retry loop, a deadline on every socket."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx2
import openai

from ..circuit import HALF_OPEN, Circuit
from ..config import Settings
from ..errors import UpstreamUnavailable
from ..metrics import record_attempt
from .base import Completion, GenerationParams, TextDelta
from .deadline import DeadlineTransport, deadline
from .openai_stream import OpenStream
from .openai_translate import UPSTREAM_ERRORS, token_usage, translate
from .retry import RetryBudget, RetryPolicy

CHAT_PATH = "/chat/completions"
# Attempt outcomes that count against an upstream's circuit: it is failing, not refusing this request.
CIRCUIT_FAILURES = frozenset({"server_error", "timeout", "connection_error"})


class OpenAIProvider:
    """Chat completions from any OpenAI-compatible server."""

    name = "openai"
    unpriced_cost_usd: Decimal | None = None  # a model without a price has an unknown cost, never a guessed one

    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "openai",
        budget: RetryBudget | None = None,
        circuit: Circuit | None = None,
    ) -> None:
        self._settings = settings
        self.name = name  # the upstream's name in MODELS_FILE: metrics and logs say which one answered
        self._circuit = circuit
        self._policy = RetryPolicy(
            max_retries=settings.max_retries,
            base_delay_s=settings.retry_delay_s,
            max_delay_s=settings.retry_max_delay_s,
            budget=budget,
        )
        # OpenAI's own API wants max_completion_tokens (reasoning models refuse max_tokens);
        # most compatible servers (vLLM, Ollama, llama.cpp) know only max_tokens.
        base_url = settings.openai_base_url
        is_openai = not base_url or urllib.parse.urlsplit(base_url).hostname == "api.openai.com"
        self._max_tokens_param = "max_completion_tokens" if is_openai else "max_tokens"
        self._client: openai.OpenAI | None = None
        self._client_pid: int | None = None
        self._client_lock = threading.Lock()

    def client(self) -> openai.OpenAI:
        """Return this process's client, made on first use so that each forked worker has its own pool."""
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            with self._client_lock:
                if self._client is None or self._client_pid != pid:
                    self._client = openai.OpenAI(
                        api_key=self._settings.openai_api_key or "unused",
                        base_url=self._settings.openai_base_url,
                        max_retries=0,  # backoff owns the one retry loop
                        timeout=self._settings.timeout_s,
                        http_client=openai.DefaultHttpxClient(
                            transport=DeadlineTransport(max_in_flight=self._settings.max_in_flight)
                        ),
                    )
                    self._client_pid = pid
        return self._client

    def is_ready(self) -> bool:
        """Return whether there is an upstream to call: a key, or a base URL (many local servers need no key)."""
        return bool(self._settings.openai_api_key or self._settings.openai_base_url)

    def warm_up(self) -> None:
        """Build the client and its platform headers now, so the first requests don't pay for them."""
        # The SDK finds its platform headers once per process by running `uname -p` in a subprocess; left
        # to the first requests, every one of a burst that arrived together forked a copy of the worker.
        self.client().platform_headers()

    def _body(self, params: GenerationParams) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": params.model,
            "messages": params.chat_messages(),
            self._max_tokens_param: params.max_tokens,
        }
        optional = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(params.stop) or None,
            "seed": params.seed,
            "response_format": params.response_format,
        }
        args.update((name, value) for name, value in optional.items() if value is not None)
        return args

    @staticmethod
    def _options(attempt_deadline: float) -> Any:
        return {"timeout": max(attempt_deadline - time.monotonic(), 0.001)}

    def _attempt_deadline(self, deadline_monotonic: float) -> float:
        return min(deadline_monotonic, time.monotonic() + self._settings.timeout_s)

    def complete(self, params: GenerationParams, deadline_monotonic: float) -> Completion:
        client = self.client()
        body = self._body(params)

        def attempt(number: int) -> Completion:
            attempt_deadline = self._attempt_deadline(deadline_monotonic)
            try:
                with deadline(attempt_deadline):
                    # The client's own request path (auth, errors, timeouts), without its typed request
                    # transform and response models: under load those were a third of the CPU per call.
                    response = client.post(
                        CHAT_PATH, body=body, cast_to=httpx2.Response, options=self._options(attempt_deadline)
                    )
                return _completion(json.loads(response.content), response.headers.get("x-request-id"), number)
            except UPSTREAM_ERRORS as error:
                raise translate(error) from None

        return self._policy.run(attempt, deadline_monotonic, *self._guard(params.model))

    def _guard(self, model: str) -> tuple[Callable[[str, float], None], Callable[[], None]]:
        """Return one call's attempt recorder and circuit check, which share whether it holds the circuit's probe."""
        holds_probe = False

        def admit() -> None:
            """Raise 503 upstream_unavailable while this upstream's circuit is open (or its probe is out)."""
            nonlocal holds_probe
            if self._circuit is None:
                return
            verdict = self._circuit.admit()
            if not verdict.allowed:
                raise UpstreamUnavailable(retry_after_s=verdict.wait_s)
            holds_probe = verdict.state == HALF_OPEN

        def record(outcome: str, duration_s: float) -> None:
            record_attempt(self.name, model, outcome, duration_s)
            if self._circuit is None:
                return
            if outcome == "client_closed":  # cut short, it says nothing of the upstream: a probe it held goes back
                if holds_probe:
                    self._circuit.release()
                return
            self._circuit.record(outcome in CIRCUIT_FAILURES)

        return record, admit

    def stream(self, params: GenerationParams, deadline_monotonic: float) -> Iterator[TextDelta | Completion]:
        """Yield deltas, then the Completion; retries happen only until the first delta is in hand."""
        client = self.client()

        def attempt(number: int) -> OpenStream:
            attempt_deadline = self._attempt_deadline(deadline_monotonic)
            opened = None
            try:
                with deadline(attempt_deadline):
                    upstream = client.post(
                        CHAT_PATH,
                        body={**self._body(params), "stream": True, "stream_options": {"include_usage": True}},
                        cast_to=object,  # each chunk as the parsed JSON object, not a response model
                        options=self._options(attempt_deadline),
                        stream=True,
                        stream_cls=openai.Stream[object],
                    )
                    opened = OpenStream(upstream, number)
                    opened.read_until_text()
                return opened
            except UPSTREAM_ERRORS as error:
                if opened is not None:
                    opened.close()
                raise translate(error) from None

        opened = self._policy.run(attempt, deadline_monotonic, *self._guard(params.model))
        return opened.relay(self._settings.timeout_s, time.monotonic() + self._settings.stream_deadline_s)


def _completion(body: Any, upstream_request_id: str | None, attempts: int) -> Completion:
    """Read a chat completion's JSON; a body without the fields raises KeyError or TypeError (a bad body)."""
    choice = body["choices"][0]
    return Completion(
        text=choice["message"].get("content") or "",
        model=str(body["model"]),
        finish_reason=choice.get("finish_reason"),
        usage=token_usage(body.get("usage")),
        attempts=attempts,
        upstream_request_id=upstream_request_id,
    )

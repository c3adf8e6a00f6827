"""The OpenAI-compatible backend: the official client, one retry loop, errors translated here."""

from __future__ import annotations

import email.utils
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx2
import openai

from ..config import Settings
from ..errors import (
    ServiceError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from ..metrics import record_attempt
from .base import Completion, GenerationParams, TextDelta, TokenUsage
from .deadline import DeadlineTransport, deadline
from .retry import Retryable, RetryPolicy

log = logging.getLogger("llm_service.providers.openai")

RETRYABLE_STATUSES = frozenset({408, 409, 429})
# Errors in reading a 200 body that the client's models do not catch themselves.
_BAD_BODY_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)
# Everything reading an upstream answer can raise: the client's errors, the transport's, a bad body.
_UPSTREAM_ERRORS = (openai.APIError, httpx2.HTTPError, *_BAD_BODY_ERRORS)


def retry_after_s(headers: Any) -> float | None:
    """Return the upstream's requested wait: retry-after-ms, else Retry-After in seconds or as an HTTP date."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) / divisor
        except ValueError:
            if name == "retry-after":
                return _seconds_until_http_date(raw)
            continue
        if math.isfinite(value) and value >= 0:
            return value
    return None


def _seconds_until_http_date(raw: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def translate_status_error(error: openai.APIStatusError) -> ServiceError | Retryable:
    """Map an upstream HTTP error to the service error a client sees, wrapped if worth retrying."""
    status = error.status_code
    rid = error.request_id
    if status == 429:
        if error.code == "insufficient_quota":
            log.error("upstream quota exhausted", extra={"upstream_status": status})
            return UpstreamQuotaExceeded(upstream_request_id=rid)
        wait_s = retry_after_s(error.response.headers)
        return Retryable(
            UpstreamRateLimited(retry_after_s=wait_s or 1.0, upstream_request_id=rid), "rate_limited", wait_s
        )
    if status in (401, 403):
        log.error("upstream refused our credentials", extra={"upstream_status": status})
        return UpstreamAuthError(upstream_request_id=rid)
    if status == 408:
        return Retryable(UpstreamTimeout(upstream_request_id=rid), "timeout")
    if status >= 500 or status in RETRYABLE_STATUSES:
        return Retryable(UpstreamError(upstream_request_id=rid), f"status_{status}")
    if status in (400, 422):
        return UpstreamRejected(upstream_request_id=rid)
    log.error("upstream answered with an unexpected status", extra={"upstream_status": status})
    return UpstreamError(upstream_request_id=rid)


def translate(error: Exception) -> ServiceError | Retryable:
    """Map any exception from the openai client to a service error, wrapped if worth retrying."""
    if isinstance(error, (openai.APITimeoutError, httpx2.TimeoutException)):
        return Retryable(UpstreamTimeout(), "timeout")
    if isinstance(error, (openai.APIConnectionError, httpx2.TransportError)):
        return Retryable(UpstreamError(), "connection_error")
    if isinstance(error, openai.APIStatusError):
        return translate_status_error(error)
    return Retryable(UpstreamError(), "bad_body")


class OpenAIProvider:
    """Chat completions from any OpenAI-compatible server."""

    name = "openai"
    unpriced_cost_usd: Decimal | None = None  # a model without a price has an unknown cost, never a guessed one

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._policy = RetryPolicy(
            max_retries=settings.max_retries,
            base_delay_s=settings.retry_delay_s,
            max_delay_s=settings.retry_max_delay_s,
        )
        # OpenAI's own API wants max_completion_tokens (reasoning models refuse max_tokens);
        # most compatible servers (vLLM, Ollama, llama.cpp) know only max_tokens.
        self._max_tokens_param = "max_tokens" if settings.openai_base_url else "max_completion_tokens"
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
                        http_client=openai.DefaultHttpxClient(transport=DeadlineTransport()),
                    )
                    self._client_pid = pid
        return self._client

    def is_ready(self) -> bool:
        """Return whether there is an upstream to call: a key, or a base URL (many local servers need no key)."""
        return bool(self._settings.openai_api_key or self._settings.openai_base_url)

    def warm_up(self) -> None:
        """Build the client and load the chat resource now, so the first request doesn't pay for it."""
        _ = self.client().chat.completions

    def _request_args(self, params: GenerationParams, attempt_deadline: float) -> dict[str, Any]:
        return {
            "model": params.model,
            "messages": params.messages(),
            "temperature": params.temperature,
            self._max_tokens_param: params.max_tokens,
            "timeout": max(attempt_deadline - time.monotonic(), 0.001),
        }

    def _attempt_deadline(self, deadline_monotonic: float) -> float:
        return min(deadline_monotonic, time.monotonic() + self._settings.timeout_s)

    def complete(self, params: GenerationParams, deadline_monotonic: float) -> Completion:
        client = self.client()

        def attempt(number: int) -> Completion:
            attempt_deadline = self._attempt_deadline(deadline_monotonic)
            try:
                with deadline(attempt_deadline):
                    response = client.chat.completions.create(**self._request_args(params, attempt_deadline))
                return _completion(response, number)
            except _UPSTREAM_ERRORS as error:
                raise translate(error) from None

        return self._policy.run(attempt, deadline_monotonic, self._recorder(params.model))

    def _recorder(self, model: str) -> Callable[[str, float], None]:
        return lambda outcome, duration_s: record_attempt(self.name, model, outcome, duration_s)

    def stream(self, params: GenerationParams, deadline_monotonic: float) -> Iterator[TextDelta | Completion]:
        """Yield deltas, then the Completion; retries happen only until the first delta is in hand."""
        client = self.client()

        def attempt(number: int) -> _OpenStream:
            attempt_deadline = self._attempt_deadline(deadline_monotonic)
            opened = None
            try:
                with deadline(attempt_deadline):
                    upstream = client.chat.completions.create(
                        **self._request_args(params, attempt_deadline),
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    opened = _OpenStream(upstream, number)
                    opened.read_until_text()
                return opened
            except _UPSTREAM_ERRORS as error:
                if opened is not None:
                    opened.close()
                raise translate(error) from None

        opened = self._policy.run(attempt, deadline_monotonic, self._recorder(params.model))
        return opened.relay(self._settings.timeout_s, time.monotonic() + self._settings.stream_deadline_s)


def _completion(response: Any, attempts: int) -> Completion:
    choice = response.choices[0]
    return Completion(
        text=choice.message.content or "",
        model=response.model,
        finish_reason=choice.finish_reason,
        usage=_usage(response.usage),
        attempts=attempts,
        upstream_request_id=getattr(response, "_request_id", None),
    )


def _usage(usage: Any) -> TokenUsage | None:
    """Return the reported token counts; None when the server sent none (some compatible servers don't)."""
    if usage is None:
        return None
    details = getattr(usage, "prompt_tokens_details", None)
    return TokenUsage(
        input=int(usage.prompt_tokens),
        output=int(usage.completion_tokens),
        cached_input=int(getattr(details, "cached_tokens", None) or 0),
    )


class _OpenStream:
    """An upstream SSE stream, read as far as its first text, then relayed chunk by chunk."""

    def __init__(self, upstream: Any, attempts: int) -> None:
        self.upstream = upstream
        self.chunks = iter(upstream)
        self.attempts = attempts
        self.upstream_request_id = upstream.response.headers.get("x-request-id")
        self.pending: list[str] = []
        self.texts: list[str] = []
        self.model = ""
        self.finish_reason: str | None = None
        self.usage: TokenUsage | None = None
        self.ended = False

    def close(self) -> None:
        self.upstream.close()

    def _take(self, chunk: Any) -> None:
        self.model = chunk.model or self.model
        if chunk.usage is not None:
            self.usage = _usage(chunk.usage)
        for choice in chunk.choices[:1]:
            self.finish_reason = choice.finish_reason or self.finish_reason
            if choice.delta and choice.delta.content:
                self.pending.append(choice.delta.content)

    def _read_one(self) -> bool:
        chunk = next(self.chunks, None)
        if chunk is None:
            self.ended = True
            return False
        self._take(chunk)
        return True

    def read_until_text(self) -> None:
        """Read chunks until one carries text or the stream ends (the caller sets the deadline)."""
        while not self.pending and self._read_one():
            pass

    def relay(self, idle_timeout_s: float, stream_deadline: float) -> Iterator[TextDelta | Completion]:
        """Yield the text read so far and the rest as it arrives; raise a ServiceError if the upstream fails."""
        try:
            while True:
                for piece in self.pending:
                    self.texts.append(piece)
                    yield TextDelta(piece)
                self.pending.clear()
                if self.ended:
                    break
                try:
                    with deadline(min(time.monotonic() + idle_timeout_s, stream_deadline)):
                        self._read_one()
                except _UPSTREAM_ERRORS as error:
                    translated = translate(error)
                    failure = translated.final_error if isinstance(translated, Retryable) else translated
                    failure.attempts = self.attempts
                    failure.upstream_request_id = self.upstream_request_id
                    log.warning("upstream stream failed after text was sent", extra={"error_code": failure.code})
                    raise failure from None
            yield Completion(
                text="".join(self.texts),
                model=self.model,
                finish_reason=self.finish_reason,
                usage=self.usage,
                attempts=self.attempts,
                upstream_request_id=self.upstream_request_id,
            )
        finally:
            self.close()  # also when the client went away: the upstream connection closes now

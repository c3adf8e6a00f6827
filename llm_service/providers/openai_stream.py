"""Relaying an upstream SSE stream: read to its first text inside the retry loop, then chunk by chunk."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from .base import Completion, TextDelta, TokenUsage
from .deadline import deadline
from .openai_translate import UPSTREAM_ERRORS, token_usage, translate
from .retry import Retryable

log = logging.getLogger("llm_service.providers.openai")


class OpenStream:
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
        self.chunks_read = 0

    def close(self) -> None:
        self.upstream.close()

    def _take(self, chunk: Any) -> None:
        self.model = chunk.get("model") or self.model
        if chunk.get("usage") is not None:
            self.usage = token_usage(chunk["usage"])
        for choice in chunk.get("choices", [])[:1]:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.pending.append(content)

    def _read_one(self) -> bool:
        chunk = next(self.chunks, None)
        if chunk is None:
            if not self.chunks_read:
                # Not an event stream at all (say, a plain JSON body): a bad body, retried like any other.
                raise ValueError("the upstream's stream carried no events")
            self.ended = True
            return False
        self.chunks_read += 1
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
                except UPSTREAM_ERRORS as error:
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

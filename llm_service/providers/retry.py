"""The one retry policy: backoff owns the loop, the deadline bounds every wait and attempt."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import backoff

from ..errors import ServiceError

T = TypeVar("T")
log = logging.getLogger("llm_service.retry")

# An attempt with less time than this left is not worth starting.
MIN_ATTEMPT_S = 0.05


class Retryable(Exception):
    """A failed attempt that may succeed if tried again; wraps the service error to raise if it is the last."""

    def __init__(self, final_error: ServiceError, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.final_error = final_error
        self.reason = reason
        self.retry_after_s = retry_after_s


class RetryPolicy:
    """Exponential backoff with jitter, honouring Retry-After, never waiting past the deadline."""

    def __init__(self, *, max_retries: int, base_delay_s: float, max_delay_s: float) -> None:
        self.max_retries = max_retries
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s

    def _waits(self, deadline_monotonic: float) -> Generator[float, Retryable, None]:
        failure = yield 0.0  # primed by backoff before the first attempt
        retry_number = 0
        while True:
            if failure.retry_after_s is not None:
                wait_s = failure.retry_after_s
            else:
                ceiling_s = min(self.max_delay_s, self.base_delay_s * 2**retry_number)
                wait_s = ceiling_s / 2 + random.uniform(0, ceiling_s / 2)
            retry_number += 1
            if time.monotonic() + wait_s + MIN_ATTEMPT_S >= deadline_monotonic:
                return  # no time for another attempt: give up with this failure
            failure = yield wait_s

    def run(
        self,
        attempt: Callable[[int], T],
        deadline_monotonic: float,
        on_attempt: Callable[[str, float], None] | None = None,
    ) -> T:
        """Call `attempt(n)` for n = 1, 2, ... until it returns, a failure is final, or time runs out.

        `on_attempt(outcome, duration_s)` hears of every attempt, for metrics.
        """
        attempts = 0

        def one_attempt() -> T:
            nonlocal attempts
            attempts += 1
            started = time.monotonic()
            outcome = "ok"
            try:
                return attempt(attempts)
            except (Retryable, ServiceError) as failure:
                outcome = attempt_outcome(failure)
                raise
            finally:
                if on_attempt is not None:
                    on_attempt(outcome, time.monotonic() - started)

        def log_retry(details: Any) -> None:
            failure: Retryable = details["exception"]
            log.warning(
                "upstream attempt failed; retrying",
                extra={"attempt": details["tries"], "wait_s": round(details["wait"], 3), "reason": failure.reason},
            )

        retrying = backoff.on_exception(
            lambda: self._waits(deadline_monotonic),  # type: ignore[arg-type, return-value]
            Retryable,
            max_tries=self.max_retries + 1,
            jitter=None,
            on_backoff=log_retry,
            raise_on_giveup=True,
            logger=None,
        )(one_attempt)
        try:
            return retrying()
        except Retryable as failure:
            failure.final_error.attempts = attempts
            raise failure.final_error from None
        except ServiceError as error:
            error.attempts = attempts
            raise


def attempt_outcome(failure: Retryable | ServiceError) -> str:
    """Name a failed attempt: rate_limited, server_error, timeout, connection_error or rejected."""
    if isinstance(failure, Retryable):
        if failure.reason in ("rate_limited", "timeout", "connection_error"):
            return failure.reason
        return "server_error"  # 5xx, 409, or a body that could not be read
    return {
        "upstream_quota_exceeded": "rate_limited",
        "upstream_rate_limited": "rate_limited",
        "upstream_timeout": "timeout",
        "upstream_error": "server_error",
    }.get(failure.code, "rejected")

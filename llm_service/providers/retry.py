"""The one retry policy: backoff owns the loop, the deadline bounds every wait and attempt."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import backoff

from ..client_watch import ClientGone
from ..errors import ServiceError
from ..metrics import RETRIES_SKIPPED

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
        self.deadline_monotonic = math.inf  # set by the retry loop: no wait may end past it


class RetryBudget:
    """Envoy's retry budget for one worker: retries at most `ratio` of the calls of the last `window_s`.

    A floor of `min_per_s` retries a second keeps a quiet worker able to retry at all.
    """

    def __init__(self, ratio: float, *, window_s: float = 10.0, min_per_s: float = 3.0) -> None:
        self.ratio, self.window_s, self.min_per_s = ratio, window_s, min_per_s
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._lock = threading.Lock()

    def call(self) -> None:
        """Count one call (a request to one upstream, however many attempts it makes)."""
        with self._lock:
            self._calls.append(time.monotonic())

    def allow_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        now = time.monotonic()
        with self._lock:
            for times in (self._calls, self._retries):
                while times and times[0] <= now - self.window_s:
                    times.popleft()
            if len(self._retries) >= max(self.ratio * len(self._calls), self.min_per_s * self.window_s):
                return False
            self._retries.append(now)
            return True


class _Call:
    """One call's state through the retry loop."""

    def __init__(
        self,
        attempt: Callable[[int], Any],
        deadline_monotonic: float,
        on_attempt: Callable[[str, float], None] | None,
        before_attempt: Callable[[], None] | None,
    ) -> None:
        self.attempt = attempt
        self.deadline_monotonic = deadline_monotonic
        self.on_attempt = on_attempt
        self.before_attempt = before_attempt
        self.attempts = 0


class RetryPolicy:
    """Exponential backoff with jitter, honouring Retry-After, never waiting past the deadline or the budget."""

    def __init__(
        self, *, max_retries: int, base_delay_s: float, max_delay_s: float, budget: RetryBudget | None = None
    ) -> None:
        self.max_retries = max_retries
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.budget = budget
        # Decorated once, not per call: building backoff's wrapper cost ~5% of a call's CPU under load.
        self._retrying = backoff.on_exception(
            self._waits,  # type: ignore[arg-type]  # backoff sends each failure in; its stubs say None
            Retryable,
            max_tries=self.max_retries + 1,
            jitter=None,
            on_backoff=_log_retry,
            raise_on_giveup=True,
            logger=None,
        )(self._one_attempt)

    def _waits(self) -> Generator[float, Retryable, None]:
        failure = yield 0.0  # primed by backoff before the first attempt
        retry_number = 0
        while True:
            if failure.retry_after_s is not None:
                wait_s = failure.retry_after_s
            else:
                ceiling_s = min(self.max_delay_s, self.base_delay_s * 2**retry_number)
                wait_s = ceiling_s / 2 + random.uniform(0, ceiling_s / 2)
            retry_number += 1
            if time.monotonic() + wait_s + MIN_ATTEMPT_S >= failure.deadline_monotonic:
                return  # no time for another attempt: give up with this failure
            if self.budget is not None and not self.budget.allow_retry():
                RETRIES_SKIPPED.inc()
                log.warning("retry budget spent; answering without retrying", extra={"reason": failure.reason})
                return
            failure = yield wait_s

    @staticmethod
    def _one_attempt(call: _Call) -> Any:
        if call.before_attempt is not None:
            call.before_attempt()
        call.attempts += 1
        started = time.monotonic()
        outcome = "ok"
        try:
            return call.attempt(call.attempts)
        except Retryable as failure:
            failure.deadline_monotonic = call.deadline_monotonic  # the wait generator's bound
            outcome = attempt_outcome(failure)
            raise
        except ServiceError as failure:
            outcome = attempt_outcome(failure)
            raise
        except ClientGone:
            outcome = "client_closed"
            raise
        finally:
            if call.on_attempt is not None:
                call.on_attempt(outcome, time.monotonic() - started)

    def run(
        self,
        attempt: Callable[[int], T],
        deadline_monotonic: float,
        on_attempt: Callable[[str, float], None] | None = None,
        before_attempt: Callable[[], None] | None = None,
    ) -> T:
        """Call `attempt(n)` for n = 1, 2, ... until it returns, a failure is final, or time runs out.

        `on_attempt(outcome, duration_s)` hears of every attempt, for metrics; `before_attempt()` may
        refuse one by raising a ServiceError (an open circuit), which ends the loop without an attempt.
        """
        if self.budget is not None:
            self.budget.call()
        call = _Call(attempt, deadline_monotonic, on_attempt, before_attempt)
        try:
            result: T = self._retrying(call)
            return result
        except Retryable as failure:
            failure.final_error.attempts = call.attempts
            failure.final_error.transient = True
            raise failure.final_error from None
        except ServiceError as error:
            error.attempts = call.attempts
            raise


def _log_retry(details: Any) -> None:
    failure: Retryable = details["exception"]
    log.warning(
        "upstream attempt failed; retrying",
        extra={"attempt": details["tries"], "wait_s": round(details["wait"], 3), "reason": failure.reason},
    )


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

"""A circuit breaker per upstream: in this worker's memory, or in Redis for every worker and instance.

After `failures` consecutive failed attempts the circuit opens: no call goes out for `reset_s`. Then exactly
one request claims the probe (half-open); its success closes the circuit, its failure opens it again. A probe
that never reports (its worker died) frees its claim after `probe_ttl_s`, longer than any attempt can run.

pybreaker was evaluated first and does not fit: its CircuitBreaker.call holds one RLock for the whole call
(every call to an upstream in a worker would wait for the one before it), and its open -> half-open step
reads the opening time and then writes the state, so each process that sees the timeout pass lets a call
through: more than one probe across workers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from .metrics import CIRCUIT_STATE

log = logging.getLogger("llm_service.circuit")

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}
OUTAGE_LOG_INTERVAL_S = 10.0

# KEYS[1] the circuit's hash; ARGV: reset_ms, probe_ttl_ms, claim (1: take the probe if it is free).
# Returns {allowed, state, wait_ms}. Time is Redis's own, so instances with skewed clocks agree.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_ms') or '0')
if opened == 0 then return {1, 0, 0} end
local reopen = opened + tonumber(ARGV[1])
if now < reopen then return {0, 1, reopen - now} end
local probe = tonumber(redis.call('HGET', KEYS[1], 'probe_until_ms') or '0')
if probe > now then return {0, 2, probe - now} end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'probe_until_ms', now + tonumber(ARGV[2])) end
return {1, 2, 0}
"""

# ARGV: failed (1 or 0), failures threshold. Returns the state after the attempt. A circuit no attempt
# has touched for a day is forgotten (closed): upstreams renamed or removed leave no keys behind.
_RECORD_LUA = """
if ARGV[1] == '0' then
  redis.call('HSET', KEYS[1], 'failures', 0, 'opened_ms', 0, 'probe_until_ms', 0)
  redis.call('PEXPIRE', KEYS[1], 86400000)
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('PEXPIRE', KEYS[1], 86400000)
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_ms') or '0')
if opened ~= 0 or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'opened_ms', now, 'probe_until_ms', 0)
  return 1
end
return 0
"""


# A probe whose attempt ended without a verdict (its client left) is given back, so the next request probes
# now rather than after probe_ttl. A circuit with no key (closed and forgotten) is left without one.
_RELEASE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'probe_until_ms', 0) end
return 0
"""


@dataclass(frozen=True)
class Verdict:
    """Whether an attempt may go out, the circuit's state, and how long until it might (0 when allowed)."""

    allowed: bool
    state: int
    wait_s: float = 0.0


CLOSED_VERDICT = Verdict(True, CLOSED)


class Circuit(Protocol):
    """One upstream's breaker."""

    name: str

    def admit(self, claim: bool = True) -> Verdict:
        """Say whether an attempt may go out now; with `claim`, a free half-open probe is taken."""
        ...

    def record(self, failed: bool) -> None:
        """Count an attempt's end: a failure (5xx, timeout, connection error) or any answer."""
        ...

    def release(self) -> None:
        """Give back the half-open probe this process took, whose attempt ended without a verdict."""
        ...


class MemoryCircuit:
    """A breaker in this worker's memory (no REDIS_URL)."""

    def __init__(self, name: str, failures: int, reset_s: float, probe_ttl_s: float) -> None:
        self.name = name
        self._threshold, self._reset_s, self._probe_ttl_s = failures, reset_s, probe_ttl_s
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_until = 0.0
        self._lock = threading.Lock()

    def admit(self, claim: bool = True) -> Verdict:
        now = time.monotonic()
        with self._lock:
            if self._opened_at is None:
                verdict = CLOSED_VERDICT
            elif now < self._opened_at + self._reset_s:
                verdict = Verdict(False, OPEN, self._opened_at + self._reset_s - now)
            elif self._probe_until > now:
                verdict = Verdict(False, HALF_OPEN, self._probe_until - now)
            else:
                if claim:
                    self._probe_until = now + self._probe_ttl_s
                verdict = Verdict(True, HALF_OPEN)
        CIRCUIT_STATE.labels(self.name).set(verdict.state)
        return verdict

    def record(self, failed: bool) -> None:
        with self._lock:
            if not failed:
                self._failures, self._opened_at, self._probe_until = 0, None, 0.0
                state = CLOSED
            else:
                self._failures += 1
                state = OPEN if self._opened_at is not None or self._failures >= self._threshold else CLOSED
                if state == OPEN:
                    self._opened_at, self._probe_until = time.monotonic(), 0.0
        _report(self.name, state, failed)

    def release(self) -> None:
        with self._lock:
            self._probe_until = 0.0


class RedisCircuit:
    """A breaker shared by every worker and instance through Redis; open to calls when Redis is down."""

    def __init__(self, name: str, failures: int, reset_s: float, probe_ttl_s: float, client: redis.Redis) -> None:
        self.name = name
        self._key = f"llm:circuit:{name}"
        self._threshold = failures
        self._reset_ms, self._probe_ttl_ms = round(reset_s * 1000), round(probe_ttl_s * 1000)
        self._admit = client.register_script(_ADMIT_LUA)
        self._record = client.register_script(_RECORD_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._outage_logged_at = -OUTAGE_LOG_INTERVAL_S

    def admit(self, claim: bool = True) -> Verdict:
        try:
            args = [self._reset_ms, self._probe_ttl_ms, int(claim)]
            allowed, state, wait_ms = self._admit(keys=[self._key], args=args)
        except redis.RedisError as error:
            self._outage(error)
            return CLOSED_VERDICT
        CIRCUIT_STATE.labels(self.name).set(int(state))
        return Verdict(bool(allowed), int(state), int(wait_ms) / 1000)

    def record(self, failed: bool) -> None:
        try:
            state = int(self._record(keys=[self._key], args=[int(failed), self._threshold]))
        except redis.RedisError as error:
            self._outage(error)
            return
        _report(self.name, state, failed)

    def release(self) -> None:
        try:
            self._release(keys=[self._key])
        except redis.RedisError as error:
            self._outage(error)  # the claim lapses after probe_ttl instead

    def _outage(self, error: Exception) -> None:
        """Log that the breaker cannot reach Redis and lets calls through, at most once per interval."""
        now = time.monotonic()
        if now - self._outage_logged_at >= OUTAGE_LOG_INTERVAL_S:
            self._outage_logged_at = now
            log.error(
                "circuit state unavailable: Redis does not answer, calls go through",
                extra={"upstream": self.name, "error": type(error).__name__},
            )


def _report(name: str, state: int, failed: bool) -> None:
    CIRCUIT_STATE.labels(name).set(state)
    if failed and state == OPEN:
        log.warning("circuit open: no calls to this upstream until the probe", extra={"upstream": name})


def build_circuit(name: str, failures: int, reset_s: float, probe_ttl_s: float, client: Any) -> Circuit:
    """Return a breaker for upstream `name`, in Redis through `client` when one is given."""
    if client is None:
        return MemoryCircuit(name, failures, reset_s, probe_ttl_s)
    return RedisCircuit(name, failures, reset_s, probe_ttl_s, client)

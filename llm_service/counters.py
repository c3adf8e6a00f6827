"""Integer counters with expiry, atomic per operation: in this process, or in Redis for every process."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Protocol

import redis

_RESERVE_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if current + amount > tonumber(ARGV[2]) then
  return {0, current}
end
local value = redis.call('INCRBY', KEYS[1], amount)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, value}
"""


REDIS_TIMEOUT_S = 0.5  # a Redis that does not answer must not hold requests up for long


def connect_redis(url: str, tls_verify: bool = True) -> redis.Redis:
    """Return a client of the Redis at `url` whose every call gives up after REDIS_TIMEOUT_S."""
    # Heroku Redis serves TLS with a self-signed certificate: REDIS_TLS_VERIFY=false keeps the
    # encryption and skips only the certificate check. A redis:// URL has no TLS to relax.
    relax = not tls_verify and url.startswith("rediss://")
    tls = {"ssl_cert_reqs": "none"} if relax else {}
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, **tls)


class Counters(Protocol):
    """Integer counters with expiry."""

    def reserve(self, key: str, amount: int, limit: int, ttl_s: int) -> bool:
        """Add `amount` unless that would pass `limit`; return whether it was added."""
        ...

    def add(self, key: str, amount: int, ttl_s: int) -> None:
        """Add `amount` (which may be negative)."""
        ...

    def get(self, key: str) -> int:
        """Return the value, 0 if absent or expired."""
        ...

    def ping(self) -> None:
        """Raise if the store cannot be reached."""
        ...


class MemoryCounters:
    """Counters in this process only."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def _current(self, key: str, now: float) -> int:
        value, expires_at = self._values.get(key, (0, math.inf))
        return value if expires_at > now else 0

    def reserve(self, key: str, amount: int, limit: int, ttl_s: int) -> bool:
        with self._lock:
            now = time.monotonic()
            current = self._current(key, now)
            if current + amount > limit:
                return False
            self._values[key] = (current + amount, now + ttl_s)
            return True

    def add(self, key: str, amount: int, ttl_s: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._values[key] = (self._current(key, now) + amount, now + ttl_s)
            if len(self._values) > 10_000:  # drop expired keys now and then
                self._values = {k: v for k, v in self._values.items() if v[1] > now}

    def get(self, key: str) -> int:
        with self._lock:
            return self._current(key, time.monotonic())

    def ping(self) -> None:
        return None


class RedisCounters:
    """Counters in Redis, shared by every worker and instance."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._reserve = client.register_script(_RESERVE_LUA)

    def reserve(self, key: str, amount: int, limit: int, ttl_s: int) -> bool:
        added, _ = self._reserve(keys=[key], args=[amount, limit, ttl_s])
        return bool(added)

    def add(self, key: str, amount: int, ttl_s: int) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.incrby(key, amount)
        pipe.expire(key, ttl_s)
        pipe.execute()

    def get(self, key: str) -> int:
        value: Any = self._client.get(key)
        return int(value or 0)

    def ping(self) -> None:
        self._client.ping()

"""Where cached answers live: each worker's memory (a bounded LRU), or Redis for every worker and instance.

Besides storing bytes under a key with a TTL, a store holds the single-flight locks: the right, for one
request at a time across every process that shares the store, to call the backend for a key. A lock that
Redis holds is kept alive by a heartbeat while its holder works, so a holder that dies frees it in
seconds, and the requests waiting behind it take over.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import cachetools
import redis
import redis.exceptions

log = logging.getLogger("llm_service.cache")

STORE_ERRORS = (redis.exceptions.RedisError, OSError)
LOCK_TTL_MS = 6000  # how long a dead holder keeps its lock: waiters take over after at most this
HEARTBEAT_S = LOCK_TTL_MS / 1000 / 3  # a live holder renews its locks three times per LOCK_TTL_MS
RETRY_AFTER_OUTAGE_S = 1.0  # during an outage, one request a second tries the store; the rest skip it

# Delete or renew a lock only while it is still ours: a lock that expired may have a new holder by now.
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class CacheStore(Protocol):
    """Bytes under keys with a time to live, and locks that say who calls the backend for a key."""

    shared: bool  # whether other processes see this store (then waiting polls it)

    def get(self, key: str) -> bytes | None:
        """Return the value, or None when absent or expired."""
        ...

    def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Store `value` for `ttl_s` seconds."""
        ...

    def lock(self, key: str, token: str) -> bool:
        """Take the lock of `key` for the holder `token`, unless another holds it; return whether taken."""
        ...

    def unlock(self, key: str, token: str) -> None:
        """Give the lock of `key` back, if `token` still holds it."""
        ...


class MemoryStore:
    """An LRU of this worker's answers with one TTL (cachetools' TTLCache), safe across threads.

    Its locks always succeed: within one process, single flight is ResponseCache's own business.
    """

    shared = False

    def __init__(self, max_entries: int, ttl_s: int) -> None:
        self._entries: cachetools.TTLCache[str, bytes] = cachetools.TTLCache(maxsize=max_entries, ttl=ttl_s)
        self._lock = threading.Lock()  # TTLCache is not thread-safe: reads reorder its LRU list

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._entries.get(key)

    def set(self, key: str, value: bytes, ttl_s: int) -> None:
        with self._lock:
            self._entries[key] = value  # ttl_s is the cache's own, CACHE_TTL

    def lock(self, key: str, token: str) -> bool:
        return True

    def unlock(self, key: str, token: str) -> None:
        return None


class RedisStore:
    """Answers and single-flight locks in Redis, shared by every worker and instance."""

    shared = True

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._release = client.register_script(_RELEASE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._held: dict[str, str] = {}  # lock key -> our token, renewed by the heartbeat
        self._held_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    def get(self, key: str) -> bytes | None:
        value: Any = self._client.get(key)
        return None if value is None else bytes(value)

    def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._client.set(key, value, ex=ttl_s)

    def lock(self, key: str, token: str) -> bool:
        if not self._client.set(f"{key}:lock", token, nx=True, px=LOCK_TTL_MS):
            return False
        with self._held_lock:
            self._held[f"{key}:lock"] = token
            self._start_heartbeat()
        return True

    def unlock(self, key: str, token: str) -> None:
        with self._held_lock:
            self._held.pop(f"{key}:lock", None)
        self._release(keys=[f"{key}:lock"], args=[token])

    def _start_heartbeat(self) -> None:
        """Start the thread that renews this process's locks (once per process: a fork has no threads)."""
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._heartbeat = threading.Thread(target=self._beat, name="cache-lock-heartbeat", daemon=True)
            self._heartbeat.start()

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._held_lock:
                held = list(self._held.items())
            for lock_key, token in held:
                try:
                    self._renew(keys=[lock_key], args=[token, LOCK_TTL_MS])
                except STORE_ERRORS:  # Redis is down: the lock lapses, and the waiters' own calls fail over
                    pass


class Outage:
    """Whether the store is reachable, as the last calls found: WARNING once when it fails, INFO when back."""

    def __init__(self) -> None:
        self._down_since: float | None = None
        self._last_try = 0.0
        self._lock = threading.Lock()

    def should_try(self) -> bool:
        """Return whether to use the store now: always when up, once a second while down."""
        with self._lock:
            if self._down_since is None:
                return True
            now = time.monotonic()
            if now - self._last_try >= RETRY_AFTER_OUTAGE_S:
                self._last_try = now
                return True
            return False

    def failed(self, error: BaseException) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = self._last_try = time.monotonic()
        if first:
            log.warning(
                "response cache unavailable: serving without it until the store answers",
                extra={"error_type": type(error).__name__},
            )

    def succeeded(self) -> None:
        with self._lock:
            down_since, self._down_since = self._down_since, None
        if down_since is not None:
            log.info("response cache available again", extra={"outage_s": round(time.monotonic() - down_since, 1)})

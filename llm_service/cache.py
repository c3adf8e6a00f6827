"""The response cache: which requests may share an answer, under which key, and single flight.

A request is cacheable when CACHE_MODE allows it (`deterministic`: temperature 0 only) and its
Cache-Control does not say no-store. Its key hashes everything that changes the answer, and the scope
(the client under CACHE_SCOPE=client with API_KEYS; one shared scope otherwise), so one tenant's prompt
or answer never reaches another. Identical requests in flight together make one backend call: the first
takes the flight (in this process, and through a lock in the store across processes), the others wait
for its answer within their own deadline, and one of them takes over if it fails.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .cache_store import STORE_ERRORS, CacheStore, MemoryStore, Outage
from .clients import Client
from .errors import UpstreamTimeout
from .providers.base import Completion, GenerationParams, TokenUsage

STORED_FINISH_REASONS = frozenset({"stop", "length"})
KEY_VERSION = "v1"  # part of every key: a change of the entry format starts a fresh cache
POLL_FIRST_S, POLL_MAX_S = 0.01, 0.1  # how often a waiter looks in a shared store for the answer
UNSTORED_MARK_S = 10  # how long waiters elsewhere learn that the leader's answer could not be stored


@dataclass(frozen=True)
class CacheDirectives:
    """What the request's Cache-Control asks: no-cache skips the lookup, no-store skips the cache."""

    no_cache: bool = False
    no_store: bool = False
    max_age_s: int | None = None  # accept only an entry at most this old


@dataclass(frozen=True)
class CacheStatus:
    """How the cache took part in one answer: hit, miss or bypass (and why it was bypassed)."""

    result: str
    reason: str | None = None
    age_s: int | None = None
    cost_saved_usd: Decimal | None = None

    @property
    def header(self) -> str:
        """Return the X-Cache header's value."""
        return self.result.upper()


BYPASS_OFF = CacheStatus("bypass", "off")
NO_DIRECTIVES = CacheDirectives()


@dataclass(frozen=True)
class CachedAnswer:
    """A stored answer: the completion as the backend gave it, what it cost, and when it was made."""

    completion: Completion
    cost_usd: Decimal | None
    created_at: float  # Unix time

    def age_s(self) -> int:
        return max(int(time.time() - self.created_at), 0)

    def to_bytes(self) -> bytes:
        usage = self.completion.usage
        return json.dumps(
            {
                "text": self.completion.text,
                "model": self.completion.model,
                "finish_reason": self.completion.finish_reason,
                "usage": None if usage is None else [usage.input, usage.output, usage.cached_input],
                "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
                "created_at": self.created_at,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8", "surrogatepass")

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer:
        entry = json.loads(raw.decode("utf-8", "surrogatepass"))
        usage = entry["usage"]
        completion = Completion(
            text=entry["text"],
            model=entry["model"],
            finish_reason=entry["finish_reason"],
            usage=None if usage is None else TokenUsage(input=usage[0], output=usage[1], cached_input=usage[2]),
            attempts=0,  # answered without calling the backend
        )
        cost_usd = None if entry["cost_usd"] is None else Decimal(entry["cost_usd"])
        return cls(completion, cost_usd, float(entry["created_at"]))


def cache_key(scope: str, backend: str, params: GenerationParams) -> str:
    """Return the store key of a request: a digest of the scope and of everything that changes the answer."""
    canonical = json.dumps(
        [
            scope,
            backend,
            params.model,
            [[m.role, m.content] for m in params.messages],
            params.temperature,
            params.top_p,
            params.max_tokens,
            list(params.stop),
            params.seed,
            params.response_format,
        ],
        ensure_ascii=False,
        sort_keys=True,  # response_format is a JSON object: its key order does not change the answer
        separators=(",", ":"),
    )
    return f"llm:cache:{KEY_VERSION}:" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class Flight:
    """Identical requests of this process in flight together: ended when the leader's request ends."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        # stored: look it up; unstored: answered but not storable, so each waiter asks for itself (all at
        # once, not one after another); failed: one waiter takes over.
        self.outcome = "failed"


class ResponseCache:
    """Decides per request whether and how the cache takes part, and holds this process's flights."""

    def __init__(
        self,
        store: CacheStore,
        *,
        mode: str,
        scope: str,
        auth_enabled: bool,
        backend: str,
        ttl_s: int,
        max_entry_bytes: int,
    ) -> None:
        self.store = store
        self.mode = mode
        self.per_client = scope == "client" and auth_enabled
        self.backend = backend  # the provider and its upstream (or model file): another backend, another answer
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.outage = Outage()
        self._flights: dict[str, Flight] = {}
        self._flights_lock = threading.Lock()

    @classmethod
    def disabled(cls) -> ResponseCache:
        """Return a cache that every request bypasses (CACHE_MODE=off)."""
        return cls(
            MemoryStore(1, 1), mode="off", scope="shared", auth_enabled=False, backend="", ttl_s=1, max_entry_bytes=0
        )

    def ticket(self, client: Client, params: GenerationParams, directives: CacheDirectives) -> Ticket:
        """Return how the cache takes part in this request."""
        if self.mode == "off":
            return Ticket(self, None, directives, BYPASS_OFF)
        if self.mode == "deterministic" and params.temperature != 0:
            return Ticket(self, None, directives, CacheStatus("bypass", "not_deterministic"))
        if directives.no_store:
            return Ticket(self, None, directives, CacheStatus("bypass", "no_store"))
        if not self.outage.should_try():
            return Ticket(self, None, directives, CacheStatus("bypass", "unavailable"))
        scope = f"client:{client.name}" if self.per_client and client.name else "shared"
        return Ticket(self, cache_key(scope, self.backend, params), directives, CacheStatus("miss"))

    def join_flight(self, key: str) -> tuple[bool, Flight]:
        """Join this process's flight for `key`: return whether this request leads it, and the flight."""
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is not None:
                return False, flight
            flight = self._flights[key] = Flight()
            return True, flight

    def end_flight(self, key: str, flight: Flight, outcome: str) -> None:
        """End a flight this request led, waking the requests that wait for it."""
        with self._flights_lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.outcome = outcome
        flight.ended.set()


class Ticket:
    """One request's part in the cache: look up (or wait for) an answer, store the fresh one, end the flight."""

    def __init__(self, cache: ResponseCache, key: str | None, directives: CacheDirectives, status: CacheStatus) -> None:
        self.cache = cache
        self.key = key
        self.directives = directives
        self.status = status
        self._flight: Flight | None = None
        self._lock_token: str | None = None
        self._outcome = "failed"  # until the answer is stored, or found not storable

    def find(self, deadline_monotonic: float) -> CachedAnswer | None:
        """Return a cached answer, waiting for an identical request in flight; None: call the backend.

        With None the request leads the flight for its key (unless the cache is skipped), and must
        `close` the ticket however it ends, so that waiters take over when it fails.
        """
        if self.key is None or self.directives.no_cache:
            return None  # no-cache: a fresh answer is asked for, and it is stored; no one waits for it
        try:
            return self._find(self.key, deadline_monotonic)
        except STORE_ERRORS as error:
            self._unavailable(error)
            return None

    def _find(self, key: str, deadline_monotonic: float) -> CachedAnswer | None:
        while True:
            answer = self._lookup(key)
            if answer is not None:
                return answer
            leads, flight = self.cache.join_flight(key)
            if not leads:  # another request of this process leads: wait for it to end, then look again
                if not flight.ended.wait(max(deadline_monotonic - time.monotonic(), 0.0)):
                    raise _waited_too_long()
                if flight.outcome == "unstored":
                    return None  # nothing to find: call the backend, without leading anyone
                continue
            self._flight = flight
            answer = self._lead_or_wait_elsewhere(key, deadline_monotonic)
            if answer is not None:
                self._outcome = "stored"
                self.close()  # wake this process's waiters: the answer is in the store
            return answer

    def _lead_or_wait_elsewhere(self, key: str, deadline_monotonic: float) -> CachedAnswer | None:
        """Take the store's lock of `key`, or poll the store while another process holds it."""
        token = uuid.uuid4().hex
        poll_s = POLL_FIRST_S
        while True:
            if self.cache.store.lock(key, token):
                self._lock_token = token
                if self.cache.store.get(f"{key}:unstored") is not None:  # the last leader's answer did not fit
                    self._outcome = "unstored"
                    self.close()  # so every waiter, here and elsewhere, asks for itself now
                    return None
                return self._lookup(key)  # an answer stored between the lookup and the lock is still a hit
            if time.monotonic() + poll_s > deadline_monotonic:
                raise _waited_too_long()
            time.sleep(poll_s)
            poll_s = min(poll_s * 2, POLL_MAX_S)
            answer = self._lookup(key)
            if answer is not None:
                return answer

    def _lookup(self, key: str) -> CachedAnswer | None:
        raw = self.cache.store.get(key)
        self.cache.outage.succeeded()
        if raw is None:
            return None
        answer = CachedAnswer.from_bytes(raw)
        max_age_s = self.directives.max_age_s
        if max_age_s is not None and answer.age_s() > max_age_s:
            return None
        self.status = CacheStatus("hit", age_s=answer.age_s(), cost_saved_usd=answer.cost_usd)
        return answer

    def store(self, completion: Completion, cost_usd: Decimal | None) -> None:
        """Store a finished answer unless it failed (finish_reason not stop or length), is a fallback's or too big."""
        if self.key is None or self.status.reason == "unavailable":
            return
        self._outcome = "unstored"
        if completion.finish_reason not in STORED_FINISH_REASONS or completion.fallback_from:
            return  # a fallback's answer is never served later as if the model asked for had answered
        raw = CachedAnswer(completion, cost_usd, time.time()).to_bytes()
        if len(raw) > self.cache.max_entry_bytes:
            return
        try:
            self.cache.store.set(self.key, raw, self.cache.ttl_s)
            self._outcome = "stored"
        except STORE_ERRORS as error:
            self._unavailable(error)

    def close(self) -> None:
        """End this request's flight: give the store's lock back and wake the waiters of this process."""
        if self.key is None:
            return
        if self._lock_token is not None:
            token, self._lock_token = self._lock_token, None
            try:
                if self._outcome == "unstored" and self.cache.store.shared:
                    self.cache.store.set(f"{self.key}:unstored", b"1", UNSTORED_MARK_S)
                self.cache.store.unlock(self.key, token)
            except STORE_ERRORS as error:  # the lock lapses by itself within LOCK_TTL_MS
                self._unavailable(error)
        if self._flight is not None:
            flight, self._flight = self._flight, None
            self.cache.end_flight(self.key, flight, self._outcome)

    def _unavailable(self, error: BaseException) -> None:
        self.cache.outage.failed(error)
        if self.status.result != "hit":
            self.status = CacheStatus("bypass", "unavailable")


def _waited_too_long() -> UpstreamTimeout:
    return UpstreamTimeout("An identical request in progress did not finish before the deadline.")


def replay_pieces(text: str) -> list[str]:
    """Split a cached answer into word-sized pieces to stream again, each with the space after it."""
    return [piece for piece in re.findall(r"\S*\s*", text) if piece]


def describe(status: CacheStatus) -> dict[str, Any]:
    """Return the summary-log fields of a cache status."""
    fields: dict[str, Any] = {"cache": status.result}
    if status.reason is not None:
        fields["cache_reason"] = status.reason
    fields["cost_saved_usd"] = None if status.cost_saved_usd is None else float(status.cost_saved_usd)
    if status.result != "hit":
        fields["cost_saved_usd"] = 0.0
    return fields

"""Per-client request limits (the `limits` library), token reservations and daily budgets.

Request limits use `limits`' moving window, so "10/minute" means at most 10 in any 60 seconds and the
Retry-After it gives is exact. `limits` has no notion of reserving an amount and settling it later, nor
of money, so those two counters are written here, atomically: a Lua script in Redis, a lock in memory.
Tokens and spend are both reserved at their most before the call and settled to the real amount after,
so concurrent requests cannot pass a limit together. With REDIS_URL every counter lives in Redis and
holds across workers and instances.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import limits
import limits.errors
import limits.storage
import limits.strategies
import redis
import redis.exceptions

from .clients import Client, ClientLimits, ClientPolicy
from .config import Settings
from .counters import Counters, MemoryCounters, RedisCounters, connect_redis
from .errors import (
    BudgetExceeded,
    InvalidRequest,
    LimiterUnavailable,
    RateLimited,
    RateWindow,
    TokenLimitExceeded,
)
from .pricing import PriceTable
from .providers.base import GenerationParams

log = logging.getLogger("llm_service.quotas")

PICO_USD_PER_USD = Decimal(10**12)  # spend is counted in whole pico-dollars: exact integer sums
TOKEN_WINDOW_S = 60
SPEND_TTL_S = 2 * 86400  # a day's spend outlives its day, so a request settling after midnight finds it
STORAGE_ERRORS = (limits.errors.StorageError, redis.exceptions.RedisError, OSError)


class InlineExpiryMemoryStorage(limits.storage.MemoryStorage):
    """limits' in-process storage, pruning expired entries inline once a second.

    The stock class starts a new timer thread to prune whenever the last one has finished, which on a
    service taking a request every few milliseconds is a thread per request: about 0.4 ms each, most of
    this service's own latency. Pruning only frees memory; the moving window itself reads timestamps,
    so limits are unchanged. (It overrides a private hook of limits 5.8, which requirements.txt pins, as
    limits has no public one; tests/test_library_hooks.py fails if an upgrade makes the override silent.)
    """

    PRUNE_EVERY_S = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._last_prune = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now - self._last_prune >= self.PRUNE_EVERY_S:
            self._last_prune = now
            self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


@dataclass
class Reservation:
    """What one admitted request holds: its token and spend reservations, to settle when it ends."""

    client: Client
    limits: ClientLimits
    token_key: str | None = None
    reserved_tokens: int = 0
    spend_key: str | None = None  # the day the spend was reserved on, so settling lands on the same day
    reserved_pico_usd: int = 0


def estimate_input_tokens(params: GenerationParams) -> int:
    """Over-estimate the prompt's tokens (about 3 characters a token, plus the chat template per message)."""
    return math.ceil(params.input_chars / 3) + 16 + 4 * max(len(params.messages) - 2, 0)


def _seconds_to_utc_midnight(now: datetime) -> float:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


class QuotaGuard:
    """Admit or refuse a client's request, and account for what it used."""

    def __init__(
        self, settings: Settings, clients: ClientPolicy, prices: PriceTable, redis_client: redis.Redis | None = None
    ) -> None:
        """Count in Redis when REDIS_URL is set (through `redis_client` if given, sharing its pool), else here."""
        self.clients = clients
        self.prices = prices  # the most a request can cost is reserved against its client's budget
        self.fail_open = settings.rate_limit_fail_open
        self.counters: Counters
        storage: limits.storage.Storage
        if settings.redis_url:
            client = redis_client or connect_redis(settings.redis_url, settings.redis_tls_verify)
            storage = limits.storage.RedisStorage(
                settings.redis_url, connection_pool=client.connection_pool, wrap_exceptions=True
            )
            self.counters = RedisCounters(client)
        else:
            storage = InlineExpiryMemoryStorage()
            self.counters = MemoryCounters()
        self.limiter = limits.strategies.MovingWindowRateLimiter(storage)
        self._items: dict[str, list[limits.RateLimitItem]] = {}

    def items(self, rate_limit: str) -> list[limits.RateLimitItem]:
        """Return the parsed limits of a RATE_LIMIT string, parsed once."""
        if rate_limit not in self._items:
            self._items[rate_limit] = list(limits.parse_many(rate_limit))
        return self._items[rate_limit]

    def _unavailable(self, error: Exception) -> None:
        """Serve without limits (logged at ERROR) or refuse with 503, as RATE_LIMIT_FAIL_OPEN says."""
        log.error(
            "usage limits unavailable",
            extra={"error_type": type(error).__name__, "fail_open": self.fail_open},
        )
        if not self.fail_open:
            raise LimiterUnavailable(retry_after_s=1.0) from None

    def hit(self, client: Client) -> RateWindow | None:
        """Count one request against the client's request limits; return the limit closest to running out."""
        items = self.items(self.clients.limits_for(client.name).rate_limit)
        try:
            for item in items:
                if not self.limiter.hit(item, "generate", client.limit_key):
                    window = self._window(item, client)  # reset: when the oldest hit leaves
                    raise RateLimited(retry_after_s=max(window.reset_at - time.time(), 1.0), rate_window=window)
            return self._closest_window(client, items)
        except STORAGE_ERRORS as error:
            self._unavailable(error)
            return None

    def _closest_window(self, client: Client, items: list[limits.RateLimitItem]) -> RateWindow:
        """Return the client's standing in the request limit closest to running out."""
        return min((self._window(item, client) for item in items), key=lambda window: window.remaining)

    def _window(self, item: limits.RateLimitItem, client: Client) -> RateWindow:
        """Return the client's standing in one request limit, with the exact time its window frees."""
        stats = self.limiter.get_window_stats(item, "generate", client.limit_key)
        return RateWindow(limit=item.amount, remaining=stats.remaining, reset_at=stats.reset_time)

    def token_window(self, client: Client) -> RateWindow | None:
        """Return the client's standing in its token limit this minute; None when no token limit applies."""
        token_limit = self.clients.limits_for(client.name).token_limit
        if token_limit is None:
            return None
        now = time.time()
        window = int(now // TOKEN_WINDOW_S)
        try:
            used = max(self.counters.get(f"llm:tokens:{client.limit_key}:{window}"), 0)
        except STORAGE_ERRORS:
            return None
        return RateWindow(
            limit=token_limit, remaining=max(token_limit - used, 0), reset_at=(window + 1) * TOKEN_WINDOW_S
        )

    def admit(self, client: Client, params: GenerationParams) -> tuple[Reservation, RateWindow | None]:
        """Reserve the request's budget and tokens, then count it against the request limit.

        In this order a request refused for its budget or tokens uses up no request slot (a moving
        window cannot give a hit back); one refused by the request limit gives its reservation back.
        Return the reservation and the client's standing in its request limit.
        """
        try:
            reservation = self.reserve(client, params)
        except (BudgetExceeded, TokenLimitExceeded) as refusal:
            try:  # the refusal still tells where the request limit stands, as every 429 here does
                items = self.items(self.clients.limits_for(client.name).rate_limit)
                refusal.rate_window = self._closest_window(client, items)
            except STORAGE_ERRORS:
                pass
            raise
        try:
            return reservation, self.hit(client)
        except (RateLimited, LimiterUnavailable):
            self.release(reservation)
            raise

    def reserve(self, client: Client, params: GenerationParams) -> Reservation:
        """Reserve the most the request can cost against the budget, and its tokens against the token limit."""
        client_limits = self.clients.limits_for(client.name)
        reservation = Reservation(client, client_limits)
        try:
            if client_limits.daily_budget_usd is not None:
                self._reserve_spend(reservation, client_limits.daily_budget_usd, params)
            if client_limits.token_limit is not None:
                try:
                    self._reserve_tokens(reservation, client_limits.token_limit, params)
                except (InvalidRequest, TokenLimitExceeded):
                    self.release(reservation)
                    raise
        except STORAGE_ERRORS as error:
            self._unavailable(error)
        return reservation

    def max_cost_usd(self, params: GenerationParams) -> Decimal | None:
        """Return the most a request can cost: estimated input + max_tokens at the model's prices.

        None for a model the price table does not list: its cost is unknown, and never charged.
        """
        table = self.prices
        return table.cost_usd(
            table.price_for(params.model),
            input_tokens=estimate_input_tokens(params),
            cached_input_tokens=0,
            output_tokens=params.max_tokens,
        )

    def _reserve_spend(self, reservation: Reservation, budget_usd: Decimal, params: GenerationParams) -> None:
        max_cost_usd = self.max_cost_usd(params)
        budget_pico = int(budget_usd * PICO_USD_PER_USD)
        if max_cost_usd is not None and max_cost_usd * PICO_USD_PER_USD > budget_pico:
            raise InvalidRequest(
                "The request could cost more than this client's daily budget.",
                details={
                    "max_tokens": [
                        f"Prompt and max_tokens could cost up to {max_cost_usd:.6f} USD; "
                        f"the budget is {budget_usd} USD a day."
                    ]
                },
            )
        # An unpriced model reserves one pico-dollar: refused once the budget is spent, charged nothing.
        amount_pico = 1 if max_cost_usd is None else max(math.ceil(max_cost_usd * PICO_USD_PER_USD), 1)
        now = datetime.now(UTC)
        key = self._spend_key(reservation.client, now)
        if not self.counters.reserve(key, amount_pico, budget_pico, ttl_s=SPEND_TTL_S):
            raise BudgetExceeded(retry_after_s=_seconds_to_utc_midnight(now))
        reservation.spend_key, reservation.reserved_pico_usd = key, amount_pico

    def _reserve_tokens(self, reservation: Reservation, token_limit: int, params: GenerationParams) -> None:
        estimate = estimate_input_tokens(params) + params.max_tokens
        if estimate > token_limit:
            raise InvalidRequest(
                "The request could never fit this client's token limit.",
                details={
                    "max_tokens": [
                        f"Prompt and max_tokens need about {estimate} tokens; the limit is {token_limit} per minute."
                    ]
                },
            )
        now = time.time()
        window = int(now // TOKEN_WINDOW_S)
        key = f"llm:tokens:{reservation.client.limit_key}:{window}"
        if not self.counters.reserve(key, estimate, token_limit, ttl_s=2 * TOKEN_WINDOW_S):
            raise TokenLimitExceeded(retry_after_s=(window + 1) * TOKEN_WINDOW_S - now)
        reservation.token_key, reservation.reserved_tokens = key, estimate

    @staticmethod
    def _spend_key(client: Client, now: datetime) -> str:
        return f"llm:spend:{client.limit_key}:{now.date().isoformat()}"

    def settle(self, reservation: Reservation, used_tokens: int | None, cost_usd: Decimal | None) -> None:
        """Replace the reservations by the tokens really used and the real cost (None: unknown, not charged)."""
        try:
            if reservation.token_key is not None and used_tokens is not None:
                delta = used_tokens - reservation.reserved_tokens
                if delta:
                    self.counters.add(reservation.token_key, delta, ttl_s=2 * TOKEN_WINDOW_S)
            spend_pico = math.ceil(max(cost_usd or Decimal(0), Decimal(0)) * PICO_USD_PER_USD)
            delta_pico = spend_pico - reservation.reserved_pico_usd
            if delta_pico:
                key = reservation.spend_key or self._spend_key(reservation.client, datetime.now(UTC))
                self.counters.add(key, delta_pico, ttl_s=SPEND_TTL_S)
            reservation.reserved_pico_usd = spend_pico  # settled: settling again adds nothing
        except STORAGE_ERRORS as error:  # the answer is already given; the counters are behind
            log.error("could not record usage", extra={"error_type": type(error).__name__})

    def release(self, reservation: Reservation) -> None:
        """Give back the reservations of a request that used nothing (refused, or the upstream failed)."""
        self.settle(reservation, 0, None)

    def usage(self, client: Client) -> dict[str, Any]:
        """Return the client's own counters, or raise LimiterUnavailable when they cannot be read.

        Unlike admitting a request, reporting counters cannot fail open: there is nothing true to answer.
        """
        try:
            return self._usage(client)
        except STORAGE_ERRORS as error:
            log.error("usage counters unavailable", extra={"error_type": type(error).__name__})
            raise LimiterUnavailable(retry_after_s=1.0) from None

    def _usage(self, client: Client) -> dict[str, Any]:
        client_limits = self.clients.limits_for(client.name)
        now = datetime.now(UTC)
        requests = []
        for item in self.items(client_limits.rate_limit):
            stats = self.limiter.get_window_stats(item, "generate", client.limit_key)
            requests.append(
                {
                    "limit": str(item),
                    "used": item.amount - stats.remaining,
                    "remaining": stats.remaining,
                    "reset_at": math.ceil(stats.reset_time),
                }
            )
        window = int(now.timestamp() // TOKEN_WINDOW_S)
        tokens_used = max(self.counters.get(f"llm:tokens:{client.limit_key}:{window}"), 0)
        spent_usd = Decimal(self.counters.get(self._spend_key(client, now))) / PICO_USD_PER_USD
        budget = client_limits.daily_budget_usd
        return {
            "client": client.label,
            "requests": requests,
            "tokens": {
                "limit_per_minute": client_limits.token_limit,
                "used": tokens_used,
                "remaining": None
                if client_limits.token_limit is None
                else max(client_limits.token_limit - tokens_used, 0),
                "reset_in_s": round((window + 1) * TOKEN_WINDOW_S - now.timestamp(), 1),
            },
            "spend_usd_today": float(spent_usd),
            "daily_budget_usd": None if budget is None else float(budget),
            "budget_left_usd": None if budget is None else float(max(budget - spent_usd, Decimal(0))),
        }

    def ping(self) -> None:
        """Raise if the counters' store cannot be reached."""
        self.counters.ping()

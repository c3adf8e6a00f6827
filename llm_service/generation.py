"""The generation use-case: one call owns a request's reservation, the backend call, its price and settling."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .cache import (
    BYPASS_OFF,
    NO_DIRECTIVES,
    CachedAnswer,
    CacheDirectives,
    CacheStatus,
    ResponseCache,
    Ticket,
    describe,
    replay_pieces,
)
from .client_watch import ClientGone, ClientWatch
from .clients import Client
from .errors import RateWindow, ServiceError
from .pricing import PriceTable
from .providers.base import Completion, GenerationParams, Provider, TextDelta, TokenUsage
from .quotas import QuotaGuard, Reservation, estimate_input_tokens

# Hears where the client stands in its request limit once a request is admitted (for rate-limit headers).
OnAdmit = Callable[[RateWindow | None], None] | None


@dataclass(frozen=True)
class Generation:
    """A priced completion, ready to answer with."""

    completion: Completion
    provider: str
    cost_usd: Decimal | None
    latency_ms: float
    cache: CacheStatus = BYPASS_OFF

    @property
    def cached(self) -> bool:
        """Return whether the answer came from the cache."""
        return self.cache.result == "hit"

    def metadata(self) -> dict[str, Any]:
        """Return the native API's metadata object."""
        usage = self.completion.usage
        tokens = None if usage is None else {"input": usage.input, "output": usage.output, "total": usage.total}
        if usage is not None and usage.cached_input:
            tokens = {**(tokens or {}), "cached_input": usage.cached_input}
        metadata = {
            "model": self.completion.model,
            "provider": self.provider,
            "finish_reason": self.completion.finish_reason,
            "attempts": self.completion.attempts,
            "tokens": tokens,
            "cost_usd": None if self.cost_usd is None else float(self.cost_usd),
            "latency_ms": self.latency_ms,
            "cached": self.cached,
        }
        if self.completion.fallback_from:
            metadata["fallback_from"] = self.completion.fallback_from
        if self.cached:
            saved = self.cache.cost_saved_usd
            metadata["cost_saved_usd"] = None if saved is None else float(saved)
        return metadata

    def log_fields(self) -> dict[str, Any]:
        """Return the summary-log fields this generation adds: counts, never text."""
        usage = self.completion.usage
        return {
            "model": self.completion.model,
            "provider": self.provider,
            "finish_reason": self.completion.finish_reason,
            "response_length": len(self.completion.text),
            "tokens_input": None if usage is None else usage.input,
            "tokens_cached_input": None if usage is None else usage.cached_input,
            "tokens_output": None if usage is None else usage.output,
            "tokens_total": None if usage is None else usage.total,
            "cost_usd": None if self.cost_usd is None else float(self.cost_usd),
            "attempts": self.completion.attempts,
            "upstream_request_id": self.completion.upstream_request_id,
            "fallback_from": self.completion.fallback_from,
            **describe(self.cache),
        }


class GenerationStream:
    """Text deltas, then the priced Generation; closing it stops the backend and settles the reservation."""

    def __init__(self, run: Callable[[GenerationStream], Iterator[TextDelta | Generation]]) -> None:
        self.generation: Generation | None = None
        self.cache = BYPASS_OFF  # known once the first item is: how the cache takes part
        # Known once the first item is, when a fallback answers: the model answering, and the one asked for.
        self.model: str | None = None
        self.fallback_from: str | None = None
        # Set when the stream ended without a usage report and was charged an estimate instead.
        self.estimate: dict[str, Any] | None = None
        self._items = run(self)  # a generator: nothing runs before the first item is asked for

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> TextDelta | Generation:
        return next(self._items)

    def close(self) -> None:
        """Stop the backend now (the upstream read or the local model) and settle what was used."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def log_fields(self) -> dict[str, Any]:
        """Return the summary-log fields of the stream so far: the generation's, or the estimate charged."""
        if self.generation is not None:
            return self.generation.log_fields()
        return {**describe(self.cache), **(self.estimate or {})}


class GenerationService:
    """Turns validated requests into priced generations through one provider, within the client's quotas."""

    def __init__(
        self,
        provider: Provider,
        prices: PriceTable,
        quotas: QuotaGuard,
        *,
        deadline_s: float,
        cache: ResponseCache | None = None,
    ) -> None:
        self.provider = provider
        self.prices = prices
        self.quotas = quotas
        self.deadline_s = deadline_s
        self.cache = cache or ResponseCache.disabled()

    def deadline(self, started_monotonic: float) -> float:
        """Return the monotonic time by which the whole request must be answered."""
        return started_monotonic + self.deadline_s

    def generate(
        self,
        client: Client,
        params: GenerationParams,
        started_monotonic: float,
        on_admit: OnAdmit = None,
        directives: CacheDirectives = NO_DIRECTIVES,
        watch: ClientWatch | None = None,
    ) -> Generation:
        """Answer from the cache, or admit the request within the client's quotas, generate, price, settle, store.

        With `watch`, a client that closes its connection while the backend works stops it: ClientGone is
        raised once what was used is settled, with the summary-log fields of that charge.
        """
        ticket = self.cache.ticket(client, params, directives)
        try:
            answer = ticket.find(self.deadline(started_monotonic))
            if answer is not None:
                return self._hit(client, answer, ticket.status, started_monotonic, on_admit)
            reservation = self._admit(client, params, on_admit)
            try:
                with nullcontext() if watch is None else watch:
                    completion = self.provider.complete(params, self.deadline(started_monotonic))
            except ServiceError:
                self.quotas.release(reservation)
                raise
            except ClientGone as gone:
                # An upstream's plain answer never arrived: its size is unknown, and OpenAI bills a plain
                # generation to its end even when its caller has gone, so it is charged as reserved.
                output_tokens = params.max_tokens if gone.output_tokens is None else gone.output_tokens
                charged = self._charge_estimate(params, reservation, output_tokens, gone.input_tokens)
                gone.log_fields = {**describe(ticket.status), **charged}  # as a cut stream's summary line has
                raise
            return self._stored(ticket, self._settled(completion, params, reservation, started_monotonic))
        finally:
            ticket.close()  # requests waiting for this answer look it up now, or one of them takes over

    def stream(
        self,
        client: Client,
        params: GenerationParams,
        started_monotonic: float,
        on_admit: OnAdmit = None,
        directives: CacheDirectives = NO_DIRECTIVES,
    ) -> GenerationStream:
        """Return a stream that is answered or admitted on its first item, yields deltas, then the Generation."""
        return GenerationStream(
            lambda out: self._cached_stream(out, client, params, started_monotonic, on_admit, directives)
        )

    def _hit(
        self, client: Client, answer: CachedAnswer, status: CacheStatus, started_monotonic: float, on_admit: OnAdmit
    ) -> Generation:
        """Answer from the cache: counted against the request limit, not against tokens or budget (nothing is spent)."""
        request_window = self.quotas.hit(client)
        if on_admit is not None:
            on_admit(request_window)
        return Generation(answer.completion, self.provider.name, Decimal(0), _elapsed_ms(started_monotonic), status)

    @staticmethod
    def _stored(ticket: Ticket, generation: Generation) -> Generation:
        """Store a fresh answer for the requests that repeat it; return it with how the cache took part."""
        ticket.store(generation.completion, generation.cost_usd)
        return dataclasses.replace(generation, cache=ticket.status)

    def _cached_stream(
        self,
        out: GenerationStream,
        client: Client,
        params: GenerationParams,
        started_monotonic: float,
        on_admit: OnAdmit,
        directives: CacheDirectives,
    ) -> Iterator[TextDelta | Generation]:
        """Replay a cached answer as a stream, or stream a fresh one and store it once it is complete."""
        ticket = self.cache.ticket(client, params, directives)
        try:
            answer = ticket.find(self.deadline(started_monotonic))
            out.cache = ticket.status
            if answer is not None:
                out.generation = self._hit(client, answer, ticket.status, started_monotonic, on_admit)
                for piece in replay_pieces(answer.completion.text):
                    yield TextDelta(piece)
                yield out.generation
                return
            yield from self._stream(out, ticket, client, params, started_monotonic, on_admit)
        finally:
            ticket.close()

    def _admit(self, client: Client, params: GenerationParams, on_admit: OnAdmit) -> Reservation:
        """Reserve the client's budget and tokens and count the request; tell `on_admit` the request limit."""
        reservation, request_window = self.quotas.admit(client, params)
        if on_admit is not None:
            on_admit(request_window)
        return reservation

    def _stream(
        self,
        out: GenerationStream,
        ticket: Ticket,
        client: Client,
        params: GenerationParams,
        started_monotonic: float,
        on_admit: OnAdmit,
    ) -> Iterator[TextDelta | Generation]:
        reservation = self._admit(client, params, on_admit)
        items = None
        deltas = 0
        try:
            items = self.provider.stream(params, self.deadline(started_monotonic))
            for item in items:
                if isinstance(item, TextDelta):
                    if item.fallback_from:
                        out.model, out.fallback_from = item.model, item.fallback_from
                    deltas += 1
                    yield item
                else:  # the stream is complete (never a truncated one): stored for streams and plain requests
                    settled = self._settled(item, params, reservation, started_monotonic)
                    out.generation = self._stored(ticket, settled)
                    out.cache = out.generation.cache
                    yield out.generation
        except ServiceError:
            if not deltas:  # nothing was generated: give the reservation back
                self.quotas.release(reservation)
            raise
        finally:
            if items is not None and hasattr(items, "close"):
                items.close()
            if deltas and out.generation is None:
                out.estimate = self._charge_estimate(params, reservation, deltas)

    def _charge_estimate(
        self, params: GenerationParams, reservation: Reservation, output_tokens: int, input_tokens: int | None = None
    ) -> dict[str, Any]:
        """Charge a generation that ended without a usage report (client gone, upstream failed mid-way).

        The upstream still bills what it generated; without this, abandoning requests would dodge
        budgets. Input, unless known, is over-estimated from the prompt's length; a stream's output
        counts a token per delta.
        """
        if input_tokens is None:
            input_tokens = estimate_input_tokens(params)
        cost_usd = self._cost_usd(TokenUsage(input=input_tokens, output=output_tokens), params.model)
        self.quotas.settle(reservation, input_tokens + output_tokens, cost_usd)
        return {
            "tokens_estimated": input_tokens + output_tokens,
            "cost_usd_estimated": None if cost_usd is None else float(cost_usd),
        }

    def _settled(
        self, completion: Completion, params: GenerationParams, reservation: Reservation, started_monotonic: float
    ) -> Generation:
        usage = completion.usage
        # A fallback's answer is priced as the model that answered, never at the price of the one asked for.
        models = (completion.model,) if completion.fallback_from else (completion.model, params.model)
        cost_usd = None if usage is None else self._cost_usd(usage, *models)
        self.quotas.settle(reservation, None if usage is None else usage.total, cost_usd)
        provider = completion.upstream or self.provider.name
        return Generation(completion, provider, cost_usd, _elapsed_ms(started_monotonic))

    def _cost_usd(self, usage: TokenUsage, *models: str) -> Decimal | None:
        """Price `usage` by the first of `models` the table knows, else at the provider's unpriced cost."""
        price = self.prices.price_for(*models)
        cost_usd = self.prices.cost_usd(
            price, input_tokens=usage.input, cached_input_tokens=usage.cached_input, output_tokens=usage.output
        )
        return self.provider.unpriced_cost_usd if cost_usd is None else cost_usd


def _elapsed_ms(started_monotonic: float) -> float:
    """Return the milliseconds since `started_monotonic`, to a tenth."""
    return round((time.monotonic() - started_monotonic) * 1000, 1)

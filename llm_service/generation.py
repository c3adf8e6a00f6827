"""The generation use-case: one call owns a request's reservation, the backend call, its price and settling."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

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

    def metadata(self) -> dict[str, Any]:
        """Return the native API's metadata object."""
        usage = self.completion.usage
        tokens = None if usage is None else {"input": usage.input, "output": usage.output, "total": usage.total}
        if usage is not None and usage.cached_input:
            tokens = {**(tokens or {}), "cached_input": usage.cached_input}
        return {
            "model": self.completion.model,
            "provider": self.provider,
            "finish_reason": self.completion.finish_reason,
            "attempts": self.completion.attempts,
            "tokens": tokens,
            "cost_usd": None if self.cost_usd is None else float(self.cost_usd),
            "latency_ms": self.latency_ms,
        }

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
        }


class GenerationStream:
    """Text deltas, then the priced Generation; closing it stops the backend and settles the reservation."""

    def __init__(self, run: Callable[[GenerationStream], Iterator[TextDelta | Generation]]) -> None:
        self.generation: Generation | None = None
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
        return dict(self.estimate or {})


class GenerationService:
    """Turns validated requests into priced generations through one provider, within the client's quotas."""

    def __init__(self, provider: Provider, prices: PriceTable, quotas: QuotaGuard, *, deadline_s: float) -> None:
        self.provider = provider
        self.prices = prices
        self.quotas = quotas
        self.deadline_s = deadline_s

    def deadline(self, started_monotonic: float) -> float:
        """Return the monotonic time by which the whole request must be answered."""
        return started_monotonic + self.deadline_s

    def generate(
        self, client: Client, params: GenerationParams, started_monotonic: float, on_admit: OnAdmit = None
    ) -> Generation:
        """Admit the request within the client's quotas, generate before the deadline, price it, settle."""
        reservation = self._admit(client, params, on_admit)
        try:
            completion = self.provider.complete(params, self.deadline(started_monotonic))
        except ServiceError:
            self.quotas.release(reservation)
            raise
        return self._settled(completion, params, reservation, started_monotonic)

    def stream(
        self, client: Client, params: GenerationParams, started_monotonic: float, on_admit: OnAdmit = None
    ) -> GenerationStream:
        """Return a stream that is admitted on its first item, yields deltas, then the priced Generation."""
        return GenerationStream(lambda out: self._stream(out, client, params, started_monotonic, on_admit))

    def _admit(self, client: Client, params: GenerationParams, on_admit: OnAdmit) -> Reservation:
        """Reserve the client's budget and tokens and count the request; tell `on_admit` the request limit."""
        reservation, request_window = self.quotas.admit(client, params)
        if on_admit is not None:
            on_admit(request_window)
        return reservation

    def _stream(
        self,
        out: GenerationStream,
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
                    deltas += 1
                    yield item
                else:
                    out.generation = self._settled(item, params, reservation, started_monotonic)
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

    def _charge_estimate(self, params: GenerationParams, reservation: Reservation, deltas: int) -> dict[str, Any]:
        """Charge a stream that ended without a usage report (client gone, upstream failed mid-way).

        The upstream still bills what it generated; without this, abandoning streams would dodge
        budgets. Input is over-estimated from the prompt's length; output counts a token per delta.
        """
        input_tokens = estimate_input_tokens(params)
        cost_usd = self._cost_usd(TokenUsage(input=input_tokens, output=deltas), params.model)
        self.quotas.settle(reservation, input_tokens + deltas, cost_usd)
        return {
            "tokens_estimated": input_tokens + deltas,
            "cost_usd_estimated": None if cost_usd is None else float(cost_usd),
        }

    def _settled(
        self, completion: Completion, params: GenerationParams, reservation: Reservation, started_monotonic: float
    ) -> Generation:
        usage = completion.usage
        cost_usd = None if usage is None else self._cost_usd(usage, completion.model, params.model)
        latency_ms = round((time.monotonic() - started_monotonic) * 1000, 1)
        self.quotas.settle(reservation, None if usage is None else usage.total, cost_usd)
        return Generation(completion, self.provider.name, cost_usd, latency_ms)

    def _cost_usd(self, usage: TokenUsage, *models: str) -> Decimal | None:
        """Price `usage` by the first of `models` the table knows, else at the provider's unpriced cost."""
        price = self.prices.price_for(*models)
        cost_usd = self.prices.cost_usd(
            price, input_tokens=usage.input, cached_input_tokens=usage.cached_input, output_tokens=usage.output
        )
        return self.provider.unpriced_cost_usd if cost_usd is None else cost_usd

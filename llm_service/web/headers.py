"""Rate-limit headers in each API's own spelling, and the cache's headers."""

from __future__ import annotations

import math
import time

from ..cache import CacheStatus
from ..errors import RateWindow


def cache_headers(status: CacheStatus) -> dict[str, str]:
    """Return X-Cache (HIT, MISS or BYPASS) and, on a hit, Age: the cached answer's age in seconds."""
    headers = {"X-Cache": status.header}
    if status.age_s is not None:
        headers["Age"] = str(status.age_s)
    return headers


def native_rate_headers(window: RateWindow | None) -> dict[str, str]:
    """Return X-RateLimit-Limit, -Remaining and -Reset (Unix time, s) for the native API."""
    if window is None:
        return {}
    return {
        "X-RateLimit-Limit": str(window.limit),
        "X-RateLimit-Remaining": str(window.remaining),
        "X-RateLimit-Reset": str(math.ceil(window.reset_at)),
    }


def openai_rate_headers(requests: RateWindow | None, tokens: RateWindow | None) -> dict[str, str]:
    """Return OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens}; resets as durations like 1m2s."""
    headers = {}
    for kind, window in (("requests", requests), ("tokens", tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(window.reset_at - time.time())
    return headers


def duration(seconds: float) -> str:
    """Spell a wait the way OpenAI's reset headers do: 850ms, 17s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"

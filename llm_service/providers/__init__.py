"""LLM backends behind one interface."""

from __future__ import annotations

from ..config import Settings
from .base import Provider


def build_provider(settings: Settings) -> Provider:
    """Return the backend the settings choose; the local one is imported only when chosen."""
    if settings.provider == "local":
        from .local import LocalProvider

        return LocalProvider(settings)
    from .openai_provider import OpenAIProvider

    return OpenAIProvider(settings)

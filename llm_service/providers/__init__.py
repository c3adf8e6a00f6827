"""LLM backends behind one interface."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ..config import Settings
from ..models_file import Routes
from .base import Provider


def installation_problem(settings: Settings, routes: Routes | None = None) -> str | None:
    """Say what is missing for the local backend to start, if it is used, before any worker tries; else None."""
    if routes is not None and routes.uses_local:
        why = 'MODELS_FILE routes a model to upstream "local"'
    elif settings.provider == "local":
        why = f"LLM_PROVIDER is local ({settings.provider_reason})"
    else:
        return None
    from .local import LocalModelMissing, default_model_path

    if importlib.util.find_spec("llama_cpp") is None:
        return (
            f"{why} but llama-cpp-python is not installed: set OPENAI_API_KEY (or OPENAI_BASE_URL), "
            "or install requirements-local.txt (`make run` does)"
        )
    if settings.local_model_path is None:
        try:
            default_model_path()
        except LocalModelMissing as error:
            return f"{why} but {error.message}"
    elif not os.path.isfile(settings.local_model_path):
        return f"{why} but LOCAL_MODEL_PATH {settings.local_model_path!r} is not a file"
    return None


def build_provider(settings: Settings, routes: Routes | None = None, redis_client: Any = None) -> Provider:
    """Return the backend the settings choose, the router with MODELS_FILE; local is imported only when chosen."""
    if routes is not None:
        from .router import build_router

        return build_router(settings, routes, redis_client)
    if settings.provider == "local":
        from .local import LocalProvider

        return LocalProvider(settings)
    from .openai_provider import OpenAIProvider
    from .retry import RetryBudget

    return OpenAIProvider(settings, budget=RetryBudget(settings.retry_budget))

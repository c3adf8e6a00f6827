"""llm-service: an LLM behind a small, hardened HTTP API."""

from __future__ import annotations

import logging
import os

from flask import Flask

from .config import Settings

log = logging.getLogger("llm_service")


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app from `settings`, or from the environment when none are given."""
    from . import startup, web

    if settings is None:
        settings, catalog = startup.load_env(os.environ)
    else:
        catalog = startup.load(settings)
    app = Flask(__name__)
    configure_app(app, settings)
    web.init_app(app, startup.build_services(settings, catalog))
    loaded = {"allowed_models": len(catalog.allowed_models), "price_source": catalog.prices.source}
    log.info("service configured", extra={**settings.describe(), **loaded})
    warn_about_open_settings(settings)
    return app


def configure_app(app: Flask, settings: Settings) -> None:
    """Set Flask's own limits and JSON output, and start JSON logging."""
    from .logs import configure_logging

    configure_logging(settings.log_level)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    if settings.trusted_proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # The client's address comes from X-Forwarded-For only through this many trusted proxies:
        # entries a client wrote itself lie further left and are ignored.
        hops = settings.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    register_admission(app, settings)


def register_admission(app: Flask, settings: Settings) -> None:
    """Shed load past MAX_IN_FLIGHT and read bodies by BODY_TIMEOUT, before Flask sees the request."""
    from .web.admission import Admission

    app.wsgi_app = Admission(  # type: ignore[method-assign]
        app.wsgi_app, settings.max_in_flight, settings.body_timeout_s, settings.max_body_bytes
    )


def warn_about_open_settings(settings: Settings) -> None:
    """Say at start-up what is left open: no authentication, or limits counted per process."""
    if not settings.api_keys:
        log.warning("API_KEYS is not set: authentication is off and limits apply per client IP")
    if not settings.redis_url and settings.web_concurrency > 1:
        log.warning(
            "REDIS_URL is not set: limits and budgets are counted in each worker process separately",
            extra={"web_concurrency": settings.web_concurrency},
        )

"""Everything that knows Flask: each API's views, SSE, the request record, error handlers, schemas."""

from __future__ import annotations

from flask import Flask

from ..startup import Services
from .context import Schemas
from .errors import register_error_handlers
from .openai_schemas import ChatCompletionRequestSchema
from .record import register_request_hooks
from .schemas import GenerateRequestSchema


def init_app(app: Flask, services: Services) -> None:
    """Mount both APIs and the operations endpoints on `app`, with the bookkeeping around every request."""
    from . import native, openai_api, ops
    from .openapi import build_document

    settings = services.settings
    app.extensions["llm_service"] = services
    app.extensions["llm_service.draining"] = services.draining  # gunicorn.conf.py's SIGTERM hook begins it
    app.extensions["llm_service.schemas"] = Schemas(
        generate=GenerateRequestSchema(
            max_chars=settings.max_chars,
            max_output_tokens=settings.max_output_tokens,
            allowed_models=services.catalog.allowed_models,
        ),
        chat=ChatCompletionRequestSchema(max_chars=settings.max_chars, max_output_tokens=settings.max_output_tokens),
    )
    register_request_hooks(app)
    for blueprint in (native.bp, openai_api.bp, ops.bp):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    app.extensions["llm_service.openapi"] = build_document(app)

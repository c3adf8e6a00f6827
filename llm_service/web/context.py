"""What every view needs from the current request: the app's services, the caller, the validated body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app, request
from marshmallow import Schema, ValidationError
from werkzeug.datastructures import RequestCacheControl
from werkzeug.http import parse_cache_control_header

from ..cache import CacheDirectives
from ..client_watch import ClientGone, ClientWatch
from ..clients import Client
from ..errors import ClientClosed, InvalidRequest, Unauthorized
from ..generation import Generation
from ..providers.base import GenerationParams
from ..startup import Services
from .openai_schemas import ChatCompletionRequestSchema
from .record import current_record
from .schemas import GenerateRequestSchema


def services() -> Services:
    """Return this app's services."""
    return current_app.extensions["llm_service"]  # type: ignore[no-any-return]


def bearer_token() -> str | None:
    """Return the token of an `Authorization: Bearer` header, if there is one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def current_client() -> Client:
    """Return who is calling: the named owner of a valid key, or anonymous by IP when auth is off."""
    auth = services().auth
    if not auth.enabled:
        client = Client(None, request.remote_addr)
    else:
        name = auth.identify(bearer_token() or request.headers.get("X-API-Key"))
        if name is None:
            raise Unauthorized()
        client = Client(name, request.remote_addr)
    current_record().fields["client"] = client.label
    return client


def cache_directives() -> CacheDirectives:
    """Return what the request's Cache-Control asks of the response cache (directive names in any case)."""
    header = request.headers.get("Cache-Control", "").lower()
    control = parse_cache_control_header(header, cls=RequestCacheControl)
    return CacheDirectives(no_cache=bool(control.no_cache), no_store=bool(control.no_store), max_age_s=control.max_age)


def generate_plain(client: Client, params: GenerationParams, directives: CacheDirectives) -> Generation:
    """Make a plain (non-streamed) answer, stopped if the client closes its connection meanwhile.

    gunicorn gives the client's socket; a stopped request is finished here as `client_closed`, with what
    it was charged, and its 499 goes to a connection no one reads.
    """
    record = current_record()
    sock = request.environ.get("gunicorn.socket")
    watch = None if sock is None else ClientWatch(sock)
    try:
        return services().generation.generate(
            client, params, record.started_monotonic, record.admitted, directives, watch
        )
    except ClientGone as gone:
        record.finish("client_closed", **gone.log_fields)
        raise ClientClosed() from None


def load_body(schema: Schema) -> dict[str, Any]:
    """Parse and validate the JSON body, or raise InvalidRequest with per-field details."""
    if not request.is_json:
        raise InvalidRequest("Content-Type must be application/json.")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nested past the parser's depth: not a ValueError, so `silent` lets it through
        raise InvalidRequest("The body is nested too deeply.") from None
    if body is None and request.get_data(cache=True).strip() not in (b"", b"null"):
        raise InvalidRequest("The body is not valid JSON.")
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    try:
        return schema.load(body)  # type: ignore[no-any-return]
    except ValidationError as error:
        details: dict[str, Any] = error.normalized_messages()  # type: ignore[no-untyped-call]
        raise InvalidRequest("The request has invalid fields.", details=details) from None


@dataclass(frozen=True)
class Schemas:
    """The request schemas of this app, bound to its limits and models."""

    generate: GenerateRequestSchema
    chat: ChatCompletionRequestSchema


def schemas() -> Schemas:
    """Return this app's request schemas."""
    return current_app.extensions["llm_service.schemas"]  # type: ignore[no-any-return]

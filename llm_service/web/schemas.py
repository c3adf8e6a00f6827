"""Marshmallow schemas of the native API (/generate, /usage, ...) and the fields both APIs share."""

from __future__ import annotations

import numbers
from typing import Any

from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, validate, validates, validates_schema


class StrictFloat(fields.Float):
    """A JSON number only: no numeric strings, no booleans, no NaN or infinity."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictInteger(fields.Integer):
    """A JSON integer only: no strings, no booleans, no fractional numbers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(fields.Boolean):
    """A JSON true or false only: no 1, 0 or 1.0 (which equal True and False, so a set lookup admits them)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def require_utf8(value: str) -> None:
    """Refuse text that cannot be sent on: JSON's \\udXXX escapes can decode to unpaired surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Must be valid Unicode text: an unpaired surrogate (\\ud800-\\udfff) is not.") from None


class GenerateRequestSchema(Schema):
    """Validate a /generate body against the limits this service was started with."""

    class Meta:
        unknown = RAISE

    prompt = fields.String(required=True)
    system = fields.String(load_default=None)
    model = fields.String(load_default=None)
    temperature = StrictFloat(load_default=0.7, validate=validate.Range(min=0, max=2))
    max_tokens = StrictInteger(load_default=1000)
    stream = StrictBoolean(load_default=False)

    def __init__(self, *, max_chars: int, max_output_tokens: int, allowed_models: tuple[str, ...]) -> None:
        super().__init__()
        self.max_chars = max_chars
        self.max_output_tokens = max_output_tokens
        self.allowed_models = frozenset(allowed_models)

    @validates("prompt")
    def _prompt_not_blank(self, value: str, **_: Any) -> None:
        if not value.strip():
            raise ValidationError("Must not be blank.")
        require_utf8(value)

    @validates("system")
    def _system_is_text(self, value: str | None, **_: Any) -> None:
        if value is not None:
            require_utf8(value)

    @validates("model")
    def _model_allowed(self, value: str | None, **_: Any) -> None:
        if value is not None and value not in self.allowed_models:
            raise ValidationError("Model is not allowed on this service.")

    @validates("max_tokens")
    def _max_tokens_in_range(self, value: int, **_: Any) -> None:
        if not 1 <= value <= self.max_output_tokens:
            raise ValidationError(f"Must be between 1 and {self.max_output_tokens}.")

    @validates_schema(skip_on_field_errors=False)
    def _within_max_chars(self, data: dict[str, Any], **_: Any) -> None:
        prompt, system = data.get("prompt"), data.get("system")
        length = len(prompt or "") + len(system or "")
        if length > self.max_chars:
            raise ValidationError(
                f"Prompt and system together have {length} characters; the limit is {self.max_chars}.",
                field_name="prompt",
            )


# --- responses: dumped by nobody, they document the answers in /openapi.json ---


class TokensSchema(Schema):
    input = fields.Integer(required=True)
    output = fields.Integer(required=True)
    total = fields.Integer(required=True)
    cached_input = fields.Integer()


class MetadataSchema(Schema):
    model = fields.String(required=True)
    provider = fields.String(required=True)
    finish_reason = fields.String(required=True, allow_none=True)
    attempts = fields.Integer(required=True)
    tokens = fields.Nested(TokensSchema, required=True, allow_none=True)
    cost_usd = fields.Float(required=True, allow_none=True)
    latency_ms = fields.Float(required=True)
    cached = fields.Boolean(required=True, metadata={"description": "whether the answer came from the cache"})
    fallback_from = fields.String(
        metadata={"description": "with MODELS_FILE: the model asked for, when a fallback (`model`) answered"}
    )
    cost_saved_usd = fields.Float(
        allow_none=True, metadata={"description": "on a cache hit: what the original answer cost"}
    )


class GenerateResponseSchema(Schema):
    request_id = fields.String(required=True)
    output = fields.String(required=True)
    metadata = fields.Nested(MetadataSchema, required=True)


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"description": "snake_case code, stable across releases"})
    message = fields.String(required=True)
    request_id = fields.String(required=True, allow_none=True)
    details = fields.Dict(metadata={"description": "per-field messages of a validation error"})


class ErrorEnvelopeSchema(Schema):
    error = fields.Nested(ErrorBodySchema, required=True)


class RequestWindowSchema(Schema):
    limit = fields.String(required=True)
    used = fields.Integer(required=True)
    remaining = fields.Integer(required=True)
    reset_at = fields.Integer(required=True, metadata={"description": "Unix time, seconds"})


class TokenWindowSchema(Schema):
    limit_per_minute = fields.Integer(required=True, allow_none=True)
    used = fields.Integer(required=True)
    remaining = fields.Integer(required=True, allow_none=True)
    reset_in_s = fields.Float(required=True)


class UsageSchema(Schema):
    client = fields.String(required=True)
    requests = fields.List(fields.Nested(RequestWindowSchema), required=True)
    tokens = fields.Nested(TokenWindowSchema, required=True)
    spend_usd_today = fields.Float(required=True)
    daily_budget_usd = fields.Float(required=True, allow_none=True)
    budget_left_usd = fields.Float(required=True, allow_none=True)


class HealthSchema(Schema):
    class Meta:
        unknown = INCLUDE  # liveness may say more than its status

    status = fields.String(required=True)
    service = fields.String()
    timestamp = fields.Integer(metadata={"description": "Unix time, seconds"})
    provider = fields.String()
    default_model = fields.String()
    models = fields.List(fields.String(), metadata={"description": "with MODELS_FILE: the public models"})


class ReadySchema(Schema):
    status = fields.String(required=True)
    provider = fields.String(required=True)
    degraded = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={"description": "What still serves in a lesser way, e.g. redis when limits fail open"},
    )
    circuits = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={"description": "with MODELS_FILE: each upstream's circuit, closed, open or half_open"},
    )

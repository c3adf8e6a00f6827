"""Marshmallow schemas for what /generate accepts."""

from __future__ import annotations

import numbers
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates, validates_schema


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


def _require_utf8(value: str) -> None:
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
        _require_utf8(value)

    @validates("system")
    def _system_is_text(self, value: str | None, **_: Any) -> None:
        if value is not None:
            _require_utf8(value)

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
            field = "prompt" if system is None else "_schema"
            raise ValidationError(
                f"Prompt and system together have {length} characters; the limit is {self.max_chars}.",
                field_name=field,
            )

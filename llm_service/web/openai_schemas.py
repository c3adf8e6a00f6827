"""Marshmallow schemas of the OpenAI-compatible API: chat-completion requests, answers, chunks, models."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates, validates_schema

from .schemas import StrictBoolean, StrictFloat, StrictInteger, require_utf8

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 1000  # as /generate: a token limit reserves this much when a request names none

_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}


class MessageContent(fields.Field[str]):
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined by newlines)."""

    def __init__(self, **kwargs: Any) -> None:
        metadata = {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            require_utf8(value)
            return value
        if not isinstance(value, list):
            raise ValidationError("Must be a string or a list of text parts.")
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValidationError({index: {"type": ["Only text parts are supported."]}})
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise ValidationError({index: {"text": ["A text part has a string `text` and nothing else."]}})
            texts.append(part["text"])
        joined = "\n".join(texts)
        require_utf8(joined)
        return joined


class StopSequences(fields.Field[tuple[str, ...]]):
    """`stop`: a string or a list of at most four strings."""

    def __init__(self, **kwargs: Any) -> None:
        many = {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_SEQUENCES}
        super().__init__(metadata={"oneOf": [{"type": "string"}, many, {"type": "null"}]}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValidationError("Must be a string or a list of strings.")
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValidationError(f"At most {MAX_STOP_SEQUENCES} stop sequences.")
        for item in items:
            require_utf8(item)
        return tuple(items)


class MessageSchema(Schema):
    class Meta:
        unknown = RAISE

    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    content = MessageContent(required=True)


class StreamOptionsSchema(Schema):
    class Meta:
        unknown = RAISE

    include_usage = StrictBoolean(load_default=False)


class ResponseFormatSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(("text", "json_object", "json_schema")))
    json_schema = fields.Dict(metadata={"description": "for type json_schema: {name, schema, strict?}"})

    @validates_schema
    def _schema_given(self, data: dict[str, Any], **_: Any) -> None:
        if data["type"] == "json_schema" and "json_schema" not in data:
            raise ValidationError("Required with type json_schema.", field_name="json_schema")


class ChatCompletionRequestSchema(Schema):
    """Validate a chat-completion request against the limits this service was started with."""

    class Meta:
        unknown = RAISE

    model = fields.String(required=True)
    messages = fields.List(fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1))
    temperature = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(min=0, max=1))
    max_tokens = StrictInteger(load_default=None, allow_none=True)
    max_completion_tokens = StrictInteger(load_default=None, allow_none=True)
    stop = StopSequences(load_default=(), allow_none=True)
    # OpenAI takes a signed 64-bit seed; a larger one would only come back as the upstream's 400.
    seed = StrictInteger(load_default=None, allow_none=True, validate=validate.Range(min=-(2**63), max=2**63 - 1))
    user = fields.String(load_default=None, allow_none=True)
    n = StrictInteger(load_default=None, allow_none=True, validate=validate.Equal(1, error="Only n=1 is supported."))
    stream = StrictBoolean(load_default=False, allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, load_default=None, allow_none=True)
    response_format = fields.Nested(ResponseFormatSchema, load_default=None, allow_none=True)

    def __init__(self, *, max_chars: int, max_output_tokens: int) -> None:
        super().__init__()
        self.max_chars = max_chars
        self.max_output_tokens = max_output_tokens

    @validates("max_tokens", "max_completion_tokens")
    def _max_tokens_in_range(self, value: int | None, **_: Any) -> None:
        if value is not None and not 1 <= value <= self.max_output_tokens:
            raise ValidationError(f"Must be between 1 and {self.max_output_tokens}.")

    @validates_schema(skip_on_field_errors=True)
    def _within_limits(self, data: dict[str, Any], **_: Any) -> None:
        length = sum(len(message["content"]) for message in data["messages"])
        if length > self.max_chars:
            raise ValidationError(
                f"The messages together have {length} characters; the limit is {self.max_chars}.",
                field_name="messages",
            )
        if data["stream_options"] is not None and not data["stream"]:
            raise ValidationError("Only allowed when stream is true.", field_name="stream_options")
        both = data["max_tokens"], data["max_completion_tokens"]
        if None not in both and both[0] != both[1]:
            raise ValidationError("Give max_completion_tokens or max_tokens, not two values.", field_name="max_tokens")


# --- responses: they document the answers in /openapi.json ---


class PromptTokensDetailsSchema(Schema):
    cached_tokens = fields.Integer(required=True)


class CompletionUsageSchema(Schema):
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)
    prompt_tokens_details = fields.Nested(PromptTokensDetailsSchema, required=True)


class AssistantMessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(("assistant",)))
    content = fields.String(required=True)


class ChoiceSchema(Schema):
    index = fields.Integer(required=True)
    message = fields.Nested(AssistantMessageSchema, required=True)
    finish_reason = fields.String(required=True)
    logprobs = fields.Raw(required=True, allow_none=True, metadata={"type": "null"})


class ChatCompletionSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True, validate=validate.OneOf(("chat.completion",)))
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    choices = fields.List(fields.Nested(ChoiceSchema), required=True)
    usage = fields.Nested(CompletionUsageSchema, allow_none=True)


class ModelSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True, validate=validate.OneOf(("model",)))
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)


class ModelListSchema(Schema):
    object = fields.String(required=True, validate=validate.OneOf(("list",)))
    data = fields.List(fields.Nested(ModelSchema), required=True)


class OpenAIErrorBodySchema(Schema):
    message = fields.String(required=True)
    type = fields.String(required=True)
    param = fields.String(required=True, allow_none=True)
    code = fields.String(required=True, allow_none=True)


class OpenAIErrorEnvelopeSchema(Schema):
    error = fields.Nested(OpenAIErrorBodySchema, required=True)

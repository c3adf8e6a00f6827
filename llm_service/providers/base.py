"""What every backend takes and returns, so nothing above it knows which one ran."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol


@dataclass(frozen=True)
class Message:
    """One chat message: role is system, user or assistant."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """One validated generation request, whichever API it came through.

    None means "not given": the backend's own default applies (temperature, top_p) or nothing is sent.
    """

    messages: tuple[Message, ...]
    model: str
    temperature: float | None = 0.7
    max_tokens: int = 1000
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # OpenAI's response_format object, e.g. {"type": "json_object"}, passed to the backend as given.
    response_format: dict[str, Any] | None = None

    @classmethod
    def from_prompt(cls, prompt: str, model: str, system: str | None = None, **options: Any) -> GenerationParams:
        """Return params for one prompt, after an optional system message."""
        messages = [Message("system", system)] if system else []
        messages.append(Message("user", prompt))
        return cls(messages=tuple(messages), model=model, **options)

    @property
    def input_chars(self) -> int:
        """Return the characters of every message together."""
        return sum(len(message.content) for message in self.messages)

    def chat_messages(self) -> list[dict[str, str]]:
        """Return the messages as the chat-completions wire format wants them."""
        return [{"role": message.role, "content": message.content} for message in self.messages]


@dataclass(frozen=True)
class TokenUsage:
    """Token counts as the backend reported them."""

    input: int = 0
    output: int = 0
    cached_input: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output


@dataclass(frozen=True)
class Completion:
    """A finished generation."""

    text: str
    model: str
    finish_reason: str | None
    usage: TokenUsage | None
    attempts: int = 1
    upstream_request_id: str | None = None
    upstream: str | None = None  # with MODELS_FILE: the upstream that answered
    fallback_from: str | None = None  # the model asked for, when a fallback model answered instead


@dataclass(frozen=True)
class TextDelta:
    """A piece of streamed text.

    A routed stream's first delta also says when a fallback answers: the public model answering, and the
    one asked for (both None otherwise), so the API can say so before the first text goes out.
    """

    text: str
    model: str | None = None
    fallback_from: str | None = None


class Provider(Protocol):
    """A backend that turns GenerationParams into a Completion before a monotonic deadline."""

    name: str
    # The cost of a model the price table does not list: None (unknown) for an API, 0 for local hardware.
    unpriced_cost_usd: Decimal | None

    def complete(self, params: GenerationParams, deadline_monotonic: float) -> Completion:
        """Generate the whole answer."""
        ...

    def stream(self, params: GenerationParams, deadline_monotonic: float) -> Iterator[TextDelta | Completion]:
        """Yield text deltas as they come, then the Completion."""
        ...

    def is_ready(self) -> bool:
        """Return whether the backend can serve now."""
        ...

    def warm_up(self) -> None:
        """Do the one-time work (client, model load) before the first request."""
        ...

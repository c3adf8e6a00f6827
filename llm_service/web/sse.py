"""Server-Sent Events: a generation stream answered once its first text is in hand, and finished once.

Until the first text (validation, quotas, retries, waiting for the model) a failure is an ordinary JSON
error; after it, a failure ends the stream with the API's error event, and so does a worker shutting down
(SIGTERM) whose grace period is about to end. The request record is finished
in one place, the body's `finally`, however the stream ends: done, failed, the client gone, or the
response closed before it was ever read (the body is primed, so closing it runs that `finally` too).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from flask import Response

from ..errors import ServiceError, ShuttingDown
from ..generation import Generation, GenerationStream
from ..logs import request_id_var
from ..providers.base import TextDelta
from ..startup import Drain
from .context import services
from .record import RequestRecord

log = logging.getLogger("llm_service.api")

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamWire(Protocol):
    """How one API spells the events of a stream."""

    def opening(self) -> Iterable[str]:
        """Return the events sent before the first text."""
        ...

    def delta(self, text: str) -> str:
        """Return the event carrying one piece of text."""
        ...

    def done(self, generation: Generation) -> Iterable[str]:
        """Return the events that end a finished stream."""
        ...

    def error(self, error: ServiceError) -> str:
        """Return the event that ends a failed stream."""
        ...


def sse(data: Any, event: str | None = None) -> str:
    """Format one Server-Sent Event whose data is one JSON value (or a literal string such as [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def stream_response(record: RequestRecord, stream: GenerationStream, wire: StreamWire) -> Response:
    """Answer with the stream's events once its first item is in hand (a failure before is raised)."""
    first = next(stream)
    time_to_first_token_ms = record.elapsed_ms
    record.streaming = True
    drain = services().draining
    body = _events(record, stream, first, wire, time_to_first_token_ms, drain)
    next(body)  # enter the body's try: from here on, closing the body finishes the record
    return Response(body, status=200, mimetype="text/event-stream", headers=HEADERS)


def _events(
    record: RequestRecord,
    stream: GenerationStream,
    first: TextDelta | Generation,
    wire: StreamWire,
    time_to_first_token_ms: float,
    drain: Drain,
) -> Iterator[str]:
    status: int | str = "client_closed"
    token = None
    try:
        yield ""  # the priming step stream_response takes
        token = request_id_var.set(record.request_id)  # Flask ran its teardown when the view returned
        yield from wire.opening()
        item = first
        while isinstance(item, TextDelta):
            yield wire.delta(item.text)
            if drain.streams_must_end():  # the worker is about to exit: say so, never cut the stream silently
                raise ShuttingDown(retry_after_s=1)
            item = next(stream)
        status = 200
        yield from wire.done(item)
    except ServiceError as failure:
        record.error, status = failure, failure.status
        yield wire.error(failure)
    except GeneratorExit:
        status = "client_closed"
        raise
    except Exception:
        log.exception("stream failed")
        record.error, status = ServiceError(), 500
        yield wire.error(ServiceError())
    finally:
        stream.close()  # stops the upstream read or the local model now, and settles the quota
        record.finish(status, stream=True, time_to_first_token_ms=time_to_first_token_ms, **stream.log_fields())
        if token is not None:
            request_id_var.reset(token)

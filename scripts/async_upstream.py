"""An OpenAI-protocol upstream on asyncio (aiohttp) for the capacity benchmark: thousands of calls at once.

Every chat completion answers after `--delay-s`; a streamed one sends `--chunks` deltas spread over the
same delay, then the usage chunk and `[DONE]`. One process, one event loop: it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import socket
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import load  # noqa: E402


def completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }


def chunk(model: str, delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@functools.cache
def encoded(model: str, chunks: int) -> tuple[bytes, bytes, bytes]:
    """Return a model's answer, one text event and the stream's last events, encoded once: the upstream's CPU is
    the load's, on the same cores as the service, so it does as little per call as a real server's cache would."""
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
    tail = chunk(model, {}, "stop") + chunk(model, {}, None, usage) + b"data: [DONE]\n\n"
    return json.dumps(completion(model)).encode(), chunk(model, {"content": "word "}, None), tail


def make_app(delay_s: float, chunks: int) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        answer, text_event, tail = encoded(str(body.get("model", "gpt-4o-mini")), chunks)
        if not body.get("stream"):
            await asyncio.sleep(delay_s)
            return web.Response(body=answer, content_type="application/json", headers={"x-request-id": "req_bench"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "req_bench"})
        await response.prepare(request)
        for _ in range(chunks):
            await asyncio.sleep(delay_s / chunks)
            await response.write(text_event)
        await response.write(tail)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve(port: int, delay_s: float, chunks: int) -> None:
    runner = web.AppRunner(make_app(delay_s, chunks), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    print(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-s", type=float, default=2.0)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    load.run(serve(args.port, args.delay_s, args.chunks))


if __name__ == "__main__":
    main()

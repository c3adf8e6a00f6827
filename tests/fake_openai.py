"""A local HTTP server that speaks OpenAI's chat-completions protocol and injects faults on cue."""

from __future__ import annotations

import json
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the fake answers to one request."""

    kind: str = "ok"  # ok | status | reset | bad_json | drip | stream | auto
    text: str = "Hello from the fake upstream."
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    prompt_tokens: int = 12
    completion_tokens: int = 7
    cached_tokens: int = 0
    model: str | None = None
    drip_interval_s: float = 0.05
    chunks: list[str] = field(default_factory=list)
    chunk_interval_s: float = 0.0
    fail_after_chunks: int | None = None
    finish_reason: str = "stop"


def ok(text: str = "Hello from the fake upstream.", **kwargs: Any) -> Reply:
    return Reply("ok", text=text, **kwargs)


def status(code: int, error_code: str | None = None, headers: dict[str, str] | None = None, **kw: Any) -> Reply:
    body = {"error": {"message": f"fake error {code}", "type": "fake", "code": error_code, "param": None}}
    return Reply("status", status=code, body=body, headers=headers or {}, **kw)


def reset() -> Reply:
    return Reply("reset")


def bad_json() -> Reply:
    return Reply("bad_json")


def drip(interval_s: float) -> Reply:
    """Send headers, then the body a byte at a time, forever slower than any deadline."""
    return Reply("drip", drip_interval_s=interval_s)


def auto(text: str = "Hello from the fake upstream.") -> Reply:
    """Answer as a real upstream would: a stream when the request asks for one, else one JSON body."""
    return Reply("auto", text=text)


def stream(chunks: list[str], interval_s: float = 0.0, fail_after: int | None = None, **kwargs: Any) -> Reply:
    return Reply("stream", chunks=chunks, chunk_interval_s=interval_s, fail_after_chunks=fail_after, **kwargs)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-reply is part of the tests, not an error


@dataclass
class Seen:
    """One request the fake received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    disconnected: threading.Event = field(default_factory=threading.Event)
    client_port: int = 0  # the caller's side of the connection: the same port means a reused connection


class FakeOpenAI:
    """Answer from a script of Replies, then with `default`; record every request."""

    def __init__(self, port: int = 0) -> None:
        self.script: deque[Reply] = deque()
        self.default = ok()
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", port), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            return self.script.popleft() if self.script else self.default

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                seen = Seen(self.path, headers, body, client_port=self.client_address[1])
                reply = fake._next(seen)
                if reply.delay_s and not self._wait(reply.delay_s):
                    seen.disconnected.set()  # the caller left while the answer was being made: stop, as vLLM does
                    self.close_connection = True
                    return
                getattr(self, f"_reply_{reply.kind}")(reply, seen)

            def _wait(self, delay_s: float) -> bool:
                """Wait `delay_s` before answering; False at once if the caller closes the connection meanwhile."""
                end = time.monotonic() + delay_s
                if select.select([self.connection], [], [], delay_s)[0]:
                    try:
                        if not self.connection.recv(1, socket.MSG_PEEK):
                            return False
                    except OSError:
                        return False
                    time.sleep(max(end - time.monotonic(), 0.0))  # data, not an end: wait out the delay
                return True

            def _send_json(self, code: int, payload: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("x-request-id", f"req_fake_{fake.calls}")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def _reply_ok(self, reply: Reply, seen: Seen) -> None:
                self._send_json(200, json.dumps(completion(reply, seen.body)).encode(), reply.headers)

            def _reply_auto(self, reply: Reply, seen: Seen) -> None:
                if seen.body.get("stream"):
                    words = re.findall(r"\S+\s*", reply.text)  # the text again, a word a chunk
                    self._reply_stream(Reply("stream", chunks=words), seen)
                else:
                    self._reply_ok(reply, seen)

            def _reply_status(self, reply: Reply, seen: Seen) -> None:
                self._send_json(reply.status, json.dumps(reply.body).encode(), reply.headers)

            def _reply_bad_json(self, reply: Reply, seen: Seen) -> None:
                self._send_json(200, b'{"id": "chatcmpl-1", "choices": [', reply.headers)

            def _reply_reset(self, reply: Reply, seen: Seen) -> None:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _reply_drip(self, reply: Reply, seen: Seen) -> None:
                payload = json.dumps(completion(reply, seen.body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    for byte in payload:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(reply.drip_interval_s)
                except OSError:
                    seen.disconnected.set()
                self.close_connection = True

            def _reply_stream(self, reply: Reply, seen: Seen) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("x-request-id", f"req_fake_{fake.calls}")
                self.end_headers()
                model = reply.model or seen.body.get("model", "gpt-4o-mini")
                try:
                    for index, piece in enumerate(reply.chunks):
                        if reply.fail_after_chunks is not None and index == reply.fail_after_chunks:
                            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            self.connection.close()
                            self.close_connection = True
                            return
                        self._chunk(stream_chunk(model, {"content": piece}, None))
                        time.sleep(reply.chunk_interval_s)
                    self._chunk(stream_chunk(model, {}, "stop"))
                    if (seen.body.get("stream_options") or {}).get("include_usage"):
                        usage = usage_of(reply)
                        self._chunk(
                            {
                                "id": "chatcmpl-fake",
                                "object": "chat.completion.chunk",
                                "created": 0,
                                "model": model,
                                "choices": [],
                                "usage": usage,
                            }
                        )
                    self._write_chunk(b"data: [DONE]\n\n")
                    self._write_chunk(b"")
                except OSError:
                    seen.disconnected.set()
                    self.close_connection = True

            def _chunk(self, payload: dict[str, Any]) -> None:
                self._write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

            def _write_chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler


def usage_of(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }


def completion(reply: Reply, request_body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": reply.model or request_body.get("model", "gpt-4o-mini"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": reply.finish_reason}
        ],
        "usage": usage_of(reply),
    }


def stream_chunk(model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def main() -> None:
    """Serve the fake on a port, every answer after `--delay-s`: for benchmarks and trying the service by hand."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeOpenAI(port=args.port)
    fake.default = Reply("auto", delay_s=args.delay_s)  # streams when asked, as a real upstream does
    print(fake.url, flush=True)
    fake._server.serve_forever(0.05)


if __name__ == "__main__":
    main()

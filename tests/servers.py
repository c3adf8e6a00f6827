"""Start the Procfile's own command on a free port and talk to it over a socket."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def procfile_command() -> list[str]:
    """Return the `web:` command of the Procfile, the one Heroku runs."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return shlex.split(line.removeprefix("web:"))
    raise AssertionError("Procfile has no web: line")


class Service:
    """The service under gunicorn, as deployed: started from the Procfile, logs captured."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        ready_timeout_s: float = 60.0,
        command: list[str] | None = None,
        ready_path: str = "/health",
    ) -> None:
        self.port = free_port()
        self.command = command or procfile_command()
        self.ready_path = ready_path
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "LOCAL_"))},
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Service:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.request("GET", self.ready_path)[0] < 500:
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"service not ready:\n{self.log_path.read_text()[-3000:]}")

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log.closed:
            self._log.close()
        return self.process.returncode

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout_s: float = 30.0
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            payload = json.dumps(body) if body is not None else None
            all_headers = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=payload, headers=all_headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def generate(self, body: dict[str, Any], **kwargs: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        status, headers, raw = self.request("POST", "/generate", body, **kwargs)
        return status, json.loads(raw), headers

    def log_lines(self) -> list[str]:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text().splitlines()

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines() if line.strip()]


def generate_in_background(service: Service, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `POST /generate` on a thread; its (status, body, headers) lands in the dict under "answer"."""
    result: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: result.update(answer=service.generate(body)))
    caller.start()
    return caller, result


def start_up_failure(env: dict[str, str], tmp_path: Path) -> str:
    """Run the Procfile's command with `env`, expect it to stop, and return its one CRITICAL message."""
    result = subprocess.run(
        procfile_command(),
        cwd=ROOT,
        env={**Service({}, tmp_path / "unused.log").env, "PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    (message,) = [line["message"] for line in lines if line.get("level") == "CRITICAL"]
    return str(message)

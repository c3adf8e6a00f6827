"""The Dockerfile, built and run for real with podman, against the fault-injecting upstream.

podman and a stand-in for python:3.11-slim come from shared/containers/setup (no image registry is reachable here);
the Dockerfile itself is the one a Docker user builds, unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fake_openai as fake
from tests.fake_openai import FakeOpenAI
from tests.servers import ROOT, Service, free_port

pytestmark = pytest.mark.container

RUNTIME_KEY = "sk-container-runtime-key-0123456789abcdef"
PLANTED_SECRET = "sk-planted-in-dotenv-must-never-enter-a-layer-42"
UNPRIVILEGED_UID = 10001


def podman_command() -> list[str]:
    """Return the podman wrapper that shared/containers/setup installs and prints, or skip without one."""
    candidates = [os.environ.get("CONTAINERS_SETUP", ""), str(ROOT.parent / "shared" / "containers" / "setup")]
    setup = next((path for path in candidates if path and Path(path).is_file()), None)
    if setup is None:
        pytest.skip("no shared/containers/setup beside the repository (set CONTAINERS_SETUP to its path)")
    result = subprocess.run(["bash", setup], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"containers setup failed:\n{result.stderr[-3000:]}"
    return [result.stdout.strip().splitlines()[-1]]


@pytest.fixture(scope="module")
def podman() -> list[str]:
    return podman_command()


def run(podman: list[str], *args: str, timeout_s: float = 120, check: bool = True) -> str:
    result = subprocess.run([*podman, *args], capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def image(podman: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Build the image from a copy of the checkout with a .env holding a secret, as a developer's might."""
    context = tmp_path_factory.mktemp("context") / "repo"
    shutil.copytree(
        ROOT,
        context,
        ignore=shutil.ignore_patterns(  # tool caches by name: a "*cache*" pattern also dropped llm_service/cache.py
            ".git", ".venv", "node_modules", ".*_cache", "__pycache__", ".env", "*.log"
        ),
    )
    (context / ".env").write_text(f"OPENAI_API_KEY={PLANTED_SECRET}\n")
    tag = f"localhost/llm-service:test-{uuid.uuid4().hex[:8]}"
    run(
        podman,
        *("build", "--format", "docker", "--network", "host", "-v", "/etc/ssl/certs:/etc/ssl/certs:ro"),
        *("-t", tag, str(context)),
        timeout_s=900,
    )
    yield tag
    run(podman, "rmi", tag, check=False)


class Container:
    """One container of the image on the host network, its key passed at run time."""

    def __init__(self, podman: list[str], image: str, upstream: FakeOpenAI) -> None:
        self.podman = podman
        self.port = free_port()
        self.name = f"llm-service-test-{uuid.uuid4().hex[:8]}"
        # The key comes from this process's environment at run time (`-e NAME` copies it), never from the image.
        subprocess.run(
            [*podman, "run", "-d", "--name", self.name, "--network", "host", "-e", "OPENAI_API_KEY"]
            # As deploy/k8s runs it: read-only root, /tmp and the metrics directory on tmpfs, no capabilities.
            + ["--read-only", "--tmpfs", "/tmp", "--tmpfs", "/var/run/llm-service", "--cap-drop", "ALL"]
            + ["--security-opt", "no-new-privileges", "-e", "PROMETHEUS_MULTIPROC_DIR=/var/run/llm-service/metrics"]
            + ["-e", f"PORT={self.port}", "-e", f"OPENAI_BASE_URL={upstream.url}", "-e", "WEB_CONCURRENCY=2"]
            + ["-e", "THREADS=8", "-e", "DEADLINE=10", "-e", "RETRY_DELAY=0.01", image],
            env={**os.environ, "OPENAI_API_KEY": RUNTIME_KEY},
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.client = Service({}, Path(os.devnull))  # only its HTTP helpers: the server is the container
        self.client.port = self.port
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.request("GET", "/health", timeout_s=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = self.logs()
                self.remove()
                raise AssertionError(f"container not healthy:\n{logs[-3000:]}")
            time.sleep(0.2)

    def logs(self) -> str:
        result = subprocess.run([*self.podman, "logs", self.name], capture_output=True, text=True, timeout=30)
        return result.stdout + result.stderr

    def remove(self) -> None:
        run(self.podman, "rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture
def container(podman: list[str], image: str, upstream: FakeOpenAI) -> Iterator[Container]:
    running = Container(podman, image, upstream)
    yield running
    running.remove()


def test_health_and_generate_answer_through_the_container(container: Container, upstream: FakeOpenAI) -> None:
    status, _, raw = container.client.request("GET", "/health")
    body = json.loads(raw)
    assert (status, body["status"], body["service"], body["provider"]) == (200, "healthy", "llm-service", "openai")

    upstream.enqueue(fake.ok("from the container"))
    status, body, _ = container.client.generate({"prompt": "Hi"})
    assert (status, body["output"]) == (200, "from the container")
    assert upstream.calls == 1
    assert upstream.requests[0].headers["authorization"] == f"Bearer {RUNTIME_KEY}"  # the run-time secret
    metrics = container.client.request("GET", "/metrics")[2].decode()
    assert (
        'llm_requests_total{client="anonymous",endpoint="/generate",model="gpt-4o-mini",status_code="200"} 1.0'
        in metrics
    )
    # The image's own HEALTHCHECK (python, no curl) passes.
    assert subprocess.run([*container.podman, "healthcheck", "run", container.name], timeout=30).returncode == 0


def test_every_process_runs_as_an_unprivileged_user(container: Container) -> None:
    script = (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    uid = [line.split()[1] for line in open(f'/proc/{pid}/status') if line.startswith('Uid:')][0]\n"
        "    print(uid, open(f'/proc/{pid}/cmdline').read().replace(chr(0), ' ').replace(chr(10), ' '))\n"
    )
    processes = [
        line.split(" ", 1)
        for line in run(container.podman, "exec", container.name, "python", "-c", script).splitlines()
    ]
    assert {int(uid) for uid, _ in processes} == {UNPRIVILEGED_UID}
    assert len([cmd for _, cmd in processes if "gunicorn" in cmd]) == 3  # the master and WEB_CONCURRENCY=2 workers


def test_podman_stop_lets_the_request_in_flight_finish(container: Container, upstream: FakeOpenAI) -> None:
    upstream.enqueue(fake.ok("finished after SIGTERM", delay_s=3.0))
    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(answer=container.client.generate({"prompt": "Hi"})))
    caller.start()
    deadline = time.monotonic() + 10
    while upstream.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.calls == 1, "the request never reached the upstream"
    started = time.monotonic()
    run(container.podman, "stop", "-t", "30", container.name, timeout_s=60)  # SIGTERM, then SIGKILL after 30 s
    caller.join(15)
    status, body, _ = result["answer"]
    assert (status, body["output"]) == (200, "finished after SIGTERM")
    assert time.monotonic() - started < 25, "gunicorn did not exit by itself: podman had to kill it"
    exit_code = run(container.podman, "inspect", container.name, "--format", "{{.State.ExitCode}}").strip()
    assert exit_code == "0"


def test_no_key_in_image_metadata_history_or_layers(container: Container, image: str, tmp_path: Path) -> None:
    image_inspect = run(container.podman, "image", "inspect", image)
    history = run(container.podman, "history", "--no-trunc", "--format", "json", image)
    # (`podman inspect` of the *container* does show its run-time environment, as Docker's does.)
    for text in (image_inspect, history):
        assert RUNTIME_KEY not in text
        assert PLANTED_SECRET not in text
    archive = tmp_path / "image.tar"
    run(container.podman, "save", "--format", "docker-archive", "-o", str(archive), image, timeout_s=300)
    layer_names: list[str] = []
    with tarfile.open(archive) as outer:
        for member in outer.getmembers():
            if not member.name.endswith(".tar"):
                continue
            layer = outer.extractfile(member)
            assert layer is not None
            with tarfile.open(fileobj=layer) as inner:
                for entry in inner.getmembers():
                    layer_names.append(entry.name)
                    data = inner.extractfile(entry) if entry.isfile() else None
                    assert data is None or PLANTED_SECRET.encode() not in data.read(), entry.name
    assert any(name.startswith("app/llm_service/") for name in layer_names)  # the app's layers were read
    assert not [name for name in layer_names if Path(name).name == ".env"]


def test_image_has_no_compiler(podman: list[str], image: str) -> None:
    probe = "for c in gcc cc c++ g++ clang make cmake ld; do command -v $c; done; ls -d /usr/lib/gcc 2>/dev/null; true"
    assert run(podman, "run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c", probe).strip() == ""

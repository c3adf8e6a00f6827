"""The README's commands as a new user runs them: `make run | tee service.log`, then `make report`.

A first `make run` creates the virtualenv and installs for minutes. To see where that output goes
without installing anything, make runs here with PYTHON pointing at a stand-in whose virtualenv's pip
talks as pip does (progress on stdout, silent with --quiet) and whose gunicorn writes one JSON line.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import ROOT, Service

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

FAKE_PIP = "Collecting flask==3.1.3\nBuilding wheel for llama-cpp-python (pyproject.toml): still running..."
GUNICORN_LINE = {"level": "INFO", "logger": "gunicorn.error", "message": "Listening at: http://127.0.0.1:8000"}

# `python -m venv DIR` makes DIR/bin/python (pip talks, anything else runs the real Python) and DIR/bin/gunicorn.
FAKE_PYTHON = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  cat > "$3/bin/python" <<'EOF'
#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  case " $* " in *" --quiet "*|*" -q "*) exit 0;; esac
  printf '%s\\n' "{FAKE_PIP}"
  exit 0
fi
exec "{sys.executable}" "$@"
EOF
  printf '#!/bin/sh\\necho %s\\n' '{json.dumps(json.dumps(GUNICORN_LINE))}' > "$3/bin/gunicorn"
  chmod +x "$3/bin/python" "$3/bin/gunicorn"
  echo "venv made"
  exit 0
fi
exec "{sys.executable}" "$@"
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "python3"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_first_make_run_writes_only_json_to_stdout(fake_python: Path, tmp_path: Path) -> None:
    result = make("run", f"VENV={tmp_path / 'venv'}", f"PYTHON={fake_python}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [json.loads(line) for line in lines] == [GUNICORN_LINE]  # `make run | tee service.log` is JSON lines
    assert FAKE_PIP in result.stderr  # the long install shows its progress, on stderr
    assert "llama.cpp" in result.stderr  # and says why it takes minutes


def test_make_report_reads_the_saved_log(fake_python: Path, tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    summary = {"logger": "llm_service.request", "method": "POST", "path": "/generate", "status": 200}
    log.write_text(json.dumps({**summary, "latency_ms": 120.0, "model": "gpt-4o-mini", "cost_usd": 0.5}) + "\n")
    venv = f"VENV={tmp_path / 'venv'}"
    result = make("report", venv, f"PYTHON={fake_python}", f"LOG={log}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["requests", "1"]
    as_json = make("report", venv, f"PYTHON={fake_python}", f"LOG={log}", "ARGS=--json")
    assert json.loads(as_json.stdout)["requests"] == 1


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux's setpriv is not installed")
def test_killing_make_run_stops_the_service(tmp_path: Path) -> None:
    # `make run & ... kill $!` in a script: the signal reaches make, never gunicorn, unless it is passed on.
    service = Service({"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, tmp_path / "run.log")
    service.command = ["make", "--no-print-directory", "run"]
    with service:
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)  # to make alone, not its process group
        service.process.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                service.request("GET", "/health", timeout_s=1)
            except OSError:
                break  # refused: gunicorn is gone
            time.sleep(0.2)
        else:
            raise AssertionError("the service outlived `make run`")

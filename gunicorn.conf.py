"""gunicorn settings for llm-service; every number below is chosen on purpose, and says why."""

from __future__ import annotations

import gc
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
from typing import Any

from dotenv import load_dotenv

load_dotenv()  # the same .env the app reads; the real environment wins

# Metrics from every worker: prometheus_client's multiprocess mode keeps each worker's values in files
# under PROMETHEUS_MULTIPROC_DIR, and picks that mode when it is first imported. So the directory is set
# here, before any import below can load it (the local provider's start-up checks do), and each start
# gets a fresh one: values of an earlier deploy must not leak into this one's totals.
_metrics_dir_owned = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _metrics_dir_owned:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llm-service-metrics-")
else:
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from llm_service.config import ConfigError  # noqa: E402
from llm_service.logs import configure_logging, logging_config  # noqa: E402
from llm_service.providers import installation_problem  # noqa: E402
from llm_service.startup import load_env  # noqa: E402

# Settings only gunicorn reads; their problems join the app's in the one start-up message.
_problems: list[str] = []


def _int_env(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        _problems.append(f"{name} must be a whole number, got {raw!r}")
        return default
    if value < minimum:
        _problems.append(f"{name} must be at least {minimum}, got {value}")
        return default
    return value


def _fail(message: str) -> None:
    configure_logging("INFO")  # the same JSON line, ts included, as every other log line
    logging.getLogger("llm_service.config").critical(message)
    sys.exit(1)


_port = _int_env("PORT", 8000)
_threads = _int_env("THREADS", 64)
_worker_connections = _int_env("WORKER_CONNECTIONS", 0, minimum=0)  # 0: sized from the worker model below
_worker_kind = os.environ.get("WORKER_CLASS", "").strip() or "gevent"
if _worker_kind not in ("gevent", "gthread"):
    _problems.append(f"WORKER_CLASS must be gevent or gthread, got {_worker_kind!r}")

# Fail in the master, before any worker forks, with one message naming every bad setting.
try:
    _settings, _catalog = load_env(os.environ)  # the settings and the files they name (prices, models, clients)
except ConfigError as _error:
    _fail(str(ConfigError(_error.problems + _problems)))
if _problems:
    _fail(str(ConfigError(_problems)))
if _problem := installation_problem(_settings, _catalog.routes):
    _fail(_problem)

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_port}"
workers = _settings.web_concurrency  # WEB_CONCURRENCY, checked with the app's settings

# An LLM call spends seconds waiting on the network, so what limits an instance is how many calls it
# holds open at once. gevent (the default) holds thousands per worker: each request is a greenlet of a
# few KB on monkey-patched sockets, not an OS thread. `WORKER_CLASS=gthread` keeps threads instead
# (THREADS per worker; README, Capacity, compares the two).
if _worker_kind == "gevent":
    # gunicorn's gevent worker, plus a prompt stop of accepting on SIGTERM (llm_service/server.py).
    worker_class = "llm_service.server.GeventWorker"
    # Connections a worker takes at once: MAX_IN_FLIGHT requests plus room for idle keep-alive and slow
    # clients and for the requests it sheds (answered 503 at once rather than left in the backlog).
    worker_connections = _worker_connections or _settings.max_in_flight + 1000
else:
    worker_class = _worker_kind
    threads = _threads
    # One connection per thread plus a few idle keep-alive ones; past that a gthread worker stops
    # accepting, so a worker whose threads are all busy leaves new connections to one with free threads.
    worker_connections = _worker_connections or threads + max(8, threads // 4)

# Each request in flight holds two file descriptors (the client's and the upstream's): lift the soft
# limit to the hard one, which containers and dynos set far above the usual soft 1,024.
_soft_fds, _hard_fds = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard_fds == resource.RLIM_INFINITY or _soft_fds < _hard_fds:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard_fds, _hard_fds))

# The app (and its openai client or local model) is built in each worker after fork, never shared.
preload_app = False

# Workers report to the master from their main loop, not from requests, so a slow upstream call does
# not trip this; it only ends a worker whose main loop is stuck.
timeout = 60
# On SIGTERM a worker stops accepting and lets in-flight requests finish: the longest a request may
# run is DEADLINE, plus a margin to write the answer. Heroku kills a dyno 30 s after SIGTERM.
graceful_timeout = int(_settings.deadline_s) + 5
# Idle keep-alive connections close after 5 s: long enough for a proxy to reuse them, short enough that
# idle clients do not pile up. Under gevent the same 5 s bounds reading a request's line and headers, so
# a client that sends its headers a byte at a time (slowloris) is cut off; BODY_TIMEOUT bounds the body.
keepalive = 5

# Request-line and header limits: a /generate call needs far less than these; anything larger is
# refused by gunicorn (400) before the app runs. 4 KiB request line, 50 headers of at most 8 KiB.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

# Every line on stdout is JSON: gunicorn's error log as well as the app's. The app writes one summary
# line per request, so gunicorn's access log is off unless ACCESS_LOG=1 (then JSON too, and with the
# values of secret-looking query parameters redacted). gunicorn turns its access log on whenever a
# logging config is given; this logger class makes ACCESS_LOG the only switch.
logconfig_dict = logging_config(_settings.log_level)
errorlog = "-"
logger_class = "llm_service.server.AccessLogger"
accesslog = "-" if os.environ.get("ACCESS_LOG", "").strip().lower() in ("1", "true", "yes", "on") else None

# No control socket: its default path is per user, so two instances on one machine would collide,
# and nothing here uses gunicornc.
control_socket_disable = True


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's in-flight gauge, so the sum counts live workers only."""
    from llm_service.metrics import mark_worker_dead

    mark_worker_dead(worker.pid)


def post_worker_init(worker: Any) -> None:
    """Answer gunicorn's own errors in the envelope; on SIGTERM, turn /ready to 503 at once, then drain."""
    from llm_service.server import install_error_envelope

    install_error_envelope()  # a 400 or 431 gunicorn refuses before the app runs is JSON like every other error
    # What the worker has loaded (modules, the app, the openai client and its types: ~130,000 objects) lives as
    # long as it does. Frozen, the garbage collector no longer scans it: a full collection under load took
    # ~120 ms of the worker's only thread (a pause every request in flight shared); collections were ~8% of its CPU.
    gc.collect()
    gc.freeze()
    draining = getattr(worker.wsgi, "extensions", {}).get("llm_service.draining")
    if draining is None:  # another app run with this config (the benchmark's bare baseline)
        return
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        draining.begin(worker.cfg.graceful_timeout)  # streams still running near its end get an error event
        if callable(gunicorn_handler):
            gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def on_exit(server: Any) -> None:
    """Remove the metrics directory this start made."""
    if _metrics_dir_owned:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

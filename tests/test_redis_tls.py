"""REDIS_URL as Heroku Redis gives it: rediss:// with a self-signed certificate, against a real TLS redis-server."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from llm_service import create_app
from llm_service.clients import parse_api_keys
from llm_service.config import Settings
from tests.servers import free_port


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a redis-server that speaks only TLS, with a fresh self-signed certificate; yield its rediss:// URL."""
    binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
    assert binary and openssl, "redis-server and openssl are needed (scripts/ensure-redis installs redis-server)"
    workdir = tmp_path_factory.mktemp("tls-redis")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=heroku-redis-like"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
        + ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
        + ["--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url, ssl_cert_reqs="none", socket_connect_timeout=0.5).ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_the_test_server_speaks_only_tls(tls_redis: str) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(tls_redis.replace("rediss://", "redis://"), socket_connect_timeout=0.5).ping()


def test_self_signed_certificate_is_refused_by_default(tls_redis: str, make_settings: Callable[..., Settings]) -> None:
    # Limits failing closed: the instance cannot serve, so it is not ready.
    app = create_app(make_settings(redis_url=tls_redis, rate_limit_fail_open=False))
    response = app.test_client().get("/ready")
    assert response.status_code == 503
    assert "redis" in response.get_json()["error"]["details"]
    # Failing open (the default): it serves without limits and says Redis is what is degraded.
    app = create_app(make_settings(redis_url=tls_redis))
    response = app.test_client().get("/ready")
    assert (response.status_code, set(response.get_json().get("degraded", {}))) == (200, {"redis"})


@pytest.mark.parametrize("how", ["REDIS_TLS_VERIFY=false", "?ssl_cert_reqs=none in the URL"])
def test_heroku_style_rediss_url_serves_with_shared_limits(
    tls_redis: str, make_settings: Callable[..., Settings], how: str
) -> None:
    client_name, secret = f"c{uuid.uuid4().hex[:8]}", f"tls-{uuid.uuid4().hex}"  # fresh counters every run
    limits = dict(rate_limit="2/minute", api_keys=parse_api_keys(f"{client_name}={secret}"))
    if how.startswith("REDIS_TLS_VERIFY"):
        settings = make_settings(redis_url=tls_redis, redis_tls_verify=False, **limits)
    else:
        settings = make_settings(redis_url=tls_redis + "?ssl_cert_reqs=none", **limits)
    client = create_app(settings).test_client()
    ready = client.get("/ready")
    assert (ready.status_code, "degraded" in ready.get_json()) == (200, False)
    headers = {"Authorization": f"Bearer {secret}"}
    statuses = [client.post("/generate", json={"prompt": "Hi"}, headers=headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    # The counter is in the TLS Redis, where every instance would see it.
    keys = redis.Redis.from_url(tls_redis, ssl_cert_reqs="none").keys(f"*{client_name}*")
    assert keys


def test_tls_verify_off_leaves_a_plain_redis_url_working(make_settings: Callable[..., Settings]) -> None:
    # app.json sets REDIS_TLS_VERIFY=false for Heroku Redis; a redis:// URL must still work with it.
    app = create_app(make_settings(redis_url="redis://127.0.0.1:6379/0", redis_tls_verify=False))
    ready = app.test_client().get("/ready")
    assert (ready.status_code, "degraded" in ready.get_json()) == (200, False)


def test_tls_verify_is_read_from_the_environment() -> None:
    env = {"OPENAI_API_KEY": "sk-x", "REDIS_URL": "rediss://h:6380/0"}
    assert Settings.from_env(env).redis_tls_verify is True
    assert Settings.from_env({**env, "REDIS_TLS_VERIFY": "false"}).redis_tls_verify is False

"""Measure the image as deployed: its size, and the container's memory and CPU per request after load.

    .venv/bin/python scripts/container_stats.py IMAGE [--requests 1000] [--max-tokens 48] [--podman PATH]

Runs IMAGE (read-only root, /tmp on tmpfs, as the Kubernetes manifests do) against the fake upstream on the host
network, sends requests from 16 threads, then reads every process's RSS and PSS and CPU time from /proc inside
the container. The `local` image answers from its embedded model instead (LLM_PROVIDER=local is set in it):
give it few requests. The figures size deploy/k8s/deployment.yaml's resources and the README's Deploy section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_openai import FakeOpenAI  # noqa: E402
from tests.servers import Service, free_port  # noqa: E402

PROBE = """
import json, os
out = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    cmd = open(f'/proc/{pid}/cmdline').read().replace(chr(0), ' ')
    if 'gunicorn' not in cmd or pid == str(os.getpid()):
        continue
    kb = {}
    for line in open(f'/proc/{pid}/smaps_rollup'):
        name, _, value = line.partition(':')
        if value.strip().endswith('kB'):
            kb[name] = int(value.split()[0])
    stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    out.append({'pid': int(pid), 'rss_kb': kb['Rss'], 'pss_kb': kb['Pss'], 'cpu_ticks': int(stat[11]) + int(stat[12])})
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--podman", default="podman")
    args = parser.parse_args()
    podman = [args.podman]
    upstream = FakeOpenAI().start()
    port, name = free_port(), f"llm-service-stats-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [*podman, "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp"]
        + ["-e", "OPENAI_API_KEY", "-e", f"PORT={port}", "-e", f"OPENAI_BASE_URL={upstream.url}"]
        + ["-e", "RATE_LIMIT=1000000/minute", args.image],
        env={**os.environ, "OPENAI_API_KEY": "sk-measure-0000"},
        check=True,
        capture_output=True,
    )
    client = Service({}, Path(os.devnull))  # only its HTTP helpers
    client.port = port
    try:
        for _ in range(300):
            try:
                if client.request("GET", "/health", timeout_s=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        idle = probe(podman, name)
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            statuses = list(
                pool.map(
                    lambda _: client.generate({"prompt": "Name three primes.", "max_tokens": args.max_tokens})[0],
                    range(args.requests),
                )
            )
        elapsed_s = time.monotonic() - started
        loaded = probe(podman, name)
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        cpu_s = (sum(p["cpu_ticks"] for p in loaded) - sum(p["cpu_ticks"] for p in idle)) / ticks_per_s
        size = subprocess.run(
            [*podman, "image", "inspect", args.image, "--format", "{{.Size}}"], capture_output=True, text=True
        ).stdout
        report = {
            "image_size_mb": round(int(size) / 1e6, 1),
            "requests": len(statuses),
            "ok": statuses.count(200),
            "requests_per_s": round(len(statuses) / elapsed_s, 1),
            "cpu_ms_per_request": round(cpu_s * 1000 / len(statuses), 2),
            "processes_after_load": [{k: v for k, v in p.items() if k != "cpu_ticks"} for p in loaded],
            "total_rss_mb": round(sum(p["rss_kb"] for p in loaded) / 1024, 1),
            "total_pss_mb": round(sum(p["pss_kb"] for p in loaded) / 1024, 1),
        }
        print(json.dumps(report, indent=2))
    finally:
        subprocess.run([*podman, "rm", "-f", "-t", "0", name], capture_output=True)
        upstream.stop()


def probe(podman: list[str], name: str) -> list[dict[str, int]]:
    output = subprocess.run([*podman, "exec", name, "python", "-c", PROBE], capture_output=True, text=True, check=True)
    return json.loads(output.stdout)  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()

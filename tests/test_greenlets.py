"""The gevent helpers, in a gevent-patched child process as under gunicorn's gevent worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.servers import ROOT


def run_patched(code: str) -> str:
    """Run `code` after gevent's monkey-patching, as gunicorn's gevent worker does; return its stdout."""
    program = "from gevent import monkey\nmonkey.patch_all()\n" + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_probe_ready_behind_a_burst_runs_before_the_bursts_heavy_work_is_done() -> None:
    # Five requests arrive together, then a probe: without the turnstile the hub runs all five heavy
    # stretches (20 ms of CPU each) back to back before the probe; behind it the probe goes second.
    order = run_patched(
        """
        import time
        import gevent
        from llm_service.greenlets import cpu_turnstile

        order = []

        def heavy(n):
            cpu_turnstile().pass_through()
            end = time.perf_counter() + 0.02
            while time.perf_counter() < end:
                pass
            order.append(f"heavy{n}")
            gevent.sleep(0)

        burst = [gevent.spawn(heavy, n) for n in range(5)]
        probe = gevent.spawn(order.append, "probe")
        gevent.joinall([*burst, probe])
        print(",".join(order))
        """
    )
    assert order.split(",") == ["heavy0", "probe", "heavy1", "heavy2", "heavy3", "heavy4"]


def test_readable_now_sees_data_and_end_of_stream_without_waiting() -> None:
    out = run_patched(
        """
        import socket
        from llm_service.greenlets import readable_now

        a, b = socket.socketpair()
        empty = readable_now(a.fileno())
        b.sendall(b"x")
        a.recv(1)
        b.close()
        print(empty, readable_now(a.fileno()))
        """
    )
    assert out == "False True"


def test_a_forked_worker_makes_its_own_turnstile() -> None:
    # gunicorn forks workers: one made before the fork belongs to the parent's hub and must not be reused.
    out = run_patched(
        """
        import os
        from llm_service.greenlets import cpu_turnstile

        parent = cpu_turnstile()
        read, write = os.pipe()
        if os.fork() == 0:
            os.write(write, b"same" if cpu_turnstile() is parent else b"own")
            os._exit(0)
        os.wait()
        print(os.read(read, 4).decode(), cpu_turnstile() is parent)
        """
    )
    assert out == "own True"

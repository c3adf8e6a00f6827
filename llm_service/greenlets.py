"""Work that must run on a real OS thread, and time limits, whether or not gevent has patched the process.

Under gunicorn's gevent worker, `threading` and `concurrent.futures` threads are greenlets: CPU-bound C code
run in one (llama.cpp) would stop every other request of the worker. `NativeThread` runs it on one real
thread instead and hands results back through a `Channel` that wakes the waiting greenlet without polling.
"""

from __future__ import annotations

import functools
import os
import queue
import select
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any


def gevent_patched() -> bool:
    """Return whether gevent has monkey-patched this process (gunicorn's gevent worker does, after fork)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


class Channel:
    """Items put from the native thread, taken by the request's thread or greenlet, in order."""

    def __init__(self) -> None:
        self._gevent = gevent_patched()
        if self._gevent:
            import gevent
            import gevent.queue

            self._queue: Any = gevent.queue.Queue()
            self._loop = gevent.get_hub().loop
        else:
            self._queue = queue.Queue()

    def put(self, item: Any) -> None:
        """Hand `item` over; safe from any thread."""
        if self._gevent:
            # gevent's queue belongs to the hub's thread: the hub puts it there and wakes the waiter.
            self._loop.run_callback_threadsafe(self._queue.put, item)
        else:
            self._queue.put(item)

    def get(self, timeout_s: float | None = None) -> Any:
        """Take the next item, waiting at most `timeout_s`; raise queue.Empty past it."""
        return self._queue.get(timeout=timeout_s)


class NativeThread:
    """One real OS thread that runs submitted jobs in order (llama.cpp keeps its thread team per calling thread)."""

    def __init__(self, name: str) -> None:
        if gevent_patched():
            from gevent.threadpool import ThreadPool

            pool = ThreadPool(1)
            self._spawn: Callable[..., Any] = pool.spawn
        else:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            self._spawn = executor.submit

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue `job` to run on the thread; it reports back through a Channel of its own."""
        self._spawn(job)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function(*args)` on the thread and return its result (or raise its exception)."""
        results = Channel()

        def job() -> None:
            try:
                results.put((True, function(*args)))
            except BaseException as error:  # handed to the caller, which raises it
                results.put((False, error))

        self.submit(job)
        ok, value = results.get()
        if not ok:
            raise value
        return value


class Turnstile:
    """Let one greenlet at a time through to a CPU-heavy stretch of work; the next goes after the hub next polls.

    Under gevent a greenlet runs until it waits. When a burst of requests (or upstream answers) is ready at
    once, the hub would run each one's heavy stretch back to back before it next polled the network, so a new
    connection, a health probe among them, waited behind all of them. Behind the turnstile those stretches
    queue here instead, and the turnstile reopens on a zero-delay timer, which the hub fires only after its
    next poll: between two heavy stretches new connections are accepted and whatever is ready runs. Without
    gevent it does nothing: threads are scheduled by the OS.
    """

    def __init__(self) -> None:
        self._lock: Any = None
        if gevent_patched():
            import gevent
            import gevent.lock

            self._lock = gevent.lock.Semaphore(1)
            # One holder at a time, so one timer serves every pass: it is idle again before the next acquire.
            self._timer = gevent.get_hub().loop.timer(0.0)

    def pass_through(self) -> None:
        """Wait for the turnstile, then hold it until this greenlet has yielded and the hub has polled."""
        if self._lock is None:
            return
        self._lock.acquire()
        # Reopened by a timer, not a plain callback: the hub runs up to 50 callbacks between polls, so a
        # callback would let ~15 heavy stretches through per poll (a probe waited 15 ms, not 2.5 ms).
        self._timer.start(self._lock.release)


_turnstile: Turnstile | None = None


def _forget_turnstile() -> None:
    global _turnstile
    _turnstile = None


os.register_at_fork(after_in_child=_forget_turnstile)  # a forked worker makes its own, on its own hub


def cpu_turnstile() -> Turnstile:
    """Return this process's turnstile, made on first use (after gunicorn forks the worker and gevent patches it)."""
    # Asked on every upstream read: a module global, not a lookup by os.getpid(), which is a system call.
    global _turnstile
    if _turnstile is None:
        _turnstile = Turnstile()
    return _turnstile


def readable_now(fd: int) -> bool:
    """Return whether `fd` has data or an end of stream to read right now, without waiting or switching."""
    # gevent's patched poll() starts and closes a watcher per descriptor even for a zero timeout: 18 us
    # against the system call's 1.3 us, paid for every idle pooled upstream connection a request passes.
    poller = _native_poll()()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@functools.cache
def _native_poll() -> Any:
    if gevent_patched():  # looked up once, after gunicorn's gevent worker has patched the process
        from gevent.monkey import get_original

        return get_original("select", "poll")
    return select.poll


def time_limit(seconds: float, error: BaseException) -> AbstractContextManager[None]:
    """Raise `error` if the block is still running after `seconds` (only under gevent: threads can't be interrupted)."""
    if not gevent_patched():
        return nullcontext()
    import gevent

    timer: AbstractContextManager[None] = gevent.Timeout(seconds, error)
    return timer

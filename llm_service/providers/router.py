"""MODELS_FILE's routing: each public model to its upstream, then to its fallbacks, within one deadline."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, TypeVar

from ..circuit import STATE_NAMES, build_circuit
from ..config import Settings
from ..errors import ServiceError
from ..metrics import FALLBACKS
from ..models_file import LOCAL_UPSTREAM, Route, Routes
from .base import Completion, GenerationParams, Provider, TextDelta
from .retry import MIN_ATTEMPT_S, RetryBudget

T = TypeVar("T")
log = logging.getLogger("llm_service.router")

# Failures another upstream may not share: the circuit is open, the account is out of quota, the local
# model is busy. Passing faults whose retries ran out (5xx, timeout, connection, 429) are marked transient.
FALLBACK_CODES = frozenset({"upstream_unavailable", "upstream_quota_exceeded", "local_model_busy"})


class Router:
    """A Provider that sends each model to its upstream and falls back to the next model on an outage."""

    name = "routed"
    unpriced_cost_usd: Decimal | None = None  # local models are priced at 0 by MODELS_FILE's loading

    def __init__(self, routes: Routes, backends: dict[str, Provider], circuits: dict[str, Any]) -> None:
        self.routes = routes
        self.backends = backends
        self.circuits = circuits

    def is_ready(self) -> bool:
        return all(backend.is_ready() for backend in self.backends.values())

    def warm_up(self) -> None:
        for backend in self.backends.values():
            backend.warm_up()

    def circuit_states(self) -> dict[str, str]:
        """Return each upstream's circuit state by name, without taking a probe."""
        return {name: STATE_NAMES[circuit.admit(claim=False).state] for name, circuit in self.circuits.items()}

    def complete(self, params: GenerationParams, deadline_monotonic: float) -> Completion:
        def call(route: Route) -> Completion:
            return self.backends[route.upstream].complete(_routed(params, route), deadline_monotonic)

        completion, route, attempts = self._first_answer(params.model, deadline_monotonic, call)
        return _answered(completion, route, params.model, attempts)

    def stream(self, params: GenerationParams, deadline_monotonic: float) -> Iterator[TextDelta | Completion]:
        """Open the first model's stream that yields an item; fall back only before that first item."""

        def open_stream(route: Route) -> tuple[TextDelta | Completion, Iterator[TextDelta | Completion]]:
            items = iter(self.backends[route.upstream].stream(_routed(params, route), deadline_monotonic))
            try:
                return next(items), items
            except BaseException:
                getattr(items, "close", lambda: None)()
                raise

        (first, items), route, attempts = self._first_answer(params.model, deadline_monotonic, open_stream)
        return _relay(first, items, route, params.model, attempts)

    def _first_answer(self, model: str, deadline_monotonic: float, call: Callable[[Route], T]) -> tuple[T, Route, int]:
        """Return what `call` gives for the first model of the chain that answers, that route, the attempts spent."""
        chain = self.routes.chain(model)
        attempts = 0
        for index, route in enumerate(chain):
            try:
                return call(route), route, attempts
            except ServiceError as error:
                attempts += error.attempts or 0
                error.attempts = attempts
                last = index == len(chain) - 1
                in_time = time.monotonic() + MIN_ATTEMPT_S < deadline_monotonic
                if last or not in_time or not (error.transient or error.code in FALLBACK_CODES):
                    raise
                following = chain[index + 1].model
                FALLBACKS.labels(model, following).inc()
                log.warning(
                    "model failed; falling back",
                    extra={"fallback_from": route.model, "fallback_to": following, "reason": error.code},
                )
        raise AssertionError("a chain has at least one model")


def _routed(params: GenerationParams, route: Route) -> GenerationParams:
    return dataclasses.replace(params, model=route.upstream_model)


def _answered(completion: Completion, route: Route, requested: str, attempts: int) -> Completion:
    """Return `completion` under its public model name, with the upstream, the fallback and every attempt."""
    return dataclasses.replace(
        completion,
        model=route.model,
        attempts=attempts + completion.attempts,
        upstream=route.upstream,
        fallback_from=None if route.model == requested else requested,
    )


def _relay(
    first: TextDelta | Completion,
    items: Iterator[TextDelta | Completion],
    route: Route,
    requested: str,
    attempts: int,
) -> Iterator[TextDelta | Completion]:
    if isinstance(first, TextDelta) and route.model != requested:
        first = dataclasses.replace(first, model=route.model, fallback_from=requested)
    try:
        for item in itertools.chain((first,), items):
            yield item if isinstance(item, TextDelta) else _answered(item, route, requested, attempts)
    finally:
        getattr(items, "close", lambda: None)()


def build_router(settings: Settings, routes: Routes, redis_client: Any) -> Router:
    """Build one backend per upstream the models use, each with its circuit, sharing one retry budget."""
    from .openai_provider import OpenAIProvider

    budget = RetryBudget(settings.retry_budget)
    backends: dict[str, Provider] = {}
    circuits = {}
    for name, upstream in routes.upstreams.items():
        timeout_s = upstream.timeout_s or settings.timeout_s
        circuit = build_circuit(name, settings.circuit_failures, settings.circuit_reset_s, timeout_s + 1, redis_client)
        upstream_settings = dataclasses.replace(
            settings, openai_base_url=upstream.base_url, openai_api_key=upstream.api_key, timeout_s=timeout_s
        )
        backends[name] = OpenAIProvider(upstream_settings, name=name, budget=budget, circuit=circuit)
        circuits[name] = circuit
    if routes.uses_local:
        from .local import LocalProvider

        backends[LOCAL_UPSTREAM] = LocalProvider(settings)
    return Router(routes, backends, circuits)

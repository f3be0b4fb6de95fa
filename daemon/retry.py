"""Retrying transient sink errors: the one place that builds a tenacity policy.

Capped exponential backoff with jitter (``RetryPolicy``), only for TransientSinkError
(a permanent error or a bug propagates at once), sleeping on the stop event so a
shutdown interrupts the wait. The daemon retries until it stops; one-shot commands
give up after ``give_up_seconds``. A new ``Retrying`` per call: they are not thread-safe.
Logging is the caller's: ``SinkHealth`` writes one line when a sink starts failing and
one when it recovers, never one per attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import tenacity

from runrelay.daemon.config import RetryPolicy
from runrelay.daemon.state import Health, StateStore
from runrelay.sinks.base import TransientSinkError

log = logging.getLogger("runrelay.retry")
T = TypeVar("T")


class SinkHealth:
    """Tracks one sink's outages: counts retries, logs the start and the end of each."""

    def __init__(self, sink: str, store: StateStore):
        self.sink = sink
        self._store = store
        self._health = store.health(sink)
        self._outage_retries = 0
        self._outage_start: float | None = None

    def failed(self, error: BaseException) -> None:
        if self._outage_start is None:
            self._outage_start = time.monotonic()
            log.warning("sink %s is failing, retrying with backoff: %s", self.sink, error)
        self._outage_retries += 1
        self._health = Health(self._health.retries + 1, self._health.failing_since or time.time(), str(error))
        self._store.save_health(self.sink, self._health)

    def succeeded(self) -> None:
        if self._outage_start is not None:
            down = time.monotonic() - self._outage_start
            log.info("sink %s recovered after %d retries, %.1f s down", self.sink, self._outage_retries, down)
            self._outage_start = None
            self._outage_retries = 0
        if self._health.failing_since is not None:  # also an outage a previous process saw begin
            self._health = Health(self._health.retries, None, self._health.last_error)
            self._store.save_health(self.sink, self._health)


def call(
    function: Callable[[], T],
    policy: RetryPolicy,
    stop: threading.Event,
    health: SinkHealth,
    give_up: bool = False,
) -> T:
    """Run ``function``, retrying TransientSinkError; re-raise the last one when stopped or given up."""
    stops = [tenacity.stop_when_event_set(stop)]
    if give_up:
        stops.append(tenacity.stop_after_delay(policy.give_up_seconds))
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientSinkError),
        wait=tenacity.wait_exponential_jitter(
            initial=policy.initial_seconds, max=policy.max_seconds, exp_base=policy.multiplier,
            jitter=policy.jitter_seconds,
        ),
        stop=tenacity.stop_any(*stops),
        sleep=stop.wait,
        before_sleep=lambda state: health.failed(state.outcome.exception()),
        reraise=True,
    )
    result = retrying(function)
    health.succeeded()
    return result

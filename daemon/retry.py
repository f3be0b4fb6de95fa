"""Retrying transient sink errors: the one place that builds a tenacity policy.

Capped exponential backoff with jitter (``RetryPolicy``), only for TransientSinkError
(a permanent error or a bug propagates at once), sleeping on the stop event so a
shutdown interrupts the wait. The daemon retries until it stops; one-shot commands
give up after ``give_up_seconds``. A new ``Retrying`` per call: they are not thread-safe.
Logging is the caller's: ``SinkHealth`` writes one line when a sink starts failing and
one when it recovers, never one per attempt, and keeps the sink's condition in the state
for ``runrelay status``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import tenacity

from runrelay.daemon.config import RetryPolicy
from runrelay.daemon.state import CRASHED, OK, RETRYING, UNUSABLE, Health, StateStore, StateUnavailable
from runrelay.daemon.supervisor import Liveness
from runrelay.sinks.base import TransientSinkError

log = logging.getLogger("runrelay.retry")
T = TypeVar("T")


class SinkHealth:
    """Tracks one sink's condition: counts retries, logs the start and the end of each outage."""

    def __init__(self, sink: str, store: StateStore, identity: str, give_up_seconds: float | None):
        self.sink = sink
        self._store = store
        self._give_up_seconds = give_up_seconds  # None: retry until stopped (the daemon)
        self._health = store.health(sink)
        self._outage_retries = 0
        self._outage_start: float | None = None
        self._unusable: str | None = None
        self._save(self._health.condition, identity)

    def failed(self, error: BaseException) -> None:
        if self._outage_start is None:
            self._outage_start = time.monotonic()
            until = ("until it recovers" if self._give_up_seconds is None
                     else f"for up to {self._give_up_seconds:.0f} s (retry.give_up_seconds)")
            log.warning("sink %s is failing, retrying with backoff %s: %s", self.sink, until, error)
        self._outage_retries += 1
        self._health = Health(self._health.retries + 1, self._health.failing_since or time.time(), str(error))
        self._save(RETRYING)

    def unusable(self, error: BaseException, recheck_seconds: float | None) -> None:
        """The sink cannot work as configured: said once, until it works or says something
        else. A one-shot command (``recheck_seconds`` None) says it in its summary instead."""
        if str(error) != self._unusable and recheck_seconds is not None:
            log.error("sink %s cannot deliver: %s (checking again every %.0f s)", self.sink, error, recheck_seconds)
            self._unusable = str(error)
        self._health = Health(self._health.retries, self._health.failing_since or time.time(), str(error))
        self._save(UNUSABLE)

    def crashed(self, error: BaseException) -> None:
        self._health = Health(self._health.retries, time.time(), f"{type(error).__name__}: {error}")
        self._save(CRASHED)

    def succeeded(self) -> None:
        if self._outage_start is not None:
            down = time.monotonic() - self._outage_start
            log.info("sink %s recovered after %d retries, %.1f s down", self.sink, self._outage_retries, down)
            self._outage_start = None
            self._outage_retries = 0
        if self._unusable is not None:
            log.info("sink %s works again", self.sink)
            self._unusable = None
        if self._health.condition != OK:  # also an outage a previous process saw begin
            self._health = Health(self._health.retries, None, self._health.last_error)
            self._save(OK)

    def _save(self, condition: str, identity: str | None = None) -> None:
        self._health.condition = condition
        try:
            self._store.save_health(self.sink, self._health, identity)
        except StateUnavailable:
            pass  # health is for runrelay status only; the worker waits on the state for what matters


def call(
    function: Callable[[], T],
    policy: RetryPolicy,
    stop: threading.Event,
    health: SinkHealth,
    liveness: Liveness,
    give_up: bool = False,
) -> T:
    """Run ``function``, retrying TransientSinkError; re-raise the last one when stopped or
    given up. A backoff wait is a wait on purpose (``liveness``)."""
    stops = [tenacity.stop_when_event_set(stop)]
    if give_up:
        stops.append(tenacity.stop_after_delay(policy.give_up_seconds))

    def sleep(seconds: float) -> None:
        with liveness.idle():
            stop.wait(seconds)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientSinkError),
        wait=tenacity.wait_exponential_jitter(
            initial=policy.initial_seconds, max=policy.max_seconds, exp_base=policy.multiplier,
            jitter=policy.jitter_seconds,
        ),
        stop=tenacity.stop_any(*stops),
        sleep=sleep,
        before_sleep=lambda state: health.failed(state.outcome.exception()),
        reraise=True,
    )
    result = retrying(function)
    health.succeeded()
    return result

"""The one owner of every background loop: start them, watch them, stop them.

A loop is a callable taking the shared stop event. Each runs on its own thread; a loop
that raises is logged with its traceback and recorded in ``crashed``, and whoever waits
on the supervisor wakes at once. An essential loop's end stops the daemon (it exits
non-zero); a sink's worker is not essential: its crash stops that sink only. ``stop``
sets the stop event, rings the wakers, and joins every loop within one time bound.
Each loop reports its progress through a ``Liveness``, which is what systemd's watchdog
is told about (``healthy``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

log = logging.getLogger("runrelay.supervisor")

Loop = Callable[[threading.Event], None]


class LoopFailed(Exception):
    """A loop's explained failure (e.g. a sink that cannot be opened): logged without a traceback."""


class Liveness:
    """A loop's progress: it beats as it works, and says when it waits on purpose."""

    def __init__(self):
        self._at = time.monotonic()
        self._waiting = 0

    def beat(self) -> None:
        self._at = time.monotonic()

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """A wait on purpose (for work, or a backoff): never a reason to think the loop stuck."""
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1
            self.beat()

    def progressing(self, stuck_seconds: float) -> bool:
        return self._waiting > 0 or time.monotonic() - self._at < stuck_seconds


class Supervisor:
    def __init__(self):
        self.stopping = threading.Event()
        self.crashed: dict[str, BaseException] = {}
        self._loops: list[tuple[str, Loop]] = []
        self._essential: set[str] = set()
        self._liveness: dict[str, tuple[Liveness, float]] = {}
        self._threads: list[threading.Thread] = []
        self._wakers: list[Callable[[], None]] = []
        self._changed = threading.Condition()
        self.finished: set[str] = set()

    def add(self, name: str, loop: Loop, essential: bool = True, liveness: Liveness | None = None,
            stuck_seconds: float = 60.0) -> None:
        """Run ``loop``; ``liveness`` not beating for ``stuck_seconds`` outside a wait on
        purpose makes the supervisor unhealthy."""
        self._loops.append((name, loop))
        if essential:
            self._essential.add(name)
        if liveness is not None:
            self._liveness[name] = (liveness, stuck_seconds)

    @property
    def essential_ended(self) -> bool:
        return bool(self._essential & self.finished)

    def healthy(self) -> bool:
        """Every loop running, and each one making progress or waiting on purpose."""
        if self.crashed or self.finished:
            return False
        return all(liveness.progressing(stuck) for liveness, stuck in self._liveness.values())

    def on_stop(self, waker: Callable[[], None]) -> None:
        """Called at stop, to wake loops that wait on something other than the stop event."""
        self._wakers.append(waker)

    def start(self) -> None:
        for name, loop in self._loops:
            thread = threading.Thread(target=self._run, args=(name, loop), name=f"runrelay {name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, name: str, loop: Loop) -> None:
        try:
            loop(self.stopping)
        except BaseException as error:  # noqa: BLE001 - surfaced below, never swallowed
            explained = isinstance(error, LoopFailed)
            log.critical("loop %s %s: %s", name, "failed" if explained else "crashed", error,
                         exc_info=None if explained else error)
            self.crashed[name] = error
        finally:
            with self._changed:
                self.finished.add(name)
                self._changed.notify_all()

    @property
    def alive(self) -> list[str]:
        return [thread.name for thread in self._threads if thread.is_alive()]

    @property
    def all_finished(self) -> bool:
        return len(self.finished) == len(self._loops)

    def wait(self, timeout: float) -> None:
        """Return when a loop ends (crashed or finished), or after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(timeout)

    def stop(self, timeout: float) -> bool:
        """Stop every loop; True if all ended within ``timeout`` seconds."""
        self.stopping.set()
        for waker in self._wakers:
            waker()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = self.alive
        if late:
            log.error("still running after %.0f s: %s", timeout, ", ".join(late))
        return not late

"""The daemon's entry points as a library: ``run_daemon``, ``run_sync``, ``collect_status``, DLQ commands.

The CLI is a thin layer over these; tests and the demo call them too. They take a
validated ``Config``; a problem the user can fix raises ``UserError`` (exit 2 in the
CLI). Exit codes are documented in docs/cli.md.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from runrelay.daemon.config import Config
from runrelay.daemon.delivery import SinkWorker
from runrelay.daemon.discovery import Discovery, Doorbell
from runrelay.daemon.dlq import DeadLetters, Letter
from runrelay.daemon.notify import Notifier
from runrelay.daemon.redrive import redrive
from runrelay.daemon.state import DeliveryLock, Health, StateStore
from runrelay.daemon.status import SinkStatus, sink_status
from runrelay.daemon.supervisor import Supervisor
from runrelay.eventlog.fsutil import make_private_dir
from runrelay.eventlog.reader import Journal
from runrelay.sinks.base import redact
from runrelay.sinks.registry import UnknownSinkError, sink_for

EXIT_OK = 0
EXIT_UNDELIVERED = 1  # something is left undelivered, or a loop crashed, or shutdown overran
EXIT_USAGE = 2  # bad configuration or arguments: nothing was done
MAIN_TICK_SECONDS = 0.2

log = logging.getLogger("runrelay")


class UserError(Exception):
    """Something the user can fix; printed as one line, exit 2."""


# --- shared setup ---------------------------------------------------------------------------


def open_journal(config: Config, create: bool = False) -> Journal:
    root = config.journal
    if root.exists() and not root.is_dir():
        raise UserError(f"the journal {root} is not a directory: set --journal or $RUNRELAY_JOURNAL")
    if not root.exists():
        if not create:
            raise UserError(f"no journal at {root}: run an experiment with a journal there first, "
                            "or point --journal / $RUNRELAY_JOURNAL at one")
        make_private_dir(root)
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"cannot read the journal {root}: run as its owner or fix its permissions")
    return Journal(root)


def _lock(config: Config) -> DeliveryLock:
    lock = DeliveryLock(config.state)
    try:
        acquired = lock.acquire()
    except OSError as error:
        raise UserError(f"cannot use the state directory {config.state}: {error.strerror}; "
                        "set --state or $RUNRELAY_STATE") from error
    if not acquired:
        raise UserError(f"another runrelay (pid {lock.holder()}) is delivering with state {config.state}; "
                        "it delivers already (see runrelay status), or stop it first")
    return lock


def _workers(config: Config, journal: Journal, store: StateStore, doorbell: Doorbell,
             drain_to: dict[str, dict[str, int]] | None = None, on_progress=lambda count: None) -> list[SinkWorker]:
    """One worker per sink; ``drain_to`` (one-shot) holds each sink's targets, by its redacted URL."""
    workers = []
    for url in config.sinks:
        key = redact(url)
        try:
            sink = sink_for(url, journal.blob)
        except UnknownSinkError as error:
            raise UserError(str(error)) from error
        workers.append(SinkWorker(sink, key, journal, store, DeadLetters(config.state, key), config.delivery,
                                  config.retry, doorbell.subscribe(), None if drain_to is None else drain_to[key],
                                  on_progress))
    return workers


class _Signals:
    """First SIGTERM/SIGINT: stop gracefully. Second: abort at once. Only from the main thread."""

    _HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self._HANDLED}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os.write(2, b"runrelay: second signal, aborting without saving\n")
            os._exit(128 + signum)
        self.received = signum


# --- daemon ---------------------------------------------------------------------------------


def run_daemon(config: Config) -> int:
    """Deliver continuously until SIGTERM/SIGINT; 0 after a clean stop."""
    with _Signals() as signals:  # from the start: a SIGTERM during setup is a clean stop too
        journal = open_journal(config, create=True)
        lock = _lock(config)
        try:
            store = StateStore.open(config.state)
            supervisor = Supervisor()
            doorbell = Doorbell()
            supervisor.on_stop(doorbell.ring)
            workers = _workers(config, journal, store, doorbell)
            for worker in workers:
                supervisor.add(worker.name, worker.run)
            supervisor.add(Discovery.name, Discovery(journal.root, config.delivery.rescan_seconds, doorbell).run)
            clean = _serve(config, supervisor, signals, len(workers))
            if clean:
                store.close()  # else a loop may still use it; the process exits anyway
        finally:
            lock.release()
    if supervisor.crashed or not clean:
        return EXIT_UNDELIVERED
    log.info("stopped; cursors saved")
    return EXIT_OK


def _serve(config: Config, supervisor: Supervisor, signals: _Signals, sinks: int) -> bool:
    """Run until a signal or a loop's end; True if every loop then stopped in time."""
    notifier = Notifier()
    log.info("delivering journal %s to %s (state %s, config %s)", config.journal,
             ", ".join(config.redacted_sinks), config.state, config.source or "no config file")
    supervisor.start()
    notifier.send("READY=1", f"STATUS=delivering to {sinks} sink(s)")
    next_ping = 0.0
    while signals.received is None and not supervisor.finished:
        supervisor.wait(MAIN_TICK_SECONDS)
        if notifier.watchdog_seconds and time.monotonic() >= next_ping and not supervisor.finished:
            notifier.send("WATCHDOG=1")
            next_ping = time.monotonic() + notifier.watchdog_seconds
    reason = f"signal {signal.Signals(signals.received).name}" if signals.received else "a loop failed"
    log.info("stopping (%s): finishing batches in flight", reason)
    notifier.send("STOPPING=1")
    return supervisor.stop(config.shutdown_seconds)


# --- sync -----------------------------------------------------------------------------------


@dataclass
class SyncReport:
    delivered: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_UNDELIVERED if self.problems else EXIT_OK


def run_sync(config: Config, progress: bool = True) -> SyncReport:
    """Deliver everything pending once, then return what is left undelivered."""
    journal = open_journal(config)
    lock = _lock(config)
    store = StateStore.open(config.state)
    try:
        return _sync(config, journal, store, progress)
    finally:
        store.close()
        lock.release()


def _sync(config: Config, journal: Journal, store: StateStore, progress: bool) -> SyncReport:
    pending = {key: sink_status(journal, key, store.cursors(key), Health(), 0) for key in config.redacted_sinks}
    bar = tqdm(total=sum(status.pending_events for status in pending.values()), unit="event", desc="sync", file=sys.stderr, disable=not progress, leave=False)
    counted = threading.Lock()
    report = SyncReport()

    def on_progress(count: int) -> None:
        with counted:
            report.delivered += count
            bar.update(count)

    supervisor = Supervisor()
    doorbell = Doorbell()
    workers = _workers(config, journal, store, doorbell, {key: status.ends for key, status in pending.items()},
                       on_progress)
    for worker in workers:
        supervisor.add(worker.name, worker.run)
    with _Signals() as signals, logging_redirect_tqdm():  # log lines above the bar, not through it
        supervisor.start()
        while signals.received is None and not supervisor.all_finished:
            supervisor.wait(MAIN_TICK_SECONDS)
        if signals.received:
            report.problems.append(f"interrupted by {signal.Signals(signals.received).name}")
        supervisor.stop(config.shutdown_seconds)
    bar.close()
    for worker in workers:
        report.problems += _left_undelivered(worker, supervisor, pending[worker.key].corrupt_runs)
    return report


def _left_undelivered(worker: SinkWorker, supervisor: Supervisor, corrupt: dict[str, str]) -> list[str]:
    problems = []
    if worker.name in supervisor.crashed:
        problems.append(f"{worker.key}: delivery stopped: {supervisor.crashed[worker.name]}")
    if worker.outcome.gave_up:
        problems.append(f"{worker.key}: unreachable, gave up: {worker.outcome.gave_up}")
    for run, reason in {**corrupt, **worker.outcome.stopped_runs}.items():
        problems.append(f"{worker.key}: run {run} stopped: {reason}")
    held = len(worker.letters)
    if held:
        problems.append(f"{worker.key}: {held} event(s) in the dead-letter queue (see runrelay dlq list)")
    return problems


# --- status ---------------------------------------------------------------------------------


def collect_status(config: Config) -> dict:
    journal = open_journal(config)
    store = StateStore.open_readonly(config.state)
    sinks: list[SinkStatus] = []
    for key in config.redacted_sinks:
        letters = DeadLetters.existing(config.state, key)
        sinks.append(sink_status(journal, key, store.cursors(key) if store else {},
                                 store.health(key) if store else Health(), len(letters) if letters else 0))
    if store:
        store.close()
    return {
        "journal": str(journal.root),
        "state": str(config.state),
        "daemon_pid": DeliveryLock(config.state).holder(),
        "sinks": [status.as_json() for status in sinks],
    }


# --- dead letters ---------------------------------------------------------------------------


def list_letters(config: Config) -> list[Letter]:
    letters: list[Letter] = []
    for key in config.redacted_sinks:
        queue = DeadLetters.existing(config.state, key)
        if queue:
            letters += queue.letters()
            queue.close()
    return letters


def choose_letters(config: Config, ids: list[int] | None, sink: str | None) -> dict[str, list[Letter]]:
    """The letters named by id (or all, when ``ids`` is None), per sink; unknown ids are a UserError."""
    keys = [key for key in config.redacted_sinks if sink is None or sink in key]
    if sink is not None and not keys:
        raise UserError(f"no configured sink matches {sink!r}; configured: {', '.join(config.redacted_sinks)}")
    chosen: dict[str, list[Letter]] = {}
    found: dict[int, list[str]] = {}
    for key in keys:
        queue = DeadLetters.existing(config.state, key)
        held = queue.letters() if queue else []
        if queue:
            queue.close()
        picked = [letter for letter in held if ids is None or letter.id in ids]
        for letter in picked:
            found.setdefault(letter.id, []).append(key)
        if picked:
            chosen[key] = picked
    for letter_id in ids or []:
        if letter_id not in found:
            raise UserError(f"no dead letter {letter_id} (see runrelay dlq list)")
        if len(found[letter_id]) > 1:
            raise UserError(f"dead letter {letter_id} exists for several sinks; add --sink with one of: "
                            f"{', '.join(found[letter_id])}")
    return chosen


def retry_letters(config: Config, chosen: dict[str, list[Letter]]) -> tuple[int, list[str]]:
    """Re-drive the chosen letters; returns (delivered count, problems).

    Holds the delivery lock: a re-drive writes the run's row from the journal as it stands,
    and a daemon committing newer events meanwhile would be rolled back by it.
    """
    lock = _lock(config)
    try:
        return _retry_letters(config, chosen)
    finally:
        lock.release()


def _retry_letters(config: Config, chosen: dict[str, list[Letter]]) -> tuple[int, list[str]]:
    journal = Journal(config.journal)
    store = StateStore.open(config.state)
    urls = {redact(url): url for url in config.sinks}
    delivered, problems = 0, []
    stop = threading.Event()
    try:
        for key, picked in chosen.items():
            queue = DeadLetters(config.state, key, consumer=True)
            try:
                result = redrive(sink_for(urls[key], journal.blob), queue, picked, journal, store, config.retry, stop)
            except UnknownSinkError as error:
                raise UserError(str(error)) from error
            finally:
                queue.close()
            delivered += result.delivered
            if result.refused:
                problems.append(f"{key}: {result.refused} letter(s) refused again (see runrelay dlq list)")
            if result.unavailable:
                problems.append(f"{key}: unreachable, gave up: {result.unavailable}")
    finally:
        store.close()
    return delivered, problems


def drop_letters(config: Config, chosen: dict[str, list[Letter]]) -> int:
    dropped = 0
    for key, picked in chosen.items():
        queue = DeadLetters(config.state, key)
        for letter in picked:
            queue.drop(letter)
            dropped += 1
        queue.close()
    return dropped

"""The daemon's entry points as a library: ``run_daemon``, ``run_sync``, ``collect_status``, dead letters.

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

from runrelay.daemon.config import Config, SinkConfig
from runrelay.daemon.delivery import SinkWorker
from runrelay.daemon.discovery import Discovery, Doorbell
from runrelay.daemon.dlq import DeadLetters, Letter
from runrelay.daemon.errors import EXIT_OK, EXIT_UNDELIVERED, UserError
from runrelay.daemon.notify import Notifier
from runrelay.daemon.state import Cursor, DeliveryLock, Health, StateStore, StateUnavailable
from runrelay.daemon.status import SinkStatus, sink_status
from runrelay.daemon.supervisor import Supervisor
from runrelay.daemon.verdicts import DeathWatch, Host
from runrelay.daemon.watchdog import HostReports, Watchdog, central
from runrelay.eventlog.events import micros_now
from runrelay.eventlog.fsutil import NotRegularFile, make_private_dir
from runrelay.eventlog.reader import Journal
from runrelay.sinks.base import Sink, TakesCentralVerdicts
from runrelay.sinks.registry import backend, sink_for

MAIN_TICK_SECONDS = 0.2
TOTALS_SECONDS = 60.0  # how often the daemon logs what it delivered
REDRIVE_POLL_SECONDS = 0.2
STUCK_MARGIN_SECONDS = 30.0  # beyond a sink's call timeout, before a worker counts as stuck
STATE_WAIT_SECONDS = 5.0  # how often a daemon whose state disk is full tries it again at start

log = logging.getLogger("runrelay")


# --- shared setup ---------------------------------------------------------------------------


def open_journal(config: Config, create: bool = False) -> Journal:
    """The journal to deliver. Only the default location is created when missing (the
    daemon may start before the first experiment); a journal given by name must exist."""
    root = config.journal
    if root.exists() and not root.is_dir():
        raise UserError(f"the journal {root} is not a directory: set --journal or $RUNRELAY_JOURNAL")
    if not root.exists():
        if not create or config.journal_given:
            raise UserError(f"no journal at {root}: check --journal / $RUNRELAY_JOURNAL / the config file, "
                            "or run an experiment with a journal there first")
        make_private_dir(root)
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"cannot read the journal {root}: run as its owner or fix its permissions")
    return Journal(root)


def _lock(config: Config) -> DeliveryLock:
    lock = DeliveryLock(config.state)
    if not _acquired(lock, config):
        raise UserError(f"another runrelay (pid {lock.holder()}) is delivering with state {config.state}; "
                        "it delivers already (see runrelay status), or stop it first")
    return lock


def _acquired(lock: DeliveryLock, config: Config) -> bool:
    """Whether this process took the delivery lock; a state directory that cannot hold it is a UserError."""
    try:
        return lock.acquire()
    except OSError as error:
        raise UserError(f"cannot use the state directory {config.state}: {error.strerror}; "
                        "set --state or $RUNRELAY_STATE") from error
    except NotRegularFile as odd:
        raise UserError(f"cannot use the state directory {config.state}: {odd}; remove it, "
                        "or set --state or $RUNRELAY_STATE") from None


def _worker(sink: SinkConfig, journal: Journal, store: StateStore, config: Config, doorbell: Doorbell,
            **one_shot) -> SinkWorker:
    return SinkWorker(sink_for(sink.name, sink.url, sink.options, journal), backend(sink.url).identity(sink.url),
                      journal, store, DeadLetters(config.state, sink.name), config.delivery, config.retry,
                      doorbell.subscribe(), **one_shot)


def _supervise(supervisor: Supervisor, worker: SinkWorker) -> None:
    stuck = worker.sink.timeout_seconds * 2 + STUCK_MARGIN_SECONDS
    supervisor.add(worker.name, worker.run, essential=False, liveness=worker.liveness, stuck_seconds=stuck)


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
        supervisor = Supervisor()
        doorbell = Doorbell()
        setup = _wait_for_state(config, signals, lambda store: [
            _worker(sink, journal, store, config, doorbell) for sink in config.sinks])
        if setup is None:
            return EXIT_OK  # stopped while waiting: nothing was started
        lock, store, workers = setup
        try:
            supervisor.on_stop(doorbell.ring)
            for worker in workers:
                _supervise(supervisor, worker)
            watch = _death_watch(config, journal, store) if config.dead_runs.judge else None
            if watch is not None:
                supervisor.add(watch.name, watch.run, essential=False, liveness=watch.liveness)
                supervisor.on_stop(watch.wake)
            reporting = [sink for sink in _sinks(config, journal) if isinstance(sink, TakesCentralVerdicts)]
            if reporting:
                reports = HostReports(config.dead_runs.host, reporting, config.dead_runs.report_seconds)
                stuck = max(sink.timeout_seconds for sink in reporting) * 2 + STUCK_MARGIN_SECONDS
                supervisor.add(reports.name, reports.run, essential=False, liveness=reports.liveness,
                               stuck_seconds=stuck)
            discovery = Discovery(journal.root, config.delivery.rescan_seconds, doorbell,
                                  watch.writer_closed if watch is not None else None)
            supervisor.add(Discovery.name, discovery.run)
            failed = _serve(config, supervisor, signals, workers)
            clean = supervisor.stop(config.shutdown_seconds)
            if clean:
                store.close()  # else a loop may still use it; the process exits anyway
        finally:
            lock.release()
    if failed or not clean:
        return EXIT_UNDELIVERED
    log.info("stopped; cursors saved")
    return EXIT_OK


def _death_watch(config: Config, journal: Journal, store: StateStore | None) -> DeathWatch:
    """The dead-run watch; runs a sink has seen end are never looked at again."""
    ended = {run for sink in config.sinks for run, cursor in (store.cursors(sink.name) if store else {}).items()
             if cursor.done}
    settings = config.dead_runs
    return DeathWatch(journal, Host(settings.host, Host.this().boot_id), stalled_seconds=settings.stalled_seconds,
                      poll_seconds=settings.poll_seconds, died_status=settings.status, settled=ended)


def _sinks(config: Config, journal: Journal) -> list[Sink]:
    """New instances of the configured sinks (not opened): for a loop of their own."""
    return [sink_for(sink.name, sink.url, sink.options, journal) for sink in config.sinks]


WATCHDOG_SIGNAL_POLL_SECONDS = 0.2


def run_watchdog(config: Config, once: bool) -> int:
    """Central verdicts for silent hosts in every configured sink that takes them."""
    sinks = central(_sinks(config, journal=None))
    if not sinks:
        raise UserError("none of the configured sinks takes central verdicts (SQL, Mongo and FileStorage sinks do)")
    settings = config.watchdog
    watchdog = Watchdog(sinks, settings.host_silent_seconds, settings.stale_seconds, config.dead_runs.status)
    try:
        with _Signals() as signals:
            while True:
                watchdog.once()
                due = time.monotonic() + settings.every_seconds
                while not once and signals.received is None and time.monotonic() < due:
                    time.sleep(WATCHDOG_SIGNAL_POLL_SECONDS)
                if once or signals.received is not None:
                    break
    finally:
        for sink in sinks:
            sink.close()
    return EXIT_OK


def _wait_for_state(config: Config, signals: _Signals, make_workers):
    """The delivery lock, the state and the workers; while the state's disk cannot take them
    (full, failing), wait (said once) rather than exit: systemd would only start us again
    into the same full disk. None if a signal came meanwhile."""
    since = None
    while signals.received is None:
        try:
            lock = _lock(config)
            try:
                store = StateStore.open(config.state)
                try:
                    return lock, store, make_workers(store)
                except BaseException:
                    store.close()
                    raise
            except BaseException:
                lock.release()
                raise
        except StateUnavailable as error:
            if since is None:
                since = time.monotonic()
                log.warning("%s (state %s); waiting until it can be written (free space on its disk)", error,
                            config.state)
        deadline = time.monotonic() + STATE_WAIT_SECONDS
        while signals.received is None and time.monotonic() < deadline:
            time.sleep(MAIN_TICK_SECONDS)
    return None


def _open_state_once(config: Config) -> tuple[DeliveryLock, StateStore]:
    """The delivery lock and the state for a one-shot command; a full state disk is one line."""
    try:
        lock = _lock(config)
        try:
            return lock, StateStore.open(config.state)
        except BaseException:
            lock.release()
            raise
    except StateUnavailable as error:
        raise UserError(f"{error} (state {config.state}): free space on its disk, or set --state") from None


def _serve(config: Config, supervisor: Supervisor, signals: _Signals, workers: list[SinkWorker]) -> bool:
    """Run until a signal or an essential loop's end; True for the latter (a failure).

    systemd's WATCHDOG=1 goes out only while every loop is healthy (running, and making
    progress or waiting on purpose): a crashed or stuck sink worker lets systemd restart us.
    """
    notifier = Notifier()
    log.info("delivering journal %s to %s (state %s, config %s)", config.journal, ", ".join(config.sink_names),
             config.state, config.source or "no config file")
    supervisor.start()
    notifier.send("READY=1", f"STATUS=delivering to {len(workers)} sink(s)")
    next_ping = 0.0
    totals = _Totals(workers)
    while signals.received is None and not supervisor.essential_ended:
        supervisor.wait(MAIN_TICK_SECONDS)
        now = time.monotonic()
        if notifier.watchdog_seconds and now >= next_ping and supervisor.healthy():
            notifier.send("WATCHDOG=1")
            next_ping = now + notifier.watchdog_seconds
        totals.maybe_log(now)
    failed = signals.received is None
    reason = "a loop failed" if failed else f"signal {signal.Signals(signals.received).name}"
    log.info("stopping (%s): finishing batches in flight", reason)
    notifier.send("STOPPING=1")
    return failed


class _Totals:
    """What the daemon delivered, logged at INFO every TOTALS_SECONDS (when it delivered anything)."""

    def __init__(self, workers: list[SinkWorker]):
        self._counts = {worker.sink.name: 0 for worker in workers}
        self._lock = threading.Lock()
        self._next = time.monotonic() + TOTALS_SECONDS
        for worker in workers:
            worker.on_progress = self._counter(worker.sink.name)

    def _counter(self, name: str):
        def count(events: int, _bytes: int) -> None:
            with self._lock:
                self._counts[name] += events

        return count

    def maybe_log(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + TOTALS_SECONDS
        with self._lock:
            counts, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        if any(counts.values()):
            log.info("delivered in the last %.0f s: %s", TOTALS_SECONDS,
                     ", ".join(f"{name} {count} event(s)" for name, count in counts.items()))


# --- sync -----------------------------------------------------------------------------------


@dataclass
class SyncReport:
    delivered: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_UNDELIVERED if self.problems else EXIT_OK


def run_sync(config: Config, progress: bool = True) -> SyncReport:
    """Judge this host's runs once (as the daemon does, unless ``dead_runs.judge`` is off),
    deliver everything appended before the delivery starts, then return what is left
    undelivered."""
    journal = open_journal(config)
    lock, store = _open_state_once(config)
    try:
        if config.dead_runs.judge:
            _death_watch(config, journal, store).judge()
        return _run_one_shot(config, journal, store, progress, until_us=micros_now())
    finally:
        store.close()
        lock.release()


def _run_one_shot(config: Config, journal: Journal, store: StateStore, progress: bool, sinks=None,
                  **one_shot) -> SyncReport:
    sinks = config.sinks if sinks is None else sinks
    bar = tqdm(total=_pending_bytes(journal, store, sinks) or None, unit="B", unit_scale=True, desc="sync", file=sys.stderr,
               disable=not progress, leave=False)
    counted = threading.Lock()
    report = SyncReport()

    def on_progress(events: int, nbytes: int) -> None:
        with counted:
            report.delivered += events
            bar.update(nbytes)

    supervisor = Supervisor()
    doorbell = Doorbell()
    workers = [_worker(sink, journal, store, config, doorbell, on_progress=on_progress, **one_shot)
               for sink in sinks]
    for worker in workers:
        _supervise(supervisor, worker)
    with _Signals() as signals, logging_redirect_tqdm():  # log lines above the bar, not through it
        supervisor.start()
        while signals.received is None and not supervisor.all_finished:
            supervisor.wait(MAIN_TICK_SECONDS)
        if signals.received:
            report.problems.append(f"interrupted by {signal.Signals(signals.received).name}")
        supervisor.stop(config.shutdown_seconds)
    bar.close()
    for worker in workers:
        report.problems += _left_undelivered(worker, supervisor)
    return report


def _pending_bytes(journal: Journal, store: StateStore, sinks) -> int:
    """About how many journal bytes the sinks have still to take (file sizes only: no read)."""
    total = 0
    for sink in sinks:
        cursors = store.cursors(sink.name)
        for run in journal.runs():
            cursor = cursors.get(run, Cursor())
            if not cursor.done:
                total += journal.bytes_after(run, cursor.position)
    return total


def _left_undelivered(worker: SinkWorker, supervisor: Supervisor) -> list[str]:
    name = worker.sink.name
    problems = []
    if worker.name in supervisor.crashed:
        error = supervisor.crashed[worker.name]
        problems.append(f"{name}: delivery crashed ({type(error).__name__}: {error}); see the log above")
    if worker.outcome.unusable:
        problems.append(f"{name}: cannot deliver: {worker.outcome.unusable}")
    if worker.outcome.gave_up:
        problems.append(f"{name}: unreachable, gave up: {worker.outcome.gave_up}")
    if worker.outcome.state:
        problems.append(f"{name}: gave up: {worker.outcome.state}")
    for run, reason in worker.outcome.stopped_runs.items():
        problems.append(f"{name}: run {run} stopped: {reason}")
    held = len(worker.letters)
    if held:
        problems.append(f"{name}: {held} event(s) in the dead-letter queue (see runrelay dlq list)")
    return problems


# --- status ---------------------------------------------------------------------------------


def collect_status(config: Config) -> dict:
    """Per sink: the configured ones, and the others this state has delivered to."""
    journal = open_journal(config)
    store = StateStore.open_readonly(config.state)
    known = store.known_sinks() if store else {}
    configured = {sink.name: backend(sink.url).identity(sink.url) for sink in config.sinks}
    shown = configured if config.sinks_given or not known else known
    sinks: list[SinkStatus] = []
    for name, identity in shown.items():
        letters = DeadLetters.existing(config.state, name)
        status = sink_status(journal, name, store.cursors(name) if store else {},
                             store.health(name) if store else Health(), len(letters) if letters else 0)
        status.identity = identity
        status.configured = name in configured
        sinks.append(status)
        if letters:
            letters.close()
    verdicts = _death_watch(config, journal, store).survey()
    if store:
        store.close()
    return {
        "journal": str(journal.root),
        "state": str(config.state),
        "daemon_pid": DeliveryLock(config.state).holder(),
        "sinks": [status.as_json() for status in sinks],
        "runs": [{"run": verdict.run, "condition": verdict.condition, "reason": verdict.reason}
                 for verdict in verdicts],
    }


# --- dead letters ---------------------------------------------------------------------------


def _letter_sinks(config: Config) -> list[str]:
    """The sinks whose dead letters a command looks at: those given (``--sink``, the config
    file), else every one the state knows and the default."""
    if config.sinks_given:
        return config.sink_names
    store = StateStore.open_readonly(config.state)
    names = list(dict.fromkeys([*(store.known_sinks() if store else {}), *config.sink_names]))
    if store:
        store.close()
    return names


def list_letters(config: Config) -> list[Letter]:
    letters: list[Letter] = []
    for name in _letter_sinks(config):
        queue = DeadLetters.existing(config.state, name)
        if queue:
            letters += queue.letters()
            queue.close()
    return letters


def choose_letters(config: Config, ids: list[int] | None) -> dict[str, list[Letter]]:
    """The letters named by id (or all, when ``ids`` is None), per sink; unknown ids are a UserError."""
    chosen: dict[str, list[Letter]] = {}
    found: dict[int, list[str]] = {}
    for letter in list_letters(config):
        if ids is None or letter.id in ids:
            chosen.setdefault(letter.sink, []).append(letter)
            found.setdefault(letter.id, []).append(letter.sink)
    for letter_id in ids or []:
        if letter_id not in found:
            raise UserError(f"no dead letter {letter_id} (see runrelay dlq list)")
        if len(found[letter_id]) > 1:
            raise UserError(f"dead letter {letter_id} exists for several sinks; add --sink with one of: "
                            f"{', '.join(found[letter_id])}")
    return chosen


@dataclass
class RedriveReport:
    delivered: int = 0
    problems: list[str] = field(default_factory=list)


def retry_letters(config: Config, chosen: dict[str, list[Letter]]) -> RedriveReport:
    """Re-drive the chosen letters: ask for it in the state; a running daemon's workers do
    it between batches, else this process does, with the same worker code."""
    unconfigured = [name for name in chosen if name not in config.sink_names]
    if unconfigured:
        raise UserError(f"sink(s) {', '.join(unconfigured)} not configured here: give them with --sink or "
                        "the config file, so their letters can be re-driven")
    try:
        store = StateStore.open(config.state)
    except StateUnavailable as error:
        raise UserError(f"{error} (state {config.state}): free space on its disk") from None
    try:
        for name, letters in chosen.items():
            store.request_redrive(name, [letter.id for letter in letters])
        lock = DeliveryLock(config.state)
        if _acquired(lock, config):
            try:
                sinks = [sink for sink in config.sinks if sink.name in chosen]
                journal = Journal(config.journal)
                report = _run_one_shot(config, journal, store, False, sinks, until_us=micros_now(),
                                       redrive_only=True)
            finally:
                lock.release()
        else:
            report = SyncReport()
        return _redrive_outcome(config, store, chosen, report)
    finally:
        store.close()


def _redrive_outcome(config: Config, store: StateStore, chosen: dict[str, list[Letter]],
                     report: SyncReport) -> RedriveReport:
    """Wait (up to retry.give_up_seconds) until the letters asked for are re-driven, then
    count what became of them."""
    deadline = time.monotonic() + config.retry.give_up_seconds + config.delivery.rescan_seconds
    while any(store.redrive_requests(name) & {letter.id for letter in letters} for name, letters in chosen.items()):
        if time.monotonic() > deadline:
            report.problems.append("the daemon has not re-driven them yet; see runrelay dlq list later")
            break
        time.sleep(REDRIVE_POLL_SECONDS)
    outcome = RedriveReport(problems=[problem for problem in report.problems if "dead-letter queue" not in problem])
    for name, letters in chosen.items():
        queue = DeadLetters.existing(config.state, name)
        held = {letter.id for letter in queue.letters()} if queue else set()
        if queue:
            queue.close()
        outcome.delivered += sum(1 for letter in letters if letter.id not in held)
        refused = sum(1 for letter in letters if letter.id in held)
        if refused:
            outcome.problems.append(f"{name}: {refused} letter(s) refused again (see runrelay dlq list)")
    return outcome


def drop_letters(config: Config, chosen: dict[str, list[Letter]]) -> int:
    dropped = 0
    for name, picked in chosen.items():
        queue = DeadLetters(config.state, name)
        for letter in picked:
            queue.drop(letter)
            dropped += 1
        queue.close()
    return dropped

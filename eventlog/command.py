"""``runrelay exec``: any command as a run (docs/exec.md).

The wrapper is the run's one writer: it journals ``started`` (its own process, for the
dead-run verdict), tees the command's stdout and stderr to the terminal unchanged and
journals them in heartbeats, reads the line protocol (``lineproto``) from the command and
journals what it says, and journals the ending the exit status gives. The experiment comes
first: when the journal cannot be written the command still runs, and its exit status still
comes back.
"""

from __future__ import annotations

import codecs
import collections
import glob
import json
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runrelay.eventlog import lineproto
from runrelay.eventlog.errors import JournalWriteError
from runrelay.eventlog.events import Kind
from runrelay.eventlog.fsutil import write_all
from runrelay.eventlog.recorder import host_info, process_info, utc_now
from runrelay.eventlog.writer import JournalWriter

DEFAULT_HEARTBEAT_SECONDS = 10.0
DEFAULT_KILL_AFTER_SECONDS = 10.0
DRAIN_SECONDS = 1.0  # after the command exits: how long what it left running may still write
TRACE_LINES = 50  # stderr's tail kept as a failed run's trace
MAX_BEAT_OUTPUT = 1024 * 1024  # more pending output than this is journaled at once
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # passed on to the command
EXIT_SIGNALLED = 128
EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND = 126, 127  # as a shell reports them
_READ = 64 * 1024


@dataclass(frozen=True)
class ExecOptions:
    """What ``runrelay exec`` was asked to run, and how."""

    command: list[str]
    journal_dir: Path
    config: dict = field(default_factory=dict)
    name: str | None = None
    artifacts: tuple[str, ...] = ()
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    kill_after_seconds: float = DEFAULT_KILL_AFTER_SECONDS


def warn(message: str) -> None:
    print(f"runrelay exec: {message}", file=sys.stderr, flush=True)


class RunJournal:
    """The run's writer behind calls that never raise: the first failure is said on stderr
    and the run goes on unrecorded (the experiment comes first)."""

    def __init__(self, writer: JournalWriter | None):
        self._writer = writer

    @classmethod
    def start(cls, options: ExecOptions) -> "RunJournal":
        try:
            writer = JournalWriter.create(options.journal_dir)
        except Exception as error:  # noqa: BLE001 - any failure to journal leaves the command to run
            warn(f"cannot journal this run ({error}); running the command unrecorded")
            return cls(None)
        journal = cls(writer)
        journal.append(Kind.STARTED, _started_body(options))
        return journal

    @property
    def run(self) -> str | None:
        return None if self._writer is None else self._writer.run

    def append(self, kind: Kind, body: dict) -> None:
        self._call(self._writer and self._writer.append, kind, body)

    def append_metric(self, name: str, step: int, value: int | float) -> None:
        self._call(self._writer and self._writer.append_metric, name, step, value, utc_now())

    def add_file(self, kind: Kind, path: str, name: str) -> None:
        """Copy the file into the run now; one that cannot be read is said and skipped."""
        if self._writer is None:
            return
        try:
            stored = self._writer.store_file(path)
        except JournalWriteError as error:  # a full disk shows again at the next append
            warn(f"{kind.value} not kept: {error}")
            return
        body = {"filename": path, **stored}
        if kind is Kind.ARTIFACT:
            body = {"name": name, **body, "metadata": None, "content_type": None}
        self.append(kind, body)

    def close(self) -> None:
        self._call(self._writer and self._writer.close)
        self._writer = None

    def _call(self, method: Callable | None, *args) -> Any:
        if method is None:
            return None
        try:
            return method(*args)
        except Exception as error:  # noqa: BLE001 - see the class
            warn(f"journal write failed ({error}); the rest of this run is not recorded")
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already said
                pass
            return None


def _started_body(options: ExecOptions) -> dict:
    cwd = os.getcwd()
    program = options.command[0]
    return {
        "ex_info": {"name": options.name or os.path.basename(program), "base_dir": cwd, "sources": [],
                    "dependencies": [], "repositories": [], "mainfile": program},
        "command": os.path.basename(program),
        "host_info": host_info(),
        "start_time": utc_now(),
        "config": options.config,
        "meta_info": {"argv": list(options.command)},
        "sources": [],
        "process": process_info(),
    }


class _Output:
    """One of the command's output streams: teed to ours byte for byte, decoded for the run."""

    def __init__(self, terminal_fd: int, on_text: Callable[[str], None]):
        self._terminal_fd = terminal_fd
        self._on_text = on_text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> None:
        try:
            write_all(self._terminal_fd, data)
        except OSError:
            pass  # our own output is gone; the run still records it
        self._on_text(self._decoder.decode(data, final=not data))


class _Protocol:
    """The command's protocol lines, each journaled as it arrives; a bad line is said on stderr."""

    def __init__(self, sock: socket.socket, journal: RunJournal, run_state: "_RunState"):
        self._sock = sock
        self._journal = journal
        self._state = run_state
        self._buffer = b""
        self._skipping = False  # inside a line longer than the limit
        self._steps: dict[str, int] = {}
        self._line_number = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data if data else b"\n" * bool(self._buffer)  # at the end, a last line without newline
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line_number += 1
            if self._skipping:
                self._skipping = False
            elif len(line) > lineproto.MAX_LINE_BYTES:
                self._bad(f"longer than {lineproto.MAX_LINE_BYTES} bytes", line)
            else:
                self._handle(line)
        if len(self._buffer) > lineproto.MAX_LINE_BYTES and not self._skipping:  # counted when its newline comes
            self._bad(f"longer than {lineproto.MAX_LINE_BYTES} bytes", self._buffer, self._line_number + 1)
            self._skipping = True
        if self._skipping:
            self._buffer = b""

    def _handle(self, line: bytes) -> None:
        try:
            message = lineproto.parse_line(line)
        except lineproto.ProtocolError as error:
            self._bad(str(error), line)
            return
        if isinstance(message, lineproto.Metric):
            step = self._steps.get(message.name, -1) + 1 if message.step is None else message.step
            self._steps[message.name] = step
            self._journal.append_metric(message.name, step, message.value)
        elif isinstance(message, lineproto.File):
            self._add_file(message)
        elif isinstance(message, lineproto.Info):
            self._state.info[message.key] = message.value
        elif isinstance(message, lineproto.Result):
            self._state.result = message.value
        elif isinstance(message, lineproto.Sync):
            self._reply(f"ok {message.token}\n".encode())

    def _add_file(self, message: lineproto.File) -> None:
        path = os.path.abspath(message.path)
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            self._bad(f"{message.kind.value} {path}: {error.strerror}", None)
            return
        if not stat.S_ISREG(mode):  # a FIFO or a device would hang the copy
            self._bad(f"{message.kind.value} {path} is not a regular file", None)
            return
        self._journal.add_file(message.kind, path, message.name or os.path.basename(path))

    def _reply(self, data: bytes) -> None:
        try:
            self._sock.send(data, socket.MSG_DONTWAIT)
        except OSError as error:  # a command that never reads its replies must not block us
            warn(f"protocol: could not answer sync ({error})")

    def _bad(self, reason: str, line: bytes | None, number: int | None = None) -> None:
        shown = "" if line is None else f": {line[:80]!r}"
        warn(f"protocol line {number or self._line_number} skipped: {reason}{shown}")


@dataclass
class _RunState:
    """What heartbeats carry, and the tail of stderr for a failed run's trace."""

    info: dict = field(default_factory=dict)
    result: Any = None
    pending_out: str = ""
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TRACE_LINES))
    stderr_partial: str = ""

    def add_out(self, text: str) -> None:
        self.pending_out += text

    def add_err(self, text: str) -> None:
        self.pending_out += text
        *lines, self.stderr_partial = (self.stderr_partial + text).split("\n")
        self.stderr_tail.extend(line + "\n" for line in lines)

    def trace(self) -> list[str]:
        return [*self.stderr_tail, *([self.stderr_partial + "\n"] if self.stderr_partial else [])]


class _Stop:
    """Stop requests to the wrapper, passed on to the command; SIGKILL when it overstays."""

    def __init__(self, kill_after_seconds: float):
        self._child: subprocess.Popen | None = None
        self._kill_after = kill_after_seconds
        self.signal: signal.Signals | None = None
        self.deadline: float | None = None
        self._passed_on = False

    def attach(self, child: subprocess.Popen) -> None:
        """The command to stop; a request that came before it started is passed on now."""
        self._child = child
        if self.signal is not None and not self._passed_on:
            self._send(self.signal)

    def request(self, signum: int, _frame=None) -> None:
        if self.signal is not None:  # a second request: stop now
            self.kill()
            return
        self.signal = signal.Signals(signum)
        self.deadline = time.monotonic() + self._kill_after
        if not (self.signal is signal.SIGINT and _terminal_sent_it()):
            self._passed_on = self._send(self.signal)

    def kill(self) -> None:
        self.deadline = None
        self._send(signal.SIGKILL)

    def kill_if_overstayed(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            warn(f"the command outlived {self.signal.name} by {self._kill_after:g} s; sending SIGKILL")
            self.kill()

    def _send(self, signum: int) -> bool:
        """Whether the signal went to the command (it may not have started yet)."""
        if self._child is None:
            return False
        try:
            self._child.send_signal(signum)
        except ProcessLookupError:
            pass
        return True


def _terminal_sent_it() -> bool:
    """Whether we are in the terminal's foreground process group: then Ctrl-C reached the
    command (in our group) as well, and passing SIGINT on would interrupt it twice."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def run_command(options: ExecOptions) -> int:
    """Run the command as a run; returns its exit status (128 + N when signal N ended it)."""
    journal = RunJournal.start(options)
    state = _RunState()
    ours, theirs = socket.socketpair()
    env = {**os.environ, lineproto.ENV_FD: str(theirs.fileno())}
    env.pop(lineproto.ENV_RUN, None)
    if journal.run:
        env[lineproto.ENV_RUN] = journal.run
    stop = _Stop(options.kill_after_seconds)
    try:
        with _signals_to(stop) as wakeup:  # before the spawn: a stop request is never missed
            try:
                child = subprocess.Popen(options.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         pass_fds=(theirs.fileno(),), env=env)
            except OSError as error:
                return _could_not_run(options.command[0], error, journal)
            finally:
                theirs.close()
            with child.stdout, child.stderr:
                stop.attach(child)
                _supervise(child, stop, ours, wakeup, journal, state, options.heartbeat_seconds)
        _collect_artifacts(options.artifacts, journal)
        _beat(journal, state)
        journal.append(*_ending(child.returncode, stop.signal, state))
    finally:
        ours.close()
        journal.close()
    code = child.returncode
    return EXIT_SIGNALLED - code if code < 0 else code


def _could_not_run(program: str, error: OSError, journal: RunJournal) -> int:
    message = f"cannot run {program!r}: {error.strerror}"
    warn(message)
    journal.append(Kind.FAILED, {"fail_time": utc_now(), "fail_trace": [message + "\n"]})
    return EXIT_NOT_FOUND if isinstance(error, FileNotFoundError) else EXIT_CANNOT_EXECUTE


class _signals_to:
    """While the command runs: the stop signals go to ``stop``, and wake the loop."""

    def __init__(self, stop: _Stop):
        self._stop = stop

    def __enter__(self) -> socket.socket:
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._previous = {signum: signal.signal(signum, self._stop.request) for signum in STOP_SIGNALS}
        return self._read

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._read.close()
        self._write.close()


def _supervise(child: subprocess.Popen, stop: _Stop, protocol_sock: socket.socket, wakeup: socket.socket,
               journal: RunJournal, state: _RunState, heartbeat_seconds: float) -> None:
    """Tee, journal and beat until the command has exited and its streams are drained."""
    selector = selectors.DefaultSelector()
    readers = {
        child.stdout.fileno(): _Output(sys.stdout.fileno(), state.add_out).feed,
        child.stderr.fileno(): _Output(sys.stderr.fileno(), state.add_err).feed,
        protocol_sock.fileno(): _Protocol(protocol_sock, journal, state).feed,
    }
    for fd in readers:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(child.pid)
    selector.register(pidfd, selectors.EVENT_READ)
    selector.register(wakeup, selectors.EVENT_READ)
    next_beat = time.monotonic() + heartbeat_seconds
    drain_until = None
    try:
        while drain_until is None or (readers and time.monotonic() < drain_until):
            deadlines = [next_beat, stop.deadline or next_beat, drain_until or next_beat]
            for key, _events in selector.select(max(0.0, min(deadlines) - time.monotonic())):
                if key.fd == pidfd:
                    child.wait()
                    selector.unregister(pidfd)
                    stop.deadline = None
                    drain_until = time.monotonic() + DRAIN_SECONDS
                elif key.fileobj is wakeup:
                    wakeup.recv(_READ)
                else:
                    _read_into(key.fd, readers, selector)
            now = time.monotonic()
            stop.kill_if_overstayed(now)
            if now >= next_beat or len(state.pending_out) > MAX_BEAT_OUTPUT:
                _beat(journal, state)
                next_beat = now + heartbeat_seconds
    finally:
        selector.close()
        os.close(pidfd)


def _read_into(fd: int, readers: dict, selector: selectors.BaseSelector) -> None:
    try:
        data = os.read(fd, _READ)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    readers[fd](data)
    if not data:
        selector.unregister(fd)
        del readers[fd]


def _beat(journal: RunJournal, state: _RunState) -> None:
    out, state.pending_out = state.pending_out, ""
    journal.append(Kind.HEARTBEAT, {"beat_time": utc_now(), "info": state.info, "result": state.result,
                                    "captured_out_append": out})


def _collect_artifacts(patterns: tuple[str, ...], journal: RunJournal) -> None:
    for pattern in patterns:
        matches = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        if not matches:
            warn(f"--artifact {pattern!r} matched no file")
        for path in matches:
            journal.add_file(Kind.ARTIFACT, os.path.abspath(path), os.path.basename(path))


def _ending(code: int, stop_signal: signal.Signals | None, state: _RunState) -> tuple[Kind, dict]:
    """The run's ending from the command's exit: 0 completed; a stop request (ours, or one
    of the stop signals sent to the command) interrupted; anything else failed."""
    now = utc_now()
    if code == 0:
        return Kind.COMPLETED, {"stop_time": now, "result": state.result}
    if code < 0:
        killer = signal.Signals(-code)
        if stop_signal is not None or killer in STOP_SIGNALS:
            requested = stop_signal or killer
            status = "INTERRUPTED" if requested is signal.SIGINT else requested.name
            return Kind.INTERRUPTED, {"interrupt_time": now, "status": status}
        last = f"killed by signal {killer.name} ({-code})\n"
    else:
        last = f"exited with status {code}\n"
    return Kind.FAILED, {"fail_time": now, "fail_trace": [*state.trace(), last]}



class ConfigProblem(ValueError):
    """A ``--config`` assignment or config file that cannot be used."""


def build_config(files: list[Path], assignments: list[str]) -> dict:
    """The run's config: the files in order (JSON, or TOML by a ``.toml`` suffix), then each
    ``KEY=VALUE`` (a dotted KEY nests; VALUE is JSON when it parses as JSON, else a string)."""
    config: dict = {}
    for path in files:
        for key, value in _read_config_file(path).items():
            _assign(config, [key], value, str(path))
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        if not equals or not key or "" in key.split("."):
            raise ConfigProblem(f"--config {assignment!r}: expected KEY=VALUE (KEY may be dotted: model.layers=3)")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = text
        _assign(config, key.split("."), value, f"--config {assignment!r}")
    return config


def _read_config_file(path: Path) -> dict:
    try:
        data = path.read_bytes()
        loaded = tomllib.loads(data.decode()) if path.suffix == ".toml" else json.loads(data)
    except OSError as error:
        raise ConfigProblem(f"--config-file {path}: {error.strerror}") from None
    except (ValueError, RecursionError) as error:  # JSON, TOML and UTF-8 errors are ValueErrors
        raise ConfigProblem(f"--config-file {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: "
                            f"{error}") from None
    if not isinstance(loaded, dict):
        raise ConfigProblem(f"--config-file {path}: holds a {type(loaded).__name__}, not an object of settings")
    return loaded


def _assign(config: dict, keys: list[str], value: Any, where: str) -> None:
    """Set ``config[k1][k2]…`` to ``value``, merging into dicts already there."""
    for depth, key in enumerate(keys[:-1]):
        inner = config.setdefault(key, {})
        if not isinstance(inner, dict):
            raise ConfigProblem(f"{where}: {'.'.join(keys[: depth + 1])} is already a value, not a group")
        config = inner
    if isinstance(value, dict) and isinstance(config.get(keys[-1]), dict):
        for key, inner in value.items():
            _assign(config[keys[-1]], [key], inner, where)
    else:
        config[keys[-1]] = value

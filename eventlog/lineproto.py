"""The line protocol of ``runrelay exec`` (docs/exec.md): what a command writes on the file
descriptor named by ``$RUNRELAY_FD``, and the Recorder's side of it.

One message per line, its words split as a POSIX shell splits them (quote a word that holds
spaces)::

    metric NAME VALUE [STEP]
    artifact PATH [NAME]
    resource PATH
    info KEY JSON
    result JSON
    sync TOKEN        # answered with "ok TOKEN" once every line before it is journaled

Every line is untrusted input: ``parse_line`` raises ``ProtocolError`` with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import threading
from dataclasses import dataclass
from typing import Any

from runrelay.eventlog.events import Kind

ENV_FD = "RUNRELAY_FD"
ENV_RUN = "RUNRELAY_RUN"
MAX_LINE_BYTES = 1024 * 1024
MAX_WORD_CHARS = 1000  # names, keys, tokens
SYNC_TIMEOUT_SECONDS = 300.0  # an artifact the wrapper copies may be large
_INT = re.compile(r"[+-]?[0-9]+")
_INT64 = range(-(2**63), 2**63)

log = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """A line that is not a message; the wrapper reports it and skips it."""


@dataclass(frozen=True)
class Metric:
    name: str
    value: int | float
    step: int | None


@dataclass(frozen=True)
class File:
    kind: Kind  # ARTIFACT or RESOURCE
    path: str
    name: str | None


@dataclass(frozen=True)
class Info:
    key: str
    value: Any


@dataclass(frozen=True)
class Result:
    value: Any


@dataclass(frozen=True)
class Sync:
    token: str


Message = Metric | File | Info | Result | Sync


def parse_line(line: bytes) -> Message | None:
    """The message on one line (without its newline); None for a blank line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    words = split_words(text) if _QUOTING.search(text) else text.split()
    if not words:
        return None
    verb, args = words[0], words[1:]
    parse = _PARSERS.get(verb)
    if parse is None:
        raise ProtocolError(f"unknown message {verb[:40]!r} (known: {', '.join(_PARSERS)})")
    low, high = _ARITY[verb]
    if not low <= len(args) <= high:
        wanted = str(low) if low == high else f"{low} to {high}"
        raise ProtocolError(f"{verb} takes {wanted} word(s), got {len(args)}")
    return parse(*args)


def split_words(text: str) -> list[str]:
    """The words of a line as a POSIX shell splits them (quotes and backslashes; no
    expansions), in linear time: ``shlex.split`` takes a minute on a 1 MiB line."""
    words, position = [], 0
    while True:
        position = _SPACE.match(text, position).end()
        if position == len(text):
            return words
        word = _WORD.match(text, position)
        if word is None or (word.end() < len(text) and not text[word.end()].isspace()):
            raise ProtocolError(f"cannot split into words: an unclosed quote or a lone backslash at {position}")
        words.append("".join(_unquoted(part) for part in _PART.findall(word.group())))
        position = word.end()


def _unquoted(part: str) -> str:
    if part[0] == "'":
        return part[1:-1]
    if part[0] == '"':
        return _DOUBLE_ESCAPE.sub(r"\1", part[1:-1])
    return part[1] if part[0] == "\\" else part


# possessive quantifiers: no backtracking, so a bad line fails in linear time too
_PART_PATTERN = r"""[^\s'"\\]++|'[^']*+'|"(?:[^"\\]++|\\.)*+"|\\."""
_PART = re.compile(_PART_PATTERN, re.DOTALL)
_WORD = re.compile(f"(?:{_PART_PATTERN})++", re.DOTALL)
_SPACE = re.compile(r"\s*")
_QUOTING = re.compile(r"""['"\\]""")
_DOUBLE_ESCAPE = re.compile(r'\\([$`"\\\n])')


def _metric(name: str, value: str, step: str | None = None) -> Metric:
    return Metric(_word(name, "metric name"), _number(value), None if step is None else _step(step))


def _file(kind: Kind):
    def parse(path: str, name: str | None = None) -> File:
        if not path or "\0" in path:
            raise ProtocolError(f"{kind.value} path is empty or holds a NUL")
        if name is not None:
            _word(name, f"{kind.value} name")
            if "/" in name or name in (".", ".."):
                raise ProtocolError(f"{kind.value} name {name!r} is not a plain file name")
        return File(kind, path, name)

    return parse


def _info(key: str, value: str) -> Info:
    return Info(_word(key, "info key"), _json(value))


def _result(value: str) -> Result:
    return Result(_json(value))


def _sync(token: str) -> Sync:
    return Sync(_word(token, "sync token"))


_PARSERS = {"metric": _metric, "artifact": _file(Kind.ARTIFACT), "resource": _file(Kind.RESOURCE),
            "info": _info, "result": _result, "sync": _sync}
_ARITY = {"metric": (2, 3), "artifact": (1, 2), "resource": (1, 1), "info": (2, 2), "result": (1, 1), "sync": (1, 1)}


def _word(word: str, what: str) -> str:
    if not word or len(word) > MAX_WORD_CHARS or not word.isprintable():
        raise ProtocolError(f"{what} must be 1 to {MAX_WORD_CHARS} printable characters")
    return word


def _number(word: str) -> int | float:
    try:
        if _INT.fullmatch(word) and len(word) <= 20 and int(word) in _INT64:
            return int(word)
        return float(word)  # an integer beyond 64 bits too: a metric is a measurement
    except ValueError:
        raise ProtocolError(f"metric value {word[:40]!r} is not a number") from None


def _step(word: str) -> int:
    if not _INT.fullmatch(word) or len(word) > 20 or int(word) not in _INT64:
        raise ProtocolError(f"metric step {word[:40]!r} is not a 64-bit integer")
    return int(word)


def _json(word: str) -> Any:
    try:
        return json.loads(word)
    except (ValueError, RecursionError) as error:
        raise ProtocolError(f"not JSON ({error}); quote a string as JSON, e.g. '\"text\"'") from None


def format_line(*words: str) -> bytes:
    """One message as the wrapper reads it."""
    return (" ".join(shlex.quote(word) for word in words) + "\n").encode("utf-8", "backslashreplace")


def _to_json(value: Any) -> str:
    return json.dumps(value, default=_plain)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # a NumPy scalar
    return item() if callable(item) else repr(value)


class WrapperLink:
    """The journal writer's stand-in for a Recorder inside a command run by ``runrelay exec``:
    the wrapper is the run's one writer, so the Recorder's events travel to it as protocol
    lines. A wrapper that is gone never fails the experiment: the link warns once and goes
    quiet."""

    def __init__(self, sock: socket.socket, run: str):
        self.run = run
        self._sock = sock
        self._mutex = threading.Lock()
        self._sent: dict[str, str] = {}  # what each info key (and the result) was last sent as
        self._syncs = 0
        self._broken = False

    @classmethod
    def from_environment(cls) -> "WrapperLink | None":
        """The link when this process runs under ``runrelay exec``, else None."""
        fd = os.environ.get(ENV_FD)
        if fd is None:
            return None
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except (ValueError, OSError) as error:
            log.warning("$%s=%r is not runrelay exec's socket (%s): recording to the journal instead", ENV_FD, fd, error)
            return None
        return cls(sock, os.environ.get(ENV_RUN, ""))

    def append(self, kind: Kind, body: dict) -> None:
        if kind is Kind.STARTED and body.get("config"):
            self._send_changed("recorder_config", format_line("info", "recorder_config", _to_json(body["config"])))
        elif kind is Kind.HEARTBEAT:
            for key, value in body["info"].items():
                self._send_changed(f"info {key}", format_line("info", str(key), _to_json(value)))
            self._send_changed("result", format_line("result", _to_json(body["result"])))
        elif kind is Kind.COMPLETED:
            self._send_changed("result", format_line("result", _to_json(body["result"])))
            self._sync()
        elif kind in (Kind.ARTIFACT, Kind.RESOURCE):
            name = (body["name"],) if kind is Kind.ARTIFACT else ()
            self._send(format_line(kind.value, body["filename"], *name))
            self._sync()  # the wrapper has copied the file when this returns
        # failed, interrupted: the command's exit status decides the run's ending

    def append_metric(self, name: str, step: int, value: Any, timestamp: Any = None) -> None:
        self._send(format_line("metric", name, repr(value) if isinstance(value, float) else str(value), str(step)))

    def store_file(self, path: str) -> dict:
        return {}  # the wrapper copies the file when it reads the artifact line

    def close(self) -> None:
        with self._mutex:
            self._broken = True
            self._sock.close()

    abandon = close

    def _send_changed(self, key: str, line: bytes) -> None:
        if self._sent.get(key) != line:
            self._send(line)
            self._sent[key] = line

    def _send(self, line: bytes) -> None:
        with self._mutex:
            if not self._broken:
                try:
                    self._sock.sendall(line)
                except OSError as error:
                    self._lost(error)

    def _sync(self) -> None:
        with self._mutex:
            if self._broken:
                return
            self._syncs += 1
            expected = f"ok {self._syncs}\n".encode()
            try:
                self._sock.sendall(format_line("sync", str(self._syncs)))
                self._sock.settimeout(SYNC_TIMEOUT_SECONDS)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = self._sock.recv(len(expected) - len(reply))
                    if not chunk:
                        raise ConnectionError("the wrapper closed the socket")
                    reply += chunk
                if reply != expected:
                    raise ConnectionError(f"unexpected reply {reply!r}")
            except OSError as error:
                self._lost(error)
            finally:
                if not self._broken:
                    self._sock.settimeout(None)

    def _lost(self, error: OSError) -> None:
        self._broken = True
        log.warning("run %s: runrelay exec is gone (%s); nothing more is recorded", self.run, error)

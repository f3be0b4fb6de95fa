"""systemd's notify protocol (sd_notify(3)): one datagram per message, when NOTIFY_SOCKET is set."""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("runrelay.notify")


class Notifier:
    """Sends READY=1, STATUS=..., WATCHDOG=1, STOPPING=1 to systemd; silent when not under it."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address  # '@' = abstract socket
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        pid_matches = env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        # systemd asks for a ping at least every WATCHDOG_USEC; ping at twice that rate.
        self.watchdog_seconds = int(watchdog_usec) / 2e6 if watchdog_usec.isdigit() and pid_matches else None

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:  # as sd_notify(3): never fatal; systemd's own timeouts will tell
            log.warning("could not notify systemd at %s: %s", self.address.lstrip("\0"), error)

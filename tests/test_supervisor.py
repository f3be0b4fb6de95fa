"""The supervisor's health, which is what systemd's watchdog hears (WATCHDOG=1 only while
``healthy()``): loops that work or wait on purpose are healthy, a loop blocked in a call
or crashed is not, and a sink worker's crash leaves the essential loops running."""

from __future__ import annotations

import threading
import time

from runrelay.daemon.supervisor import Liveness, Supervisor

STUCK = 0.2
WAIT_SECONDS = 30.0  # a generous bound for what takes milliseconds; never asserted on


def eventually(check) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def test_a_loop_waiting_on_purpose_stays_healthy_and_a_blocked_one_does_not():
    supervisor = Supervisor()
    waiting, blocked = Liveness(), Liveness()
    release = threading.Event()

    def waits(stop):
        with waiting.idle():
            stop.wait()

    def blocks(stop):
        blocked.beat()
        release.wait()  # a call that hangs: no beat, not idle

    supervisor.add("waits", waits, liveness=waiting, stuck_seconds=STUCK)
    supervisor.add("blocks", blocks, essential=False, liveness=blocked, stuck_seconds=STUCK)
    supervisor.start()
    try:
        assert supervisor.healthy()
        assert eventually(lambda: not supervisor.healthy())
        time.sleep(STUCK * 2)
        assert waiting.progressing(STUCK)  # the waiting loop is never the one to blame
        release.set()
        blocked.beat()
    finally:
        supervisor.stop(WAIT_SECONDS)


def test_a_crashed_sink_worker_is_unhealthy_but_not_the_end():
    supervisor = Supervisor()

    def crashes(stop):
        raise AttributeError("a bug in a sink")

    supervisor.add("discovery", lambda stop: stop.wait())
    supervisor.add("sink broken", crashes, essential=False)
    supervisor.start()
    try:
        assert eventually(lambda: "sink broken" in supervisor.crashed)
        assert isinstance(supervisor.crashed["sink broken"], AttributeError)
        assert not supervisor.healthy() and not supervisor.essential_ended
    finally:
        assert supervisor.stop(WAIT_SECONDS)

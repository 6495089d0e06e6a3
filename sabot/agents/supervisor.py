"""``sabot worker --agents N``: N worker processes of one app, restarted when they die.

Each child runs ``python -m sabot worker -A APP`` without ``--agents``, so
each is an ordinary worker and one member of the app's consumer group;
Kafka spreads the partitions over them. The supervisor itself does no
stream work::

    supervisor ──> worker 0 ──┐
               ──> worker 1 ──┼── consumer group of the app
               ──> ...      ──┘

A child that exits on its own is restarted after a back-off that doubles
with each quick failure (0.5 s, 1 s, 2 s, ... up to 30 s) and resets once a
child has run for a minute. Exit status 2 means the app could not be
loaded, which a restart cannot fix, so the supervisor stops the others and
exits 2. SIGTERM or SIGINT sends SIGTERM to every child, waits for them to
commit and leave the group, and exits 0.

Children run in their own process group, so Ctrl-C in a terminal reaches
only the supervisor, which stops them once. On Linux each child also gets
SIGTERM from the kernel if the supervisor dies.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from sabot.agents import parent_death

logger = logging.getLogger(__name__)

#: Exit status of ``sabot worker`` when the app cannot be loaded.
APP_LOAD_FAILED = 2
#: First restart delay in seconds; it doubles with each quick failure.
RESTART_BACKOFF_MIN = 0.5
#: Maximum restart delay, seconds.
RESTART_BACKOFF_MAX = 30.0
#: Seconds a child must run before its restart delay goes back to the minimum.
STABLE_AFTER = 60.0
#: Seconds to wait for children after SIGTERM before SIGKILL. A worker may
#: take its stop_timeout setting (30 s by default) to finish a batch.
STOP_TIMEOUT = 45.0


@dataclass(eq=False)
class Child:
    """One worker slot: its current process, if any, and its restart history."""

    index: int
    process: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    @property
    def name(self) -> str:
        pid = self.process.pid if self.process is not None else "-"
        return f"worker {self.index} (pid {pid})"


def describe_returncode(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def supervise_workers(app_path: str, broker: str | None, loglevel: str, agents: int) -> int:
    """Run ``agents`` worker processes of the app until SIGTERM/SIGINT; return the exit status."""
    return Supervisor(app_path, broker, loglevel, agents).run()


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one app."""

    def __init__(self, app_path: str, broker: str | None, loglevel: str, agents: int,
                 stop_timeout: float = STOP_TIMEOUT):
        self.app_path = app_path
        self.broker = broker
        self.loglevel = loglevel
        self.children = [Child(index) for index in range(agents)]
        self.stop_timeout = stop_timeout
        self.stop_signal: int | None = None
        self.exit_status: int | None = None
        # The signal handlers wake the loop through a pipe. A threading.Event
        # would deadlock: a handler that runs while the loop holds the
        # Event's lock inside wait() blocks on that same lock.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "sabot", "worker", "-A", self.app_path,
                   "--loglevel", self.loglevel]
        if self.broker:
            command += ["--broker", self.broker]
        return command

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child_exit)
        parent_death.prepare()
        logger.info("supervisor starting %d workers of -A %s: pid=%d", len(self.children),
                    self.app_path, os.getpid())
        try:
            for child in self.children:
                self._start(child)
            while self.stop_signal is None and self.exit_status is None:
                self._wait(self._next_timeout())
                self._check_children()
        finally:
            status = self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self._wake_read)
            os.close(self._wake_write)
        return status

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal handler wakes the loop or ``timeout`` seconds pass."""
        ready, _, _ = select.select([self._wake_read], [], [], timeout)
        if ready:
            try:
                while os.read(self._wake_read, 512):
                    pass
            except BlockingIOError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop wakes anyway

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is None:
            logger.info("received %s; stopping %d workers", name, len(self.children))
            self.stop_signal = signum
        else:
            logger.warning("received %s again; already stopping", name)
        self._wake()

    def _on_child_exit(self, signum: int, frame) -> None:
        self._wake()

    def _next_timeout(self) -> float:
        waits = [child.restart_at - time.monotonic() for child in self.children
                 if child.process is None and child.restart_at is not None]
        # A periodic check also covers a SIGCHLD that arrived before the wait began.
        return max(0.0, min([1.0, *waits]))

    def _start(self, child: Child) -> None:
        supervisor_pid = os.getpid()

        def setup() -> None:  # runs in the child between fork and exec
            os.setpgid(0, 0)
            parent_death.set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != supervisor_pid:
                os._exit(1)

        child.process = subprocess.Popen(self.command(), preexec_fn=setup,
                                         stdin=subprocess.DEVNULL)
        child.started = time.monotonic()
        child.restart_at = None
        logger.info("%s started", child.name)

    def _check_children(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if child.restart_at is not None and now >= child.restart_at \
                        and self.stop_signal is None:
                    self._start(child)
                continue
            returncode = child.process.poll()
            if returncode is None:
                continue
            name, child.process = child.name, None
            if returncode == APP_LOAD_FAILED:
                logger.error("%s exited with status 2: the app %s could not be loaded "
                             "(its error is above). Not restarting; stopping the other "
                             "workers", name, self.app_path)
                self.exit_status = APP_LOAD_FAILED
                return
            uptime = now - child.started
            if uptime >= STABLE_AFTER:
                child.failures = 0
            child.failures += 1
            delay = min(RESTART_BACKOFF_MAX,
                        RESTART_BACKOFF_MIN * 2 ** (child.failures - 1))
            child.restart_at = now + delay
            logger.error("%s %s after %.1f s; restarting it in %.1f s (failure %d in a row)",
                         name, describe_returncode(returncode), uptime, delay, child.failures)

    def _stop_all(self) -> int:
        running = [child for child in self.children if child.process is not None]
        for child in running:
            try:
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.stop_timeout
        clean = True
        for child in running:
            name = child.name
            try:
                returncode = child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("%s did not stop within %.0f s of SIGTERM; killing it",
                             name, self.stop_timeout)
                child.process.kill()
                returncode = child.process.wait()
            child.process = None
            if returncode != 0:
                clean = False
                logger.warning("%s %s while stopping", name, describe_returncode(returncode))
        if self.exit_status is not None:
            return self.exit_status
        logger.info("all %d workers stopped", len(self.children))
        return 0 if clean else 1

"""The fork server: a single-threaded process that forks agents on request.

The coordinator starts one fork server per pool. By default it forks
itself, so the fork server and its agents have every module the caller
has imported and an agent is ready in milliseconds. With the "spawn"
start method it runs ``python -m sabot.agents.forkserver FD`` instead: a
clean interpreter, about 0.15 s slower to start. Agents are forked from
the fork server, never from the caller, so a replacement agent does not
inherit threads, locks or sockets that the caller acquired after the
pool started::

    coordinator ──control socket──> fork server ──fork──> agent 0, agent 1, ...
         └────────── one socketpair per agent ──────────────┘

The fork server reports each agent's pid when forked and its wait status
when it exits. It stops its agents and exits when told to, or when the
coordinator closes the control socket (including when the coordinator
dies). On Linux, agents get SIGKILL from the kernel if the fork server dies.
"""

from __future__ import annotations

import asyncio
import gc
import os
import select
import signal
import socket
import stat
import sys
import time
import traceback

from sabot.agents import parent_death, protocol
from sabot.agents.agent import agent_main

#: Seconds the fork server waits after SIGTERM for agents to exit before SIGKILL.
DEFAULT_STOP_GRACE = 2.0


class ForkServer:
    """The loop of the fork server process."""

    def __init__(self, control: socket.socket):
        self.control = control
        self.control.setblocking(True)
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> agent index
        self.coordinator_gone = False
        self.wakeup_read = -1
        self.wakeup_write = -1

    def run(self) -> int:
        """Serve control messages until a STOP message or end of file; return the
        exit status."""
        try:
            return self._serve()
        finally:
            self.control.close()

    def _serve(self) -> int:
        parent_death.prepare()
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(self.wakeup_write, False)
        # The handler does nothing: the byte written to the wakeup fd is
        # what wakes select() below.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wakeup_write)
        while True:
            readable, _, _ = select.select([self.control, self.wakeup_read], [], [])
            if self.wakeup_read in readable:
                self._drain_wakeup()
                self.reap()
            if self.control not in readable:
                continue
            try:
                message = protocol.recv_control(self.control)
            except (OSError, EOFError):
                message = None
            if message is None:
                self.coordinator_gone = True
                self.stop(0.0)
                return 0
            kind = message[0]
            if kind == protocol.SPAWN:
                self.spawn(message[1])
            elif kind == protocol.STOP:
                self.stop(message[1])
                return 0
            elif kind == protocol.SET_SYS_PATH:
                sys.path[:] = message[1]

    def spawn(self, index: int) -> None:
        """Receive an agent's socket and fork the agent that serves it."""
        _, fds, _, _ = socket.recv_fds(self.control, 1, 1)
        if not fds:
            self.report((protocol.SPAWN_FAILED, index, "no socket arrived with the request"))
            return
        fd = fds[0]
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fd)
            self.report((protocol.SPAWN_FAILED, index, f"fork() failed: {exc}"))
            return
        if pid == 0:
            self.control.close()
            os.close(self.wakeup_read)
            os.close(self.wakeup_write)
            agent_main(fd, self.pid)
        os.close(fd)
        self.children[pid] = index
        self.report((protocol.SPAWNED, index, pid))

    def reap(self, report: bool = True) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            if report:
                self.report((protocol.EXITED, pid, status))

    def report(self, message: tuple) -> None:
        if self.coordinator_gone:
            return
        try:
            protocol.send_control(self.control, message)
        except OSError:
            self.coordinator_gone = True

    def stop(self, grace: float) -> None:
        """Send SIGTERM to every agent, then SIGKILL to those left after ``grace`` s."""
        for pid in list(self.children):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap(report=False)
            if self.children:
                time.sleep(0.001)
        for pid in list(self.children):
            _signal(pid, signal.SIGKILL)
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.children.pop(pid, None)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_read, 512):
                pass
        except BlockingIOError:
            pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def close_inherited_fds(keep: set[int]) -> None:
    """Close the sockets that a forked child should not keep open.

    A forked child has a copy of every descriptor of its parent. A copy of
    a socket keeps the connection open after the parent closes it (a peer
    waiting for end of file, or a client of a listening socket, would wait
    as long as the pool lives), so sockets are closed. Other descriptors
    stay open: native libraries keep pipes and event descriptors of their
    own (Arrow checks its signal pipe after a fork and aborts if it was
    closed), and inherited logging handlers keep their files.
    """
    # NOTE: a pipe the caller writes to a subprocess stays open here too, so
    # that subprocess reads end of file only once the pool has stopped as well.
    try:
        names = os.listdir("/dev/fd")
    except OSError:
        names = [str(fd) for fd in range(3, 1024)]
    for name in names:
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue  # closed already, or the descriptor of the listing itself
        if not stat.S_ISSOCK(mode):
            continue
        try:
            os.close(fd)
        except OSError:
            pass


def reset_inherited_state(control_fd: int) -> None:
    """Undo what a fork copied from the coordinator that the fork server must not use.

    Objects of the coordinator (its event loop, sockets, files) stay alive
    here but are never used. ``gc.freeze()`` keeps the collector from
    finalizing them, which could otherwise close a descriptor number that
    has since been reused, and it keeps their memory pages shared.
    """
    gc.freeze()
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if callable(handler):
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The fork happened inside the coordinator's running event loop, whose
    # epoll instance the child shares. Forget that loop, so that user code
    # in an agent starts a loop of its own instead of touching this one.
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop(None)
    close_inherited_fds({control_fd})


def run_forked(control_fd: int) -> None:
    """Run the fork server in a child just forked from the coordinator; never returns."""
    status = 1
    try:
        reset_inherited_state(control_fd)
        status = ForkServer(socket.socket(fileno=control_fd)).run()
    except BaseException:  # noqa: BLE001 - report, then leave without unwinding the fork
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(argv: list[str]) -> int:
    """Entry point of a spawned fork server: ``python -m sabot.agents.forkserver FD``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[1]))
    return ForkServer(control).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The coordinator's side of the pool of long-lived agent processes.

``AgentPool`` starts the fork server and N agents once, hands tasks to idle
agents in submission order, and replaces an agent that dies. Everything
here runs on one asyncio event loop. Each agent is served by at most one
``_run`` coroutine at a time, which sends one task and reads its result.

How a death is noticed: the agent's socket reaches end of file, and the
fork server reports the wait status, from which the error names the
signal. A task that was running on the dead agent fails with AgentError,
or goes back to the front of the queue once if it is retriable.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

import pyarrow as pa

from sabot.agents import protocol
from sabot.errors import AgentError, ConfigError

logger = logging.getLogger(__name__)

START_METHODS = ("fork", "spawn")

#: Seconds to wait for the fork server's exit report after an agent's socket closed.
EXIT_REPORT_TIMEOUT = 2.0
#: Seconds a new agent has to send READY before its start counts as failed.
AGENT_START_TIMEOUT = 30.0
#: Payloads up to this size are joined with their header into one send.
SMALL_PAYLOAD = 65_536

STARTING, IDLE, BUSY, DEAD = "starting", "idle", "busy", "dead"

_task_ids = itertools.count(1)


@dataclass(eq=False)
class Task:
    """One partition of one job: pickled steps, an IPC payload, and the result's future."""

    job_id: int
    partition: int
    steps: bytes
    payload: pa.Buffer
    retriable: bool
    future: asyncio.Future
    id: int = field(default_factory=lambda: next(_task_ids))
    attempts: int = 0


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised inside an agent."""

    def __str__(self) -> str:
        return "\n\n" + self.args[0] if self.args else ""


@dataclass(eq=False)
class AgentSlot:
    """One agent process: its index (kept by replacements), socket, pid and state."""

    index: int
    sock: socket.socket
    exit_status: asyncio.Future
    pid: int = 0
    generation: int = 0
    state: str = STARTING
    task: Task | None = None
    cancelled_task: bool = False

    @property
    def name(self) -> str:
        return f"agent {self.index} (pid {self.pid or '?'})"


def describe_wait_status(status: int | str | None) -> str:
    """Describe how a process ended, from ``os.waitpid``'s status: 'killed by signal SIGKILL'."""
    if status is None:
        return "ended with an unknown status"
    if isinstance(status, str):
        return status
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        text = f"was killed by signal {name}"
        if signum == signal.SIGKILL:
            text += " (sent by a user, or by the kernel's out-of-memory killer)"
        return text
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                      size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = await loop.sock_recv_into(sock, view[received:])
        if count == 0:
            raise EOFError(f"connection closed after {received} of {size} bytes")
        received += count
    return buffer


class AgentPool:
    """N agent processes forked by one fork server, with a FIFO queue of tasks."""

    def __init__(self, size: int, start_method: str = "fork"):
        if start_method not in START_METHODS:
            raise ConfigError(f"start_method must be one of {START_METHODS}, "
                              f"got {start_method!r}")
        if not hasattr(socket, "send_fds") or sys.platform == "win32":
            raise ConfigError("the agent pool needs a POSIX system that can pass file "
                              "descriptors over Unix sockets (Linux or macOS)")
        self.size = size
        self.start_method = start_method
        self.slots: list[AgentSlot | None] = [None] * size
        self._pending: collections.deque[Task] = collections.deque()
        self._idle: collections.deque[AgentSlot] = collections.deque()
        self._by_pid: dict[int, AgentSlot] = {}
        self._starting: dict[int, AgentSlot] = {}
        self._background: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: socket.socket | None = None
        self._server_pid = 0
        self._server_popen: subprocess.Popen | None = None
        self._server_gone: asyncio.Event | None = None
        self._reader: asyncio.Task | None = None
        self._stopping = False
        self._generation = 0
        self.replacements = 0

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the fork server and every agent; return when all are ready."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._start_server()
            agents = await asyncio.gather(*(self._spawn(i) for i in range(self.size)))
        except BaseException:
            self.kill()
            raise
        for slot in agents:
            self._add_ready(slot)
        logger.info("agent pool started: %d agents (pids %s), fork server pid %d, "
                    "start method %s", self.size, ",".join(map(str, self.pids)),
                    self._server_pid, self.start_method)

    async def _start_server(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            if self.start_method == "fork":
                # Imported before the fork so that agents inherit them.
                from sabot.agents import forkserver

                with warnings.catch_warnings():
                    # Python 3.12+ warns on fork() in a process with threads.
                    # The child only resets state and serves forks; see
                    # forkserver.reset_inherited_state(). start_method="spawn"
                    # avoids the fork entirely.
                    warnings.filterwarnings("ignore", category=DeprecationWarning,
                                            message=".*fork")
                    pid = os.fork()
                if pid == 0:
                    ours.close()
                    forkserver.run_forked(theirs.fileno())
                self._server_pid = pid
            else:
                self._server_popen = subprocess.Popen(
                    [sys.executable, "-m", "sabot.agents.forkserver", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
                self._server_pid = self._server_popen.pid
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self._server_gone = asyncio.Event()
        if self.start_method == "spawn":
            await self._send_control((protocol.SET_SYS_PATH, list(sys.path)))
        self._reader = self._loop.create_task(self._read_control(ours),
                                              name="sabot-pool-control")

    async def shutdown(self, grace: float = 2.0) -> None:
        """Stop every agent and the fork server, and fail the tasks left.

        Running and queued tasks fail with AgentError. If this coroutine is
        cancelled, or the fork server does not exit within ``grace`` + 1 s,
        the fork server is killed, and its agents die with it.
        """
        if self._stopping:
            return
        self._stopping = True
        self._fail_pending("the coordinator shut down before the job ran")
        for slot in self.slots:
            if slot is not None and slot.state == IDLE:
                slot.sock.close()  # an idle agent exits at end of file
        try:
            if self._control is not None and not self._server_gone.is_set():
                try:
                    await self._send_control((protocol.STOP, grace))
                except OSError:
                    pass
                try:
                    await asyncio.wait_for(self._server_gone.wait(), grace + 1.0)
                except asyncio.TimeoutError:
                    logger.warning("fork server pid %d did not stop within %.1f s; killing it",
                                   self._server_pid, grace + 1.0)
        finally:
            self.kill()
        logger.info("agent pool stopped")

    def kill(self) -> None:
        """Kill and reap the fork server at once, and fail every task left; synchronous.

        The agents die with the fork server. A socket with a read pending is
        shut down rather than closed, so that the coroutine waiting on it
        reads end of file and closes it. Closing it here could let its
        descriptor number be reused while the event loop still polls it.
        """
        self._stopping = True
        if self._server_pid:
            if self._server_popen is not None and self._server_popen.poll() is None:
                self._server_popen.kill()
            elif self._server_popen is None:
                _kill(self._server_pid)
            self._reap_server()
        for slot in [*self.slots, *self._starting.values()]:
            if slot is None:
                continue
            if not slot.exit_status.done():
                slot.exit_status.set_result("was stopped with the pool")
            if slot.task is not None and not slot.task.future.done():
                slot.task.future.set_exception(AgentError(
                    f"job {slot.task.job_id} was still running on {slot.name} when the "
                    f"coordinator shut down"))
            if slot.state in (BUSY, STARTING):
                _shutdown_socket(slot.sock)
            else:
                slot.sock.close()
        if self._control is not None:
            if self._reader is not None and not self._reader.done():
                _shutdown_socket(self._control)
            else:
                self._control.close()
        self._fail_pending("the coordinator shut down before the job ran")

    # -- tasks ------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        if self._stopping:
            return []
        return [slot.pid for slot in self.slots if slot is not None and slot.state != DEAD]

    def submit(self, task: Task) -> None:
        if self._stopping:
            raise AgentError("the coordinator is shut down; start a new UnifiedCoordinator")
        self._pending.append(task)
        self._dispatch()

    def cancel(self, tasks: list[Task], kill_running: bool) -> None:
        """Drop the queued ones of ``tasks``, and kill the agents running the others
        if ``kill_running``.

        Killing is the only way to stop user code in another process; the
        pool starts a replacement as for any other death.
        """
        dropped = set(tasks)
        self._pending = collections.deque(t for t in self._pending if t not in dropped)
        for task in tasks:
            if not task.future.done():
                task.future.cancel()
        if not kill_running:
            return
        for slot in self.slots:
            if slot is not None and slot.state == BUSY and slot.task in dropped and slot.pid:
                slot.cancelled_task = True
                logger.info("stopping %s to cancel job %d", slot.name, slot.task.job_id)
                _kill(slot.pid)

    def _dispatch(self) -> None:
        while self._pending and self._idle:
            task = self._pending.popleft()
            if task.future.done():
                continue  # the caller stopped waiting
            slot = self._idle.popleft()
            slot.state = BUSY
            slot.task = task
            self._spawn_background(self._run(slot, task), f"sabot-task-{task.id}")

    async def _run(self, slot: AgentSlot, task: Task) -> None:
        task.attempts += 1
        try:
            kind, body = await self._exchange(slot, task)
        except (EOFError, OSError):
            await self._on_agent_death(slot, task)
            return
        except asyncio.CancelledError:
            # Cancelled with the event loop: the agent may be mid-task, so it
            # cannot take another one.
            slot.state = DEAD
            slot.sock.close()
            raise
        except Exception as exc:  # a reply out of protocol: the agent is replaced
            logger.exception("%s sent an invalid reply; killing it", slot.name)
            if not task.future.done():
                task.future.set_exception(exc)
            slot.cancelled_task = True  # its death is expected, so it is not reported
            _kill(slot.pid)
            await self._on_agent_death(slot, None)
            return
        slot.state = IDLE
        slot.task = None
        if not self._stopping:
            self._idle.append(slot)
            self._dispatch()
        if task.future.done():
            return
        if kind == protocol.OK:
            task.future.set_result(body)
        else:
            task.future.set_exception(_rebuild_failure(body, slot, task))

    async def _exchange(self, slot: AgentSlot, task: Task) -> tuple[int, bytearray]:
        loop, sock = self._loop, slot.sock
        size = task.payload.size
        header = protocol.REQUEST.pack(protocol.RUN, task.id, len(task.steps), size)
        if size <= SMALL_PAYLOAD:
            await loop.sock_sendall(sock, b"".join((header, task.steps, task.payload)))
        else:
            await loop.sock_sendall(sock, header + task.steps)
            await loop.sock_sendall(sock, memoryview(task.payload))
        kind, task_id, length = protocol.RESPONSE.unpack(
            await _recv_exact(loop, sock, protocol.RESPONSE.size))
        if task_id != task.id:
            raise AgentError(f"{slot.name} returned the result of task {task_id} while "
                             f"task {task.id} was expected")
        body = await _recv_exact(loop, sock, length) if length else bytearray()
        return kind, body

    async def _on_agent_death(self, slot: AgentSlot, task: Task | None) -> None:
        slot.state = DEAD
        slot.task = None
        slot.sock.close()
        if self._stopping:
            if task is not None and not task.future.done():
                task.future.set_exception(AgentError(
                    f"job {task.job_id} was still running on {slot.name} when the "
                    f"coordinator shut down"))
            return
        how = await self._exit_description(slot)
        if slot.cancelled_task:
            logger.debug("%s %s; starting a replacement", slot.name, how)
        elif task is None:
            logger.error("%s %s while idle; starting a replacement", slot.name, how)
        elif task.future.done():
            logger.error("%s %s while running a partition of job %d, which had already "
                         "failed; starting a replacement", slot.name, how, task.job_id)
        else:
            self._fail_or_retry(slot, task, how)
        if slot.generation == self._generation and not self._stopping:
            self._spawn_background(self._replace(slot.index), f"sabot-replace-{slot.index}")

    def _fail_or_retry(self, slot: AgentSlot, task: Task, how: str) -> None:
        if task.retriable and task.attempts < 2:
            logger.warning("%s %s while running job %d partition %d; retrying the "
                           "partition once on the next free agent", slot.name, how, task.job_id,
                           task.partition)
            self._pending.appendleft(task)
            self._dispatch()
        else:
            logger.error("%s %s while running job %d partition %d; the job fails and "
                         "a replacement agent is starting", slot.name, how, task.job_id,
                         task.partition)
            hint = ("it had been retried once already" if task.retriable else
                    "pass retriable=True to execute() to retry a job once after an "
                    "agent dies")
            task.future.set_exception(AgentError(
                f"{slot.name} {how} while running job {task.job_id} (partition "
                f"{task.partition}); the pool has started a replacement agent, and {hint}"))

    async def _exit_description(self, slot: AgentSlot) -> str:
        try:
            status = await asyncio.wait_for(asyncio.shield(slot.exit_status),
                                            EXIT_REPORT_TIMEOUT)
        except asyncio.TimeoutError:
            status = None
        return describe_wait_status(status)

    # -- starting and replacing agents ------------------------------------------------

    async def _spawn(self, index: int) -> AgentSlot:
        ours, theirs = socket.socketpair()
        slot = AgentSlot(index, ours, self._loop.create_future(), generation=self._generation)
        self._starting[index] = slot
        try:
            try:
                await self._send_control((protocol.SPAWN, index), theirs.fileno())
            finally:
                theirs.close()
            ours.setblocking(False)
            try:
                header = await asyncio.wait_for(
                    _recv_exact(self._loop, ours, protocol.RESPONSE.size), AGENT_START_TIMEOUT)
            except (EOFError, OSError):
                how = await self._exit_description(slot)
                raise AgentError(f"agent {index} {how} before it was ready") from None
            except asyncio.TimeoutError:
                raise AgentError(f"agent {index} was not ready after "
                                 f"{AGENT_START_TIMEOUT:.0f} s") from None
            kind, pid, _ = protocol.RESPONSE.unpack(header)
            if kind != protocol.READY:
                raise AgentError(f"agent {index} sent message kind {kind} instead of READY")
            slot.pid = pid
            self._by_pid[pid] = slot
            return slot
        except BaseException:
            ours.close()
            raise
        finally:
            self._starting.pop(index, None)

    def _add_ready(self, slot: AgentSlot) -> None:
        if self._stopping:
            slot.sock.close()
            return
        if slot.exit_status.done():  # died between READY and now
            self._spawn_background(self._on_agent_death(slot, None), "sabot-agent-death")
            return
        slot.state = IDLE
        self.slots[slot.index] = slot
        self._idle.append(slot)

    async def _replace(self, index: int) -> None:
        generation = self._generation
        delay = 0.05
        while not self._stopping:
            if generation != self._generation or self._server_gone.is_set():
                return  # _restart_server() replaces every agent
            try:
                slot = await self._spawn(index)
            except (AgentError, OSError) as exc:
                if self._stopping:
                    return
                logger.error("starting a replacement for agent %d failed: %s; retrying in "
                             "%.2f s", index, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.replacements += 1
            logger.info("%s started as a replacement", slot.name)
            self._add_ready(slot)
            self._dispatch()
            return

    def _spawn_background(self, coroutine, name: str) -> None:
        task = self._loop.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("pool task %s failed", task.get_name(), exc_info=task.exception())

    # -- the control channel ----------------------------------------------------------

    async def _send_control(self, message: tuple, fd: int | None = None) -> None:
        body = pickle.dumps(message)
        await self._loop.sock_sendall(self._control,
                                      protocol.CONTROL_LENGTH.pack(len(body)) + body)
        if fd is None:
            return
        while True:
            try:
                socket.send_fds(self._control, [b"F"], [fd])
                return
            except BlockingIOError:
                writable = self._loop.create_future()
                self._loop.add_writer(self._control.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self._loop.remove_writer(self._control.fileno())

    async def _read_control(self, control: socket.socket) -> None:
        loop = self._loop
        try:
            while True:
                header = await _recv_exact(loop, control, protocol.CONTROL_LENGTH.size)
                (length,) = protocol.CONTROL_LENGTH.unpack(header)
                message = pickle.loads(await _recv_exact(loop, control, length))
                self._on_control(message)
        except (EOFError, OSError):
            pass
        finally:
            control.close()
        self._server_gone.set()
        if not self._stopping:
            await self._restart_server()

    def _on_control(self, message: tuple) -> None:
        kind = message[0]
        if kind == protocol.SPAWNED:
            _, index, pid = message
            slot = self._starting.get(index)
            if slot is not None:
                slot.pid = pid
                self._by_pid[pid] = slot
        elif kind == protocol.SPAWN_FAILED:
            _, index, reason = message
            slot = self._starting.get(index)
            if slot is not None:
                slot.exit_status.set_result(f"could not be started: {reason}")
                slot.sock.close()
        elif kind == protocol.EXITED:
            _, pid, status = message
            slot = self._by_pid.pop(pid, None)
            if slot is None:
                return
            if not slot.exit_status.done():
                slot.exit_status.set_result(status)
            if slot.state == IDLE:
                self._idle.remove(slot)
                slot.state = DEAD
                self._spawn_background(self._on_agent_death(slot, None), "sabot-agent-death")
            elif slot.state in (BUSY, STARTING):
                # Makes the pending read return end of file even if a process
                # that the agent started still has the other end open.
                try:
                    slot.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    async def _restart_server(self) -> None:
        """Start a new fork server and agents after the fork server died."""
        server_pid = self._server_pid
        how = describe_wait_status(self._reap_server())
        self._generation += 1
        logger.error("the fork server (pid %d) %s; its agents were killed with it. "
                     "Starting a new fork server and %d agents", server_pid, how, self.size)
        for slot in [*self.slots, *self._starting.values()]:
            if slot is not None and not slot.exit_status.done():
                slot.exit_status.set_result(f"was killed because the fork server {how}")
        self._idle.clear()
        self._by_pid.clear()
        delay = 0.1
        while not self._stopping:
            try:
                await self._start_server()
                agents = await asyncio.gather(*(self._spawn(i) for i in range(self.size)))
            except (AgentError, OSError) as exc:
                logger.error("restarting the fork server failed: %s; retrying in %.1f s",
                             exc, delay)
                self._reap_server()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            # Busy slots read end of file and fail or requeue their tasks.
            # Every index gets a new agent here.
            for slot in agents:
                self.replacements += 1
                self._add_ready(slot)
            self._dispatch()
            return

    def _reap_server(self) -> int | None:
        """Wait for the exited fork server and return its wait status."""
        pid, self._server_pid = self._server_pid, 0
        if not pid:
            return None
        if self._server_popen is not None:
            popen, self._server_popen = self._server_popen, None
            return _popen_status(popen.wait())
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return None
        return status

    def _fail_pending(self, reason: str) -> None:
        while self._pending:
            task = self._pending.popleft()
            if not task.future.done():
                task.future.set_exception(AgentError(f"job {task.job_id}: {reason}"))


def _kill(pid: int) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # exited already


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more, or closed already


def _popen_status(returncode: int) -> int:
    """Convert a Popen return code back to a wait status for describe_wait_status()."""
    if returncode < 0:
        return -returncode  # WIFSIGNALED: the low 7 bits are the signal
    return returncode << 8


def _rebuild_failure(body: bytes, slot: AgentSlot, task: Task) -> BaseException:
    """Rebuild the exception an agent reported, with its traceback text as the cause."""
    pickled, kind, message, text = pickle.loads(body)
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:  # noqa: BLE001 - the class may not import here
            exc = None
    if not isinstance(exc, BaseException):
        exc = AgentError(f"job {task.job_id} raised {kind} on {slot.name}: {message}")
    exc.__cause__ = RemoteTraceback(text)
    return exc

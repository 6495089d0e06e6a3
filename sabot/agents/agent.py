"""The agent: a long-lived process that runs one task at a time for the coordinator.

A task is a stage of a Stream's operators (cloudpickle bytes) and a
partition of the job's input (Arrow IPC). The agent runs them through the same
``Stream.collect()`` that local mode uses, so the pooled path and the
in-process fast path share one implementation of the operators.

The agent is single-threaded and blocks on its socket between tasks. It
exits when the coordinator closes the socket, and with SIGKILL when its
parent (the fork server) dies.
"""

from __future__ import annotations

import copy
import functools
import os
import pickle
import signal
import socket
import sys
import traceback

import cloudpickle
import pyarrow as pa

from sabot.agents import protocol
from sabot.agents.parent_death import set_parent_death_signal
from sabot.stream.core import Stream


def run_task(steps_bytes: bytes | bytearray, payload: bytes | bytearray) -> pa.Table:
    """Run the pickled steps over the batches of an IPC payload and return the output."""
    form, items = cloudpickle.loads(steps_bytes)
    if form == protocol.OPERATORS:
        # Each call of a step gives a fresh copy of the operator as it was
        # built by its factory, before it saw any row.
        steps = tuple(functools.partial(copy.deepcopy, operator) for operator in items)
    else:
        steps = items
    _, batches = protocol.decode_batches(payload)
    return Stream(source=batches, steps=steps).collect()


def failure_report(exc: BaseException) -> bytes:
    """Pickle what the coordinator needs to raise ``exc`` again on its side.

    The exception itself is sent when it pickles. Its type name, message and
    formatted traceback are always sent, so that an exception class the
    coordinator cannot import still gives a readable error.
    """
    text = "".join(traceback.format_exception(exc))
    try:
        pickled = cloudpickle.dumps(exc)
    except Exception:  # noqa: BLE001 - any pickling failure falls back to the text
        pickled = None
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps((pickled, kind, str(exc), text))


def serve(sock: socket.socket) -> None:
    """Run each task the coordinator sends and send back its result, until the
    coordinator closes the socket."""
    sock.sendall(protocol.RESPONSE.pack(protocol.READY, os.getpid(), 0))
    while True:
        header = protocol.recv_exact(sock, protocol.REQUEST.size)
        if header is None:
            return
        _, task_id, steps_length, payload_length = protocol.REQUEST.unpack(header)
        steps_bytes = protocol.recv_exact(sock, steps_length) or b""
        payload = protocol.recv_exact(sock, payload_length) or b""
        try:
            body = protocol.encode_table(run_task(steps_bytes, payload))
            kind = protocol.OK
        except BaseException as exc:  # noqa: BLE001 - user code must not end the agent
            body = failure_report(exc)
            kind = protocol.FAILED
        del steps_bytes, payload
        header = protocol.RESPONSE.pack(kind, task_id, len(body))
        if len(body) <= 65_536:
            sock.sendall(b"".join((header, body)))
        else:
            sock.sendall(header)
            sock.sendall(body)


def agent_main(fd: int, parent_pid: int) -> None:
    """Run an agent in a child just forked by the fork server; never returns."""
    status = 1
    try:
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the line above
            os._exit(1)
        # Ctrl-C in a terminal reaches the whole process group; the
        # coordinator decides when agents stop, so they ignore SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        serve(sock)
        status = 0
    except (BrokenPipeError, ConnectionResetError):
        status = 0  # the coordinator closed the socket while a result was on its way
    except BaseException:  # noqa: BLE001 - report, then leave without unwinding the fork
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

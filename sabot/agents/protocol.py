"""Wire format between the coordinator, the fork server and the agents.

Coordinator and agent talk over one Unix stream socketpair per agent. A
request is a fixed header followed by two byte strings::

    REQUEST  <kind:u8> <task_id:u64> <steps_len:u32> <payload_len:u64>
             <steps: cloudpickle of (OPERATORS, operator instances)
                     or of (FACTORIES, the Stream's step factories)>
             <payload: Arrow IPC stream of the input batches>

    RESPONSE <kind:u8> <task_id:u64> <payload_len:u64>
             <payload: Arrow IPC stream of the result table (OK),
                       or a pickled failure report (FAILED)>

An agent sends one READY response with its pid in ``task_id`` when it has
started. Coordinator and fork server exchange control messages: a 4-byte
length and a pickled tuple, and a file descriptor travels as SCM_RIGHTS
ancillary data on a separate 1-byte message, so it cannot be split by a
stream socket.
"""

from __future__ import annotations

import pickle
import socket
import struct

import pyarrow as pa

REQUEST = struct.Struct("<BQIQ")
RESPONSE = struct.Struct("<BQQ")
CONTROL_LENGTH = struct.Struct("<I")

# Request kinds.
RUN = 1

# Forms of a request's steps: operators just built by their factories
# (cheaper to pickle, because the factories are closures), or the factories
# themselves when an operator cannot be pickled.
OPERATORS = "operators"
FACTORIES = "factories"

# Response kinds.
OK = 1
FAILED = 2
READY = 3

# Control messages, coordinator -> fork server.
SPAWN = "spawn"          # ("spawn", agent_index), then the agent's socket as an fd
STOP = "stop"            # ("stop", grace_seconds)
SET_SYS_PATH = "path"    # ("path", sys.path list), sent once to a spawned fork server

# Control messages, fork server -> coordinator.
SPAWNED = "spawned"      # ("spawned", agent_index, pid)
SPAWN_FAILED = "spawn-failed"  # ("spawn-failed", agent_index, message)
EXITED = "exited"        # ("exited", pid, wait_status)


def encode_batches(schema: pa.Schema, batches: list[pa.RecordBatch]) -> pa.Buffer:
    """Write batches as one Arrow IPC stream; the schema is written even with no batches."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def decode_batches(buffer) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """Read an Arrow IPC stream without copying: the batches point into ``buffer``."""
    reader = pa.ipc.open_stream(pa.py_buffer(buffer))
    return reader.schema, list(reader)


def encode_table(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode_table(buffer) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(buffer)).read_all()


# -- blocking socket helpers (agent and fork server side) -------------------------------

def recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    """Read exactly ``size`` bytes; return None on end of file before the first byte."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            if received == 0:
                return None
            raise EOFError(f"connection closed after {received} of {size} bytes")
        received += count
    return buffer


def send_control(sock: socket.socket, message: tuple) -> None:
    body = pickle.dumps(message)
    sock.sendall(CONTROL_LENGTH.pack(len(body)) + body)


def recv_control(sock: socket.socket) -> tuple | None:
    """Read one control message; return None when the peer has closed the socket."""
    header = recv_exact(sock, CONTROL_LENGTH.size)
    if header is None:
        return None
    (length,) = CONTROL_LENGTH.unpack(header)
    body = recv_exact(sock, length)
    if body is None:
        raise EOFError("connection closed inside a control message")
    return pickle.loads(body)

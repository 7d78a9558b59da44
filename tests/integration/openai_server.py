"""Starting a real OpenAI-compatible server for a test module, and stopping it with all it started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(name: str, command: Sequence[str], port: int, log_path: Path, startup_timeout_s: float,
                   env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Runs ``command`` (a server listening on ``port``) until it answers ``GET /v1/models``; yields the
    ``/v1`` base URL. The test fails with the server's last log lines if it exits or is not ready in time."""
    with open(log_path, "wb") as log:
        # Its own process group: servers such as `vllm serve` start engine processes that must stop with them.
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(env) if env is not None else None)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready after {startup_timeout_s} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=10)
        _signal_group(process, signal.SIGKILL)  # anything it started and left behind


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)

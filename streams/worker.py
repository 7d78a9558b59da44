"""Running stage workers: in this process (``echolm worker``) or as supervised child processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from echolm.settings import Settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings, stage: str, tiers: tuple[str, ...]) -> None:
    """Blocks until SIGTERM/SIGINT; faust then stops agents and commits what was acknowledged, and
    the worker's services (models, database pools) are closed after the agents have stopped."""
    import faust

    from streams.app import WorkerPlan, create_app, one_torch_thread_beside_llamacpp
    from streams.services import Services

    class Worker(faust.Worker):
        async def on_shutdown(self) -> None:
            # After the app (a child of this service) stopped its agents, so no batch is cut short.
            # A vLLM engine runs in child processes that would outlive the worker if not shut down.
            await services.aclose()
            await super().on_shutdown()

    plan = WorkerPlan.for_stage(stage, settings, tiers)
    services = Services(one_torch_thread_beside_llamacpp(settings, plan))
    app = create_app(settings, plan, services)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    json_logs = settings.log_format == "json"
    worker = Worker(app, loglevel=settings.log_level.lower(), override_logging=False, quiet=json_logs)
    if json_logs:  # faust's banner and start-up spinner write raw text, which would break JSON lines
        worker.spinner = None
    worker.execute_from_commandline()


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ECHOLM_* variables, so a child process sees exactly this configuration."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[f"ECHOLM_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


class WorkerProcess:
    """A child ``echolm worker`` process, restarted by the caller if it dies."""

    def __init__(self, settings: Settings, stage: str = "all", tiers: tuple[str, ...] = (),
                 log_path: Path | None = None) -> None:
        self._settings = settings
        self._stage = stage
        self._tiers = tiers
        self._log_path = log_path or settings.data_dir / f"worker-{stage}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = -1

    def start(self) -> None:
        self.kill_leftovers()  # of the previous run, when the caller restarts a worker that died
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "echolm.cli", "worker", "--stage", self._stage]
        for tier in self._tiers:
            args += ["--tier", tier]
        env = {**os.environ, **settings_env(self._settings), "PYTHONUNBUFFERED": "1"}
        with self._log_path.open("ab") as log_file:
            # Its own process group, so a kill reaches what the worker started (a vLLM engine's
            # processes) and nothing outlives it.
            self.process = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.restarts += 1
        log.info("started worker %s (pid %d, log %s)", self._stage, self.process.pid, self._log_path)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self._log_path

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None:
            return
        if self.alive:
            self.process.terminate()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.process.poll() is None:
                time.sleep(0.1)
            if self.process.poll() is None:
                log.warning("worker %s did not stop in %.0fs; killing it", self._stage, timeout_s)
                self.process.kill()
                self.process.wait(timeout=5)
        self.kill_leftovers()

    def kill_leftovers(self) -> None:
        """SIGKILL whatever the worker started and left running (its process group), e.g. after a kill -9."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

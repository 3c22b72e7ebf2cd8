"""Start a real ``python -m jserve.server`` on a free localhost port for tests."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint: pathlib.Path, *args: str, wait_serving: bool = True,
                 launch: tuple[str, ...] = ("-m", "jserve.server")):
        """``launch``: what follows the interpreter (e.g. ``("-c", code)`` to patch the engine first)."""
        self.metrics_port = free_port()
        cmd = [sys.executable, *launch, "--checkpoint", str(checkpoint), "--port", "0",
               "--metrics-port", str(self.metrics_port), "--log-level", "WARNING", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._serving = threading.Event()
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        if not self._listening.wait(120):
            self.stop()
            raise RuntimeError(f"server did not start: {self.stderr_tail()}")
        if wait_serving:
            self.wait_serving()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("jserve http listening on "):
                self.http_address = line.split()[-1]
            if line.startswith("jserve listening on "):
                self.address = line.split()[-1]
                self._listening.set()
            if line.startswith("jserve SERVING"):
                self._serving.set()

    def _drain_stderr(self) -> None:
        self.err: list[str] = []
        for line in self.proc.stderr:
            self.err.append(line.rstrip())

    def stderr_tail(self) -> str:
        time.sleep(0.2)
        return "\n".join(getattr(self, "err", [])[-30:])

    def wait_serving(self, timeout: float = 300) -> None:
        if not self._serving.wait(timeout):
            raise RuntimeError(f"server never became SERVING: {self.stderr_tail()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

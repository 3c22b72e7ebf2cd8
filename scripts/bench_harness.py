"""What the benchmarks that drive a real server share: ``start_server`` runs ``python -m
jserve.server`` with the given flags as a user would, waits for it to say ``SERVING``, reads the
gRPC and HTTP addresses it prints, keeps draining its output so the pipe never fills, and stops
it (``Started.stop``). Scripts import it beside themselves (``sys.path`` holds ``scripts/``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Sequence

GRPC_LINE, HTTP_LINE, SERVING_LINE = "jserve listening on ", "jserve http listening on ", "jserve SERVING"


@dataclasses.dataclass
class Started:
    """A server that said ``SERVING``: its process, its command, the addresses it printed (None
    when it printed none: no ``--http-port``) and the command in the words a user types (``mode``)."""

    proc: subprocess.Popen
    cmd: list[str]
    grpc_address: str | None
    http_address: str | None

    @property
    def mode(self) -> str:
        return " ".join(["python -m jserve.server", *self.cmd[3:]])

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the server drains), then wait; its exit code."""
        self.proc.terminate()
        return self.proc.wait(timeout)


def start_server(flags: Sequence[str], timeout: float = 600, cmd: Sequence[str] | None = None) -> Started:
    """``python -m jserve.server *flags`` (or ``cmd`` as given), once it is ``SERVING``;
    RuntimeError if it exits first or is not serving within ``timeout`` seconds (it is killed)."""
    cmd = list(cmd) if cmd is not None else [sys.executable, "-m", "jserve.server", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: dict[str, str] = {}
    serving, ended = threading.Event(), threading.Event()

    def read() -> None:  # the whole output, to its end: the pipe never fills
        for line in proc.stdout:
            for prefix in (HTTP_LINE, GRPC_LINE):
                if line.startswith(prefix):
                    seen.setdefault(prefix, line.split()[-1])
            if line.startswith(SERVING_LINE):
                serving.set()
        ended.set()

    threading.Thread(target=read, name="server-output", daemon=True).start()
    waited = 0.0
    while not serving.wait(0.1):
        waited += 0.1
        gone = ended.is_set()
        if gone or waited >= timeout:
            proc.kill()
            code = proc.wait()
            raise RuntimeError(f"{' '.join(cmd)}: " + (f"exited ({code}) before SERVING" if gone
                                                        else f"not SERVING within {timeout:g} s"))
    return Started(proc, cmd, seen.get(GRPC_LINE), seen.get(HTTP_LINE))

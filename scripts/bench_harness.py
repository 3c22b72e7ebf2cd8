"""What the benchmarks share. Those that drive a real server: ``start_server`` runs ``python -m
jserve.server`` with the given flags as a user would, waits for it to say ``SERVING``, reads the
gRPC and HTTP addresses it prints, keeps draining its output so the pipe never fills, and stops
it (``Started.stop``). Those that time an engine's decode step: ``settle`` and ``time_decode``
(rounds over every engine in turn, medians). Scripts import it beside themselves (``sys.path``
holds ``scripts/``)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

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


def start_server(flags: Sequence[str], timeout: float = 600, cmd: Sequence[str] | None = None, *,
                 stderr: Any = subprocess.DEVNULL, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> Started:
    """``python -m jserve.server *flags`` (or ``cmd`` as given), once it is ``SERVING``;
    RuntimeError if it exits first or is not serving within ``timeout`` seconds (it is killed).
    ``stderr`` (the server's log): dropped unless given a file; ``env``: added to this process's
    environment; ``cwd``: where it runs (another tree's checkout)."""
    cmd = list(cmd) if cmd is not None else [sys.executable, "-m", "jserve.server", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
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


def _step(engine: Any, state: Any) -> Any:
    """One decode step of every slot, its packed result copied to the host as the orchestrator does."""
    import numpy as np

    state, out = engine.generate(state)
    np.asarray(out)
    return state


def settle(engine: Any, state: Any, steps: int = 2) -> Any:
    """``steps`` decode steps untimed (the first compiles); the state after them."""
    for _ in range(steps):
        state = _step(engine, state)
    return state


def time_decode(runs: dict[Hashable, tuple[Any, Any]], rounds: int, steps: int) -> dict[Hashable, float]:
    """Each run's (engine, state) decode step time in seconds: a round times ``steps`` steps of
    every run in turn, so background noise on a shared machine hits all of them alike; the median
    over ``rounds`` rounds."""
    states = {key: state for key, (_, state) in runs.items()}
    times: dict[Hashable, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, (engine, _) in runs.items():
            state = states[key]
            t0 = time.perf_counter()
            for _ in range(steps):
                state = _step(engine, state)
            times[key].append((time.perf_counter() - t0) / steps)
            states[key] = state
    return {key: statistics.median(t) for key, t in times.items()}

"""Watch JAX trace new jit shapes: the check behind "nothing compiles while serving".

JAX (0.10) records ``/jax/core/compile/jaxpr_trace_duration`` once each time a jitted function is
traced for a signature (shapes, dtypes, static arguments) it has not seen in this process: before
any compilation cache is consulted, so a persistent cache cannot hide it. A watch counts those
events, from every thread (the orchestrator's loop runs on its own), while it is open.
``tests/test_compile_watch.py`` proves a watch sees a new shape traced inside it, so a watch that
stays empty means nothing was traced, not that it listened for an event JAX never sends.
"""

from __future__ import annotations

import threading
import types

import jax.monitoring

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


class CompileWatch:
    """Collects the names of the functions jit traces while open (``with CompileWatch() as w:``).

    ``traced``: one function name per trace, in order. ``assert_nothing_traced()`` fails naming them."""

    def __init__(self) -> None:
        self.traced: list[str] = []
        self._lock = threading.Lock()
        self._open = False

    def _listen(self, event: str, _secs: float, fun_name: str = "?", **_kw) -> None:
        if event == TRACE_EVENT:
            with self._lock:
                if self._open:
                    self.traced.append(fun_name)

    def __enter__(self) -> CompileWatch:
        self._open = True
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: types.TracebackType | None) -> None:
        with self._lock:
            self._open = False
        jax.monitoring.unregister_event_duration_listener(self._listen)

    @property
    def count(self) -> int:
        return len(self.traced)

    def assert_nothing_traced(self) -> None:
        assert not self.traced, f"traced (so compiled) while it should not have: {self.traced}"

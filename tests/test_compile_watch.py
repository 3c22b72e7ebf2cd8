"""The compile watch is not blind: a shape traced inside it is caught, on any thread, and only there."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import pytest

from .compile_watch import CompileWatch


def _fresh_jit():
    """A jitted function no other test has traced (a new function object each call)."""

    def doubled_plus_one(x):
        return x * 2 + 1

    return jax.jit(doubled_plus_one)


def test_a_new_shape_traced_inside_the_watch_is_caught():
    f = _fresh_jit()
    three, five = jnp.ones((3,), jnp.float32), jnp.ones((5,), jnp.float32)  # (eager ops trace too)
    f(three).block_until_ready()  # traced before the watch: not counted
    with CompileWatch() as watch:
        f(three).block_until_ready()  # the same shape again: cached, no trace
        assert watch.traced == []
        f(five).block_until_ready()  # a new shape
    assert watch.traced == ["doubled_plus_one"]
    with pytest.raises(AssertionError, match="doubled_plus_one"):
        watch.assert_nothing_traced()


def test_a_trace_on_another_thread_is_caught_and_nothing_after_the_watch_closes():
    f = _fresh_jit()
    two, four = jnp.ones((2, 7), jnp.float32), jnp.ones((4, 7), jnp.float32)
    with CompileWatch() as watch:
        t = threading.Thread(target=lambda: f(two).block_until_ready())
        t.start()
        t.join()
    f(four).block_until_ready()  # after the watch: not counted
    assert watch.traced == ["doubled_plus_one"]

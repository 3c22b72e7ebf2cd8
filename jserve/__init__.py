"""jserve: an LLM inference serving engine on JAX/XLA.

``from jserve import LLM, SamplingParams`` loads lazily so that light modules (the client)
do not import JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "InvalidRequestError"]

if TYPE_CHECKING:
    from jserve.errors import InvalidRequestError
    from jserve.llm import LLM
    from jserve.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from jserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from jserve.sampling import SamplingParams

        return SamplingParams
    if name == "InvalidRequestError":  # a leaf: no JAX to load for it
        from jserve.errors import InvalidRequestError

        return InvalidRequestError
    raise AttributeError(f"module 'jserve' has no attribute {name!r}")

"""Model configuration: the architecture hyper-parameters of a decoder.

One dataclass describes every supported family. Llama is the default of each field; the other
families (Qwen 2/3, Mistral, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE) differ from it in the
fields below the Llama ones, each a plain value that ``model.py`` reads (see the README's
table of architectures). The converter fills them from the checkpoint's own config.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind``:

    - ``llama3``: Llama 3.1's smooth per-frequency scaling (``factor``, the two frequency
      factors, ``original_max_position_embeddings``);
    - ``linear``: every frequency divided by ``factor`` (Gemma 3's global layers);
    - ``longrope``: Phi-3's LongRoPE: frequency ``i`` divided by ``short_factor[i]``, or by
      ``long_factor[i]`` when ``use_long``, and cos/sin multiplied by ``attention_factor``.
      ``use_long`` is chosen for the context served (``ModelConfig.for_context``): the long
      factors when it exceeds ``original_max_position_embeddings``, as llama.cpp does (transformers
      switches per forward call, on the call's length).
    """

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    kind: str = "llama3"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    use_long: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "linear", "longrope"):
            raise ValueError(f"unknown RoPE scaling kind {self.kind!r} (known: llama3, linear, longrope)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder (Llama and the families above). Frozen and hashable: a static jit argument."""

    vocab_size: int
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    ffn_dim: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Where other families differ from Llama (the defaults are Llama's).
    arch: str = "llama"  # the checkpoint's model type, for messages and ModelInfo
    qkv_bias: bool = False  # biases on the Q/K/V projections (Qwen 2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before RoPE (Qwen 3, Gemma 3)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual adds (Gemma)
    activation: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(dim))
    attn_scale: float | None = None  # attention scores' scale; None: 1/sqrt(head_dim)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits (Gemma 2)
    sliding_window: int | None = None  # a query sees itself and the window - 1 positions before it
    sliding_layers: tuple[bool, ...] = ()  # which layers use the window; () = all of them
    rope_local_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3)
    n_experts: int = 0  # mixture of experts: experts per layer (0: a dense MLP), each ffn_dim wide
    experts_per_token: int = 0  # experts each token is routed to
    moe_renormalize: bool = True  # the chosen experts' router probabilities rescaled to sum to 1

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r} (known: {', '.join(ACTIVATIONS)})")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(f"experts_per_token must be in [1, {self.n_experts}], got {self.experts_per_token}")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it attends to the whole sequence)."""
        if self.sliding_window is None or (self.sliding_layers and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def for_context(self, max_len: int) -> ModelConfig:
        """This config as served with ``max_len`` positions per sequence (LongRoPE picks its factors)."""
        sc = self.rope_scaling
        if sc is None or sc.kind != "longrope":
            return self
        use_long = max_len > sc.original_max_position_embeddings
        return dataclasses.replace(self, rope_scaling=dataclasses.replace(sc, use_long=use_long))

    def rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """RoPE base and scaling of ``layer``."""
        if self.rope_local_theta is not None and self.window(layer) is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            sc = dict(d["rope_scaling"])
            for key in ("short_factor", "long_factor"):
                sc[key] = tuple(sc.get(key, ()))
            d["rope_scaling"] = RopeScaling(**sc)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
        return cls(**d)

    def save(self, path: pathlib.Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: pathlib.Path) -> ModelConfig:
        return cls.from_dict(json.loads(path.read_text()))


def tiny_config(**overrides: Any) -> ModelConfig:
    """A few-layer random model for fast tests of shapes, masking and scheduling."""
    base = dict(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
        norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024, tie_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,),
    )
    base.update(overrides)
    return ModelConfig(**base)

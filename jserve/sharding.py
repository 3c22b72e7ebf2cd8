"""Sharding over a device mesh: tensor parallel over heads and MLP width, data parallel over slots.

A mesh is named by a flag such as ``tp=4`` or ``dp=2,tp=4`` (axes ``dp`` and ``tp``; their
product must equal the number of devices used). Which array dimension goes to which mesh axis
is plain data, ``RULES``: a *logical* axis name per dimension of every weight and of the
decode state, and a mesh axis (or ``None``: replicated) per logical axis.

- attention is sharded over KV heads (and with them the query heads of each KV group): Q/K/V
  are column-parallel, the output projection row-parallel; the KV cache is sharded over its
  KV-head axis, so each device attends over its own heads only;
- the MLP is sharded over its width: gate/up column-parallel, down row-parallel;
- the vocabulary (embedding table, output projection) over ``tp`` too;
- a mixture of experts over its experts (expert parallel): each ``tp`` device holds whole
  experts and runs them on every token; the weighted sum over experts is the one reduction.
  (Within one array a mesh axis shards only its first logical axis, so an expert's own MLP
  width stays whole; if the experts do not divide, their width is sharded instead.)
- the decode state (cache, per-slot arrays) over slots along ``dp``; prompts are prefilled
  on every ``dp`` group alike and written into the slot's own shard.

A dimension that a mesh axis does not divide (SmolLM2 has 3 KV heads, so ``tp=2`` cannot split
them) is replicated with a warning that names it, or refused when ``indivisible="error"``.

The fused Q/K/V and gate/up matrices are laid out in ``groups`` blocks, one per ``tp`` shard
(``[q, k, v]`` of shard 0, then of shard 1, ...), so a column shard holds whole heads of all
three and no step reshuffles weights between devices (``model._split_qkv``).

int8 weights shard like their float originals; their per-output-channel scales follow the
output axis. Loading from a checkpoint restores each stored array straight into its sharding,
so every device receives only its own shard (``checkpoint.load_sharded``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.config import ModelConfig
from jserve.quant import QuantArray

log = logging.getLogger(__name__)

MESH_AXES = ("dp", "tp")

# Logical axes → mesh axis (None = replicated on every device).
RULES: dict[str, str | None] = {
    "vocab": "tp",
    "experts": "tp",
    "kv_heads": "tp",
    "heads": "tp",  # query heads; always sharded together with "kv_heads"
    "mlp": "tp",
    "slots": "dp",
    "embed": None,
    "layers": None,
    "time": None,
    "head_dim": None,
}

# Logical axes of each weight as the model holds it (fused matrices are ``[in, out]``).
WEIGHT_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "wqkv": ("embed", "heads"),
    "wo": ("heads", "embed"),
    "w_gate_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "bqkv": ("heads",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "post_attn_norm": ("embed",),
    "post_mlp_norm": ("embed",),
    "router": ("embed", "router_out"),
    "experts_gate_up": ("experts", "embed", "mlp"),
    "experts_down": ("experts", "mlp", "embed"),
}

# The same for the stacked, unfused arrays of a checkpoint (see ``checkpoint.py``).
STORED_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "heads", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "bq": ("layers", "heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "post_attn_norm": ("layers", "embed"),
    "post_mlp_norm": ("layers", "embed"),
    "router": ("layers", "embed", "router_out"),
    "e_gate": ("layers", "experts", "embed", "mlp"),
    "e_up": ("layers", "experts", "embed", "mlp"),
    "e_down": ("layers", "experts", "mlp", "embed"),
}

CACHE_AXES = ("slots", "kv_heads", "time", "head_dim")
PREFIX_AXES = ("time", "kv_heads", "head_dim")  # a prefilled prompt's keys/values, per layer


class ShardingError(ValueError):
    """A mesh that cannot be built, or a dimension that does not divide with ``indivisible="error"``."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"dp=2,tp=4"`` → ``{"dp": 2, "tp": 4}`` (missing axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ShardingError(f"bad mesh {text!r}: expected axis=size pairs over {MESH_AXES}, e.g. 'dp=2,tp=4'")
        if name in seen:
            raise ShardingError(f"bad mesh {text!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ShardingError(f"bad mesh {text!r}: size of {name!r} is not an integer") from None
        if sizes[name] < 1:
            raise ShardingError(f"bad mesh {text!r}: size of {name!r} must be >= 1")
    return sizes


def make_mesh(sizes: Mapping[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("dp", "tp")`` mesh over the first ``dp * tp`` of ``devices`` (default: the devices of
    every process, in JAX's order)."""
    if isinstance(sizes, str):
        sizes = parse_mesh(sizes)
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    need = math.prod(shape)
    if need < len(devices):
        log.warning("mesh uses %d of the %d devices", need, len(devices))
        devices = devices[:need]
    if need != len(devices):
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, shape))} needs {need} devices, {len(devices)} available "
                            f"({devices[0].platform}); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                            "makes N virtual devices")
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rules resolved against one mesh, model and slot count: which logical axis goes where."""

    mesh: Mesh
    axes: dict[str, str | None]  # logical axis → mesh axis, after divisibility checks

    @property
    def qkv_groups(self) -> int:
        return self._size(self.axes["kv_heads"])

    @property
    def mlp_groups(self) -> int:
        return self._size(self.axes["mlp"])

    @property
    def expert_groups(self) -> int:
        """Shards of an expert's own MLP width: none when the experts themselves are sharded
        over the same mesh axis (``spec`` uses a mesh axis once per array)."""
        experts = self.axes.get("experts")
        return 1 if experts is not None and experts == self.axes["mlp"] else self.mlp_groups

    def _size(self, axis: str | None) -> int:
        return 1 if axis is None else self.mesh.shape[axis]

    def spec(self, logical: Sequence[str]) -> PartitionSpec:
        """Mesh axes of an array's logical axes; a mesh axis shards only the first of them that
        maps to it (the experts, before their own MLP width)."""
        used: set[str] = set()
        out = []
        for name in logical:
            axis = self.axes.get(name)
            out.append(None if axis in used else axis)
            if axis is not None:
                used.add(axis)
        return PartitionSpec(*out)

    def sharding(self, logical: Sequence[str]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def describe(self) -> str:
        shape = ",".join(f"{a}={n}" for a, n in self.mesh.shape.items())
        parts = [f"{k}->{v}" for k, v in self.axes.items() if v is not None]
        return f"mesh {shape}: " + (", ".join(parts) or "everything replicated")


def plan(mesh: Mesh, cfg: ModelConfig, slots: int, rules: Mapping[str, str | None] = RULES,
         indivisible: str = "replicate") -> Plan:
    """Resolve ``rules`` for ``mesh``: a logical axis whose size a mesh axis does not divide is
    replicated (with a warning naming it) or, with ``indivisible="error"``, refused."""
    if indivisible not in ("replicate", "error"):
        raise ValueError(f"indivisible must be 'replicate' or 'error', got {indivisible!r}")
    sizes = {"vocab": cfg.vocab_size, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "mlp": cfg.ffn_dim,
             "slots": slots, "embed": cfg.dim, "layers": cfg.n_layers, "head_dim": cfg.head_dim,
             "experts": cfg.n_experts or None}
    axes: dict[str, str | None] = {}
    for logical, mesh_axis in rules.items():
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            raise ShardingError(f"rule {logical}->{mesh_axis}: the mesh has no axis {mesh_axis!r}")
        n = 1 if mesh_axis is None else mesh.shape[mesh_axis]
        size = sizes.get(logical)
        if n > 1 and size is not None and size % n:
            what = f"{logical} ({size}) does not divide over {mesh_axis}={n}"
            if indivisible == "error":
                raise ShardingError(f"cannot shard: {what}")
            log.warning("%s: replicating %s", what, logical)
            mesh_axis = None
        axes[logical] = mesh_axis if n > 1 else None
    # Query heads go wherever their KV heads go (a device holds whole GQA groups).
    if axes.get("heads") != axes.get("kv_heads"):
        if rules.get("heads") is not None and axes.get("kv_heads") is None:
            log.warning("KV heads are replicated, so query heads are too")
        axes["heads"] = axes["kv_heads"] = axes.get("kv_heads")
    return Plan(mesh=mesh, axes=axes)


def fuse(xp, parts: Sequence, groups: int):
    """Concatenate ``parts`` (``[..., O_i]``) along the last axis in ``groups`` interleaved blocks:
    block ``g`` holds the ``g``-th slice of every part. ``groups == 1`` is a plain concatenation."""
    split = [p.reshape(*p.shape[:-1], groups, p.shape[-1] // groups) for p in parts]
    out = xp.concatenate(split, axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def params_sharding(params, p: Plan):
    """A pytree of ``NamedSharding`` matching ``params`` (a ``model.Params``, abstract or not)."""
    def leaf(name: str, x):
        if x is None:
            return None
        logical = WEIGHT_AXES[name]
        if isinstance(x, QuantArray):
            return x.replace(q=p.sharding(logical), scale=_scale_sharding(p, logical, x.out_axis))
        return p.sharding(logical)

    layers = tuple(
        type(layer)(**{f.name: leaf(f.name, getattr(layer, f.name)) for f in dataclasses.fields(layer)})
        for layer in params.layers
    )
    return params.replace(
        embed=leaf("embed", params.embed),
        layers=layers,
        final_norm=leaf("final_norm", params.final_norm),
        lm_head=None if params.lm_head is None else leaf("lm_head", params.lm_head),
    )


def _scale_sharding(p: Plan, logical: tuple[str, ...], out_axis: int) -> NamedSharding:
    """Sharding of an int8 matrix's scales: its own sharding without the contracted axis (one of
    the last two; the other is the output channel that the scales follow)."""
    q = p.spec(logical)
    contract = len(logical) - 2 + (1 - out_axis)
    return NamedSharding(p.mesh, PartitionSpec(*(q[i] for i in range(len(logical)) if i != contract)))


def stored_sharding(name: str, ndim: int, p: Plan, scale_of: tuple[str, int] | None = None) -> NamedSharding:
    """Sharding of a stored checkpoint array (``wq``, ...). For an int8 matrix's scales,
    ``scale_of`` names the matrix and its output-channel axis (``("wq", 1)``)."""
    if scale_of is not None:
        base, out_axis = scale_of
        return _scale_sharding(p, STORED_AXES[base], out_axis)
    logical = STORED_AXES[name]
    assert len(logical) == ndim, (name, ndim)
    return p.sharding(logical)


def prefix_sharding(prefix, p: Plan):
    """Shardings for an ``engine.Prefix``: keys/values ``[P, K, H]`` over KV heads, the rest replicated."""
    def leaf(path, x):
        if getattr(path[0], "name", None) in ("k", "v"):
            return p.sharding(PREFIX_AXES)
        return p.replicated()

    return jax.tree_util.tree_map_with_path(leaf, prefix)


def state_sharding(state, p: Plan):
    """Shardings for an ``engine.DecodeState``: the cache over slots and KV heads, the per-token
    penalty tables ``[S, V]`` over slots and vocabulary, the rest over slots."""
    def leaf(path, x):
        names = {getattr(k, "name", None) for k in path}
        if "cache" in names:
            return p.sharding(CACHE_AXES)
        if names & {"seen", "counts"}:
            return p.sharding(("slots", "vocab"))
        return p.sharding(("slots",) + (None,) * (len(x.shape) - 1))

    return jax.tree_util.tree_map_with_path(leaf, state)


def device_bytes(tree) -> dict[jax.Device, int]:
    """Bytes each addressable device holds of the arrays in ``tree``."""
    out: dict[jax.Device, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out

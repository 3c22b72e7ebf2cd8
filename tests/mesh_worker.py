"""Run greedy generation under several meshes in one process with 8 virtual CPU devices.

``python -m tests.mesh_worker CHECKPOINT --meshes none tp=2 ... [--quantize int8] --prompts JSON``
prints one JSON object: per mesh, the token ids, and what each device holds of the weights and
the decode state. With ``--forward``, per checkpoint (several may be given) and mesh: the
logits of a forward pass over the prompts (all of one length) with the weights loaded sharded,
and the fraction of the first layer's weights each device holds. Run by ``tests/test_sharding.py``
and ``tests/test_families.py`` in a subprocess, because the device count is fixed when JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="+")
    ap.add_argument("--forward", action="store_true", help="logits of one forward pass per checkpoint and mesh")
    ap.add_argument("--meshes", nargs="+", required=True)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--max-prompt-len", type=int, default=64)
    args = ap.parse_args()

    import jax

    from jserve import LLM, model
    from jserve.sampling import SamplingParams
    from jserve.sharding import device_bytes

    prompts = json.loads(args.prompts)
    if args.forward:
        json.dump(forward_runs(args.checkpoint, args.meshes, prompts, args.quantize), sys.stdout)
        return 0
    [ckpt] = args.checkpoint
    out = {"devices": jax.device_count(), "runs": {}}
    for mesh in args.meshes:
        llm = LLM(ckpt, slots=args.slots, max_len=args.max_len,
                  max_prompt_len=args.max_prompt_len, quantize=args.quantize,
                  mesh=None if mesh == "none" else mesh, compile_cache=None)
        try:
            results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                                           ignore_eos=True))
            params, state = llm.engine.params, llm.engine.init_state()
            layer = model.layer_params(params, 0)  # stacked unsharded (model.loops_layers): a view
            leaves = {"wqkv": layer.wqkv, "wo": layer.wo, "w_gate_up": layer.w_gate_up, "w_down": layer.w_down,
                      "embed": params.embed, "lm_head": params.lm_head, "attn_norm": layer.attn_norm}
            k0 = state.cache.k if state.cache.stacked else state.cache.k[0]  # a stacked pool: all layers
            run = {
                "tokens": [r.token_ids for r in results],
                "params_total": sum(x.nbytes for x in jax.tree.leaves(params)),
                "params_per_device": sorted(device_bytes(params).values()),
                "state_total": sum(x.nbytes for x in jax.tree.leaves(state)),
                "state_per_device": sorted(device_bytes(state).values()),
                "cache_spec": list(getattr(k0.sharding, "spec", ())),
                "cache_shard_shape": list(k0.addressable_shards[0].data.shape),
                "cache_shape": list(k0.shape),
                "leaf_shard_fraction": {},
            }
            for name, x in leaves.items():
                if x is None:
                    continue
                arr = getattr(x, "q", getattr(x, "qs", x))  # int8 QuantArray, BlockArray, or an array
                run["leaf_shard_fraction"][name] = arr.addressable_shards[0].data.size / arr.size
            out["runs"][mesh] = run
        finally:
            llm.close(drain=False)
    json.dump(out, sys.stdout)
    return 0


def forward_runs(checkpoints: list[str], meshes: list[str], prompts: list[list[int]], quantize: str | None) -> dict:
    import dataclasses
    import pathlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import checkpoint, model, sharding

    out = {}
    for path in checkpoints:
        cfg = checkpoint.load_config(pathlib.Path(path))
        runs = out[path] = {}
        for mesh in meshes:
            plan = None if mesh == "none" else sharding.plan(sharding.make_mesh(mesh), cfg, 4)
            cfg, params, _ = checkpoint.load(pathlib.Path(path), quantize=quantize, plan=plan)
            cfg = cfg.for_context(len(prompts[0]))
            logits = jax.jit(model.logits_all, static_argnums=1)(params, cfg, jnp.array(prompts, jnp.int32))
            layer = model.layer_params(params, 0)  # stacked unsharded (model.loops_layers): a view
            fractions = {}
            for f in dataclasses.fields(layer):
                x = getattr(layer, f.name)
                if x is not None:
                    arr = getattr(x, "q", getattr(x, "qs", x))  # int8 QuantArray, BlockArray, or an array
                    fractions[f.name] = arr.addressable_shards[0].data.size / arr.size
            runs[mesh] = {"logits": np.asarray(logits).tolist(), "fractions": fractions}
    return out


if __name__ == "__main__":
    sys.exit(main())

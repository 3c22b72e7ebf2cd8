"""Where a decode step's time goes: the whole ``generate`` call at 1, 8 and 16 live rows, and its
parts timed as separately jitted functions on the same weights and shapes (SmolLM2 from the default
checkpoint, served as the server serves it: the stored blocks through the CPU kernels).

Parts (each over all 30 layers where it is per layer, so weights are read from memory as in a
step), each as this tree's ``model._layer`` runs it (separate ops, or folded into the kernel calls):
``norm+qkv`` RMSNorm + the q/k/v projection; ``rope`` RoPE of q and k; ``attention`` a decode step's attention
over ``--context`` cached positions of a bfloat16 page pool (no cache write), as the step runs it (the
CPU kernel where built, else the XLA loop); ``attention XLA`` the XLA loop itself (with
``--compare-attention``); ``o+residual`` the output projection
and residual add; ``mlp`` RMSNorm, gate/up, SiLU(gate) * up, down, residual add; ``unembed`` final
norm + 49152 x 576;
``penalties`` (none set: the skipped cond); ``sample`` temperature / top-k / top-p as the request
sets; ``pack`` the result row (no logprobs asked) and ``pack_logprobs`` (logprobs=0).
``ops`` counts the instructions of the compiled ``generate`` (entry computation, and every
computation it calls) as XLA:CPU runs them.

    python scripts/profile_step.py [--rows 1 8 16] [--reps 30] [--context 300] [--parts] [--compare-attention]

``--compare-attention`` also times the whole step with ``JSERVE_CPU_ATTENTION=0`` (variant ``xla-attn``:
the paged attention on XLA's blockwise loop instead of the CPU kernel).

Medians of interleaved rounds (process CPU time in parentheses, all threads).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import statistics
import sys
import time


def _timer(fn, args, reps):
    out = fn(*args)
    __import__("jax").block_until_ready(out)

    def once():
        t, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            out = fn(*args)
        __import__("jax").block_until_ready(out)
        return (time.perf_counter() - t) / reps, (time.process_time() - c) / reps
    return once


def count_ops(hlo: str) -> dict:
    """Instructions XLA:CPU runs for optimized HLO text: those of every computation that is not a
    fusion's body (a fusion or custom call counts once; parameters, constants, tuples, bitcasts
    not). Computations under a conditional count whichever branch runs, so this is an upper bound."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif cur and " = " in line:
            comps[cur].append(line)
    bodies = {c for v in comps.values() for ln in v if " fusion(" in ln for c in re.findall(r"calls=%?([\w.\-]+)", ln)}
    trivial = re.compile(r"= [^=]*? (parameter|constant|get-tuple-element|tuple|bitcast)\(")
    run = [ln for k, v in comps.items() if k not in bodies for ln in v if not trivial.search(ln)]
    return {"executed_ops": len(run), "custom_calls": sum("custom-call(" in ln for ln in run),
            "fusions": sum(" fusion(" in ln for ln in run)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=300, help="tokens in each live slot's cache")
    ap.add_argument("--parts", action="store_true", help="also time the parts")
    ap.add_argument("--compare-unfused", action="store_true",
                    help="also time this tree's step with the kernels fusing nothing (norms, residual adds apart)")
    ap.add_argument("--compare-attention", action="store_true",
                    help="also time the step and the attention part on the XLA attention loop (JSERVE_CPU_ATTENTION=0)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import checkpoint, model
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine, _pack
    from jserve.quant import dense
    from jserve.sampling import SamplingParams, SlotSampling, apply_penalties, sample

    ckpt = ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    cfg, weights = checkpoint.load_weights(ckpt)
    params = checkpoint.to_params(cfg, weights, jnp.float32, None)
    slots = max(args.rows)
    sp_req = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=10_000)
    result = {"rows": {}}
    timers = {}
    real_fuses = getattr(model, "fuses", None)
    variants = [""] + (["apart"] if args.compare_unfused else []) + (["xla-attn"] if args.compare_attention else [])
    for variant in variants:
        eng = JaxEngine(cfg, params, slots=slots, max_len=1024, max_prompt_len=1000, cache_dtype=jnp.bfloat16)
        state = eng.init_state()
        rng = np.random.default_rng(0)
        for s in range(slots):
            prompt = [int(t) for t in rng.integers(100, 40000, args.context)]
            state, _ = eng.prefill(state, s, prompt, sp_req, s)
        holder = {"state": state}
        if variant == "xla-attn":  # the XLA attention loop (traced now; unrolled: no reuse of the cached trace)
            os.environ["JSERVE_CPU_ATTENTION"] = "0"
            os.environ["JSERVE_UNROLLED_LAYERS"] = "1"
        elif variant:  # this tree's step with every op apart, as before the kernels fused any (traced now;
            # unrolled layers: the same program, and no reuse of the fused layer's cached trace)
            model.fuses = lambda x, w: False
            os.environ["JSERVE_UNROLLED_LAYERS"] = "1"
        for r in args.rows:
            fn = eng._compiled.get(("generate", r), eng._generate)
            slot_arr = np.arange(r, dtype=np.int32)
            live = np.ones((r,), bool)
            masks = eng._no_masks[r]
            lowered = eng._generate.lower(eng.params, state=holder["state"], slots=slot_arr, live=live, masks=masks)
            result["rows"][(variant, r)] = count_ops(lowered.compile().as_text())

            def step(fn=fn, slot_arr=slot_arr, live=live, masks=masks, holder=holder, p=eng.params):
                holder["state"], out = fn(p, state=holder["state"], slots=slot_arr, live=live, masks=masks)
                return out
            step()  # traced (and compiled) here, under this variant
            timers[(f"generate {variant}".strip(), r)] = (step, ())
        if real_fuses is not None:
            model.fuses = real_fuses
        os.environ.pop("JSERVE_UNROLLED_LAYERS", None)
        os.environ.pop("JSERVE_CPU_ATTENTION", None)
    params = eng.params
    rng = np.random.default_rng(1)

    if args.parts:
        d = cfg.dim
        # Each layer's weights (views of the stacks where the engine loops over layers: read in place).
        L = params.layers or tuple(model.layer_params(params, i) for i in range(cfg.n_layers))
        h = cfg.head_dim
        inv = model.rope_inv_freq(cfg, 0)
        eps = cfg.norm_eps
        fused = hasattr(model, "normed_dense")  # this tree folds norms etc. into the kernel calls
        for r in args.rows:
            x = jnp.asarray(rng.standard_normal((r, d)), jnp.float32)
            xo = jnp.asarray(rng.standard_normal((r, cfg.n_heads * h)), jnp.float32)

            def attn_in(ls, z):  # attention norm + q/k/v projection, 30 layers
                outs = [model.normed_dense(z, lay.attn_norm, eps, lay.wqkv) if fused
                        else dense(model.rms_norm(z, lay.attn_norm, eps), lay.wqkv) for lay in ls]
                return sum(o[:, :1].sum() for o in outs)

            def rope(z, pos):  # RoPE of q [R, 9, 64] and k [R, 3, 64], 30 layers
                q = z[:, :cfg.n_heads * h].reshape(-1, cfg.n_heads, h)
                k = z[:, cfg.n_heads * h:(cfg.n_heads + cfg.n_kv_heads) * h].reshape(-1, cfg.n_kv_heads, h)
                return sum((model.apply_rope(q + i, pos, inv).sum() + model.apply_rope(k + i, pos, inv).sum())
                           for i in range(len(L)))

            def attn_out(ls, z, o):  # o projection + residual add
                outs = [model._residual_dense(z, o, lay.wo) if fused else z + dense(o, lay.wo) for lay in ls]
                return sum(y[:, :1].sum() for y in outs)

            def mlp(ls, z):  # MLP norm, gate/up, activation, down, residual add
                outs = [model._mlp_residual(cfg, lay, z, 1) if fused
                        else z + model._mlp(cfg, lay, model.rms_norm(z, lay.mlp_norm, eps), 1) for lay in ls]
                return sum(y[:, :1].sum() for y in outs)

            qkv_in = jnp.asarray(rng.standard_normal((r, (cfg.n_heads + 2 * cfg.n_kv_heads) * h)), jnp.float32)
            timers[("norm+qkv", r)] = (jax.jit(attn_in), (L, x))
            timers[("rope", r)] = (jax.jit(rope), (qkv_in, jnp.arange(r)[:, None] + 300))
            timers[("o+residual", r)] = (jax.jit(attn_out), (L, x, xo))
            timers[("mlp (norm, gate_up, act, down, residual)", r)] = (jax.jit(mlp), (L, x))
            s_, b_ = slots, 128
            m_ = 1024 // b_
            kbits = jax.lax.bitcast_convert_type(  # a bfloat16 pool, as the engine above keeps it
                jnp.asarray(rng.standard_normal((s_ * m_, cfg.n_kv_heads, b_, h)), jnp.bfloat16), jnp.uint16)
            table = jnp.arange(s_ * m_, dtype=jnp.int32).reshape(s_, m_)
            from jserve.attention import _attend_blocks, attend_paged_cpu, attn_spec, paged_kernel

            def attend(q, kc, vc, pos, table, kernel):
                spec = attn_spec(cfg, 0)
                nb = jnp.max(pos) // kc.shape[2] + 1
                if kernel:
                    return sum(attend_paged_cpu(q[:, None] + i, kc, vc, jnp.arange(q.shape[0], dtype=jnp.int32),
                                                pos[:, None], spec, table).sum() for i in range(len(L)))
                return sum(_attend_blocks(q + i, kc, vc, pos, nb, spec, table).sum() for i in range(len(L)))
            qa = jnp.asarray(rng.standard_normal((r, cfg.n_kv_heads, cfg.q_per_kv, h)), jnp.float32)
            attn_args = (qa, kbits, kbits, jnp.full((r,), args.context, jnp.int32), table[:r])
            on = paged_kernel(kbits)
            timers[("attention (30 layers)", r)] = (jax.jit(functools.partial(attend, kernel=on)), attn_args)
            if args.compare_attention and on:
                timers[("attention XLA (30 layers)", r)] = (jax.jit(functools.partial(attend, kernel=False)), attn_args)
            timers[("unembed", r)] = (jax.jit(lambda p, z: model.unembed(p, cfg, z)), (params, x))
            v = cfg.vocab_size
            logits = jnp.asarray(rng.standard_normal((r, v)) * 3, jnp.float32)
            sp = jax.tree.map(lambda a, r=r: jnp.repeat(jnp.asarray(a), r, axis=0), SlotSampling.from_params(sp_req, 1))
            steps = jnp.arange(r, dtype=jnp.int32)
            timers[("sample", r)] = (jax.jit(sample), (logits, sp, steps))
            seen = jnp.zeros((r, v), bool)
            cnt = jnp.zeros((r, v), jnp.int32)
            timers[("penalties", r)] = (jax.jit(apply_penalties), (logits, sp, seen, cnt))
            tok = jnp.zeros((r,), jnp.int32)
            act = jnp.ones((r,), bool)
            timers[("pack", r)] = (jax.jit(lambda t, lg, a, lp: _pack(t, lg, a, lp, 0)),
                                   (tok, logits, act, jnp.full((r,), -1, jnp.int32)))
            timers[("pack_logprobs", r)] = (jax.jit(lambda t, lg, a, lp: _pack(t, lg, a, lp, 0)),
                                            (tok, logits, act, jnp.zeros((r,), jnp.int32)))

    onces = {k: _timer(f, a, args.reps) for k, (f, a) in timers.items()}
    times = {k: [] for k in onces}
    for _ in range(args.rounds):
        for k, once in onces.items():
            times[k].append(once())
    print("| part | rows | ms (wall) | ms (CPU) |")
    print("| --- | ---: | ---: | ---: |")
    out = []
    for (name, r), ts in times.items():
        w = 1000 * statistics.median(t[0] for t in ts)
        c = 1000 * statistics.median(t[1] for t in ts)
        out.append({"part": name, "rows": r, "ms": w, "cpu_ms": c})
        print(f"| {name} | {r} | {w:.2f} | {c:.2f} |")
    for (variant, r), ops in result["rows"].items():
        print(f"generate {variant} x {r} rows: {ops}".replace("  ", " "))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parts": out, "ops": {f"{v} {r}": o for (v, r), o in result["rows"].items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

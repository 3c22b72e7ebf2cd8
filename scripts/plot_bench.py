"""Plot benchmark JSON files into one PNG: decode throughput vs slots, and latency vs load.

- ``--engine A.json [B.json ...]``: from ``scripts/bench_engine.py --json``, one line per file
  (labelled by ``--engine-labels``): decode tokens/s against slots;
- ``--serving X.json [Y.json ...]``: from ``scripts/bench_serving.py --json`` at increasing load
  (``--rate`` or ``--concurrency``): median and p90 time to first token and inter-token latency
  against the request rate achieved.

    python scripts/plot_bench.py --engine f32.json int8d.json --engine-labels float32 int8-dynamic \\
        --serving rate1.json rate2.json rate4.json --out docs/perf.png

Needs matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=pathlib.Path, nargs="*", default=[])
    ap.add_argument("--engine-labels", nargs="*", default=None)
    ap.add_argument("--serving", type=pathlib.Path, nargs="*", default=[])
    ap.add_argument("--title", default="jserve, SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args(argv)
    if not args.engine and not args.serving:
        ap.error("give --engine and/or --serving JSON files")
    labels = args.engine_labels or [p.stem for p in args.engine]
    if len(labels) != len(args.engine):
        ap.error("--engine-labels needs one label per --engine file")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2

    panels = int(bool(args.engine)) + int(bool(args.serving))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if args.engine:
        ax = axes.pop(0)
        for path, label in zip(args.engine, labels):
            decode = json.loads(path.read_text())["decode"]
            ax.plot([d["slots"] for d in decode], [d["tokens_per_s"] for d in decode], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("slots (concurrent sequences)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("decode throughput vs slots")
        ax.grid(alpha=0.3)
        ax.legend()
    if args.serving:
        ax = axes.pop(0)
        runs = sorted((json.loads(p.read_text())["summary"] for p in args.serving),
                      key=lambda s: s["request_throughput"])
        rate = [s["request_throughput"] for s in runs]
        for key, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL")):
            ax.plot(rate, [s[key]["median"] for s in runs], marker="o", label=f"{name} median")
            ax.plot(rate, [s[key]["p90"] for s in runs], marker="x", linestyle="--", label=f"{name} p90")
        ax.set_yscale("log")
        ax.set_xlabel("requests/s completed")
        ax.set_ylabel("ms")
        ax.set_title("latency vs load (gRPC)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

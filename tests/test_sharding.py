"""Tensor/data parallel sharding on 8 virtual CPU devices, and a 2-process jax.distributed run.

The device count is fixed when JAX starts, so every sharded run happens in a subprocess
(``tests/mesh_worker.py``, or real servers); this process keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jserve import checkpoint
from jserve.config import tiny_config
from jserve.sharding import ShardingError, parse_mesh

from .servers import ServerProcess, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Varied prompts (token ids) for the tiny model; its untied random output projection makes the
# greedy continuations vary too, so a misplaced shard shows up as different tokens.
PROMPTS = [[5, 6, 7 + i, 100 + 37 * i, 2000 + 911 * i] for i in range(6)]


@pytest.fixture(scope="module")
def mesh_ckpt(tmp_path_factory):
    """Tiny model whose heads (8), KV heads (4), MLP width (128) and vocab divide by 2 and 4."""
    cfg = tiny_config(vocab_size=32768, n_heads=8, n_kv_heads=4, head_dim=8, ffn_dim=128, tie_embeddings=False)
    out = tmp_path_factory.mktemp("mesh") / "tiny8"
    checkpoint.save(out, cfg, checkpoint.random_weights(cfg, seed=3), None)
    return out


def run_worker(ckpt, meshes, prompts, quantize=None, max_tokens=16, **extra) -> dict:
    cmd = [sys.executable, "-m", "tests.mesh_worker", str(ckpt), "--meshes", *meshes, "--prompts",
           json.dumps(prompts), "--max-tokens", str(max_tokens)]
    if quantize:
        cmd += ["--quantize", quantize]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_checkpoint_arrays_are_stored_in_chunks_a_shard_can_read_alone(mesh_ckpt):
    import math

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(mesh_ckpt / "params")
    meta = getattr(meta, "item_metadata", meta)
    for name in ("embed", "lm_head"):  # 8 MiB each
        shape, chunk = tuple(meta[name].shape), tuple(meta[name].storage.chunk_shape)
        assert chunk != shape and math.prod(chunk) * 4 <= checkpoint.CHUNK_BYTES, (name, chunk)


def test_parse_mesh():
    assert parse_mesh("tp=4") == {"dp": 1, "tp": 4}
    assert parse_mesh("dp=2, tp=2") == {"dp": 2, "tp": 2}
    for bad, why in [("tp", "axis=size"), ("xp=2", "axis=size"), ("tp=0", ">= 1"), ("tp=two", "not an integer"),
                     ("tp=2,tp=2", "twice")]:
        with pytest.raises(ShardingError, match=why):
            parse_mesh(bad)


@pytest.mark.parametrize("quantize", [None, "int8"], ids=["f32", "int8"])
def test_sharded_greedy_equals_single_device_and_devices_hold_shards(mesh_ckpt, quantize):
    out = run_worker(mesh_ckpt, ["none", "tp=2", "tp=4", "dp=2,tp=2"], PROMPTS, quantize=quantize)
    assert out["devices"] == 8
    runs = out["runs"]
    single = runs["none"]["tokens"]
    assert len({tuple(t) for t in single}) > 1  # the prompts really lead to different outputs
    for mesh in ("tp=2", "tp=4", "dp=2,tp=2"):
        assert runs[mesh]["tokens"] == single, mesh

    for mesh, tp, dp in (("tp=2", 2, 1), ("tp=4", 4, 1), ("dp=2,tp=2", 2, 2)):
        run = runs[mesh]
        # every weight matrix is split over tp; norms (tiny) are replicated
        for name in ("wqkv", "wo", "w_gate_up", "w_down", "embed", "lm_head"):
            assert run["leaf_shard_fraction"][name] == pytest.approx(1 / tp), (mesh, name)
        assert run["leaf_shard_fraction"]["attn_norm"] == 1.0
        per_device = run["params_per_device"]
        assert len(per_device) == tp * dp and max(per_device) < run["params_total"] / tp * 1.05, mesh
        # the cache over slots (dp) and KV heads (tp)
        s, k, t, h = run["cache_shape"]
        assert run["cache_shard_shape"] == [s // dp, k // tp, t, h], mesh
        assert max(run["state_per_device"]) <= run["state_total"] / (tp * dp) * 1.05, mesh
    assert runs["dp=2,tp=2"]["cache_spec"] == ["dp", "tp", None, None]


def test_real_model_tp2_replicates_3_kv_heads_and_matches_hf(real_ckpt, reference):
    """SmolLM2 has 3 KV heads: tp=2 shards MLP and vocabulary and replicates attention."""
    cases = reference["cases"][:3]
    n = 16
    out = run_worker(real_ckpt, ["tp=2"], [c["prompt_ids"] for c in cases], max_tokens=n, slots=2)
    run = out["runs"]["tp=2"]
    for case, tokens in zip(cases, run["tokens"]):
        assert tokens == case["greedy_ids"][:n], case["id"]
    assert run["leaf_shard_fraction"]["wqkv"] == 1.0 and run["leaf_shard_fraction"]["wo"] == 1.0
    assert run["leaf_shard_fraction"]["w_gate_up"] == 0.5 and run["leaf_shard_fraction"]["embed"] == 0.5
    assert run["cache_shard_shape"] == run["cache_shape"]


def test_indivisible_dimension_is_refused_with_its_name(real_ckpt):
    code = ("import os; os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'\n"
            "from jserve import sharding, checkpoint\n"
            f"cfg = checkpoint.load_config(__import__('pathlib').Path({str(real_ckpt)!r}))\n"
            "mesh = sharding.make_mesh('tp=2')\n"
            "p = sharding.plan(mesh, cfg, 8)\n"
            "print(p.axes['kv_heads'], p.axes['heads'], p.axes['mlp'])\n"
            "sharding.plan(mesh, cfg, 8, indivisible='error')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["None", "None", "tp"]
    assert "ShardingError: cannot shard: kv_heads (3) does not divide over tp=2" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "from jserve import sharding; sharding.make_mesh('tp=4')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "needs 4 devices, 1 available" in proc.stderr and "xla_force_host_platform_device_count" in proc.stderr


def test_two_processes_serve_the_same_greedy_outputs_as_one(mesh_ckpt):
    flags = ["--slots", "4", "--max-len", "64", "--max-prompt-len", "32"]
    coord = f"127.0.0.1:{free_port()}"
    follower = subprocess.Popen(
        [sys.executable, "-m", "jserve.server", "--checkpoint", str(mesh_ckpt), "--port", "0", "--log-level",
         "WARNING", *flags, "--coordinator", coord, "--num-processes", "2", "--process-id", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        leader = ServerProcess(mesh_ckpt, *flags, "--coordinator", coord, "--num-processes", "2", "--process-id", "0")
        try:
            from jserve.client import Client

            with Client(leader.address) as client:
                two = [client.complete(p, max_tokens=12, temperature=0.0, ignore_eos=True).token_ids
                       for p in PROMPTS]
        finally:
            assert leader.stop() == 0
        assert follower.wait(60) == 0, follower.stderr.read()[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
    single = ServerProcess(mesh_ckpt, *flags)
    try:
        with Client(single.address) as client:
            one = [client.complete(p, max_tokens=12, temperature=0.0, ignore_eos=True).token_ids for p in PROMPTS]
    finally:
        single.stop()
    assert two == one and len({tuple(t) for t in one}) > 1

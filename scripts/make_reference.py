"""Write the HF transformers reference fixture the tests compare jserve against.

Runs Hugging Face transformers (PyTorch, CPU, float32) on the same GGUF file jserve
converts, so the reference shares only the weights with jserve, no code. Writes:

- ``tests/data/reference_smollm2.json``: for each prompt, HF's prompt token ids (tokenizer
  and chat template), its greedy continuation, the top-2 logit margin at every greedy step,
  and the top logits at the first generated position.
- ``tests/data/tiny_hf/<name>/``: tiny random Llama checkpoints in HF format
  (``config.json`` + ``model.safetensors``) with HF's logits for fixed token ids, used to
  test the safetensors converter (untied embeddings, Llama-3 RoPE scaling) with no torch
  at test time.

Needs ``pip install torch transformers accelerate`` (not a jserve dependency). Usage::

    python scripts/make_reference.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

PROMPTS = [
    {"id": "capital", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"id": "haiku", "messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {
        "id": "system",
        "messages": [
            {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    },
    {
        "id": "multiturn",
        "messages": [
            {"role": "user", "content": "Name a fruit that is yellow."},
            {"role": "assistant", "content": "A banana is yellow."},
            {"role": "user", "content": "And one that is red?"},
        ],
    },
    {"id": "raw_story", "prompt": "Once upon a time, in a small village by the river,"},
    {"id": "raw_code", "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"id": "raw_numbers", "prompt": "In 1969, 3 astronauts flew 384400 km to the Moon; the list: 1, 2, 3,"},
    {"id": "raw_unicode", "prompt": "Café, naïve, 東京 and emoji 🙂 are all"},
    # Input-grounded: the answer repeats its input, where speculative decoding's drafts are kept.
    {"id": "grounded_repeat", "messages": [{"role": "user", "content":
        "Repeat this sentence exactly: The old stone bridge over the river was built in 1820 by the village."}]},
    {"id": "grounded_list", "prompt": "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. "
                                      "Monday, Tuesday, Wednesday,"},
]

TINY_CONFIGS = {
    "untied": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "llama3_rope": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=300, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
}


def reference_smollm2(gguf_path: pathlib.Path, out: pathlib.Path, new_tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    model.eval()
    cases = []
    for p in PROMPTS:
        if "messages" in p:
            ids = tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        ids = [int(i) for i in ids]
        seq = list(ids)
        margins, first_top = [], None
        with torch.no_grad():
            for step in range(new_tokens):
                logits = model(torch.tensor([seq])).logits[0, -1].double().numpy()
                order = np.argsort(-logits)
                margins.append(float(logits[order[0]] - logits[order[1]]))
                if step == 0:
                    top = order[:20]
                    first_top = {"ids": top.tolist(), "logits": logits[top].tolist(),
                                 "logsumexp": float(np.log(np.exp(logits - logits.max()).sum()) + logits.max())}
                seq.append(int(order[0]))
        completion = seq[len(ids):]
        cases.append({**p, "prompt_ids": ids, "greedy_ids": completion,
                      "greedy_text": tok.decode(completion, skip_special_tokens=True),
                      "top2_margins": margins, "first_step_top": first_top})
        print(p["id"], repr(cases[-1]["greedy_text"][:80]))
    out.write_text(json.dumps({"model": gguf_path.name, "new_tokens": new_tokens,
                               "source": "transformers float32 CPU, from the GGUF", "cases": cases},
                              indent=1))


def reference_tiny(out_dir: pathlib.Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, cfg in TINY_CONFIGS.items():
        torch.manual_seed(1234)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
        with torch.no_grad():  # random norms so a transposed or missing norm shows up
            for n, prm in model.named_parameters():
                if "norm" in n:
                    prm.copy_(1.0 + 0.1 * torch.randn_like(prm))
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        rng = np.random.default_rng(7)
        ids = rng.integers(0, cfg["vocab_size"], size=(2, 100)).tolist()
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits.numpy()
        np.savez_compressed(d / "reference_logits.npz", ids=np.array(ids), logits=logits)
        print(name, "written", sorted(p.name for p in d.iterdir()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=pathlib.Path, required=True, help="path to SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/data"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-tiny", action="store_true", help="leave tests/data/tiny_hf as it is")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_tiny:
        reference_tiny(args.out / "tiny_hf")
    reference_smollm2(args.gguf, args.out / "reference_smollm2.json", args.new_tokens)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A Qwen3-0.6B-shaped Hugging Face folder with random bf16 weights, for speed runs only (its
output is noise): the shape of bench/make_qwen3_gguf.py (hidden 1024, 28 layers, 16 heads,
8 KV heads, head_dim 128, FFN 3072, vocab 151936, tied embeddings), as `config.json` +
`model.safetensors` + the real Qwen3 tokenizer files, which both wasmlm and transformers load.

    python3 bench/make_qwen3_safetensors.py QWEN3_TOKENIZER_DIR OUT_DIR

Needs numpy only (the safetensors file is written by hand: an 8-byte header length, a JSON
header, the raw little-endian tensors), so it runs on a GPU machine that reaches no registry.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 1024, 28, 16, 8, 128, 3072, 151936

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}


def bf16(a: np.ndarray) -> np.ndarray:
    """f32 → bf16 bits, rounded to nearest even (the way torch rounds)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype("<u2")


def tensors(rng: np.random.Generator):
    def matrix(rows, cols):
        return bf16(rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols))

    def norm(n):
        return bf16((1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    yield "model.embed_tokens.weight", matrix(VOCAB, HIDDEN)
    yield "model.norm.weight", norm(HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", norm(HIDDEN)
        yield f"{p}.post_attention_layernorm.weight", norm(HIDDEN)
        yield f"{p}.self_attn.q_norm.weight", norm(HEAD_DIM)
        yield f"{p}.self_attn.k_norm.weight", norm(HEAD_DIM)
        yield f"{p}.self_attn.q_proj.weight", matrix(HEADS * HEAD_DIM, HIDDEN)
        yield f"{p}.self_attn.k_proj.weight", matrix(KV_HEADS * HEAD_DIM, HIDDEN)
        yield f"{p}.self_attn.v_proj.weight", matrix(KV_HEADS * HEAD_DIM, HIDDEN)
        yield f"{p}.self_attn.o_proj.weight", matrix(HIDDEN, HEADS * HEAD_DIM)
        yield f"{p}.mlp.gate_proj.weight", matrix(FFN, HIDDEN)
        yield f"{p}.mlp.up_proj.weight", matrix(FFN, HIDDEN)
        yield f"{p}.mlp.down_proj.weight", matrix(HIDDEN, FFN)


def write_safetensors(path: str, items) -> int:
    """Writes `(name, bf16 array)` pairs; returns the bytes of tensor data."""
    header, blobs, offset = {}, [], 0
    for name, a in items:
        n = a.nbytes
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + n]}
        blobs.append(a)
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in blobs:
            f.write(a.tobytes())
    return offset


def main() -> None:
    tok_dir, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": 151645, "do_sample": False}, f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))
    size = write_safetensors(os.path.join(out, "model.safetensors"), tensors(np.random.default_rng(0)))
    print(f"wrote {out} ({size / 2**20:.0f} MiB of bf16 weights)")


if __name__ == "__main__":
    main()

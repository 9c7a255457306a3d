#!/usr/bin/env python3
"""The PyTorch transformers baseline of bench/gpu.sh: a Hugging Face folder on one GPU, bf16,
greedy, the KV cache on the device — the way a user of transformers would serve it.

    python3 bench/transformers_bench.py MODEL_DIR [--prompt 512] [--gen 128] [--batch 1,8]
        [--rounds 3] [--copy-gib 1] [--device cuda]

Prints `key=value` lines like `wasmlm bench`: per batch size, prefill tok/s (prompt tokens of
all sequences over the time of the first forward pass), decode tok/s (new tokens of all
sequences after the first, over the time they took), and time to first token; and once, the
device's copy bandwidth (bytes read + written per second by a device-to-device copy), which
bench/gpu.sh turns into the decode roofline. Best of `--rounds`, after a warm-up round.
`--device cpu` runs the same on the CPU: a dry run of the script (`DEVICE=cpu bench/gpu.sh`).
"""
import argparse
import platform
import time

import torch

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(gib: float) -> float:
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(10):
        if DEVICE == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            sync()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def run(model, batch: int, prompt: int, gen: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab - 1000, (batch, prompt), generator=g).to(DEVICE)
    with torch.inference_mode():
        # Prefill alone (what TTFT is made of) ...
        out, prefill_s = timed(lambda: model(input_ids=ids, use_cache=True))
        # ... then the whole generation; decode = total − its own prefill.
        def generate():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                                  pad_token_id=0)
        _, total_s = timed(generate)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "prefill_tok_s": batch * prompt / prefill_s,
        "decode_tok_s": batch * (gen - 1) / decode_s,
        "ttft_ms": prefill_s * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copy-gib", type=float, default=1.0)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device

    from transformers import AutoModelForCausalLM

    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else platform.processor()
    print(f"torch={torch.__version__} device=\"{name}\"")
    print(f"copy_bandwidth_gb_s={copy_bandwidth(a.copy_gib) / 1e9:.1f}")
    try:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    except TypeError:  # transformers before 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16)
    model = model.to(DEVICE).eval()
    vocab = model.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"weight_bytes={weight_bytes}")
    for b in [int(x) for x in a.batch.split(",")]:
        run(model, b, a.prompt, 8, vocab, seed=99)  # warm-up: kernels, allocator, cuBLAS plans
        best = {}
        for r in range(a.rounds):
            m = run(model, b, a.prompt, a.gen, vocab, seed=r)
            for k, v in m.items():
                better = min if k == "ttft_ms" else max
                best[k] = better(best.get(k, v), v)
        print(f"transformers batch={b} " + " ".join(f"{k}={v:.1f}" for k, v in best.items()))


if __name__ == "__main__":
    main()

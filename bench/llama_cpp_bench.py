#!/usr/bin/env python3
"""llama.cpp's prefill and decode speed on a GGUF, measured the way `wasmlm bench` measures
ours (forward passes only: a prompt of N tokens in one batch, then M single-token steps), so
the two can run back to back on the same machine and be compared as a ratio.

    pip install llama-cpp-python==0.3.36     # builds llama.cpp from source
    python3 bench/llama_cpp_bench.py MODEL.gguf [--threads 2] [--prompt-tokens 128]
        [--gen-tokens 128] [--rounds 3]

Prints one line: `llama.cpp prefill_tok_s=... decode_tok_s=...` (best of the rounds).
"""
import argparse
import time

from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--prompt-tokens", type=int, default=128)
p.add_argument("--gen-tokens", type=int, default=128)
p.add_argument("--rounds", type=int, default=3)
a = p.parse_args()

llm = Llama(model_path=a.model, n_ctx=a.prompt_tokens + a.gen_tokens + 8, n_batch=512,
            n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
text = b"The quick brown fox jumps over the lazy dog. " * 64
prompt = llm.tokenize(text, add_bos=False)[: a.prompt_tokens]
best_pre, best_dec = 0.0, 0.0
for _ in range(a.rounds):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(a.gen_tokens):
        llm.eval([prompt[0]])
    t2 = time.perf_counter()
    best_pre = max(best_pre, len(prompt) / (t1 - t0))
    best_dec = max(best_dec, a.gen_tokens / (t2 - t1))
print(f"llama.cpp prefill_tok_s={best_pre:.1f} decode_tok_s={best_dec:.1f}")

#!/usr/bin/env python3
"""Sentence embeddings per second: a wasmlm node (`POST /v1/embeddings`) against
sentence-transformers in process, on the same model folder, texts and thread count, back to
back in one run (report the ratio, not the absolute numbers: these machines are shared).

    wasmlm serve --model all-minilm-l6-v2 --threads 2 --listen 127.0.0.1:8090 &
    pip install sentence-transformers==6.2.0      # and torch
    python3 bench/embeddings_baseline.py http://127.0.0.1:8090 MODEL_DIR [--threads 2]
"""
import argparse
import json
import time
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("base")
p.add_argument("model_dir")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--sentences", type=int, default=256)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--rounds", type=int, default=3)
a = p.parse_args()

words = "the quick brown fox jumps over a lazy dog while rain falls on quiet city streets".split()
texts = [" ".join(words[: 4 + i % 12]) + f" {i}." for i in range(a.sentences)]
batches = [texts[i:i + a.batch] for i in range(0, len(texts), a.batch)]


def ours():
    for b in batches:
        req = urllib.request.Request(
            a.base + "/v1/embeddings",
            data=json.dumps({"model": "all-minilm-l6-v2", "input": b}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            assert len(json.load(r)["data"]) == len(b)


import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

torch.set_num_threads(a.threads)
st = SentenceTransformer(a.model_dir, device="cpu")


def theirs():
    st.encode(texts, batch_size=a.batch)


def best(f):
    f()  # warm-up
    times = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return a.sentences / min(times)


w = best(ours)
s = best(theirs)
print(f"wasmlm sentences_per_s={w:.1f} sentence-transformers sentences_per_s={s:.1f} "
      f"ratio={w / s:.2f}")

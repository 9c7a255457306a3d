"""Streamed decode through the Responses and Anthropic Messages APIs against the same answer
through Chat Completions.

    python3 bench/api_stream.py BASE_URL [MODEL] [MAX_TOKENS]

Both requests are greedy, run to `max_tokens` (`ignore_eos`) and are read as the openai SDK
reads them (`responses.create(stream=True)` typed events, `chat.completions.create(stream=True)`
chunks), with logprobs on so each event carries some weight, and as raw bytes (Messages only
so: its SDK is not the openai one, and its events carry no logprobs) (the node's
side alone: the SDK's parsing of typed events costs the client more than chat's chunks). Time
from the request to the last byte over the tokens; five rounds, the paths alternating; prints
tok/s and the median ratios.
"""
import json
import sys
import time
import urllib.request

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 200
PROMPT = "Write a long story about a cat."


def chat():
    text = ""
    for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0,
            max_tokens=max_tokens, stream=True, logprobs=True, top_logprobs=2,
            extra_body={"ignore_eos": True}):
        for ch in c.choices:
            text += ch.delta.content or ""
    return text


def responses():
    text = ""
    for e in client.responses.create(model=model, input=PROMPT, temperature=0,
                                     max_output_tokens=max_tokens, stream=True, top_logprobs=2,
                                     extra_body={"ignore_eos": True}):
        if e.type == "response.output_text.delta":
            text += e.delta
    return text


def raw(path, body):
    def run():
        base = sys.argv[1].rsplit("/v1", 1)[0] + "/v1"
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return r.read()
    return run


RAW_CHAT = raw("/chat/completions", {
    "model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
    "max_tokens": max_tokens, "stream": True, "logprobs": True, "top_logprobs": 2,
    "ignore_eos": True})
RAW_RESPONSES = raw("/responses", {
    "model": model, "input": PROMPT, "temperature": 0, "max_output_tokens": max_tokens,
    "stream": True, "top_logprobs": 2, "ignore_eos": True})

RAW_MESSAGES = raw("/messages", {
    "model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
    "max_tokens": max_tokens, "stream": True, "ignore_eos": True})
RAW_CHAT_PLAIN = raw("/chat/completions", {
    "model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
    "max_tokens": max_tokens, "stream": True, "ignore_eos": True})

rates = {"chat": [], "responses": [], "chat raw": [], "responses raw": [],
         "chat raw, no logprobs": [], "messages raw, no logprobs": []}
texts = {}
for rnd in range(5):
    for name, run in (("chat", chat), ("responses", responses), ("chat raw", RAW_CHAT),
                      ("responses raw", RAW_RESPONSES), ("chat raw, no logprobs", RAW_CHAT_PLAIN),
                      ("messages raw, no logprobs", RAW_MESSAGES)):
        t = time.time()
        texts[name] = run()
        rates[name].append(max_tokens / (time.time() - t))
assert texts["chat"] == texts["responses"], "the two paths answered differently"
for name, v in rates.items():
    print(name, "tok/s", ["%.1f" % x for x in v])
for a, b in (("responses", "chat"), ("responses raw", "chat raw"),
             ("messages raw, no logprobs", "chat raw, no logprobs")):
    ratios = sorted(x / y for x, y in zip(rates[a], rates[b]))
    print(f"{a}/{b} streamed tok/s, median of 5 rounds: {ratios[2]:.3f}")

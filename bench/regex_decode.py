"""Decode speed of an answer held to vLLM's `guided_regex` against the same answer free.

    python3 bench/regex_decode.py BASE_URL [MODEL] [MAX_TOKENS]

Both requests are greedy and run to `max_tokens` (`ignore_eos`); the regex takes letters and
punctuation, so most tokens of an English answer pass it and the mask walks most of the
vocabulary's trie each step. Three rounds, the two alternating; prints tok/s and the median
ratio.
"""
import sys
import time

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 100
PROMPT = [{"role": "user", "content": "Write a long story about a cat."}]
REGEX = "[A-Za-z ,.'!?\n]+"

rates = {"free": [], "regex": []}
for rnd in range(3):
    for name, extra in (("free", {}), ("regex", {"guided_regex": REGEX})):
        t = time.time()
        r = client.chat.completions.create(model=model, messages=PROMPT, temperature=0,
                                           max_tokens=max_tokens,
                                           extra_body={"ignore_eos": True, **extra})
        rates[name].append(r.usage.completion_tokens / (time.time() - t))
        if rnd == 0:
            print(name, r.choices[0].finish_reason, repr(r.choices[0].message.content[:80]))
for name, v in rates.items():
    print(name, "tok/s", ["%.1f" % x for x in v])
ratios = sorted(a / b for a, b in zip(rates["regex"], rates["free"]))
print(f"regex/free tok/s, median of 3 rounds: {ratios[1]:.3f}")

"""Decode speed inside a string under a JSON Schema `pattern` against the same string without one.

    python3 bench/json_pattern.py BASE_URL [MODEL] [MAX_TOKENS]

Both requests hold the output in one string (`minLength` 2000, so `max_tokens` ends them) and
are greedy; three rounds, the two alternating; prints tok/s and the median ratio.
"""
import sys
import time

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 100
PROMPT = [{"role": "user", "content": "Write a long story about a cat as JSON with one key, story."}]
PATTERN = "^[A-Za-z ,.'!?]+$"


def schema(extra):
    story = {"type": "string", "minLength": 2000, **extra}
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"story": story}, "required": ["story"]}}}


rates = {"plain": [], "pattern": []}
for rnd in range(3):
    for name, extra in (("plain", {}), ("pattern", {"pattern": PATTERN})):
        t = time.time()
        r = client.chat.completions.create(model=model, messages=PROMPT, temperature=0,
                                           max_tokens=max_tokens, response_format=schema(extra))
        rates[name].append(r.usage.completion_tokens / (time.time() - t))
        if rnd == 0:
            print(name, r.choices[0].finish_reason, repr(r.choices[0].message.content[:80]))
for name, v in rates.items():
    print(name, "tok/s", ["%.1f" % x for x in v])
ratios = sorted(a / b for a, b in zip(rates["pattern"], rates["plain"]))
print(f"pattern/plain tok/s, median of 3 rounds: {ratios[1]:.3f}")

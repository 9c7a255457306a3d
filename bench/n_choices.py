"""n choices in one request against the same choices as requests in turn, on a running node.
Usage: python3 bench/n_choices.py http://127.0.0.1:8080   (node: wasmlm serve --slots 4)

Two cases, three rounds each: a ~1,900-token prompt with max_tokens 4 (where computing the
prompt again on other slots would cost more than batching saves) and a short prompt with
max_tokens 48 (where the choices spread over idle slots and decode in one batch).
"""
import json, sys, time, urllib.request
base = sys.argv[1]
def post(body):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return time.time() - t, out
doc = ("The lighthouse keeper walked the long stair each evening, counting the steps and "
       "listening to the sea against the rocks below. ") * 80
for label, text, gen in (("long prompt, max_tokens=4", doc + "\nSummarize in one word.", 4),
                         ("short prompt, max_tokens=48", "Write a poem.", 48)):
    for rnd in range(3):
        # Each its own prompt (the round and the path first), so neither finds the other's cache.
        ask = lambda tag: {"model": "smollm2", "messages": [{"role": "user", "content": f"{rnd}{tag} {text}"}],
                           "temperature": 1.0, "max_tokens": gen, "ignore_eos": True}
        t1, o = post({**ask("n"), "seed": 7, "n": 4})
        tt = 0
        for i in range(4):
            t, _ = post({**ask("t"), "seed": 7 + i})
            tt += t
        print(f"{label} round={rnd} prompt_tokens={o['usage']['prompt_tokens']} n4_s={t1:.2f} in_turn_s={tt:.2f} ratio={tt/t1:.2f}", flush=True)

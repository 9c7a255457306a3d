"""llama.cpp's JSON mode against its free text, greedy, on the request of `wasmlm bench-serve`'s
JSON rounds. Usage: llama_cpp_json.py GGUF GEN_TOKENS ROUNDS THREADS

Prints one line per round (decode tok/s both ways, streamed, first to last token) and the
median ratio json/free. llama-cpp-python's `json_object` is a GBNF grammar of any JSON value.
"""
import statistics
import sys
import time

from llama_cpp import Llama

path, gen, rounds, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, verbose=False)


def run(round_, json_mode):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"List {round_}: write a JSON object that lists 40 countries, "
                                        "each with its capital, population and area."}]
    kw = {"response_format": {"type": "json_object"}} if json_mode else {}
    first = last = None
    n = 0
    for c in llm.create_chat_completion(messages=msgs, temperature=0, max_tokens=gen, stream=True, **kw):
        if c["choices"][0]["delta"].get("content"):
            n += 1
            last = time.perf_counter()
            first = first or last
    return (n - 1) / (last - first), n


ratios = []
for r in range(rounds):
    free, nf = run(r, False)
    js, nj = run(r, True)
    ratios.append(js / free)
    print(f"round={r} llama_free_decode_tok_s={free:.1f} llama_json_decode_tok_s={js:.1f} "
          f"json_tokens={nj}", flush=True)
print(f"median ratio llama.cpp json mode/free text decode={statistics.median(ratios):.3f}")

"""Drives the edge gateway with the official openai SDK, as a client of one node would.
Usage: openai_gateway.py BASE_URL KEY

Each check prints its name; any failure raises and exits non-zero.
"""
import sys

import openai

BASE, KEY = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name the capital of France."},
]


def check(name):
    def wrap(f):
        f()
        print(f"ok  {name}", flush=True)
        return f
    return wrap


@check("non-streaming chat")
def _():
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@check("streaming chat")
def _():
    stream = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert "Paris" in text, text
    assert usage is not None and usage.completion_tokens > 0


@check("device preference as a header and as a body field")
def _():
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=QUESTION, max_tokens=2, extra_headers={"X-GPU-Preference": "L40S"},
    )
    assert raw.headers["x-served-device"] == "L40S", raw.headers
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=QUESTION, max_tokens=2, extra_body={"gpu_preference": "A10G"},
    )
    assert raw.headers["x-served-device"] == "A10G", raw.headers


@check("incompatible preference is a BadRequestError")
def _():
    try:
        client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=2, extra_headers={"X-GPU-Preference": "A100"},
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "gpu_preference", e.body
        assert "L40S" in e.body["message"], e.body
    else:
        raise AssertionError("expected a 400")


@check("models list")
def _():
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2"], ids


@check("completions")
def _():
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.choices[0].text, r


@check("responses, whole and streamed")
def _():
    r = client.responses.create(model="smollm2", instructions=QUESTION[0]["content"],
                                input=QUESTION[1]["content"], temperature=0, max_output_tokens=24)
    assert r.status == "completed" and "Paris" in r.output_text, r
    with client.responses.stream(model="smollm2", input=QUESTION[1:], temperature=0,
                                 max_output_tokens=24) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        assert text == stream.get_final_response().output_text and text, text


@check("Anthropic's messages, with the key as x-api-key")
def _():
    import json
    import urllib.error
    import urllib.request
    body = {"model": "smollm2", "max_tokens": 24, "temperature": 0,
            "system": QUESTION[0]["content"], "messages": QUESTION[1:]}
    req = urllib.request.Request(BASE.rsplit("/v1", 1)[0] + "/v1/messages",
                                 data=json.dumps(body).encode(),
                                 headers={"x-api-key": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        m = json.loads(r.read())
    assert m["type"] == "message" and "Paris" in m["content"][0]["text"], m
    assert m["stop_reason"] == "end_turn", m
    # The gateway's own errors (an unknown model, a wrong key) take Anthropic's shape too.
    for model, key, status, kind in (("nope", KEY, 404, "not_found_error"),
                                     ("smollm2", "wrong", 401, "authentication_error")):
        req = urllib.request.Request(BASE.rsplit("/v1", 1)[0] + "/v1/messages",
                                     data=json.dumps({**body, "model": model}).encode(),
                                     headers={"x-api-key": key, "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as e:
            err = json.loads(e.read())
            assert e.code == status and err["type"] == "error", (e.code, err)
            assert err["error"]["type"] == kind and err["error"]["message"], err
        else:
            raise AssertionError(f"{model} with key {key} was accepted")

"""Drives a wasmlm node with the official anthropic SDK (the Messages API).
Usage: anthropic_sdk.py BASE_URL

Each check prints its name; any failure raises and exits non-zero.
"""
import json
import sys
import urllib.request

import anthropic

BASE = sys.argv[1]
KEY = "test-key"
client = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
SYSTEM = "You are a helpful assistant."
QUESTION = [{"role": "user", "content": "Name the capital of France."}]
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# This SDK's `create` has no sampling arguments; the node reads them from the body as chat.
GREEDY = {"temperature": 0}


def chat(body):
    """The node's own /v1/chat/completions, to hold the Messages answers against."""
    req = urllib.request.Request(
        BASE + "/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def check(name):
    def wrap(f):
        f()
        print(f"ok  {name}", flush=True)
        return f
    return wrap


@check("messages: the same greedy answer as chat; count_tokens counts its prompt")
def _():
    want = chat({"model": "smollm2", "temperature": 0, "max_tokens": 24,
                 "messages": [{"role": "system", "content": SYSTEM}] + QUESTION})
    m = client.messages.create(model="smollm2", system=SYSTEM, messages=QUESTION,
                               max_tokens=24, extra_body=GREEDY)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant", m
    (block,) = m.content
    assert block.type == "text" and block.text == want["choices"][0]["message"]["content"], m
    assert m.stop_reason == "end_turn" and m.stop_sequence is None, m
    u = m.usage
    assert u.input_tokens + u.cache_read_input_tokens == want["usage"]["prompt_tokens"], u
    assert u.cache_read_input_tokens > 0  # the chat call's prefix, on this slot
    assert u.output_tokens == want["usage"]["completion_tokens"], u
    n = client.messages.count_tokens(model="smollm2", system=SYSTEM, messages=QUESTION)
    assert n.input_tokens == want["usage"]["prompt_tokens"], n
    cut = client.messages.create(model="smollm2", messages=QUESTION, max_tokens=2)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2, cut


@check("messages: the stream helper's text adds up to the final message")
def _():
    with client.messages.stream(model="smollm2", system=SYSTEM, messages=QUESTION,
                                max_tokens=24, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in text and final.content[0].text == text, (text, final)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0, final
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > 20, final.usage
    # message_start already counts the prompt, as Anthropic's does.
    events = list(client.messages.create(model="smollm2", system=SYSTEM, messages=QUESTION,
                                         max_tokens=4, stream=True, extra_body=GREEDY))
    start = events[0]
    assert start.type == "message_start", start
    n = client.messages.count_tokens(model="smollm2", system=SYSTEM, messages=QUESTION)
    u = start.message.usage
    assert u.input_tokens + u.cache_read_input_tokens == n.input_tokens, (u, n)


@check("messages: stop_sequences end with stop_reason stop_sequence, whole and streamed")
def _():
    m = client.messages.create(model="smollm2", system=SYSTEM, messages=QUESTION, max_tokens=24,
                               stop_sequences=["Berlin", "Paris"], extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris", m
    assert "Paris" not in m.content[0].text, m
    with client.messages.stream(model="smollm2", system=SYSTEM, messages=QUESTION, max_tokens=24,
                                stop_sequences=["Paris"], extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text, (text, m)
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "Paris", final


@check("messages: parse() with a pydantic output_format")
def _():
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        country: str

    m = client.messages.parse(model="smollm2", max_tokens=60, extra_body=GREEDY,
                              messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                              output_format=City)
    assert isinstance(m.parsed_output, City), m.content


@check("messages: a forced tool_use, and its tool_result sent back")
def _():
    m = client.messages.create(model="smollm2", messages=WEATHER, tools=[WEATHER_TOOL],
                               tool_choice={"type": "tool", "name": "get_weather"},
                               max_tokens=60, extra_body=GREEDY)
    assert m.stop_reason == "tool_use", m
    (use,) = m.content
    assert use.type == "tool_use" and use.name == "get_weather", use
    assert use.id.startswith("toolu_") and set(use.input) == {"city"}, use
    later = client.messages.create(
        model="smollm2", tools=[WEATHER_TOOL], max_tokens=16, extra_body=GREEDY,
        messages=WEATHER + [{"role": "assistant", "content": m.content},
                            {"role": "user", "content": [
                                {"type": "tool_result", "tool_use_id": use.id,
                                 "content": '{"sky": "sunny"}'}]}])
    assert later.content[0].type == "text" and later.content[0].text, later


# Qwen3 with random weights writes no think block or tool call by itself: vLLM's
# `guided_choice` scripts one, and the node must split it into blocks.
SCRIPT = ("<think>\nThe user wants the weather in Paris.\n</think>\n\n<tool_call>\n"
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@check("messages: qwen3's thinking and tool_use blocks, whole and streamed")
def _():
    args = dict(model="qwen3", messages=WEATHER, tools=[WEATHER_TOOL], max_tokens=100,
                extra_body={"guided_choice": [SCRIPT], **GREEDY})
    m = client.messages.create(**args)
    assert [b.type for b in m.content] == ["thinking", "tool_use"], m.content
    assert m.content[0].thinking == "The user wants the weather in Paris."
    assert m.content[1].input == {"city": "Paris"} and m.stop_reason == "tool_use", m
    with client.messages.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_message()
    thought = "".join(e.delta.thinking for e in events
                      if e.type == "content_block_delta" and e.delta.type == "thinking_delta")
    assert thought == "The user wants the weather in Paris.", thought
    assert [b.type for b in final.content] == ["thinking", "tool_use"], final.content
    assert final.content[1].input == {"city": "Paris"}, final.content
    # `thinking` disabled turns Qwen3's template switch off: no think block.
    plain = client.messages.create(model="qwen3", messages=WEATHER, max_tokens=20,
                                   thinking={"type": "disabled"},
                                   extra_body={"guided_choice": ["It is sunny."]})
    assert [b.type for b in plain.content] == ["text"], plain.content


@check("messages: errors in Anthropic's shape")
def _():
    for call, error, words in (
        (lambda: client.messages.create(
            model="smollm2", max_tokens=4,
            messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}}]}]),
         anthropic.BadRequestError, "'image'"),
        (lambda: client.messages.create(model="claude-x", max_tokens=4, messages=QUESTION),
         anthropic.NotFoundError, "claude-x"),
        (lambda: client.messages.create(model="smollm2", max_tokens=4, messages=QUESTION,
                                        tools=[{"type": "web_search_20250305",
                                                "name": "web_search"}]),
         anthropic.BadRequestError, "web_search_20250305"),
        (lambda: anthropic.Anthropic(base_url=BASE, api_key="wrong", max_retries=0)
         .messages.create(model="smollm2", max_tokens=4, messages=QUESTION),
         anthropic.AuthenticationError, "API key"),
    ):
        try:
            call()
        except error as e:
            assert e.body["type"] == "error" and words in e.body["error"]["message"], e.body
        else:
            raise AssertionError(f"no {error.__name__}")


print("all Anthropic SDK checks passed")

"""Drives a wasmlm node with the official openai SDK.
Usage: openai_sdk.py BASE_URL BUSY_URL MINILM_VECTORS_JSONL

Each check prints its name; any failure raises and exits non-zero.
"""
import json
import sys

import openai

BASE, BUSY, EMBEDDING_VECTORS = sys.argv[1], sys.argv[2], sys.argv[3]
KEY = "test-key"
client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = [SYSTEM, {"role": "user", "content": "Name the capital of France."}]


def node_post(path, body):
    """POSTs `body` to one of the node's own (non-OpenAI) routes and returns its JSON."""
    import urllib.request
    req = urllib.request.Request(
        BASE.rsplit("/v1", 1)[0] + path, data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def token_id(model, text):
    (t,) = node_post("/tokenize", {"model": model, "content": text})["tokens"]
    return t


def check(name):
    def wrap(f):
        f()
        print(f"ok  {name}", flush=True)
        return f
    return wrap


@check("non-streaming chat")
def _():
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert "Paris" in c.message.content, c.message.content
    assert c.finish_reason == "stop", c.finish_reason
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.model == "smollm2" and r.object == "chat.completion"


@check("streaming chat with include_usage")
def _():
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24,
        stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1]), finishes
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens


@check("completions, plain and streaming")
def _():
    r = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=6)
    assert r.object == "text_completion" and r.choices[0].text, r
    s = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=6, stream=True) if c.choices)
    assert s == r.choices[0].text, (s, r.choices[0].text)
    two = client.completions.create(model="smollm2", prompt=["One", "Two"], max_tokens=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]


@check("models")
def _():
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2", "qwen3", "minilm"], ids
    assert client.models.retrieve("smollm2").id == "smollm2"


@check("seeds reproduce and differ")
def _():
    def sample(seed):
        return client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Write a poem."}],
            temperature=1.0, max_tokens=16, seed=seed).choices[0].message.content
    a = sample(42)
    assert sample(42) == a
    assert any(sample(s) != a for s in (1, 2, 3))


@check("n: several choices, one per seed, the prompt counted once")
def _():
    poem = [{"role": "user", "content": "Write a poem."}]
    ask = dict(model="smollm2", messages=poem, temperature=1.0, max_tokens=16)
    one = client.chat.completions.create(seed=42, **ask)
    r = client.chat.completions.create(seed=42, n=3, **ask)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2], r.choices
    # Choice i samples with seed + i: the first is the n=1 answer, the others differ.
    assert texts[0] == one.choices[0].message.content, texts
    assert len(set(texts)) > 1, texts
    assert texts[1] == client.chat.completions.create(seed=43, **ask).choices[0].message.content
    assert r.usage.prompt_tokens == one.usage.prompt_tokens, r.usage
    assert r.usage.completion_tokens > one.usage.completion_tokens, r.usage
    # Streamed: each choice's deltas carry its index and join to the same texts.
    got, finish = ["", "", ""], [None] * 3
    for chunk in client.chat.completions.create(seed=42, n=3, stream=True, **ask):
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert got == texts and None not in finish, (got, texts, finish)
    # Completions: choices of each prompt in a row.
    r = client.completions.create(model="smollm2", prompt=["One", "Two"], max_tokens=2,
                                  temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != "" and r.choices[2].text == r.choices[3].text
    for bad in (0, 17):
        try:
            client.chat.completions.create(n=bad, **ask)
        except openai.BadRequestError as e:
            assert "'n'" in e.message, e.message
        else:
            raise AssertionError(f"n={bad} was accepted")


@check("stop strings, stop_token_ids and vLLM's stop_reason")
def _():
    ask = lambda **kw: client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, **kw).choices[0]
    c = ask(stop=["Paris"])
    assert "Paris" not in c.message.content and c.finish_reason == "stop", c
    assert c.stop_reason == "Paris", c
    # The model's own end of turn is no stop string.
    whole = ask()
    assert whole.finish_reason == "stop" and whole.stop_reason is None, whole
    kept = ask(stop=["Paris"], extra_body={"include_stop_str_in_output": True})
    assert kept.message.content == c.message.content + "Paris" and kept.stop_reason == "Paris", kept
    # A stop token: its text is not returned, and it ends the answer even past ignore_eos.
    paris = token_id("smollm2", " Paris")
    t = ask(extra_body={"stop_token_ids": [paris], "ignore_eos": True})
    assert t.message.content == c.message.content.rstrip(), (t, c)
    assert t.finish_reason == "stop" and t.stop_reason == paris, t
    t = ask(extra_body={"stop_token_ids": [paris], "include_stop_str_in_output": True})
    assert t.message.content == kept.message.content and t.stop_reason == paris, t
    # Streamed: the finishing chunk carries it.
    last = [ch for ch in client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, stop=["Paris"],
        stream=True) if ch.choices][-1].choices[0]
    assert last.finish_reason == "stop" and last.stop_reason == "Paris", last
    # Completions too.
    p = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                  max_tokens=8, stop=[" Paris"]).choices[0]
    assert p.finish_reason == "stop" and p.stop_reason == " Paris" and p.text == "", p
    try:
        ask(extra_body={"stop_token_ids": [10**7]})
        raise AssertionError("a stop token outside the vocabulary was accepted")
    except openai.BadRequestError as e:
        assert "stop_token_ids" in e.message, e.message


@check("logprobs")
def _():
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lps)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4 for t in lps)


CAT = [SYSTEM, {"role": "user", "content": "Describe a cat as a JSON object with the keys name, age and color."}]


def free_answer_fails(parse, error):
    """The unconstrained greedy answer to CAT does not parse: else a check proves nothing."""
    free = client.chat.completions.create(model="smollm2", messages=CAT, temperature=0, max_tokens=200)
    try:
        parse(free.choices[0].message.content)
    except error:
        return
    raise AssertionError(f"the unconstrained answer passes {parse}: this check proves nothing")


@check("JSON mode: response_format json_object")
def _():
    # Left alone, this model fences its JSON in Markdown and explains it: not JSON.
    free_answer_fails(json.loads, json.JSONDecodeError)
    r = client.chat.completions.create(
        model="smollm2", messages=CAT, temperature=0, max_tokens=200,
        response_format={"type": "json_object"})
    c = r.choices[0]
    assert isinstance(json.loads(c.message.content), dict), c.message.content
    assert c.finish_reason == "stop", c
    # Sampled and streamed: one whole object each time, and nothing after it.
    for seed in (1, 2, 3):
        stream = client.chat.completions.create(
            model="smollm2", messages=CAT, temperature=1.0, seed=seed, max_tokens=300, stream=True,
            response_format={"type": "json_object"})
        text, finish = "", None
        for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        assert finish == "stop", (seed, finish, text)
        assert isinstance(json.loads(text), dict), (seed, text)
    # A schema keyword the node cannot follow is refused, not ignored.
    try:
        client.chat.completions.create(
            model="smollm2", messages=CAT, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": {
                "type": "object", "properties": {"age": {"type": "integer", "multipleOf": 2}}}}})
    except openai.BadRequestError as e:
        assert "multipleOf" in e.message, e.message
    else:
        raise AssertionError("a schema with multipleOf was accepted")


@check("structured outputs: parse() with a pydantic model (json_schema)")
def _():
    import enum
    from typing import Optional

    import pydantic

    class Color(str, enum.Enum):
        black = "black"
        white = "white"
        ginger = "ginger"

    class Owner(pydantic.BaseModel):
        name: str

    class Cat(pydantic.BaseModel):
        name: str
        age: int
        color: Color
        weight: Optional[float]
        owner: Owner

    free_answer_fails(Cat.model_validate_json, pydantic.ValidationError)
    # The SDK sends the model's strict schema ($defs, $ref, an enum, anyOf with null) and
    # validates the answer against the model.
    for temperature, seed in ((0, 0), (1.0, 1), (1.0, 2)):
        r = client.beta.chat.completions.parse(
            model="smollm2", messages=CAT, response_format=Cat, temperature=temperature, seed=seed,
            max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        assert isinstance(c.message.parsed, Cat), c.message
        assert list(json.loads(c.message.content)) == ["name", "age", "color", "weight", "owner"]


@check("logit_bias: -100 bans a token, 100 all but forces it")
def _():
    paris = token_id("smollm2", " Paris")
    tokens = lambda r: [t.token for t in r.choices[0].logprobs.content]
    ask = lambda **kw: client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                                      max_tokens=8, logprobs=True, **kw)
    assert " Paris" in tokens(ask()), tokens(ask())
    banned = ask(logit_bias={str(paris): -100})
    assert " Paris" not in tokens(banned), tokens(banned)
    assert tokens(ask(logit_bias={str(paris): 100}))[0] == " Paris"
    for bad, words in (({"Paris": 1}, "logit_bias"), ({str(paris): 101}, "logit_bias"),
                       ({"99999999": 1}, "outside the vocabulary")):
        try:
            ask(logit_bias=bad)
        except openai.BadRequestError as e:
            assert words in e.message, e.message
        else:
            raise AssertionError(f"logit_bias {bad} was accepted")


REVIEW = [SYSTEM, {"role": "user", "content": "Review the film Alien as JSON with a title, stars out of "
                                               "five, a score from 0 to 1 and some tags."}]


@check("structured outputs: pydantic bounds (string lengths, item counts, number ranges)")
def _():
    from typing import Annotated

    import pydantic
    from pydantic import Field

    class Review(pydantic.BaseModel):
        title: str = Field(min_length=3, max_length=12)
        stars: int = Field(ge=1, le=5)
        score: float = Field(gt=0, lt=1)
        tags: list[Annotated[str, Field(max_length=10)]] = Field(min_length=1, max_length=3)

    class Loose(pydantic.BaseModel):
        title: str
        stars: int
        score: float
        tags: list[str]

    # The same fields without their bounds: the answers break them (else this proves nothing).
    loose = openai.lib._parsing._completions.type_to_response_format_param(Loose)
    broken = 0
    for seed in range(4):
        r = client.chat.completions.create(model="smollm2", messages=REVIEW, temperature=1.0, seed=seed,
                                           max_tokens=120, response_format=loose)
        try:
            Review.model_validate_json(r.choices[0].message.content)
        except pydantic.ValidationError:
            broken += 1
    assert broken >= 2, f"only {broken} of 4 unbounded answers break the bounds: this check proves nothing"
    # With them, every answer validates: parse() raises on one that does not.
    for seed in range(4):
        r = client.beta.chat.completions.parse(model="smollm2", messages=REVIEW, response_format=Review,
                                               temperature=1.0, seed=seed, max_tokens=120)
        c = r.choices[0]
        assert c.finish_reason == "stop" and isinstance(c.message.parsed, Review), c


BOOKING = [SYSTEM, {"role": "user", "content": "Book a table for two at a Paris restaurant next Friday "
                                                "evening, as JSON: a booking code, the time, an id and "
                                                "the guest's user name."}]


@check("structured outputs: pydantic patterns and formats (pattern, datetime, date, UUID)")
def _():
    import datetime
    import uuid

    import pydantic
    from pydantic import Field

    class Booking(pydantic.BaseModel):
        code: str = Field(pattern=r"^[A-Z]{3}-[0-9]{4}$")
        at: datetime.datetime
        day: datetime.date
        id: uuid.UUID
        # A Unicode class counted to 20 would be a DFA of megabytes: followed as `^\w*$` and
        # a length of 3..=20 characters.
        guest: str = Field(pattern=r"^\w{3,20}$")

    class Loose(pydantic.BaseModel):
        code: str
        at: str
        day: str
        id: str
        guest: str

    loose = openai.lib._parsing._completions.type_to_response_format_param(Loose)
    broken = 0
    for seed in range(3):
        r = client.chat.completions.create(model="smollm2", messages=BOOKING, temperature=1.0, seed=seed,
                                           max_tokens=150, response_format=loose)
        try:
            Booking.model_validate_json(r.choices[0].message.content)
        except pydantic.ValidationError:
            broken += 1
    assert broken == 3, f"only {broken} of 3 free answers break the formats: this check proves nothing"
    for seed in range(3):
        r = client.beta.chat.completions.parse(model="smollm2", messages=BOOKING, response_format=Booking,
                                               temperature=1.0, seed=seed, max_tokens=150)
        c = r.choices[0]
        assert c.finish_reason == "stop" and isinstance(c.message.parsed, Booking), c


WALL = [SYSTEM, {"role": "user", "content": "When did the Berlin wall fall? Give the date."}]
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


@check("vLLM's guided_regex and structured_outputs.regex: the whole answer matches")
def _():
    import re

    free = client.chat.completions.create(model="smollm2", messages=WALL, temperature=0, max_tokens=60)
    assert not re.fullmatch(DATE, free.choices[0].message.content), "the free answer matches: proves nothing"
    r = client.chat.completions.create(model="smollm2", messages=WALL, temperature=0, max_tokens=60,
                                       extra_body={"guided_regex": DATE})
    c = r.choices[0]
    # Nothing can follow the day: the answer ends there.
    assert re.fullmatch(DATE, c.message.content) and c.finish_reason == "stop", c
    # Sampled and streamed, through vLLM's newer key.
    for seed in (1, 2, 3):
        stream = client.chat.completions.create(
            model="smollm2", messages=WALL, temperature=1.0, seed=seed, max_tokens=60, stream=True,
            extra_body={"structured_outputs": {"regex": DATE}})
        text, finish = "", None
        for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        assert re.fullmatch(DATE, text) and finish == "stop", (seed, text, finish)
    # Raw completions too; a regex that can go on ends at the model's end of turn (or at
    # max_tokens), matched either way.
    r = client.completions.create(model="smollm2", prompt="The Berlin wall fell on", temperature=0,
                                  max_tokens=20, extra_body={"guided_regex": " " + DATE})
    assert re.fullmatch(" " + DATE, r.choices[0].text), r.choices[0]
    open_ended = r"(Yes|No)[a-z ,.]*"
    r = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=40, extra_body={"guided_regex": open_ended},
        messages=[SYSTEM, {"role": "user", "content": "Is Paris in France? Answer and explain."}])
    assert re.fullmatch(open_ended, r.choices[0].message.content), r.choices[0]
    for extra, words in (({"guided_regex": "(?=a)"}, "look-around"),
                         ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "cannot be combined"),
                         ({"structured_outputs": {"grammar": "root ::= x"}}, "not supported")):
        try:
            client.chat.completions.create(model="smollm2", messages=WALL, max_tokens=8, extra_body=extra)
        except openai.BadRequestError as e:
            assert words in e.message, e.message
        else:
            raise AssertionError(f"{extra} was accepted")


FORECAST = [SYSTEM, {"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@check("tool_choice: a named function gives one call, 'required' calls of listed tools")
def _():
    import enum

    import pydantic

    class Unit(str, enum.Enum):
        celsius = "celsius"
        fahrenheit = "fahrenheit"

    class GetWeather(pydantic.BaseModel):
        """The current weather in a city."""
        city: str
        unit: Unit

    class GetTime(pydantic.BaseModel):
        """The current time in a time zone."""
        timezone: str

    models = {"GetWeather": GetWeather, "GetTime": GetTime}
    tools = [openai.pydantic_function_tool(m) for m in models.values()]
    # SmolLM2's template shows no tools: left to itself the model answers in prose, no call.
    free = client.chat.completions.create(
        model="smollm2", messages=FORECAST, tools=tools, temperature=0, max_tokens=60)
    assert not free.choices[0].message.tool_calls and free.choices[0].finish_reason != "tool_calls"
    # A named function: the SDK's parse() validates the arguments against the pydantic model.
    r = client.beta.chat.completions.parse(
        model="smollm2", messages=FORECAST, tools=tools, temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c
    (call,) = c.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "GetWeather", call
    assert isinstance(call.function.parsed_arguments, GetWeather), call
    # "required", sampled and streamed: calls of either tool, their arguments per its schema.
    names = set()
    for seed in (1, 2, 3, 4):
        stream = client.chat.completions.create(
            model="smollm2", messages=FORECAST, tools=tools, tool_choice="required",
            temperature=1.0, seed=seed, max_tokens=200, stream=True)
        calls, content, finish = [], "", None
        for chunk in stream:
            for ch in chunk.choices:
                content += ch.delta.content or ""
                calls += ch.delta.tool_calls or []
                finish = ch.finish_reason or finish
        assert finish == "tool_calls" and content == "", (seed, finish, content)
        assert [c.index for c in calls] == list(range(len(calls))) and calls, calls
        for call in calls:
            models[call.function.name].model_validate_json(call.function.arguments)
            names.add(call.function.name)
    print(f"    'required' called {sorted(names)}")
    # A function that is not among the tools, or a schema keyword the node cannot follow.
    bad_tool = openai.pydantic_function_tool(GetTime, name="Later")
    # (A look-ahead: a pattern no DFA can follow.)
    bad_tool["function"]["parameters"]["properties"]["timezone"]["pattern"] = "^(?=[A-Z])"
    for tool_choice, words in (({"type": "function", "function": {"name": "GetStock"}}, "GetStock"),
                               ({"type": "function", "function": {"name": "Later"}}, "pattern")):
        try:
            client.chat.completions.create(model="smollm2", messages=FORECAST, max_tokens=8,
                                           tools=tools + [bad_tool], tool_choice=tool_choice)
        except openai.BadRequestError as e:
            assert words in e.message, e.message
        else:
            raise AssertionError(f"{tool_choice} was accepted")


@check("a multi-turn conversation reuses the cached prefix")
def _():
    history = [SYSTEM, {"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model="smollm2", messages=history, temperature=0, max_tokens=12)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And a vegetable?"}]
    second = client.chat.completions.create(model="smollm2", messages=history, temperature=0, max_tokens=12)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)


@check("BadRequestError")
def _():
    for kwargs in ({"n": 99}, {"temperature": "hot"}, {"messages": []}):
        args = {"model": "smollm2", "messages": QUESTION, **kwargs}
        try:
            client.chat.completions.create(**args)
        except openai.BadRequestError as e:
            assert e.status_code == 400
        else:
            raise AssertionError(f"no error for {kwargs}")
    try:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "word " * 700}])
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded" and "512" in e.message, e.message
    else:
        raise AssertionError("no error for a prompt longer than the context")


@check("NotFoundError")
def _():
    try:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    except openai.NotFoundError as e:
        assert "smollm2" in e.message, e.message
    else:
        raise AssertionError("no error for an unknown model")
    try:
        client.files.list()
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("files should be out of scope")


@check("AuthenticationError")
def _():
    bad = openai.OpenAI(base_url=BASE, api_key="wrong", max_retries=0)
    try:
        bad.models.list()
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    else:
        raise AssertionError("a wrong key was accepted")


@check("RateLimitError when every slot is busy")
def _():
    busy = openai.OpenAI(base_url=BUSY, api_key=KEY, max_retries=0, timeout=120)
    stream = busy.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=400, stream=True,
        extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    try:
        busy.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2)
    except openai.RateLimitError as e:
        assert e.response.headers.get("retry-after") == "1"
    else:
        raise AssertionError("a busy node did not answer 429")
    finally:
        stream.close()


# Qwen3 (random weights, the real tokenizer and template). A random model cannot write a
# tool call or a think block: these checks constrain its output with vLLM's `guided_choice`
# and check that the node splits what comes out into reasoning_content and tool_calls.
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCRIPT = ("<think>\nThe user wants the weather in Paris.\n</think>\n\n<tool_call>\n"
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@check("qwen3: reasoning_content and tool_calls")
def _():
    r = client.chat.completions.create(
        model="qwen3", messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=100,
        extra_body={"guided_choice": [SCRIPT]})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.reasoning_content == "The user wants the weather in Paris.", c.message
    assert c.message.content is None, c.message
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


@check("qwen3: streamed reasoning_content and tool_calls")
def _():
    stream = client.chat.completions.create(
        model="qwen3", messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=100,
        stream=True, extra_body={"guided_choice": [SCRIPT]})
    reasoning, content, calls, finish = "", "", [], None
    for chunk in stream:
        for c in chunk.choices:
            d = c.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            calls += d.tool_calls or []
            finish = c.finish_reason or finish
    assert reasoning == "The user wants the weather in Paris.", reasoning
    assert content == "", repr(content)
    assert finish == "tool_calls"
    assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather")], calls
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


@check("qwen3: a tool's answer goes back, thinking off")
def _():
    history = WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    r = client.chat.completions.create(
        model="qwen3", messages=history, tools=TOOLS, temperature=0, max_tokens=50,
        extra_body={"guided_choice": ["It is sunny in Paris."],
                    "chat_template_kwargs": {"enable_thinking": False}})
    c = r.choices[0]
    assert c.message.content == "It is sunny in Paris.", c.message
    assert getattr(c.message, "reasoning_content", None) is None
    assert not c.message.tool_calls and c.finish_reason == "stop"


@check("qwen3: /apply-template honours tools and chat_template_kwargs like chat")
def _():
    import os
    import urllib.request
    vectors = os.path.join(os.path.dirname(EMBEDDING_VECTORS), "qwen3-template.jsonl")
    root = BASE[: -len("/v1")] if BASE.endswith("/v1") else BASE
    rows = [json.loads(line) for line in open(vectors, encoding="utf-8") if line.strip()]
    assert any("tools" in r for r in rows) and any("enable_thinking" in r for r in rows)
    for row in rows:
        body = {"model": "qwen3", "messages": row["messages"],
                "add_generation_prompt": row["add_generation_prompt"]}
        if "tools" in row:
            body["tools"] = row["tools"]
        if "enable_thinking" in row:
            body["chat_template_kwargs"] = {"enable_thinking": row["enable_thinking"]}
        req = urllib.request.Request(
            f"{root}/apply-template", data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            prompt = json.loads(r.read())["prompt"]
        assert prompt == row["rendered"], (row, prompt)


@check("qwen3: a thinking model reasons before JSON output, a regex's and a required call")
def _():
    # The random model is steered into an (empty) think block with logit_bias: `<think>` may
    # come first besides the object's `{`, and after `</think>` the constraint holds.
    think, unthink = token_id("qwen3", "<think>"), token_id("qwen3", "</think>")
    bias = {str(think): 90, str(unthink): 100}
    tokens = lambda c: [t.token for t in c.logprobs.content]
    r = client.chat.completions.create(
        model="qwen3", messages=WEATHER, temperature=0, max_tokens=40, logprobs=True,
        logit_bias=bias, response_format={"type": "json_object"})
    c = r.choices[0]
    assert tokens(c)[:2] == ["<think>", "</think>"], tokens(c)
    # (The bias goes on: `</think>` is text to Qwen3's vocabulary, and fills the strings.)
    assert c.message.content.startswith("{"), c.message
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict), c.message.content
    flag = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}]
    r = client.chat.completions.create(
        model="qwen3", messages=WEATHER, temperature=0, max_tokens=80, logprobs=True,
        logit_bias=bias, tools=flag, tool_choice="required", parallel_tool_calls=False)
    c = r.choices[0]
    assert tokens(c)[:2] == ["<think>", "</think>"], tokens(c)
    assert c.finish_reason == "tool_calls" and c.message.content is None, c
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["ok"], bool)
    # With thinking off the template closes the block itself: the object starts at once.
    r = client.chat.completions.create(
        model="qwen3", messages=WEATHER, temperature=0, max_tokens=4, logprobs=True,
        logit_bias=bias, response_format={"type": "json_object"},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    c = r.choices[0]
    assert c.message.content.startswith("{") and tokens(c)[0] != "<think>", tokens(c)
    # A regex's answer follows the reasoning too; with thinking off it starts at once.
    for kwargs, first in (({}, ["<think>", "</think>"]), ({"enable_thinking": False}, [])):
        r = client.chat.completions.create(
            model="qwen3", messages=WEATHER, temperature=0, max_tokens=20, logprobs=True,
            logit_bias=bias, extra_body={"guided_regex": "(sunny|rainy)",
                                         "chat_template_kwargs": kwargs})
        c = r.choices[0]
        assert tokens(c)[:len(first)] == first and c.finish_reason == "stop", (kwargs, tokens(c))
        assert c.message.content in ("sunny", "rainy"), (kwargs, c.message)


@check("'required' with parallel calls: one call per city, streamed too; parallel_tool_calls=False one")
def _():
    weather = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for one city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    ask = [{"role": "system", "content": "Call get_weather once for each city."},
           {"role": "user", "content": "What is the weather in Paris and in Rome?"}]
    args = dict(model="smollm2", messages=ask, tools=weather, tool_choice="required",
                temperature=0, max_tokens=200)
    c = client.chat.completions.create(**args).choices[0]
    cities = [json.loads(t.function.arguments)["city"] for t in c.message.tool_calls]
    assert c.finish_reason == "tool_calls" and cities == ["Paris", "Rome"], c
    assert len({t.id for t in c.message.tool_calls}) == 2, c
    streamed = [t for ch in client.chat.completions.create(**args, stream=True)
                for x in ch.choices for t in (x.delta.tool_calls or [])]
    assert [(t.index, t.function.arguments) for t in streamed] == \
        [(k, t.function.arguments) for k, t in enumerate(c.message.tool_calls)], streamed
    one = client.chat.completions.create(**args, parallel_tool_calls=False).choices[0]
    assert one.finish_reason == "tool_calls" and len(one.message.tool_calls) == 1, one
    assert json.loads(one.message.tool_calls[0].function.arguments) == {"city": "Paris"}, one


@check("qwen3: a thinking budget closes the block; reasoning_effort none turns thinking off")
def _():
    think, unthink = token_id("qwen3", "<think>"), token_id("qwen3", "</think>")
    # The random model opens its reasoning and would never close it by itself.
    bias = {str(think): 100, str(unthink): -100}
    tokens = lambda c: [t.token for t in c.logprobs.content]
    for extra, spent in (({"thinking_token_budget": 5}, 5), ({"reasoning_budget_tokens": 0}, 0)):
        c = client.chat.completions.create(
            model="qwen3", messages=WEATHER, temperature=0, max_tokens=12, logprobs=True,
            logit_bias=bias, extra_body=extra).choices[0]
        t = tokens(c)
        assert t[0] == "<think>" and t[spent + 1] == "</think>", (extra, t)
        assert "</think>" not in t[1:spent + 1] and c.finish_reason == "length", (extra, t)
        assert c.message.content, c.message
    # reasoning_effort none renders the prompt as enable_thinking false does (an empty block).
    prompt = lambda **kw: client.chat.completions.create(
        model="qwen3", messages=WEATHER, max_tokens=1, **kw).usage.prompt_tokens
    off = prompt(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert prompt(reasoning_effort="none") == off != prompt(reasoning_effort="low"), off


@check("qwen3: tool_choice 'required' without tools is a BadRequestError")
def _():
    try:
        client.chat.completions.create(model="qwen3", messages=WEATHER, tool_choice="required",
                                       max_tokens=5)
    except openai.BadRequestError as e:
        assert "tool_choice" in str(e)
    else:
        raise AssertionError("tool_choice=required without tools was accepted")


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


@check("embeddings (base64 by default) match sentence-transformers")
def _():
    rows = [json.loads(line) for line in open(EMBEDDING_VECTORS, encoding="utf-8")]
    r = client.embeddings.create(model="minilm", input=[row["text"] for row in rows])
    assert r.object == "list" and r.model == "minilm" and r.usage.prompt_tokens > 0
    assert [d.index for d in r.data] == list(range(len(rows)))
    for row, d in zip(rows, r.data):
        assert len(d.embedding) == 384
        assert cosine(d.embedding, row["embedding"]) > 0.9999, row["text"]
    e = [d.embedding for d in r.data]
    assert cosine(e[0], e[1]) > cosine(e[0], e[2])


@check("embeddings as floats, one string")
def _():
    r = client.embeddings.create(model="minilm", input="The cat sits on the mat.",
                                 encoding_format="float")
    (d,) = r.data
    assert abs(sum(x * x for x in d.embedding) - 1.0) < 1e-4


@check("embedding and generator models refuse each other's work")
def _():
    for call in (
        lambda: client.embeddings.create(model="smollm2", input="x"),
        lambda: client.chat.completions.create(model="minilm", messages=QUESTION, max_tokens=2),
    ):
        try:
            call()
        except openai.BadRequestError as e:
            assert "embedding model" in str(e), e
        else:
            raise AssertionError("a model did what it cannot")


# The Responses API (`client.responses`): the chat path underneath, its items on top.
@check("responses: create, the same greedy answer as chat, and an incomplete one")
def _():
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                          max_tokens=24)
    r = client.responses.create(model="smollm2", instructions=SYSTEM["content"],
                                input="Name the capital of France.", temperature=0,
                                max_output_tokens=24)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed", r
    assert r.output_text == chat.choices[0].message.content, (r.output_text, chat)
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens > 0  # the chat call's prefix
    assert r.max_output_tokens == 24 and r.temperature == 0 and r.store is False
    # Items as input, a developer message among them; cut short by max_output_tokens.
    cut = client.responses.create(model="smollm2", max_output_tokens=3, input=[
        {"role": "developer", "content": SYSTEM["content"]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Tell me about Paris."}]}])
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and cut.output[0].status == "incomplete", cut


@check("responses: the stream helper's events add up to the final response")
def _():
    with client.responses.stream(model="smollm2", input="Name the capital of France.",
                                 instructions=SYSTEM["content"], temperature=0,
                                 max_output_tokens=24, top_logprobs=2) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] == "response.completed", kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "Paris" in text and text == final.output_text, (text, final.output_text)
    (part,) = final.output[0].content
    assert len(part.logprobs) == final.usage.output_tokens - 1  # the end token has none
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)


@check("responses: parse() with a pydantic text_format")
def _():
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        country: str

    r = client.responses.parse(model="smollm2", input="Describe Paris as JSON.", temperature=0,
                               max_output_tokens=60, text_format=City)
    assert isinstance(r.output_parsed, City), r.output_text
    assert r.status == "completed"


@check("responses: a required function call, and its output sent back as input")
def _():
    weather = {"type": "function", "name": "get_weather", "description": "Weather for a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"], "additionalProperties": False},
               "strict": True}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(model="smollm2", input=ask, tools=[weather], temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"},
                                max_output_tokens=60)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather", r.output
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert set(json.loads(call.arguments)) == {"city"} and r.output_text == ""
    later = client.responses.create(
        model="smollm2", tools=[weather], temperature=0, max_output_tokens=16,
        input=ask + [call.model_dump(exclude_none=True),
                     {"type": "function_call_output", "call_id": call.call_id,
                      "output": '{"sky": "sunny"}'}])
    assert later.output[0].type == "message" and later.output_text, later.output


@check("responses: qwen3's reasoning and function call as items, whole and streamed")
def _():
    tool = {"type": "function", "name": "get_weather", "description": "Weather for a city",
            "parameters": TOOLS[0]["function"]["parameters"]}
    args = dict(model="qwen3", input=WEATHER, tools=[tool], temperature=0,
                max_output_tokens=100, extra_body={"guided_choice": [SCRIPT]})
    r = client.responses.create(**args)
    assert [o.type for o in r.output] == ["reasoning", "function_call"], r.output
    assert r.output[0].content[0].text == "The user wants the weather in Paris."
    assert json.loads(r.output[1].arguments) == {"city": "Paris"} and r.status == "completed"
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    with client.responses.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_response()
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == "The user wants the weather in Paris.", thought
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"city": "Paris"}, done
    assert [o.type for o in final.output] == ["reasoning", "function_call"], final.output
    assert final.output[1].call_id.startswith("call_") and final.output_text == ""


@check("responses: what the node cannot do is a BadRequestError or NotFoundError")
def _():
    for extra, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                         ({"tools": [{"type": "web_search"}]}, "tools[0]"),
                         ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
                         ({"max_output_tokens": 0}, "max_output_tokens")):
        try:
            client.responses.create(model="smollm2", input="x", **extra)
        except openai.BadRequestError as e:
            assert e.param == param, (extra, e.param, e.message)
        else:
            raise AssertionError(f"{extra} was accepted")
    try:
        client.responses.retrieve("resp_1")
    except openai.NotFoundError as e:
        assert "stores no responses" in e.message, e.message
    else:
        raise AssertionError("a response was found")


print("all SDK checks passed")

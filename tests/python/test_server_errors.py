"""Bad requests get OpenAI's error shape with the right status and a message naming the field;
none reaches the engine, and the server keeps serving. The server here requires an API key."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_utils import ServerProcess, metric, read_metrics  # noqa: E402

API_KEY = "sk-octavo-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_NUM_SEQS = 16
USER = [{"role": "user", "content": "Hello there"}]

# (endpoint, JSON body, status, the error's param, words its message must hold).
CASES = [
    ("completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens", ["max_tokens", "-5"]),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ["max_tokens"]),
    ("completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", ["integer"]),
    ("completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", ["integer"]),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature", ["temperature"]),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", ["number"]),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", ["top_p", "(0, 1]"]),
    ("completions", {"prompt": "x", "top_k": -3}, 400, "top_k", ["top_k"]),
    ("completions", {"prompt": "x", "min_p": 2}, 400, "min_p", ["min_p"]),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", ["n", "greater than or equal to 1"]),
    ("completions", {"prompt": "x", "n": 100000}, 400, "n", ["n", "128"]),
    ("completions", {"prompt": "x", "n": 64}, 400, "n", ["64", str(MAX_NUM_SEQS)]),
    ("completions", {"prompt": "x", "best_of": 64}, 400, "best_of", ["64", str(MAX_NUM_SEQS)]),
    ("completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", ["logprobs", "20"]),
    ("completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty",
     ["presence_penalty", "[-2, 2]"]),
    ("completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty",
     ["frequency_penalty"]),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty",
     ["repetition_penalty"]),
    ("completions", {"prompt": "x", "stop": 5}, 400, "stop", ["stop", "string"]),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop", ["stop", "empty"]),
    ("completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids",
     ["stop_token_ids"]),
    ("completions", {"prompt": "x", "seed": "abc"}, 400, "seed", ["seed"]),
    ("completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias",
     ["logit_bias", "abc"]),
    ("completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias",
     ["99999", "vocabulary"]),
    ("completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of", ["best_of"]),
    ("completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of",
     ["best_of", "stream"]),
    ("completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens",
     ["min_tokens"]),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream", ["stream", "boolean"]),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": 1}}, 400,
     "stream_options", ["stream_options.include_usage"]),
    ("completions", {"prompt": 5}, 400, "prompt", ["prompt", "string"]),
    ("completions", {"prompt": []}, 400, "prompt", ["prompt", "empty"]),
    ("completions", {"prompt": ""}, 400, "prompt", ["prompt", "empty"]),
    ("completions", {"prompt": [1, 99999]}, 400, "prompt", ["99999", "vocabulary"]),
    ("completions", {"prompt": [[1, 2], ["a"]]}, 400, "prompt", ["prompt[1][0]", "integer"]),
    ("completions", {"prompt": [1, "a"]}, 400, "prompt", ["prompt[1]", "integer"]),
    ("completions", {}, 400, "prompt", ["prompt", "required"]),
    ("completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", ["suffix"]),
    ("completions", {"prompt": [5] * 300}, 400, "prompt", ["256", "300"]),
    # The tiny tokenizer is bytes only: one token per character.
    ("completions", {"prompt": "Paris " * 300}, 400, "prompt", ["256", "1800"]),
    ("completions", {"prompt": [5] * 200, "max_tokens": 100}, 400, "max_tokens",
     ["256", "300", "200", "100"]),
    ("completions", {"model": "no-such-model", "prompt": "x"}, 404, "model", ["no-such-model"]),
    ("chat/completions", {"messages": []}, 400, "messages", ["messages"]),
    ("chat/completions", {"messages": "hi"}, 400, "messages", ["messages", "array"]),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages",
     ["messages[0].role", "required"]),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages",
     ["messages[0].content"]),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     400, "messages", ["messages[0].content[0].text", "string"]),
    ("chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs",
     ["top_logprobs", "logprobs"]),
    ("chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 30}, 400,
     "top_logprobs", ["top_logprobs", "20"]),
    ("chat/completions", {"messages": USER, "max_completion_tokens": 0}, 400,
     "max_completion_tokens", ["max_completion_tokens"]),
    ("chat/completions", {"messages": USER, "max_tokens": 1000}, 400, "max_tokens",
     ["256", "1000"]),
    ("chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools",
     ["tool"]),
    ("chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, 400,
     "response_format", ["json_object"]),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content",
     ["image_url"]),
    ("chat/completions", {"model": "gpt-4", "messages": USER}, 404, "model", ["gpt-4"]),
]


@pytest.fixture(scope="module")
def server(llama_dir):
    with ServerProcess(llama_dir, "--api-key", API_KEY,
                       "--max-num-seqs", str(MAX_NUM_SEQS)) as process:
        yield process


def post(server, endpoint: str, body=None, content=None, headers=AUTH):
    return httpx.post(f"{server.base_url}/{endpoint}", json=body, content=content,
                      headers=headers, timeout=60)


def check_error(response, status: int, param, words) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize("endpoint, body, status, param, words", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request_fields(server, endpoint, body, status, param, words):
    before = read_metrics(server.url)
    check_error(post(server, endpoint, body), status, param, words)
    assert_never_reached_the_engine(server, before)


# What a request the engine computed (even partly) moves; a rejected one must move none of them.
ENGINE_COUNTERS = ("octavo:prompt_tokens_total", "octavo:generation_tokens_total",
                   "octavo:prefix_cache_queries_total", "octavo:e2e_request_latency_seconds_count")


def assert_never_reached_the_engine(server, before) -> None:
    now = read_metrics(server.url)
    for name in ENGINE_COUNTERS:
        assert metric(now, name) == metric(before, name), name


@pytest.mark.parametrize("content, words", [
    (b"this is not json", ["not valid JSON"]),
    (b'{"prompt": "x",', ["not valid JSON"]),
    (b"[1, 2, 3]", ["JSON object", "array"]),
    (b"", ["empty"]),
])
def test_bodies_that_are_not_a_json_object(server, content, words):
    check_error(post(server, "completions", content=content,
                     headers={**AUTH, "Content-Type": "application/json"}), 400, None, words)
    check_error(post(server, "chat/completions", content=content), 400, None, words)


def test_tokenize_and_detokenize_errors(server):
    check_error(httpx.post(f"{server.url}/tokenize", json={}, headers=AUTH), 400, "prompt",
                ["prompt or messages"])
    check_error(httpx.post(f"{server.url}/detokenize", json={"tokens": [99999]}, headers=AUTH),
                400, "tokens", ["99999"])


def test_the_counters_see_a_computed_request(server):
    """assert_never_reached_the_engine's counters do move for a request that ran."""
    before = read_metrics(server.url)
    assert post(server, "completions", {"prompt": "Paris is a", "max_tokens": 2}).status_code == 200
    with pytest.raises(AssertionError):
        assert_never_reached_the_engine(server, before)


def test_api_key(server):
    body = {"prompt": "Paris is a", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = post(server, "completions", body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.base_url}/models").status_code == 401
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401
    # Monitoring needs no key.
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert post(server, "completions", body).status_code == 200

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_openai_client_raises_the_matching_errors(server):
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=client.models.list().data[0].id, prompt="x",
                                  max_tokens=-1)
    assert error.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="256"):
        client.chat.completions.create(model=client.models.list().data[0].id,
                                       messages=[{"role": "user", "content": "Paris " * 300}])


def test_the_server_keeps_serving(server):
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    for _ in range(2):
        response = client.completions.create(model=model, prompt="Paris is a", max_tokens=4,
                                             temperature=0)
        assert response.usage.completion_tokens == 4
        chunks = list(client.chat.completions.create(model=model, messages=USER, max_tokens=3,
                                                     stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert metric(read_metrics(server.url), "octavo:kv_cache_blocks_used") == 0

"""The OpenAI server through the official `openai` client: what it returns equals LLM.generate /
LLM.chat with the same parameters and seed, streamed or not."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from octavo import SamplingParams  # noqa: E402
from server_utils import ServerProcess, metric, read_metrics  # noqa: E402

MODEL_NAME = "tiny-llama"
PROMPTS = ["Paris is a", "The quick brown fox", "Continuous batching admits"]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is the Eiffel Tower?"}]


@pytest.fixture(scope="module")
def server(llama_dir):
    with ServerProcess(llama_dir, "--served-model-name", MODEL_NAME, "extra-name") as process:
        yield process
        # Ctrl-C stops it cleanly: exit code 0, no traceback.
        assert process.stop() == 0
        assert "Traceback" not in process.output(), process.output()[-4000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(llama_dir):
    from octavo import LLM

    return LLM(model=llama_dir, device="cpu", kv_cache_memory_bytes=32 << 20)


def generate(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def stream_completion(client, **kwargs):
    """Joins a streamed completion: index -> (text, finish_reason), and the usage chunk."""
    texts, reasons, usage = {}, {}, None
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_llm_generate(client, llm, prompt):
    expected = generate(llm, prompt, temperature=0, max_tokens=12)
    response = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                         temperature=0)
    choice = response.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.model == MODEL_NAME
    assert response.object == "text_completion"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == (response.usage.prompt_tokens
                                           + response.usage.completion_tokens)


def test_streamed_completion_equals_the_whole_one(client, llm):
    expected = generate(llm, PROMPTS[0], temperature=0, max_tokens=20)
    texts, reasons, usage = stream_completion(
        client, model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0,
        stream_options={"include_usage": True})
    assert texts == {0: expected.outputs[0].text}
    assert reasons == {0: expected.outputs[0].finish_reason}
    assert usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert usage.prompt_tokens == len(expected.prompt_token_ids)

    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20,
                                      temperature=0, logprobs=2).choices[0].logprobs
    tokens, token_logprobs, offsets = [], [], []
    for chunk in client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20,
                                           temperature=0, logprobs=2, stream=True):
        for choice in chunk.choices:
            tokens += choice.logprobs.tokens
            token_logprobs += choice.logprobs.token_logprobs
            offsets += choice.logprobs.text_offset
    assert tokens == whole.tokens
    assert token_logprobs == pytest.approx(whole.token_logprobs, abs=1e-6)
    assert offsets == whole.text_offset


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in chunk for chunk in chunks)  # no include_usage

    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                  if line and line != "data: [DONE]"]
    # OpenAI's shape: a null usage in every chunk but the last, which has no choices.
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True])
def test_n_sequences_with_a_seed_equal_llm_generate(client, llm, stream):
    params = dict(n=3, temperature=0.9, top_p=0.95, seed=1234, max_tokens=10)
    expected = generate(llm, PROMPTS[2], **params)
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS[2], n=3, temperature=0.9, top_p=0.95,
                  seed=1234, max_tokens=10)
    if stream:
        texts, _, _ = stream_completion(client, **kwargs)
    else:
        texts = {c.index: c.text for c in client.completions.create(**kwargs).choices}
    assert texts == {c.index: c.text for c in expected.outputs}


def test_several_prompts_give_choices_in_prompt_order(client, llm):
    expected = [generate(llm, p, temperature=0, max_tokens=6) for p in PROMPTS]
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=6,
                                         temperature=0, n=2)
    assert [c.index for c in response.choices] == list(range(2 * len(PROMPTS)))
    for i, out in enumerate(expected):
        assert response.choices[2 * i].text == out.outputs[0].text
        assert response.choices[2 * i + 1].text == out.outputs[0].text  # greedy: n alike
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)

    texts, reasons, usage = stream_completion(client, model=MODEL_NAME, prompt=PROMPTS,
                                              max_tokens=6, temperature=0,
                                              stream_options={"include_usage": True})
    assert texts == {i: out.outputs[0].text for i, out in enumerate(expected)}
    assert usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)


def test_token_id_prompts(client, llm):
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    expected = generate(llm, ids, temperature=0, max_tokens=8)
    response = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8,
                                         temperature=0)
    assert response.choices[0].text == expected.outputs[0].text
    batch = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:3]], max_tokens=8,
                                      temperature=0)
    assert batch.choices[0].text == expected.outputs[0].text
    assert batch.usage.prompt_tokens == len(ids) + 3


def test_completion_logprobs_equal_llm_generate(client, llm):
    expected = generate(llm, PROMPTS[0], temperature=0, max_tokens=6, logprobs=3).outputs[0]
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6,
                                         temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(expected.token_ids)
    for position, token in enumerate(expected.token_ids):
        want = expected.logprobs[position]
        assert logprobs.token_logprobs[position] == pytest.approx(want[token].logprob, abs=1e-5)
        assert logprobs.tokens[position] == want[token].decoded_token
        assert sorted(logprobs.top_logprobs[position].values()) == pytest.approx(
            sorted({lp.decoded_token: lp.logprob for lp in want.values()}.values()), abs=1e-5)
    assert logprobs.text_offset[0] == 0
    offsets = [logprobs.text_offset[0]]
    for token_text in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token_text))
    assert logprobs.text_offset == offsets


def test_echo_puts_the_prompt_and_its_logprobs_first(client, llm):
    expected = generate(llm, PROMPTS[1], temperature=0, max_tokens=4, logprobs=1,
                        prompt_logprobs=1)
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=4,
                                         temperature=0, echo=True, logprobs=1)
    choice = response.choices[0]
    assert choice.text == PROMPTS[1] + expected.outputs[0].text
    num_prompt = len(expected.prompt_token_ids)
    assert len(choice.logprobs.tokens) == num_prompt + len(expected.outputs[0].token_ids)
    assert choice.logprobs.token_logprobs[0] is None  # nothing precedes the first prompt token
    for k in range(1, num_prompt):
        token = expected.prompt_token_ids[k]
        assert choice.logprobs.token_logprobs[k] == pytest.approx(
            expected.prompt_logprobs[k][token].logprob, abs=1e-5)


def letter_bias(llm) -> dict[int, float]:
    """A logit bias towards the tokens of lowercase letters and space: the random-weight model,
    left alone, emits partial UTF-8 bytes, and stop strings need text."""
    tokenizer = llm.get_tokenizer()
    wanted = set("abcdefghijklmnopqrstuvwxyz ")
    return {i: 10.0 for i in range(len(tokenizer)) if tokenizer.decode([i]) in wanted}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_equal_llm_generate(client, llm, stream):
    bias = letter_bias(llm)
    assert len(bias) == 27
    params = dict(temperature=1.0, seed=5, max_tokens=24, logit_bias=bias)
    full = generate(llm, PROMPTS[0], **params).outputs[0].text
    assert len(full) > 20, full
    stop = full[len(full) // 2:len(full) // 2 + 3]  # ends mid-text, maybe across tokens
    expected = generate(llm, PROMPTS[0], **params, stop=[stop]).outputs[0]
    assert expected.finish_reason == "stop" and stop not in expected.text
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=24, temperature=1.0, seed=5,
                  logit_bias={str(t): b for t, b in bias.items()}, stop=stop)
    if stream:
        texts, reasons, _ = stream_completion(client, **kwargs)
        assert texts == {0: expected.text}
        assert reasons == {0: "stop"}
    else:
        choice = client.completions.create(**kwargs).choices[0]
        assert choice.text == expected.text
        assert choice.finish_reason == "stop"
        assert choice.model_extra["stop_reason"] == stop

    # include_stop_str_in_output keeps it.
    expected = generate(llm, PROMPTS[0], **params, stop=[stop],
                        include_stop_str_in_output=True).outputs[0]
    assert expected.text.endswith(stop)
    texts, _, _ = stream_completion(client, **kwargs,
                                    extra_body={"include_stop_str_in_output": True})
    assert texts == {0: expected.text}


def test_vllm_extra_fields_reach_the_sampler(client, llm):
    params = dict(temperature=0.8, top_k=5, min_p=0.05, repetition_penalty=1.3,
                  presence_penalty=0.5, frequency_penalty=0.3, seed=7, max_tokens=12,
                  min_tokens=4, ignore_eos=True, logit_bias={5: 3.0})
    expected = generate(llm, PROMPTS[2], **params).outputs[0]
    extra = {k: params[k] for k in ("top_k", "min_p", "repetition_penalty", "min_tokens",
                                    "ignore_eos")}
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[2], temperature=0.8, presence_penalty=0.5,
        frequency_penalty=0.3, seed=7, max_tokens=12, logit_bias={"5": 3.0}, extra_body=extra)
    assert response.choices[0].text == expected.text
    assert response.usage.completion_tokens == len(expected.token_ids) == 12


def test_chat_equals_llm_chat(client, llm):
    expected = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12),
                        use_tqdm=False)[0]
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                              max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.object == "chat.completion"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streamed_chat_equals_llm_chat(client, llm):
    params = SamplingParams(n=2, temperature=1.0, seed=99, max_tokens=10)
    expected = llm.chat(MESSAGES, params, use_tqdm=False)[0]
    contents, roles, reasons, usage = {}, {}, {}, None
    for chunk in client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, n=2, temperature=1.0, seed=99, max_tokens=10,
            max_completion_tokens=10, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert contents == {c.index: c.text for c in expected.outputs}
    assert reasons == {c.index: c.finish_reason for c in expected.outputs}
    assert usage.completion_tokens == sum(len(c.token_ids) for c in expected.outputs)


def test_chat_logprobs(client, llm):
    expected = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=5, logprobs=2),
                        use_tqdm=False)[0].outputs[0]
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5,
                                              temperature=0, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids)
    for entry, token, want in zip(content, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(want[token].logprob, abs=1e-5)
        assert entry.token == want[token].decoded_token
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy


def test_models_version_health_and_tokenization(server, client, llm):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME, "extra-name"]
    assert models.data[0].model_extra["max_model_len"] == 256
    # Either served name works.
    assert client.completions.create(model="extra-name", prompt="Paris", max_tokens=1).choices

    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert tokens == {"count": len(ids), "max_model_len": 256, "tokens": ids}
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()
    assert text == {"prompt": llm.get_tokenizer().decode(ids)}
    chat_ids = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    expected = llm.chat(MESSAGES, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert chat_ids == expected.prompt_token_ids


def test_metrics_count_requests_and_tokens(server, client):
    prompt = " ".join(PROMPTS * 4)  # several full KV blocks: the second request reuses them
    client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0)
    before = read_metrics(server.url)
    client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0)
    after = read_metrics(server.url)
    assert metric(after, "octavo:generation_tokens_total") - metric(
        before, "octavo:generation_tokens_total") == 5
    assert metric(after, "octavo:request_success_total", finished_reason="length") == metric(
        before, "octavo:request_success_total", finished_reason="length") + 1
    assert metric(after, "octavo:time_to_first_token_seconds_count") == metric(
        before, "octavo:time_to_first_token_seconds_count") + 1
    assert metric(after, "octavo:time_per_output_token_seconds_count") == metric(
        before, "octavo:time_per_output_token_seconds_count") + 1
    assert metric(after, "octavo:kv_cache_blocks_used") == 0
    assert metric(after, "octavo:kv_cache_blocks_total") > 0
    # The same prompt again hits the prefix cache.
    assert metric(after, "octavo:prefix_cache_hits_total") > 0
    assert 0 < metric(after, "octavo:prefix_cache_hit_rate") <= 1
    assert metric(after, "octavo:num_requests_running") == 0
    assert metric(after, "octavo:num_requests_waiting") == 0
    assert metric(after, "octavo:num_preemptions_total") == 0

"""The default model shipped in the package (octavo/default_model): a real checkpoint that loads in
octavo and in transformers with the same greedy tokens, that `LLM()` picks when no model is
given, that knows the language of its corpus (validation perplexity through octavo's prompt
logprobs, against a uniform model's) and that learnt its chat template."""

from __future__ import annotations

import json
import logging
import math
import os
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from octavo import LLM, SamplingParams, default_model  # noqa: E402

# Held-out text: paragraphs of the Python tutorial's "Whetting Your Appetite" page, a page that
# tools/prepare_default_corpus.py puts in the validation split (never trained on). Python
# documentation, (c) Python Software Foundation, PSF License Version 2.
HELD_OUT = (
    "If you do much work on computers, eventually you find that there’s some task you’d like to "
    "automate. For example, you may wish to perform a search-and-replace over a large number of "
    "text files, or rename and rearrange a bunch of photo files in a complicated way. Perhaps "
    "you’d like to write a small custom database, or a specialized GUI application, or a simple "
    "game.\n\n"
    "Python is simple to use, but it is a real programming language, offering much more "
    "structure and support for large programs than shell scripts or batch files can offer. On "
    "the other hand, Python also offers much more error checking than C, and, being a "
    "very-high-level language, it has high-level data types built in, such as flexible arrays "
    "and dictionaries.\n\n"
    "Python is an interpreted language, which can save you considerable time during program "
    "development because no compilation and linking is necessary. The interpreter can be used "
    "interactively, which makes it easy to experiment with features of the language, to write "
    "throw-away programs, or to test functions during bottom-up program development. It is also "
    "a handy desk calculator."
)

PROMPTS = ["The Python interpreter", "A dictionary maps", "Exceptions are raised when"]
GREEDY_TOKENS = 24


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def default_llm():
    """LLM() with no model (bf16 weights as shipped, fp32 compute on the CPU), and its log."""
    records = _Records()
    logger = logging.getLogger("octavo")
    logger.addHandler(records)
    try:
        llm = LLM(device="cpu", kv_cache_memory_bytes=64 << 20)
    finally:
        logger.removeHandler(records)
    return llm, records.messages


def test_checkpoint_files_and_size():
    directory = default_model.path()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "training_log.json"):
        assert os.path.isfile(os.path.join(directory, name)), name
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"]
    size = sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))
    assert size < 30 * 2**20, f"the default model takes {size / 2**20:.1f} MiB; the limit is 30"
    from safetensors import safe_open

    with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert 5e6 <= parameters <= 15e6, parameters
    assert dtypes == {"BF16"}


def test_llm_without_model_uses_the_default_model_and_says_so(default_llm):
    llm, messages = default_llm
    said = [m for m in messages if "default model" in m]
    assert len(said) == 1 and default_model.path() in said[0], messages
    assert llm.model_spec["architecture"] == "LlamaForCausalLM"


def test_greedy_tokens_match_transformers():
    """fp32 on both sides, on the CPU: the same greedy tokens."""
    directory = default_model.path()
    llm = LLM(directory, device="cpu", dtype="float32", kv_cache_memory_bytes=64 << 20)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS,
                                                   ignore_eos=True), use_tqdm=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, local_files_only=True)
    model.eval()
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert output.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=GREEDY_TOKENS,
                                      min_new_tokens=GREEDY_TOKENS, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
        assert output.outputs[0].token_ids == expected[0, ids.shape[1]:].tolist(), prompt


def _perplexity(llm, text: str) -> float:
    output = llm.generate(text, SamplingParams(prompt_logprobs=0, max_tokens=1),
                          use_tqdm=False)[0]
    logprobs = output.prompt_logprobs
    assert logprobs[0] is None and len(logprobs) == len(output.prompt_token_ids)
    scored = [entry[token].logprob
              for entry, token in zip(logprobs[1:], output.prompt_token_ids[1:])]
    return math.exp(-sum(scored) / len(scored))


def test_validation_perplexity_is_far_below_uniform(default_llm):
    """On these held-out paragraphs the model's perplexity is 64 (35 over the whole validation
    split, training_log.json); a uniform model's is the vocabulary size, 8192. The same words in a random
    order must score far worse: the model knows English word order, not only word frequencies."""
    llm, _ = default_llm
    uniform = llm.model_spec["vocab_size"]
    perplexity = _perplexity(llm, HELD_OUT)
    words = HELD_OUT.split()
    random.Random(0).shuffle(words)
    shuffled = _perplexity(llm, " ".join(words))
    print(f"held-out perplexity {perplexity:.1f}, shuffled words {shuffled:.1f}, "
          f"uniform {uniform}")
    assert perplexity < 100, perplexity
    assert perplexity < uniform / 80
    assert shuffled > 4 * perplexity, (shuffled, perplexity)


def test_chat_template_and_reply_ends_its_turn(default_llm):
    llm, _ = default_llm
    tokenizer = llm.get_tokenizer()
    messages = [{"role": "user", "content": "What is a tuple?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|startoftext|><|im_start|>user\nWhat is a tuple?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # Trained on conversations that end with <|im_end|>: the reply stops there, by itself.
    reply = llm.chat(messages, SamplingParams(temperature=0, max_tokens=200),
                     use_tqdm=False)[0].outputs[0]
    assert reply.finish_reason == "stop", reply
    assert reply.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "tuple" in reply.text.lower(), reply.text

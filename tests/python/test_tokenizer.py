"""IncrementalDetokenizer against full decoding, on tokenizers trained here (nothing downloaded):
a byte-level BPE (GPT-2 / Llama-3 / Qwen style) and sentencepiece-style BPEs with "▁" word
prefixes and byte fallback (Llama-2 style, and the Metaspace pre-tokenizer)."""

import json
import random

import pytest
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)
from transformers import PreTrainedTokenizerFast

from octavo.tokenizer import IncrementalDetokenizer, load_tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "Café au lait: é è à ç, façade, naïve, Ünïcödé.",
    "日本語のテキストです。東京は大きい。",
    "Emoji 😀🎉 and 👍🏽 are four bytes; 🇫🇷 is two code points.",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\nnew lines   trailing  ",
    "def f(x):\n    return x ** 2  # math: ∑ ∫ ≤ ≥ ≠",
]


def byte_level_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def sentencepiece_tokenizer(metaspace: bool):
    """BPE over "▁"-prefixed words with <0xHH> byte-fallback tokens for characters outside its
    small alphabet (the CJK characters and emoji), and a <s> BOS."""
    tok = Tokenizer(models.BPE())
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=50, show_progress=False)
    tok.train_from_iterator(TEXTS * 3, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    first_byte_id = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = first_byte_id + b
    data["model"]["byte_fallback"] = True
    data["model"]["unk_token"] = "<unk>"
    if metaspace:
        data["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}]}
    else:  # Llama-2's tokenizer.json
        data["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", clean_up_tokenization_spaces=False)
    hf.byte_token_ids = list(range(first_byte_id, first_byte_id + 256))
    return hf


TOKENIZERS = {
    "byte_level": byte_level_tokenizer(),
    "sentencepiece": sentencepiece_tokenizer(metaspace=False),
    "metaspace": sentencepiece_tokenizer(metaspace=True),
}


def detokenize(tokenizer, prompt_ids, output_ids, skip_special_tokens, chunks=None):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = []
    i = 0
    rng = random.Random(len(output_ids))
    while i < len(output_ids):
        n = 1 if chunks is None else rng.randint(1, chunks)
        deltas.append(detok.add(output_ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    text = "".join(deltas)
    assert detok.output_text == text
    return text


def full_decode(tokenizer, ids, skip_special_tokens):
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_tokenizers_split_multibyte_characters():
    # The tests below are only meaningful if characters really arrive in pieces.
    bl = TOKENIZERS["byte_level"]
    assert any("\ufffd" in bl.decode([t]) for t in bl.encode(TEXTS[2]))
    sp = TOKENIZERS["sentencepiece"]
    assert set(sp.encode(TEXTS[3])) & set(sp.byte_token_ids)
    assert sp.encode("日本")[0] == sp.bos_token_id


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_real_encodings_without_prompt(name, skip_special_tokens):
    tok = TOKENIZERS[name]
    for text in TEXTS + ["".join(TEXTS)]:
        ids = tok.encode(text) + [tok.eos_token_id]
        expected = full_decode(tok, ids, skip_special_tokens)
        assert detokenize(tok, [], ids, skip_special_tokens) == expected
        assert detokenize(tok, [], ids, skip_special_tokens, chunks=4) == expected
    assert detokenize(tok, [], tok.encode(TEXTS[0]), True).endswith("test.")


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_real_encodings_continue_the_prompt(name, skip_special_tokens):
    """With a prompt, the output text is what the output adds to the prompt's text: a
    sentencepiece "▁word" keeps its space although decoding it alone would strip it."""
    tok = TOKENIZERS[name]
    for prompt_text, output_text in zip(TEXTS, TEXTS[1:] + TEXTS[:1]):
        prompt = tok.encode(prompt_text)
        output = tok(" " + output_text, add_special_tokens=False)["input_ids"]
        prompt_decoded = full_decode(tok, prompt, skip_special_tokens)
        both = full_decode(tok, prompt + output, skip_special_tokens)
        assert both.startswith(prompt_decoded)
        assert detokenize(tok, prompt, output, skip_special_tokens) == both[len(prompt_decoded):]


def test_sentencepiece_first_output_token_keeps_its_space():
    tok = TOKENIZERS["sentencepiece"]
    prompt = tok.encode("Hello")
    word = tok("world", add_special_tokens=False)["input_ids"]  # "▁world": normalizer prepends
    assert tok.decode(word) == "world"
    assert detokenize(tok, prompt, word, True) == " world"


def random_ids(rng, tok, length):
    if hasattr(tok, "byte_token_ids"):
        # ByteFallback decodes a run of byte tokens as one group, all of it U+FFFD when any of
        # it is invalid: random bytes would rewrite text already emitted, which no incremental
        # decoder can undo. Byte tokens come here as whole characters, or as one cut character
        # alone at the end.
        byte_ids = set(tok.byte_token_ids)
        ordinary = [i for i in range(len(tok)) if i not in byte_ids]
        ids = []
        while len(ids) < length:
            if rng.random() < 0.2:
                char = rng.choice("é日😀∑")
                ids += [tok.byte_token_ids[b] for b in char.encode()]
            else:
                ids.append(rng.choice(ordinary))
        if rng.random() < 0.5:  # output cut inside a character, after an ordinary token
            ids.append(rng.choice(ordinary))
            ids += [tok.byte_token_ids[b] for b in "語".encode()[:rng.randint(1, 2)]]
        return ids
    return [rng.randrange(len(tok)) for _ in range(length)]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_match_full_decode(name, skip_special_tokens):
    tok = TOKENIZERS[name]
    rng = random.Random(1234)
    for trial in range(150):
        ids = random_ids(rng, tok, rng.randint(1, 40))
        expected = full_decode(tok, ids, skip_special_tokens)
        chunks = None if trial % 2 else 3
        assert detokenize(tok, [], ids, skip_special_tokens, chunks) == expected, ids


def test_incomplete_character_is_held_back_then_flushed():
    tok = TOKENIZERS["sentencepiece"]
    bytes_of = [tok.byte_token_ids[b] for b in "😀".encode()]
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert [detok.add([t]) for t in bytes_of] == ["", "", "", "😀"]
    assert detok.add(tok("x", add_special_tokens=False)["input_ids"]) == " x"
    assert detok.add(bytes_of[:2]) == ""
    assert detok.output_text == "😀 x"
    assert detok.flush() == "\ufffd\ufffd"
    assert detok.flush() == ""
    assert detok.output_text == "😀 x\ufffd\ufffd"


def test_window_stays_small():
    tok = TOKENIZERS["byte_level"]
    lengths = []
    backend_decode = tok.backend_tokenizer.decode

    class Spy:
        def decode(self, ids, skip_special_tokens):
            lengths.append(len(ids))
            return backend_decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode("".join(TEXTS) * 4)
    detok = IncrementalDetokenizer(tok, ids[:50])
    detok._backend = Spy()
    for t in ids[50:]:
        detok.add([t])
    assert len(ids) > 300 and max(lengths) <= 8


def test_slow_tokenizer_path_uses_decode():
    """Tokenizers without a Rust backend go through tokenizer.decode, without cleanup."""
    fast = TOKENIZERS["byte_level"]
    calls = []

    class Slow:
        is_fast = False

        def decode(self, ids, **kwargs):
            calls.append(kwargs)
            return fast.decode(ids, skip_special_tokens=kwargs["skip_special_tokens"])

    ids = fast.encode(TEXTS[1])
    assert detokenize(Slow(), [], ids, True) == fast.decode(ids)
    assert calls[0] == {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    IncrementalDetokenizer(Slow(), [], spaces_between_special_tokens=False).add(ids[:1])
    assert calls[-1]["spaces_between_special_tokens"] is False


def test_load_tokenizer_from_directory(tmp_path):
    TOKENIZERS["sentencepiece"].save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode(TEXTS[0]) == TOKENIZERS["sentencepiece"].encode(TEXTS[0])
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))

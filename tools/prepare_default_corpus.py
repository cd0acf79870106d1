"""Prepares the training data of octavo's default model (python/octavo/default_model).

Corpus: the English prose of the Python 3.11 documentation, as Debian's python3.11-doc package
ships it (HTML). Why this corpus: its licence (PSF License Version 2; code examples also 0BSD)
allows derivative works and their redistribution with the notice kept; a package registry serves
it by name, so the data is fetched reproducibly (`apt-get download python3.11-doc`); and it is
natural English prose, several million words of it.

Steps, each written under --out:
  1. the .deb is downloaded (or taken from --deb) and unpacked with dpkg-deb;
  2. every page's main text is extracted: paragraphs, list items and headings, without code
     blocks, tables, navigation or the indices;
  3. pages are split into train and validation by a hash of their path (about 4% held out);
     a paragraph repeated verbatim (boilerplate) is kept only where it first appears;
  4. question/answer conversations are made from the sections: the user asks about a heading
     (the FAQ's headings are questions already), the assistant answers with the section's first
     paragraph, so the chat template is learnt from the same licensed text;
  5. a byte-level BPE tokenizer is trained on the training text (`tokenizers`) and saved with
     its chat template as tokenizer.json + tokenizer_config.json;
  6. train.npy / val.npy hold the token streams (uint16): documents as <bos> text <eos>,
     conversations through the chat template followed by <eos>.

Usage: python tools/prepare_default_corpus.py --out .default_model_data
Then: python tools/train_default_model.py --data .default_model_data --out <checkpoint dir>
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import os
import random
import re
import subprocess
import sys
from html.parser import HTMLParser

DEB_PACKAGE = "python3.11-doc"
HTML_ROOT = "usr/share/doc/python3.11/html"

# Pages that are indices, search or changelogs (issue numbers, not prose).
EXCLUDED_PAGES = re.compile(
    r"^(genindex.*|py-modindex|search|contents|download|whatsnew/changelog)\.html$")

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# ChatML, as Qwen's models use it: the model ends its turn with <|im_end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

VALIDATION_PERCENT = 4

_BLOCK_TAGS = {"p", "li", "dt", "dd", "div", "section", "blockquote", "table", "ul", "ol", "dl",
               "h1", "h2", "h3", "h4", "h5", "h6", "figure", "aside"}
_SKIPPED_TAGS = {"pre", "table", "nav", "script", "style", "dt", "figure"}
_HEADINGS = {"h1", "h2", "h3", "h4"}


class _PageText(HTMLParser):
    """The prose of one Sphinx page's main body: (kind, text) blocks, kind "heading" or "para"."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._in_main = 0          # depth of open <div> elements since the main body began
        self._skip: list[str] = []  # open elements whose text is dropped
        self._heading = False
        self._buffer: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if not self._in_main:
            if tag == "div" and attrs.get("role") == "main":
                self._in_main = 1
            return
        if tag == "div":
            self._in_main += 1
        if self._skip:
            if tag == self._skip[-1] or tag == "div" and self._skip[-1] == "div":
                self._skip.append(tag)
            return
        if (tag in _SKIPPED_TAGS or "headerlink" in classes
                or any(c.startswith("highlight") for c in classes)
                or "versionmodified" in classes and tag == "span"):
            self._flush()
            self._skip.append(tag)
            return
        if tag in _BLOCK_TAGS:
            self._flush()
            self._heading = tag in _HEADINGS
        elif tag == "br":
            self._buffer.append(" ")

    def handle_endtag(self, tag):
        if not self._in_main:
            return
        if self._skip:
            if tag == self._skip[-1]:
                self._skip.pop()
            if tag == "div":
                self._in_main -= 1
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "div":
            self._in_main -= 1

    def handle_data(self, data):
        if self._in_main and not self._skip:
            self._buffer.append(data)

    def _flush(self):
        text = " ".join("".join(self._buffer).split())
        self._buffer = []
        if text:
            self.blocks.append(("heading" if self._heading else "para", text))
        self._heading = False


_SECTION_NUMBER = re.compile(r"^(\d+(\.\d+)*\.?)\s+")


def _clean_heading(text: str) -> str:
    return _SECTION_NUMBER.sub("", text.replace("¶", "")).strip()


def _is_prose(text: str) -> bool:
    """A paragraph worth training on: long enough, mostly words, a sentence."""
    if len(text) < 40:
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) > 0.8 and text[-1] in ".:?!)\"'”"


def extract_page(path: str) -> list[tuple[str, str]]:
    parser = _PageText()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    blocks = []
    for kind, text in parser.blocks:
        if kind == "heading":
            text = _clean_heading(text)
            if text:
                blocks.append((kind, text))
        elif _is_prose(text):
            blocks.append((kind, text))
    return blocks


def page_document(blocks: list[tuple[str, str]]) -> str:
    return "\n\n".join(text for _, text in blocks)


def _question(heading: str, rng: random.Random) -> str:
    if heading.endswith("?"):
        return heading
    return rng.choice([
        "What is {}?", "Tell me about {}.", "Explain {}.", "What does the documentation say "
        "about {}?", "Can you describe {}?", "{}",
    ]).format(heading)


def page_conversations(blocks: list[tuple[str, str]], rng: random.Random) -> list[list[dict]]:
    """One (question, answer) exchange per section that opens with prose; consecutive sections
    are sometimes joined into a two-turn conversation so that later turns are learnt too."""
    exchanges = []
    for i, (kind, text) in enumerate(blocks):
        if kind != "heading" or i + 1 >= len(blocks) or blocks[i + 1][0] != "para":
            continue
        answer = blocks[i + 1][1]
        if i + 2 < len(blocks) and blocks[i + 2][0] == "para" and len(answer) < 200:
            answer += "\n\n" + blocks[i + 2][1]
        exchanges.append([{"role": "user", "content": _question(text, rng)},
                          {"role": "assistant", "content": answer}])
    conversations = []
    i = 0
    while i < len(exchanges):
        if i + 1 < len(exchanges) and rng.random() < 0.3:
            conversations.append(exchanges[i] + exchanges[i + 1])
            i += 2
        else:
            conversations.append(exchanges[i])
            i += 1
    return conversations


def render_chat(messages: list[dict]) -> str:
    """CHAT_TEMPLATE in Python (the tokenizer's Jinja renders the same; test_default_model
    checks it)."""
    return BOS + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def is_validation(page: str) -> bool:
    return int(hashlib.sha256(page.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def fetch_html(deb: str | None, workdir: str) -> str:
    if deb is None:
        subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=workdir, check=True)
        debs = sorted(glob.glob(os.path.join(workdir, f"{DEB_PACKAGE}_*.deb")))
        if not debs:
            sys.exit(f"apt-get download {DEB_PACKAGE} left no .deb in {workdir}")
        deb = debs[-1]
    unpacked = os.path.join(workdir, "unpacked")
    subprocess.run(["dpkg-deb", "-x", deb, unpacked], check=True)
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    with open(os.path.join(workdir, "corpus_source.json"), "w") as f:
        json.dump({"package": DEB_PACKAGE, "version": version,
                   "sha256": hashlib.sha256(open(deb, "rb").read()).hexdigest()}, f, indent=1)
    return os.path.join(unpacked, HTML_ROOT)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama's tokenizers: encoding a text adds <bos> in front (add_special_tokens=True).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
            "add_bos_token": True, "add_eos_token": False,
            "additional_special_tokens": [IM_START, IM_END],
            "model_max_length": 1024, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": [IM_START, IM_END]}, f, indent=2)
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the data (an ignored folder)")
    parser.add_argument("--deb", help=f"a downloaded {DEB_PACKAGE} .deb (default: apt-get download)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np

    os.makedirs(args.out, exist_ok=True)
    root = fetch_html(os.path.abspath(args.deb) if args.deb else None, args.out)
    rng = random.Random(args.seed)
    splits = {"train": {"docs": [], "chats": []}, "val": {"docs": [], "chats": []}}
    seen_paragraphs: set[str] = set()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.html"), recursive=True)):
        page = os.path.relpath(path, root)
        if EXCLUDED_PAGES.match(page):
            continue
        # Boilerplate ("Availability: Unix, not Emscripten, not WASI.") is kept once: repeated
        # verbatim it would be what the model says most, and a copy in validation would leak.
        blocks = [(kind, text) for kind, text in extract_page(path)
                  if kind == "heading" or text not in seen_paragraphs]
        seen_paragraphs.update(text for kind, text in blocks if kind == "para")
        if sum(kind == "para" for kind, _ in blocks) < 2:
            continue
        split = splits["val" if is_validation(page) else "train"]
        split["docs"].append(page_document(blocks))
        split["chats"].extend(page_conversations(blocks, rng))

    for name, split in splits.items():
        with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
            f.write("\n\n\n".join(split["docs"]))
        with open(os.path.join(args.out, f"{name}_chats.jsonl"), "w") as f:
            for conversation in split["chats"]:
                f.write(json.dumps(conversation) + "\n")

    tokenizer = train_tokenizer(splits["train"]["docs"], args.vocab_size,
                                os.path.join(args.out, "tokenizer"))
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    stats = {}
    for name, split in splits.items():
        # Documents and conversations shuffled together, so every window of the stream mixes both.
        items = [(doc, False) for doc in split["docs"]] + [
            (render_chat(c), True) for c in split["chats"]]
        rng.shuffle(items)
        stream: list[int] = []
        for text, is_chat in items:
            if is_chat:
                stream.extend(tokenizer.encode(text, add_special_tokens=False).ids)
            else:
                stream.append(bos)
                stream.extend(tokenizer.encode(text, add_special_tokens=False).ids)
            stream.append(eos)
        np.save(os.path.join(args.out, f"{name}.npy"), np.asarray(stream, dtype=np.uint16))
        words = sum(len(doc.split()) for doc in split["docs"])
        stats[name] = {"pages": len(split["docs"]), "words": words,
                       "conversations": len(split["chats"]), "tokens": len(stream)}
    with open(os.path.join(args.out, "corpus_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()

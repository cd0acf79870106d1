"""The `octavo` command end to end, in subprocesses on the CPU with the embedded default model:
generate (plain, streamed, several completions), chat driven through standard input, Ctrl-C,
and bad flags."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 300  # seconds; each command loads the model (a few seconds on an idle machine)


def octavo(*args: str, stdin: str = "", timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "octavo.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_and_generate_stream():
    """Greedy decoding, so the streamed text must be exactly the text printed at the end."""
    args = ["generate", "The Python interpreter", "--max-tokens", "24", "--temperature", "0",
            "--device", "cpu"]
    plain = octavo(*args)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("The Python interpreter")
    assert len(plain.stdout) > len("The Python interpreter") + 20, plain.stdout
    said = [line for line in plain.stderr.splitlines() if "default model" in line]
    assert len(said) == 1, plain.stderr
    streamed = octavo(*args, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout
    assert "Traceback" not in plain.stderr + streamed.stderr


@pytest.fixture(scope="module")
def default_llm():
    from octavo import LLM

    return LLM(device="cpu", kv_cache_memory_bytes=64 << 20)


def test_stream_completion_writes_token_by_token(default_llm):
    """The streaming path hands text out in pieces as the engine produces them, and the pieces
    add up to what LLM.generate returns."""
    from octavo import SamplingParams
    from octavo.cli import stream_completion

    llm = default_llm
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompt = "Exceptions are"
    expected = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
    pieces: list[str] = []
    text = stream_completion(llm, llm.get_tokenizer().encode(prompt), params, prompt,
                             pieces.append)
    assert "".join(pieces) == text == expected
    assert len(pieces) >= 10, pieces  # one piece per token or so, not one at the end
    # The engine is idle again: a second request runs normally.
    assert llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text == expected


def test_generate_several_prompts_and_completions():
    result = octavo("generate", "A dictionary", "To open a file,", "--n", "2", "--max-tokens",
                    "12", "--seed", "7", "--temperature", "0.8", "--top-p", "0.9", "--device",
                    "cpu")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("--- prompt ")[1:]
    assert [block.split(" ---")[0] for block in blocks] == [
        "1, completion 1", "1, completion 2", "2, completion 1", "2, completion 2"]
    prompts = [block.split(" ---\n", 1)[1] for block in blocks]
    assert all(text.startswith("A dictionary") for text in prompts[:2])
    assert all(text.startswith("To open a file,") for text in prompts[2:])


def test_chat_through_stdin():
    result = octavo("chat", "--max-tokens", "24", "--temperature", "0", "--device", "cpu",
                    stdin="What is a tuple?\n\nHow do I sort a list?\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split("\n") if line.strip()]
    assert len(replies) >= 2, result.stdout  # one reply per message; the empty line is skipped
    assert "Traceback" not in result.stderr


def test_chat_sends_the_whole_conversation(monkeypatch, default_llm):
    """Each prompt holds the earlier messages and replies, through the chat template."""
    import io

    from octavo import cli

    prompts: list[str] = []

    def fake_stream(llm, prompt_token_ids, params, prompt, write):
        prompts.append(llm.get_tokenizer().decode(prompt_token_ids))
        reply = f"reply {len(prompts)}"
        write(reply)
        return reply

    monkeypatch.setattr(cli, "stream_completion", fake_stream)
    monkeypatch.setattr(cli, "_make_llm", lambda args: default_llm)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n"))
    args = cli.build_parser().parse_args(["chat", "--device", "cpu", "--system", "Be brief."])
    assert cli.cmd_chat(args) == 0
    assert prompts[1] == (
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nfirst question<|im_end|>\n<|im_start|>assistant\nreply 1<|im_end|>\n"
        "<|im_start|>user\nsecond question<|im_end|>\n<|im_start|>assistant\n")


def test_chat_drops_the_oldest_exchange_when_the_context_is_full():
    from octavo.cli import _fit_conversation
    from octavo.tokenizer import load_tokenizer
    from octavo import default_model

    tokenizer = load_tokenizer(default_model.path())
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i} " * 10},
                     {"role": "assistant", "content": f"answer {i} " * 10}]
    messages.append({"role": "user", "content": "last question"})
    ids = _fit_conversation(tokenizer, messages, budget=200)
    assert ids is not None and len(ids) <= 200
    assert messages[0]["content"] == "Be brief."  # the system message stays
    assert messages[-1]["content"] == "last question"
    assert len(messages) % 2 == 0 and len(messages) < 42  # whole exchanges were dropped
    # A single message longer than the budget does not fit at all.
    assert _fit_conversation(tokenizer, [{"role": "user", "content": "word " * 500}], 100) is None


def test_chat_ctrl_c_exits_cleanly():
    process = subprocess.Popen([sys.executable, "-m", "octavo.cli", "chat", "--device", "cpu"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the model to load (its log line), then interrupt the wait for input.
        deadline = time.monotonic() + TIMEOUT
        stderr_lines = []
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            stderr_lines.append(line)
            if "KV pool" in line:
                break
        assert any("KV pool" in line for line in stderr_lines), "".join(stderr_lines)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Traceback" not in rest, rest


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--n", "0"], "--n is 0"),
    (["generate", "x", "--n", "2", "--stream"], "--stream prints one completion"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--top-p", "1.5"], "top_p"),
    (["generate", "x", "--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_flags_fail_with_a_message(args, message):
    result = octavo(*args, "--device", "cpu")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert '[project.scripts]\noctavo = "octavo.cli:main"' in text
    if shutil.which("octavo") is None:  # installed with pip install . (CI): run it
        return
    result = subprocess.run(["octavo", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout, result.stderr


def test_serve_resolves_the_model_once(monkeypatch):
    """`octavo serve` hands the server its flags; with no model the server resolves the default
    (one place), with one it gets --model first."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from octavo import cli, default_model
    from octavo.entrypoints.openai import api_server

    seen = []
    monkeypatch.setattr(api_server, "main", lambda argv: seen.append(argv))
    assert cli.cmd_serve(None, ["--port", "9"]) == 0
    assert cli.cmd_serve("/some/model", ["--port", "9"]) == 0
    assert seen == [["--port", "9"], ["--model", "/some/model", "--port", "9"]]

    parser = api_server.make_arg_parser()
    args = parser.parse_args(["--port", "9"])
    api_server._resolve_model(parser, args)
    assert args.model == default_model.path()

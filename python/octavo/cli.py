"""The `octavo` command: generate text, chat, serve the OpenAI API, export a model.

    octavo generate "The Python interpreter"            # the embedded default model
    octavo generate --model DIR --stream --max-tokens 64 "Once upon a time"
    octavo chat [--model DIR]                           # Ctrl-D or Ctrl-C ends it
    octavo serve [MODEL] [--port 8000 ...]              # the server's flags, see octavo serve -h
    octavo export HF_DIR OUT_DIR                        # see octavo export -h

With no --model (no MODEL for serve), the checkpoint shipped inside the package
(octavo.default_model) is used, and the log says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

logger = logging.getLogger("octavo")

# Sampling defaults of generate and chat. vLLM's SamplingParams default is temperature 1.0, top_p
# 1.0; a command that prints text for a person (and the small default model) reads better a little
# cooler and without the long tail.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory (default: the embedded default "
                             "model)")
    parser.add_argument("--device", default=None,
                        help='"cpu", "cuda" or "cuda:N" (default: "cuda" when a GPU is visible, '
                             'else "cpu")')


def _add_sampling_flags(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help=f"tokens to generate per completion (default {max_tokens})")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"0 for greedy decoding (default {DEFAULT_TEMPERATURE})")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                        help=f"nucleus sampling, in (0, 1] (default {DEFAULT_TOP_P})")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampler, for reproducible output (default: none)")


def _sampling_params(args, n: int = 1):
    from octavo import SamplingParams

    return SamplingParams(n=n, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)


def _make_llm(args):
    from octavo.engine_core import default_device
    from octavo.llm import LLM

    # model=None: LLM loads the embedded default model and logs that it does.
    return LLM(args.model, device=args.device or default_device())


def stream_completion(llm, prompt_token_ids: list[int], params, prompt: Optional[str],
                      write) -> str:
    """Runs one request (n=1) through llm's engine, calling write(delta) with each piece of new
    text as soon as it is decoded; returns the whole completion. LLM.generate returns only when
    every request has finished, so this drives llm.engine itself, with the per-request output
    tracking (RequestState) that LLM uses."""
    from octavo.engine_core import to_cpp_sampling_params
    from octavo.llm import _POLL_SECONDS
    from octavo.output_processor import RequestState

    engine = llm.engine
    engine_id = engine.add_request(prompt_token_ids, to_cpp_sampling_params(params))
    state = RequestState("cli-0", prompt, prompt_token_ids, params, llm.get_tokenizer())
    sequence = state.sequences[0]
    written = 0
    try:
        while not state.done:
            for out in engine.get_outputs(_POLL_SECONDS):
                if out.group_id != engine_id or state.done:
                    continue
                if state.absorb(out):
                    engine.abort(out.id, whole_group=False)  # a stop string ended it
                if out.error:
                    raise RuntimeError(f"generation failed: {out.error}")
                if len(sequence.text) > written:
                    write(sequence.text[written:])
                    written = len(sequence.text)
    except BaseException:  # Ctrl-C or an error: the engine must not keep the request
        llm._abort_and_drain([engine_id])
        raise
    llm._drain()  # the next request starts on an idle engine
    return sequence.text


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    if args.n < 1:
        raise SystemExit(f"octavo generate: --n is {args.n}; it must be at least 1")
    if args.stream and args.n > 1:
        raise SystemExit(f"octavo generate: --stream prints one completion at a time; --n is "
                         f"{args.n} (drop --stream, or use --n 1)")
    params = _sampling_params(args, n=args.n)  # validates the flags before the model loads
    llm = _make_llm(args)
    tokenizer = llm.get_tokenizer()
    several = len(args.prompt) * args.n > 1
    if args.stream:
        for index, prompt in enumerate(args.prompt):
            if several:
                print(f"--- prompt {index + 1} ---", flush=True)
            _write_stdout(prompt)
            stream_completion(llm, tokenizer.encode(prompt), params, prompt, _write_stdout)
            _write_stdout("\n")
        return 0
    outputs = llm.generate(list(args.prompt), params, use_tqdm=False)
    for index, output in enumerate(outputs):
        for completion in output.outputs:
            if several:
                header = f"--- prompt {index + 1}"
                if args.n > 1:
                    header += f", completion {completion.index + 1}"
                print(header + " ---")
            print(output.prompt + completion.text, flush=True)
    return 0


def _fit_conversation(tokenizer, messages: list[dict], budget: int) -> Optional[list[int]]:
    """The chat prompt's tokens, after dropping the oldest exchanges (never a system message)
    until it fits `budget` tokens; None when even the latest message alone does not fit."""
    while True:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= budget:
            return ids
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None
        del messages[first:first + 2]  # the oldest user message and the reply to it
        logger.info("octavo chat: the conversation outgrew the context; dropped the oldest "
                    "exchange")


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _make_llm(args)
    tokenizer = llm.get_tokenizer()
    if getattr(tokenizer, "chat_template", None) is None:
        raise SystemExit(f"octavo chat: the tokenizer of {args.model} has no chat template; "
                         "chat needs a model made for it (or use octavo generate)")
    max_model_len = llm.engine.config.max_model_len
    budget = max_model_len - args.max_tokens
    if budget < 1:
        raise SystemExit(f"octavo chat: --max-tokens {args.max_tokens} leaves no room for the "
                         f"conversation in max_model_len {max_model_len}")
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("octavo chat: type a message and press Enter; Ctrl-D or Ctrl-C ends.", flush=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = _fit_conversation(tokenizer, messages, budget)
        if prompt_ids is None:
            messages.pop()
            print(f"octavo chat: that message does not fit in the context "
                  f"({max_model_len} tokens, {args.max_tokens} of them kept for the reply); "
                  f"send a shorter one", file=sys.stderr, flush=True)
            continue
        reply = stream_completion(llm, prompt_ids, params, None, _write_stdout)
        _write_stdout("\n")
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(model: Optional[str], rest: list[str], pass_through: bool = False) -> int:
    """Runs the server with `--model MODEL` (the default model when None) and the flags in rest;
    pass_through: rest already names the model (--model) or asks for --help."""
    try:
        from octavo.entrypoints.openai import api_server
    except ImportError as error:
        raise SystemExit(f"octavo serve: the OpenAI-compatible server cannot be imported "
                         f"({error}); install its dependencies with pip install 'octavo[server]'")
    if pass_through or model is None:  # the server resolves a missing --model to the default
        return int(api_server.main(rest) or 0)
    return int(api_server.main(["--model", model, *rest]) or 0)


def cmd_export(rest: list[str]) -> int:
    from octavo import export

    return int(export.main(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="octavo", description="octavo: LLM inference and serving engine built around "
                                   "PagedAttention.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser(
        "generate", help="print completions of prompts",
        description="Prints each prompt followed by its completion.")
    generate.add_argument("prompt", nargs="+", metavar="PROMPT", help="text to complete")
    _add_engine_flags(generate)
    _add_sampling_flags(generate, max_tokens=128)
    generate.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    generate.add_argument("--stream", action="store_true",
                          help="print the text token by token as it is generated")

    chat = commands.add_parser(
        "chat", help="an interactive conversation through the model's chat template",
        description="Reads messages from standard input, one a line, and prints the model's "
                    "replies; Ctrl-D or Ctrl-C ends.")
    _add_engine_flags(chat)
    _add_sampling_flags(chat, max_tokens=256)
    chat.add_argument("--system", default=None, help="a system message that opens the chat")

    serve = commands.add_parser(
        "serve", help="the OpenAI-compatible HTTP server", add_help=False,
        description="octavo serve [MODEL] [server flags]: every flag goes to the server "
                    "(octavo serve --help lists them).")
    serve.add_argument("model", nargs="?", default=None, metavar="MODEL")

    commands.add_parser("export", help="write octavo's model directory for the C++ API",
                        add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `octavo` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        # serve and export hand their flags over to their own parsers untouched.
        if command == "export":
            return cmd_export(argv[1:])
        if command == "serve":
            rest = argv[1:]
            if rest and not rest[0].startswith("-"):  # octavo serve MODEL [flags]
                return cmd_serve(rest[0], rest[1:])
            pass_through = any(flag in ("-h", "--help", "--model") or flag.startswith("--model=")
                               for flag in rest)
            return cmd_serve(None, rest, pass_through)
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_chat(args)
    except KeyboardInterrupt:
        # Ctrl-C: stop cleanly (stream_completion has aborted the request), no traceback.
        print(file=sys.stderr)
        return 130
    except ValueError as error:  # a bad flag value or checkpoint, named by the message
        print(f"octavo {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI-compatible HTTP server, started as vLLM's is:

    python -m octavo.entrypoints.openai.api_server --model MODEL [--host --port --api-key ...]
    octavo serve MODEL [...]

Endpoints: POST /v1/completions and /v1/chat/completions (streaming as server-sent events),
GET /v1/models, /health, /metrics (Prometheus), /version, POST /tokenize and /detokenize.
Errors come in OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}) with the
matching HTTP status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Optional

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _error:  # the [server] extra is not installed
    _message = (f"octavo's OpenAI server needs fastapi and uvicorn ({_error}); install them "
                "with: pip install 'octavo[server]'")
    if __name__ == "__main__":
        raise SystemExit(_message) from None
    raise ImportError(_message) from _error
from pydantic import BaseModel, ValidationError

import octavo
from octavo.async_llm import AsyncLLM
from octavo.engine_core import EngineArgs, default_device
from octavo.entrypoints.openai.metrics import ServerMetrics
from octavo.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from octavo.entrypoints.openai.serving_chat import OpenAIServingChat
from octavo.entrypoints.openai.serving_completion import OpenAIServingCompletion
from octavo.entrypoints.openai.serving_engine import OpenAIError

logger = logging.getLogger("octavo")

# Routes that need the API key when one is set (vLLM guards /v1; tokenization costs work too).
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")

# vLLM's --dtype spellings (the engine normalises them with octavo.models.normalize_dtype).
_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def make_arg_parser() -> argparse.ArgumentParser:
    """The server's flags, spelled as vLLM spells them."""
    parser = argparse.ArgumentParser(
        prog="python -m octavo.entrypoints.openai.api_server",
        description="octavo's OpenAI-compatible server.")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument("--api-key", default=os.environ.get("OCTAVO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1, /tokenize and "
                             "/detokenize (default: $OCTAVO_API_KEY, else no key)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="the model name(s) clients give; the first is reported "
                             "(default: --model as given)")
    server.add_argument("--chat-template", default=None,
                        help="a Jinja chat template (a file, or the template itself) replacing "
                             "the tokenizer's")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    server.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="do not log every HTTP request")
    server.add_argument("--disable-log-stats", action="store_true",
                        help="do not log throughput and KV-cache usage every 10 seconds")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--model", default=None,
                        help="a local Hugging Face checkpoint directory")
    engine.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    engine.add_argument("--trust-remote-code", action="store_true")
    engine.add_argument("--device", default="auto",
                        help="auto (cuda when a GPU is usable, else cpu), cpu, cuda or cuda:N")
    engine.add_argument("--dtype", default="auto", choices=_DTYPES,
                        help="weights and KV-cache dtype (auto: the checkpoint's; bfloat16 for "
                             "a float32 checkpoint on a GPU)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output in tokens (default: the model's)")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences running at once (default 1024 on a GPU of at least "
                             "70 GiB, else 256)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per engine step (default 16384 on a GPU of at least 70 GiB, "
                             "else min(8192, max_model_len))")
    engine.add_argument("--block-size", type=int, default=16,
                        help="tokens per KV-cache block (default 16)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="reuse the KV of shared prompt prefixes (default on)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of the GPU's memory octavo may use (default 0.9)")
    engine.add_argument("--num-gpu-blocks-override", type=int, default=None,
                        help="fix the KV pool size in blocks")
    engine.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="on the CPU, bytes given to the KV pool (default 4 GiB)")
    engine.add_argument("--enforce-eager", action="store_true",
                        help="never replay CUDA graphs for decode steps")
    engine.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="launch each step while the one before it runs (default: on GPUs)")
    engine.add_argument("--seed", type=int, default=0,
                        help="seeds requests that bring no seed of their own (default 0)")
    return parser


def _resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model is not None:
        return
    try:
        from octavo import default_model
    except ImportError:
        parser.error("--model is required: a local Hugging Face checkpoint directory")
    args.model = default_model.path()
    logger.info("octavo: no --model given: serving the embedded default model at %s", args.model)


def engine_args_from_cli(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
        device=default_device() if args.device == "auto" else args.device, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, trust_remote_code=args.trust_remote_code)


def _read_chat_template(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:  # neither a file nor a template: most likely a mistyped path
        raise ValueError(f"--chat-template {value!r} is not a file, nor a Jinja template")
    return value


# Request bodies.

_UNION_HINTS = {
    "prompt": "a string, an array of strings, an array of token ids, or an array of arrays of "
              "token ids",
    "stop": "a string or an array of strings",
    "content": "a string or an array of content parts",
    "tool_choice": "a string or an object",
}
_TYPE_TAGS = {"str", "int", "float", "bool"}


def _is_union_tag(item: Any) -> bool:
    # pydantic names the branch of a Union it tried by its type ('str', 'list[int]', ...).
    return isinstance(item, str) and ("[" in item or item in _TYPE_TAGS)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _field_path(loc: tuple) -> tuple[str, Optional[str], int]:
    """A pydantic location as the client wrote it ("messages[0].content"), the field name that
    last led there, and how many union branches it went through."""
    path, named, unions = "", None, 0
    for item in loc:
        if _is_union_tag(item):
            unions += 1
        elif isinstance(item, int):
            path += f"[{item}]"
        else:
            path += f".{item}" if path else str(item)
            named = item
    return path, named, unions


def _shown(value: Any) -> str:
    if isinstance(value, (int, float, str, bool)) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return _json_type(value)


def _validation_error(error: ValidationError) -> OpenAIError:
    """A pydantic error as a 400 whose message names the field, its problem and the value."""
    errors = error.errors(include_url=False)
    first = errors[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return OpenAIError(f"the request body is not valid JSON: {first['msg']}")
    if not loc:
        return OpenAIError(f"the request body must be a JSON object, got "
                           f"{_json_type(first.get('input'))}")
    param = str(loc[0])
    if any(_is_union_tag(item) for item in loc):
        # A value that matched no branch of a Union: if some branch got further into it than
        # its type (an array of token ids holding a string), that is the mistake to name;
        # otherwise the value's type is, against the types the field takes.
        union_path, named, _ = _field_path(loc[:next(i for i, item in enumerate(loc)
                                                     if _is_union_tag(item))])
        deepest = max((e for e in errors if e["loc"][:1] == loc[:1]),
                      key=lambda e: (len(_field_path(e["loc"])[0]),
                                     [i for i in e["loc"] if isinstance(i, int)]))
        path = _field_path(deepest["loc"])[0]
        if path != union_path:
            return OpenAIError(f"{path}: {deepest['msg']} (got {_shown(deepest.get('input'))})",
                               param=param)
        hint = _UNION_HINTS.get(named)
        if hint:
            return OpenAIError(f"{union_path} must be {hint}; got "
                               f"{_json_type(first.get('input'))}", param=param)
    path = _field_path(loc)[0]
    if kind == "missing":
        return OpenAIError(f"{path} is required", param=param)
    return OpenAIError(f"{path}: {first['msg']} (got {_shown(first.get('input'))})", param=param)


async def _parse(raw: Request, model: type[BaseModel]) -> Any:
    body = await raw.body()
    if not body.strip():
        raise OpenAIError("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise _validation_error(error) from None


# Responses.

_CLIENT_GONE = object()


async def _until_disconnect(raw: Request, work: Awaitable) -> Any:
    """Runs `work` unless the client goes away first; then cancels it (aborting its requests)
    and returns _CLIENT_GONE."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    if task.cancelled():
        return _CLIENT_GONE
    return task.result()


class _EventStream(StreamingResponse):
    """Server-sent events that stop, and close their source (aborting its requests), as soon
    as the client disconnects, even while no event is ready to send."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event.encode("utf-8"),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self.body_iterator.aclose()
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, OSError):
            raise error  # OSError: the client went away while we were sending


def _respond(result: Any) -> Response:
    if result is _CLIENT_GONE:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return _EventStream(result)


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _APIKeyMiddleware:
    """401 without 'Authorization: Bearer <key>' on the protected routes (pure ASGI, so it
    leaves streaming responses alone)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and scope["path"].startswith(_PROTECTED_PREFIXES)):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = OpenAIError(
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the "
                    "key the server was started with (--api-key)", status=401,
                    error_type="invalid_request_error", code="invalid_api_key")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _log_stats(llm: AsyncLLM, interval: float) -> None:
    """vLLM's periodic line: throughput, queue, KV-cache use; only while there is work."""
    last, last_time = await asyncio.to_thread(llm.stats), time.monotonic()
    while True:
        await asyncio.sleep(interval)
        stats, now = await asyncio.to_thread(llm.stats), time.monotonic()
        elapsed = max(now - last_time, 1e-9)
        busy = (stats.num_running or stats.num_waiting
                or stats.generation_tokens != last.generation_tokens)
        if busy:
            used = stats.num_kv_blocks - stats.num_free_kv_blocks
            logger.info(
                "octavo: prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, "
                "running %d, waiting %d, KV cache %.1f%% used, prefix cache hit rate %.1f%%",
                (stats.prompt_tokens - last.prompt_tokens) / elapsed,
                (stats.generation_tokens - last.generation_tokens) / elapsed,
                stats.num_running, stats.num_waiting,
                100.0 * used / max(stats.num_kv_blocks, 1),
                100.0 * stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1))
        last, last_time = stats, now


def build_app(llm: AsyncLLM, args: argparse.Namespace) -> FastAPI:
    """The FastAPI application over a running AsyncLLM."""
    served_model_names = args.served_model_name or [args.model]
    metrics = ServerMetrics(served_model_names[0])
    chat_template = _read_chat_template(args.chat_template)
    completions = OpenAIServingCompletion(llm, served_model_names, metrics, chat_template)
    chat = OpenAIServingChat(llm, served_model_names, metrics, chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        stats_task = None
        if not args.disable_log_stats:
            stats_task = asyncio.ensure_future(_log_stats(llm, 10.0))
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            await asyncio.to_thread(llm.shutdown)

    app = FastAPI(title="octavo", version=octavo.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    if args.api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=args.api_key)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, error: OpenAIError):
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return _error_response(OpenAIError(str(error.detail), status=error.status_code))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception):
        logger.exception("octavo: internal error")
        return _error_response(OpenAIError(f"internal server error: {error}", status=500))

    @app.post("/v1/completions")
    async def create_completion(raw: Request):
        request = await _parse(raw, CompletionRequest)
        return _respond(await _until_disconnect(raw, completions.create_completion(request)))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(raw: Request):
        request = await _parse(raw, ChatCompletionRequest)
        return _respond(await _until_disconnect(raw, chat.create_chat_completion(request)))

    @app.get("/v1/models")
    async def list_models():
        cards = [ModelCard(id=name, root=args.model, max_model_len=llm.max_model_len)
                 for name in served_model_names]
        return _respond(ModelList(data=cards))

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        return JSONResponse(completions.tokenize(await _parse(raw, TokenizeRequest)))

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        return JSONResponse(completions.detokenize(await _parse(raw, DetokenizeRequest)))

    @app.get("/health")
    async def health():
        if llm.errored:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        stats = await asyncio.to_thread(llm.stats)
        return PlainTextResponse(metrics.render(stats),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        return JSONResponse({"version": octavo.__version__})

    return app


def _bind(host: str, port: int) -> socket.socket:
    """Binds the port before the model loads, so a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise SystemExit(f"octavo: cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: Optional[list[str]] = None) -> None:
    """Parses the flags (argv, default sys.argv[1:]), loads the model and serves until
    interrupted."""
    parser = make_arg_parser()
    args = parser.parse_args(argv)
    _resolve_model(parser, args)
    try:
        engine_args = engine_args_from_cli(args)
        _read_chat_template(args.chat_template)  # a bad path fails before the model loads
    except ValueError as error:
        parser.error(str(error))
    sock = _bind(args.host, args.port)
    try:
        llm = AsyncLLM(engine_args)
    except (ValueError, RuntimeError, MemoryError) as error:
        sock.close()
        raise SystemExit(f"octavo: cannot start the server: {error}") from None
    try:
        app = build_app(llm, args)
        config = uvicorn.Config(app, log_level=args.uvicorn_log_level,
                                access_log=not args.disable_uvicorn_access_log)
        server = uvicorn.Server(config)
        logger.info("octavo: serving %s at http://%s:%d/v1 (OpenAI API)",
                    (args.served_model_name or [args.model])[0], args.host, args.port)
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C
        pass
    finally:
        llm.shutdown()
        sock.close()


if __name__ == "__main__":
    main()

"""What the completion and chat endpoints share: errors in OpenAI's shape, the model check, prompt
length checks, OpenAI fields to SamplingParams, and running several prompts as one stream."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from octavo.async_llm import AsyncLLM, EngineDeadError, RequestOutputKind
from octavo.entrypoints.openai.metrics import ServerMetrics
from octavo.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, UsageInfo
from octavo.outputs import Logprob, RequestOutput
from octavo.sampling_params import SamplingParams

logger = logging.getLogger("octavo")

# JSON has no -inf; OpenAI-compatible servers report an impossible token's logprob as this.
_MIN_LOGPROB = -9999.0


class OpenAIError(Exception):
    """A request error, answered as OpenAI answers it: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 error_type: Optional[str] = None, code: Optional[Union[str, int]] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.error_type = error_type or ("server_error" if status >= 500
                                         else "invalid_request_error")
        self.code = code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.error_type,
                                             param=self.param, code=self.code)).model_dump()


def clamp_logprob(value: float) -> float:
    return max(float(value), _MIN_LOGPROB) if not math.isnan(value) else _MIN_LOGPROB


def top_entries(entry: dict[int, Logprob], count: int) -> list[tuple[int, Logprob]]:
    """The `count` most likely tokens of one position, best first (entry also holds the sampled
    token, which may rank lower)."""
    ranked = [(token, lp) for token, lp in entry.items()
              if lp.rank is not None and lp.rank <= count]
    return sorted(ranked, key=lambda item: item[1].rank)


def stream_usage(request) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a request's stream_options."""
    options = request.stream_options
    include = bool(options and options.include_usage)
    return include, bool(include and options.continuous_usage_stats)


class EventWriter:
    """The server-sent events of one streamed response, written straight to JSON: with hundreds
    of streams the event loop spends its time here, and building pydantic models per chunk costs
    about twice as much. Chunks are OpenAI's: a "text_completion" object like CompletionResponse,
    or a "chat.completion.chunk" whose choices carry a `delta` message."""

    def __init__(self, request_id: str, object_name: str, created: int, model: str,
                 include_usage: bool):
        self._head = (f'data: {{"id":{json.dumps(request_id)},"object":{json.dumps(object_name)},'
                      f'"created":{created},"model":{json.dumps(model)},"choices":')
        # OpenAI: with include_usage, every chunk has a usage field, null but in the last.
        self._no_usage = ',"usage":null' if include_usage else ""

    def event(self, choices: list[dict], usage: Optional[UsageInfo] = None) -> str:
        body = self._head + json.dumps(choices, separators=(",", ":"))
        body += self._no_usage if usage is None else ',"usage":' + usage.model_dump_json()
        return body + "}\n\n"

    @staticmethod
    def error(error: Exception) -> str:
        return f"data: {json.dumps(engine_error(error).body())}\n\n"

    DONE = "data: [DONE]\n\n"


@dataclass
class Prompt:
    """One prompt as the engine sees it: its text (None for token ids) and token ids."""

    text: Optional[str]
    token_ids: list[int]


class OpenAIServing:
    """State the endpoints share: the engine, the served model names, metrics."""

    def __init__(self, llm: AsyncLLM, served_model_names: Sequence[str], metrics: ServerMetrics,
                 chat_template: Optional[str] = None):
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.served_model_names = list(served_model_names)
        self.metrics = metrics
        self.chat_template = chat_template
        self.max_model_len = llm.max_model_len
        self.vocab_size = int(llm.engine.spec.vocab_size)
        self.max_num_seqs = int(llm.engine.config.max_num_seqs)

    def model_name(self, requested: Optional[str]) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise OpenAIError(
                f"The model `{requested}` does not exist. This server serves "
                f"{', '.join(repr(name) for name in self.served_model_names)}.",
                status=404, param="model", code="model_not_found")
        return requested

    def check_tokens(self, token_ids: list[int], field: str) -> None:
        for token in token_ids:
            if not 0 <= token < self.vocab_size:
                raise OpenAIError(f"{field}: token id {token} is outside the vocabulary "
                                  f"[0, {self.vocab_size})", param=field)

    def check_length(self, prompt: Prompt, max_tokens: Optional[int], field: str) -> None:
        """vLLM's rule: the prompt and the requested completion must fit in max_model_len."""
        prompt_len = len(prompt.token_ids)
        if prompt_len == 0:
            raise OpenAIError(f"{field} is empty; give at least one token", param=field)
        if prompt_len >= self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {prompt_len} tokens, which leaves no room for the completion. "
                f"Please reduce the length of the {field}.", param=field)
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the {field}, "
                f"{max_tokens} in the completion). Please reduce the length of the {field} or "
                f"completion.", param="max_tokens")

    def sampling_params(self, request, max_tokens: Optional[int], logprobs: Optional[int],
                        prompt_logprobs: Optional[int]) -> SamplingParams:
        """OpenAI's and vLLM's request fields as SamplingParams; 400 naming the field when a
        value is out of range."""
        try:
            return SamplingParams(
                n=request.n,
                best_of=request.best_of,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=(1.0 if request.repetition_penalty is None
                                    else request.repetition_penalty),
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=0 if request.top_k is None else request.top_k,
                min_p=0.0 if request.min_p is None else request.min_p,
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=request.skip_special_tokens,
                spaces_between_special_tokens=request.spaces_between_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                logit_bias=request.logit_bias,
            )
        except (ValueError, TypeError) as error:
            message = str(error)
            field = message.split(" ", 1)[0]
            raise OpenAIError(message, param=field if field in type(request).model_fields
                              else None) from None

    def usage(self, prompts: Sequence[Prompt], completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    def generate_all(self, prompts: Sequence[Prompt], params: SamplingParams, request_id: str,
                     output_kind: RequestOutputKind) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Runs every prompt as its own engine request; yields (prompt index, output) as they
        come. Closing the iterator (or cancelling its consumer) aborts what still runs."""
        delta = output_kind is RequestOutputKind.DELTA
        generators = [
            self._observed(self.llm.generate({"prompt": p.text, "prompt_token_ids": p.token_ids},
                                             params, f"{request_id}-{i}", output_kind=output_kind),
                           delta)
            for i, p in enumerate(prompts)]
        if len(generators) == 1:
            return _single(generators[0])
        return _merge(generators)

    async def start_stream(self, prompts: Sequence[Prompt], params: SamplingParams,
                           request_id: str):
        """generate_all in delta mode, with its first output already in, so that a request the
        engine refuses is an HTTP error before any event goes out: ((index, output), outputs)."""
        outputs = self.generate_all(prompts, params, request_id, RequestOutputKind.DELTA)
        try:
            first = await outputs.__anext__()
        except BaseException as error:
            await outputs.aclose()
            if isinstance(error, Exception):
                raise engine_error(error) from None
            raise
        return first, outputs

    async def final_outputs(self, prompts: Sequence[Prompt], params: SamplingParams,
                            request_id: str) -> list[RequestOutput]:
        """Every prompt's final output, in prompt order."""
        final: list = [None] * len(prompts)
        outputs = self.generate_all(prompts, params, request_id, RequestOutputKind.FINAL_ONLY)
        try:
            async for index, output in outputs:
                final[index] = output
        except Exception as error:
            raise engine_error(error) from None
        finally:
            await outputs.aclose()
        return final

    def token_text(self, token: int, decoded: Optional[str]) -> str:
        """A token's text: the engine's detokenized piece, else the tokenizer's."""
        return decoded if decoded is not None else self.tokenizer.decode([token])

    async def _observed(self, outputs: AsyncIterator[RequestOutput],
                        delta: bool) -> AsyncIterator[RequestOutput]:
        """Records the request's latencies and finish reason in /metrics as its outputs pass."""
        lengths: dict[int, int] = {}
        metrics = None
        first_token_seen = False
        reason = "abort"  # unless it finishes: the client went away or the request failed
        try:
            async for output in outputs:
                if (not first_token_seen and output.metrics is not None
                        and output.metrics.first_token_time is not None):
                    self.metrics.observe_first_token(output.metrics)
                    first_token_seen = True
                metrics = output.metrics
                for completion in output.outputs:
                    before = lengths.get(completion.index, 0) if delta else 0
                    lengths[completion.index] = before + len(completion.token_ids)
                if output.finished:
                    reasons = [c.finish_reason for c in output.outputs if c.finish_reason]
                    reason = reasons[0] if reasons else "stop"
                yield output
        except ValueError:  # refused before it ran: not a request that ended
            reason = None
            raise
        finally:
            if reason is not None:
                self.metrics.observe_finished(metrics, reason, time.monotonic(),
                                              max(lengths.values(), default=0))

    def check_params(self, params: SamplingParams, stream: bool) -> None:
        """What a completion or chat request's sampling parameters must satisfy beyond their
        own validation: the sequence cap, best_of with streaming, logit_bias ids in the
        vocabulary."""
        sequences = params.best_of or params.n
        if sequences > self.max_num_seqs:
            field = "best_of" if params.best_of else "n"
            raise OpenAIError(f"{field} is {sequences}; this server runs at most "
                              f"{self.max_num_seqs} sequences at once (--max-num-seqs)",
                              param=field)
        if stream and params.best_of is not None and params.best_of > params.n:
            raise OpenAIError("best_of > n cannot stream: the best sequences are known only "
                              "once all finished", param="best_of")
        if params.logit_bias:
            self.check_tokens([int(t) for t in params.logit_bias], "logit_bias")

    def render_chat(self, messages, request) -> Prompt:
        """Chat messages through the chat template (the request's, the server's --chat-template,
        else the tokenizer's), as a prompt. 400 when there is no template or it fails."""
        conversation = []
        for i, message in enumerate(messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise OpenAIError(
                            f"messages[{i}].content: content parts of type {part.type!r} are not "
                            "supported; this server takes text parts only",
                            param=f"messages[{i}].content")
                    texts.append(part.text)
                content = "\n".join(texts)
            entry = {"role": message.role, "content": content or ""}
            if message.name is not None:
                entry["name"] = message.name
            conversation.append(entry)
        template = request.chat_template or self.chat_template
        if template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise OpenAIError("the model's tokenizer has no chat template; start the server with "
                              "--chat-template or pass chat_template in the request",
                              param="messages")
        if request.continue_final_message and request.add_generation_prompt:
            raise OpenAIError("continue_final_message and add_generation_prompt cannot both be "
                              "true", param="continue_final_message")
        if request.continue_final_message and conversation[-1]["role"] != "assistant":
            raise OpenAIError("continue_final_message needs the last message to be the "
                              "assistant's", param="continue_final_message")
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, chat_template=template,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **(request.chat_template_kwargs or {}))
        except Exception as error:  # a Jinja error, or the template's own raise_exception()
            raise OpenAIError(f"the chat template failed on these messages: {error}",
                              param="messages") from None
        # The template already holds any BOS: by default nothing is added again (as LLM.chat).
        return Prompt(text, self.tokenizer.encode(
            text, add_special_tokens=bool(request.add_special_tokens)))

    def tokenize(self, request) -> dict:
        """POST /tokenize: a prompt's token ids, or those of chat messages through the template."""
        self.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("give either prompt or messages", param="prompt")
        if request.messages is not None:
            if not request.messages:
                raise OpenAIError("messages is empty", param="messages")
            token_ids = self.render_chat(request.messages, request).token_ids
        else:
            token_ids = self.tokenizer.encode(
                request.prompt, add_special_tokens=request.add_special_tokens is not False)
        return {"count": len(token_ids), "max_model_len": self.max_model_len,
                "tokens": token_ids}

    def detokenize(self, request) -> dict:
        """POST /detokenize: the text of token ids."""
        self.model_name(request.model)
        self.check_tokens(request.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(request.tokens)}

    def check_engine(self) -> None:
        if self.llm.errored:
            raise OpenAIError("the engine is not running; the server cannot take requests",
                              status=503, error_type="server_error")


async def _single(generator: AsyncIterator[RequestOutput]):
    async for output in generator:
        yield 0, output


async def _merge(generators: list[AsyncIterator[RequestOutput]]):
    """Interleaves several request streams as outputs arrive; any error cancels the others."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(index: int, generator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in generator:
                await queue.put((index, output))
        except Exception as error:  # handed to the consumer, which raises it
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(drain(i, g)) for i, g in enumerate(generators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_error(error: Exception) -> OpenAIError:
    """An exception from generate() as the error the client gets."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, ValueError):  # the engine refused the request; the message says why
        return OpenAIError(str(error))
    if isinstance(error, EngineDeadError):
        return OpenAIError(str(error), status=503)
    logger.error("octavo: request failed: %s", error)
    return OpenAIError(f"the request failed: {error}", status=500)

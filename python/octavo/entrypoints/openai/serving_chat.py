"""POST /v1/chat/completions: messages through the chat template, one choice per sequence."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Optional, Union

from octavo.entrypoints.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
    UsageInfo,
    random_id,
)
from octavo.entrypoints.openai.serving_engine import (
    OpenAIError,
    EventWriter,
    OpenAIServing,
    clamp_logprob,
    stream_usage,
    top_entries,
)


class OpenAIServingChat(OpenAIServing):
    """The chat completions endpoint over an AsyncLLM."""

    async def create_chat_completion(
            self, request: ChatCompletionRequest
    ) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        """The response, or for stream=true the server-sent events (the first output is already
        in: any refusal of the request is a 400 before the stream starts)."""
        model = self.model_name(request.model)
        self.check_engine()
        if request.tools and request.tool_choice != "none":
            raise OpenAIError("tool calling is not supported by this server (tools need "
                              "tool_choice='none')", param="tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise OpenAIError(f"response_format {request.response_format.get('type')!r} is not "
                              "supported by this server; only 'text'", param="response_format")
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = (request.max_completion_tokens if request.max_completion_tokens is not None
                      else request.max_tokens)
        prompt = self.render_chat(request.messages, request)
        self.check_length(prompt, max_tokens, "messages")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, max_tokens, logprobs, request.prompt_logprobs)
        self.check_params(params, request.stream)
        request_id = random_id("chatcmpl")
        created = int(time.time())

        if request.stream:
            first, outputs = await self.start_stream([prompt], params, request_id)
            return self._stream(first, outputs, len(prompt.token_ids), request, model,
                                request_id, created)

        final = (await self.final_outputs([prompt], params, request_id))[0]
        choices = [
            ChatCompletionChoice(
                index=completion.index,
                message=ChatResponseMessage(content=completion.text),
                logprobs=self._logprobs(completion.token_ids, completion.logprobs, logprobs),
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
            for completion in final.outputs]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(id=request_id, created=created, model=model,
                                      choices=choices,
                                      usage=self.usage([prompt], completion_tokens))

    def _logprobs(self, token_ids, entries, top: Optional[int]) -> Optional[ChatChoiceLogprobs]:
        """OpenAI's chat logprobs: per token its text, bytes, logprob and the `top` most likely
        tokens at that position."""
        if top is None or entries is None:
            return None
        content = []
        for token, entry in zip(token_ids, entries):
            sampled = entry[token]
            text = self.token_text(token, sampled.decoded_token)
            content.append(ChatTokenLogprob(
                token=text, logprob=clamp_logprob(sampled.logprob),
                bytes=list(text.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=(t_text := self.token_text(t, lp.decoded_token)),
                               logprob=clamp_logprob(lp.logprob),
                               bytes=list(t_text.encode("utf-8")))
                    for t, lp in top_entries(entry, top)]))
        return ChatChoiceLogprobs(content=content)

    async def _stream(self, first, outputs, prompt_tokens: int, request: ChatCompletionRequest,
                      model: str, request_id: str, created: int) -> AsyncIterator[str]:
        include_usage, continuous_usage = stream_usage(request)
        top = (request.top_logprobs or 0) if request.logprobs else None
        writer = EventWriter(request_id, "chat.completion.chunk", created, model, include_usage)
        completion_tokens = 0

        def usage() -> Optional[UsageInfo]:
            if not continuous_usage:
                return None
            return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             total_tokens=prompt_tokens + completion_tokens)

        try:
            # OpenAI's first chunk of each choice names the role, with empty content.
            yield writer.event([{"index": i, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}
                                for i in range(request.n)], usage())
            output = first[1]
            while True:
                choices = []
                for completion in output.outputs:
                    completion_tokens += len(completion.token_ids)
                    logprobs = self._logprobs(completion.token_ids, completion.logprobs, top)
                    choices.append({
                        "index": completion.index, "delta": {"content": completion.text},
                        "logprobs": logprobs.model_dump() if logprobs is not None else None,
                        "finish_reason": completion.finish_reason,
                        "stop_reason": completion.stop_reason})
                if choices:
                    yield writer.event(choices, usage())
                try:
                    _, output = await outputs.__anext__()
                except StopAsyncIteration:
                    break
            if include_usage:
                yield writer.event([], UsageInfo(
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens))
        except Exception as error:  # the stream has started: the error goes in it
            yield writer.error(error)
        finally:
            await outputs.aclose()
        yield writer.DONE

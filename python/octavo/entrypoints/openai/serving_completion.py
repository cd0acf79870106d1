"""POST /v1/completions: text (or token-id) prompts, one choice per prompt and sequence."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Optional, Union

from octavo.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from octavo.entrypoints.openai.serving_engine import (
    OpenAIError,
    OpenAIServing,
    Prompt,
    EventWriter,
    clamp_logprob,
    stream_usage,
)
from octavo.outputs import Logprob


class OpenAIServingCompletion(OpenAIServing):
    """The completions endpoint over an AsyncLLM."""

    def _prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompt = request.prompt
        if isinstance(prompt, str):
            batch: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            batch = [prompt]
        else:
            batch = list(prompt)
        if not batch:
            raise OpenAIError("prompt is an empty list; give a prompt", param="prompt")
        prompts = []
        for item in batch:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
                prompts.append(Prompt(item, ids))
            else:
                self.check_tokens(item, "prompt")
                prompts.append(Prompt(None, list(item)))
        return prompts

    async def create_completion(
            self, request: CompletionRequest) -> Union[CompletionResponse, AsyncIterator[str]]:
        """The response, or for stream=true the server-sent events (the first output is already
        in: any refusal of the request is a 400 before the stream starts)."""
        model = self.model_name(request.model)
        self.check_engine()
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported by this server", param="suffix")
        prompts = self._prompts(request)
        for prompt in prompts:
            self.check_length(prompt, request.max_tokens, "prompt")
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:
            # The echoed prompt's tokens get logprobs too (the first one has none).
            prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
        params = self.sampling_params(request, request.max_tokens, request.logprobs,
                                      prompt_logprobs)
        self.check_params(params, request.stream)
        request_id = random_id("cmpl")
        created = int(time.time())

        if request.stream:
            first, outputs = await self.start_stream(prompts, params, request_id)
            return self._stream(first, outputs, prompts, request, model, request_id, created)

        final = await self.final_outputs(prompts, params, request_id)
        choices = []
        completion_tokens = 0
        for i, (prompt, output) in enumerate(zip(prompts, final)):
            for completion in output.outputs:
                completion_tokens += len(completion.token_ids)
                text = completion.text
                token_ids = list(completion.token_ids)
                entries = completion.logprobs
                if request.echo:
                    text = self._prompt_text(prompt) + text
                    token_ids = prompt.token_ids + token_ids
                    if entries is not None:
                        entries = list(output.prompt_logprobs or []) + list(entries)
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(token_ids, entries, 0)
                choices.append(CompletionChoice(
                    index=i * request.n + completion.index, text=text, logprobs=logprobs,
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason))
        return CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                  usage=self.usage(prompts, completion_tokens))

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids)

    def _logprobs(self, token_ids: list[int], entries: Optional[list],
                  offset: int) -> CompletionLogProbs:
        """OpenAI's completion logprobs: per token its text, logprob, the top tokens' logprobs
        (with the sampled token's, as vLLM gives them) and its offset in the choice's text."""
        result = CompletionLogProbs()
        for token, entry in zip(token_ids, entries or []):
            if entry is None:  # the first prompt token: nothing precedes it
                token_text = self.tokenizer.decode([token])
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                sampled: Logprob = entry[token]
                token_text = self.token_text(token, sampled.decoded_token)
                result.token_logprobs.append(clamp_logprob(sampled.logprob))
                # The top tokens by rank, then the sampled one when it ranks lower.
                result.top_logprobs.append({self.token_text(t, lp.decoded_token):
                                            clamp_logprob(lp.logprob)
                                            for t, lp in entry.items()})
            result.tokens.append(token_text)
            result.text_offset.append(offset)
            offset += len(token_text)
        return result

    async def _stream(self, first, outputs, prompts: list[Prompt], request: CompletionRequest,
                      model: str, request_id: str, created: int) -> AsyncIterator[str]:
        n = request.n
        include_usage, continuous_usage = stream_usage(request)
        writer = EventWriter(request_id, "text_completion", created, model, include_usage)
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        prompt_logprobs: dict[int, list] = {}
        tokens_by_prompt = [0] * len(prompts)

        def event(i: int, output) -> str:
            choices = []
            if output.prompt_logprobs is not None:
                prompt_logprobs[i] = output.prompt_logprobs
            for completion in output.outputs:
                index = i * n + completion.index
                text = completion.text
                token_ids = completion.token_ids
                entries = completion.logprobs
                if request.echo and index not in echoed:
                    echoed.add(index)
                    text = self._prompt_text(prompts[i]) + text
                    token_ids = prompts[i].token_ids + list(token_ids)
                    if entries is not None:
                        entries = list(prompt_logprobs.get(i, [])) + list(entries)
                logprobs = None
                if request.logprobs is not None:
                    # Offsets count the tokens' own texts, as the whole response's do (the
                    # streamed text may lag behind them: a partial UTF-8 character waits).
                    result = self._logprobs(token_ids, entries, offsets.get(index, 0))
                    if result.tokens:
                        offsets[index] = result.text_offset[-1] + len(result.tokens[-1])
                    logprobs = result.model_dump()
                tokens_by_prompt[i] += len(completion.token_ids)
                choices.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": completion.finish_reason,
                                "stop_reason": completion.stop_reason})
            usage = None
            if continuous_usage:
                usage = self.usage([prompts[i]], tokens_by_prompt[i])
            return writer.event(choices, usage)

        try:
            yield event(*first)
            async for i, output in outputs:
                yield event(i, output)
            if include_usage:
                yield writer.event([], self.usage(prompts, sum(tokens_by_prompt)))
        except Exception as error:  # the stream has started: the error goes in it
            yield writer.error(error)
        finally:
            await outputs.aclose()
        yield writer.DONE

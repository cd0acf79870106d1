"""LLM: offline batched generation, as vLLM users write it.

    from octavo import LLM, SamplingParams
    llm = LLM(model="path/to/hf-checkpoint", device="cpu")
    for out in llm.generate(["Paris is a"], SamplingParams(temperature=0, max_tokens=16)):
        print(out.outputs[0].text)
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any, Optional, Union

from octavo.engine_core import (
    create_engine,
    engine_args_from_kwargs,
    to_cpp_sampling_params,
)
from octavo.inputs import PromptType, parse_prompt
from octavo import _C
from octavo.output_processor import RequestState
from octavo.outputs import BeamSearchOutput, BeamSearchSequence, Logprob, RequestOutput
from octavo.sampling_params import BeamSearchParams, SamplingParams
from octavo.tokenizer import load_tokenizer

# How long one wait for engine outputs lasts; the GIL is released meanwhile, so Ctrl-C is seen at
# least this often.
_POLL_SECONDS = 0.1

logger = logging.getLogger("octavo")


class LLM:
    """An engine over one model, for offline generation.

    Args:
        model: a local Hugging Face checkpoint directory (default: the embedded default model).
        tokenizer: tokenizer directory (default: `model`).
        dtype: "auto" (the checkpoint's), "float32", "float16" or "bfloat16".
        max_model_len: longest prompt + output in tokens (default: the model's limit).
        max_num_seqs: requests running at once (default 1024 on a GPU of at least 70 GiB,
            else 256).
        max_num_batched_tokens: tokens per step (default 16384 on a GPU of at least 70 GiB,
            else min(8192, max_model_len)).
        block_size: tokens per KV-cache block (default 16).
        enable_prefix_caching: reuse the KV of shared prompt prefixes (default True).
        num_gpu_blocks_override: fix the KV pool size, in blocks.
        kv_cache_memory_bytes: CPU KV pool size in bytes (default 4 GiB).
        seed: seeds requests that bring no seed of their own (default 0).
        device: "cpu", "cuda" or "cuda:N".
        enforce_eager: never replay CUDA graphs for decode steps.
        async_scheduling: launch each step while the one before it runs (default: on GPUs).
    The engine runs its steps on its own thread (octavo._C.AsyncEngine); `self.engine` is it.
    """

    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None,
                 **engine_kwargs: Any):
        if model is None:
            # No model: the small checkpoint shipped in the package (octavo/default_model), so
            # that a first run needs no download.
            from octavo import default_model

            model = default_model.path()
            logger.info("octavo: no model given: using the embedded default model at %s", model)
        args = engine_args_from_kwargs(model, {"tokenizer": tokenizer, **engine_kwargs})
        self.tokenizer = load_tokenizer(args.tokenizer or model,
                                        trust_remote_code=args.trust_remote_code)
        # The engine runs its steps on its own thread (octavo._C.AsyncEngine); this object only
        # submits, aborts and turns outputs into text.
        self.engine, self.model_spec, self.model_config = create_engine(
            args, self.tokenizer, asynchronous=True)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType], None] = None,
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
    ) -> list[RequestOutput]:
        """Generates completions for the prompts, batched; returns one RequestOutput per prompt,
        in order. A prompt is text, a list of token ids, or {"prompt_token_ids": [...]}.
        `sampling_params` is one SamplingParams for all prompts or one per prompt (default:
        SamplingParams())."""
        if prompts is None and prompt_token_ids is not None:
            prompts = [list(ids) for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("generate() needs prompts")
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts; "
                                 "give one, or one per prompt")
        return self._run(prompts, params_list, use_tqdm)

    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generates replies to conversations (lists of {"role", "content"} messages), formatted by
        the tokenizer's chat template. One conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            if chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("the tokenizer has no chat template; pass chat_template=...")
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message)
            # The template already holds any BOS: encode without adding special tokens again.
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (text, token ids, {"prompt": ...} or
        {"prompt_token_ids": [...]}), batched; returns one BeamSearchOutput per prompt, in order,
        with its best beams first. The semantics are vLLM's (see BeamSearchParams); the beams
        of a prompt share their common prefix's KV blocks and fork copy-on-write."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        cpp = _C.SamplingParams()
        cpp.beam_width = params.beam_width
        cpp.max_tokens = params.max_tokens
        cpp.ignore_eos = params.ignore_eos
        cpp.length_penalty = params.length_penalty
        cpp.temperature = 0.0

        order: list[tuple[int, list[int]]] = []
        results: dict[int, list] = {}
        try:
            prompt_ids = [parse_prompt(prompt, self.tokenizer)[1] for prompt in prompts]
            engine_ids = self.engine.add_requests(prompt_ids, [cpp] * len(prompt_ids))
            order = list(zip(engine_ids, prompt_ids))
            results = {engine_id: [] for engine_id in engine_ids}
            progress = None
            if use_tqdm:
                from tqdm.auto import tqdm

                progress = tqdm(total=len(order), desc="Beam search", dynamic_ncols=True)
            unfinished = len(order)
            while unfinished:
                for out in self.engine.get_outputs(_POLL_SECONDS):
                    if out.error:
                        raise RuntimeError(f"beam search of request {out.group_id} failed: "
                                           f"{out.error}")
                    if out.group_id in results and out.finished:
                        results[out.group_id].append(out)
                        if out.index == 0:
                            unfinished -= 1
                            if progress is not None:
                                progress.update(1)
            if progress is not None:
                progress.close()
        except BaseException:
            self._abort_and_drain(engine_id for engine_id, _ in order)
            raise

        outputs = []
        for engine_id, prompt_ids in order:
            sequences = []
            for out in sorted(results[engine_id], key=lambda o: o.index):
                tokens = list(prompt_ids) + list(out.new_token_ids)
                logprobs = [{token: Logprob(lp.logprob, decoded_token=self.tokenizer.decode([token]))}
                            for token, lp in zip(out.new_token_ids, out.new_logprobs)]
                sequences.append(BeamSearchSequence(
                    tokens=tokens, logprobs=logprobs, cum_logprob=out.cumulative_logprob,
                    text=self.tokenizer.decode(tokens), finish_reason=out.finish_reason))
            outputs.append(BeamSearchOutput(sequences=sequences))
        return outputs

    def _abort_and_drain(self, engine_ids) -> None:
        for engine_id in engine_ids:
            self.engine.abort(engine_id)
        self._drain()

    def _drain(self) -> None:
        """Waits until the engine has no request left, dropping outputs nobody waits for."""
        while self.engine.num_unfinished():
            self.engine.get_outputs(_POLL_SECONDS)

    def _run(self, prompts: list, params_list: list, use_tqdm: bool) -> list[RequestOutput]:
        running: dict[int, RequestState] = {}
        order: list[int] = []
        try:
            converted = [parse_prompt(prompt, self.tokenizer) for prompt in prompts]
            # One submission: the whole batch is queued before the engine's next step.
            order = self.engine.add_requests([ids for _, ids in converted],
                                             [to_cpp_sampling_params(p) for p in params_list])
            for engine_id, (text, token_ids), params in zip(order, converted, params_list):
                running[engine_id] = RequestState(str(next(self._request_counter)), text, token_ids,
                                                  params, self.tokenizer)
        except BaseException:
            self._abort_and_drain(order)
            raise

        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        try:
            # The engine steps on its own thread; text is made here meanwhile, so detokenization
            # overlaps the next step instead of delaying it.
            unfinished = len(order)
            while unfinished:
                for out in self.engine.get_outputs(_POLL_SECONDS):
                    state = running.get(out.group_id)
                    if state is None or state.done:
                        continue
                    if state.absorb(out):
                        self.engine.abort(out.id, whole_group=False)  # a stop string ended it
                    if state.done:
                        unfinished -= 1
                        if progress is not None:
                            progress.update(1)
            # Sequences ended by stop strings finish with the engine's next step: wait, so the
            # next call starts on an idle engine.
            self._drain()
        except BaseException:
            self._abort_and_drain(order)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [running[engine_id].to_output() for engine_id in order]

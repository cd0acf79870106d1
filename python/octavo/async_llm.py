"""AsyncLLM: the engine for servers, as vLLM's AsyncLLM is (an asyncio API over an engine loop
that runs on its own thread).

    llm = AsyncLLM(EngineArgs(model="path/to/hf-checkpoint"))
    async for output in llm.generate("Paris is a", SamplingParams(max_tokens=16), "req-1"):
        print(output.outputs[0].text)

The C++ AsyncEngine steps the model on its own thread with the GIL released. One Python thread
here waits on its output queue (also without the GIL) and hands each step's outputs to the event
loop, which routes them to the request's asyncio queue. Detokenization, stop strings and HTTP
work happen on the event loop, in the request's own coroutine: they never delay a step, and a
slow client only delays itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Optional

from octavo.engine_core import EngineArgs, create_engine, to_cpp_sampling_params
from octavo.inputs import PromptType, parse_prompt
from octavo.output_processor import RequestState
from octavo.outputs import CompletionOutput, RequestOutput
from octavo.sampling_params import SamplingParams
from octavo.tokenizer import load_tokenizer

logger = logging.getLogger("octavo")


# How long the output thread blocks in one get_outputs call: the longest a shutdown waits for it.
_OUTPUT_POLL_SECONDS = 0.1

# AsyncEngine.add_request waits for the step in progress (async_engine.h), which must not stall
# the event loop: submissions run on these threads. Submitters waiting together all get in before
# the next step, so a burst of requests is admitted this many per step.
_SUBMIT_THREADS = 64


class RequestOutputKind(enum.Enum):
    """What each output of AsyncLLM.generate holds (vLLM's RequestOutputKind).

    CUMULATIVE: every output holds everything so far (text, token ids, logprobs).
    DELTA: every output holds only what is new since the previous one, and only the sequences
        that changed; a sequence's last delta carries its finish_reason. With stop strings, the
        newest len(longest stop) - 1 characters are held back until they cannot start a stop
        string, so a delta never has to be taken back.
    FINAL_ONLY: one output, once the request finished.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class RequestMetrics:
    """Timings of one request (time.monotonic() seconds), in RequestOutput.metrics.

    arrival_time: when generate() was called.
    first_token_time: when the first output token reached the server (None before).
    last_token_time: when the newest output token reached the server.
    num_generation_tokens: output tokens so far, over all sequences.
    """

    arrival_time: float
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    num_generation_tokens: int = 0


class EngineDeadError(RuntimeError):
    """The engine failed (a step raised); it takes no more requests."""


class RequestFailedError(RuntimeError):
    """The engine ended a request with an error (its message is the reason)."""


class _DeltaTracker:
    """What each sequence of a request has already handed out, for DELTA outputs. Reads the
    request's state directly: building a cumulative output each step would copy every token list
    (quadratic in the output length)."""

    def __init__(self, params: SamplingParams):
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.sent_finish: set[int] = set()
        self.sent_prompt_logprobs = False
        # A stop string that ends in the newest text may have started in text already handed
        # out: hold back enough characters that the cut never reaches it.
        self.holdback = 0
        if params.stop and not params.include_stop_str_in_output:
            self.holdback = max(len(s) for s in params.stop) - 1

    def delta(self, state: RequestState) -> Optional[RequestOutput]:
        """What changed since the last call; None when nothing did (the finished request always
        gets a last output). The caller refuses
        best_of > n, so the request's sequences are its outputs."""
        deltas = []
        for seq in state.sequences:
            index = seq.index
            finished = seq.finish_reason is not None
            visible = len(seq.text) if finished else max(0, len(seq.text) - self.holdback)
            chars = self.sent_chars.get(index, 0)
            tokens = self.sent_tokens.get(index, 0)
            new_text = seq.text[chars:visible] if visible > chars else ""
            newly_finished = finished and index not in self.sent_finish
            if not new_text and len(seq.token_ids) == tokens and not newly_finished:
                continue
            self.sent_chars[index] = max(chars, visible)
            self.sent_tokens[index] = len(seq.token_ids)
            if newly_finished:
                self.sent_finish.add(index)
            deltas.append(CompletionOutput(
                index=index, text=new_text, token_ids=seq.token_ids[tokens:],
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=seq.logprobs[tokens:] if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if not deltas and not state.done:
            return None
        prompt_logprobs = None
        if not self.sent_prompt_logprobs and state.prompt_logprobs is not None:
            # Every prompt logprob is in before the first token is sampled.
            prompt_logprobs = state.prompt_logprobs
            self.sent_prompt_logprobs = True
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, prompt_logprobs=prompt_logprobs,
            outputs=deltas, finished=state.done)


class AsyncLLM:
    """An engine over one model for asyncio servers: many concurrent `generate` streams.

    Args:
        engine_args: the model and engine arguments (EngineArgs, named as vLLM names them).

    The engine runs on its own thread from construction on. The coroutines of one AsyncLLM run on
    one event loop at a time (the first `generate` binds it; another may take over once it is
    closed). Call `shutdown()` when done.
    """

    def __init__(self, engine_args: EngineArgs):
        self.engine_args = engine_args
        self.tokenizer = load_tokenizer(engine_args.tokenizer or engine_args.model,
                                        trust_remote_code=engine_args.trust_remote_code)
        self.engine, self.model_spec, self.model_config = create_engine(
            engine_args, self.tokenizer, asynchronous=True)
        self.max_model_len = int(self.engine.config.max_model_len)
        # group id -> the request's queue of (engine outputs, monotonic time they arrived).
        self._queues: dict[int, asyncio.Queue] = {}
        # Outputs that came for an id whose submission has not been registered yet (its
        # add_request returned on a submission thread, its coroutine has not run since). Kept
        # only while submissions are in flight: with none, an unknown id is an aborted request's
        # echo. Event-loop state, like _queues.
        self._early_outputs: dict[int, list] = {}
        self._num_submitting = 0
        self._submit_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=_SUBMIT_THREADS, thread_name_prefix="octavo-submit")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._output_thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._dead_reason: Optional[str] = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLM:
        return cls(engine_args)

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def errored(self) -> bool:
        """True once the engine failed or was shut down: it takes no more requests."""
        return self._dead_reason is not None

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("this AsyncLLM serves another event loop, still open; use one "
                               "loop at a time")
        # First use, or the previous loop was closed (asyncio.run per call): its requests are
        # gone with it.
        self._queues.clear()
        self._early_outputs.clear()
        self._num_submitting = 0
        self._loop = loop
        if self._output_thread is None and not self._stopping.is_set():
            self._output_thread = threading.Thread(
                target=self._pull_outputs, name="octavo-outputs", daemon=True)
            self._output_thread.start()

    def _pull_outputs(self) -> None:
        """The output thread: waits for engine outputs (GIL released) and hands each step's
        batch to the event loop in one call."""
        while not self._stopping.is_set():
            try:
                outputs = self.engine.get_outputs(_OUTPUT_POLL_SECONDS)
            except Exception as error:  # the binding is gone or broken: fail every request
                logger.exception("octavo: the engine's output queue failed")
                self._call_in_loop(self._fail_all, f"engine output queue failed: {error}")
                return
            if not outputs:
                continue
            arrived = time.monotonic()
            by_request: dict[int, list] = {}
            for out in outputs:
                by_request.setdefault(out.group_id, []).append(out)
            self._call_in_loop(self._dispatch, by_request, arrived)

    def _call_in_loop(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed: nobody is left to read these outputs
            pass

    def _dispatch(self, by_request: dict, arrived: float) -> None:
        for group_id, outputs in by_request.items():
            queue = self._queues.get(group_id)
            if queue is not None:
                queue.put_nowait((outputs, arrived))
            elif self._num_submitting:
                self._early_outputs.setdefault(group_id, []).append((outputs, arrived))
            # else: the request was aborted and is gone (this is the abort's echo)

    async def _submit(self, token_ids: list[int], cpp_params) -> tuple[int, asyncio.Queue]:
        """engine.add_request on a submission thread; returns the id and its registered queue.
        Raises what add_request raises. If the caller is cancelled meanwhile, the request is
        aborted as soon as it exists."""
        future = self._submit_pool.submit(self.engine.add_request, token_ids, cpp_params)
        self._num_submitting += 1
        try:
            engine_id = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            def abort_orphan(done: concurrent.futures.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._abort(done.result())
                self._call_in_loop(self._submission_done)
            future.add_done_callback(abort_orphan)
            raise
        except BaseException:
            self._submission_done()
            raise
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[engine_id] = queue
        for item in self._early_outputs.pop(engine_id, ()):
            queue.put_nowait(item)
        self._submission_done()
        return engine_id, queue

    def _submission_done(self) -> None:
        self._num_submitting -= 1
        if not self._num_submitting:
            self._early_outputs.clear()

    def _fail_all(self, reason: str) -> None:
        self._dead_reason = reason
        for queue in self._queues.values():
            queue.put_nowait((None, time.monotonic()))

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> AsyncIterator[RequestOutput]:
        """Runs one request; yields its RequestOutput after each engine step that changed it
        (see RequestOutputKind for what each holds), the last one with finished=True.

        `prompt` is text, a list of token ids, or {"prompt": ..., "prompt_token_ids": [...]}.
        Raises ValueError at once when the engine refuses the request (the message says why),
        EngineDeadError when the engine has failed, RequestFailedError when the engine ended the
        request with an error. Cancelling the consumer (a client that went away) or closing the
        generator early aborts the request: its KV blocks return to the pool within a step.
        """
        self._bind_loop()
        if self._dead_reason is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead_reason}")
        if (output_kind is RequestOutputKind.DELTA and sampling_params.best_of is not None
                and sampling_params.best_of > sampling_params.n):
            raise ValueError("best_of > n ranks the sequences once they all finished; it cannot "
                             "stream deltas (use n, or do not stream)")
        arrival = time.monotonic()
        text, token_ids = parse_prompt(prompt, self.tokenizer)
        cpp_params = to_cpp_sampling_params(sampling_params)
        try:
            engine_id, queue = await self._submit(token_ids, cpp_params)
        except RuntimeError as error:  # not ValueError: a failed or shut-down engine
            self._dead_reason = self._dead_reason or str(error)
            raise EngineDeadError(str(error)) from error
        state = RequestState(request_id, text, token_ids, sampling_params, self.tokenizer)
        metrics = RequestMetrics(arrival_time=arrival)
        tracker = _DeltaTracker(sampling_params) if output_kind is RequestOutputKind.DELTA else None
        finished = False
        try:
            while True:
                batches = [await queue.get()]
                while not queue.empty():  # a slow consumer takes every step it missed at once
                    batches.append(queue.get_nowait())
                error = None
                for outputs, arrived in batches:
                    if outputs is None:
                        raise EngineDeadError(f"the engine is not running: {self._dead_reason}")
                    for out in outputs:
                        if out.error and error is None:
                            # A failed step (the engine stops: the next add_request says so)
                            # or this request's own failure (non-finite logits).
                            error = out.error
                        if state.done:
                            continue
                        if out.new_token_ids:
                            if metrics.first_token_time is None:
                                metrics.first_token_time = arrived
                            metrics.last_token_time = arrived
                            metrics.num_generation_tokens += len(out.new_token_ids)
                        if state.absorb(out):  # a stop string ended this sequence
                            self._abort(out.id, whole_group=False)
                if error is not None:
                    raise RequestFailedError(f"request {request_id} failed: {error}")
                if self._dead_reason is not None and any(
                        seq.finish_reason == "abort" for seq in state.sequences):
                    # Nothing here aborts a request it still reads: shutdown() did.
                    raise EngineDeadError(f"the engine is not running: {self._dead_reason}")
                finished = state.done
                if tracker is not None:
                    output = tracker.delta(state)
                    if output is None:
                        continue
                elif output_kind is RequestOutputKind.FINAL_ONLY and not finished:
                    continue
                else:
                    output = state.to_output()
                output.metrics = metrics
                yield output
                if finished:
                    return
        finally:
            self._queues.pop(engine_id, None)
            if not finished:
                self._abort(engine_id)

    def _abort(self, engine_id: int, whole_group: bool = True) -> None:
        try:
            self.engine.abort(engine_id, whole_group=whole_group)
        except RuntimeError:  # a failed or shut-down engine: nothing runs to abort
            pass

    def stats(self):
        """The engine's counters (a thread-safe snapshot: _C.EngineStats)."""
        return self.engine.stats()

    def shutdown(self) -> None:
        """Aborts what is in flight, stops the engine loop and the output thread; requests still
        being generated end with EngineDeadError. Idempotent."""
        reason = self._dead_reason or "the engine was shut down"
        self._dead_reason = reason
        self.engine.shutdown(finish_in_flight=False)
        self._submit_pool.shutdown(wait=True)
        self._stopping.set()
        if self._output_thread is not None:
            self._output_thread.join()
            self._output_thread = None
            self._call_in_loop(self._fail_all, reason)

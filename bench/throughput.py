"""Offline throughput: random prompts through LLM.generate, every output run to its length.

    python bench/throughput.py --model DIR [--device cpu] --num-prompts 64 \
        --input-len 100:1024 --output-len 100:1024
    python bench/throughput.py --random-model tiny-llama --num-prompts 16 --input-len 32 --output-len 32
    python bench/throughput.py --random-model qwen3-0.6b --device cuda --num-prompts 256 \
        --backend hf --hf-max-batch-size 128

--backend hf measures the `transformers` baseline the way BENCH.md's peer table was measured: the
same requests through `generate` in static batches of --hf-max-batch-size (in request order), left
padded, SDPA attention, pure sampling (temperature 1, no top-k / top-p), each batch run to its
longest output (EOS suppressed); only each request's own output tokens count.

Lengths are drawn as BENCH.md prescribes: random.Random(seed), (randint(in), randint(out)) per
request. Prints one JSON line: requests, prompt and output tokens, wall seconds, output and total
tokens per second, the device and the commit. With --profile (CUDA), also the GPU's kernel time
over the whole run and the kernels that took most of it (CUPTI through torch.profiler; the
profiler adds a little host time per step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def kernel_summary(prof, divisor: float, top: int = 12) -> dict:
    """GPU kernel time from a torch.profiler run: busy milliseconds and the `top` kernels, each
    divided by `divisor` (1 for totals, the step count for per-step figures)."""
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    busy_us = sum(e.device_time_total for e in kernels)
    ranked = sorted(kernels, key=lambda e: -e.device_time_total)[:top]
    return {
        "gpu_busy_ms": round(busy_us / divisor / 1e3, 3),
        "launches": round(sum(e.count for e in kernels) / divisor, 1),
        "top_kernels": [{"name": e.key[:80], "ms": round(e.device_time_total / divisor / 1e3, 3),
                         "calls": round(e.count / divisor, 1)} for e in ranked],
    }


def cuda_profiler(enabled: bool):
    """torch.profiler over CUDA kernels when `enabled`, else a context that does nothing."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CUDA])


def profile_report(prof, wall: float) -> dict:
    """kernel_summary over the whole run, and the share of the wall time no kernel ran."""
    report = kernel_summary(prof, 1.0)
    report["gpu_idle_share"] = round(1 - report["gpu_busy_ms"] / 1e3 / wall, 3)
    return report


def save_random_untied_llama(config, directory: str) -> None:
    """A random bf16 Llama checkpoint without transformers' initialisation (minutes on the CPU
    for 8 B parameters): the module is built on the meta device for its tensor names and shapes,
    and N(0, 0.02) tensors (norms at 1) go straight to one safetensors file."""
    import torch
    import transformers
    from safetensors.torch import save_file

    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    tensors = {}
    for tensor_name, param in meta.state_dict().items():
        if tensor_name.endswith("norm.weight"):
            tensors[tensor_name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensors[tensor_name] = (torch.randn(param.shape) * 0.02).to(torch.bfloat16)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config.torch_dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)


@contextlib.contextmanager
def model_directory(model: str | None, random_model: str | None):
    """The checkpoint to run: `model`, or a random-weight one of the named shape built in a
    temporary directory that lives as long as the context."""
    with tempfile.TemporaryDirectory() as scratch:
        if random_model:
            model = os.path.join(scratch, random_model)
            os.makedirs(model)
            build_random_model(random_model, model)
        yield model


def build_random_model(name: str, directory: str) -> None:
    """A random-weight checkpoint of a named shape (tiny ones for the CPU)."""
    import torch
    import transformers

    shapes = {
        "tiny-llama": transformers.LlamaConfig(
            vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096),
        "qwen3-0.6b": transformers.Qwen3Config(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            max_position_embeddings=40960, tie_word_embeddings=True),
        "llama-3.1-8b": transformers.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
            rope_theta=500000.0, tie_word_embeddings=False),
    }
    if name not in shapes:
        raise SystemExit(f"unknown random model {name!r}; known: {', '.join(shapes)}")
    torch.manual_seed(0)
    config = shapes[name]
    if name == "llama-3.1-8b":
        save_random_untied_llama(config, directory)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        model.save_pretrained(directory)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
    from checkpoints import build_tokenizer

    build_tokenizer(directory)


def load_hf_model(model_dir: str, device: str, dtype: str):
    """The checkpoint as a `transformers` model with SDPA attention, bf16 on GPUs for "auto"."""
    import torch
    import transformers

    dtypes = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
              "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in dtypes:
        raise SystemExit(f"--backend hf: unknown dtype {dtype!r}; choose from {', '.join(dtypes)}")
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtypes[dtype], attn_implementation="sdpa").to(device).eval()


def run_hf(model, device: str, prompts: list[list[int]], output_lens: list[int],
           batch_size: int, seed: int) -> tuple[float, int]:
    """Wall seconds of `model.generate` over the requests in static batches, and the tokens it
    generated (each batch runs to its longest output, so at least sum(output_lens))."""
    import torch
    import transformers

    config = model.config
    pad = next((t for t in (config.pad_token_id, config.eos_token_id, 0) if isinstance(t, int)), 0)
    torch.manual_seed(seed)
    generated = 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        longest = max(output_lens[first:first + batch_size])
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        settings = transformers.GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=longest,
            min_new_tokens=longest, pad_token_id=pad, eos_token_id=config.eos_token_id)
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask,
                                     generation_config=settings)
        except torch.OutOfMemoryError:
            raise SystemExit(f"transformers ran out of memory on a batch of {len(batch)} requests "
                             f"({width} prompt + {longest} output tokens); lower "
                             "--hf-max-batch-size") from None
        if out.shape[1] - width != longest:
            raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens a row for a "
                               f"batch whose longest output is {longest}")
        generated += len(batch) * longest
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, generated


def commit() -> str:
    """OCTAVO_COMMIT when set (a copy of the tree without its git history), else git's HEAD."""
    if os.environ.get("OCTAVO_COMMIT"):
        return os.environ["OCTAVO_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face checkpoint directory")
    source.add_argument("--random-model",
                        help="tiny-llama | qwen3-0.6b | llama-3.1-8b (random bf16 weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=parse_range, default=(100, 1024), help="N or LOW:HIGH")
    parser.add_argument("--output-len", type=parse_range, default=(100, 1024), help="N or LOW:HIGH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--no-detokenize", action="store_true",
                        help="token ids only (SamplingParams(detokenize=False))")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="launch each step while the one before it runs (default: on GPUs)")
    parser.add_argument("--profile", action="store_true",
                        help="also report GPU kernel time over the run (CUDA only)")
    parser.add_argument("--backend", choices=("octavo", "hf"), default="octavo",
                        help="hf: the transformers baseline (see above)")
    parser.add_argument("--hf-max-batch-size", type=int, default=None,
                        help="requests a transformers generate call takes (--backend hf only)")
    args = parser.parse_args()
    if args.profile and not args.device.startswith("cuda"):
        parser.error("--profile reports GPU kernel time: it needs --device cuda")
    if args.backend == "hf":
        if args.hf_max_batch_size is None or args.hf_max_batch_size < 1:
            parser.error("--backend hf needs --hf-max-batch-size N (N >= 1): transformers runs "
                         "static batches")
        engine_only = [flag for flag, value in (
            ("--max-num-seqs", args.max_num_seqs),
            ("--max-num-batched-tokens", args.max_num_batched_tokens),
            ("--async-scheduling", args.async_scheduling)) if value is not None]
        if engine_only:
            parser.error(f"{', '.join(engine_only)}: octavo engine settings; --backend hf "
                         "batches by --hf-max-batch-size")
        return main_hf(args)
    if args.hf_max_batch_size is not None:
        parser.error("--hf-max-batch-size is for --backend hf")

    from octavo import LLM, SamplingParams

    with model_directory(args.model, args.random_model) as model_dir:
        lengths = workload_lengths(args)
        llm = LLM(model=model_dir, device=args.device, dtype=args.dtype,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=max(i + o for i, o in lengths) + 1,
                  async_scheduling=args.async_scheduling)
        prompts = random_prompts(lengths, llm.model_spec["vocab_size"], args.seed)
        params = [SamplingParams(temperature=1.0, max_tokens=o, ignore_eos=True, seed=k,
                                 detokenize=not args.no_detokenize)
                  for k, (_, o) in enumerate(lengths)]
        with cuda_profiler(args.profile) as prof:
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
        stats = llm.engine.stats()

    prompt_tokens = sum(i for i, _ in lengths)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({
        **common_report(args, prompt_tokens, output_tokens, wall),
        "detokenize": not args.no_detokenize,
        # Where the wall time went: the C++ step (host scheduling, executor incl. the GPU wait,
        # host outputs) and Python around it (detokenization, stop strings, bookkeeping).
        "steps": stats.num_steps,
        "async_steps": stats.async_steps,
        "schedule_s": round(stats.schedule_seconds, 3),
        "execute_s": round(stats.execute_seconds, 3),
        "step_output_s": round(stats.output_seconds, 3),
        "device_wait_s": round(stats.device_wait_seconds, 3),
        "graph_captures": stats.graph_captures,
        "graph_capture_s": round(stats.graph_capture_seconds, 3),
        "startup_graph_captures": stats.startup_graph_captures,
        "startup_graph_capture_s": round(stats.startup_graph_capture_seconds, 3),
        "python_s": round(wall - stats.schedule_seconds - stats.execute_seconds
                          - stats.output_seconds, 3),
        **(profile_report(prof, wall) if args.profile else {}),
        "commit": commit(),
    }))


def workload_lengths(args) -> list[tuple[int, int]]:
    """(prompt, output) lengths as BENCH.md draws them."""
    rng = random.Random(args.seed)
    return [(rng.randint(*args.input_len), rng.randint(*args.output_len))
            for _ in range(args.num_prompts)]


def random_prompts(lengths, vocab_size: int, seed: int) -> list[list[int]]:
    token_rng = random.Random(seed + 1)
    return [[token_rng.randrange(vocab_size) for _ in range(i)] for i, _ in lengths]


def common_report(args, prompt_tokens: int, output_tokens: int, wall: float) -> dict:
    return {
        "bench": "throughput", "backend": args.backend, "model": args.random_model or args.model,
        "device": args.device, "requests": args.num_prompts, "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "wall_s": round(wall, 3),
        "output_tok_s": round(output_tokens / wall, 1),
        "total_tok_s": round((prompt_tokens + output_tokens) / wall, 1),
    }


def main_hf(args) -> None:
    """The transformers baseline over the same requests (BENCH.md's peer method)."""
    with model_directory(args.model, args.random_model) as model_dir:
        lengths = workload_lengths(args)
        model = load_hf_model(model_dir, args.device, args.dtype)
        prompts = random_prompts(lengths, model.config.vocab_size, args.seed)
        with cuda_profiler(args.profile) as prof:
            wall, generated = run_hf(model, args.device, prompts, [o for _, o in lengths],
                                     args.hf_max_batch_size, args.seed)
    print(json.dumps({
        **common_report(args, sum(i for i, _ in lengths), sum(o for _, o in lengths), wall),
        "hf_max_batch_size": args.hf_max_batch_size,
        "generated_tokens": generated,  # with each static batch's overrun past shorter outputs
        **(profile_report(prof, wall) if args.profile else {}),
        "commit": commit(),
    }))


if __name__ == "__main__":
    main()

"""The kernels of a step over a grid of shapes, against the ceilings measured in the same run.

    python bench/kernels.py [--quick]
        [--sections decode,nano-run,llama8b-run,prefill,gemv,layer-ops] [--result-json FILE]

Decode (one query token per request): time, GB/s of K/V read and the fraction of the copy
bandwidth, for full batches, small batches with long contexts, a batch of uneven lengths and
GQA 8 (64 query heads); then the nano and llama8b runs' decode steps replayed as the engine
launches them (RunDecode): nano's rows in order and longest first, llama8b's longest first.
Prefill (causal prompts): time, TFLOP/s and the fraction of the bf16 matmul rate, beside torch's
scaled_dot_product_attention on contiguous tensors of the same shapes. Decode GEMMs (a few rows
times Llama-3.1-8B's weights): the few-row kernel decode steps use (cuda/gemv.cu), GB/s of weight
read and the fraction of the copy bandwidth, beside torch's cuBLAS matmul of the same shapes.
Layer ops (the row-wise kernels between the GEMMs: RMSNorm, rotary + KV cache write, SiLU-GLU; the
last two with the residual row's 1 / RMS, as the executor runs them when norms fold, and SiLU-GLU
also without it) at the workloads' batches: bytes moved per call and the fraction of the copy
bandwidth.
bf16, head dim 128, 32 query / 8 KV heads unless stated, block 16 (BENCH.md's shapes). Calls are
replayed from a CUDA graph, so the host's per-call work never shows in the time (decode; prefill
kernels take milliseconds and are timed back to back). One JSON line per shape; --result-json
appends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceilings  # noqa: E402
from throughput import commit  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16

# (batch, context, per-request contexts or None, query heads): 32 query heads over the 8 KV heads
# is BENCH.md's GQA 4; 64 is GQA 8 (Llama-3-70B's geometry), which runs on tensor cores.
DECODE_SHAPES = [(64, 4096, None, 32), (256, 1024, None, 32), (1, 32768, None, 32),
                 (1, 8192, None, 32), (1, 1024, None, 32), (8, 8192, None, 32),
                 (8, 1024, None, 32),
                 (64, 8192, np.random.default_rng(0).integers(100, 8192, size=64).tolist(), 32),
                 (64, 4096, None, 64), (256, 1024, None, 64)]
PREFILL_SHAPES = [(4, 4096), (16, 1024), (1, 8192)]
# (rows, n, k): Llama-3.1-8B's qkv, o, gate_up, down and LM head at decode batches 1 and 2.
GEMV_SHAPES = [(m, n, k) for m in (1, 2) for n, k in
               [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]]
QUICK_GEMV = [(1, 1024, 1024)]
QUICK_DECODE = [(4, 1024, None, 32), (6, 512, [100, 512, 37, 300, 512, 1], 32),
                (4, 1024, None, 64)]
QUICK_PREFILL = [(2, 512)]
# A layer's row-wise ops, per model: hidden size, query / KV heads (head dim 128), MLP width, and
# whether rotary carries a QK norm.
LAYER_MODELS = {"qwen3-0.6b": (1024, 16, 8, 3072, True),
                "llama-3.1-8b": (4096, 32, 8, 14336, False)}
LAYER_OPS = ("norm", "rotary_write_kv", "activation", "activation_unscaled")
# (rows, model): nano's running batch, llama8b's, and the latency workload's single row.
LAYER_OP_SHAPES = [(256, "qwen3-0.6b"), (512, "llama-3.1-8b"), (1, "llama-3.1-8b")]
QUICK_LAYER_OPS = [(4, "qwen3-0.6b")]
SECTIONS = ("decode", "nano-run", "llama8b-run", "prefill", "gemv", "layer-ops")


def graph_seconds(fn, repeats: int = 20) -> float:
    """Mean seconds of one call of fn, replayed `repeats` times from one captured graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / repeats)
    return float(np.median(times))


def event_seconds(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Mean seconds of one call of fn over back-to-back calls (for millisecond kernels, whose
    launches hide behind the previous call)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def paged_cache(batch: int, max_context: int):
    """A random K/V pool holding `batch` requests of up to max_context tokens, and their block
    tables (a random permutation of the blocks)."""
    blocks_per_request = (max_context + BLOCK - 1) // BLOCK
    num_blocks = batch * blocks_per_request
    cache = torch.randn((num_blocks, 2, KV_HEADS, BLOCK, HEAD_DIM), device="cuda", dtype=DTYPE)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch,
                                                                            blocks_per_request)
    return cache, tables


def decode_call(q, cache, out, context_lens, tables, heads: int, kv_heads: int,
                max_context: int, request_order=None):
    """One paged decode attention call over these tensors, with its workspace, as a closure."""
    from octavo import _C

    batch, width = tables.shape
    query_start = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    workspace = torch.empty(max(16, _C.ops.decode_workspace_bytes(
        batch, heads, kv_heads, HEAD_DIM, BLOCK, max_context)), dtype=torch.uint8, device="cuda")

    def call():
        _C.ops.paged_attention(q, cache, out, query_start, context_lens, tables, None, heads,
                               kv_heads, HEAD_DIM, BLOCK, 1.0 / math.sqrt(HEAD_DIM),
                               stream=torch.cuda.current_stream().cuda_stream, max_query_len=1,
                               max_context_len=max_context, workspace=workspace,
                               request_order=request_order)
    return call


def decode(batch: int, context: int, contexts, heads: int, copy_bandwidth: float) -> dict:
    lengths = [context] * batch if contexts is None else list(contexts)
    cache, tables = paged_cache(batch, context)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, heads * HEAD_DIM), device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    seconds = graph_seconds(decode_call(q, cache, out, context_lens, tables, heads, KV_HEADS,
                                        context))
    kv_bytes = sum(lengths) * KV_HEADS * HEAD_DIM * 2 * cache.element_size()
    rate = kv_bytes / seconds
    return {"kernel": "paged_decode", "batch": batch, "context": context, "heads": heads,
            "kv_heads": KV_HEADS, "uneven": contexts is not None, "us": round(seconds * 1e6, 2),
            "kv_GBps": round(rate / 1e9, 1),
            "fraction_of_copy": round(rate / copy_bandwidth, 3)}


def graph_bucket(batch: int) -> int:
    """The executor's decode graph buckets: 1, 2, 4, then every multiple of 8."""
    return next((b for b in (1, 2, 4) if batch <= b), (batch + 7) // 8 * 8)


# (requests, query heads, KV heads) of BENCH.md's throughput workloads.
RUN_WORKLOADS = {"nano": (256, 16, 8), "llama8b": (512, 32, 8)}


class RunDecode:
    """Decode attention over a throughput workload's run (BENCH.md: nano, Qwen3-0.6B's 16 query /
    8 KV heads; llama8b, Llama-3.1-8B's 32 / 8), step by step as the engine launches it, every
    request running from the first decode step (the KV pool holds both workloads whole): the
    running requests in admission order, padded to the graph bucket with empty rows; the block
    table and plan at the graph's width (a power of two of 16 blocks and up); the launch starting
    rows in order, or longest context first (request_order, as the executor passes it)."""

    def __init__(self, workload: str):
        requests, self.heads, self.kv_heads = RUN_WORKLOADS[workload]
        rng = random.Random(0)
        self.lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(requests)]
        self.max_model_len = max(p + o for p, o in self.lengths) + 1
        self.max_blocks = (self.max_model_len + BLOCK - 1) // BLOCK
        rows = len(self.lengths)
        self.cache = torch.randn((rows * self.max_blocks, 2, self.kv_heads, BLOCK, HEAD_DIM),
                                 device="cuda", dtype=DTYPE)
        self.tables = torch.randperm(rows * self.max_blocks, device="cuda").to(torch.int32).view(
            rows, self.max_blocks)
        self.token_bytes = self.kv_heads * HEAD_DIM * 2 * self.cache.element_size()
        self.decode_steps = max(o for _, o in self.lengths)

    def step(self, step: int, longest_first: bool):
        """(call, K/V bytes it reads, running requests) for decode step `step` (1 and up)."""
        contexts = [p + step for p, o in self.lengths if o > step]
        bucket = graph_bucket(len(contexts))
        width = 16
        while width * BLOCK < max(contexts):
            width *= 2
        width = min(width, self.max_blocks)
        padded = contexts + [0] * (bucket - len(contexts))
        context_lens = torch.tensor(padded, dtype=torch.int32, device="cuda")
        order = None
        if longest_first:  # stable, padding rows (empty) last: the executor's order
            order = torch.tensor(sorted(range(bucket), key=lambda r: -padded[r]),
                                 dtype=torch.int32, device="cuda")
        q = torch.randn((bucket, self.heads * HEAD_DIM), device="cuda", dtype=DTYPE)
        call = decode_call(q, self.cache, torch.empty_like(q), context_lens,
                           self.tables[:bucket, :width].contiguous(), self.heads, self.kv_heads,
                           min(self.max_model_len, width * BLOCK), order)
        return call, sum(contexts) * self.token_bytes, len(contexts)


def run_decode(workload: str, copy_bandwidth: float, step_stride: int,
               longest_first: bool) -> dict:
    """Every `step_stride`-th decode step of the workload's run (RunDecode): the bytes-weighted
    fraction of copy bandwidth over them is the kernel's share of the run's floor, overall and by
    running batch."""
    run = RunDecode(workload)
    limits = [512, 256, 128, 32] if len(run.lengths) > 256 else [256, 128, 32]
    by_batch = {f"{high}-{low + 1}": [0, 0.0] for high, low in zip(limits, limits[1:] + [0])}
    total_bytes, total_seconds, steps = 0, 0.0, 0
    for step in range(1, run.decode_steps, step_stride):
        call, kv_bytes, running = run.step(step, longest_first)
        seconds = graph_seconds(call, repeats=10)
        key = next(k for k in by_batch if running >= int(k.split("-")[1]))
        by_batch[key][0] += kv_bytes
        by_batch[key][1] += seconds
        total_bytes += kv_bytes
        total_seconds += seconds
        steps += 1
    return {"kernel": f"paged_decode_{workload}_run", "order": "longest_first" if longest_first
            else "rows", "steps": steps, "step_stride": step_stride,
            "layer_ms": round(total_seconds * 1e3, 3), "kv_GB": round(total_bytes / 1e9, 2),
            "fraction_of_copy": round(total_bytes / total_seconds / copy_bandwidth, 3),
            "by_batch": {k: round(b / s / copy_bandwidth, 3) for k, (b, s) in by_batch.items()
                         if s > 0}}


def prefill(batch: int, seq: int, matmul_rate: float) -> dict:
    from octavo import _C

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn((batch, seq, HEADS, HEAD_DIM), device="cuda", generator=gen).to(DTYPE)
    k = torch.randn((batch, seq, KV_HEADS, HEAD_DIM), device="cuda", generator=gen).to(DTYPE)
    v = torch.randn((batch, seq, KV_HEADS, HEAD_DIM), device="cuda", generator=gen).to(DTYPE)
    cache, tables = paged_cache(batch, seq)
    blocks_per_seq = seq // BLOCK

    def paged(x):  # [batch, seq, kv, d] -> [blocks, kv, slot, d] in block-table order
        return (x.view(batch, blocks_per_seq, BLOCK, KV_HEADS, HEAD_DIM).permute(0, 1, 3, 2, 4)
                .reshape(batch * blocks_per_seq, KV_HEADS, BLOCK, HEAD_DIM))

    cache[tables.flatten().long(), 0] = paged(k)
    cache[tables.flatten().long(), 1] = paged(v)
    q_flat = q.reshape(batch * seq, HEADS * HEAD_DIM)
    query_start = torch.arange(0, (batch + 1) * seq, seq, device="cuda", dtype=torch.int32)
    context_lens = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q_flat)

    def ours():
        _C.ops.paged_attention(q_flat, cache, out, query_start, context_lens, tables, None, HEADS,
                               KV_HEADS, HEAD_DIM, BLOCK, 1.0 / math.sqrt(HEAD_DIM),
                               stream=torch.cuda.current_stream().cuda_stream,
                               max_query_len=seq, max_context_len=seq)

    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                         enable_gqa=True)

    flops = 4 * batch * (seq * (seq + 1) // 2) * HEAD_DIM * HEADS
    ours_s, sdpa_s = event_seconds(ours, repeats=10), event_seconds(sdpa, repeats=10)
    return {"kernel": "paged_prefill", "implementation": _C.ops.prefill_kernel(HEAD_DIM, seq),
            "batch": batch, "seq": seq, "ms": round(ours_s * 1e3, 3), "TFLOPs": round(flops / ours_s / 1e12, 1),
            "fraction_of_matmul": round(flops / ours_s / matmul_rate, 3),
            "sdpa_ms": round(sdpa_s * 1e3, 3), "sdpa_TFLOPs": round(flops / sdpa_s / 1e12, 1),
            "vs_sdpa": round(sdpa_s / ours_s, 3)}


def gemv(m: int, n: int, k: int, copy_bandwidth: float) -> dict:
    from octavo import _C

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((m, k), device="cuda", generator=gen).to(DTYPE)
    weight = (torch.randn((n, k), device="cuda", generator=gen) * 0.02).to(DTYPE)
    out = torch.empty((m, n), device="cuda", dtype=DTYPE)
    # The stream is read at call time: a graph captures on its own stream.
    ours = graph_seconds(
        lambda: _C.ops.gemv(x, weight, out, stream=torch.cuda.current_stream().cuda_stream))
    cublas = graph_seconds(lambda: torch.matmul(x, weight.t(), out=out))
    weight_bytes = n * k * weight.element_size()
    return {"kernel": "gemv", "m": m, "n": n, "k": k, "us": round(ours * 1e6, 2),
            "weight_GBps": round(weight_bytes / ours / 1e9, 1),
            "fraction_of_copy": round(weight_bytes / ours / copy_bandwidth, 3),
            "cublas_us": round(cublas * 1e6, 2), "vs_cublas": round(cublas / ours, 3)}


def layer_op_call(op: str, rows: int, model: str, device: str = "cuda", dtype=DTYPE):
    """A call of one of `model`'s row-wise layer ops over `rows` tokens (through octavo._C.ops, so
    on the CPU it runs the reference), and the bytes that call must move on a GPU (bf16)."""
    from octavo import _C

    hidden, heads, kv_heads, inter, qk_norm = LAYER_MODELS[model]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, device=device, generator=gen).to(dtype)

    def stream():  # read at call time: a graph captures on its own stream
        return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0

    element = 2
    # Both models fold their sub-blocks' RMSNorms into the projections (Executor): rotary + KV
    # write and the activation scale each row by its residual-stream row's 1 / RMS.
    residual = rand(rows, hidden)
    if op == "norm":  # RMSNorm of the residual stream: the final norm, and the sub-blocks of
        # models whose norms do not fold
        x, weight = rand(rows, hidden), rand(hidden)
        out = torch.empty_like(x)

        def call():
            _C.ops.norm(x, out, weight, None, None, stream=stream())

        # x in, out back, the weight once
        return call, (2 * rows + 1) * hidden * element
    if op == "rotary_write_kv":  # in place in the fused [q | k | v] row, k and v into the cache
        d = HEAD_DIM
        width = (heads + 2 * kv_heads) * d
        qkv = rand(rows, width)
        cache = torch.zeros(((rows + BLOCK - 1) // BLOCK, 2, kv_heads, BLOCK, d), dtype=dtype,
                            device=device)
        slots = torch.arange(rows, dtype=torch.int64, device=device)
        positions = torch.arange(rows, dtype=torch.int32, device=device) + 100
        cos_sin = torch.randn((rows + 100, d), device=device, generator=gen)
        norms = dict(q_norm_weight=rand(d), k_norm_weight=rand(d)) if qk_norm else {}

        def call():
            _C.ops.rotary_write_kv(qkv, qkv, qkv, positions, cos_sin, cache, slots, heads,
                                   kv_heads, d, BLOCK, q_stride=width, k_stride=width,
                                   v_stride=width, k_offset=heads * d,
                                   v_offset=(heads + kv_heads) * d, row_scale_source=residual,
                                   stream=stream(), **norms)

        # q, k, v in; q and k back; k and v into the cache; a float32 cos | sin row and the
        # residual row per token
        return call, rows * ((2 * heads + 5 * kv_heads) * d * element + d * 4 + hidden * element)
    if op == "activation":  # SiLU(gate) * up, gate and up scaled by the residual row's 1 / RMS
        x, out = rand(rows, 2 * inter), torch.empty((rows, inter), dtype=dtype, device=device)

        def call():
            _C.ops.activation(x, out, 0, row_scale_source=residual, stream=stream())

        # gate and up in, out back, the residual row once from memory
        return call, rows * (3 * inter + hidden) * element
    if op == "activation_unscaled":  # the same without the row scale (models whose norms do not
        # fold): the difference is what the row's sum of squares costs the activation
        x, out = rand(rows, 2 * inter), torch.empty((rows, inter), dtype=dtype, device=device)

        def call():
            _C.ops.activation(x, out, 0, stream=stream())

        return call, rows * 3 * inter * element
    raise ValueError(f"unknown layer op {op!r}; choose from {', '.join(LAYER_OPS)}")


def layer_op(op: str, rows: int, model: str, copy_bandwidth: float) -> dict:
    call, moved = layer_op_call(op, rows, model)
    seconds = graph_seconds(call)
    return {"kernel": op, "model": model, "rows": rows, "us": round(seconds * 1e6, 2),
            "GBps": round(moved / seconds / 1e9, 1),
            "fraction_of_copy": round(moved / seconds / copy_bandwidth, 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes (a smoke run)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--result-json", default=None, help="append the JSON lines here")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        raise SystemExit("kernels.py: needs a CUDA device (the CPU backend is the reference, "
                         "not a speed target)")
    ceiling = ceilings.measure()
    common = {"bench": "kernels", "card": ceiling["card"], "commit": commit(),
              "copy_bandwidth_TBps": ceiling["copy_bandwidth_TBps"],
              "bf16_matmul_TFLOPs": ceiling["bf16_matmul_TFLOPs"]}
    copy = ceiling["copy_bandwidth_TBps"] * 1e12
    matmul = ceiling["bf16_matmul_TFLOPs"] * 1e12
    runs = {
        "decode": [lambda s=s: decode(*s, copy)
                   for s in (QUICK_DECODE if args.quick else DECODE_SHAPES)],
        "nano-run": [lambda order=order: run_decode("nano", copy, 256 if args.quick else 16, order)
                     for order in (False, True)],
        "llama8b-run": [lambda: run_decode("llama8b", copy, 256 if args.quick else 16, True)],
        "prefill": [lambda s=s: prefill(*s, matmul)
                    for s in (QUICK_PREFILL if args.quick else PREFILL_SHAPES)],
        "gemv": [lambda s=s: gemv(*s, copy) for s in (QUICK_GEMV if args.quick else GEMV_SHAPES)],
        "layer-ops": [lambda op=op, s=s: layer_op(op, *s, copy)
                      for s in (QUICK_LAYER_OPS if args.quick else LAYER_OP_SHAPES)
                      for op in LAYER_OPS],
    }
    lines = []
    for section in sections:
        for run in runs[section]:
            lines.append(json.dumps({**common, **run()}))
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    if args.result_json:
        with open(args.result_json, "a") as f:
            f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()

"""Paged attention kernels over a grid of shapes, against the ceilings measured in the same run.

    python bench/kernels.py [--quick] [--result-json FILE]

Decode (one query token per request): time, GB/s of K/V read and the fraction of the copy
bandwidth, for full batches, small batches with long contexts and a batch of uneven lengths.
Prefill (causal prompts): time, TFLOP/s and the fraction of the bf16 matmul rate, beside torch's
scaled_dot_product_attention on contiguous tensors of the same shapes. Decode GEMMs (a few rows
times Llama-3.1-8B's weights): the few-row kernel decode steps use (cuda/gemv.cu), GB/s of weight
read and the fraction of the copy bandwidth, beside torch's cuBLAS matmul of the same shapes. bf16, head dim 128,
32 query / 8 KV heads, block 16 (BENCH.md's shapes). Calls are replayed from a CUDA graph, so the
host's per-call work never shows in the time (decode; prefill kernels take milliseconds and
are timed back to back). One JSON line per shape; --result-json appends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceilings  # noqa: E402
from throughput import commit  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16

# (batch, context, per-request contexts or None)
DECODE_SHAPES = [(64, 4096, None), (256, 1024, None), (1, 32768, None), (1, 8192, None),
                 (1, 1024, None), (8, 8192, None), (8, 1024, None),
                 (64, 8192, np.random.default_rng(0).integers(100, 8192, size=64).tolist())]
PREFILL_SHAPES = [(4, 4096), (16, 1024), (1, 8192)]
# (rows, n, k): Llama-3.1-8B's qkv, o, gate_up, down and LM head at decode batches 1 and 2.
GEMV_SHAPES = [(m, n, k) for m in (1, 2) for n, k in
               [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]]
QUICK_GEMV = [(1, 1024, 1024)]
QUICK_DECODE = [(4, 1024, None), (6, 512, [100, 512, 37, 300, 512, 1])]
QUICK_PREFILL = [(2, 512)]


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


def decode(batch: int, context: int, contexts, copy_bandwidth: float) -> dict:
    from octavo import _C

    lengths = [context] * batch if contexts is None else list(contexts)
    cache, tables = paged_cache(batch, context)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    query_start = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, HEADS * HEAD_DIM), device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    workspace = torch.empty(max(16, _C.ops.decode_workspace_bytes(
        batch, HEADS, KV_HEADS, HEAD_DIM, BLOCK, context)), dtype=torch.uint8, device="cuda")

    def call():
        _C.ops.paged_attention(q, cache, out, query_start, context_lens, tables, None, HEADS,
                               KV_HEADS, HEAD_DIM, BLOCK, 1.0 / math.sqrt(HEAD_DIM),
                               stream=torch.cuda.current_stream().cuda_stream, max_query_len=1,
                               max_context_len=context, workspace=workspace)

    seconds = graph_seconds(call)
    kv_bytes = sum(lengths) * KV_HEADS * HEAD_DIM * 2 * cache.element_size()
    rate = kv_bytes / seconds
    return {"kernel": "paged_decode", "batch": batch, "context": context,
            "uneven": contexts is not None, "us": round(seconds * 1e6, 2),
            "kv_GBps": round(rate / 1e9, 1),
            "fraction_of_copy": round(rate / copy_bandwidth, 3)}


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
    return {"kernel": "paged_prefill", "batch": batch, "seq": seq,
            "ms": round(ours_s * 1e3, 3), "TFLOPs": round(flops / ours_s / 1e12, 1),
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes (a smoke run)")
    parser.add_argument("--result-json", default=None, help="append the JSON lines here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.py: needs a CUDA device (the CPU backend is the reference, "
                         "not a speed target)")
    ceiling = ceilings.measure()
    common = {"bench": "kernels", "card": ceiling["card"], "commit": commit(),
              "copy_bandwidth_TBps": ceiling["copy_bandwidth_TBps"],
              "bf16_matmul_TFLOPs": ceiling["bf16_matmul_TFLOPs"]}
    copy = ceiling["copy_bandwidth_TBps"] * 1e12
    matmul = ceiling["bf16_matmul_TFLOPs"] * 1e12
    lines = []
    for batch, context, contexts in (QUICK_DECODE if args.quick else DECODE_SHAPES):
        lines.append(json.dumps({**common, **decode(batch, context, contexts, copy)}))
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    for batch, seq in (QUICK_PREFILL if args.quick else PREFILL_SHAPES):
        lines.append(json.dumps({**common, **prefill(batch, seq, matmul)}))
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    for m, n, k in (QUICK_GEMV if args.quick else GEMV_SHAPES):
        lines.append(json.dumps({**common, **gemv(m, n, k, copy)}))
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    if args.result_json:
        with open(args.result_json, "a") as f:
            f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()

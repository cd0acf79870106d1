"""The physical floor of BENCH.md's workloads on a card, from the two ceilings measured on it.

    python bench/floor.py --copy-bandwidth 4.245 --matmul-rate 751.3
    python bench/floor.py --ceilings FILE [--measured FILE ...]

A workload's floor (BENCH.md): prefill FLOPs / matrix rate + decode bytes / bandwidth. Prefill
FLOPs are 2 x the matrix-product parameters (every projection and the LM head; the input
embedding is a lookup) x prompt tokens. Decode bytes are every K and V entry each decode step
reads (a request with prompt p and output o reads o p + o (o - 1) / 2 token entries, all layers,
bf16) plus all the weights once per step, over as many steps as the longest output (every
request running from the first). The latency floor is the weights' bytes per output token.

Ceilings come as flags (TB/s of the device copy, TFLOP/s of the bf16 matmul) or as a line of
bench/ceilings.py (or kernels.py) output. --measured takes octavo_bench --json
lines: each workload line gets its output tok/s (or time per output token) as a fraction of the
floor. Prints one JSON line per workload.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes: what the floor needs of a model."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qk_norm: bool = False

    def projection_parameters(self) -> int:
        """Weights of the matrix products: q, k, v, o, gate, up, down per layer and the LM head."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.vocab * self.hidden

    def parameters(self) -> int:
        """Every weight: the projections, the input embedding unless tied, and the norms."""
        norms = self.layers * (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0))
        embedding = 0 if self.tied else self.vocab * self.hidden
        return self.projection_parameters() + embedding + norms + self.hidden

    def kv_bytes_per_token(self, element_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes


QWEN3_0_6B = Shape(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                   vocab=151936, tied=True, qk_norm=True)
LLAMA_3_1_8B = Shape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                     intermediate=14336, vocab=128256, tied=False)


@dataclass(frozen=True)
class Workload:
    name: str
    shape: Shape
    requests: int
    prompt: tuple[int, int]
    output: tuple[int, int]

    def lengths(self) -> list[tuple[int, int]]:
        """(prompt, output) per request, drawn as BENCH.md prescribes."""
        rng = random.Random(0)
        return [(rng.randint(*self.prompt), rng.randint(*self.output))
                for _ in range(self.requests)]


WORKLOADS = {
    "nano": Workload("nano", QWEN3_0_6B, 256, (100, 1024), (100, 1024)),
    "llama8b": Workload("llama8b", LLAMA_3_1_8B, 512, (100, 1024), (100, 1024)),
    "latency": Workload("latency", LLAMA_3_1_8B, 1, (128, 128), (256, 256)),
}


def floor(workload: Workload, copy_bandwidth: float, matmul_rate: float) -> dict:
    """The workload's floor at `copy_bandwidth` bytes/s and `matmul_rate` FLOP/s."""
    shape = workload.shape
    lengths = workload.lengths()
    prompt_tokens = sum(p for p, _ in lengths)
    output_tokens = sum(o for _, o in lengths)
    steps = max(o for _, o in lengths)
    kv_entries = sum(o * p + o * (o - 1) // 2 for p, o in lengths)
    kv_bytes = kv_entries * shape.kv_bytes_per_token()
    weight_bytes = 2 * shape.parameters()
    prefill_s = 2 * shape.projection_parameters() * prompt_tokens / matmul_rate
    decode_s = (kv_bytes + weight_bytes * steps) / copy_bandwidth
    seconds = prefill_s + decode_s
    return {"workload": workload.name, "floor_s": round(seconds, 3),
            "prefill_floor_s": round(prefill_s, 3), "decode_floor_s": round(decode_s, 3),
            "kv_read_TB": round(kv_bytes / 1e12, 2), "weights_GB": round(weight_bytes / 1e9, 2),
            "max_output_tok_s": round(output_tokens / seconds, 1),
            "tpot_floor_ms": round(weight_bytes / copy_bandwidth * 1e3, 3)}


def fraction_of_floor(floor_line: dict, measured: dict) -> float:
    """A measured run against its floor: output tok/s over the floor's (throughput workloads),
    or the floor's time per output token over the measured mean (latency)."""
    if floor_line["workload"] == "latency":
        return floor_line["tpot_floor_ms"] / measured["tpot_ms"]["mean"]
    return measured["output_tok_s"] / floor_line["max_output_tok_s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copy-bandwidth", type=float, help="TB/s (read + written)")
    parser.add_argument("--matmul-rate", type=float, help="bf16 TFLOP/s")
    parser.add_argument("--ceilings", help="a file whose first JSON line carries "
                        "copy_bandwidth_TBps and bf16_matmul_TFLOPs")
    parser.add_argument("--measured", nargs="*", default=[],
                        help="files of octavo_bench --json lines to compare with the floor")
    args = parser.parse_args(argv)
    if args.ceilings:
        with open(args.ceilings) as f:
            line = json.loads(next(l for l in f if l.strip()))
        bandwidth, rate = line["copy_bandwidth_TBps"], line["bf16_matmul_TFLOPs"]
    elif args.copy_bandwidth is not None and args.matmul_rate is not None:
        bandwidth, rate = args.copy_bandwidth, args.matmul_rate
    else:
        parser.error("give --ceilings FILE, or both --copy-bandwidth and --matmul-rate")
    if bandwidth <= 0 or rate <= 0:
        parser.error(f"ceilings must be positive; got {bandwidth} TB/s and {rate} TFLOP/s")
    measured: dict[str, list[dict]] = {}
    for path in args.measured:
        with open(path) as f:
            for text in f:
                if text.strip():
                    line = json.loads(text)
                    measured.setdefault(line.get("workload", ""), []).append(line)
    for name, workload in WORKLOADS.items():
        line = {"bench": "floor", "copy_bandwidth_TBps": bandwidth, "bf16_matmul_TFLOPs": rate,
                **floor(workload, bandwidth * 1e12, rate * 1e12)}
        if measured.get(name):
            line["fractions_of_floor"] = [round(fraction_of_floor(line, m), 3)
                                          for m in measured[name]]
        print(json.dumps(line))


if __name__ == "__main__":
    main()

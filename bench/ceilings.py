"""The two ceilings every GPU figure is quoted against (BENCH.md), measured on this card now:
device memory bandwidth (2 GiB bf16 device-to-device copy, bytes read + written / time) and the
bf16 matrix rate (8192^3 matmul). Prints one JSON line."""

from __future__ import annotations

import json

import torch


def median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure() -> dict:
    """{"card", "copy_bandwidth_TBps", "bf16_matmul_TFLOPs"} of the current CUDA device."""
    def copy_bandwidth() -> float:
        src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
        dst = torch.empty_like(src)
        return 2 * src.numel() * 2 / (median_ms(lambda: dst.copy_(src)) / 1e3)

    def matmul_rate(n: int = 8192) -> float:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        return 2 * n**3 / (median_ms(lambda: a @ b) / 1e3)

    bandwidth, rate = copy_bandwidth(), matmul_rate()
    torch.cuda.empty_cache()
    return {"card": torch.cuda.get_device_name(),
            "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
            "bf16_matmul_TFLOPs": round(rate / 1e12, 1)}


def main() -> None:
    print(json.dumps({"bench": "ceilings", **measure()}))


if __name__ == "__main__":
    main()

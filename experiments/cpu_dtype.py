"""bf16 vs float32 matmul speed on this CPU, at the frozen mini-LLaVA's shapes, in one run.

Why: `model.dtype: auto` runs the frozen VLM in bf16 only where the CPU has native bf16
(`mlops.backbone.cpu_has_native_bf16`). This measures what that choice is worth here:
the ratio bf16 time / float32 time for the SmolLM2-135M MLP and attention projections over one
training row (256 visual + ~40 text tokens), interleaved, medians after a warm-up.

    python experiments/cpu_dtype.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from mlops.backbone import cpu_has_native_bf16, resolve_dtype

# (rows, inner, outer): SmolLM2-135M (hidden 576, MLP 1536) over 296 tokens
SHAPES = {"mlp_up": (296, 576, 1536), "mlp_down": (296, 1536, 576), "attn_qkv": (296, 576, 960)}


def median_ms(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for name, (m, k, n) in SHAPES.items():
        a32, b32 = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        a32 @ b32, a16 @ b16  # warm-up
        fp32, bf16 = [], []
        for _ in range(3):  # interleaved, so drift in machine load hits both
            fp32.append(median_ms(a32, b32, args.repeats))
            bf16.append(median_ms(a16, b16, args.repeats))
        f, b = statistics.median(fp32), statistics.median(bf16)
        rows[name] = {"shape": [m, k, n], "float32_ms": round(f, 3), "bfloat16_ms": round(b, 3), "bf16_over_fp32": round(b / f, 2)}
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
              "auto_dtype": str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch."),
              "threads": args.threads, "matmuls": rows}
    print(json.dumps(result, indent=2))
    print(f"\nnative bf16: {result['native_bf16']} -> auto = {result['auto_dtype']}\n")
    print("| matmul | shape | float32 ms | bf16 ms | bf16 / fp32 |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {'x'.join(map(str, row['shape']))} | {row['float32_ms']:.2f} | {row['bfloat16_ms']:.2f} | {row['bf16_over_fp32']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The machine's fp32 / bf16 matrix-multiply throughput at a few sizes (the efficiency yardstick)."""
import argparse

import torch

from emov2.tools.bench import measure_gemm_flops

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        for n in (int(s) for s in args.sizes.split(",")):
            res = measure_gemm_flops(dtype, n=n, repeats=3, device=args.device)
            print(f"{res['dtype']:>9} n={n:5d}: {res['gflops']:8.1f} GFLOP/s")

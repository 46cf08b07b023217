"""emov2.kernels' float32 depthwise conv and SiLU against the oneDNN calls they replace, on EMOv2's shapes.

For every depthwise conv of EMOv2-1M (and one 1x1 expansion per resolution) it times, interleaved in one
process, what the deployed model ran before (``mkldnn._convolution_pointwise`` with the swish post-op, plus the
block's residual add) and what it runs now (``emov2.kernels.depthwise_conv_f32`` with SiLU and the residual in
the kernel; ATen's conv + ``emov2.kernels.silu_`` for the 1x1s), checks that both give the same output, and
prints a table of the medians and ratios (> 1: the kernel is faster). The per-call overhead row is a 2x2 map.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernels_vs_onednn.py --threads 1 --batch 1 --json out.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

from emov2 import kernels
from emov2.tools.bench.machine import load_average, machine_info
from emov2.tools.bench.timing import Case, run_interleaved

# (channels in, channels out, map size, kernel, stride): EMOv2-1M's depthwise convs, then its 1x1 expansions
DEPTHWISE = [(16, 16, 112, 3, 1), (64, 64, 112, 5, 2), (64, 64, 56, 5, 1), (160, 160, 56, 5, 2), (120, 120, 28, 5, 1),
             (288, 288, 28, 5, 2), (240, 240, 14, 5, 1), (560, 560, 14, 5, 2), (630, 630, 7, 5, 1), (16, 16, 2, 5, 1)]
POINTWISE = [(16, 64, 112, 1, 1), (32, 160, 56, 1, 1), (48, 288, 28, 1, 1), (80, 240, 14, 1, 1), (16, 16, 2, 1, 1)]


def _cases(shape, batch):
    cin, cout, size, k, stride = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    groups = cin if k > 1 else 1
    w = (torch.randn(cout, cin // groups, k, k, generator=g) / (k * (cin // groups) ** 0.5)).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    pad, out = [k // 2] * 2, (size + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(batch, cout, out, out, generator=g).contiguous(memory_format=torch.channels_last)

    def onednn():
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, [stride] * 2, [1, 1], groups, 'swish', [], '')
        return y.add_(r) if k > 1 else y

    if k > 1:
        packed = kernels.pack_depthwise_weight_f32(w)

        def ours():
            return kernels.depthwise_conv_f32(x, packed, b, k, stride, True, r)
    else:
        def ours():
            return kernels.silu_(F.conv2d(x, w, b))
    with torch.inference_mode():
        err = (onednn() - ours()).abs().max().item()
    return onednn, ours, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.build_error() is not None:
        raise SystemExit(f"emov2 kernels unavailable: {kernels.build_error()}")
    rows = []
    print(f"| op | shape (C_in -> C_out @ map, k, stride) | oneDNN ms | kernel ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for shape in DEPTHWISE + POINTWISE:
        onednn, ours, err = _cases(shape, args.batch)
        cases = [Case("onednn", onednn, args.batch), Case("kernel", ours, args.batch)]
        with torch.inference_mode():
            run_interleaved(cases, repeats=args.repeats, warmup=2, min_time_s=0.2)
        a, o = cases[0].median_s * 1e3, cases[1].median_s * 1e3
        op = "depthwise + SiLU + residual" if shape[3] > 1 else "1x1 conv + SiLU"
        rows.append({"op": op, "shape": shape, "onednn_ms": a, "kernel_ms": o, "ratio": a / o, "max_abs_diff": err})
        cin, cout, size, k, stride = shape
        print(f"| {op} | {cin} -> {cout} @ {size}, k{k}, s{stride} | {a:.3f} | {o:.3f} | {a / o:.2f} | {err:.1e} |")
    result = {"threads": args.threads, "batch": args.batch, "repeats": args.repeats, "machine": machine_info("cpu"),
              "load_average": load_average(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

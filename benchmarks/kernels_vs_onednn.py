"""emov2.kernels' float32 stem, depthwise and 1x1 convs against the oneDNN calls they replace, on EMOv2's shapes.

For every depthwise conv of EMOv2-1M and its kinds of 1x1 conv (expansions with SiLU, value convs with GELU,
projections with the block's residual) it times, interleaved in one process, ``mkldnn._convolution_pointwise``
with the post-op (plus the residual add for depthwise convs), what the deployed model runs at batch 1
(``emov2.kernels.depthwise_conv_f32`` with SiLU and the residual in the kernel; ``emov2.kernels.pointwise_conv_f32``
for the 1x1s) and, for the 1x1s, the batch-1 path before it (ATen's conv, then ``emov2.kernels.silu_``, GELU or
the add). The stem rows (EMOv2-1M / 2M's 16 and 5M's 24 channels) start from an NCHW image: oneDNN and ATen
make it channels-last first, as the deployed model did before ``emov2.kernels.stem_conv_f32``, which reads NCHW
rows. It checks that all give the same output and prints the medians and ratios (> 1: the kernel is
faster). The per-call overhead rows are 2x2 maps. A second table times EMOv2-1M's blocks without attention
three ways: oneDNN post-op convs (expansion + act, depthwise + SiLU + skip, projection + residual), the per-conv
kernels above in a row, and ``emov2.kernels.mobile_block_f32`` (the whole block in one pass).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernels_vs_onednn.py --threads 1 --batch 1 --json out.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

from emov2 import kernels
from emov2.tools.bench.machine import load_average, machine_info
from emov2.tools.bench.timing import Case, run_interleaved

# (channels in, channels out, input size, kernel, stride): the stems' first convs (+ SiLU) on an RGB image
STEMS = [(3, 16, 224, 3, 2), (3, 24, 224, 3, 2)]
# (channels in, channels out, map size, kernel, stride): EMOv2-1M's depthwise convs
DEPTHWISE = [(16, 16, 112, 3, 1), (64, 64, 112, 5, 2), (64, 64, 56, 5, 1), (160, 160, 56, 5, 2), (120, 120, 28, 5, 1),
             (288, 288, 28, 5, 2), (240, 240, 14, 5, 1), (560, 560, 14, 5, 2), (630, 630, 7, 5, 1), (16, 16, 2, 5, 1)]
# (channels in, channels out, map size, activation, residual): its 1x1 convs of each kind
POINTWISE = [(16, 64, 112, 'swish', False), (32, 160, 56, 'swish', False), (48, 288, 28, 'swish', False),
             (80, 240, 14, 'gelu', False), (180, 630, 7, 'gelu', False), (64, 32, 56, 'none', True),
             (240, 80, 14, 'none', True), (630, 180, 7, 'none', True), (16, 16, 2, 'swish', False)]

# (channels in, expanded, out, map size, kernel, stride, expansion act, skip + residual): its blocks without attention
BLOCKS = [(16, 64, 32, 112, 5, 2, 'swish', False), (32, 64, 32, 56, 5, 1, 'swish', True),
          (32, 160, 48, 56, 5, 2, 'swish', False), (48, 120, 48, 28, 5, 1, 'swish', True),
          (48, 288, 80, 28, 5, 2, 'gelu', False), (80, 560, 180, 14, 5, 2, 'gelu', False)]


def _stem_cases(shape, batch):
    cin, cout, size, k, stride = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g)  # NCHW, as images arrive
    w = (torch.randn(cout, cin, k, k, generator=g) / k).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    pad, packed = [k // 2] * 2, kernels.pack_stem_weight_f32(w)
    cl = torch.channels_last
    return {"onednn": lambda: torch.ops.mkldnn._convolution_pointwise(
                x.contiguous(memory_format=cl), w, b, pad, [stride] * 2, [1, 1], 1, 'swish', [], ''),
            "aten": lambda: kernels.silu_(F.conv2d(x.contiguous(memory_format=cl), w, b, stride, pad)),
            "kernel": lambda: kernels.stem_conv_f32(x, packed, b, k, stride, True)}


def _depthwise_cases(shape, batch):
    cin, cout, size, k, stride = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, 1, k, k, generator=g) / k).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    pad, out = [k // 2] * 2, (size + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(batch, cout, out, out, generator=g).contiguous(memory_format=torch.channels_last)
    packed = kernels.pack_depthwise_weight_f32(w)
    return {"onednn": lambda: torch.ops.mkldnn._convolution_pointwise(
                x, w, b, pad, [stride] * 2, [1, 1], cin, 'swish', [], '').add_(r),
            "kernel": lambda: kernels.depthwise_conv_f32(x, packed, b, k, stride, True, r)}


def _pointwise_cases(shape, batch):
    cin, cout, size, act, residual = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    r = torch.randn(batch, cout, size, size, generator=g).contiguous(memory_format=torch.channels_last) \
        if residual else None
    conv = torch.ops.mkldnn._convolution_pointwise

    def onednn():
        if r is not None:
            return conv(x, r, w, b, [0, 0], [1, 1], [1, 1], 1, 'add', None, None, [], None)
        return conv(x, w, b, [0, 0], [1, 1], [1, 1], 1, act, [], 'none' if act == 'gelu' else '')

    def aten():
        y = F.conv2d(x, w, b)
        y = kernels.silu_(y) if act == 'swish' else F.gelu(y) if act == 'gelu' else y
        return y if r is None else y.add_(r)

    w2 = w.view(cout, cin)
    return {"onednn": onednn, "aten": aten, "kernel": lambda: kernels.pointwise_conv_f32(x, w2, b, act, r)}


def _block_cases(shape, batch):
    cin, cmid, cout, size, k, stride, act, residual = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w_exp = (torch.randn(cmid, cin, 1, 1, generator=g) / cin ** 0.5).contiguous(memory_format=torch.channels_last)
    b_exp = torch.randn(cmid, generator=g)
    w_dw = (torch.randn(cmid, 1, k, k, generator=g) / k).contiguous(memory_format=torch.channels_last)
    b_dw = torch.randn(cmid, generator=g)
    w_proj = (torch.randn(cout, cmid, 1, 1, generator=g) / cmid ** 0.5).contiguous(memory_format=torch.channels_last)
    packed, w_exp2, w_proj2 = kernels.pack_depthwise_weight_f32(w_dw), w_exp.view(cmid, cin), w_proj.view(cout, cmid)
    conv = torch.ops.mkldnn._convolution_pointwise

    def onednn():
        y = conv(x, w_exp, b_exp, [0, 0], [1, 1], [1, 1], 1, act, [], 'none' if act == 'gelu' else '')
        z = conv(y, w_dw, b_dw, [k // 2] * 2, [stride] * 2, [1, 1], cmid, 'swish', [], '')
        if residual:
            return conv(z.add_(y), x, w_proj, None, [0, 0], [1, 1], [1, 1], 1, 'add', None, None, [], None)
        return conv(z, w_proj, None, [0, 0], [1, 1], [1, 1], 1, 'none', [], '')

    def per_conv():
        y = kernels.pointwise_conv_f32(x, w_exp2, b_exp, act)
        z = kernels.depthwise_conv_f32(y, packed, b_dw, k, stride, True, y if residual else None)
        return kernels.pointwise_conv_f32(z, w_proj2, None, 'none', x if residual else None)

    w_exp_in, w_proj_in = w_exp2.t().contiguous(), w_proj2.t().contiguous()  # the block kernel's input-major weights
    return {"onednn": onednn, "aten": per_conv,
            "kernel": lambda: kernels.mobile_block_f32(x, w_exp_in, b_exp, act, packed, b_dw, k, stride, True,
                                                       residual, w_proj_in, None, residual)}


def _time(fns, batch, repeats):
    """Interleaved medians (ms) of ``fns`` and the largest difference of any output from the kernel's."""
    cases = [Case(k, fn, batch) for k, fn in fns.items()]
    with torch.inference_mode():
        outs = {k: fn() for k, fn in fns.items()}
        run_interleaved(cases, repeats=repeats, warmup=2, min_time_s=0.2)
    err = max((o - outs["kernel"]).abs().max().item() for o in outs.values())
    scale = outs["kernel"].abs().max().item()
    if not err <= 1e-4 * max(scale, 1.0):  # a timing of different arithmetic means nothing
        raise SystemExit(f"the paths disagree: max abs difference {err:.3g} (outputs up to {scale:.3g})")
    return {c.key: c.median_s * 1e3 for c in cases}, err


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
    print("| op | shape | oneDNN ms | ATen + act ms | kernel ms | oneDNN / kernel | ATen / kernel | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in STEMS + DEPTHWISE + POINTWISE:
        stem, depthwise = shape in STEMS, isinstance(shape[3], int)
        fns = _stem_cases(shape, args.batch) if stem else \
            _depthwise_cases(shape, args.batch) if depthwise else _pointwise_cases(shape, args.batch)
        ms, err = _time(fns, args.batch, args.repeats)
        cin, cout, size, kind, extra = shape
        if stem:
            op, desc = "stem conv + SiLU (NCHW image)", f"{cin} -> {cout} @ {size}, k{kind}, s{extra}"
        elif depthwise:
            op, desc = "depthwise + SiLU + residual", f"{cin} @ {size}, k{kind}, s{extra}"
        else:
            op = "1x1 conv + " + {"swish": "SiLU", "gelu": "GELU", "none": "residual"}[kind]
            desc = f"{cin} -> {cout} @ {size}"
        row = {"op": op, "shape": list(shape), **{f"{k}_ms": v for k, v in ms.items()},
               "ratio": ms["onednn"] / ms["kernel"], "max_abs_diff": err}
        if "aten" in ms:
            row["ratio_vs_aten"] = ms["aten"] / ms["kernel"]
        rows.append(row)
        aten = f"{ms['aten']:.3f}" if "aten" in ms else "-"
        vs_aten = f"{row['ratio_vs_aten']:.2f}" if "aten" in ms else "-"
        print(f"| {op} | {desc} | {ms['onednn']:.3f} | {aten} | {ms['kernel']:.3f} | {row['ratio']:.2f} | "
              f"{vs_aten} | {err:.1e} |")
    print()
    print("| block | oneDNN ms | per-conv kernels ms | block kernel ms | oneDNN / block | per-conv / block | "
          "max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for shape in BLOCKS:
        ms, err = _time(_block_cases(shape, args.batch), args.batch, args.repeats)
        cin, cmid, cout, size, k, stride, act, residual = shape
        desc = f"{cin} -> {cmid} -> {cout} @ {size}, k{k}, s{stride}, {'SiLU' if act == 'swish' else 'GELU'}" + \
            (", residual" if residual else "")
        rows.append({"op": "block", "shape": list(shape), "onednn_ms": ms["onednn"], "per_conv_ms": ms["aten"],
                     "kernel_ms": ms["kernel"], "ratio": ms["onednn"] / ms["kernel"],
                     "ratio_vs_per_conv": ms["aten"] / ms["kernel"], "max_abs_diff": err})
        print(f"| {desc} | {ms['onednn']:.3f} | {ms['aten']:.3f} | {ms['kernel']:.3f} | "
              f"{ms['onednn'] / ms['kernel']:.2f} | {ms['aten'] / ms['kernel']:.2f} | {err:.1e} |")
    result = {"threads": args.threads, "batch": args.batch, "repeats": args.repeats, "machine": machine_info("cpu"),
              "load_average": load_average(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

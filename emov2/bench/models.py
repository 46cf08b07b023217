"""Which models the benchmark runs, how each variant of a model is built, and what is known about it.

EMO models come in up to three *variants*:

- ``reference``: ``emov2.reference.create_model``, the plain NCHW training graph; speed-up
  ratios divide by it;
- ``eager``: the same graph made channels-last (``emov2.to_channels_last``), as the trainer runs it;
- ``deploy``: ``emov2.deploy(create_model(...))``, the inference-optimised module.
- ``deploy_torch``: the same without the compiled kernels (window attention, bf16 depthwise conv;
  ``compiled_kernels=False``): what a machine without a C++ compiler gets.

A variant whose builder does not exist in this checkout is reported as unavailable (with the
reason) instead of failing the run. timm competitors have one variant, ``timm``: the eval model
after ``timm.utils.reparameterize_model`` (so RepViT / FastViT run in their own deploy form).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

EMOV2 = ["emov2_1m", "emov2_2m", "emov2_5m"]
EMOV1 = ["emov1_1m", "emov1_2m", "emov1_5m"]
COMPETITORS = [
    "edgenext_xx_small",
    "edgenext_x_small",
    "edgenext_small",
    "mobilenetv3_large_100",
    "repvit_m0_9",
    "efficientformerv2_s0",
    "efficientformerv2_s1",
    "mobilevitv2_100",
    "fastvit_t8",
]
DEFAULT_MODELS = EMOV2 + EMOV1 + COMPETITORS

# The targets: EMO model -> competitor it must match in deploy fp32 eager throughput.
TARGET_PAIRS = {
    "emov2_5m": "edgenext_small",
    "emov2_2m": "edgenext_x_small",
    "emov2_1m": "edgenext_xx_small",
}

# ImageNet-1k top-1 (%) as printed in the EMOv2 paper (arXiv 2412.06674, Tables I/XVI) and the EMO
# paper (ICCV'23); no distillation. Only models with a published figure are labelled in the plot.
PAPER_TOP1 = {
    "emov2_1m": 72.3, "emov2_2m": 75.8, "emov2_5m": 79.4, "emov2_20m": 83.3, "emov2_50m": 84.1,
    "emov1_1m": 71.5, "emov1_2m": 75.1, "emov1_5m": 78.4, "emov1_6m": 79.0,
}

# EMOv2 paper Table XVI: img/s at 224, batch 256, CPU = AMD EPYC 7K62, GPU = V100.
PAPER_THROUGHPUT = {
    "edgenext_xx_small": {"cpu": 73.1, "gpu": 2860.6},
    "emov1_1m": {"cpu": 158.4, "gpu": 3414.6},
    "emov2_1m": {"cpu": 147.1, "gpu": 3182.2},
    "edgenext_x_small": {"cpu": 69.1, "gpu": 1855.2},
    "emov1_2m": {"cpu": 126.6, "gpu": 2509.8},
    "emov2_2m": {"cpu": 118.2, "gpu": 3312.4},
    "edgenext_small": {"cpu": 54.2, "gpu": 1622.5},
    "emov1_5m": {"cpu": 106.5, "gpu": 1731.7},
    "emov2_5m": {"cpu": 93.9, "gpu": 1607.8},
}

MODEL_PRESETS = {
    "default": DEFAULT_MODELS,
    "emo": EMOV2 + EMOV1,
    "emov2": EMOV2,
    "emov1": EMOV1,
    "competitors": COMPETITORS,
    "targets": EMOV2 + list(TARGET_PAIRS.values()),
}


class VariantUnavailable(RuntimeError):
    """A variant cannot be built in this checkout (e.g. ``emov2.deploy`` does not exist yet)."""


def is_emo(name: str) -> bool:
    """Whether ``name`` is one of this package's models (as opposed to a timm competitor)."""
    return name.startswith(("emov2_", "emov1_"))


def resolve_models(spec: str | list[str]) -> list[str]:
    """Turn ``"default"``, a preset name or a comma-separated list into model names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        for name in MODEL_PRESETS.get(item, [item]):
            if name not in out:
                out.append(name)
    return out


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` for a name that is neither an EMO model nor a timm model."""
    import timm

    import emov2

    if is_emo(name):
        if name not in emov2.list_models():
            raise ValueError(f"unknown model {name!r}; EMO models: {', '.join(emov2.list_models())}")
    elif not timm.list_models(name):
        raise ValueError(f"unknown model {name!r}: not an EMO model and not in timm")


def deploy_for_export(model: nn.Module) -> nn.Module:
    """``emov2.deploy`` with plain PyTorch ops and whole-batch stages, so that exporters (ONNX,
    TorchScript tracing) see neither oneDNN kernels nor batch-size-dependent slicing."""
    import emov2

    return emov2.deploy(model.eval(), fuse=False, micro_batch_bytes=0)


def variants_for(name: str) -> list[str]:
    """All variants that make sense for ``name`` (availability is checked when building)."""
    return ["reference", "eager", "deploy_torch", "deploy"] if is_emo(name) else ["timm"]


def build(
    name: str,
    variant: str,
    num_classes: int = 1000,
    img_size: int = 224,
    train: bool = False,
    exportable: bool = False,
) -> nn.Module:
    """Build ``name`` in ``variant`` with random weights; eval mode unless ``train``.

    ``exportable`` builds the deploy variant without backend-specific fused kernels. Raises :class:`VariantUnavailable` if this checkout cannot build that variant.
    """
    import timm

    import emov2

    torch.manual_seed(0)
    if is_emo(name):
        if variant not in ("reference", "eager", "deploy_torch", "deploy"):
            raise ValueError(f"unknown variant {variant!r} for {name}")
        model = emov2.reference.create_model(name, num_classes=num_classes)
        if variant == "eager":
            model = emov2.to_channels_last(model)
        elif variant in ("deploy", "deploy_torch"):
            if train:
                raise VariantUnavailable("the deploy variants are inference-only")
            if exportable:
                model = deploy_for_export(model)
            else:
                model = emov2.deploy(model.eval(), compiled_kernels=variant == "deploy")
    else:
        if variant != "timm":
            raise ValueError(f"unknown variant {variant!r} for timm model {name}")
        model = timm.create_model(name, num_classes=num_classes)
        if not train:
            model = timm.utils.reparameterize_model(model.eval())
    return model.train(train)


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int = 224) -> int:
    """FLOPs of one image through ``model`` as counted by ``torch.utils.flop_counter``.

    This counts matrix multiplies and convolutions (2 FLOPs per multiply-accumulate), i.e. the
    work a GEMM peak can be compared with; element-wise ops are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, img_size, img_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


@dataclass
class ModelInfo:
    """Static facts about a model used in the report."""

    name: str
    family: str
    params_m: float
    gflops: float
    paper_top1: float | None
    paper_cpu_throughput: float | None
    paper_gpu_throughput: float | None


def model_info(name: str, img_size: int = 224) -> ModelInfo:
    """Parameters and FLOPs (counted on the training-form model) and the paper's figures."""
    variant = "eager" if is_emo(name) else "timm"
    model = build(name, variant, img_size=img_size, train=True)
    paper = PAPER_THROUGHPUT.get(name, {})
    return ModelInfo(
        name=name,
        family="emo" if is_emo(name) else "timm",
        params_m=count_params(model) / 1e6,
        gflops=count_flops(model, img_size) / 1e9,
        paper_top1=PAPER_TOP1.get(name),
        paper_cpu_throughput=paper.get("cpu"),
        paper_gpu_throughput=paper.get("gpu"),
    )

"""Which models the benchmark runs, how each variant of a model is built, and what is known about it.

EMO models come in up to three *variants*:

- ``reference``: ``emov2.reference.create_model``, the plain NCHW training graph; speed-up
  ratios divide by it;
- ``eager``: the same graph made channels-last (``emov2.to_channels_last``), as the trainer runs it;
- ``deploy``: ``emov2.deploy(create_model(...))``, the inference-optimised module.
- ``deploy_torch``: the same without the compiled kernels (window attention, bf16 depthwise conv;
  ``compiled_kernels=False``): what a machine without a C++ compiler gets.

Which EMO models exist comes from the registry (:func:`emov2.list_models`); the paper's figures
(top-1, Table XVI throughput) from the package's ``paper_targets.json``. A variant whose builder does not exist in this checkout is reported as unavailable (with the
reason) instead of failing the run. timm competitors have one variant, ``timm``: the eval model
after ``timm.utils.reparameterize_model`` (so RepViT / FastViT run in their own deploy form).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ... import reference
from ...deploy import deploy, to_channels_last
from ...factory import list_models
from ..common import count_flops, count_params, paper_targets
from ..export import deploy_for_export

# Peer models from timm the EMO models are compared with (not a list of ours: those come from the registry).
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

# The targets: EMO model -> competitor it must match in deploy fp32 eager throughput.
TARGET_PAIRS = {
    "emov2_5m": "edgenext_small",
    "emov2_2m": "edgenext_x_small",
    "emov2_1m": "edgenext_xx_small",
}

PRESET_NAMES = ("default", "emo", "emov2", "emov1", "emo_all", "competitors", "targets")

__all__ = ["COMPETITORS", "TARGET_PAIRS", "PRESET_NAMES", "emo_models", "mobile_emo_models", "default_models",
           "model_presets", "paper_top1", "paper_throughput", "VariantUnavailable", "is_emo", "resolve_models",
           "check_model_name", "deploy_for_export", "variants_for", "build", "count_params", "count_flops",
           "ModelInfo", "model_info"]


@functools.lru_cache(maxsize=None)
def _paper() -> dict:
    return paper_targets()


def paper_top1(name: str) -> float | None:
    """ImageNet-1k top-1 (%) as printed in the papers (no distillation), or None."""
    return _paper().get("classification", {}).get(name, {}).get("paper", {}).get("top1")


def paper_throughput(name: str) -> dict:
    """EMOv2 paper Table XVI (img/s at 224, batch 256; CPU = AMD EPYC 7K62, GPU = V100): ``{"cpu", "gpu", ...}``."""
    entry = _paper().get("throughput_table_xvi", {}).get(name)
    return entry if isinstance(entry, dict) else {}


def emo_models() -> list[str]:
    """Every registered model of the EMO family (``emov2.models.emo``): the models with reference,
    eager and deploy variants."""
    return list(_emo_models())


@functools.lru_cache(maxsize=1)
def _emo_models() -> tuple[str, ...]:  # the family registers when emov2.models is imported (above)
    return tuple(list_models("emo"))


def mobile_emo_models(prefix: str = "") -> list[str]:
    """The registered EMO models the paper times against mobile peers (those in its Table XVI)."""
    timed = _paper().get("throughput_table_xvi", {})
    return [n for n in emo_models() if n in timed and n.startswith(prefix)]


def default_models() -> list[str]:
    """What ``emov2 bench`` runs by default: EMOv2, then EMOv1, mobile sizes, then the timm peers."""
    return mobile_emo_models("emov2_") + mobile_emo_models("emov1_") + COMPETITORS


def model_presets() -> dict[str, list[str]]:
    """Preset name -> model names (``emo``/``emov2``/``emov1``: the mobile sizes; ``emo_all``: every EMO)."""
    v2, v1 = mobile_emo_models("emov2_"), mobile_emo_models("emov1_")
    return {
        "default": default_models(),
        "emo": v2 + v1,
        "emov2": v2,
        "emov1": v1,
        "emo_all": emo_models(),
        "competitors": list(COMPETITORS),
        "targets": [n for n in v2 if n in TARGET_PAIRS] + [TARGET_PAIRS[n] for n in v2 if n in TARGET_PAIRS],
    }


class VariantUnavailable(RuntimeError):
    """A variant cannot be built in this checkout (e.g. ``emov2.deploy`` does not exist yet)."""


def is_emo(name: str) -> bool:
    """Whether ``name`` is a registered EMO model (as opposed to a timm competitor)."""
    return name in _emo_models()


def resolve_models(spec: str | list[str]) -> list[str]:
    """Turn ``"default"``, a preset name or a comma-separated list into model names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    presets = model_presets()
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        for name in presets.get(item, [item]):
            if name not in out:
                out.append(name)
    return out


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` for a name that is neither a registered model nor a timm model."""
    if name not in list_models() and not timm.list_models(name):
        raise ValueError(f"unknown model {name!r}: not a registered model ({', '.join(list_models())}) "
                         "and not in timm")


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

    ``exportable`` builds the deploy variant without backend-specific fused kernels. Raises
    :class:`VariantUnavailable` if this checkout cannot build that variant.
    """
    torch.manual_seed(0)
    if is_emo(name):
        if variant not in ("reference", "eager", "deploy_torch", "deploy"):
            raise ValueError(f"unknown variant {variant!r} for {name}")
        model = reference.create_model(name, num_classes=num_classes)
        if variant == "eager":
            model = to_channels_last(model)
        elif variant in ("deploy", "deploy_torch"):
            if train:
                raise VariantUnavailable("the deploy variants are inference-only")
            if exportable:
                model = deploy_for_export(model)
            else:
                model = deploy(model.eval(), compiled_kernels=variant == "deploy")
    else:
        if variant != "timm":
            raise ValueError(f"unknown variant {variant!r} for timm model {name}")
        model = timm.create_model(name, num_classes=num_classes)
        if not train:
            model = timm.utils.reparameterize_model(model.eval())
    return model.train(train)


@dataclass
class ModelInfo:
    """Static facts about a model used in the report."""

    name: str
    family: str
    params_m: float
    gmacs: float  # fvcore multiply-accumulates (the papers' "FLOPs") of one image, in billions
    paper_top1: float | None
    paper_cpu_throughput: float | None
    paper_gpu_throughput: float | None


def model_info(name: str, img_size: int = 224) -> ModelInfo:
    """Parameters and MACs (:func:`~emov2.tools.common.count_flops`, counted on the training-form
    model) and the paper's figures."""
    variant = "reference" if is_emo(name) else "timm"
    model = build(name, variant, img_size=img_size, train=True)
    paper = paper_throughput(name)
    return ModelInfo(
        name=name,
        family="emo" if is_emo(name) else "timm",
        params_m=count_params(model) / 1e6,
        gmacs=count_flops(model, img_size) / 1e9,
        paper_top1=paper_top1(name),
        paper_cpu_throughput=paper.get("cpu"),
        paper_gpu_throughput=paper.get("gpu"),
    )

"""What the tools share: parameter and FLOP counting, and the paper's figures (package data).

One FLOP counter for the whole package: :func:`count_flops` returns fvcore's
**multiply-accumulates** (MACs) at batch 1 in eval mode, the convention of the EMO/EMOv2 papers
(and of ``paper_targets.json``), which call them "FLOPs". Where a figure must be compared with a
GEMM rate in FLOP/s (the benchmark's efficiency), count 2 FLOPs per MAC.
"""
from __future__ import annotations

import json
import logging
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ['count_params', 'count_flops', 'paper_targets', 'read_json_text', 'PAPER_TARGETS_RESOURCE']

# ``emov2/data/paper_targets.json``: figures from the EMOv2 paper (arXiv 2412.06674) and the EMO
# paper (ICCV'23), shipped as package data so that an installed package needs no checkout beside it.
PAPER_TARGETS_RESOURCE = ('emov2', 'data/paper_targets.json')


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _sdpa_macs(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention`` (which fvcore does not count):
    ``q @ k^T`` and ``attn @ v``, one MAC per multiply-add, as its ``bmm`` handle would count them."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3,
                frames: Optional[int] = None) -> int:
    """Multiply-accumulates (MACs, the papers' "FLOPs") of one ``in_chans x input_size x input_size``
    (or ``in_chans x H x W`` for ``input_size=(H, W)``) image (or ``in_chans x frames x input_size x input_size`` clip) through ``model``, counted by
    fvcore's ``FlopCountAnalysis`` at batch 1 in eval mode.

    fvcore counts convs, matmuls (attention is written as batched matmuls), linears and the norms,
    one per multiply-accumulate (``F.scaled_dot_product_attention`` too: its two matmuls); element-wise activations and adds are not counted. ``model``'s
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    logging.getLogger('fvcore').setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            param = next(model.parameters(), None)
            hw = tuple(input_size) if isinstance(input_size, (tuple, list)) else (input_size, input_size)
            shape = (1, in_chans) + ((frames,) if frames else ()) + hw
            x = torch.zeros(shape, device=param.device if param is not None else 'cpu')
            analysis = FlopCountAnalysis(model, x).set_op_handle(
                'aten::scaled_dot_product_attention', _sdpa_macs)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        model.train(was_training)


def read_json_text(path: Optional[str | Path], resource: Tuple[str, str], missing_path: str,
                   missing_resource: str) -> Tuple[str, str]:
    """``(where, text)`` of the JSON file at ``path``, else of the package data ``resource``
    (``(package, name)``); the messages (``{path}`` / ``{resource}`` filled in) name what is missing."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(missing_path.format(path=path))
        return str(path), path.read_text()
    package, name = resource
    found = resources.files(package).joinpath(name)
    if not found.is_file():
        raise FileNotFoundError(missing_resource.format(resource=f'{package}/{name}'))
    return f'{package}/{name}', found.read_text()


def paper_targets(path: Optional[str | Path] = None) -> Dict[str, Any]:
    """The paper's figures: ``path`` if given, else the copy shipped in the package
    (``emov2/data/paper_targets.json``, read with :mod:`importlib.resources`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that is not JSON.
    """
    where, text = read_json_text(path, PAPER_TARGETS_RESOURCE, 'paper targets not found at {path}',
                                 'paper targets not found in the installed package ({resource}); '
                                 'reinstall emov2 or pass --targets PATH')
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'{where} is not valid JSON: {exc}') from exc

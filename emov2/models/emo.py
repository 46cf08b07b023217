"""EMOv2 (i2RMB) and EMO (iRMB): efficient mobile backbones built from one block.

Paper: "EMOv2: Pushing 5M Vision Model Frontier" (arXiv 2412.06674) and "Rethinking Mobile Block
for Efficient Attention-based Models" (ICCV 2023). The block (i2RMB, :mod:`emov2.layers.block`)
is shared with every other model of the package; this file reads top-down like the spec
(``shared/spec/EMOV2_SPEC.md``): the stems, the model, the configs, timm registration, and the
filter that converts official checkpoints.

EMOv1 is the same skeleton with another stem, no LayerScale, DW kernel 3 in stages 1-2 and
"pre" attention over distant windows only, so both families share the block.
"""

import copy
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn
from timm.layers import register_notrace_function, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, \
    register_model

from ..layers import PARTITIONS, ConvNormAct, DeployOptions, ImprovedInvertedResidualMobileBlock, \
    LayerNormChannels, PointwiseMixer

__all__ = ['build_stages', 'ClassifierInterface', 'PointwiseMixer', 'ImprovedInvertedResidualMobileBlock', 'EMO', 'EMO_CONFIGS', 'checkpoint_filter_fn']

ACT_LAYERS = {'silu': nn.SiLU, 'gelu': nn.GELU}
ATTENTION_MODES = {'spanning': PARTITIONS, 'neighbour': ('neighbour',), 'distant': ('distant',), 'none': ()}
MIN_INPUT_SIZE = 32


# --- stems ----------------------------------------------------------------------------------------
def stem_v2(in_chans: int, dim: int) -> nn.Sequential:
    """EMOv2 stem: 3x3/s2 conv + BN + SiLU, 3x3 DW conv + BN + SiLU, 1x1 conv (no residual)."""
    return nn.Sequential(
        ConvNormAct(in_chans, dim, 3, stride=2, bias=True, act_layer=nn.SiLU),
        ConvNormAct(dim, dim, 3, groups=dim, act_layer=nn.SiLU),
        ConvNormAct(dim, dim, 1, norm='none'),
    )


def stem_v1(in_chans: int, dim: int) -> nn.Sequential:
    """EMOv1 stem: 3x3/s2 conv + BN, then an iRMB with no norm, ratio 1, 3x3 DW conv and SE."""
    return nn.Sequential(
        ConvNormAct(in_chans, dim, 3, stride=2, bias=True),
        ImprovedInvertedResidualMobileBlock(
            dim, dim, exp_ratio=1.0, residual=False, norm='none', mixer='identity', dw_kernel=3,
            squeeze_excite=True, layer_scale=False),
    )


@register_notrace_function
def check_input(x: Tensor, in_chans: int, min_size: int = 32) -> None:
    """Reject inputs the model cannot take, saying what it expects."""
    if x.dim() != 4:
        raise ValueError(f'expected a (B, C, H, W) tensor, got {x.dim()} dims of shape {list(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {x.shape[1]} (shape {list(x.shape)})')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f'expected an input of at least {min_size}x{min_size} px, '
                         f'got {x.shape[2]}x{x.shape[3]}')


torch.fx.wrap('check_input')


# --- the model ------------------------------------------------------------------------------------
def build_stages(
        stem_dim: int,
        depths: Sequence[int],
        embed_dims: Sequence[int],
        exp_ratios: Sequence[float],
        dim_heads: Sequence[int],
        attention: str,
        attention_stages: Sequence[int],
        drop_path_rate: float,
        stage_args: Callable[[int], Dict[str, Any]],
        on_block: Optional[Callable[[ImprovedInvertedResidualMobileBlock, int, bool], None]] = None,
) -> Tuple[nn.Sequential, List[Dict[str, Any]]]:
    """The four stages of spec section 2, shared by the image and video families: block 0 downsamples
    with ratio ``2 * exp_ratios[i]`` and no residual; stages 1-2 use BN + SiLU, stages 3-4 LayerNorm +
    GELU; blocks 1.. of ``attention_stages`` attend, the rest use the pointwise mixer; drop path grows
    linearly over all blocks. ``stage_args(i)`` adds the family's block arguments for stage ``i``;
    ``on_block(block, i, downsample)`` may adjust each block after it is built. Returns the stages
    and timm's ``feature_info``."""
    num_blocks = sum(depths)
    dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
    feature_info, stages = [], []
    dim_in, idx = stem_dim, 0
    for i in range(4):
        late = i >= 2
        blocks = []
        for j in range(depths[i]):
            downsample = j == 0
            block = ImprovedInvertedResidualMobileBlock(
                dim_in, embed_dims[i],
                exp_ratio=exp_ratios[i] * (2 if downsample else 1),
                stride=2 if downsample else 1,
                residual=not downsample,
                norm='ln' if late else 'bn',
                act_layer=nn.GELU if late else nn.SiLU,
                mixer='attention' if (not downsample and attention != 'none' and i + 1 in attention_stages)
                else 'conv',
                dim_head=dim_heads[i],
                partitions=ATTENTION_MODES[attention] or PARTITIONS,
                drop_path=dpr[idx],
                **stage_args(i),
            )
            if on_block is not None:
                on_block(block, i, downsample)
            blocks.append(block)
            dim_in = embed_dims[i]
            idx += 1
        stages.append(nn.Sequential(*blocks))
        feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
    return nn.Sequential(*stages), feature_info


class ClassifierInterface:
    """timm's classifier interface shared by the EMO families (image and video): init of the linear
    head, no weight decay on LayerScale, block groups, gradient checkpointing, head access/reset.
    Needs ``head``, ``norm``, ``num_features``, ``num_classes``, ``global_pool`` and ``grad_checkpointing``."""

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith('layer_scale.gamma')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        ref = next(self.parameters())  # device and dtype of the model (the norm may be pruned)
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)
        self.head.train(self.training)


class EMO(ClassifierInterface, nn.Module):
    """EMOv2 / EMOv1 classifier: stem, four stages of i2RMBs, LayerNorm, average pool, linear head.

    Stage ``i`` (1-4) has ``depths[i-1]`` blocks; block 0 downsamples with ratio
    ``2 * exp_ratios[i-1]``. Stages 1-2 use BN + SiLU, stages 3-4 LayerNorm + GELU; blocks 1.. of
    ``attention_stages`` mix tokens with window attention, the rest with a pointwise conv.
    """
    def __init__(
            self,
            depths: Sequence[int] = (3, 3, 9, 3),
            embed_dims: Sequence[int] = (48, 72, 160, 288),
            exp_ratios: Sequence[float] = (2.0, 3.0, 4.0, 4.0),
            dim_heads: Sequence[int] = (16, 24, 32, 32),
            stem_type: str = 'v2',
            dw_kernels: Sequence[int] = (5, 5, 5, 5),
            layer_scale: bool = True,
            attention: str = 'spanning',
            attention_stages: Sequence[int] = (3, 4),
            attention_position: str = 'post',
            dw_kernel: Optional[int] = None,
            dw_dilation: int = 1,
            dw_type: str = 'conv',
            operator_order: str = 'attention_first',
            operator_fusion: str = 'cascade',
            window_size: int = 7,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not (len(depths) == len(embed_dims) == len(exp_ratios) == len(dim_heads) == 4):
            raise ValueError('depths, embed_dims, exp_ratios and dim_heads need one entry per stage (4)')
        if attention not in ATTENTION_MODES:
            raise ValueError(f'attention must be one of {tuple(ATTENTION_MODES)}, got {attention!r}')
        if any(s not in (1, 2, 3, 4) for s in attention_stages):
            raise ValueError(f'attention_stages are stage numbers 1-4, got {tuple(attention_stages)}')
        if attention_position not in ('post', 'pre'):
            raise ValueError(f"attention_position must be 'post' or 'pre', got {attention_position!r}")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dims[-1]

        if stem_type == 'v2':
            stem_dim = embed_dims[0] // 2
            self.stem = stem_v2(in_chans, stem_dim)
        elif stem_type == 'v1':
            stem_dim = 24
            self.stem = stem_v1(in_chans, stem_dim)
        else:
            raise ValueError(f"stem_type must be 'v1' or 'v2', got {stem_type!r}")

        self.stages, self.feature_info = build_stages(
            stem_dim, depths, embed_dims, exp_ratios, dim_heads, attention, attention_stages, drop_path_rate,
            lambda i: dict(window_size=window_size, attention_position=attention_position,
                           dw_kernel=dw_kernel or dw_kernels[i], dw_dilation=dw_dilation, dw_type=dw_type,
                           operator_order=operator_order, operator_fusion=operator_fusion,
                           layer_scale=layer_scale))
        self.norm = LayerNormChannels(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs at strides 4, 8, 16, 32 (timm's API); ``norm`` applies the final norm to stage 4."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_input(x, self.in_chans)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:  # before the norm goes: the new head takes its device and dtype from it
            self.reset_classifier(0, '')
        if prune_norm:
            self.norm = nn.Identity()
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        check_input(x, self.in_chans)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def deploy_form(self, options: DeployOptions) -> nn.Module:
        """The stem's last 1x1 conv (no norm/act) and the first block's BN-folded 1x1 expansion are two
        linear maps in a row at the largest resolution: merge them into one. The stem then runs as the
        head of stage 1 (one sequence, so a micro-batched stage keeps the stem's large maps in cache);
        the deployed model has no separate stem output. Blocks and layers deploy themselves in the walk."""
        first = self.stages[0][0]
        if isinstance(first, ImprovedInvertedResidualMobileBlock):
            first.fold_norm_into_mixer()
            self._merge_stem_conv_into(first)
        stem = [m for m in self.stem if not isinstance(m, nn.Identity)]
        self.stages[0] = nn.Sequential(*stem, *self.stages[0])
        self.stem = nn.Identity()
        return self

    def _merge_stem_conv_into(self, first: ImprovedInvertedResidualMobileBlock) -> None:
        last = self.stem[-1]
        if not (isinstance(last, ConvNormAct) and isinstance(last.norm, nn.Identity) and
                isinstance(last.act, nn.Identity) and isinstance(last.conv, nn.Conv2d) and
                last.conv.kernel_size == (1, 1) and last.conv.groups == 1 and
                isinstance(first.norm, nn.Identity) and isinstance(first.mixer, PointwiseMixer)):
            return
        outer, inner = first.mixer.conv, last.conv
        merged = copy.deepcopy(outer)
        merged.in_channels = inner.in_channels
        merged.weight = nn.Parameter((outer.weight.flatten(1) @ inner.weight.flatten(1))[:, :, None, None])
        bias = outer.bias if outer.bias is not None else torch.zeros(outer.out_channels)
        if inner.bias is not None:
            bias = bias + outer.weight.flatten(1) @ inner.bias
        merged.bias = nn.Parameter(bias)
        first.mixer.conv = merged
        self.stem[-1] = nn.Identity()


# --- configs --------------------------------------------------------------------------------------
_V1 = dict(stem_type='v1', dw_kernels=(3, 3, 5, 5), layer_scale=False, attention='distant', attention_position='pre')

EMO_CONFIGS: Dict[str, Dict[str, Any]] = {
    'emov2_1m': dict(depths=(2, 2, 8, 3), embed_dims=(32, 48, 80, 180), exp_ratios=(2.0, 2.5, 3.0, 3.5),
                     dim_heads=(16, 16, 20, 20), drop_path_rate=0.04036),
    'emov2_2m': dict(depths=(3, 3, 9, 3), embed_dims=(32, 48, 120, 200), exp_ratios=(2.0, 2.5, 3.0, 3.5),
                     dim_heads=(16, 16, 20, 20), drop_path_rate=0.05),
    'emov2_5m': dict(depths=(3, 3, 9, 3), embed_dims=(48, 72, 160, 288), exp_ratios=(2.0, 3.0, 4.0, 4.0),
                     dim_heads=(16, 24, 32, 32), drop_path_rate=0.05),
    'emov2_20m': dict(depths=(3, 3, 13, 3), embed_dims=(64, 128, 320, 448), exp_ratios=(2.0, 3.0, 4.0, 4.0),
                      dim_heads=(16, 32, 32, 32), drop_path_rate=0.1),
    'emov2_50m': dict(depths=(5, 8, 20, 7), embed_dims=(64, 128, 384, 512), exp_ratios=(2.0, 3.0, 4.0, 4.0),
                      dim_heads=(16, 32, 32, 32), drop_path_rate=0.2),
    'emov1_1m': dict(depths=(2, 2, 8, 3), embed_dims=(32, 48, 80, 168), exp_ratios=(2.0, 2.5, 3.0, 3.5),
                     dim_heads=(16, 16, 20, 21), drop_path_rate=0.04036, **_V1),
    'emov1_2m': dict(depths=(3, 3, 9, 3), embed_dims=(32, 48, 120, 200), exp_ratios=(2.0, 2.5, 3.0, 3.5),
                     dim_heads=(16, 16, 20, 20), drop_path_rate=0.05, **_V1),
    'emov1_5m': dict(depths=(3, 3, 9, 3), embed_dims=(48, 72, 160, 288), exp_ratios=(2.0, 3.0, 4.0, 4.0),
                     dim_heads=(24, 24, 32, 32), drop_path_rate=0.05, **_V1),
    'emov1_6m': dict(depths=(3, 3, 9, 3), embed_dims=(48, 72, 160, 320), exp_ratios=(2.0, 3.0, 4.0, 5.0),
                     dim_heads=(16, 24, 20, 32), drop_path_rate=0.05, **_V1),
}


# --- official checkpoint conversion ---------------------------------------------------------------
_BLOCK_RENAMES = [
    (r'^norm\.norm\.', 'norm.'),
    (r'^eops\.0\.net\.conv\.', 'mixer.conv.'),
    (r'^eops\.0\.qk\.conv\.', 'mixer.qk.'),
    (r'^eops\.0\.v\.conv\.', 'mixer.v.'),
    (r'^qk\.conv\.', 'mixer.qk.'),
    (r'^conv_local\.', 'dw.'),
    (r'^se\.conv_reduce\.', 'se.fc1.'),
    (r'^se\.conv_expand\.', 'se.fc2.'),
    (r'^proj\.conv\.', 'proj.'),
    (r'^ls\.gamma$', 'layer_scale.gamma'),
]


def is_official_state_dict(state_dict: Dict[str, Tensor]) -> bool:
    return any(k.startswith('stage0.') for k in state_dict)


def _convert_official_key(key: str, has_attention: Dict[str, bool]) -> str:
    if key.startswith('norm.norm.'):
        return 'norm.' + key[len('norm.norm.'):]
    if key.startswith('head.'):
        return key
    m = re.match(r'^stage0\.0\.convs\.0\.([01])\.(.+)$', key)  # EMOv1 stem conv + BN
    if m:
        return f"stem.0.{'conv' if m.group(1) == '0' else 'norm'}.{m.group(2)}"
    m = re.match(r'^stage0\.(\d+)\.(.+)$', key)
    if m:
        prefix, rest = f'stem.{m.group(1)}.', m.group(2)
    else:
        m = re.match(r'^stage(\d)\.(\d+)\.(.+)$', key)
        if not m:
            return key
        prefix, rest = f'stages.{int(m.group(1)) - 1}.{m.group(2)}.', m.group(3)
    if rest.startswith('v.conv.'):  # EMOv1 names both the value and the plain expansion conv "v"
        rest = ('mixer.v.' if has_attention.get(prefix, False) else 'mixer.conv.') + rest[len('v.conv.'):]
    for pattern, repl in _BLOCK_RENAMES:
        rest = re.sub(pattern, repl, rest)
    return prefix + rest


def convert_official_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Official EMO/EMOv2 keys -> this module's names (LayerScale ``[1, C, 1, 1]`` -> ``[C]``)."""
    has_attention: Dict[str, bool] = {}
    for k in state_dict:
        m = re.match(r'^stage(\d)\.(\d+)\.(?:eops\.0\.)?qk\.', k)
        if m:
            has_attention[f'stages.{int(m.group(1)) - 1}.{m.group(2)}.'] = True
    out = {}
    for k, v in state_dict.items():
        new_key = _convert_official_key(k, has_attention)
        out[new_key] = v.flatten() if new_key.endswith('layer_scale.gamma') else v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """timm's pretrained filter: unwraps official ``net``/``net_E`` dicts and converts their keys."""
    for key in ('net', 'state_dict', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items() if isinstance(v, Tensor)}
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    return state_dict


# --- timm registration ----------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(
        url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv='stem.0.conv', classifier='head', min_input_size=(3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        license='apache-2.0', paper_ids='arXiv:2412.06674', **kwargs)


default_cfgs = generate_default_cfgs({f'{name}.in1k': _cfg() for name in EMO_CONFIGS})


def _create_emo(variant: str, pretrained: bool = False, **kwargs: Any) -> EMO:
    model_args = dict(EMO_CONFIGS[variant])
    model_args.update({k: v for k, v in kwargs.items() if v is not None})
    out_indices = model_args.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        EMO, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **model_args,
    )


@register_model
def emov2_1m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov2_1m', pretrained, **kwargs)


@register_model
def emov2_2m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov2_2m', pretrained, **kwargs)


@register_model
def emov2_5m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov2_5m', pretrained, **kwargs)


@register_model
def emov2_20m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov2_20m', pretrained, **kwargs)


@register_model
def emov2_50m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov2_50m', pretrained, **kwargs)


@register_model
def emov1_1m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov1_1m', pretrained, **kwargs)


@register_model
def emov1_2m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov1_2m', pretrained, **kwargs)


@register_model
def emov1_5m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov1_5m', pretrained, **kwargs)


@register_model
def emov1_6m(pretrained: bool = False, **kwargs: Any) -> EMO:
    return _create_emo('emov1_6m', pretrained, **kwargs)

"""DiT baselines and D-EMO (DiT with i2RMBs) for class-conditional diffusion (EMOv2 Table XIV).

DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023) written here from
its description and reference code: a Conv2d patch embedding of the ``C x H x W`` latent (patch
``p``) plus a fixed 2D sin-cos positional embedding; a timestep embedder (sinusoidal frequencies
-> MLP) and a label embedder with one extra "null" class used for classifier-free guidance
(labels are dropped to it with probability ``class_dropout_prob`` in training); ``depth`` blocks
conditioned on ``c = t_emb + y_emb`` with adaLN-Zero; a final adaLN layer (LayerNorm modulated by
``c``, then a linear to ``p * p * out_channels``, zero-initialised) and unpatchify. With
``learn_sigma`` the output has ``2 * in_channels`` channels (noise and the variance
interpolation), as in DiT.

D-EMO replaces each Transformer block by ONE conditioned i2RMB of :mod:`emov2.layers.block`
(the shared block, built with ``cond_dim = hidden_size``) on the token map ``hidden x H/p x W/p``
(``spatial_dims=2``). The reading chosen (it meets the paper's params and FLOPs, see
``docs/GENERATION.md`` and ``tests/test_dit.py``):

* one i2RMB per DiT block, no extra MLP: LayerNorm (modulated by shift/scale of ``c``) ->
  spanning window attention whose value projection is the expansion MLP_e with ratio 4 (as DiT's
  MLP ratio) -> 5x5 depthwise conv (with its inner skip) -> 1x1 projection gated by ``c``
  (adaLN-Zero, zero-initialised, so every block starts as the identity);
* ``dim_head = hidden / num_heads`` of DiT (64), GELU (tanh) activations as DiT's MLP;
* window 8 on the 16x16 token map of a 32x32 latent (2x2 neighbour windows plus the 2x2 distant
  strided windows; both partitions, "spanning" attention), DiT's depths and widths unchanged.

This gives 13 D^2 weights per block (Q/K 2 D^2, V 4 D^2, proj 4 D^2, modulation 3 D^2) against
DiT's 18 D^2 (attention 4, MLP 8, modulation 6), i.e. the paper's ~26% fewer parameters.

``forward(x, t=None, y=None)``: ``t`` defaults to step 0 and ``y`` to the null class, so
``count_flops(model, 32, in_chans=4)`` counts one conditioned forward pass.
"""
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from timm.layers import Mlp
from timm.models import register_model
from timm.models.vision_transformer import Attention

from ..layers import ImprovedInvertedResidualMobileBlock, Modulation

__all__ = ['DiT', 'DIT_CONFIGS', 'TimestepEmbedder', 'LabelEmbedder', 'DiTBlock', 'FinalLayer',
           'get_2d_sincos_pos_embed', 'D_EMO_DEFAULTS']

# DiT sizes: depth, hidden size, heads (patch 2 for every registered name)
DIT_CONFIGS: Dict[str, Dict[str, int]] = {
    's': dict(depth=12, hidden_size=384, num_heads=6),
    'b': dict(depth=12, hidden_size=768, num_heads=12),
    'l': dict(depth=24, hidden_size=1024, num_heads=16),
    'xl': dict(depth=28, hidden_size=1152, num_heads=16),
}
# the i2RMB reading of "i2RMB in place of the DiT block" (see the module docstring)
D_EMO_DEFAULTS: Dict[str, Any] = dict(exp_ratio=4.0, window_size=8, dw_kernel=5)


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate='tanh')


# --- positional embedding -------------------------------------------------------------------------
def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: Optional[int] = None) -> np.ndarray:
    """``(grid_h * grid_w, embed_dim)`` fixed 2D sin-cos embedding, row-major, as DiT/MAE build it
    (the first half of the channels encodes the column ``w``, the second the row ``h``)."""
    grid_w = grid_h if grid_w is None else grid_w
    if embed_dim % 4:
        raise ValueError(f'the sin-cos embedding needs a hidden size divisible by 4, got {embed_dim}')
    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    return np.concatenate([_sincos_1d(embed_dim // 2, gw), _sincos_1d(embed_dim // 2, gh)], axis=1)


# --- conditioning embedders -----------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Scalar (possibly fractional) timesteps -> ``hidden_size`` vectors: 256 sinusoidal
    frequencies (cos then sin, max period 10000), Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; with ``dropout_prob > 0`` a null class ``num_classes`` exists and
    labels are replaced by it with that probability in training (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def null_class(self) -> int:
        if not self.has_null:
            raise ValueError('this label embedder has no null class (class_dropout_prob is 0)')
        return self.num_classes

    def token_drop(self, labels: Tensor, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        if (train and self.has_null) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """``p x p`` / stride ``p`` Conv2d patchify to a ``(B, D, H/p, W/p)`` token map (DiT's key names)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


# --- blocks -----------------------------------------------------------------------------------------
class DiTBlock(nn.Module):
    """DiT's Transformer block with adaLN-Zero on ``(B, T, D)`` tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_gelu_tanh, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=2)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then Linear to ``p * p * out_channels`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


# --- the model --------------------------------------------------------------------------------------
class DiT(nn.Module):
    """DiT (``block='dit'``) or D-EMO (``block='i2rmb'``) noise predictor ``eps(x_t, t, y)``.

    ``block_args`` are passed to the i2RMB (defaults :data:`D_EMO_DEFAULTS`; ``dim_head`` defaults
    to ``hidden_size // num_heads``). Inputs may be any size divisible by the patch (the sin-cos
    embedding is built for the grid of each input).
    """

    def __init__(
            self,
            input_size: int = 32,
            patch_size: int = 2,
            in_channels: int = 4,
            hidden_size: int = 1152,
            depth: int = 28,
            num_heads: int = 16,
            mlp_ratio: float = 4.0,
            class_dropout_prob: float = 0.1,
            num_classes: int = 1000,
            learn_sigma: bool = True,
            block: str = 'dit',
            block_args: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if block not in ('dit', 'i2rmb'):
            raise ValueError(f"block must be 'dit' or 'i2rmb', got {block!r}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.num_heads, self.num_classes = hidden_size, num_heads, num_classes
        self.block_type = block

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        # fixed (not trained) but a parameter, as in DiT: its checkpoints hold it and the paper counts it
        self.pos_embed = nn.Parameter(self._pos_embed(grid, grid), requires_grad=False)
        if block == 'dit':
            self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        else:
            args = dict(D_EMO_DEFAULTS, dim_head=hidden_size // num_heads)
            args.update(block_args or {})
            self.block_args = args
            self.blocks = nn.ModuleList([
                ImprovedInvertedResidualMobileBlock(
                    hidden_size, hidden_size, norm='ln', act_layer=_gelu_tanh, mixer='attention',
                    layer_scale=False, spatial_dims=2, cond_dim=hidden_size, **args)
                for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def _pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        return torch.from_numpy(get_2d_sincos_pos_embed(self.hidden_size, grid_h, grid_w)).float().unsqueeze(0)

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform Linears (bias 0), the patch embedding like a Linear,
        N(0, 0.02) label table and timestep MLP, zero adaLN modulations and a zero final layer.
        The i2RMB convs keep the shared block's own initialisation; their modulation is zero."""
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            if isinstance(blk, DiTBlock):
                nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for m in self.modules():
            if isinstance(m, Modulation):
                m.reset_parameters()
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        """``(B, h*w, p*p*C)`` -> ``(B, C, h*p, w*p)``."""
        h, w = grid
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed_condition(self, t: Tensor, y: Tensor, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        """``c = t_emb + y_emb`` (labels dropped to the null class in training / where forced)."""
        return self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)

    def forward(self, x: Tensor, t: Optional[Tensor] = None, y: Optional[Tensor] = None,
                force_drop_ids: Optional[Tensor] = None) -> Tensor:
        """``x``: (B, C, H, W); ``t``: (B,) timesteps (default 0); ``y``: (B,) labels (default the
        null class, or class 0 without one). Returns (B, out_channels, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'expected a (B, {self.in_channels}, H, W) input, got shape {list(x.shape)}')
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f'input size {list(x.shape[2:])} is not a multiple of the patch {self.patch_size}')
        b = x.shape[0]
        if t is None:
            t = torch.zeros(b, device=x.device)
        if y is None:
            y = torch.full((b,), self.num_classes if self.y_embedder.has_null else 0, dtype=torch.long,
                           device=x.device)
        c = self.embed_condition(t, y, force_drop_ids)
        x = self.x_embedder(x)  # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        pos = self.pos_embed.detach()
        if pos.shape[1] != grid[0] * grid[1]:
            pos = self._pos_embed(*grid)
        pos = pos.to(device=x.device, dtype=x.dtype)
        if self.block_type == 'dit':
            x = x.flatten(2).transpose(1, 2) + pos  # (B, T, D)
            for blk in self.blocks:
                x = blk(x, c)
        else:
            x = x + pos.transpose(1, 2).reshape(1, -1, grid[0], grid[1])
            for blk in self.blocks:
                x = blk(x, c)
            x = x.flatten(2).transpose(1, 2)
        x = self.final_layer(x, c)
        return self.unpatchify(x, grid)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance: one batch of conditional and null-class passes; the noise
        channels become ``uncond + s * (cond - uncond)`` (all of them, the standard form), the
        learned-variance channels are the conditional ones. ``cfg_scale`` 1 is the conditional output."""
        null = torch.full_like(y, self.y_embedder.null_class)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        eps_c, rest = cond[:, :self.in_channels], cond[:, self.in_channels:]
        eps_u = uncond[:, :self.in_channels]
        return torch.cat([eps_u + cfg_scale * (eps_c - eps_u), rest], dim=1)


# --- timm registration ------------------------------------------------------------------------------
def _create(size: str, block: str, pretrained: bool = False, **kwargs: Any) -> DiT:
    if pretrained:
        raise ValueError('no pretrained DiT / D-EMO weights are shipped; load a checkpoint instead')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    args = dict(DIT_CONFIGS[size], patch_size=2, block=block)
    args.update(kwargs)
    return DiT(**args)


@register_model
def dit_s_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('s', 'dit', pretrained, **kwargs)


@register_model
def dit_b_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('b', 'dit', pretrained, **kwargs)


@register_model
def dit_l_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('l', 'dit', pretrained, **kwargs)


@register_model
def dit_xl_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('xl', 'dit', pretrained, **kwargs)


@register_model
def d_emov2_s_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('s', 'i2rmb', pretrained, **kwargs)


@register_model
def d_emov2_b_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('b', 'i2rmb', pretrained, **kwargs)


@register_model
def d_emov2_l_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('l', 'i2rmb', pretrained, **kwargs)


@register_model
def d_emov2_xl_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    return _create('xl', 'i2rmb', pretrained, **kwargs)

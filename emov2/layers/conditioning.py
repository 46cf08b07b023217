"""Conditioning of a block on a vector ``c`` (time step, class, text embedding): adaLN-Zero.

As in DiT (Peebles & Xie, 2023): ``c`` gives a shift and a scale for the block's norm and a
per-channel gate on its residual branch. The projection starts at zero, so a conditioned
residual block starts as the identity.
"""
from typing import Optional, Tuple

from torch import Tensor, nn

__all__ = ['Modulation', 'modulate']


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with per-sample, per-channel ``shift``/``scale`` broadcast over space."""
    return x * (1 + scale) + shift


class Modulation(nn.Module):
    """``c`` (B, cond_dim) -> shift, scale (B, dim, 1..) for the norm and gate (B, dim_out, 1..).

    SiLU then one Linear, zero-initialised (adaLN-Zero).
    """

    def __init__(self, cond_dim: int, dim: int, dim_out: Optional[int] = None) -> None:
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out or dim
        self.act = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 2 * dim + self.dim_out)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor, spatial_dims: int) -> Tuple[Tensor, Tensor, Tensor]:
        if c.dim() != 2:
            raise ValueError(f'expected a (B, cond_dim) conditioning tensor, got shape {list(c.shape)}')
        shift, scale, gate = self.linear(self.act(c)).split([self.dim, self.dim, self.dim_out], dim=1)
        view = [c.shape[0], -1] + [1] * spatial_dims
        return shift.reshape(view), scale.reshape(view), gate.reshape(view)

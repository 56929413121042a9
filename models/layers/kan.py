"""FasterKAN: Kolmogorov-Arnold layers with reflectional-switch radial basis features.

A FasterKAN layer (Delis 2024, used by MedViT-V2's Global Feature Perception block) maps
x -> LayerNorm -> phi_g(x) = 1 - tanh((x - g) / h)^2 for every grid point g (a smooth bump
around g, width h) -> a bias-free linear map over in_features * num_grids basis values.
The grid is fixed (a buffer, saved in checkpoints so old files load); only the LayerNorm and
the spline weights learn. Shapes: (..., in_features) -> (..., out_features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FasterKANConfig:
    """Basis settings shared by every layer; defaults are FasterKAN's (grid -2..2, 8 points, h=0.33)."""

    grid_min: float = -2.0
    grid_max: float = 2.0
    num_grids: int = 8
    denominator: float = 0.33


class ReflectionalSwitchBasis(nn.Module):
    """Return 1 - tanh((x - g) / h)^2 for each fixed grid point g: (...,) -> (..., num_grids)."""

    def __init__(self, config: FasterKANConfig):
        super().__init__()
        self.register_buffer("grid", torch.linspace(config.grid_min, config.grid_max, config.num_grids))
        self.inv_denominator = 1.0 / config.denominator

    def forward(self, x: Tensor) -> Tensor:
        """Basis values in [0, 1], one per grid point, appended as a last axis."""
        return 1.0 - torch.tanh((x.unsqueeze(-1) - self.grid) * self.inv_denominator).square()


class FasterKANLayer(nn.Module):
    """LayerNorm -> radial basis per feature -> bias-free linear map to `out_features`."""

    def __init__(self, in_features: int, out_features: int, config: FasterKANConfig = FasterKANConfig()):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.basis = ReflectionalSwitchBasis(config)
        self.spline = nn.Linear(in_features * config.num_grids, out_features, bias=False)
        nn.init.xavier_uniform_(self.spline.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        return self.spline(self.basis(self.norm(x)).flatten(-2))


class FasterKAN(nn.Module):
    """A stack of FasterKAN layers with widths `widths` (e.g. [C, 2C, C])."""

    def __init__(self, widths: list[int], config: FasterKANConfig = FasterKANConfig()):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"FasterKAN needs at least an input and an output width, got {widths}")
        self.layers = nn.ModuleList(FasterKANLayer(i, o, config) for i, o in zip(widths[:-1], widths[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """(..., widths[0]) -> (..., widths[-1])."""
        for layer in self.layers:
            x = layer(x)
        return x

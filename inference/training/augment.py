"""Batched data augmentation in torch (one affine grid-sample per batch: cheap on a CPU).

The random draws come from a CPU generator whatever device the photos are on, so a run's augmentations
(and a resumed run's) are the same on a CPU and on a GPU up to floating-point rounding.

Random resized crop, rotation, flips and colour jitter. Dermoscopy has no "up", so it gets any
rotation; clinical photos keep roughly upright (faces, hands) with +-20 degrees.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLINICAL_MAX_ROTATION = math.radians(20)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def augment(
    images: torch.Tensor,
    image_type: torch.Tensor,
    gen: torch.Generator,
    *,
    min_area: float = 0.55,
    colour: float = 0.2,
) -> torch.Tensor:
    """B x H x W x 3 uint8 + image types (0 dermoscopic, 1 clinical) -> augmented B x 3 x H x W in [0, 1]."""
    x = to_float(images)
    b = x.shape[0]
    clinical = image_type.cpu().bool()
    angle = _uniform(b, -math.pi, math.pi, gen)
    angle = torch.where(clinical, angle * (CLINICAL_MAX_ROTATION / math.pi), angle)
    side = _uniform(b, min_area, 1.0, gen).sqrt()
    log_ar = _uniform(b, math.log(3 / 4), math.log(4 / 3), gen)
    sx = (side * (log_ar / 2).exp()).clamp(max=1.0)
    sy = (side * (-log_ar / 2).exp()).clamp(max=1.0)
    fx = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    tx = _uniform(b, -1, 1, gen) * (1 - sx)
    ty = _uniform(b, -1, 1, gen) * (1 - sy)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [
            torch.stack([cos * sx * fx, -sin * sy * fy, tx], dim=1),
            torch.stack([sin * sx * fx, cos * sy * fy, ty], dim=1),
        ],
        dim=1,
    ).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # colour jitter: brightness, contrast, saturation (per image)
    bright, contrast, sat = (_uniform(b, 1 - colour, 1 + colour, gen).view(b, 1, 1, 1).to(x.device)
                             for _ in range(3))
    x = x * bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * sat + gray
    return x.clamp_(0.0, 1.0)

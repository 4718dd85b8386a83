"""The project's own skin-lesion classifier architecture (trained in ``inference/training``).

A compact from-scratch ResNet-style CNN. It is deliberately small (about 2.8 M parameters at the
default width) so it trains on a single GPU in minutes and runs on CPU workers in milliseconds.
The image type (dermoscopic vs clinical photo) is embedded and added to the pooled features,
because the two acquisition modes look very different for the same condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from inference.engines.base import JsonConfig

IMAGE_TYPES: dict[str, int] = {"dermoscopic": 0, "clinical": 1}
WEIGHTS_NAME = "model.safetensors"
DIHEDRAL_VIEWS = (1, 2, 4, 8)


@dataclass
class ClassifierConfig(JsonConfig):
    num_classes: int
    class_codes: list[str]
    image_size: int = 96
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    temperature: float = 1.0  # fitted after training (temperature scaling) for calibrated probabilities
    width: int = 32
    num_image_types: int = 2
    model_id: str = "skinbridge-classifier"
    model_version: str = "0"
    # validated operating points: P(code) at or above this flags the case (e.g. melanoma at the
    # threshold chosen for >= 90 % sensitivity on validation data); triage reads the flag.
    # ``thresholds`` holds for every photo type; ``operating_points`` per photo type
    # ({"dermoscopic": {"melanoma": p, "any_malignant": p}, ...}) takes precedence for its type, and
    # "any_malignant" compares the summed probability of ``malignant_codes``
    thresholds: dict[str, float] = field(default_factory=dict)
    operating_points: dict[str, dict[str, float]] = field(default_factory=dict)
    malignant_codes: list[str] = field(default_factory=list)
    # test-time augmentation: logits averaged over this many dihedral views (1, 2, 4 or 8), the same
    # number in training-time calibration, evaluation and serving, so the fitted numbers stay valid
    tta_views: int = 1
    cam_stage: int = -1  # the stage Grad-CAM reads: -1 the last (coarsest), -2 the one before (twice as fine)
    # more than 1: an ensemble of that many nets of this shape, trained separately, their logits averaged
    # (weights stored as ``members.<i>.<name>``)
    members: int = 1

    def __post_init__(self) -> None:
        if len(self.class_codes) != self.num_classes:
            raise ValueError(f"{len(self.class_codes)} class codes for {self.num_classes} classes")
        if self.tta_views not in DIHEDRAL_VIEWS:
            raise ValueError(f"tta_views must be one of {DIHEDRAL_VIEWS}, not {self.tta_views}")
        if self.members < 1:
            raise ValueError(f"members must be at least 1, not {self.members}")


class _Block(nn.Module):
    """Pre-activation-free basic residual block: conv-BN-SiLU-conv-BN + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.SiLU(inplace=False)  # not in-place: Grad-CAM hooks need intact activations
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class SkinClassifierNet(nn.Module):
    """(images BCHW normalised, image_type LongTensor B) -> logits B x num_classes."""

    def __init__(self, num_classes: int, num_image_types: int = 2, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.SiLU())
        # four stages, channels w, 2w, 4w, 8w; 96 px input -> 6x6 feature map at the last stage
        self.stages = nn.Sequential(
            nn.Sequential(_Block(w, w, 1), _Block(w, w, 1)),
            nn.Sequential(_Block(w, 2 * w, 2), _Block(2 * w, 2 * w, 1)),
            nn.Sequential(_Block(2 * w, 4 * w, 2), _Block(4 * w, 4 * w, 1)),
            nn.Sequential(_Block(4 * w, 8 * w, 2), _Block(8 * w, 8 * w, 1)),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.type_embedding = nn.Embedding(num_image_types, 8 * w)
        # small init: the image type starts as a gentle offset instead of swamping the image features
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8 * w, num_classes)

    def target_layers(self, stage: int = -1) -> list[nn.Module]:
        """The last block of ``stage``: the layer Grad-CAM reads activations and gradients from."""
        return [self.stages[stage][-1]]

    def forward(self, images: torch.Tensor, image_type: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images))
        features = self.pool(x).flatten(1) + self.type_embedding(image_type)
        return self.head(self.dropout(features))


class SkinClassifierEnsemble(nn.Module):
    """Nets of one shape trained separately (other seeds); the logits are averaged.

    Separately trained nets make partly different mistakes, so their average is more accurate and better
    calibrated than each of them (Lakshminarayanan et al. 2017), at the cost of one forward pass each.
    """

    def __init__(self, members: list[SkinClassifierNet]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def target_layers(self, stage: int = -1) -> list[nn.Module]:
        """Every member's Grad-CAM layer: the map of the averaged logit sums the members' maps."""
        return [layer for member in self.members for layer in member.target_layers(stage)]

    def forward(self, images: torch.Tensor, image_type: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images, image_type) for member in self.members]).mean(0)


def build_classifier(config: ClassifierConfig) -> SkinClassifierNet | SkinClassifierEnsemble:
    """The untrained network a classifier folder's config describes (weights are loaded by the caller)."""
    def net() -> SkinClassifierNet:
        return SkinClassifierNet(config.num_classes, config.num_image_types, config.width)

    return net() if config.members == 1 else SkinClassifierEnsemble([net() for _ in range(config.members)])


ANY_MALIGNANT = "any_malignant"  # the operating point on the summed probability of ``malignant_codes``


def point_members(key: str, class_codes: list[str], malignant_codes: list[str]) -> list[str]:
    """The codes whose probabilities an operating point sums: every malignant code the net knows for
    "any_malignant", else the point's own code; empty when the net does not know them."""
    members = [c for c in malignant_codes if c in class_codes] if key == ANY_MALIGNANT else [key]
    return members if members and all(m in class_codes for m in members) else []


def dihedral_view(images: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0..7) of a BCHW batch: transposed for k >= 4, then one of four flips."""
    x = images.transpose(2, 3) if k >= 4 else images
    dims = [(), (3,), (2,), (2, 3)][k % 4]
    return x.flip(dims) if dims else x


def undo_dihedral_view(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Map a BCHW tensor seen in view ``k`` back to the original orientation (flip, then transpose)."""
    dims = [(), (3,), (2,), (2, 3)][k % 4]
    x = maps.flip(dims) if dims else maps
    return x.transpose(2, 3) if k >= 4 else x


def dihedral_logits(model: nn.Module, images: torch.Tensor, image_type: torch.Tensor, views: int = 1) -> torch.Tensor:
    """Logits averaged over the first ``views`` of the 8 flips/rotations of the BCHW batch.

    A skin photo has no canonical orientation, so every view is an equally valid input; averaging
    them removes some of the net's orientation noise (about +1 point DermaMNIST ACC measured).
    """
    if views not in DIHEDRAL_VIEWS:
        raise ValueError(f"views must be one of {DIHEDRAL_VIEWS}, not {views}")
    total = None
    for k in range(views):
        logits = model(dihedral_view(images, k), image_type)
        total = logits if total is None else total + logits
    assert total is not None
    return total / views


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""Is a photo dermoscopic or an ordinary (clinical) photo? The classifier's operating points differ by
photo type, and patients do not say which they send.

A small neural network (one hidden layer of 32) over a handful of image statistics that describe how a
dermatoscope photo looks: a lit, magnified field with a dark vignette or a black border in the corners, even lighting,
little background. It is stored as ``photo_type.json`` beside the classifier (trained by
``skinbridge train photo-type`` on the lesion/series-grouped training photos). The lower-left corner
is left out of every statistic: most DermNet photos carry a watermark there, which a model would
otherwise learn instead of the photo type. Unknown or uncertain photos count as clinical: the
classifier's clinical operating points flag more, so a doubt costs a review, never a missed flag.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from inference.engines.imaging import square_crop

FILE_NAME = "photo_type.json"
SIZE = 64  # statistics are taken on a 64 x 64 centre crop
CACHE_SIZE = 96  # ... of the 96 px square the training photos were cached at
FEATURES = (
    "corner_luma", "corner_dark_share", "ring_luma", "ring_luma_std", "centre_luma", "centre_luma_std",
    "corner_over_centre", "ring_over_centre", "ring_saturation", "centre_saturation", "ring_red_over_green",
    "centre_red_over_green", "centre_edges", "ring_edges", "luma_gradient_lr", "luma_gradient_tb",
)


def features(image: Image.Image | np.ndarray) -> np.ndarray:
    """The statistics in FEATURES of one photo (a PIL image, or an already square H x W x 3 uint8 array)."""
    # a photo is first brought to the view of the classifier's 96 px training cache, which the model learnt from
    square = image if isinstance(image, np.ndarray) else np.asarray(square_crop(image, CACHE_SIZE))
    arr = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.Resampling.BILINEAR),
                     dtype=np.float32) / 255.0
    luma = arr @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    sat = arr.max(-1) - arr.min(-1)
    n, c, k = SIZE, SIZE // 8, SIZE // 3  # corner patch side, ring width
    yy, xx = np.mgrid[0:n, 0:n]
    watermark = (yy >= n - k) & (xx < k)  # lower-left: DermNet's watermark
    ring = ((yy < c) | (yy >= n - c) | (xx < c) | (xx >= n - c)) & ~watermark
    centre = (yy >= k) & (yy < n - k) & (xx >= k) & (xx < n - k)
    corners = np.zeros((n, n), dtype=bool)
    corners[:c, :c] = corners[:c, -c:] = corners[-c:, -c:] = True  # not the lower-left one
    gy, gx = np.abs(np.diff(luma, axis=0))[:, :-1], np.abs(np.diff(luma, axis=1))[:-1, :]
    edges = np.zeros((n, n), dtype=np.float32)
    edges[:-1, :-1] = gx + gy
    eps = 1e-3
    red_green = arr[..., 0] / (arr[..., 1] + eps)
    left_half, right_half = luma[:, : n // 2][~watermark[:, : n // 2]], luma[:, n // 2 :]
    return np.asarray([
        luma[corners].mean(), (luma[corners] < 0.12).mean(), luma[ring].mean(), luma[ring].std(),
        luma[centre].mean(), luma[centre].std(),
        luma[corners].mean() / (luma[centre].mean() + eps), luma[ring].mean() / (luma[centre].mean() + eps),
        sat[ring].mean(), sat[centre].mean(), red_green[ring].mean(), red_green[centre].mean(),
        edges[centre].mean(), edges[ring].mean(),
        abs(left_half.mean() - right_half.mean()),
        abs(luma[: n // 2].mean() - luma[n // 2 :][~watermark[n // 2 :]].mean()),
    ], dtype=np.float64)


@dataclass
class PhotoTypeModel:
    """P(dermoscopic) from the standardised statistics through ``layers`` (ReLU between them, a
    sigmoid at the end); "dermoscopic" at or above ``threshold``."""

    mean: list[float]
    std: list[float]
    layers: list[dict[str, list]]  # [{"weight": in x out, "bias": out}, ...]
    threshold: float = 0.9
    features: tuple[str, ...] = FEATURES
    metrics: dict | None = None  # held-out rates per split, written by the trainer

    def probability(self, image: Image.Image | np.ndarray) -> float:
        x = (features(image) - np.asarray(self.mean)) / np.asarray(self.std)
        for k, layer in enumerate(self.layers):
            x = x @ np.asarray(layer["weight"]) + np.asarray(layer["bias"])
            if k < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return float(1.0 / (1.0 + np.exp(-float(np.ravel(x)[0]))))

    def photo_type(self, image: Image.Image | np.ndarray) -> str:
        return "dermoscopic" if self.probability(image) >= self.threshold else "clinical"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILE_NAME
        data = asdict(self)
        data["features"] = list(self.features)
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> "PhotoTypeModel | None":
        """The model beside a classifier, or None (then every photo counts as clinical)."""
        path = Path(folder) / FILE_NAME
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if tuple(data.get("features", ())) != FEATURES:
            raise ValueError(f"{path} was trained on other image statistics; retrain it "
                             "(skinbridge train photo-type)")
        data["features"] = FEATURES
        return cls(**data)

"""The one square view of a photo every model of the project sees (no torch: the photo-type model and
the training cache use it too)."""

from __future__ import annotations

from PIL import Image


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """RGB, shorter side resized to ``size`` (bicubic), centre crop to ``size`` x ``size``.

    Cropping keeps the aspect ratio: lesions are centred in dermoscopy and usually in patient photos.
    Training (``inference.training.data``), the classifier engine and the photo-type model all call this,
    so they see the same pixels (tests/test_training.py checks the engine against the training cache).
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    resized = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))

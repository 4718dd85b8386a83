"""What a dermatologist signs off before patients see an explainer's pictures, and the sheet to look at.

The sign-off itself is a clinic decision, stored and audited in the clinic database
(clinic_db.explainer_review) and given in the console (``/console/explainer``, console/app.py).
This module says what such a review is bound to, for both explainers (the project generator and a
Stable-Diffusion checkpoint with LoRAs): the conditions drawn, the weights' digest and the sampling
settings. Retraining or re-tuning therefore needs a new review, because the pictures are then no
longer the ones that were approved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.engines.base import model_sha256


@dataclass(frozen=True)
class ReviewSubject:
    """What a review covers: the classes an explainer draws, its weights and how it samples them."""

    codes: tuple[str, ...]
    weights_sha256: str
    settings: dict[str, Any]  # e.g. {"guidance_scale": 3.0, "num_inference_steps": 25}


def generator_subject(folder: str | Path) -> ReviewSubject:
    """The review subject of a project generator folder (without loading the UNet): the classes it
    draws (not the null class of guidance), its weights and the sampling settings its pictures depend on."""
    from inference.engines.generator_net import GeneratorConfig

    config = GeneratorConfig.load(folder)
    null = int(config.extra.get("null_class_index", -1))
    codes = tuple(c for i, c in enumerate(config.class_codes) if i != null)
    return ReviewSubject(codes, model_sha256(Path(folder) / "unet"), config.sampling_settings())


def review_sheet(explainer: Any, *, per_class: int = 6, seed: int = 0, lang: str = "en") -> Any:
    """What the dermatologist signs off: every class the explainer draws, ``per_class`` pictures each,
    exactly as a patient would get them (serving settings, captions), one labelled row per class, and
    a header naming the weights and settings the sign-off will be bound to. Returns a PIL image."""
    import io

    from PIL import Image, ImageDraw

    subject: ReviewSubject = explainer.review_subject
    rows = []
    for code in subject.codes:
        pngs = explainer.render(code, per_class, seed, lang)
        rows.append((code, [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]))
    w = max((img.width for _, imgs in rows for img in imgs), default=64)
    h = max((img.height for _, imgs in rows for img in imgs), default=64)
    label_w, head = 220, 44
    sheet = Image.new("RGB", (max(label_w + per_class * w, 900), head + len(rows) * h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    settings = ", ".join(f"{k} {v}" for k, v in sorted(subject.settings.items()))
    draw.text((4, 4), f"Clinical review sheet: {explainer.model_id}, weights {subject.weights_sha256[:16]}",
              fill=(0, 0, 0))
    draw.text((4, 22), f"AI-generated, drawn with the serving settings ({settings})", fill=(160, 0, 0))
    for r, (code, imgs) in enumerate(rows):
        draw.text((4, head + r * h + h // 2 - 6), code, fill=(0, 0, 0))
        for j, img in enumerate(imgs):
            sheet.paste(img, (label_w + j * w, head + r * h))
    return sheet

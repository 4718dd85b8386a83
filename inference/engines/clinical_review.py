"""A dermatologist's sign-off of an explainer's generated pictures, stored beside its weights.

The recognition bar of the project generator (the classifier naming generated pictures as their
class) is necessary but not enough: a 48 px classifier read noisy skin texture as seborrheic
keratosis. So patients see pictures of a class only after a dermatologist has looked at that
class's samples, drawn with the serving settings, and approved it. The record names the reviewer and
the date, and it is bound to what was reviewed: the weights' SHA-256 and the sampling settings
(guidance scale, steps, ...). Retraining or re-tuning voids it, because the pictures are then no
longer the ones that were approved.

The same gate covers both explainers (the project generator and a Stable-Diffusion checkpoint with
LoRAs). File: ``<model folder>/clinical_review.json``, written by ``skinbridge train
sign-off-generator`` (see docs/models.md).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.engines.base import model_sha256

log = logging.getLogger(__name__)
REVIEW_FILE = "clinical_review.json"


class ReviewError(ValueError):
    """A sign-off that cannot be recorded as asked (unknown class, contradiction, no reviewer)."""


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


@dataclass(frozen=True)
class ClinicalReview:
    reviewer: str  # name and role, e.g. "Dr. A. Example, consultant dermatologist"
    reviewed_on: str  # ISO date
    weights_sha256: str
    settings: dict[str, Any]
    approved: tuple[str, ...]
    rejected: dict[str, str] = field(default_factory=dict)  # code -> the reviewer's reason

    def voided_by(self, subject: ReviewSubject) -> str | None:
        """Why this review does not cover the explainer as it would serve now (None: it does)."""
        if subject.weights_sha256 != self.weights_sha256:
            return "the weights changed after the review"
        if subject.settings != self.settings:
            changed = sorted(k for k in set(subject.settings) | set(self.settings)
                             if subject.settings.get(k) != self.settings.get(k))
            return "the sampling settings changed after the review: " + ", ".join(
                f"{k} {self.settings.get(k)} -> {subject.settings.get(k)}" for k in changed)
        return None

    def to_json(self) -> str:
        data = asdict(self)
        data["approved"] = list(self.approved)
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def load_review(folder: str | Path) -> ClinicalReview | None:
    path = Path(folder) / REVIEW_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ClinicalReview(
            reviewer=str(data["reviewer"]), reviewed_on=str(data["reviewed_on"]),
            weights_sha256=str(data["weights_sha256"]), settings=dict(data["settings"]),
            approved=tuple(str(c) for c in data.get("approved", ())), rejected=dict(data.get("rejected", {})),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ReviewError(f"{path} is not a readable clinical review: {exc!r}") from exc


def approved_classes(folder: str | Path, subject: ReviewSubject) -> set[str]:
    """Classes a valid review of this explainer approved; none without a review or with a void one."""
    try:
        review = load_review(folder)
    except ReviewError as exc:  # a damaged file must not stop the worker's assessments, nor pass as approval
        log.error("%s: no pictures are shown to patients", exc)
        return set()
    if review is None:
        log.info("explainer %s has no clinical review: no pictures are shown to patients", folder)
        return set()
    reason = review.voided_by(subject)
    if reason:
        log.warning("clinical review of explainer %s is void (%s): no pictures are shown to patients",
                    folder, reason)
        return set()
    return set(review.approved) & set(subject.codes)


def record_review(folder: str | Path, subject: ReviewSubject, *, reviewer: str, approve: list[str],
                  reject: dict[str, str], today: dt.date | None = None) -> ClinicalReview:
    """Record a dermatologist's decisions on an explainer's classes, bound to its current weights and
    sampling settings. Classes not named keep no approval; a later review replaces this one."""
    if not reviewer.strip():
        raise ReviewError("name the reviewing dermatologist")
    if not approve and not reject:
        raise ReviewError("approve or reject at least one class")
    unknown = sorted((set(approve) | set(reject)) - set(subject.codes))
    if unknown:
        raise ReviewError(f"the generator does not draw {', '.join(unknown)}; it draws: {', '.join(subject.codes)}")
    both = sorted(set(approve) & set(reject))
    if both:
        raise ReviewError(f"both approved and rejected: {', '.join(both)}")
    review = ClinicalReview(
        reviewer=reviewer.strip(), reviewed_on=(today or dt.date.today()).isoformat(),
        weights_sha256=subject.weights_sha256, settings=dict(subject.settings),
        approved=tuple(sorted(set(approve))), rejected=dict(sorted(reject.items())),
    )
    folder = Path(folder)
    tmp = folder / (REVIEW_FILE + ".tmp")
    tmp.write_text(review.to_json(), encoding="utf-8")
    os.replace(tmp, folder / REVIEW_FILE)  # a crash leaves the old review or the new one, never half
    return review


def review_status(folder: str | Path) -> tuple[ClinicalReview | None, str | None]:
    """A project generator folder's review and, if it no longer covers the generator, why (model cards)."""
    review = load_review(folder)
    if review is None:
        return None, None
    return review, review.voided_by(generator_subject(folder))


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

"""A dermatologist's sign-off of the generator's pictures, stored beside its weights.

The recognition bar (the classifier naming generated pictures as their class) is necessary but not
enough: a 48 px classifier read noisy skin texture as seborrheic keratosis. So patients see pictures
of a class only after a dermatologist has looked at that class's samples, drawn with the serving
settings, and approved it. The record names the reviewer and the date, and it is bound to what was
reviewed: the weights' SHA-256, the guidance scale and the DDIM steps. Retraining or changing the
sampling settings voids it, because the pictures are then no longer the ones that were approved.

File: ``<generator folder>/clinical_review.json``, written by
``skinbridge train sign-off-generator`` (see docs/models.md).
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


def sampling_settings(config: Any) -> tuple[float, int]:
    """(guidance scale, DDIM steps) a generator config serves with: what a review is bound to."""
    return float(config.extra.get("guidance_scale", 0.0) or 0.0), int(config.num_inference_steps)


@dataclass(frozen=True)
class ClinicalReview:
    reviewer: str  # name and role, e.g. "Dr. A. Example, consultant dermatologist"
    reviewed_on: str  # ISO date
    weights_sha256: str
    guidance_scale: float
    num_inference_steps: int
    approved: tuple[str, ...]
    rejected: dict[str, str] = field(default_factory=dict)  # code -> the reviewer's reason

    def voided_by(self, weights_sha256: str, config: Any) -> str | None:
        """Why this review does not cover the generator as it would serve now (None: it does)."""
        if weights_sha256 != self.weights_sha256:
            return "the weights changed after the review"
        if sampling_settings(config) != (self.guidance_scale, self.num_inference_steps):
            g, s = sampling_settings(config)
            return (f"the sampling settings changed after the review (guidance {self.guidance_scale} -> {g}, "
                    f"steps {self.num_inference_steps} -> {s})")
        return None

    def to_json(self) -> str:
        data = asdict(self)
        data["approved"] = list(self.approved)
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def load_review(folder: str | Path) -> ClinicalReview | None:
    path = Path(folder) / REVIEW_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return ClinicalReview(
        reviewer=str(data["reviewer"]), reviewed_on=str(data["reviewed_on"]),
        weights_sha256=str(data["weights_sha256"]), guidance_scale=float(data["guidance_scale"]),
        num_inference_steps=int(data["num_inference_steps"]), approved=tuple(data.get("approved", ())),
        rejected=dict(data.get("rejected", {})),
    )


def approved_classes(folder: str | Path, weights_sha256: str, config: Any) -> set[str]:
    """Classes a valid review of this generator approved; none without a review or with a void one."""
    review = load_review(folder)
    if review is None:
        log.info("generator %s has no clinical review: no pictures are shown to patients", folder)
        return set()
    reason = review.voided_by(weights_sha256, config)
    if reason:
        log.warning("clinical review of generator %s is void (%s): no pictures are shown to patients",
                    folder, reason)
        return set()
    return set(review.approved)


def record_review(folder: str | Path, *, reviewer: str, approve: list[str], reject: dict[str, str],
                  today: dt.date | None = None) -> ClinicalReview:
    """Record a dermatologist's decisions on a generator's classes, bound to its current weights and
    sampling settings. Classes not named keep no approval; a later review replaces this one."""
    from inference.engines.generator_net import GeneratorConfig

    folder = Path(folder)
    config = GeneratorConfig.load(folder)
    null = int(config.extra.get("null_class_index", -1))
    codes = [c for i, c in enumerate(config.class_codes) if i != null]
    if not reviewer.strip():
        raise ReviewError("name the reviewing dermatologist")
    if not approve and not reject:
        raise ReviewError("approve or reject at least one class")
    unknown = sorted((set(approve) | set(reject)) - set(codes))
    if unknown:
        raise ReviewError(f"the generator does not draw {', '.join(unknown)}; it draws: {', '.join(codes)}")
    both = sorted(set(approve) & set(reject))
    if both:
        raise ReviewError(f"both approved and rejected: {', '.join(both)}")
    guidance, steps = sampling_settings(config)
    review = ClinicalReview(
        reviewer=reviewer.strip(), reviewed_on=(today or dt.date.today()).isoformat(),
        weights_sha256=model_sha256(folder / "unet"), guidance_scale=guidance, num_inference_steps=steps,
        approved=tuple(sorted(set(approve))), rejected=dict(sorted(reject.items())),
    )
    tmp = folder / (REVIEW_FILE + ".tmp")
    tmp.write_text(review.to_json(), encoding="utf-8")
    os.replace(tmp, folder / REVIEW_FILE)  # a crash leaves the old review or the new one, never half
    return review


def review_status(folder: str | Path) -> tuple[ClinicalReview | None, str | None]:
    """A generator folder's review and, if it no longer covers the generator, why (for model cards)."""
    from inference.engines.generator_net import GeneratorConfig

    review = load_review(folder)
    if review is None:
        return None, None
    return review, review.voided_by(model_sha256(Path(folder) / "unet"), GeneratorConfig.load(folder))

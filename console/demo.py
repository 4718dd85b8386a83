"""Synthetic review cases for the sandbox, the documentation screenshots and the console tests.

Everything goes through the real clinic_db functions (patients, cases, encrypted images, AI results,
review tasks), so the console sees exactly what the pipeline would leave behind. The photos are
drawn with Pillow; no real patient data is involved.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from PIL import Image, ImageDraw, ImageFilter
from sqlalchemy.orm import Session

from clinic_db import cases, patients, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import Case, Patient, ReviewTask, utcnow
from clinic_db.states import CaseStatus

PIPELINE = Actor.system("demo")


def lesion_photo(seed: int, size: int = 384, fmt: str = "JPEG") -> cases.CleanImage:
    """A synthetic skin photo: skin-toned background with an irregular darker lesion."""
    rng = random.Random(seed)
    base = (rng.randint(190, 235), rng.randint(150, 190), rng.randint(120, 160))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    cx, cy = size // 2 + rng.randint(-30, 30), size // 2 + rng.randint(-30, 30)
    for i in range(14):
        r = rng.randint(size // 10, size // 5)
        dx, dy = rng.randint(-size // 8, size // 8), rng.randint(-size // 8, size // 8)
        shade = (rng.randint(60, 120), rng.randint(35, 70), rng.randint(20, 50))
        draw.ellipse((cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r), fill=shade)
    img = img.filter(ImageFilter.GaussianBlur(2))
    out = io.BytesIO()
    img.save(out, fmt, quality=90)
    mime = "image/jpeg" if fmt == "JPEG" else f"image/{fmt.lower()}"
    return cases.CleanImage(data=out.getvalue(), mime=mime, width=size, height=size)


def heatmap_png(seed: int, size: int = 224) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (20, 20, 90))
    draw = ImageDraw.Draw(img)
    cx, cy = size // 2 + rng.randint(-20, 20), size // 2 + rng.randint(-20, 20)
    for r, colour in ((70, (40, 90, 200)), (48, (60, 200, 120)), (30, (240, 220, 40)), (14, (230, 40, 30))):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    out = io.BytesIO()
    img.filter(ImageFilter.GaussianBlur(6)).save(out, "PNG")
    return out.getvalue()


@dataclass
class ReviewCase:
    patient: Patient
    case: Case
    task: ReviewTask


def review_case(
    clinic: Clinic,
    session: Session,
    *,
    telegram_id: int,
    urgency: str,
    reasons: list[str],
    differential: list[dict[str, Any]],
    history: dict[str, Any] | None = None,
    description: str | None = None,
    model_id: str = "skinbridge-classifier",
    model_version: str = "1.0.0",
    engine: str = "classifier",
    flags: list[str] | None = None,
    opened_at: datetime | None = None,
    photos: int = 1,
    saliency: bool = False,
    explanation_codes: tuple[str, ...] = (),
    patient_name: str | None = None,
    seed: int = 0,
) -> ReviewCase:
    """A case that went through the pipeline and now waits in the review queue."""
    opened_at = opened_at or utcnow()
    patient = patients.register(clinic, session, telegram_id, language="en", consent_version="2026-01",
                                name=patient_name)
    case = cases.open_case(clinic, session, patient)
    case.created_at = opened_at
    if history:
        cases.set_history(clinic, session, case, **history)
    for i in range(photos):
        cases.add_image(clinic, session, case, lesion_photo(seed * 10 + i))
    for target in (CaseStatus.queued, CaseStatus.analysing, CaseStatus.preliminary):
        cases.transition(session, case, target, PIPELINE)
    cases.add_ai_result(
        clinic, session, case, engine=engine, model_id=model_id, model_version=model_version,
        weights_sha256=hashlib.sha256(model_id.encode()).hexdigest(), differential=differential,
        description=description, saliency_png=heatmap_png(seed) if saliency else None, flags=flags or [],
        timings={"inference_ms": 41.0},
    )
    top = max(differential, key=lambda d: d["probability"])["code"] if differential else None
    case.condition_code = top
    case.urgency = urgency
    for i, code in enumerate(explanation_codes):
        cases.add_explanation_image(clinic, session, case, condition_code=code, png=heatmap_png(seed + 100 + i, 128),
                                    model_id="demo/explainer", seed=seed + i)
    cases.transition(session, case, CaseStatus.in_review, PIPELINE, reason="review")
    task = review.open_task(session, case, urgency=urgency, reasons=reasons, now=opened_at)
    session.flush()
    return ReviewCase(patient=patient, case=case, task=task)


def seed_queue(clinic: Clinic, session: Session, *, now: datetime | None = None) -> list[ReviewCase]:
    """A small realistic queue: one overdue urgent melanoma suspicion, a 'soon' BCC, routine acne."""
    now = now or utcnow()
    made = [
        review_case(
            clinic, session, telegram_id=900001, urgency="routine", reasons=["patient_requested"],
            differential=[{"code": "acne", "probability": 0.81}, {"code": "rosacea", "probability": 0.12},
                          {"code": "bacterial_infection", "probability": 0.07}],
            history={"body_site": "face", "duration": "3 months", "itch": "no"},
            description="Multiple inflammatory papules and comedones on the cheeks.",
            opened_at=now - timedelta(hours=2), seed=1,
        ),
        review_case(
            clinic, session, telegram_id=900002, urgency="urgent", reasons=["malignancy_suspected"],
            differential=[{"code": "melanoma", "probability": 0.62}, {"code": "nevus", "probability": 0.31},
                          {"code": "seborrheic_keratosis", "probability": 0.07}],
            history={"body_site": "back", "duration": "6 weeks", "growth": "yes", "bleeding": "sometimes"},
            description="Asymmetric pigmented lesion with irregular border and two shades of brown.",
            flags=["malignancy_suspected"], opened_at=now - timedelta(hours=30), saliency=True,
            explanation_codes=("melanoma", "nevus"), seed=2,
        ),
        review_case(
            clinic, session, telegram_id=900003, urgency="soon", reasons=["low_confidence"],
            differential=[{"code": "basal_cell_carcinoma", "probability": 0.44},
                          {"code": "actinic_keratosis", "probability": 0.38}, {"code": "nevus", "probability": 0.18}],
            history={"body_site": "nose", "duration": "1 year", "bleeding": "yes"},
            model_id="skinbridge/vlm-medgemma-lora", engine="vlm", opened_at=now - timedelta(hours=5), seed=3,
        ),
    ]
    return made

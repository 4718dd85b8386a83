"""Labels of reason codes, AI flags, statuses and history questions, shared by the web console and
Telegram review: a dermatologist reads words, never a stored code ("suspect:melanoma", "in_review")."""

from console import conditions

REASON_LABELS = {
    "malignancy_suspected": "malignancy suspected",
    "low_confidence": "low AI confidence",
    "patient_requested": "patient asked for a dermatologist",
    "photo_quality": "poor photo quality",
    "red_flag": "red-flag history",
    "ai_unusable": "AI output unusable",
    "urgent_condition": "serious condition likely",
    "engines_disagree": "AI engines disagree",
    "ai_urgency_hint": "AI saw a warning sign",
    "emergency_sign": "emergency sign in the patient's words",  # a follow-up question (inference.followup)
    # model failures the case went on without (inference.tasks flags)
    "vlm_error": "vision-language model failed (classifier result used)",
    "explainer_error": "example pictures could not be drawn",
    "followup_vlm_error": "follow-up answered without the vision-language model",
    # what the AI engines flagged on a result (inference.engines, triage_rules.json "ai_flags")
    "vlm_unparseable": "vision-language model answer unreadable",
    "vlm_repaired": "vision-language model answer repaired",
    "vlm_advice_dropped": "model's advice left out (failed the checks)",
    "vlm_photos_left_out": "not every photo shown to the vision-language model",
    "vlm_refused": "vision-language model declined",
    "classifier_error": "image classifier failed",
    "no_lesion_visible": "no skin lesion visible",
    "out_of_distribution": "photo unlike the training photos",
    "photo_type": "photo read as",  # photo_type:dermoscopic (inference.engines.classifier)
}
# case and review-task states, and decisions (clinic_db.states, clinic_db.review)
STATUS_LABELS = {
    "in_review": "with a dermatologist", "waiting_patient": "waiting for the patient",
    "request_info": "asked the patient", "amend": "amended", "accept": "accepted",
}


def reason_label(code: str) -> str:
    """A reason or flag in words; "<kind>:<detail>" (suspect:melanoma, vlm_error:RuntimeError) too."""
    if code in REASON_LABELS:
        return REASON_LABELS[code]
    kind, _, detail = code.partition(":")
    if kind == "suspect":  # an engine's validated operating point (inference.triage)
        return f"AI rates {conditions.label(detail)} above its validated threshold"
    label = REASON_LABELS.get(kind, kind.replace("_", " "))
    return f"{label} ({detail.replace('_', ' ')})" if detail else label


def status_label(code: str | None) -> str:
    return STATUS_LABELS.get(code or "", (code or "").replace("_", " "))
HISTORY_LABELS = {
    "body_site": "Body site", "duration": "Duration", "itch": "Itch", "bleeding": "Bleeding", "growth": "Growth",
    "pain": "Pain", "prior_treatment": "Prior treatment", "fitzpatrick": "Fitzpatrick skin type",
    "free_text": "Patient's own words",
}

"""Labels of reason codes and history questions, shared by the web console and Telegram review."""

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
}
HISTORY_LABELS = {
    "body_site": "Body site", "duration": "Duration", "itch": "Itch", "bleeding": "Bleeding", "growth": "Growth",
    "pain": "Pain", "prior_treatment": "Prior treatment", "fitzpatrick": "Fitzpatrick skin type",
    "free_text": "Patient's own words",
}

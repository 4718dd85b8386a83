"""The explainer as the console shows it to the dermatologist who signs off its pictures.

The web process loads the same explainer the workers serve (inference.engines.registry, same
settings) and draws sample pictures with it exactly as patients would get them (serving settings,
captions). Drawing is slow on a CPU, so each condition's pictures are drawn once per process, one
condition at a time, and kept in memory (a few hundred KB; no patient data is involved).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from skinbridge.settings import get_settings

PICTURES_PER_CONDITION = 4
REVIEW_SEED = 0  # fixed: every dermatologist of the clinic sees the same sample

_lock = threading.Lock()
_explainers: dict[tuple[Any, ...], Any] = {}
_pictures: dict[tuple[Any, ...], list[bytes]] = {}


def current_explainer() -> Any | None:
    """The explainer this deployment's workers serve, or None when none is configured."""
    from inference.engines.registry import engine_key, load_explainer_for
    from inference.vocabulary import load_vocabulary

    settings = get_settings()
    key = engine_key(settings)
    with _lock:
        if key not in _explainers:
            _explainers[key] = load_explainer_for(settings, settings.device, vocabulary=load_vocabulary())
        return _explainers[key]


def pictures(explainer: Any, code: str) -> list[bytes]:
    """The sample pictures of one condition (PNG), drawn on first use; KeyError for a code it does not draw."""
    if code not in explainer.review_subject.codes:
        raise KeyError(code)
    key = (subject_digest(explainer), code)
    with _lock:  # one drawing at a time: the CPU is shared with the rest of the web app
        if key not in _pictures:
            _pictures[key] = explainer.render(code, PICTURES_PER_CONDITION, REVIEW_SEED, "en")
        return _pictures[key]


def subject_digest(explainer: Any) -> str:
    """A short fingerprint of what a review would be bound to (weights and settings), carried by the
    form so a sign-off is refused when the explainer changed between looking and signing; it also keys
    the drawn pictures."""
    subject = explainer.review_subject
    return hashlib.sha256(json.dumps([subject.weights_sha256, subject.settings, list(subject.codes)],
                                     sort_keys=True).encode()).hexdigest()[:32]

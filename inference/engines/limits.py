"""What a dermatologist should know about the classifier beside its result, in plain words, from the
numbers its training measured (``metrics.json`` and ``config.json`` beside the weights; no torch).

Shown by the console next to a classifier result of exactly those weights; a clinic's own classifier
without these files shows none rather than numbers that belong to another model.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from inference.engines.paths import DEFAULT_CLASSIFIER


def _pct(v: Any) -> str:
    return f"{100 * float(v):.0f} %"


@lru_cache(maxsize=8)
def _read(folder: str, mtime: float) -> dict[str, Any] | None:
    path = Path(folder)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        sha = (path / "weights.sha256").read_text(encoding="utf-8").split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return {"weights_sha256": sha, "lines": _lines(config, metrics)}


def classifier_limits(folder: Path | None) -> dict[str, Any] | None:
    """{"weights_sha256": ..., "lines": [...]} for the classifier in ``folder`` (default: the shipped one)."""
    folder = folder or DEFAULT_CLASSIFIER
    try:
        mtime = (folder / "metrics.json").stat().st_mtime
    except OSError:
        return None
    return _read(str(folder), mtime)


def _lines(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    lines = [f"Trained from scratch on public photos of {len(config.get('class_codes', []))} conditions, "
             f"at {config.get('image_size')} px. Most of the photos show light skin: on darker skin its "
             "accuracy is not known and likely lower."]
    ham, dermnet = metrics.get("ham-grouped-test"), metrics.get("dermnet-grouped-test")
    if ham and dermnet:
        lines.append(f"On held-out photos it named the right condition for {_pct(ham['balanced_acc'])} of "
                     "dermoscopic lesions (7 common types, averaged per type); on ordinary photos its first "
                     f"guess was right {_pct(dermnet['top1'])} of the time and the right condition was among "
                     f"its first three {_pct(dermnet['top3'])} of the time.")
    points = metrics.get("operating_points", {})
    shares = []
    for image_type, words in (("dermoscopic", "dermoscopic"), ("clinical", "ordinary")):
        test = points.get(image_type, {}).get("any_malignant", {}).get("test")
        if test:
            shares.append(f"{_pct(test['flagged_share'])} of {words} photos (catching "
                          f"{_pct(test['sensitivity'])} of cancers there)")
    if shares:
        lines.append("It flags possible skin cancer generously: " + " and ".join(shares) + ". A flag is a "
                     "reason to look closely, not a finding; no flag does not rule cancer out.")
    lines.append("It sees only the photo: it knows nothing of the history, and a lesion it was not trained on "
                 "gets the name of the nearest condition it knows.")
    return lines

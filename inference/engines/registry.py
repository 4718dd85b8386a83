"""Which engines a worker process runs, chosen from settings and loaded once per process."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.engines.base import pick_device
from inference.engines.classifier import ClassifierEngine
from inference.engines.explainer import ClassConditionalExplainer, StableDiffusionExplainer
from inference.engines.paths import DEFAULT_CLASSIFIER, DEFAULT_GENERATOR
from inference.engines.vlm import VLMEngine

log = logging.getLogger(__name__)


@dataclass
class Engines:
    classifier: ClassifierEngine
    vlm: VLMEngine | None
    explainer: ClassConditionalExplainer | StableDiffusionExplainer | None
    device: str


_lock = threading.Lock()
_cache: dict[tuple[Any, ...], Engines] = {}


def engine_key(settings: Any) -> tuple[Any, ...]:
    return (settings.classifier_path, settings.generator_path, settings.vlm_path, settings.sd_path, settings.device,
            settings.explanation_min_recognition, settings.vlm_dtype, settings.vlm_attn_implementation,
            settings.vlm_device_map, settings.vlm_max_photos, settings.sd_img2img_strength,
            settings.batch_window_ms, settings.batch_max_photos)


def load_engines(settings: Any, *, vocabulary: Any | None = None) -> Engines:
    """Load (once per process and configuration) the classifier, the optional VLM and the explainer.

    The explainer is the Stable-Diffusion one when ``sd_path`` is set, else the project's own
    generator when its folder exists, else None (no explanation images). A configured path that is
    missing is an error: a worker must not silently run without the model it was deployed with."""
    key = engine_key(settings)
    with _lock:
        if key not in _cache:
            _cache[key] = _load(settings, vocabulary)
        return _cache[key]


def clear_engine_cache() -> None:
    with _lock:
        _cache.clear()


def _existing(path: Path | None, what: str) -> Path:
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"{what} not found at {path}; set the SKINBRIDGE_ setting or ship the weights")
    return Path(path)


def load_explainer_for(settings: Any, device: str, *, vocabulary: Any | None = None,
                       ) -> ClassConditionalExplainer | StableDiffusionExplainer | None:
    """The explainer the settings name: the Stable-Diffusion one when ``sd_path`` is set, else the
    project generator (``generator_path``, or the shipped one), else None."""
    bar = ({} if settings.explanation_min_recognition is None
           else {"min_recognition": settings.explanation_min_recognition})
    if settings.sd_path:
        return StableDiffusionExplainer.load(_existing(settings.sd_path, "SD checkpoint"), device,
                                             vocabulary=vocabulary, img2img_strength=settings.sd_img2img_strength)
    if settings.generator_path:
        return ClassConditionalExplainer.load(_existing(settings.generator_path, "generator"), device,
                                              vocabulary=vocabulary, **bar)
    if DEFAULT_GENERATOR.exists():
        return ClassConditionalExplainer.load(DEFAULT_GENERATOR, device, vocabulary=vocabulary, **bar)
    return None


def _load(settings: Any, vocabulary: Any | None) -> Engines:
    device = pick_device(settings.device)
    classifier = ClassifierEngine.load(_existing(settings.classifier_path or DEFAULT_CLASSIFIER, "classifier"), device)
    vlm = None
    if settings.vlm_path:
        vlm = VLMEngine.load(_existing(settings.vlm_path, "VLM checkpoint"), device, vocabulary=vocabulary,
                             dtype=settings.vlm_dtype, attn_implementation=settings.vlm_attn_implementation,
                             device_map=settings.vlm_device_map, max_photos=settings.vlm_max_photos)
    explainer = load_explainer_for(settings, device, vocabulary=vocabulary)
    log.info("engines on %s: classifier=%s vlm=%s explainer=%s", device, classifier.config.model_id,
             vlm.model_id if vlm else None, explainer.model_id if explainer else None)
    if explainer is not None:  # an operator's first question when patients get no pictures
        offered = [c for c in explainer.review_subject.codes if explainer.knows(c)]
        log.info("explanation pictures offered: %s; patients get those a dermatologist approved in the "
                 "console (Explanation pictures)", ", ".join(offered) or "none (none recognised at the bar)")
    if settings.batch_window_ms > 0:
        # a batching worker runs its tasks in threads: the classifier's calls are batched, and each model
        # serves one call at a time (its own lock: a case's analysis never waits for another's pictures)
        from inference.engines.batching import BatchedClassifier, Serialised

        return Engines(classifier=BatchedClassifier(classifier, threading.RLock(),  # type: ignore[arg-type]
                                                    settings.batch_window_ms / 1000, settings.batch_max_photos),
                       vlm=Serialised(vlm, threading.RLock()) if vlm is not None else None,  # type: ignore[arg-type]
                       explainer=(Serialised(explainer, threading.RLock())  # type: ignore[arg-type]
                                  if explainer is not None else None),
                       device=device)
    return Engines(classifier=classifier, vlm=vlm, explainer=explainer, device=device)

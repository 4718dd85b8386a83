"""load_engines picks engines from settings and loads them once per process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.engines.classifier import save_classifier
from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet
from inference.engines.explainer import ClassConditionalExplainer
from inference.engines.generator_net import GeneratorConfig, build_generator_unet, save_generator
from inference.engines.registry import clear_engine_cache, load_engines
from skinbridge.settings import Settings

CODES = ["melanoma", "nevus"]


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    clf = save_classifier(tmp_path / "clf", SkinClassifierNet(2, width=8),
                          ClassifierConfig(num_classes=2, class_codes=CODES, image_size=32, width=8))
    gen = save_generator(tmp_path / "gen", build_generator_unet(2, sample_size=8, block_out_channels=(8, 16),
                                                                layers_per_block=1, norm_num_groups=4),
                         GeneratorConfig(class_codes=CODES, sample_size=8, num_inference_steps=2))
    clear_engine_cache()
    yield clf, gen
    clear_engine_cache()


def test_loads_configured_engines_once(weights: tuple[Path, Path]) -> None:
    clf, gen = weights
    settings = Settings(classifier_path=clf, generator_path=gen, device="auto")
    engines = load_engines(settings)
    assert engines.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert engines.classifier.config.class_codes == CODES
    assert engines.vlm is None
    assert isinstance(engines.explainer, ClassConditionalExplainer) and engines.explainer.knows("nevus")
    assert load_engines(Settings(classifier_path=clf, generator_path=gen, device="auto")) is engines


def test_recognition_bar_for_explanation_images_comes_from_settings(weights: tuple[Path, Path],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    clf, gen = weights
    (gen / "metrics.json").write_text(json.dumps({"recognition": {"per_class": {"melanoma": 0.85, "nevus": 0.6}}}))
    with caplog.at_level(logging.INFO, logger="inference.engines.registry"):
        default = load_engines(Settings(classifier_path=clf, generator_path=gen, device="cpu")).explainer
    assert default.knows("melanoma") and not default.knows("nevus")
    assert "explanation pictures offered: melanoma;" in caplog.text  # what the operator reads
    lowered = load_engines(Settings(classifier_path=clf, generator_path=gen, device="cpu",
                                    explanation_min_recognition=0.5)).explainer
    assert lowered.knows("nevus")


def test_missing_configured_model_is_an_error(weights: tuple[Path, Path], tmp_path: Path) -> None:
    clf, _ = weights
    with pytest.raises(FileNotFoundError, match="VLM checkpoint"):
        load_engines(Settings(classifier_path=clf, vlm_path=tmp_path / "nope", device="cpu"))
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_engines(Settings(classifier_path=tmp_path / "nope", device="cpu"))

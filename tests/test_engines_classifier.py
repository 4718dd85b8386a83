"""The classifier engine loads a saved SkinClassifierNet through the production path and predicts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from inference.engines.base import model_sha256
from inference.engines.classifier import SALIENCY_MAX_SIDE, ClassifierEngine, save_classifier
from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet, count_parameters

CODES = ["melanoma", "nevus", "basal_cell_carcinoma", "acne"]


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A synthetic 'lesion': a dark ellipse at a random place on a skin-coloured background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(150, 230, 3)))
    w, h = size
    cx, cy = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4))
    r = int(min(w, h) * rng.uniform(0.15, 0.35))
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(20, 120, 3)))
    return img


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=len(CODES), class_codes=CODES, image_size=32, width=8, temperature=1.5)
    model = SkinClassifierNet(config.num_classes, width=config.width)
    # randomise BatchNorm statistics so outputs differ between images and image types
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return save_classifier(tmp_path_factory.mktemp("clf"), model, config)


def test_architecture_fits_the_parameter_budget() -> None:
    model = SkinClassifierNet(num_classes=30)  # default width, 96 px input
    assert count_parameters(model) <= 7_000_000
    logits = model.eval()(torch.randn(2, 3, 96, 96), torch.tensor([0, 1]))
    assert logits.shape == (2, 30)


def test_batch_probabilities_and_consistency(classifier_dir: Path) -> None:
    engine = ClassifierEngine.load(classifier_dir, device="cpu")
    photos = [_photo(1, (120, 80)), _photo(2, (64, 64)), _photo(3, (50, 90))]
    batch = engine.predict(photos, "clinical")
    assert len(batch) == 3
    for pred in batch:
        assert pred.engine == "classifier"
        assert pred.weights_sha256 == model_sha256(classifier_dir / "model.safetensors")
        probs = [d["probability"] for d in pred.differential]
        assert probs == sorted(probs, reverse=True)
        assert {d["code"] for d in pred.differential} == set(CODES)
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)

    full = engine.probabilities(photos, "clinical")
    single = torch.cat([engine.probabilities([p], "clinical") for p in photos])
    assert torch.allclose(full, single, atol=1e-5)
    # the image type is an input of the model, not decoration
    assert not torch.allclose(full, engine.probabilities(photos, "dermoscopic"), atol=1e-5)
    # different photos get different answers
    assert not torch.allclose(full[0], full[1], atol=1e-5)


def test_temperature_scaling_softens_probabilities(classifier_dir: Path) -> None:
    engine = ClassifierEngine.load(classifier_dir, device="cpu")
    photo = [_photo(5, (40, 40))]
    hot = engine.probabilities(photo, "clinical")
    engine.config.temperature = 10.0
    soft = engine.probabilities(photo, "clinical")
    assert float(soft.max()) < float(hot.max())


def test_saliency_png_matches_the_photo(classifier_dir: Path) -> None:
    engine = ClassifierEngine.load(classifier_dir, device="cpu")
    photo = _photo(7, (110, 70))
    (pred,) = engine.predict([photo], "dermoscopic")
    assert pred.saliency_png is not None
    overlay = Image.open(io.BytesIO(pred.saliency_png))
    assert overlay.format == "PNG" and overlay.size == photo.size

    # Grad-CAM keeps only regions that raise a class score; with random weights some classes have
    # none, so draw the map for a class that does and check the heat map is really painted on.
    maps = [engine.gradcam(photo, "dermoscopic", k) for k in range(len(CODES))]
    assert all(m.shape == (32, 32) and m.min() >= 0 and m.max() <= 1 for m in maps)
    k = max(range(len(CODES)), key=lambda i: float(maps[i].sum()))
    assert maps[k].max() == pytest.approx(1.0)
    painted = Image.open(io.BytesIO(engine.saliency_png(photo, "dermoscopic", k))).convert("RGB")
    assert painted.size == photo.size
    diff = np.abs(np.asarray(painted, dtype=int) - np.asarray(photo, dtype=int))
    assert diff.mean() > 1.0
    # a large photo keeps its frame (aspect ratio) in an overlay no longer than SALIENCY_MAX_SIDE
    large = _photo(3, (2000, 1200))
    overlay = Image.open(io.BytesIO(engine.saliency_png(large, "dermoscopic", k)))
    assert overlay.size == (SALIENCY_MAX_SIDE, round(1200 * SALIENCY_MAX_SIDE / 2000))


def test_rejects_unknown_image_type_and_bad_config(classifier_dir: Path, tmp_path: Path) -> None:
    engine = ClassifierEngine.load(classifier_dir, device="cpu")
    with pytest.raises(ValueError):
        engine.predict([_photo(1, (40, 40))], "selfie")
    data = json.loads((classifier_dir / "config.json").read_text())
    assert data["class_codes"] == CODES
    with pytest.raises(ValueError):
        ClassifierConfig(num_classes=3, class_codes=CODES)


def test_validated_threshold_flags_the_condition(classifier_dir: Path) -> None:
    """A class at or above the model's operating point is flagged for triage, below it is not."""
    engine = ClassifierEngine.load(classifier_dir, device="cpu")
    photo = [_photo(7, (40, 40))]
    probs = engine.probabilities(photo, "clinical")[0]
    code = CODES[int(probs.argmin())]
    p = float(probs.min())
    engine.config.thresholds = {code: p * 0.99}
    assert f"suspect:{code}" in engine.predict(photo, "clinical", saliency=False)[0].flags
    engine.config.thresholds = {code: p * 1.01}
    assert engine.predict(photo, "clinical", saliency=False)[0].flags == ["photo_type:clinical"]


def test_test_time_augmentation_makes_orientation_irrelevant(classifier_dir: Path, tmp_path: Path) -> None:
    """A photo taken upside down or mirrored is the same lesion: with 8 dihedral views the engine gives
    the same probabilities for every orientation; a single view does not (so the views really run)."""
    photo = _photo(11, (64, 64))
    turned = [photo.transpose(t) for t in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90,
                                           Image.Transpose.ROTATE_180, Image.Transpose.TRANSVERSE)]
    single = ClassifierEngine.load(classifier_dir, device="cpu")
    with torch.no_grad():  # the random net is near-uniform: sharpen it so differences show
        single.model.head.weight.mul_(1000)
    moved = (single.probabilities([photo] * 4, "clinical") - single.probabilities(turned, "clinical")).abs().max()

    data = json.loads((classifier_dir / "config.json").read_text())
    data["tta_views"] = 8
    folder = tmp_path / "tta"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(data))
    (folder / "model.safetensors").write_bytes((classifier_dir / "model.safetensors").read_bytes())
    engine = ClassifierEngine.load(folder, device="cpu")
    with torch.no_grad():
        engine.model.head.weight.mul_(1000)
    base = engine.probabilities([photo], "clinical")
    for other in turned:
        still = (base - engine.probabilities([other], "clinical")).abs().max()
        assert still < 1e-5 and moved > 1e-3, (float(still), float(moved))

    data["tta_views"] = 3
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tta_views"):
        ClassifierEngine.load(folder, device="cpu")


def test_grad_cam_turns_with_the_photo(classifier_dir: Path) -> None:
    """Grad-CAM is averaged over the same 8 flips/rotations as the prediction, each map turned back: the
    map of a turned photo is the turned map (a single view's map is not: its border artefacts stay put)."""
    engine = ClassifierEngine.load(classifier_dir, device="cpu")
    photo = _photo(5, (32, 32))  # the net's own size: no resize or crop between the two
    turned = photo.transpose(Image.Transpose.ROTATE_90)
    k = 1
    engine.config.tta_views = 8
    cam, cam_turned = engine.gradcam(photo, "dermoscopic", k), engine.gradcam(turned, "dermoscopic", k)
    assert np.allclose(np.rot90(cam), cam_turned, atol=1e-4)
    engine.config.tta_views = 1
    single, single_turned = engine.gradcam(photo, "dermoscopic", k), engine.gradcam(turned, "dermoscopic", k)
    assert not np.allclose(np.rot90(single), single_turned, atol=1e-2)

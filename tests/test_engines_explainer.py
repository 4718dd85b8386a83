"""Explanation-image engines on tiny random models saved to disk and loaded the production way."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engines.base import IPTC_TRAINED_ALGORITHMIC_MEDIA, read_ai_marker
from inference.engines.clinical_review import generator_subject, review_sheet
from inference.engines.explainer import ClassConditionalExplainer, StableDiffusionExplainer
from inference.engines.generator_net import GeneratorConfig, build_generator_unet, save_generator
from inference.engines.synthetic import TINY_SD, build_sd_pipeline, save_random_lora

CODES = ["melanoma", "nevus", "acne"]


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _assert_marked(png: bytes, name: str) -> None:
    meta = read_ai_marker(png)
    assert meta["ai_generated"] == "true"
    assert meta["digital_source_type"] == IPTC_TRAINED_ALGORITHMIC_MEDIA
    assert IPTC_TRAINED_ALGORITHMIC_MEDIA in meta["XML:com.adobe.xmp"]
    assert meta["caption"].startswith(f"AI-generated example of {name}")
    assert meta["generator"]


def _caption_strip_differs(png: bytes, image_height: int) -> None:
    """The visible caption: a dark strip with light text below the picture."""
    px = _pixels(png)
    assert px.shape[0] > image_height
    strip = px[image_height:]
    assert strip.min() < 40 and strip.max() > 200


@pytest.fixture(scope="module", params=[1, 4], ids=["pixels", "patches"])
def generator_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    unet = build_generator_unet(len(CODES), sample_size=16, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, patch_size=request.param)
    config = GeneratorConfig(class_codes=CODES, sample_size=16, num_inference_steps=4, patch_size=request.param)
    return save_generator(tmp_path_factory.mktemp("gen"), unet, config)


def test_generator_patch_size_must_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divide"):
        GeneratorConfig(class_codes=CODES, sample_size=16, patch_size=3)
    unet = build_generator_unet(len(CODES), sample_size=16, block_out_channels=(8, 16), norm_num_groups=4,
                                patch_size=2)
    with pytest.raises(ValueError, match="patch size"):
        save_generator(tmp_path, unet, GeneratorConfig(class_codes=CODES, sample_size=16, patch_size=4))


def test_class_conditional_is_seeded_and_class_dependent(generator_dir: Path) -> None:
    explainer = ClassConditionalExplainer.load(generator_dir, device="cpu", display_size=64)
    assert explainer.knows("melanoma") and not explainer.knows("psoriasis")
    first = explainer.generate("melanoma", 2, seed=11, approved=CODES)
    again = explainer.generate("melanoma", 2, seed=11, approved=CODES)
    assert len(first) == 2
    assert [(_pixels(p) == _pixels(q)).all() for p, q in zip(first, again)] == [True, True]
    # image i depends on seed + i only: asking for one image at seed 12 gives the second one above
    # (up to float rounding between batch sizes: at most one grey level)
    (single,) = explainer.generate("melanoma", 1, seed=12, approved=CODES)
    assert np.abs(_pixels(single) - _pixels(first[1])).max() <= 1
    assert not (_pixels(first[0]) == _pixels(first[1])).all()
    other = explainer.generate("acne", 1, seed=11, approved=CODES)[0]
    assert np.abs(_pixels(other)[:64] - _pixels(first[0])[:64]).mean() > 0.5
    _assert_marked(first[0], "Melanoma")
    _caption_strip_differs(first[0], 64)
    with pytest.raises(KeyError):
        explainer.generate("psoriasis", 1, seed=1, approved=["psoriasis"])


def test_sampling_settings_are_seeded_and_change_only_what_they_should(generator_dir: Path) -> None:
    from inference.engines.generator_net import ddim_sample, load_generator_parts, patch_shifts

    unet, _scheduler, config = load_generator_parts(generator_dir)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = ddim_sample(unet, config, 0, noise)
    for change in ({"shift_patches": True}, {"dynamic_threshold": 0.9}):
        tuned = dataclasses.replace(config, **change)
        once, again = ddim_sample(unet, tuned, 0, noise), ddim_sample(unet, tuned, 0, noise)
        assert torch.equal(once, again), change  # a seed still gives one picture: what the reviewer saw
        moved = change != {"shift_patches": True} or config.patch_size > 1
        assert (not torch.allclose(once, plain, atol=1e-4)) is moved, change
    # the grid visits every offset inside a patch, in a fixed order
    shifts = patch_shifts(dataclasses.replace(config, shift_patches=True))
    assert len(set(shifts)) == len(shifts) == config.patch_size ** 2


def test_only_recognisably_drawn_classes_reach_patients(generator_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    folder = shutil.copytree(generator_dir, tmp_path / "gen")
    (folder / "metrics.json").write_text(json.dumps(
        {"recognition": {"overall": 0.5, "per_class": {"melanoma": 0.9, "nevus": 0.4, "acne": 0.8}}}))
    explainer = ClassConditionalExplainer.load(folder, device="cpu", display_size=32)
    assert [explainer.knows(c) for c in CODES] == [True, False, True]
    assert len(explainer.generate("acne", 1, seed=1, approved=CODES)) == 1
    with pytest.raises(KeyError, match="below the bar"):
        explainer.generate("nevus", 1, seed=1, approved=CODES)  # approval does not lift the bar
    assert explainer.sample("nevus", 1, seed=1).shape == (1, 3, 16, 16)  # still drawable for evaluation
    # an operator may lower the bar (SKINBRIDGE_EXPLANATION_MIN_RECOGNITION)
    assert ClassConditionalExplainer.load(folder, device="cpu", min_recognition=0.3).knows("nevus")


def test_patients_get_only_approved_classes_and_a_review_is_bound_to_weights_and_settings(
        generator_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(generator_dir, tmp_path / "gen")
    explainer = ClassConditionalExplainer.load(folder, device="cpu", display_size=32)
    assert all(explainer.knows(c) for c in CODES)  # offered, but a patient needs a dermatologist's approval
    with pytest.raises(KeyError, match="not approved by a dermatologist"):
        explainer.generate("melanoma", 1, seed=1, approved=["acne"])
    assert len(explainer.generate("melanoma", 1, seed=1, approved=["melanoma"])) == 1
    assert len(explainer.render("melanoma", 1, seed=1)) == 1  # the reviewer's view needs no approval

    # what a review is bound to (clinic_db.explainer_review): the classes, the weights and the settings
    subject = explainer.review_subject
    assert subject == generator_subject(folder)
    assert subject.codes == tuple(CODES)
    assert subject.settings == {"guidance_scale": 0.0, "num_inference_steps": 4, "shift_patches": False,
                                "dynamic_threshold": 0.0}
    config = GeneratorConfig.load(folder)
    config.extra["guidance_scale"] = 7.0
    config.save(folder)
    assert generator_subject(folder).settings["guidance_scale"] == 7.0
    config.extra["guidance_scale"] = 0.0
    config.save(folder)
    assert generator_subject(folder) == subject
    for change in ({"dynamic_threshold": 0.95}, {"shift_patches": True}, {"num_inference_steps": 8}):
        dataclasses.replace(config, **change).save(folder)
        # moving the patch grid changes the pictures only where the UNet works on patches
        changes_pictures = change != {"shift_patches": True} or config.patch_size > 1
        assert (generator_subject(folder) != subject) is changes_pictures, change
    config.save(folder)
    # retraining (other weights in the same folder) changes the digest
    torch.manual_seed(5)
    unet = build_generator_unet(len(CODES), sample_size=16, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, patch_size=config.patch_size)
    save_generator(folder, unet, config)
    retrained = generator_subject(folder)
    assert retrained.weights_sha256 != subject.weights_sha256 and retrained.settings == subject.settings


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd")
    pipe = build_sd_pipeline(TINY_SD)
    pipe.save_pretrained(folder)
    save_random_lora(pipe, folder / "loras" / "melanoma", seed=1)
    save_random_lora(pipe, folder / "loras" / "acne", seed=2)
    return folder


def test_review_sheet_shows_every_class_as_patients_would_get_it(generator_dir: Path) -> None:
    explainer = ClassConditionalExplainer.load(generator_dir, device="cpu", display_size=32)
    sheet = review_sheet(explainer, per_class=2, seed=3)
    (first,) = explainer.render("melanoma", 1, seed=3)
    tile = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
    th, tw = tile.shape[:2]
    assert sheet.height >= 44 + len(CODES) * th and sheet.width >= 220 + 2 * tw
    # the first melanoma picture sits, unchanged (caption included), in the first row
    assert (np.asarray(sheet)[44:44 + th, 220:220 + tw] == tile).all()


def test_stable_diffusion_lora_per_condition(sd_dir: Path) -> None:
    explainer = StableDiffusionExplainer.load(sd_dir, device="cpu", num_inference_steps=2)
    assert explainer.codes == ["acne", "melanoma"]
    assert explainer.knows("acne") and not explainer.knows("nevus")  # only conditions with an adapter
    with pytest.raises(KeyError, match="not approved by a dermatologist"):
        explainer.generate("acne", 1, seed=5, approved=["melanoma"])
    # a review is bound to the steps the pictures were drawn with, and to the prompts
    assert StableDiffusionExplainer.load(sd_dir, device="cpu").review_subject != explainer.review_subject
    assert explainer.review_subject.settings["num_inference_steps"] == 2
    assert len(explainer.review_subject.settings["prompts_sha256"]) == 64
    assert "melanoma" in explainer.prompt_for("melanoma") and "acne" in explainer.prompt_for("acne")
    approved = ["acne", "melanoma"]
    (mel,) = explainer.generate("melanoma", 1, seed=5, approved=approved)
    (acne,) = explainer.generate("acne", 1, seed=5, approved=approved)
    (mel_again,) = explainer.generate("melanoma", 1, seed=5, approved=approved)  # switch back: adapter reloaded from cache
    size = TINY_SD.image_size
    assert (_pixels(mel) == _pixels(mel_again)).all()
    assert np.abs(_pixels(mel)[:size] - _pixels(acne)[:size]).mean() > 0.5
    _assert_marked(mel, "Melanoma")
    _assert_marked(acne, "Acne")
    _caption_strip_differs(mel, size)
    with pytest.raises(KeyError):
        explainer.generate("nevus", 1, seed=5, approved=["nevus"])

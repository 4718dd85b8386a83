"""Stable-Diffusion LoRA folders as clinics bring them (issue 21, build 7): a PEFT adapter folder and a
diffusers-format LoRA file both load, and a condition is offered (for review, then to patients) only if its
LoRA really loaded; an empty or broken ``loras/<code>/`` is left out with a log line saying why. A tiny SD
pipeline with random weights is built in-process (inference.engines.synthetic)."""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engines.explainer import StableDiffusionExplainer
from inference.engines.synthetic import TINY_SD, build_sd_pipeline, save_random_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _peft_adapter(pipe, folder: Path, seed: int):  # type: ignore[no-untyped-def]
    """A UNet LoRA with random non-zero weights, saved by PEFT (``PeftModel.save_pretrained``), as a clinic
    trained it with peft; returns its state dict in diffusers' key layout for the same weights."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(pipe.unet), LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                                                 init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    model.save_pretrained(folder)
    return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd")
    pipe = build_sd_pipeline(TINY_SD)
    pipe.save_pretrained(folder)
    loras = folder / "loras"
    state = _peft_adapter(pipe, loras / "acne", seed=3)  # PEFT folder
    StableDiffusionPipeline.save_lora_weights(str(loras / "eczema"), unet_lora_layers=state,  # same weights,
                                              safe_serialization=True)                       # diffusers format
    _peft_adapter(pipe, loras / "psoriasis", seed=4)
    (loras / "psoriasis" / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # truncated copy
    save_random_lora(pipe, loras / "melanoma", seed=1)
    (loras / "nevus").mkdir()  # empty: nothing trained yet
    (loras / "vascular_lesion").mkdir()  # a LoRA for another architecture: no key names a layer here
    save_file({"unet.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 8),
               "unet.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 4)},
              str(loras / "vascular_lesion" / "pytorch_lora_weights.safetensors"))
    (loras / "seborrheic_keratosis").mkdir()  # a Flux transformer's LoRA: diffusers skips it without a word
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 4)},
              str(loras / "seborrheic_keratosis" / "pytorch_lora_weights.safetensors"))
    # one prompt for acne and eczema: same weights must then give the same pictures
    prompts = json.loads((Path("inference/engines/prompts/sd_conditions.json")).read_text(encoding="utf-8"))
    prompts["conditions"] = {"acne": "skin close-up", "eczema": "skin close-up"}
    (folder / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    return folder


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_peft_and_diffusers_loras_load_and_only_working_ones_are_offered(
        sd_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inference.engines.explainer"):
        explainer = StableDiffusionExplainer.load(sd_dir, device="cpu", num_inference_steps=2)

    assert explainer.codes == ["acne", "eczema", "melanoma"]
    assert explainer.review_subject.codes == ("acne", "eczema", "melanoma")  # what a dermatologist is shown
    assert sorted(explainer.unusable) == ["nevus", "psoriasis", "seborrheic_keratosis", "vascular_lesion"]
    assert "no adapter" in explainer.unusable["nevus"]
    assert "deserializing" in explainer.unusable["psoriasis"]
    assert "no layer" in explainer.unusable["seborrheic_keratosis"]
    assert "not found in the base model" in explainer.unusable["vascular_lesion"]
    for code in explainer.unusable:
        assert not explainer.knows(code)
        assert any(f"explanation pictures of {code} not offered" in r.getMessage() for r in caplog.records)
        with pytest.raises(KeyError):
            explainer.generate(code, 1, seed=5, approved=[code])

    # the PEFT folder's weights are in the UNet, equal to the same weights loaded from the diffusers file
    layers = [m for m in explainer.pipe.unet.modules() if "acne" in getattr(m, "lora_B", {})]
    assert len(layers) == len([m for m in explainer.pipe.unet.modules() if "eczema" in getattr(m, "lora_B", {})]) > 0
    for m in layers:
        assert torch.equal(m.lora_B["acne"].weight, m.lora_B["eczema"].weight)
        assert m.lora_B["acne"].weight.abs().sum() > 0
        assert m.scaling["acne"] == m.scaling["eczema"]

    approved = explainer.codes
    size = TINY_SD.image_size
    (acne,) = explainer.generate("acne", 1, seed=5, approved=approved)
    (eczema,) = explainer.generate("eczema", 1, seed=5, approved=approved)
    (melanoma,) = explainer.generate("melanoma", 1, seed=5, approved=approved)
    assert (_pixels(acne)[:size] == _pixels(eczema)[:size]).all()  # the picture; captions name the condition
    assert np.abs(_pixels(acne)[:size] - _pixels(melanoma)[:size]).mean() > 0.5


def test_a_folder_with_only_broken_loras_offers_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    build_sd_pipeline(TINY_SD).save_pretrained(tmp_path)
    (tmp_path / "loras" / "melanoma").mkdir(parents=True)
    explainer = StableDiffusionExplainer.load(tmp_path, device="cpu", num_inference_steps=1)
    assert explainer.codes == [] and explainer.review_subject.codes == ()
    assert list(explainer.unusable) == ["melanoma"]


def test_examples_can_start_from_the_patients_photo_and_say_so(sd_dir: Path) -> None:
    """SKINBRIDGE_SD_IMG2IMG_STRENGTH: the example starts from the patient's photo (so it follows their body
    site and skin tone), through the same weights and LoRA; its caption says it is drawn over their photo
    and is not their skin; a dermatologist's approval of text-only pictures does not cover it."""
    from inference.engines.base import read_ai_marker

    explainer = StableDiffusionExplainer.load(sd_dir, device="cpu", num_inference_steps=4, img2img_strength=0.6)
    plain = StableDiffusionExplainer.load(sd_dir, device="cpu", num_inference_steps=4)
    assert explainer.uses_photo and not plain.uses_photo
    assert explainer.review_subject != plain.review_subject  # reviewed anew
    approved = explainer.codes
    pale = Image.new("RGB", (50, 40), (235, 200, 180))
    dark = Image.new("RGB", (50, 40), (90, 60, 40))

    (on_pale,) = explainer.generate("melanoma", 1, seed=5, approved=approved, photo=pale)
    (on_pale_again,) = explainer.generate("melanoma", 1, seed=5, approved=approved, photo=pale)
    (on_dark,) = explainer.generate("melanoma", 1, seed=5, approved=approved, photo=dark)
    size = TINY_SD.image_size
    assert (_pixels(on_pale) == _pixels(on_pale_again)).all()  # seeded: the same photo, the same example
    assert np.abs(_pixels(on_pale)[:size] - _pixels(on_dark)[:size]).mean() > 1.0  # it follows the photo
    marker = read_ai_marker(on_pale)
    assert marker["ai_generated"] == "true" and "drawn over the layout of your photo" in marker["caption"]
    assert "not your skin" in marker["caption"]
    (german,) = explainer.generate("melanoma", 1, seed=5, lang="de", approved=approved, photo=dark)
    assert "über den Aufbau Ihres Fotos gezeichnet" in read_ai_marker(german)["caption"]

    (no_photo,) = explainer.generate("melanoma", 1, seed=5, approved=approved)  # none given: from text alone
    assert "drawn over" not in read_ai_marker(no_photo)["caption"]

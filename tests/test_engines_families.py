"""Every VLM family a clinic may bring runs through the worker's path (issue 21, build 2): a tiny random-weight
checkpoint of the family's real classes, processor and prompt format (tests/family_models.py) is saved with
``save_pretrained``, loaded by ``load_engines`` from the settings, and answers a diagnosis and a follow-up
question. Answers are forced through the real ``generate()`` call (random weights emit garbage); what the
model was actually given (the rendered prompt ids) is recorded and checked: one BOS, the family's turn format,
photos the family can take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from inference.engines.vlm import FLAG_PHOTOS_LEFT_OUT
from inference.followup import answer
from tests.e2e_support import served_vlm, tiny_model_env
from tests.family_models import BUILDERS, build_family
from tests.tiny_models import ScriptedAnswers

DIAGNOSIS = ('{"differential": [{"condition": "Melanocytic nevus", "probability": 0.7}, '
             '{"condition": "Melanoma", "probability": 0.2}]}')
REPLY = "Keep the skin moisturised."
# family -> (text the rendered prompt must contain, photos it takes of two, the text it puts once per photo)
EXPECTED = {
    "gemma3": ("<bos><start_of_turn>user\n", 2, "<start_of_image>"),
    "paligemma": ("<image><bos>You are", 1, None),  # prefix after the image tokens and BOS
    "blip-2": ("<image></s>Question: You are", 1, None),
    "instructblip": ("<image><s>You are", 1, None),
    "llava_next": ("<s>[INST] <image>", 2, "<image>\n"),
    "idefics3": ("<|begin_of_text|>User:<fake_token_around_image>", 2, "<global-img>"),
    "qwen2_vl": ("<|im_start|>user\n<|vision_start|><|image_pad|>", 2, "<|vision_start|>"),
    "qwen2_5_vl": ("<|im_start|>user\n<|vision_start|><|image_pad|>", 2, "<|vision_start|>"),
    "smolvlm": ("<|im_start|>User:<fake_token_around_image>", 2, "<global-img>"),
}


@pytest.fixture(scope="module")
def base_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return tiny_model_env(tmp_path_factory.mktemp("base"))


@pytest.fixture(params=sorted(BUILDERS))
def worker_vlm(request: pytest.FixtureRequest, base_models: dict[str, str], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Any:
    folder = build_family(request.param, tmp_path / request.param, [DIAGNOSIS, REPLY, "Brown patch."] * 20)
    with served_vlm(folder, base_models, monkeypatch) as vlm:
        yield request.param, vlm


def _record_prompts(vlm: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each generate() call was given, as the model saw it."""
    seen: list[dict[str, Any]] = []
    real = vlm.model.generate

    def spy(**inputs: Any) -> Any:
        seen.append(inputs)
        return real(**inputs)

    monkeypatch.setattr(vlm.model, "generate", spy)
    return seen


def test_family_answers_a_case_through_the_worker_path(worker_vlm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    family, vlm = worker_vlm
    assert vlm is not None and vlm.family.name == family
    tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
    hook = ScriptedAnswers(tokenizer, {"describe": ["Brown patch."], "diagnose": [DIAGNOSIS], "followup": [REPLY]})
    vlm.generation_hook = hook
    seen = _record_prompts(vlm, monkeypatch)
    photos = [Image.new("RGB", (64, 48), (190, 140, 120)), Image.new("RGB", (40, 60), (150, 100, 90))]

    pred = vlm.diagnose(photos, {"duration": "3 months"}, "en")

    assert hook.steps == ["describe", "diagnose"]
    assert [d["code"] for d in pred.differential] == ["nevus", "melanoma"]
    assert pred.description == "Brown patch."
    marker, photos_taken, per_photo = EXPECTED[family]
    assert (FLAG_PHOTOS_LEFT_OUT in pred.flags) == (photos_taken < 2)
    for inputs in seen:
        ids = inputs["input_ids"][0].tolist()
        text = tokenizer.decode(ids)
        assert marker in text
        if tokenizer.bos_token_id is None:  # Qwen: none at all
            assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>"), text[:200]
        else:
            assert ids.count(tokenizer.bos_token_id) == 1, text[:200]  # one BOS (Gemma degrades on two)
            assert ids[0] == tokenizer.bos_token_id or family in ("paligemma", "blip-2", "instructblip")
        if per_photo:
            assert text.count(per_photo) == photos_taken

    followup = answer("What can I do about the itching?", pred.differential, "en", vlm=vlm, photos=lambda: photos)
    assert hook.steps[-1] == "followup"
    assert (followup.text, followup.flags) == (REPLY, [])


"""LLaVA-Med / SkinVL checkpoints in LLaVA's own ``llava_mistral`` layout (issue 21, build 1): a tiny checkpoint is
written the way LLaVA's code writes it (config fields, key names, a PEFT LoRA on the text model and
``non_lora_trainables.bin`` with the projector, the CLIP tower in its own folder), converted, loaded by the
worker's path, and its logits equal those of the original-layout model computed directly (LoRA not merged)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from inference.engines.convert import convert_llava_med
from inference.engines.synthetic import train_tokenizer
from inference.followup import answer
from tests.e2e_support import served_vlm, tiny_model_env
from tests.tiny_models import ScriptedAnswers

DIAGNOSIS = '{"differential": [{"condition": "Melanoma", "probability": 0.6}]}'


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, MistralConfig, \
        MistralForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llava_med")
    tok = train_tokenizer([DIAGNOSIS] * 10, special_tokens=["[INST]", "[/INST]"], add_bos=True,
                          extra_special_tokens={}, chat_template=None)  # Mistral's: no <image> token
    text_config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    text = MistralForCausalLM(text_config).eval()
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=28, patch_size=7)).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))

    base = root / "llava-med-v1.5-mistral-7b"
    base.mkdir()
    state = {**text.state_dict(), **{f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(base / "model.safetensors"))
    config = text_config.to_dict() | {
        "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tokenizer_model_max_length": 4096,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True}
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tok.save_pretrained(base)
    clip_dir = root / "clip-vit-large-patch14-336"
    tower.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(clip_dir)

    # SkinVL-style fine-tune: LoRA on the text model, projector trained in full
    lora_dir = root / "skinvl-lora"
    peft_text = get_peft_model(copy.deepcopy(text), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_text.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    peft_text.save_pretrained(lora_dir)
    tuned = copy.deepcopy(projector)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in tuned.state_dict().items()},
               lora_dir / "non_lora_trainables.bin")
    return {"base": base, "clip": clip_dir, "lora": lora_dir, "text": peft_text.eval(), "tower": tower,
            "projector": tuned.eval(), "tokenizer": tok}


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return convert_llava_med(original["base"], tmp_path_factory.mktemp("out") / "skinvl", lora=original["lora"],
                             vision_tower=original["clip"])


@torch.no_grad()
def test_converted_logits_equal_the_original_layout_model(original, converted: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(converted, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(converted, local_files_only=True).eval()
    photo = Image.new("RGB", (40, 24), (180, 120, 100))
    chat = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe the lesion."}]}], add_generation_prompt=True)
    inputs = processor(images=[photo], text=chat.removeprefix(processor.tokenizer.bos_token), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_id = model.config.image_token_index
    first = ids.index(image_id)
    n = ids.count(image_id)
    assert n == 16 and ids[first:first + n] == [image_id] * n and ids.count(processor.tokenizer.bos_token_id) == 1
    assert processor.tokenizer.decode(ids[first + n:]) == "\nDescribe the lesion. [/INST]"

    # LLaVA's own forward: CLIP penultimate layer without CLS -> projector -> spliced where the image was
    tok = original["tokenizer"]
    features = original["tower"](inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    embed = original["text"].get_input_embeddings()
    spliced = torch.cat([embed(torch.tensor([ids[:first]])), original["projector"](features),
                         embed(torch.tensor([ids[first + n:]]))], dim=1)
    reference = original["text"](inputs_embeds=spliced).logits
    logits = model(**inputs).logits
    assert logits.shape[1] == reference.shape[1] and logits.shape[2] == len(tok) + 1  # + <image>
    torch.testing.assert_close(logits[..., :len(tok)], reference, atol=1e-4, rtol=1e-4)
    # LLaVA's pad-to-square in the mean colour, not a centre crop that cuts the lesion's edges off
    assert processor.image_processor.do_pad


def test_converted_model_answers_through_the_worker(converted: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with served_vlm(converted, tiny_model_env(tmp_path), monkeypatch) as vlm:
        hook = ScriptedAnswers(vlm.processor.tokenizer, {"describe": ["Brown patch."], "diagnose": [DIAGNOSIS],
                                                         "followup": ["Keep it moisturised."]})
        vlm.generation_hook = hook
        photos = [Image.new("RGB", (40, 24), (180, 120, 100))]
        pred = vlm.diagnose(photos, {"duration": "weeks"}, "en")
        assert pred.differential == [{"code": "melanoma", "probability": 0.6}]
        assert pred.model_id == "llava-med:llava-med-v1.5-mistral-7b+skinvl-lora"
        reply = answer("What can I do about it?", pred.differential, "en", vlm=vlm, photos=lambda: photos)
        assert (reply.text, reply.flags) == ("Keep it moisturised.", [])
        assert hook.steps == ["describe", "diagnose", "followup"]


def test_refuses_what_it_cannot_convert(original, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="vision tower"):
        convert_llava_med(original["base"], tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a LLaVA-Med checkpoint"):
        convert_llava_med(tmp_path / "other", tmp_path / "out", vision_tower=original["clip"])


def test_cli_converts(original, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from skinbridge.cli import main

    out = tmp_path / "converted"
    args = ["models", "convert", "llava-med", "--base", str(original["base"]), "--vision-tower",
            str(original["clip"]), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists() and f"SKINBRIDGE_VLM_PATH={out}" in result.output
    again = CliRunner().invoke(main, args)  # never over an existing model
    assert again.exit_code == 1 and "is not empty" in again.output

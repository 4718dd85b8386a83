"""SkinGPT-4 checkpoints in MiniGPT-4's own layout (issue 21, build 1): tiny checkpoints are written the way the
seed's code reads them (LAVIS's ``eva_vit_g.pth`` with EVA-CLIP's extra last block, BLIP-2's stage-1 ``.pth`` with
ln_vision, the Q-Former's text branch and heads, SkinGPT-4's ``{"model": {llama_proj}, "optimizer": ...}`` and a
local HF Llama folder), converted, and compared with a reference forward written here from LAVIS's and MiniGPT-4's
code (EVA-ViT blocks with q/v biases, ln_vision, the Q-Former's query branch, llama_proj, the prompt split at
<ImageHere> and tokenised per segment with BOS on the first only): same pixels, same projected queries, same
logits. Then the converted folder answers a case through the worker's own loading path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inference.engines.convert import SKINGPT4_SYSTEM, convert_skingpt4
from inference.engines.families import build_inputs, family_of
from inference.engines.synthetic import train_tokenizer
from inference.followup import answer
from tests.e2e_support import served_vlm, tiny_model_env
from tests.tiny_models import ScriptedAnswers

DIAGNOSIS = '{"differential": [{"condition": "Melanoma", "probability": 0.6}]}'
QUESTION = "Describe the lesion."
# tiny, but with the real head sizes (EVA-ViT-g: 88, the Q-Former's BERT: 64), which are not in the weights
VIT, PATCH, GRID, MLP, DEPTH = 176, 7, 4, 96, 2  # LAVIS builds DEPTH blocks; the EVA file has one more
QF, QF_LAYERS, QF_MLP, QUERIES, LM = 128, 4, 96, 4, 64
LLAMA_CHAT = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"  # Llama-2-chat's own, replaced


def _rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape) * scale


def _norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + _rand(width, scale=0.1), f"{prefix}.bias": _rand(width, scale=0.1)}


def _linear(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": _rand(out, inp), f"{prefix}.bias": _rand(out, scale=0.05)}


def _eva_file() -> dict[str, torch.Tensor]:
    """eva_vit_g.pth's keys (unprefixed), with EVA-CLIP's final norm and head that LAVIS builds but never runs."""
    state = {"cls_token": _rand(1, 1, VIT), "pos_embed": _rand(1, GRID * GRID + 1, VIT),
             **_linear("patch_embed.proj", VIT, 3), **_norm("norm", VIT), **_linear("head", 10, VIT)}
    state["patch_embed.proj.weight"] = _rand(VIT, 3, PATCH, PATCH, scale=0.05)
    for i in range(DEPTH + 1):
        b = f"blocks.{i}"
        state |= {**_norm(f"{b}.norm1", VIT), **_norm(f"{b}.norm2", VIT), f"{b}.attn.qkv.weight": _rand(3 * VIT, VIT),
                  f"{b}.attn.q_bias": _rand(VIT, scale=0.1), f"{b}.attn.v_bias": _rand(VIT, scale=0.1),
                  **_linear(f"{b}.attn.proj", VIT, VIT), **_linear(f"{b}.mlp.fc1", MLP, VIT),
                  **_linear(f"{b}.mlp.fc2", VIT, MLP)}
    return state


def _attention(prefix: str, context: int) -> dict[str, torch.Tensor]:
    return {**_linear(f"{prefix}.self.query", QF, QF), **_linear(f"{prefix}.self.key", QF, context),
            **_linear(f"{prefix}.self.value", QF, context), **_linear(f"{prefix}.output.dense", QF, QF),
            **_norm(f"{prefix}.output.LayerNorm", QF)}


def _blip2_file() -> dict[str, torch.Tensor]:
    """blip2_pretrained_flant5xxl.pth's model: frozen ViT left out (LAVIS saves trainable weights only), ln_vision,
    the whole Q-Former BERT (text branch, embeddings, LM head) and the stage-1 heads."""
    q = "Qformer.bert"
    state = {**_norm("ln_vision", VIT), "query_tokens": _rand(1, QUERIES, QF, scale=0.5),
             f"{q}.embeddings.word_embeddings.weight": _rand(30, QF), f"{q}.embeddings.position_ids":
             torch.arange(16)[None], f"{q}.embeddings.position_embeddings.weight": _rand(16, QF),
             **_norm(f"{q}.embeddings.LayerNorm", QF), **_linear("Qformer.cls.predictions.transform.dense", QF, QF),
             "Qformer.cls.predictions.bias": _rand(30), **_linear("vision_proj", 16, QF),
             **_linear("text_proj", 16, QF), **_linear("itm_head", 2, QF), "temp": torch.tensor(0.07)}
    for i in range(QF_LAYERS):
        layer = f"{q}.encoder.layer.{i}"
        state |= _attention(f"{layer}.attention", QF)
        if i % 2 == 0:  # cross_attention_freq 2
            state |= _attention(f"{layer}.crossattention", VIT)
        for branch in ("", "_query"):
            state |= {**_linear(f"{layer}.intermediate{branch}.dense", QF_MLP, QF),
                      **_linear(f"{layer}.output{branch}.dense", QF, QF_MLP),
                      **_norm(f"{layer}.output{branch}.LayerNorm", QF)}
    return state


# --- reference forward, after LAVIS (eva_vit.py, Qformer.py) and MiniGPT-4 (encode_img, get_context_emb) -------
def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def eva_forward(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    heads = VIT // 88
    for i in range(DEPTH):  # LAVIS's VisionTransformer(depth=39): the file's last block is not run
        b = f"blocks.{i}."
        h = F.layer_norm(x, (VIT,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros_like(sd[b + "attn.v_bias"]), sd[b + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], bias).chunk(3, dim=-1)
        q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        attn = ((q * (VIT // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (VIT,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return x  # forward_features: no final norm


def _bert_attention(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    heads = QF // 64
    q, k, v = (_heads(F.linear(t, sd[f"{p}.self.{n}.weight"], sd[f"{p}.self.{n}.bias"]), heads)
               for n, t in (("query", x), ("key", context), ("value", context)))
    ctx = ((q @ k.transpose(-2, -1)) / (QF // heads) ** 0.5).softmax(-1) @ v
    out = F.linear(ctx.transpose(1, 2).reshape(x.shape), sd[f"{p}.output.dense.weight"], sd[f"{p}.output.dense.bias"])
    return F.layer_norm(out + x, (QF,), sd[f"{p}.output.LayerNorm.weight"], sd[f"{p}.output.LayerNorm.bias"], eps=1e-12)


def encode_img(eva: dict[str, torch.Tensor], blip2: dict[str, torch.Tensor], proj: dict[str, torch.Tensor],
               pixels: torch.Tensor, ln_vision_eps: float = 1e-5) -> torch.Tensor:
    """MiniGPT-4's encode_img: llama_proj(Qformer.bert(query_tokens, ln_vision(visual_encoder(image)))).
    ln_vision is LAVIS's LayerNorm with nn.LayerNorm's default eps 1e-5; transformers' post_layernorm shares the
    vision config's 1e-6 with the blocks, the one thing the conversion cannot carry over."""
    image = F.layer_norm(eva_forward(eva, pixels), (VIT,), blip2["ln_vision.weight"], blip2["ln_vision.bias"],
                         eps=ln_vision_eps)
    q = "Qformer.bert"
    x = F.layer_norm(blip2["query_tokens"].expand(pixels.shape[0], -1, -1), (QF,),
                     blip2[f"{q}.embeddings.LayerNorm.weight"], blip2[f"{q}.embeddings.LayerNorm.bias"], eps=1e-12)
    for i in range(QF_LAYERS):  # BertLayer with query_length = all: self-attention, cross-attention, query FFN
        layer = f"{q}.encoder.layer.{i}"
        x = _bert_attention(blip2, f"{layer}.attention", x, x)
        if i % 2 == 0:
            x = _bert_attention(blip2, f"{layer}.crossattention", x, image)
        h = F.gelu(F.linear(x, blip2[f"{layer}.intermediate_query.dense.weight"],
                            blip2[f"{layer}.intermediate_query.dense.bias"]))
        x = F.layer_norm(F.linear(h, blip2[f"{layer}.output_query.dense.weight"],
                                  blip2[f"{layer}.output_query.dense.bias"]) + x, (QF,),
                         blip2[f"{layer}.output_query.LayerNorm.weight"], blip2[f"{layer}.output_query.LayerNorm.bias"],
                         eps=1e-12)
    return F.linear(x, proj["llama_proj.weight"], proj["llama_proj.bias"])


def minigpt4_prompt(question: str) -> str:
    """Chat.upload_img + Chat.ask + Chat.answer with CONV_VISION: SINGLE style, sep '###'."""
    return f"{SKINGPT4_SYSTEM}###Human: <Img><ImageHere></Img> {question}###Assistant:"


def blip_pixels(photo: Image.Image) -> torch.Tensor:
    """Blip2ImageEvalProcessor: Resize((224, 224), BICUBIC) on the PIL image, ToTensor, Normalize(CLIP mean/std)."""
    array = np.asarray(photo.convert("RGB").resize((GRID * PATCH,) * 2, Image.BICUBIC), dtype=np.float32) / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    return torch.from_numpy(((array - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("skingpt4")
    eva, blip2 = _eva_file(), _blip2_file()
    proj = _linear("llama_proj", LM, QF)
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": blip2}, root / "blip2_pretrained_flant5xxl.pth")
    torch.save({"model": proj, "optimizer": {"state": {}, "param_groups": []}, "config": {"model": {
        "arch": "mini_gpt4", "num_query_token": 32}}, "scaler": None, "epoch": 4}, root / "skinGPT_v1.pth")
    # Llama-2-chat as a local HF folder: <s> added to every text, no <image>, its own [INST] template
    tok = train_tokenizer([minigpt4_prompt(QUESTION), DIAGNOSIS, "Keep it moisturised.\n###Human: more###"] * 20,
                          special_tokens=["<unk>"], add_bos=True, extra_special_tokens={}, chat_template=LLAMA_CHAT)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=LM, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=4096,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    llama_dir = root / "Llama-2-13b-chat-hf"
    llama.save_pretrained(llama_dir)
    tok.save_pretrained(llama_dir)
    return {"root": root, "eva": eva, "blip2": blip2, "proj": proj, "llama": llama, "tokenizer": tok,
            "llama_dir": llama_dir}


def _convert(original, out: Path, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    root = original["root"]
    return convert_skingpt4(root / "skinGPT_v1.pth", root / "blip2_pretrained_flant5xxl.pth", original["llama_dir"],
                            out, **({"eva_vit": root / "eva_vit_g.pth", "eva_depth": DEPTH} | kwargs))


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return _convert(original, tmp_path_factory.mktemp("out") / "skingpt4")


@torch.no_grad()
def test_converted_model_equals_minigpt4s_forward(original, converted: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(converted, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(converted, local_files_only=True).eval()
    photo = Image.new("RGB", (40, 24), (180, 120, 100))
    photo.paste((90, 60, 50), (10, 5, 25, 15))
    inputs = build_inputs(processor, family_of(model), [photo], QUESTION)  # the worker's own prompt builder

    # preprocessing: MiniGPT-4's square bicubic resize and BLIP's normalisation
    torch.testing.assert_close(inputs["pixel_values"], blip_pixels(photo), atol=1e-5, rtol=0)
    pixels = inputs["pixel_values"]

    # the prompt: MiniGPT-4's conversation, split at the photo, BOS on the first segment only
    tok = original["tokenizer"]
    before, after = minigpt4_prompt(QUESTION).split("<ImageHere>")
    before_ids, after_ids = tok(before).input_ids, tok(after, add_special_tokens=False).input_ids
    ids = inputs["input_ids"][0].tolist()
    image_id = model.config.image_token_index
    assert ids == before_ids + [image_id] * QUERIES + after_ids

    # the language model's inputs: the projected queries
    reference_queries = encode_img(original["eva"], original["blip2"], original["proj"], pixels)
    queries = model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    torch.testing.assert_close(queries, reference_queries, atol=1e-4, rtol=1e-4)

    # and the logits over the whole prompt
    embed = original["llama"].get_input_embeddings()
    spliced = torch.cat([embed(torch.tensor([before_ids])), reference_queries, embed(torch.tensor([after_ids]))], 1)
    reference = original["llama"](inputs_embeds=spliced).logits
    logits = model(**inputs).logits
    assert logits.shape[2] == len(tok) + 1  # + <image>
    torch.testing.assert_close(logits[..., :len(tok)], reference, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_the_only_difference_is_ln_vision_eps(original, converted: Path) -> None:  # type: ignore[no-untyped-def]
    """In float64, where rounding does not hide it: the converted vision side is the reference's math exactly
    once ln_vision's eps is set to transformers' 1e-6; with LAVIS's 1e-5 the queries move by ~1e-7 of their scale."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(converted, local_files_only=True).eval().double()
    wide = {name: {k: v.double() if v.is_floating_point() else v for k, v in original[name].items()}
            for name in ("eva", "blip2", "proj")}
    pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, dtype=torch.float64)
    queries = model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    aligned = encode_img(wide["eva"], wide["blip2"], wide["proj"], pixels, ln_vision_eps=1e-6)
    lavis = encode_img(wide["eva"], wide["blip2"], wide["proj"], pixels)
    assert (queries - aligned).abs().max() < 1e-10
    assert 0 < (queries - lavis).abs().max() < 1e-5 * lavis.abs().max()


def test_converted_model_answers_through_the_worker(converted: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with served_vlm(converted, tiny_model_env(tmp_path), monkeypatch) as vlm:
        tokenizer = vlm.processor.tokenizer
        # the model runs on past MiniGPT-4's "###" separator: generation stops there, as MiniGPT-4's does
        hook = ScriptedAnswers(tokenizer, {"describe": ["Brown patch."], "diagnose": [DIAGNOSIS],
                                           "followup": ["Keep it moisturised.\n###Human: more"]})
        vlm.generation_hook = hook
        seen: list[list[int]] = []
        real = vlm.model.generate

        def spy(**inputs):  # type: ignore[no-untyped-def]
            seen.append(inputs["input_ids"][0].tolist())
            return real(**inputs)

        monkeypatch.setattr(vlm.model, "generate", spy)
        photos = [Image.new("RGB", (40, 24), (180, 120, 100)), Image.new("RGB", (30, 30), (150, 90, 80))]
        pred = vlm.diagnose(photos, {"duration": "weeks"}, "en")
        assert pred.differential == [{"code": "melanoma", "probability": 0.6}]
        assert pred.model_id == "skingpt4:skinGPT_v1"
        assert "vlm_photos_left_out" in pred.flags  # MiniGPT-4 takes one photo per conversation
        reply = answer("What can I do about it?", pred.differential, "en", vlm=vlm, photos=lambda: photos)
        assert (reply.text, reply.flags) == ("Keep it moisturised.", [])
        assert hook.steps == ["describe", "diagnose", "followup"]
        for ids in seen:
            text = tokenizer.decode(ids)
            assert text.startswith("<s>" + SKINGPT4_SYSTEM + "###Human: <Img><image>")
            assert ids.count(tokenizer.bos_token_id) == 1
            assert text.endswith("###Assistant:") and ids.count(vlm.model.config.image_token_index) == QUERIES


def test_refuses_what_it_cannot_convert(original, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = original["root"]
    with pytest.raises(ValueError, match="--eva-vit"):
        _convert(original, tmp_path / "a", eva_vit=None)
    # EVA's layer scale (init_values) has no place in transformers' BLIP-2 vision model
    torch.save(original["eva"] | {"blocks.0.gamma_1": torch.ones(VIT)}, tmp_path / "eva_ls.pth")
    with pytest.raises(ValueError, match="blocks.0.gamma_1"):
        _convert(original, tmp_path / "b", eva_vit=tmp_path / "eva_ls.pth")
    # a checkpoint that also changed the Llama (fine-tune or LoRA) would lose those weights
    torch.save({"model": original["proj"] | {"llama_model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                              torch.zeros(2, LM)}}, tmp_path / "lora.pth")
    with pytest.raises(ValueError, match="not a fine-tuned or LoRA Llama"):
        convert_skingpt4(tmp_path / "lora.pth", root / "blip2_pretrained_flant5xxl.pth", original["llama_dir"],
                         tmp_path / "c", eva_vit=root / "eva_vit_g.pth", eva_depth=DEPTH)
    # a Q-Former whose heads are not bert-base's 64 wide
    torch.save({"model": original["proj"] | {"query_tokens": torch.zeros(1, QUERIES, 96)}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="unsupported shapes"):
        convert_skingpt4(tmp_path / "odd.pth", root / "blip2_pretrained_flant5xxl.pth", original["llama_dir"],
                         tmp_path / "d", eva_vit=root / "eva_vit_g.pth", eva_depth=DEPTH)


def test_cli_converts(original, tmp_path: Path,  # type: ignore[no-untyped-def]
                      monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from inference.engines import convert
    from skinbridge.cli import main

    monkeypatch.setattr(convert, "LAVIS_EVA_DEPTH", DEPTH)  # the CLI uses LAVIS's 39 blocks
    root, out = original["root"], tmp_path / "converted"
    args = ["models", "convert", "skingpt4", "--checkpoint", str(root / "skinGPT_v1.pth"), "--blip2",
            str(root / "blip2_pretrained_flant5xxl.pth"), "--eva-vit", str(root / "eva_vit_g.pth"), "--llama",
            str(original["llama_dir"]), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "blip-2"
    assert f"SKINBRIDGE_VLM_PATH={out}" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "is not empty" in again.output
    broken = CliRunner().invoke(main, args[:7] + args[9:11] + ["--out", str(tmp_path / "other")])  # no --eva-vit
    assert broken.exit_code == 1 and "--eva-vit" in broken.output

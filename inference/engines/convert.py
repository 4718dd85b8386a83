"""Converters for the seed projects' own checkpoints into folders the VLM engine loads like any other
(issue 21, build 1).

LLaVA-Med (``model_type: llava_mistral``, the layout of LLaVA's own code; MM-Skin's SkinVL adds a LoRA and
``non_lora_trainables.bin`` on top) becomes a transformers ``LlavaForConditionalGeneration`` folder:

- the LoRA is merged (W + B·A·alpha/r; alpha/√r with rsLoRA) and the non-LoRA trainables (the projector)
  replace the base's;
- key names: ``model.layers.*``/``embed_tokens``/``norm`` -> ``model.language_model.*``,
  ``model.mm_projector.{0,2}`` -> ``model.multi_modal_projector.linear_{1,2}``,
  ``model.vision_tower.vision_tower.*`` -> ``model.vision_tower.*``;
- the CLIP vision tower (LLaVA-Med: CLIP ViT-L/14 at 336 px, penultimate layer, patch features without CLS) comes
  from the checkpoint when it carries it, else from ``vision_tower`` (a local CLIP folder: nothing is downloaded);
- an ``<image>`` token is added (LLaVA's code splices the photo at the id -200 instead; the new embedding row is
  the mean of the others and is never read, the photo's features take its places);
- LLaVA's pad-to-square preprocessing (mean colour; ``image_aspect_ratio: pad``) and the Mistral ``[INST]``
  conversation format as the chat template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

# Mistral's [INST] turns with the photo first, as LLaVA-Med v1.5 was trained (conv_mode mistral_instruct)
MISTRAL_LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}{% else %}"
    "{{ ' ' + message['content'][0]['text'] }}{% endif %}{{ eos_token }}{% endif %}{% endfor %}"
)
IMAGE_TOKEN = "<image>"
PEFT_PREFIX = "base_model.model."


def _read_weights(folder: Path, stem: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (sharded or not, safetensors or PyTorch .bin)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob(f"{stem}.safetensors" if stem else "*.safetensors"))
    if not files:
        files = sorted(folder.glob(f"{stem}.bin" if stem else "pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no weights ({stem or 'model'} .safetensors/.bin) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file) if file.suffix == ".safetensors"
                     else torch.load(file, map_location="cpu", weights_only=True))
    return state


def merge_lora(state: dict[str, torch.Tensor], lora: Path) -> dict[str, torch.Tensor]:
    """``state`` with the LoRA in ``lora`` (PEFT layout, as LLaVA's training writes it) merged, and the
    folder's ``non_lora_trainables.bin`` (the projector, trained in full) in place of the base's."""
    config = json.loads((lora / "adapter_config.json").read_text(encoding="utf-8"))
    adapter = _read_weights(lora, "adapter_model")
    merged = dict(state)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        target = key.removeprefix(PEFT_PREFIX).replace(".lora_A.", ".").replace(".default.", ".")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        if target not in merged:
            raise KeyError(f"the LoRA adapts {target}, which the base checkpoint does not have")
        weight = merged[target]
        merged[target] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
    extra = lora / "non_lora_trainables.bin"
    if extra.exists():
        trainables = torch.load(extra, map_location="cpu", weights_only=True)
        for key, value in trainables.items():
            name = key.removeprefix(PEFT_PREFIX)
            if name not in merged and f"model.{name}" in merged:  # saved from the inner model
                name = f"model.{name}"
            merged[name] = value
    return merged


def rename_llava(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA's own key names -> transformers' LlavaForConditionalGeneration names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("model.mm_projector."):
            index = key.split(".")[2]
            new = f"model.multi_modal_projector.linear_{ {'0': 1, '2': 2}[index] }." + key.split(".", 3)[3]
        elif key.startswith("model.vision_tower.vision_tower."):
            new = "model.vision_tower." + key.removeprefix("model.vision_tower.vision_tower.")
        elif key.startswith("model."):
            new = "model.language_model." + key.removeprefix("model.")
        elif key == "lm_head.weight":
            new = key
        else:
            raise KeyError(f"unexpected key in a llava_mistral checkpoint: {key}")
        out[new] = value
    return out


def convert_llava_med(base: str | Path, out: str | Path, *, lora: str | Path | None = None,
                      vision_tower: str | Path | None = None) -> Path:
    """Write a transformers LLaVA folder (model, tokenizer, processor, chat template) for a LLaVA-Med
    checkpoint in LLaVA's ``llava_mistral`` layout, with an optional LoRA (+ non-LoRA trainables) merged."""
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaImageProcessor, LlavaProcessor, MistralConfig)

    base, out = Path(base), Path(out)
    raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") != "llava_mistral":
        raise ValueError(f"{base} is not a LLaVA-Med checkpoint (model_type {raw.get('model_type')!r}, "
                         "expected 'llava_mistral')")
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu" or raw.get("mm_vision_select_feature",
                                                                       "patch") != "patch":
        raise ValueError("only LLaVA-Med's mlp2x_gelu projector on patch features is supported")
    if vision_tower is None:  # its config and preprocessing are needed, and maybe its weights
        raise ValueError(f"pass a local copy of the vision tower ({raw.get('mm_vision_tower')}); nothing is "
                         "downloaded")
    state = _read_weights(base)
    if lora is not None:
        state = merge_lora(state, Path(lora))
    if not any(k.startswith("model.vision_tower.") for k in state):  # LLaVA often leaves the frozen tower out
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(vision_tower, local_files_only=True)
        state |= {f"model.vision_tower.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower, local_files_only=True)

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.chat_template = MISTRAL_LLAVA_TEMPLATE
    state = rename_llava(state)
    vocab = len(tokenizer)
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        weight = state[key]
        if weight.shape[0] < vocab:  # rows for the added tokens: the mean (the <image> row is never read)
            state[key] = torch.cat([weight, weight.float().mean(0, keepdim=True).to(weight.dtype)
                                    .expand(vocab - weight.shape[0], -1)])

    text_fields = {k: v for k, v in raw.items() if not k.startswith(("mm_", "tune_", "freeze_", "image_"))
                   and k not in ("architectures", "model_type", "_name_or_path", "use_mm_proj",
                                 "tokenizer_model_max_length", "tokenizer_padding_side", "unfreeze_mm_vision_tower",
                                 "transformers_version", "torch_dtype", "dtype")}
    text_config = MistralConfig(**(text_fields | {"vocab_size": state["lm_head.weight"].shape[0]}))
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids(
            IMAGE_TOKEN), projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)), image_seq_length=patches,
        tie_word_embeddings=False,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(state["lm_head.weight"].dtype)  # allocate in the checkpoint's precision
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion left {len(missing)} weights missing, {len(unexpected)} unexpected "
                         f"(e.g. {(missing or unexpected)[:3]})")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    clip = json.loads((Path(vision_tower) / "preprocessor_config.json").read_text(encoding="utf-8")) \
        if (Path(vision_tower) / "preprocessor_config.json").exists() else {}
    size = vision_config.image_size
    image_processor = LlavaImageProcessor(
        do_pad=raw.get("image_aspect_ratio", "pad") == "pad",  # LLaVA's expand2square, in the mean colour
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        **{k: clip[k] for k in ("image_mean", "image_std") if k in clip},
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=MISTRAL_LLAVA_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "skinbridge_model.json").write_text(json.dumps({
        "model_id": f"llava-med:{base.name}" + (f"+{Path(lora).name}" if lora else ""),
        "model_version": "converted"}), encoding="utf-8")
    return out

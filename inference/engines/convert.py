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

SkinGPT-4 (MiniGPT-4's layout: LAVIS's EVA-ViT-g + BLIP-2's Q-Former, the trained ``llama_proj`` and a Llama chat
model) becomes a transformers ``Blip2ForConditionalGeneration`` with a Llama text model and MiniGPT-4's
conversation as chat template (``convert_skingpt4``; the key mapping and the one inexact piece, ln_vision's eps,
are in docs/inference.md).
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


def _built_with(model_class: Any, config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """``model_class(config)`` allocated in ``dtype`` with exactly ``state`` loaded (a missing or left-over
    weight means the key mapping is wrong: refuse rather than serve random weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion left {len(missing)} weights missing, {len(unexpected)} unexpected "
                         f"(e.g. {(missing or unexpected)[:3]})")
    return model


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
    # allocate in the checkpoint's precision
    model = _built_with(LlavaForConditionalGeneration, config, state, state["lm_head.weight"].dtype)
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


# --- SkinGPT-4 (MiniGPT-4 layout) ------------------------------------------------------------------
# SkinGPT-4 is MiniGPT-4's code: LAVIS's EVA-ViT-g (39 of EVA-CLIP-g's 40 blocks, no final norm) -> ln_vision ->
# BLIP-2's Q-Former (query branch only) -> llama_proj -> Llama, prompted with MiniGPT-4's Vicuna-style
# conversation (CONV_VISION: this system text, "###" separators, the photo as <Img><ImageHere></Img>).
SKINGPT4_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
                   "provide it to you. Please answer my questions.")
BLIP2_IMAGE_TOKEN = "<image>"
EVA_HEAD_DIM = 88  # LAVIS's create_eva_vit_g: num_heads = 1408 // 88 (head size is not in the weights)
BERT_HEAD_DIM = 64  # the Q-Former is bert-base: 12 heads of 64
LAVIS_EVA_DEPTH = 39  # LAVIS builds 39 blocks and loads eva_vit_g.pth (40 blocks) with strict=False


def minigpt4_template(num_query_tokens: int, system: str = SKINGPT4_SYSTEM) -> str:
    """MiniGPT-4's conversation as a chat template: ``<s>{system}###Human: <Img>[queries]</Img> {question}###
    Assistant:`` (Chat.ask joins the photo and the question with a space; the photo's place holds one
    ``<image>`` per Q-Former query, which the model replaces with the projected queries)."""
    image = "<Img>" + BLIP2_IMAGE_TOKEN * num_query_tokens + "</Img>"
    return (
        "{{ bos_token }}{% set system = namespace(text='" + system + "') %}"
        "{% for message in messages if message['role'] == 'system' %}{% set system.text = message['content'] if "
        "message['content'] is string else message['content'][0]['text'] %}{% endfor %}{{ system.text + '###' }}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{% if message['role'] == 'user' %}{{ 'Human: ' }}{% if message['content'] is string %}"
        "{{ message['content'] }}{% else %}"
        "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '" + image + " ' }}"
        "{% endfor %}{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ part['text'] }}{% endfor %}{% endif %}{{ '###' }}"
        "{% else %}{{ 'Assistant: ' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{{ message['content'][0]['text'] }}{% endif %}{{ '###' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a LAVIS/MiniGPT-4 .pth (``{"model": ...}`` or bare); tensors and plain data only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects beyond tensors/dicts: never unpickled here
        raise ValueError(f"{path} does not load as plain tensors ({exc.__class__.__name__}); re-save its state "
                         "dict with torch.save({'model': state_dict}, ...)") from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return state


def rename_eva_vit(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """LAVIS's EVA-ViT (``visual_encoder.*`` and ``ln_vision.*``) -> transformers' Blip2VisionModel. The separate
    q/v biases become the fused qkv bias (k has none); ``ln_vision`` is BLIP-2's LayerNorm after the encoder,
    transformers' ``post_layernorm``. Anything else in a block (EVA's layer scale gamma_1/gamma_2, relative
    position bias, EVA-02's sub-LN) has no place there: refused rather than dropped."""
    out: dict[str, torch.Tensor] = {}
    simple = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv.weight": "self_attn.qkv.weight",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    fixed = {"visual_encoder.cls_token": "embeddings.class_embedding",
             "visual_encoder.pos_embed": "embeddings.position_embedding",
             "visual_encoder.patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "visual_encoder.patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "ln_vision.weight": "post_layernorm.weight", "ln_vision.bias": "post_layernorm.bias"}
    for key, value in state.items():
        if key in fixed:
            out[f"vision_model.{fixed[key]}"] = value
            continue
        parts = key.split(".", 3)  # visual_encoder.blocks.N.rest
        if key.startswith("visual_encoder.blocks.") and int(parts[2]) >= depth:
            continue  # LAVIS's ViT has `depth` blocks; EVA-CLIP's last one is never run
        if not key.startswith("visual_encoder.blocks."):
            if key.startswith(("visual_encoder.norm.", "visual_encoder.head.", "visual_encoder.fc_norm.")):
                continue  # built by LAVIS but not used by its forward_features
            raise ValueError(f"unsupported EVA-ViT parameter {key}")
        layer, rest = f"vision_model.encoder.layers.{parts[2]}", parts[3]
        if rest in ("attn.q_bias", "attn.v_bias"):
            continue
        name = next((new + rest[len(old):] for old, new in simple.items()
                     if rest == old or rest.startswith(old + ".")), None)
        if name is None:
            raise ValueError(f"unsupported EVA-ViT parameter {key} (transformers' BLIP-2 vision model has no layer "
                             "scale, relative position bias or sub-LN)")
        out[f"{layer}.{name}"] = value
    for index in range(depth):
        prefix = f"visual_encoder.blocks.{index}.attn."
        if prefix + "q_bias" not in state or prefix + "v_bias" not in state:
            raise ValueError(f"EVA-ViT block {index} lacks q_bias/v_bias")
        q, v = state[prefix + "q_bias"], state[prefix + "v_bias"]
        out[f"vision_model.encoder.layers.{index}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    return out


def rename_qformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS's Q-Former (a BERT with cross-attention) -> transformers' Blip2QFormerModel, query branch only:
    MiniGPT-4 deletes the word/position embeddings, the LM head and the text branch's FFN
    (``intermediate``/``output``), so those are left out here too."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        rest = key.removeprefix("Qformer.")
        if rest.startswith("bert.embeddings.LayerNorm."):
            out["qformer.layernorm." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("bert.encoder.layer."):
            _, _, _, index, block, tail = rest.split(".", 5)
            if block in ("intermediate", "output"):
                continue
            if block not in ("attention", "crossattention", "intermediate_query", "output_query"):
                raise ValueError(f"unsupported Q-Former parameter {key}")
            tail = tail.replace("self.", "attention.", 1) if tail.startswith("self.") else tail
            out[f"qformer.encoder.layer.{index}.{block}.{tail}"] = value
        elif not rest.startswith(("cls.", "bert.embeddings.")):
            raise ValueError(f"unsupported Q-Former parameter {key}")
    return out


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def convert_skingpt4(checkpoint: str | Path, blip2: str | Path, llama: str | Path, out: str | Path, *,
                     eva_vit: str | Path | None = None, eva_depth: int | None = None) -> Path:
    """Write a transformers BLIP-2 folder (EVA-ViT-g + Q-Former + SkinGPT-4's llama_proj + the Llama chat model,
    processor, MiniGPT-4's conversation as chat template) from SkinGPT-4's MiniGPT-4 checkpoint (``checkpoint``),
    BLIP-2's LAVIS checkpoint (``blip2``: ln_vision, Q-Former, query tokens, maybe the ViT), LAVIS's
    ``eva_vit_g.pth`` (``eva_vit``, when neither file carries ``visual_encoder.*``) and a local HF Llama folder.
    As in MiniGPT-4, the checkpoint's weights win over BLIP-2's."""
    from transformers import (AutoConfig, AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration,
                              Blip2Processor, Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessorPil)

    checkpoint, llama, out = Path(checkpoint), Path(llama), Path(out)
    trained = _load_pth(checkpoint)
    known = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens", "llama_proj.")
    foreign = [k for k in trained if not k.startswith(known)]
    if foreign:  # MiniGPT-4 would load these (strict=False) and we would drop them
        raise ValueError(f"{checkpoint} has weights this converter does not map (e.g. {foreign[:3]}); only "
                         "SkinGPT-4's llama_proj (and BLIP-2 parts) are supported, not a fine-tuned or LoRA Llama")
    if "llama_proj.weight" not in trained:
        raise ValueError(f"{checkpoint} has no llama_proj: not a MiniGPT-4/SkinGPT-4 checkpoint")
    state = {k: v for k, v in _load_pth(Path(blip2)).items() if k.startswith(known[:4])}
    state |= trained
    depth = _count(state, "visual_encoder.blocks.")
    if not depth:
        if eva_vit is None:
            raise ValueError("neither checkpoint carries the EVA-ViT (visual_encoder.*): pass LAVIS's eva_vit_g.pth "
                             "as --eva-vit")
        state |= {f"visual_encoder.{k}": v for k, v in _load_pth(Path(eva_vit)).items()}
        depth = eva_depth or LAVIS_EVA_DEPTH
        if _count(state, "visual_encoder.blocks.") < depth:
            raise ValueError(f"{eva_vit} has fewer than the {depth} EVA-ViT blocks LAVIS builds")
    missing = [k for k in ("query_tokens", "ln_vision.weight", "visual_encoder.pos_embed",
                           "Qformer.bert.embeddings.LayerNorm.weight") if k not in state]
    if missing:
        raise ValueError(f"missing from the checkpoints: {missing}")

    vision = rename_eva_vit({k: v for k, v in state.items() if k.startswith(known[:2])}, depth)
    qformer = rename_qformer({k: v for k, v in state.items() if k.startswith("Qformer.")})
    width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["visual_encoder.pos_embed"].shape[1] - 1)
    queries, qwidth = state["query_tokens"].shape[1:]
    layers = _count(state, "Qformer.bert.encoder.layer.")
    cross = sorted(int(k.split(".")[4]) for k in state
                   if k.startswith("Qformer.bert.encoder.layer.") and ".crossattention.self.key.weight" in k)
    frequency = cross[1] - cross[0] if len(cross) > 1 else layers
    if (width % EVA_HEAD_DIM or qwidth % BERT_HEAD_DIM or grid * grid + 1 != state["visual_encoder.pos_embed"]
            .shape[1] or not cross or cross != list(range(0, layers, frequency))):
        raise ValueError(f"unsupported shapes: ViT width {width} (heads of {EVA_HEAD_DIM}), Q-Former width {qwidth} "
                         f"(heads of {BERT_HEAD_DIM}), {state['visual_encoder.pos_embed'].shape[1]} positions, "
                         f"cross-attention in layers {cross}")
    text_config = AutoConfig.from_pretrained(llama, local_files_only=True)
    if text_config.model_type != "llama":
        raise ValueError(f"{llama} is a {text_config.model_type!r} model, not the Llama SkinGPT-4 was trained on")
    if tuple(state["llama_proj.weight"].shape) != (text_config.hidden_size, qwidth):
        raise ValueError(f"llama_proj {tuple(state['llama_proj.weight'].shape)} does not join a {qwidth}-wide "
                         f"Q-Former to this {text_config.hidden_size}-wide Llama: a different Llama than trained")

    tokenizer = AutoTokenizer.from_pretrained(llama, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as MiniGPT-4 sets it
    template = minigpt4_template(queries)
    tokenizer.chat_template = template  # the processor drops its own on loading; the tokenizer keeps this one
    image_processor = BlipImageProcessorPil(  # MiniGPT-4's Blip2ImageEvalProcessor: square bicubic resize
        size={"height": grid * patch, "width": grid * patch}, resample=3, do_convert_rgb=True)
    # no num_query_tokens: the template places the <image> run where MiniGPT-4 puts the photo, not in front
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=None)
    processor.chat_template = template
    image_id = tokenizer.convert_tokens_to_ids(BLIP2_IMAGE_TOKEN)

    text_state = {f"language_model.{k}": v for k, v in _read_weights(llama).items()}
    vocab = len(tokenizer)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        weight = text_state.get(key)
        if weight is not None and weight.shape[0] < vocab:  # the <image> row: never read (the queries take its places)
            text_state[key] = torch.cat([weight, weight.float().mean(0, keepdim=True).to(weight.dtype)
                                         .expand(vocab - weight.shape[0], -1)])
    text_config.vocab_size = text_state["language_model.model.embed_tokens.weight"].shape[0]
    # MiniGPT-4 stops at its "###" separator as well as at </s>; BLIP-2's generate() runs the language model's
    # own generation config, which comes from this text config
    separator = tokenizer.convert_tokens_to_ids("###")
    if isinstance(separator, int) and separator != tokenizer.unk_token_id:
        text_config.eos_token_id = [tokenizer.eos_token_id, separator]
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=width, intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=depth, num_attention_heads=width // EVA_HEAD_DIM, image_size=grid * patch,
            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=qwidth, num_hidden_layers=layers, num_attention_heads=qwidth // BERT_HEAD_DIM,
            intermediate_size=state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            cross_attention_frequency=frequency, layer_norm_eps=1e-12,
            encoder_hidden_size=state[f"Qformer.bert.encoder.layer.{cross[0]}.crossattention.self.key.weight"]
            .shape[1]).to_dict(),
        text_config=text_config.to_dict(), num_query_tokens=queries, image_token_index=image_id,
    )
    weights = vision | qformer | text_state | {
        "query_tokens": state["query_tokens"], "language_projection.weight": state["llama_proj.weight"],
        "language_projection.bias": state["llama_proj.bias"]}
    model = _built_with(Blip2ForConditionalGeneration, config, weights,  # in the Llama's precision
                        text_state["language_model.model.embed_tokens.weight"].dtype)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "skinbridge_model.json").write_text(json.dumps({
        "model_id": f"skingpt4:{checkpoint.stem}", "model_version": "converted"}), encoding="utf-8")
    return out

"""Random-weight model builders with real architectures, for benchmarks and tests.

Everything here is built in-process (no download): a byte-level BPE tokenizer trained on the
project's own prompt texts, a LLaVA-style VLM (CLIP vision tower + Llama text model) at any size
from tiny to LLaVA-1.5-7B, and a Stable-Diffusion-style pipeline from tiny to SD-1.5 size. Saved
with ``save_pretrained`` they load through exactly the production code paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.engines.guardrails import PROMPTS_DIR

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus(extra: list[str] | None = None) -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in sorted(PROMPTS_DIR.glob("*")) if p.is_file()]
    texts += [
        '{"differential": [{"condition": "Melanoma", "probability": 0.7}], "features": {}, '
        '"urgency_hints": ["bleeding"], "advice": "See a dermatologist."}',
        "melanoma nevus basal cell carcinoma acne psoriasis eczema seborrheic keratosis",
    ]
    return texts + list(extra or [])


def train_tokenizer(extra_texts: list[str] | None = None, vocab_size: int = 600, model_max_length: int = 2048, *,
                    special_tokens: list[str] | None = None, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>",
                    unk: str = "<unk>", add_bos: bool = False, extra_special_tokens: dict[str, str] | None = None,
                    chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer (encodes any text losslessly) with a chat template.

    The keyword arguments give it another family's special tokens (Gemma's ``<bos>``/``<start_of_turn>``,
    Llama 3's ``<|begin_of_text|>``, ...), a BOS that encoding adds, as such tokenizers do (``add_bos``), and that
    family's template (``None``: none, as PaliGemma and BLIP-2 processors have)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    extra = {"image_token": "<image>"} if extra_special_tokens is None else extra_special_tokens
    specials = list(dict.fromkeys([pad, bos, eos, unk, *(special_tokens or SPECIAL_TOKENS[4:]), *extra.values()]))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(extra_texts), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=extra,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


# --- LLaVA-style VLM ------------------------------------------------------------------------
@dataclass(frozen=True)
class LlavaDims:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


TINY_LLAVA = LlavaDims(30, 6, 32, 2, 2, 64, 64, 2, 4, 128, 640)
# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px + Llama-2-7B
LLAVA_1_5_7B = LlavaDims(336, 14, 1024, 24, 16, 4096, 4096, 32, 32, 11008, 32064)


def build_llava(dims: LlavaDims, tokenizer: Any | None = None, *, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration with random weights, LlavaProcessor)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tokenizer or train_tokenizer()
    if len(tokenizer) > dims.vocab_size:
        raise ValueError("the tokenizer is larger than the model's vocabulary")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=dims.vision_hidden, intermediate_size=dims.vision_intermediate,
        num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
        image_size=dims.image_size, patch_size=dims.patch_size, projection_dim=dims.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=dims.text_hidden, intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads, num_key_value_heads=dims.text_heads,
        vocab_size=dims.vocab_size, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=dims.image_tokens, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate directly in the target precision (7B in fp32 = 28 GB)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": dims.image_size}, crop_size={"height": dims.image_size, "width": dims.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=dims.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def save_vlm(folder: str | Path, model: Any, processor: Any) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


# --- Stable-Diffusion-style pipeline --------------------------------------------------------
@dataclass(frozen=True)
class SDDims:
    unet_channels: tuple[int, ...]
    unet_layers: int
    cross_attention_dim: int
    attention_head_dim: int
    vae_channels: tuple[int, ...]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab: int
    image_size: int
    norm_groups: int = 32

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


TINY_SD = SDDims((32, 64), 1, 32, 8, (32, 64), 32, 2, 4, 64, 640, 32, norm_groups=8)
# Stable Diffusion 1.5: UNet 860 M, VAE 84 M, CLIP ViT-L/14 text encoder 123 M, 512 px
SD_1_5 = SDDims((320, 640, 1280, 1280), 2, 768, 8, (128, 256, 512, 512), 768, 12, 12, 3072, 49408, 512)


def build_sd_pipeline(dims: SDDims, tokenizer: Any | None = None, *, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> Any:
    """A StableDiffusionPipeline with random weights (safety checker off: images are synthetic)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tokenizer or train_tokenizer(model_max_length=77)
    n = len(dims.unet_channels)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=dims.latent_size, in_channels=4, out_channels=4, layers_per_block=dims.unet_layers,
                block_out_channels=dims.unet_channels,
                down_block_types=tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]) if n > 2
                else ("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)) if n > 2
                else ("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=dims.cross_attention_dim, attention_head_dim=dims.attention_head_dim,
                norm_num_groups=dims.norm_groups,
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=dims.vae_channels,
                down_block_types=("DownEncoderBlock2D",) * len(dims.vae_channels),
                up_block_types=("UpDecoderBlock2D",) * len(dims.vae_channels),
                layers_per_block=2 if dims.image_size >= 256 else 1, sample_size=dims.image_size,
                norm_num_groups=dims.norm_groups,
            )
            text_encoder = CLIPTextModel(CLIPTextConfig(
                hidden_size=dims.text_hidden, intermediate_size=dims.text_intermediate,
                num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads,
                vocab_size=max(dims.text_vocab, len(tokenizer)), max_position_embeddings=77,
                projection_dim=dims.text_hidden, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            ))
    finally:
        torch.set_default_dtype(previous)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_random_lora(pipeline: Any, folder: str | Path, *, rank: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    """A LoRA adapter on the UNet's attention projections with random (non-zero) weights, saved in
    diffusers format (``pytorch_lora_weights.safetensors``) as a trained per-condition adapter is."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipeline.unet
    name = f"random_{seed}"
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in unet.named_parameters():
            if "lora_B" in param_name and f".{name}." in param_name:  # B starts at zero: make it matter
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    state = get_peft_model_state_dict(unet, adapter_name=name)
    unet.delete_adapters(name)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, safe_serialization=True)
    return Path(folder)

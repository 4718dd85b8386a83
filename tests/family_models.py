"""Tiny random-weight checkpoints of the VLM families a clinic may bring (issue 21, build 2).

Each builder makes the family's real model class, processor class and prompt format at a tiny size, with a
tokenizer trained on the fly that carries the family's own special tokens (nothing is downloaded), and saves
them with ``save_pretrained`` as a clinic's checkpoint folder is. The chat templates are the ones the
public checkpoints ship (``chat_template.json``), reproduced here because nothing may be downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.engines.synthetic import save_vlm, train_tokenizer

# google/gemma-3-*-it and google/medgemma-4b-it: the template writes BOS itself, and so does the tokenizer
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# llava-hf/llava-v1.6-mistral-7b-hf: Mistral [INST] turns, images first; no BOS in the template
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}"
    "{% endif %}{% endfor %}"
)

# HuggingFaceM4/Idefics3-8B-Llama3: Llama 3's BOS written by the template (the tokenizer adds one too)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct: ChatML with a default system turn; no BOS at all
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct: Idefics3's turns; BOS written by the template, not added by the tokenizer
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass
class VideoCapableProcessor:
    """A processor that also handles video (Qwen2-VL, Qwen2.5-VL, SmolVLM), saved the way ``save_pretrained``
    writes it where torchvision is installed: processor_config.json carries the video processor too. It
    cannot be built here (its video part needs torchvision), so its parts are written as transformers would."""

    processor_class: str
    image_processor: Any
    tokenizer: Any
    video_processor: dict[str, Any]
    chat_template: str
    extra: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        config = {"image_processor": self.image_processor.to_dict(), "processor_class": self.processor_class,
                  "video_processor": self.video_processor, **self.extra}
        (Path(folder) / "processor_config.json").write_text(json.dumps(config, indent=2, default=str))
        (Path(folder) / "chat_template.jinja").write_text(self.chat_template)


def _vision(cls: Any, **extra: Any) -> Any:
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **extra)


def _text(cls: Any, tokenizer: Any, vocab: int, **extra: Any) -> Any:
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, **extra)


def _finish(model: Any, tokenizer: Any) -> Any:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def gemma3(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    tok = train_tokenizer(tokenizer_texts, special_tokens=["<start_of_turn>", "<end_of_turn>"], bos="<bos>",
                          eos="<eos>", add_bos=True, chat_template=GEMMA3_TEMPLATE, extra_special_tokens={
                              "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    config = Gemma3Config(
        vision_config=_vision(SiglipVisionConfig, image_size=28, patch_size=7),
        text_config=_text(Gemma3TextConfig, tok, 640, head_dim=16, sliding_window=64),
        mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    model = _finish(Gemma3ForConditionalGeneration(config), tok)
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return model, Gemma3Processor(image_processor, tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)


def paligemma(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessorPil, SiglipVisionConfig)

    tok = train_tokenizer(tokenizer_texts, special_tokens=[], bos="<bos>", eos="<eos>", add_bos=True,
                          chat_template=None)
    image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    image_processor.image_seq_length = 16  # (28 / 7)^2, as PaliGemma checkpoints record it
    processor = PaliGemmaProcessor(image_processor, tok)  # adds <image> and the 1,152 <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=_vision(SiglipVisionConfig, image_size=28, patch_size=7, projection_dim=64),
        text_config=_text(GemmaConfig, tok, 2048, head_dim=16), image_token_index=tok.image_token_id,
        projection_dim=64,
    )
    return _finish(PaliGemmaForConditionalGeneration(config), tok), processor


def blip2(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessorPil, OPTConfig)

    # OPT's tokenizer: </s> doubles as BOS and is added to every text; the processor adds <image>
    tok = train_tokenizer(tokenizer_texts, special_tokens=[], bos="</s>", eos="</s>", add_bos=True,
                          chat_template=None, extra_special_tokens={})
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": 28, "width": 28}), tok, num_query_tokens=4)
    config = Blip2Config(
        vision_config=_vision(Blip2VisionConfig, image_size=28, patch_size=7).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, encoder_hidden_size=32).to_dict(),
        text_config=OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, vocab_size=640, max_position_embeddings=2048,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id).to_dict(),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _finish(Blip2ForConditionalGeneration(config), tok), processor


def instructblip(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    from transformers import (BertTokenizerFast, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor, InstructBlipQFormerConfig, InstructBlipVisionConfig,
                              LlamaConfig, BlipImageProcessorPil)

    # Vicuna: Llama's <s>, added to every text; the processor adds <image>
    tok = train_tokenizer(tokenizer_texts, special_tokens=[], add_bos=True, chat_template=None,
                          extra_special_tokens={})
    # the Q-Former reads the instruction too, with BERT's WordPiece tokenizer
    words = sorted({w.lower().strip(".,:;!?()\"'{}[]") for t in tokenizer_texts for w in t.split()} - {""})
    qformer_tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[:400]])})
    processor = InstructBlipProcessor(BlipImageProcessorPil(size={"height": 28, "width": 28}), tok, qformer_tok,
                                      num_query_tokens=4)
    config = InstructBlipConfig(
        vision_config=_vision(InstructBlipVisionConfig, image_size=28, patch_size=7).to_dict(),
        qformer_config=InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, encoder_hidden_size=32,
                                                 vocab_size=len(qformer_tok)).to_dict(),
        text_config=_text(LlamaConfig, tok, 640).to_dict(),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _finish(InstructBlipForConditionalGeneration(config), tok), processor


def llava_next(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, MistralConfig)

    tok = train_tokenizer(tokenizer_texts, special_tokens=["[INST]", "[/INST]"], add_bos=True,
                          chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE)
    pinpoints = [[28, 28], [28, 56], [56, 28]]
    config = LlavaNextConfig(
        vision_config=_vision(CLIPVisionConfig, image_size=28, patch_size=7, projection_dim=32),
        text_config=_text(MistralConfig, tok, 640), image_token_index=tok.image_token_id,
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor, tok, patch_size=7, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE)
    return _finish(LlavaNextForConditionalGeneration(config), tok), processor


def idefics3(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = train_tokenizer(tokenizer_texts, special_tokens=["<fake_token_around_image>", "<end_of_utterance>",
                                                           "<global-img>", *grid],
                          bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|finetune_right_pad_id|>",
                          add_bos=True, chat_template=IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config=_vision(Idefics3VisionConfig, image_size=28, patch_size=7).to_dict(),
        text_config=_text(LlamaConfig, tok, 640).to_dict(), scale_factor=2, image_token_id=tok.image_token_id,
        pad_token_id=tok.pad_token_id,
    )
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
    processor = Idefics3Processor(image_processor, tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    return _finish(Idefics3ForConditionalGeneration(config), tok), processor


def _qwen_tokenizer(tokenizer_texts: list[str]) -> Any:
    tok = train_tokenizer(tokenizer_texts, special_tokens=["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                           "<|vision_end|>", "<|video_pad|>"],
                          bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
                          extra_special_tokens={"image_token": "<|image_pad|>"}, chat_template=QWEN2_VL_TEMPLATE)
    tok.bos_token = None  # Qwen's tokenizers have none: the prompt starts with <|im_start|>
    return tok


def _qwen(tokenizer_texts: list[str], version: str) -> tuple[Any, Any]:
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tok = _qwen_tokenizer(tokenizer_texts)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=640, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        config_cls, model_cls, processor_class = "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"
    else:  # 2.5: windowed attention in the vision tower, full attention in the listed blocks
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], window_size=56)
        config_cls, model_cls = "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"
        processor_class = "Qwen2_5_VLProcessor"
    config = getattr(transformers, config_cls)(
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        text_config=text, image_token_id=tok.image_token_id, **ids)
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=56 * 56)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels)
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2,
             "temporal_patch_size": 2, **pixels}
    model = _finish(getattr(transformers, model_cls)(config), tok)
    return model, VideoCapableProcessor(processor_class, image_processor, tok, video, QWEN2_VL_TEMPLATE)


def qwen2_vl(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    return _qwen(tokenizer_texts, "2")


def qwen2_5_vl(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    return _qwen(tokenizer_texts, "2.5")


def smolvlm(tokenizer_texts: list[str]) -> tuple[Any, Any]:
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, \
        SmolVLMVisionConfig

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = train_tokenizer(tokenizer_texts, special_tokens=["<fake_token_around_image>", "<end_of_utterance>",
                                                           "<global-img>", "<|im_end|>", *grid],
                          bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>",
                          chat_template=SMOLVLM_TEMPLATE)
    config = SmolVLMConfig(
        vision_config=_vision(SmolVLMVisionConfig, image_size=28, patch_size=7).to_dict(),
        text_config=_text(LlamaConfig, tok, 640).to_dict(), scale_factor=2, image_token_id=tok.image_token_id,
        pad_token_id=tok.pad_token_id,
    )
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
    video = {"video_processor_type": "SmolVLMVideoProcessor", "size": {"longest_edge": 56},
             "max_image_size": {"longest_edge": 28}, "num_frames": 8, "fps": 1}
    model = _finish(SmolVLMForConditionalGeneration(config), tok)
    return model, VideoCapableProcessor("SmolVLMProcessor", image_processor, tok, video, SMOLVLM_TEMPLATE,
                                        {"image_seq_len": 4})


BUILDERS: dict[str, Callable[[list[str]], tuple[Any, Any]]] = {
    "gemma3": gemma3, "paligemma": paligemma, "blip-2": blip2, "instructblip": instructblip,
    "llava_next": llava_next, "idefics3": idefics3, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl,
    "smolvlm": smolvlm,
}


def build_family(name: str, folder: Path, tokenizer_texts: list[str], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model, processor = BUILDERS[name](tokenizer_texts)
    return save_vlm(folder, model, processor)

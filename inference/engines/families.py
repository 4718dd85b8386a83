"""Per-family prompt building for VLM checkpoints (issue 21, build 2).

Most processors carry a chat template; a few families do not (PaliGemma, BLIP-2, InstructBLIP) and take
a plain prompt in their own format, unless the checkpoint brings a template (a converted SkinGPT-4).
Families differ in how many photos one prompt may carry, and some
templates emit the BOS token that the tokenizer adds again (Gemma 3 / MedGemma): one BOS only.
Qwen2-VL, Qwen2.5-VL and SmolVLM processors also handle video, which needs torchvision; where it is not
installed they load without their video part (:func:`load_processor`): SkinBridge sends photos only.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str
    max_images: int | None  # photos one prompt may carry (None: as many as the context allows)
    plain_prompt: str | None = None  # format of the prompt where the checkpoint has no chat template


FAMILIES = {
    # PaliGemma: "<image>...<bos>prefix\n"; the processor adds BOS after the image tokens and the newline;
    # trained on one image per prompt
    "paligemma": Family("paligemma", 1, "{prompt}"),
    # BLIP-2 / InstructBLIP: one image through the Q-Former; OPT/Flan-T5 style question prompt
    "blip-2": Family("blip-2", 1, "Question: {prompt} Answer:"),
    "instructblip": Family("instructblip", 1, "{prompt}"),
    "llava": Family("llava", None),
    "llava_next": Family("llava_next", None),
    "gemma3": Family("gemma3", None),
    "idefics3": Family("idefics3", None),
    "smolvlm": Family("smolvlm", None),
    "qwen2_vl": Family("qwen2_vl", None),
    "qwen2_5_vl": Family("qwen2_5_vl", None),
}


def family_of(model: Any) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return FAMILIES.get(model_type, Family(model_type or "unknown", None))


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def build_inputs(processor: Any, family: Family, images: list[Image.Image], prompt: str) -> Any:
    """Processor inputs for one user turn with ``images`` attached (already limited to the family's count)."""
    photos = [img.convert("RGB") for img in images]
    tokenizer = getattr(processor, "tokenizer", processor)
    # the checkpoint's own template wins over the family's plain prompt (a converted SkinGPT-4 is a BLIP-2 with
    # MiniGPT-4's conversation); BLIP-2's processor drops its template on loading, its tokenizer keeps it
    templated = next((owner for owner in (processor, tokenizer) if getattr(owner, "chat_template", None)), None)
    if family.name == "paligemma" or templated is None:
        text = (family.plain_prompt or "{prompt}").format(prompt=prompt.strip())
        if family.name == "paligemma":  # image tokens first; one list of photos per prompt (a flat list reads
            # as one photo per prompt: "Received 2 images for 1 prompts")
            text = processor.image_token * len(photos) + text
            return processor(images=[photos] if photos else None, text=[text], return_tensors="pt")
        return processor(images=photos or None, text=text, return_tensors="pt")
    content: list[dict[str, Any]] = [{"type": "image"} for _ in photos]
    content.append({"type": "text", "text": prompt})
    chat = templated.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and chat.startswith(bos) and _adds_bos(tokenizer):
        chat = chat[len(bos):]  # the tokenizer adds it: one BOS, not two
    return processor(images=photos or None, text=chat, return_tensors="pt")


def context_limit(model: Any, tokenizer: Any) -> int | None:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if limit else None


# --- loading ------------------------------------------------------------------------------------
def load_processor(path: Path) -> Any:
    """The checkpoint's processor, from the local folder only.

    A processor that also handles video (Qwen2-VL, Qwen2.5-VL, SmolVLM) builds its video processor on
    torchvision; without torchvision (the CPU machines here: their only torchvision wheel is a CUDA build)
    it is built from the same folder without that part. Photos go through the image processor's PIL
    backend exactly as they would otherwise; a video passed to it would fail, and none ever is."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        processor = _image_only_processor(Path(path))
        if processor is None:
            raise
        log.info("torchvision is not installed: %s loaded without its video processor (photos only)",
                 type(processor).__name__)
        return processor


def _image_only_processor(path: Path) -> Any | None:
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    config: dict[str, Any] = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (path / name).is_file() and not config.get("processor_class"):
            config = json.loads((path / name).read_text())
    cls = getattr(transformers, str(config.get("processor_class", "")), None)
    accepted = inspect.signature(cls.__init__).parameters if cls is not None else {}
    if "video_processor" not in accepted:
        return None

    video_settings = config.get("video_processor") or {}

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        # ProcessorMixin takes its parts from __init__'s signature: without video_processor it asks for none
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                     **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
            self.video_processor = _NoVideo(video_settings)  # its settings (SmolVLM's template reads them)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = config.get("chat_template") or getattr(tokenizer, "chat_template", None)
    if (path / "chat_template.json").is_file():  # older saves
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    if (path / "chat_template.jinja").is_file():  # what transformers writes now
        template = (path / "chat_template.jinja").read_text()
    extra = {key: value for key, value in config.items()
             if key in accepted and key not in ("image_processor", "tokenizer", "video_processor", "chat_template")}
    return ImageOnly(AutoImageProcessor.from_pretrained(path, local_files_only=True), tokenizer,
                     chat_template=template, **extra)


class _NoVideo:
    """Where a processor's video part would be: the checkpoint's video settings, and a clear error if a video
    is ever processed."""

    def __init__(self, settings: dict[str, Any]):
        self.__dict__.update(settings)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this processor was loaded without video support: torchvision is not installed")

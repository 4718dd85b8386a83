"""Explanation images: AI-generated examples of what a condition typically looks like.

They help a patient understand a preliminary result; they never show the patient's own skin, and
each PNG carries a visible "AI-generated" caption plus machine-readable provenance
(:func:`~inference.engines.base.mark_ai_generated`). Generation is seeded: the same case gets the
same pictures on every worker and every retry. ``generate`` (for patients) draws only conditions a
dermatologist approved for these weights and settings, passed in from the clinic database
(clinic_db.explainer_review); ``render`` draws without that gate, for reviewers and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from pathlib import Path
from string import Template
from typing import Any

import torch
from PIL import Image, ImageOps

from inference.engines.base import mark_ai_generated, model_sha256, pick_device
from inference.engines.clinical_review import ReviewSubject, generator_subject
from inference.engines.generator_net import ddim_sample, load_generator_parts, to_uint8
from inference.engines.guardrails import PROMPTS_DIR

CAPTIONS = {
    "en": "AI-generated example of $name - not your photo, not a diagnosis",
    "de": "KI-generiertes Beispiel: $name - nicht Ihr Foto, keine Diagnose",
}
# an example drawn over the patient's photo (SKINBRIDGE_SD_IMG2IMG_STRENGTH): it looks like their skin, so the
# caption says plainly what it is
PHOTO_CAPTIONS = {
    "en": "AI-generated example of $name, drawn over the layout of your photo - not your skin, not a diagnosis",
    "de": "KI-generiertes Beispiel: $name, über den Aufbau Ihres Fotos gezeichnet - nicht Ihre Haut, "
          "keine Diagnose",
}
LORA_DIR = "loras"  # <sd_path>/loras/<condition code>/: a diffusers/kohya LoRA file or a PEFT adapter folder
PEFT_PARTS = ("", "unet", "text_encoder")  # where a PEFT adapter_config.json may sit in loras/<code>/
log = logging.getLogger(__name__)


def _condition_name(vocabulary: Any | None, code: str, lang: str) -> str:
    if vocabulary:  # None/False: no vocabulary wanted (benchmarks), the code is the name
        try:
            return vocabulary.get(code).name(lang)
        except KeyError:
            pass
    return code.replace("_", " ")


def _default_vocabulary() -> Any | None:
    try:
        from inference.vocabulary import load_vocabulary
    except ImportError:
        return None
    return load_vocabulary()


def caption_for(vocabulary: Any | None, code: str, lang: str = "en", *, from_photo: bool = False) -> str:
    captions = PHOTO_CAPTIONS if from_photo else CAPTIONS
    return Template(captions.get(lang, captions["en"])).substitute(name=_condition_name(vocabulary, code, lang))


MIN_RECOGNITION = 0.8  # the bar for showing a generated class to patients


class ClassConditionalExplainer:
    """The project's own small class-conditional DDIM generator (see generator_net).

    It offers (``knows``) the classes it was trained on that, when the folder's ``metrics.json``
    holds the measured recognition (the classifier naming generated pictures as their class), reach
    ``min_recognition``; patients get them only once a dermatologist approved them (``generate``'s
    ``approved``). Other classes can still be ``sample``d and ``render``ed for evaluation and review.
    """

    def __init__(self, path: str | Path, device: str = "auto", vocabulary: Any | None = None,
                 display_size: int = 256, min_recognition: float = MIN_RECOGNITION) -> None:
        self.path = Path(path)
        self.device = pick_device(device)
        unet, self.scheduler, self.config = load_generator_parts(self.path)
        # weights may be stored in fp16; CPUs compute in fp32
        self.unet = unet.to(self.device, torch.float32 if self.device == "cpu" else unet.dtype).eval()
        self.vocabulary = vocabulary if vocabulary is not None else _default_vocabulary()
        self.display_size = display_size
        self.model_id = f"{self.config.model_id}@{self.config.model_version}"
        self.review_subject = generator_subject(self.path)
        self.weights_sha256 = self.review_subject.weights_sha256
        self.recognition = _measured_recognition(self.path)
        self.min_recognition = min_recognition
        self.offered = [c for c in self.codes
                        if self.recognition is None or self.recognition.get(c, 0.0) >= min_recognition]

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", **kwargs: Any) -> "ClassConditionalExplainer":
        return cls(path, device, **kwargs)

    @property
    def codes(self) -> list[str]:
        """Conditions it was trained to draw (a trained null class for guidance is not one of them)."""
        return list(self.review_subject.codes)

    def knows(self, code: str) -> bool:
        """Whether it offers pictures of ``code`` (trained, and recognised at the bar)."""
        return code in self.offered

    @torch.inference_mode()
    def sample(self, code: str, n: int, seed: int, steps: int | None = None) -> torch.Tensor:
        """n images (n x 3 x S x S in [0, 1], on CPU); image i depends only on (code, seed + i)."""
        if code not in self.codes:
            raise KeyError(f"the generator was not trained on {code!r}")
        size = self.config.sample_size
        # noise drawn on the CPU per image: identical pictures on CPU and GPU workers, whatever n is
        noise = torch.stack([
            torch.randn((3, size, size), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)
        ]).to(self.device, self.unet.dtype)
        return ddim_sample(self.unet, self.config, self.config.class_codes.index(code), noise, steps=steps)

    uses_photo = False  # draws from its class alone

    def generate(self, condition_code: str, n: int, seed: int, lang: str = "en", *,
                 approved: Collection[str], photo: Image.Image | None = None) -> list[bytes]:
        """Captioned, provenance-marked PNGs for a patient: only classes it ``knows`` that are ``approved``."""
        _check_patient_ready(self, condition_code, approved, "not trained, or recognised below the bar")
        return self.render(condition_code, n, seed, lang)

    def render(self, condition_code: str, n: int, seed: int, lang: str = "en") -> list[bytes]:
        """The PNGs ``generate`` would send, without the patient gate: for benchmarks and reviewers."""
        images = self.sample(condition_code, n, seed)
        caption = caption_for(self.vocabulary, condition_code, lang)
        out = []
        for img in to_uint8(images):
            pil = Image.fromarray(img)
            pil = pil.resize((self.display_size, self.display_size), Image.Resampling.LANCZOS)
            out.append(mark_ai_generated(pil, caption, generator=self.model_id))
        return out


def _check_patient_ready(explainer: Any, code: str, approved: Collection[str], why_unknown: str) -> None:
    if not explainer.knows(code):
        raise KeyError(f"no pictures of {code!r} ({why_unknown})")
    if code not in approved:
        raise KeyError(f"pictures of {code!r} are not approved by a dermatologist for these weights and settings")


def _measured_recognition(folder: Path) -> dict[str, float] | None:
    """Per-class recognition from ``metrics.json`` (see inference.training.train_generator), if measured."""
    path = folder / "metrics.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text(encoding="utf-8")).get("recognition") or {}
    per_class = rec.get("per_class")
    return {str(k): float(v) for k, v in per_class.items()} if isinstance(per_class, dict) else None


class StableDiffusionExplainer:
    """A local Stable-Diffusion-style checkpoint with one LoRA adapter per condition.

    Folder: the diffusers pipeline layout + ``loras/<code>/`` (one adapter each) + optional
    ``prompts.json`` (same form as ``prompts/sd_conditions.json``)."""

    def __init__(self, path: str | Path, device: str = "auto", vocabulary: Any | None = None,
                 num_inference_steps: int | None = None, image_size: int | None = None,
                 img2img_strength: float | None = None) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        self.path = Path(path)
        self.device = pick_device(device)
        # fp16 on GPUs; the keyword is only passed there (its name changed across diffusers versions)
        extra: dict[str, Any] = {"torch_dtype": torch.float16} if self.device.startswith("cuda") else {}
        self.pipe = StableDiffusionPipeline.from_pretrained(
            self.path, local_files_only=True, safety_checker=None, requires_safety_checker=False, **extra,
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        # image-conditioned examples (SkinGEN's "faithful visual reconstruction"): the same weights and
        # adapters, starting from the patient's photo noised by this much (0-1), so the example follows their
        # body site and skin tone; None: from text alone
        self.img2img_strength = img2img_strength
        self.img2img = StableDiffusionImg2ImgPipeline.from_pipe(self.pipe) if img2img_strength else None
        prompts_file = self.path / "prompts.json"
        self.prompts: dict[str, Any] = json.loads(
            (prompts_file if prompts_file.exists() else PROMPTS_DIR / "sd_conditions.json").read_text(encoding="utf-8")
        )
        self.vocabulary = vocabulary if vocabulary is not None else _default_vocabulary()
        self.num_inference_steps = num_inference_steps or int(self.prompts.get("num_inference_steps", 30))
        self.image_size = image_size
        # every adapter is loaded now: a condition is offered (for review, then to patients) only if its LoRA
        # really loaded; the reason for each one left out is logged and kept in ``unusable``
        self.unusable: dict[str, str] = {}
        self._loaded: list[str] = []
        for code in self.adapter_folders():
            try:
                load_lora(self.pipe, self.path / LORA_DIR / code, code)
                self._loaded.append(code)
            except Exception as exc:  # noqa: BLE001 - a broken adapter must not stop the worker
                self.unusable[code] = f"{type(exc).__name__}: {exc}"
                log.warning("explanation pictures of %s not offered: its LoRA in %s did not load (%s)",
                            code, self.path / LORA_DIR / code, self.unusable[code])
        self.model_id = f"sd:{self.path.name}"
        self.weights_sha256 = model_sha256(self.path)
        # the prompts and sizes shape the pictures as much as the weights: a review is bound to them too
        prompts_sha = hashlib.sha256(json.dumps(self.prompts, sort_keys=True).encode()).hexdigest()
        self.review_subject = ReviewSubject(tuple(self.codes), self.weights_sha256, {
            "guidance_scale": float(self.prompts.get("guidance_scale", 7.0)),
            "num_inference_steps": self.num_inference_steps, "image_size": self.image_size,
            "prompts_sha256": prompts_sha, "img2img_strength": img2img_strength})

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", **kwargs: Any) -> "StableDiffusionExplainer":
        return cls(path, device, **kwargs)

    def adapter_folders(self) -> list[str]:
        root = self.path / LORA_DIR
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []

    @property
    def codes(self) -> list[str]:
        """Conditions whose LoRA adapter loaded (an empty or broken ``loras/<code>/`` is not one of them)."""
        return list(self._loaded)

    def knows(self, code: str) -> bool:
        """Only conditions with their own working adapter (the base model alone is no medical illustration)."""
        return code in self._loaded

    def prompt_for(self, code: str) -> str:
        specific = self.prompts.get("conditions", {}).get(code)
        if specific:
            return specific
        return Template(self.prompts["template"]).substitute(name=_condition_name(self.vocabulary, code, "en"))

    def _activate(self, code: str) -> None:
        if code not in self._loaded:
            why = self.unusable.get(code, "no adapter folder")
            raise KeyError(f"no usable LoRA adapter for {code!r} under {self.path / LORA_DIR} ({why})")
        self.pipe.set_adapters([code], adapter_weights=[float(self.prompts.get("lora_scale", 1.0))])

    @property
    def uses_photo(self) -> bool:
        """Whether examples start from the patient's photo (the caller passes it to :meth:`generate`)."""
        return self.img2img is not None

    def generate(self, condition_code: str, n: int, seed: int, lang: str = "en", *,
                 approved: Collection[str], photo: Image.Image | None = None) -> list[bytes]:
        """Captioned, provenance-marked PNGs for a patient: only classes it ``knows`` that are ``approved``;
        drawn over ``photo`` when image-conditioned generation is on."""
        _check_patient_ready(self, condition_code, approved, "no LoRA adapter that loads")
        return self.render(condition_code, n, seed, lang, photo=photo)

    def render(self, condition_code: str, n: int, seed: int, lang: str = "en", *,
               photo: Image.Image | None = None) -> list[bytes]:
        """The PNGs ``generate`` would send, without the patient gate: for benchmarks and reviewers."""
        self._activate(condition_code)
        size = self.image_size or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        common = dict(prompt=[self.prompt_for(condition_code)] * n,
                      negative_prompt=[self.prompts.get("negative", "")] * n,
                      num_inference_steps=self.num_inference_steps,
                      guidance_scale=float(self.prompts.get("guidance_scale", 7.0)),
                      generator=generators, output_type="pil")
        from_photo = photo is not None and self.img2img is not None
        if from_photo:
            start = ImageOps.fit(photo.convert("RGB"), (size, size))  # type: ignore[union-attr]
            result = self.img2img(image=[start] * n, strength=self.img2img_strength, **common)  # type: ignore[misc]
        else:
            result = self.pipe(height=size, width=size, **common)
        caption = caption_for(self.vocabulary, condition_code, lang, from_photo=from_photo)
        return [mark_ai_generated(img, caption, generator=self.model_id) for img in result.images]


def load_lora(pipe: Any, folder: Path, name: str) -> None:
    """Load the LoRA in ``folder`` into ``pipe`` as adapter ``name``, or raise saying why it cannot be used.

    Two layouts: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
    ``PeftModel.save_pretrained`` writes it; at the top for the UNet, or in ``unet/`` and ``text_encoder/``)
    and a diffusers or kohya LoRA file (``pytorch_lora_weights.safetensors`` or one ``*.safetensors``), which
    diffusers converts. Either way at least one layer must have received the adapter's weights."""
    parts = [part for part in PEFT_PARTS if (folder / part / "adapter_config.json").exists()]
    try:
        if parts:
            for part in parts:
                _load_peft_adapter(getattr(pipe, part or "unet"), folder / part, name)
        else:
            if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
                raise FileNotFoundError("the folder holds no adapter (no adapter_config.json, no *.safetensors)")
            pipe.load_lora_weights(str(folder), adapter_name=name)
        if not any(_lora_layers(getattr(pipe, part), name) for part in ("unet", "text_encoder")):
            raise ValueError("no layer of the model took the adapter's weights (key names match no layer)")
    except Exception:
        try:  # leave the pipeline as it was: no half-loaded adapter
            pipe.delete_adapters(name)
        except Exception:  # noqa: BLE001 - nothing was registered
            pass
        raise


def _lora_layers(model: Any, name: str) -> int:
    return sum(1 for module in model.modules() if name in getattr(module, "lora_A", {}))


def _load_peft_adapter(model: Any, folder: Path, name: str) -> None:
    from peft import LoraConfig, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(str(folder))
    if (folder / "adapter_model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(folder / "adapter_model.safetensors")
    elif (folder / "adapter_model.bin").exists():
        state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
    prefix = "base_model.model."  # PeftModel.save_pretrained's key prefix
    state = {key.removeprefix(prefix): value for key, value in state.items()}
    model.add_adapter(config, adapter_name=name)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if unexpected or missing:
        raise ValueError(f"adapter weights do not fit the model: {len(unexpected)} unexpected, {len(missing)} "
                         f"missing (e.g. {(unexpected or missing)[0]})")


def load_explainer(path: str | Path, device: str = "auto", **kwargs: Any) -> ClassConditionalExplainer | StableDiffusionExplainer:
    """The explainer a model folder holds: a diffusers pipeline folder (``model_index.json``) is a
    Stable-Diffusion checkpoint with LoRAs, anything else the project generator."""
    if (Path(path) / "model_index.json").exists():
        return StableDiffusionExplainer.load(path, device, **kwargs)
    return ClassConditionalExplainer.load(path, device, **kwargs)

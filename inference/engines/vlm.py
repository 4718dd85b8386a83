"""Vision-language engine: any local transformers image-text-to-text checkpoint (LLaVA, Qwen2-VL, ...).

Two-step prompting (describe what is visible, then a JSON differential restricted to the project's
vocabulary), strict pydantic validation, at most ONE repair prompt, and the flag ``vlm_unparseable``
with an empty differential when the model still gives nothing usable: the pipeline then routes the
case to a dermatologist and never shows the text as a diagnosis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any, Protocol

import torch
from PIL import Image

from inference.engines.base import Prediction, model_sha256, pick_device
from inference.engines.checks import AnswerRejected, VLMDiagnosis, check_reply, data_block, validate_diagnosis
from inference.engines.guardrails import PROMPTS_DIR, GuardRails, load_guardrails
from inference.engines.families import build_inputs, context_limit, family_of, load_processor
from inference.engines.loading import plan_load

LANGUAGE_NAMES = {"en": "English", "de": "German"}
FLAG_UNPARSEABLE = "vlm_unparseable"
FLAG_REPAIRED = "vlm_repaired"
FLAG_ADVICE_DROPPED = "vlm_advice_dropped"
FLAG_PHOTOS_LEFT_OUT = "vlm_photos_left_out"  # the family or the context length took fewer photos

# A hook returns extra logits processors for one generation step ("describe", "diagnose",
# "repair", "followup"); used for constrained decoding and by tests to drive generate() deterministically.
GenerationHook = Callable[[str, Any], list[Any]]


class _Condition(Protocol):
    code: str

    def name(self, lang: str) -> str: ...


class VocabularyLike(Protocol):
    codes: list[str]

    def get(self, code: str) -> _Condition: ...

    def match(self, free_text: str) -> _Condition | None: ...


def parse_diagnosis(
    text: str, vocabulary: VocabularyLike, allowed_urgency: list[str]
) -> tuple[VLMDiagnosis, list[dict[str, Any]]]:
    """Validate a model answer and map its condition names to vocabulary codes.

    Raises AnswerRejected (with a reason the model can act on) when the JSON is invalid or names a
    condition outside the vocabulary."""
    answer = validate_diagnosis(text)
    merged: dict[str, float] = {}
    unknown: list[str] = []
    for item in answer.differential:
        condition = vocabulary.match(item.condition)
        if condition is None:
            unknown.append(item.condition)
        else:
            merged[condition.code] = merged.get(condition.code, 0.0) + item.probability
    if unknown:
        raise AnswerRejected(f"conditions not in the allowed list: {', '.join(unknown)}")
    total = sum(merged.values())
    if total > 1.0:  # models often give independent scores; renormalise to a distribution
        merged = {code: p / total for code, p in merged.items()}
    differential = [
        {"code": code, "probability": round(min(1.0, p), 6)}
        for code, p in sorted(merged.items(), key=lambda kv: kv[1], reverse=True)
    ]
    answer.urgency_hints = [h for h in answer.urgency_hints if h in allowed_urgency]
    return answer, differential


def _load_template(name: str, prompts_dir: Path) -> Template:
    return Template((prompts_dir / name).read_text(encoding="utf-8"))


class VLMEngine:
    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: str,
        model_id: str,
        model_version: str,
        weights_sha256: str,
        vocabulary: VocabularyLike | None = None,
        prompts_dir: Path = PROMPTS_DIR,
        max_new_tokens: int = 384,
        generation_hook: GenerationHook | None = None,
        max_photos: int = 4,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.model_id = model_id
        self.model_version = model_version
        self.weights_sha256 = weights_sha256
        self._vocabulary = vocabulary
        self.prompts_dir = Path(prompts_dir)
        self.max_new_tokens = max_new_tokens
        self.generation_hook = generation_hook
        self.family = family_of(model)
        self.max_photos = max_photos
        self.photos_left_out = 0
        self.guardrails: GuardRails = load_guardrails(str(self.prompts_dir / "guardrails.json"))
        self.templates = {
            name: _load_template(f"{name}.txt", self.prompts_dir)
            for name in ("describe", "diagnose", "repair", "followup")
        }

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", *, dtype: str = "auto", attn_implementation: str = "auto",
             device_map: str | None = None, **kwargs: Any) -> "VLMEngine":
        """Load from a local folder only; nothing is downloaded. dtype, attention and placement follow
        inference.engines.loading (bf16/fp16 on GPUs, fp32 on CPU; SDPA or FlashAttention-2)."""
        from transformers import AutoModelForImageTextToText

        path = Path(path)
        device = pick_device(device)
        plan = plan_load(device, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map)
        processor = load_processor(path)
        options = plan.from_pretrained_kwargs()
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **options)
        except ValueError as exc:  # an architecture without SDPA support: its own attention then
            if "attn_implementation" not in str(exc) and "attention" not in str(exc):
                raise
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True,
                                                                **(options | {"attn_implementation": "eager"}))
        if not plan.placed_by_loader:
            model = model.to(device)
        meta_file = path / "skinbridge_model.json"  # optional: a human model id/version for the report
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return cls(
            model,
            processor,
            device=device,
            model_id=meta.get("model_id", path.name),
            model_version=str(meta.get("model_version", "local")),
            weights_sha256=model_sha256(path),
            **kwargs,
        )

    @property
    def vocabulary(self) -> VocabularyLike:
        if self._vocabulary is None:
            from inference.vocabulary import load_vocabulary  # the project's condition vocabulary

            self._vocabulary = load_vocabulary()
        return self._vocabulary

    # --- generation --------------------------------------------------------------------------
    def generate(self, images: list[Image.Image], prompt: str, *, step: str, max_new_tokens: int | None = None) -> str:
        """One user turn with the photos attached, built the way the model's family expects; returns only
        the newly generated text. Photos beyond what the family or the context length allows are left
        out (``self.photos_left_out`` says how many; diagnose flags it)."""
        max_new = max_new_tokens or self.max_new_tokens
        allowed = min(len(images), self.max_photos, self.family.max_images or len(images))
        photos = images[:allowed]
        inputs = build_inputs(self.processor, self.family, photos, prompt)
        limit = context_limit(self.model, self.processor)
        while limit and int(inputs["input_ids"].shape[1]) + max_new > limit and len(photos) > 1:
            photos = photos[:-1]  # drop photos until the prompt and the answer fit the context
            inputs = build_inputs(self.processor, self.family, photos, prompt)
        if limit and int(inputs["input_ids"].shape[1]) + max_new > limit:
            raise ValueError(f"prompt of {int(inputs['input_ids'].shape[1])} tokens + {max_new} new tokens exceeds "
                             f"the model's context of {limit}")
        self.photos_left_out = len(images) - len(photos)
        inputs = dict(inputs)
        device = self.model.device  # with a device map: where the embeddings live
        inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_len = int(inputs["input_ids"].shape[1])
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": False,  # deterministic answers: same photo, same preliminary result
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        }
        if self.generation_hook is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(self.generation_hook(step, prompt_len))
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out[0, prompt_len:]
        stops = self.model.generation_config.eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        if len(new) and int(new[-1]) in stops:  # a stop that is no special token (MiniGPT-4's "###")
            new = new[:-1]
        return tokenizer.decode(new, skip_special_tokens=True).strip()

    # --- diagnosis ---------------------------------------------------------------------------
    def _condition_names(self, lang: str = "en") -> str:
        vocab = self.vocabulary
        return "; ".join(vocab.get(code).name(lang) for code in vocab.codes)

    def diagnose(self, images: list[Image.Image], history: dict[str, Any] | None, lang: str = "en") -> Prediction:
        timings: dict[str, float] = {}
        language = LANGUAGE_NAMES.get(lang, "English")
        conditions = self._condition_names("en")  # the model maps best to English names
        t0 = time.perf_counter()
        description = self.generate(images, self.templates["describe"].substitute(language=language), step="describe")
        timings["describe_s"] = time.perf_counter() - t0

        prompt = self.templates["diagnose"].substitute(
            description=data_block(description or "(no description)"),
            history=data_block(history),
            conditions=conditions,
            language=language,
            urgency_words=", ".join(self.guardrails.urgency_words),
        )
        t1 = time.perf_counter()
        answer_text = self.generate(images, prompt, step="diagnose")
        timings["diagnose_s"] = time.perf_counter() - t1
        flags: list[str] = []
        try:
            answer, differential = parse_diagnosis(answer_text, self.vocabulary, self.guardrails.urgency_words)
        except AnswerRejected as first_error:
            repair = self.templates["repair"].substitute(
                error=str(first_error), previous=answer_text[:2000], conditions=conditions
            )
            t2 = time.perf_counter()
            repaired_text = self.generate(images, prompt + "\n\n" + repair, step="repair")
            timings["repair_s"] = time.perf_counter() - t2
            try:
                answer, differential = parse_diagnosis(repaired_text, self.vocabulary, self.guardrails.urgency_words)
                flags.append(FLAG_REPAIRED)
            except AnswerRejected:
                return Prediction(
                    engine="vlm",
                    model_id=self.model_id,
                    model_version=self.model_version,
                    weights_sha256=self.weights_sha256,
                    differential=[],
                    description=description or None,
                    flags=[FLAG_UNPARSEABLE],
                    timings=timings,
                )
        features = {k: v for k, v in answer.features.items() if v}
        if self.photos_left_out:
            flags.append(FLAG_PHOTOS_LEFT_OUT)
        advice = answer.advice
        if advice and set(check_reply(advice, self.guardrails)) - {"unreadable"}:  # e.g. a dose, "no doctor needed"
            advice = ""
            flags.append(FLAG_ADVICE_DROPPED)
        return Prediction(
            engine="vlm",
            model_id=self.model_id,
            model_version=self.model_version,
            weights_sha256=self.weights_sha256,
            differential=differential,
            description=description or None,
            features=features or None,
            flags=flags,
            urgency_hints=answer.urgency_hints,
            advice=advice or None,
            timings=timings,
        )

    # --- follow-up questions -----------------------------------------------------------------
    def followup(
        self, images: list[Image.Image], context: dict[str, Any] | None, question: str, lang: str = "en"
    ) -> str:
        """The model's raw reply to a patient's question (photos and case in context, the question as
        quoted data). Guard rails before and checks after are inference.followup's job."""
        prompt = self.templates["followup"].substitute(
            language=LANGUAGE_NAMES.get(lang, "English"),
            context=data_block(context),
            question=data_block(question.strip()[:1000]),
        )
        return self.generate(images, prompt, step="followup", max_new_tokens=min(self.max_new_tokens, 256))

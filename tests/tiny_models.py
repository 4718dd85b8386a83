"""Tiny models with random weights, saved exactly as the production loaders read them.

Used by the pipeline, bot and console end-to-end tests: same code path as the shipped models,
a fraction of the size, so a CPU worker answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

from inference.engines.classifier import save_classifier
from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet
from inference.engines.clinical_review import generator_subject
from inference.engines.generator_net import GeneratorConfig, build_generator_unet, save_generator


def build_tiny_classifier(folder: Path, codes: list[str], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = SkinClassifierNet(num_classes=len(codes), width=8)
    config = ClassifierConfig(num_classes=len(codes), class_codes=list(codes), image_size=32, width=8,
                              model_id="tiny-classifier", model_version="test")
    return save_classifier(folder, model.eval(), config)


def build_tiny_generator(folder: Path, codes: list[str], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = build_generator_unet(len(codes), sample_size=16, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4)
    config = GeneratorConfig(class_codes=list(codes), sample_size=16, num_inference_steps=3,
                             model_id="tiny-generator", model_version="test")
    save_generator(folder, unet, config)
    return folder


def sign_off_generator(clinic: Any, folder: Path) -> None:
    """A test dermatologist approves every class of a generator in the clinic's database, as the console
    does, so patients get its pictures (tests/test_explainer_review.py checks that without it they get none)."""
    from sqlalchemy import select

    from clinic_db import clinicians, explainer_review
    from clinic_db.models import Clinician

    config = GeneratorConfig.load(folder)
    subject = generator_subject(folder)
    with clinic.session() as session:
        reviewer = session.scalar(select(Clinician).where(Clinician.username == "signoff-test"))
        if reviewer is None:
            reviewer, _ = clinicians.create(clinic, session, "signoff-test", display_name="Test Dermatologist",
                                         role="dermatologist", password="sign-off test password")
        explainer_review.record(session, reviewer, subject, explainer_id=f"{config.model_id}@{config.model_version}",
                                approve=list(subject.codes), reject={})
        session.commit()


# --- driving a random-weight VLM: forced answers through the real generate() ------------------------
class ForceText(LogitsProcessor):
    """Makes greedy decoding spell ``token_ids`` and then end: a deterministic 'model answer'."""

    def __init__(self, token_ids: list[int], prompt_len: int, eos_id: int) -> None:
        self.ids = token_ids + [eos_id]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = min(input_ids.shape[1] - self.prompt_len, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[step]] = 0.0
        return forced


class ScriptedAnswers:
    """Generation hook: answers per step from a script; records which steps ran."""

    def __init__(self, tokenizer, script: dict[str, list[str]]) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.script = {k: list(v) for k, v in script.items()}
        self.steps: list[str] = []

    def __call__(self, step: str, prompt_len: int) -> list[LogitsProcessor]:
        self.steps.append(step)
        text = self.script[step].pop(0)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [ForceText(ids, prompt_len, self.tokenizer.eos_token_id)]

"""Tiny models with random weights, saved exactly as the production loaders read them.

Used by the pipeline, bot and console end-to-end tests: same code path as the shipped models,
a fraction of the size, so a CPU worker answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inference.engines.classifier import save_classifier
from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet
from inference.engines.clinical_review import generator_subject, record_review
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
    # signed off like a shipped generator, so patients get its pictures (tests/test_engines_explainer.py
    # checks that an unreviewed generator shows none)
    record_review(folder, generator_subject(folder), reviewer="Test Dermatologist", approve=list(codes), reject={})
    return folder

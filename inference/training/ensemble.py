"""Join separately trained classifier runs into one ensemble folder, calibrated and measured anew.

The members are runs of one recipe with other seeds (``skinbridge train classifier ... --seed N``): the
same classes, input size, width and normalisation, trained on the same fixed splits. The ensemble
averages their logits (:class:`~inference.engines.classifier_net.SkinClassifierEnsemble`); its
temperature and per-photo-type operating points are fitted on the validation splits exactly as a
single run's are, and it is measured once on the test splits. An ensemble given as a member brings
its own members (with their records and validation figures), so a new run can join the shipped
ensemble without its member folders.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from inference.engines.base import model_sha256
from inference.engines.classifier import save_classifier
from inference.engines.classifier_net import WEIGHTS_NAME, ClassifierConfig, build_classifier
from inference.engines.photo_type import FILE_NAME as PHOTO_TYPE_FILE
from inference.training import data as D
from inference.training.model_card import ab_summary, load_json
from inference.training.run import small_subset
from inference.training.train_classifier import calibrate_and_evaluate

SHARED = ("class_codes", "image_size", "width", "num_image_types", "cam_stage")


class EnsembleMismatch(ValueError):
    """The folders cannot be joined (another shape, other classes, a member twice)."""


@dataclass
class _Member:
    state: dict[str, torch.Tensor]  # the member's own weights
    record: dict[str, Any]  # where it came from: folder, weights digest, training command and figures
    summary: dict[str, Any]  # its validation figures (model_card.ab_summary)


def _members_of(folder: Path, config: ClassifierConfig, command: str | None) -> list[_Member]:
    """A run is one member; an ensemble folder gives back the members it was joined from."""
    weights = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
    saved = load_json(folder / "config.json")
    if config.members == 1:
        record = {"folder": str(folder), "weights_sha256": model_sha256(folder / WEIGHTS_NAME), "command": command,
                  **saved.get("training", {})}
        return [_Member(weights, record, ab_summary(load_json(folder / "metrics.json"), saved))]
    records = saved["training"]["ensemble_of"]
    summaries = [row for label, row in load_json(folder / "metrics.json").get("ensemble", {}).items()
                 if label.startswith("member")]
    return [_Member({k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"members.{i}.")}, record, row)
            for i, (record, row) in enumerate(zip(records, summaries, strict=True))]


def join_classifiers(members: list[Path], out: Path, *, data: Path, cache_dir: Path, commands: list[str | None],
                     tta_views: int | None = None, docs_img: Path | None = None, device: str = "cpu",
                     items_per_label: int | None = None) -> dict[str, Any]:
    """Write the ensemble of ``members`` to ``out`` with its temperature, operating points and metrics.

    ``commands``: each member's training command (from its card), recorded in the ensemble's config (an
    ensemble among ``members`` keeps its members' own). The first folder's photo-type model and A/B table
    come along: neither depends on the weights.
    """
    configs = [ClassifierConfig.load(folder) for folder in members]
    first = configs[0]
    if out.resolve() in {folder.resolve() for folder in members}:
        raise EnsembleMismatch(f"{out} is one of the members: write the ensemble to a new folder")
    for folder, config in zip(members, configs, strict=True):
        for key in SHARED:
            if getattr(config, key) != getattr(first, key):
                raise EnsembleMismatch(f"{folder} differs from {members[0]} in {key}: members must be runs of "
                                       "one recipe (other seeds)")
        # the same training photos give the same normalisation; another value means other data
        if not np.allclose(config.mean + config.std, first.mean + first.std, atol=1e-3):
            raise EnsembleMismatch(f"{folder} was normalised differently from {members[0]}: trained on other data")

    joined: list[_Member] = []
    for folder, config, command in zip(members, configs, commands, strict=True):
        for member in _members_of(folder, config, command):
            if any(member.record["weights_sha256"] == other.record["weights_sha256"] for other in joined):
                raise EnsembleMismatch(f"{folder} (or a member of it) is in the ensemble twice")
            joined.append(member)
    state = {f"members.{i}.{k}": v for i, member in enumerate(joined) for k, v in member.state.items()}
    config = ClassifierConfig(**{
        **asdict(first), "members": len(joined), "tta_views": tta_views or first.tta_views,
        "temperature": 1.0, "thresholds": {}, "operating_points": {}, "model_version": time.strftime("%Y.%m.%d"),
    })
    model = build_classifier(config)
    model.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    save_classifier(out, model, config)

    member_records = [member.record for member in joined]
    training = {"ensemble_of": member_records, "device": member_records[0].get("device", "cpu")}
    items = small_subset(data, items_per_label) if items_per_label else D.ham_items(data) + D.dermnet_items(data)
    labelled = D.label(D.build_cache(data, config.image_size, cache_dir, items=items, progress=False))
    metrics = calibrate_and_evaluate(out, labelled, D.split_masks(data, labelled), training=training,
                                     docs_img=docs_img, device=device)

    # what each member and the ensemble reach on validation, side by side (the card's members table)
    together = ab_summary(metrics, {"training": {
        "epochs_done": " + ".join(str(record.get("epochs_done")) for record in member_records),
        "wall_s": round(sum(float(record.get("wall_s") or 0) for record in member_records), 1)}})
    metrics["ensemble"] = {
        **{f"member · seed {member.record.get('seed')}": member.summary for member in joined},
        f"ensemble of {len(joined)}": together,
    }
    carried = load_json(members[0] / "metrics.json")
    for key in ("ab", "ab_command", "photo_type"):
        if key in carried:
            metrics[key] = carried[key]
    if (members[0] / PHOTO_TYPE_FILE).exists():
        shutil.copyfile(members[0] / PHOTO_TYPE_FILE, out / PHOTO_TYPE_FILE)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics

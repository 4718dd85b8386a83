"""Evaluation of a classifier folder on the project's splits, with the numbers the model card reports.

- HAM10000 lesion-grouped test (``ham-grouped-test``): balanced accuracy, ACC and macro AUC over the 7
  HAM10000 classes (softmax restricted to them, image type dermoscopic), and each dermoscopic operating
  point's sensitivity, specificity and share of photos flagged (full calibrated softmax, as the engine).
- DermNet grouped test/validation: top-1 / top-3 over the grouped vocabulary and the clinical operating
  points.
- DermaMNIST test: the same 7-class figures, comparable with the published DermaMNIST table.
- HAM10000 lesion-disjoint test: balanced accuracy (7 classes) and melanoma sensitivity/specificity at
  the triage threshold stored in the config (full calibrated softmax, as the engine sees it).
- DermNet validation: top-1 / top-3 over the grouped vocabulary (clinical image type).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from inference.engines.classifier_net import (
    WEIGHTS_NAME,
    ClassifierConfig,
    build_classifier,
    dihedral_logits,
    point_members,
)
from inference.training import data as D
from inference.training.augment import normalise, to_float

SPLITS = D.EVALUATION_SPLITS


@torch.no_grad()
def logits_for(
    model: torch.nn.Module,
    images: np.ndarray,
    image_type: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    device: str = "cpu",
    views: int = 1,
) -> torch.Tensor:
    """Raw logits (N x C, CPU float32) for uint8 N x H x W x 3 images, averaged over ``views``
    dihedral views exactly as the engine serves them (no random augmentation)."""
    model.eval()
    m, s = torch.tensor(mean), torch.tensor(std)
    out = []
    for i in range(0, len(images), batch_size):
        x = normalise(to_float(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))), m, s)
        t = torch.from_numpy(image_type[i : i + batch_size]).long()
        out.append(dihedral_logits(model, x.to(device), t.to(device), views).float().cpu())
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar T minimising validation NLL."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def sensitivity_threshold(scores: np.ndarray, positive: np.ndarray, target: float = 0.90) -> float:
    """The highest threshold whose sensitivity on (scores, positive) is at least ``target``."""
    pos = np.sort(scores[positive])[::-1]
    if len(pos) == 0:
        return 0.5
    k = int(np.ceil(target * len(pos)))  # need at least k positives at or above the threshold
    return float(pos[k - 1])


def operating_point(scores: np.ndarray, positive: np.ndarray, sensitivity: float) -> dict[str, Any]:
    """The threshold for ``sensitivity`` on validation scores, and what it does there."""
    threshold = sensitivity_threshold(scores, positive, sensitivity)
    return {"threshold": threshold, **flag_rates(scores, positive, threshold)}


def flag_rates(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, Any]:
    flagged = scores >= threshold
    return {
        "n": int(len(scores)), "n_positive": int(positive.sum()),
        "sensitivity": float((flagged & positive).sum() / max(1, positive.sum())),
        "specificity": float((~flagged & ~positive).sum() / max(1, (~positive).sum())),
        "flagged_share": float(flagged.mean()) if len(scores) else float("nan"),
    }


def ham_codes() -> list[str]:
    """Vocabulary codes of the 7 HAM10000 classes, in DermaMNIST label order (akiec..vasc)."""
    grouping = D.ham_grouping()
    return [grouping[dx] or D.HAM_FALLBACK[dx] for dx in D.HAM_DX]


def restricted_probs(logits: torch.Tensor, class_codes: Sequence[str], codes: Sequence[str]) -> np.ndarray:
    idx = [list(class_codes).index(c) for c in codes]
    return torch.softmax(logits[:, idx], dim=1).numpy()


def ham7_metrics(logits: torch.Tensor, class_codes: Sequence[str], true_codes: Sequence[str]) -> dict[str, Any]:
    codes = ham_codes()
    probs = restricted_probs(logits, class_codes, codes)
    y = np.asarray([codes.index(c) for c in true_codes])
    pred = probs.argmax(1)
    present = sorted(set(y.tolist()))
    auc = (
        float(roc_auc_score(y, probs[:, present] / probs[:, present].sum(1, keepdims=True), multi_class="ovr",
                            average="macro", labels=present))
        if len(present) > 2 else float("nan")
    )
    return {
        "n": int(len(y)),
        "acc": float((pred == y).mean()) if len(y) else float("nan"),
        "auc_macro_ovr": auc,
        "balanced_acc": float(balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
        "classes": codes,
        "confusion": confusion_matrix(y, pred, labels=list(range(len(codes)))).tolist(),
    }


def topk_metrics(probs: np.ndarray, class_codes: Sequence[str], true_codes: Sequence[str]) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(class_codes)}
    y = np.asarray([index.get(c, -1) for c in true_codes])
    top = np.argsort(-probs, axis=1)[:, :3]
    return {
        "n": int(len(y)),
        "top1": float((top[:, 0] == y).mean()) if len(y) else float("nan"),
        "top3": float((top == y[:, None]).any(1).mean()) if len(y) else float("nan"),
    }


def split_image_type(split: str) -> str:
    return "clinical" if split.startswith("dermnet") else "dermoscopic"


def type_operating_points(config: dict[str, Any], image_type: str) -> dict[str, float]:
    """The operating points the engine applies to photos of ``image_type`` (see ClassifierEngine.flags)."""
    return config.get("operating_points", {}).get(image_type) or config.get("thresholds", {})


def evaluate_split(
    model: torch.nn.Module,
    config: dict[str, Any],
    labelled: D.Labelled,
    mask: np.ndarray,
    split: str,
    *,
    device: str = "cpu",
) -> dict[str, Any]:
    """Metrics for one split of ``labelled`` (rows selected by ``mask``), incl. what each of the
    photo type's operating points does there (sensitivity, specificity, share of photos flagged)."""
    rows = np.flatnonzero(mask)
    class_codes = list(config["class_codes"])
    true = [labelled.codes[i] for i in rows]
    logits = logits_for(model, labelled.images[rows], labelled.image_type[rows], config["mean"], config["std"],
                        views=config.get("tta_views", 1), device=device)
    probs = torch.softmax(logits / config.get("temperature", 1.0), dim=1).numpy() if len(rows) else np.zeros((0, 0))
    points = type_operating_points(config, split_image_type(split))
    out: dict[str, Any] = {"split": split}
    if split.startswith(("dermamnist", "ham-")):
        out.update(ham7_metrics(logits, class_codes, true))
    else:
        out.update(topk_metrics(probs, class_codes, true))
    out["operating_points"] = {}
    for key, limit in points.items():
        members = point_members(key, class_codes, config.get("malignant_codes", []))
        if members and len(rows):
            score, positive = point_scores(probs, class_codes, true, members)
            out["operating_points"][key] = {"threshold": limit, **flag_rates(score, positive, limit)}
    return out


def point_scores(probs: np.ndarray, class_codes: list[str], true_codes: Sequence[str],
                 members: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """An operating point's score per photo (its members' summed probability) and which photos are positive."""
    score = probs[:, [class_codes.index(m) for m in members]].sum(1)
    return score, np.asarray([c in members for c in true_codes], dtype=bool)


def load_model(folder: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = build_classifier(ClassifierConfig.load(folder))
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
    model.load_state_dict(state)
    return model.eval(), config


def evaluate_classifier(folder: Path, data: Path, split: str, *, cache_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate a classifier folder on one split, decoding the split's images from ``data``.

    With ``cache_dir`` the decoded pixels are cached (what training does); without it only that split's
    photos are decoded afresh from the JPEGs, exactly as a CI guard should.
    """
    model, config = load_model(folder)
    size = int(config["image_size"])
    all_items = D.ham_items(data) + D.dermnet_items(data)
    wanted = split_items(data, all_items, split)
    if cache_dir is not None:
        cache = D.build_cache(data, size, cache_dir, items=wanted, progress=False)
    else:
        cache = decode_items(data, wanted, size)
    labelled = D.label(cache)
    masks = D.split_masks(data, labelled)
    return evaluate_split(model, config, labelled, masks[split], split)


def decode_items(data: Path, items: list[D.RawItem], size: int) -> D.Cache:
    """The photos of ``items`` decoded afresh from their JPEGs at ``size`` px (no cache)."""
    return D.Cache(np.stack([D.load_image(D.item_path(data, it), size) for it in items]), items)


def split_items(data: Path, items: list[D.RawItem], split: str) -> list[D.RawItem]:
    if "-grouped-" in split:
        source, part = split.split("-grouped-")
        grouped = D.grouped_splits(D.ham_items(data) + D.dermnet_items(data))
        wanted_source = "ham10000" if source == "ham" else "dermnet"
        return [it for it in items if it.source == wanted_source and grouped[it.key] == part]
    if split.startswith("dermamnist-"):
        dm = D.dermamnist_split(data)
        return [it for it in items if it.source == "ham10000" and dm.get(it.key) == split.split("-", 1)[1]]
    if split.startswith("ham-lesion-"):
        hl = D.ham_lesion_split(data)
        return [it for it in items if it.source == "ham10000" and hl.get(it.key) == split.rsplit("-", 1)[1]]
    if split.startswith("dermnet-"):
        dn = D.dermnet_split(items)
        return [it for it in items if it.source == "dermnet" and dn.get(it.key) == split.split("-", 1)[1]]
    raise ValueError(f"unknown split {split!r}; one of {SPLITS}")


def plot_confusion(result: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(result["confusion"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    labels = result["classes"]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

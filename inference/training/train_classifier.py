"""Train SkinClassifierNet from scratch on HAM10000 (dermoscopic) + DermNet (clinical) jointly.

Image-type aware (the net embeds the type), batched augmentation, class-balanced loss (weights
~ n_c^-balance), AdamW with a warm-up + cosine schedule, EMA weights, fixed seeds. On a shared CPU the
run can be given a wall-clock budget: the schedule then follows elapsed time, so the learning rate
still anneals to zero when the budget ends. Afterwards: temperature scaling and the melanoma triage
threshold on validation data, test metrics, confusion-matrix plot, weights + config + metrics + card.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.training import data as D
from inference.training.augment import augment, normalise
from inference.training.evaluate import (
    evaluate_split,
    fit_temperature,
    ham7_metrics,
    logits_for,
    plot_confusion,
    sensitivity_threshold,
    topk_metrics,
)
from inference.training.run import TrainingRun, prepare_run


@dataclass
class ClassifierRun(TrainingRun):
    epochs: int = 20
    image_size: int = 64
    width: int = 24
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    class_balance: float = 0.5  # 0 = plain CE, 1 = fully inverse-frequency weighted
    ema_decay: float = 0.998
    min_per_class: int = 10  # vocabulary codes with fewer training photos are not learnt
    melanoma_sensitivity: float = 0.90
    tta_views: int = 8  # dihedral views averaged at validation, calibration, evaluation and serving


class Ema:
    """Exponential moving average of the weights (buffers copied): smoother, better short runs."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def lr_factor(progress: float, warmup: float = 0.05) -> float:
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train_classifier(run: ClassifierRun) -> dict[str, Any]:
    from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet

    gen, device, log_path, labelled, masks = prepare_run(run, run.image_size)

    train_rows = np.flatnonzero(masks["train"])
    counts: dict[str, int] = {}
    for i in train_rows:
        counts[labelled.codes[i]] = counts.get(labelled.codes[i], 0) + 1
    ham7 = set(D.ham_grouping().values()) - {None}
    class_codes = sorted(c for c, n in counts.items() if n >= run.min_per_class or c in ham7)
    index = {c: k for k, c in enumerate(class_codes)}
    train_rows = np.asarray([i for i in train_rows if labelled.codes[i] in index])
    targets = np.asarray([index.get(c, -1) for c in labelled.codes])

    pixels = labelled.images[train_rows].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pixels.mean(0).tolist(), pixels.std(0).tolist()
    del pixels
    freq = np.asarray([counts[c] for c in class_codes], dtype=np.float64)
    w = freq ** -run.class_balance
    w = w / (w[targets[train_rows]].mean())  # average sample weight 1: keeps the lr meaningful
    class_weight = torch.tensor(w, dtype=torch.float32)

    model = SkinClassifierNet(len(class_codes), 2, run.width).to(device)
    ema = Ema(model, run.ema_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run.lr,
    )
    m_t, s_t = torch.tensor(mean), torch.tensor(std)
    images_t = torch.from_numpy(np.ascontiguousarray(labelled.images))
    types_t = torch.from_numpy(labelled.image_type)
    targets_t = torch.from_numpy(targets)
    steps_per_epoch = max(1, len(train_rows) // run.batch_size)
    total_steps = steps_per_epoch * run.epochs
    val_dm, val_dn = np.flatnonzero(masks["dermamnist-val"]), np.flatnonzero(masks["dermnet-val"])

    from tqdm import tqdm

    start = time.monotonic()
    step, best_score, best_state, epochs_done = 0, -1.0, None, 0
    out_of_time = False
    for epoch in range(run.epochs):
        model.train()
        perm = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()]
        running, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{run.epochs}", mininterval=30)
        for b in bar:
            progress = step / total_steps
            if run.time_budget_s:
                progress = max(progress, (time.monotonic() - start) / run.time_budget_s)
            if progress >= 1.0:
                out_of_time = True
                break
            for g in opt.param_groups:
                g["lr"] = run.lr * lr_factor(progress)
            rows = torch.from_numpy(perm[b * run.batch_size : (b + 1) * run.batch_size])
            x = normalise(augment(images_t[rows], types_t[rows], gen), m_t, s_t).to(device)
            y = targets_t[rows].to(device)
            logits = model(x, types_t[rows].to(device))
            loss = F.cross_entropy(logits, y, weight=class_weight.to(device), label_smoothing=run.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            ema.update(model)
            step += 1
            running += loss.item() * len(rows)
            seen += len(rows)
        epochs_done = epoch + 1 if not out_of_time else epoch + (1 if seen else 0)
        # validation of the EMA weights: DermaMNIST val ACC (7 classes) and DermNet val top-1
        lv = logits_for(ema.model, labelled.images[val_dm], labelled.image_type[val_dm], mean, std, device=device,
                    views=run.tta_views)
        dm_acc = ham7_metrics(lv, class_codes, [labelled.codes[i] for i in val_dm])["acc"] if len(val_dm) else 0.0
        ln = logits_for(ema.model, labelled.images[val_dn], labelled.image_type[val_dn], mean, std, device=device,
                    views=run.tta_views)
        dn = (topk_metrics(torch.softmax(ln, 1).numpy(), class_codes, [labelled.codes[i] for i in val_dn])
              if len(val_dn) else {"top1": 0.0, "top3": 0.0})
        score = (dm_acc + dn["top1"]) / 2
        record = {
            "epoch": epoch + 1, "step": step, "train_loss": running / max(1, seen), "lr": opt.param_groups[0]["lr"],
            "val_dermamnist_acc": dm_acc, "val_dermnet_top1": dn["top1"], "val_dermnet_top3": dn["top3"],
            "elapsed_s": round(time.monotonic() - start, 1),
        }
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(ema.model.state_dict())
        if out_of_time:
            break

    final = ema.model
    if best_state is not None:
        final.load_state_dict(best_state)
    final.eval()

    # calibration + triage threshold on validation data only (never the test splits)
    val_rows = np.flatnonzero(masks["val"] & (targets >= 0))
    lval = logits_for(final, labelled.images[val_rows], labelled.image_type[val_rows], mean, std, device=device,
                    views=run.tta_views)
    temperature = fit_temperature(lval, torch.from_numpy(targets[val_rows])) if len(val_rows) else 1.0
    thr_rows = np.flatnonzero((masks["ham-lesion-val"] | masks["dermnet-val"]) & (targets >= 0))
    lthr = logits_for(final, labelled.images[thr_rows], labelled.image_type[thr_rows], mean, std, device=device,
                    views=run.tta_views)
    p_mel = torch.softmax(lthr / temperature, 1)[:, index["melanoma"]].numpy() if len(thr_rows) else np.zeros(0)
    is_mel = np.asarray([labelled.codes[i] == "melanoma" for i in thr_rows], dtype=bool)
    threshold = sensitivity_threshold(p_mel, is_mel, run.melanoma_sensitivity)

    config = ClassifierConfig(
        num_classes=len(class_codes), class_codes=class_codes, image_size=run.image_size, mean=mean, std=std,
        temperature=temperature, width=run.width, model_version=time.strftime("%Y.%m.%d"),
        tta_views=run.tta_views,
    )
    config_dict: dict[str, Any] = asdict(config)
    config_dict["thresholds"] = {"melanoma": threshold}
    config_dict["training"] = {
        "seed": run.seed, "epochs_planned": run.epochs, "epochs_done": epochs_done, "steps": step,
        "time_budget_s": run.time_budget_s, "wall_s": round(time.monotonic() - start, 1),
        "batch_size": run.batch_size, "lr": run.lr, "class_balance": run.class_balance,
        "train_images": int(len(train_rows)), "class_counts": {c: counts[c] for c in class_codes},
        "device": device, "subset_per_label": run.items_per_label,
    }
    from inference.engines.classifier import save_classifier

    save_classifier(run.out, final, config)
    (run.out / "config.json").write_text(json.dumps(config_dict, indent=2), encoding="utf-8")

    metrics: dict[str, Any] = {"temperature": temperature, "melanoma_threshold": threshold}
    for split in ("dermamnist-test", "ham-lesion-test", "dermnet-val", "ham-lesion-val"):
        metrics[split] = evaluate_split(final, config_dict, labelled, masks[split], split)
    write_artifacts(run.out, metrics)
    if run.docs_img is not None:
        plot_confusion(metrics["dermamnist-test"], run.docs_img / "classifier_confusion_dermamnist_test.png",
                       "DermaMNIST test (7 HAM10000 classes), counts; colour = row-normalised")
    return metrics


def write_artifacts(out: Path, metrics: dict[str, Any]) -> None:
    """metrics.json + weights.sha256 (what tests/test_shipped_models.py checks)."""
    from inference.engines.base import model_sha256
    from inference.engines.classifier_net import WEIGHTS_NAME

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "weights.sha256").write_text(f"{model_sha256(out / WEIGHTS_NAME)}  {WEIGHTS_NAME}\n")

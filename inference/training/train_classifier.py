"""Train SkinClassifierNet from scratch on HAM10000 (dermoscopic) + DermNet (clinical) jointly.

Image-type aware (the net embeds the type), batched augmentation, class-balanced loss (weights
~ n_c^-balance), AdamW with a warm-up + cosine schedule, EMA weights, fixed seeds. On a shared CPU the
run can be given a wall-clock budget: the schedule then follows elapsed time, so the learning rate
still anneals to zero when the budget ends. Afterwards: temperature scaling and the melanoma triage
threshold on validation data, test metrics, confusion-matrix plot, weights + config + metrics + card.

On a GPU the photos stay on the device, the forward passes run in bfloat16 and the network can learn
from a trained teacher (knowledge distillation: a larger net's softened predictions on the same
augmented photo join the labels in the loss), which is how a GPU-trained net is folded into the small
net that serves on two CPU cores.
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
from inference.engines.classifier_net import ANY_MALIGNANT, ClassifierConfig, point_members
from inference.training.evaluate import (
    evaluate_split,
    fit_temperature,
    ham7_metrics,
    load_model,
    logits_for,
    operating_point,
    plot_confusion,
    point_scores,
    topk_metrics,
)
from inference.training.run import TrainingRun, prepare_run, run_items


@dataclass
class ClassifierRun(TrainingRun):
    mix_prob: float = 0.0  # share of batches mixed (half mixup, half CutMix)
    mix_alpha: float = 0.4  # Beta(alpha, alpha) for the mixing weight
    cam_stage: int = -1  # the stage Grad-CAM reads (-2: one finer than the last)
    resume: bool = False  # continue from out/checkpoint.pt
    sitting_epochs: int | None = None  # stop (with a checkpoint) after this many epochs of this sitting
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
    melanoma_sensitivity: float = 0.90  # operating points (melanoma, any malignant) per photo type
    tta_views: int = 8  # dihedral views averaged at validation, calibration, evaluation and serving
    teacher: Path | None = None  # a trained classifier folder to distil from (same classes)
    distill_alpha: float = 0.7  # weight of the teacher's term in the loss (the labels get the rest)
    distill_temperature: float = 2.0  # softening of both nets' predictions in the teacher's term
    val_every: int = 1  # epochs between the logged validation looks (and always the last)
    checkpoint_every_s: float = 0.0  # seconds between checkpoints (0: every epoch; a sitting's end always)
    half_weights: bool = False  # store float16 weights (half the file; metrics are measured on them)


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
        mine, theirs = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        # one fused kernel per operation instead of two per tensor: on a GPU the loop was launch-bound
        torch._foreach_mul_(mine, d)
        torch._foreach_add_(mine, theirs, alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def lr_factor(progress: float, warmup: float = 0.05) -> float:
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def mix_batch(x: torch.Tensor, y: torch.Tensor, types: torch.Tensor, run: ClassifierRun,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix (half the mixed batches each) with probability ``run.mix_prob``.

    Returns (images, targets a, targets b, lambda): the loss is lam * CE(a) + (1 - lam) * CE(b).
    Photos are only mixed with a partner of the same image type (the net is told one type per photo).
    """
    if run.mix_prob <= 0 or rng.random() >= run.mix_prob:
        return x, y, y, 1.0
    b = x.shape[0]
    partner = torch.from_numpy(rng.permutation(b))
    partner = torch.where(types[partner] == types, partner, torch.arange(b))
    lam = float(rng.beta(run.mix_alpha, run.mix_alpha))
    if rng.random() < 0.5:  # mixup
        return lam * x + (1 - lam) * x[partner], y, y[partner], lam
    h, w = x.shape[2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[partner][:, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the photo that is still its own
    return mixed, y, y[partner], lam


class ResumeMismatch(ValueError):
    """--resume with options that change the schedule or the classes of the checkpointed run."""


class TeacherMismatch(ValueError):
    """--teacher names a classifier that knows other classes than the run learns."""


CHECKPOINT = "checkpoint.pt"  # beside the weights while training; removed when the run has finished


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run killed while saving keeps the previous checkpoint


def train_classifier(run: ClassifierRun) -> dict[str, Any] | None:
    """Train (or continue a checkpointed run with ``run.resume``), then calibrate and evaluate.

    Returns the metrics, or None when the run stopped after ``run.sitting_epochs`` with a checkpoint
    to continue from. A resumed run continues the same schedule, batches, augmentations and dropout
    draws: its weights equal those of an uninterrupted run (tests/test_training.py).
    """
    from inference.engines.classifier_net import SkinClassifierNet

    checkpoint_path = run.out / CHECKPOINT
    resumed = torch.load(checkpoint_path, weights_only=False) if run.resume else None
    gen, device, log_path, labelled, masks = prepare_run(run, run.image_size, keep_log=resumed is not None)

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
    class_weight = torch.tensor(w, dtype=torch.float32).to(device)

    model = SkinClassifierNet(len(class_codes), 2, run.width).to(device)
    ema = Ema(model, run.ema_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run.lr,
    )
    rng = np.random.default_rng(run.seed)  # mixup / cutmix draws
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    teacher = Teacher.load(run, class_codes, device) if run.teacher else None
    # photos are augmented at the larger of the two nets' sizes, then resized for each net
    source = labelled
    if teacher is not None and teacher.image_size > run.image_size:
        source = D.label(D.build_cache(run.data, teacher.image_size, run.cache_dir, items=run_items(run)))
        if source.codes != labelled.codes:
            raise RuntimeError("the caches at the two sizes hold different photos; remove the cache folder")
    m_t, s_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    images_t = torch.from_numpy(np.ascontiguousarray(source.images)).to(device)  # a GPU holds them all
    types_t = torch.from_numpy(labelled.image_type)
    targets_t = torch.from_numpy(targets)
    steps_per_epoch = max(1, len(train_rows) // run.batch_size)
    total_steps = steps_per_epoch * run.epochs
    val_ham, val_dn = np.flatnonzero(masks["ham-grouped-val"]), np.flatnonzero(masks["dermnet-grouped-val"])

    step, first_epoch, elapsed_before = 0, 0, 0.0
    if resumed is not None:
        if resumed["class_codes"] != class_codes or resumed["run"] != _schedule_key(run):
            raise ResumeMismatch("the checkpoint belongs to a different run (classes or schedule differ); "
                             "start afresh without --resume")
        model.load_state_dict(resumed["model"])
        ema.model.load_state_dict(resumed["ema"])
        ema.steps = resumed["ema_steps"]
        opt.load_state_dict(resumed["optimizer"])
        gen.set_state(resumed["generator"])
        torch.set_rng_state(resumed["torch_rng"])
        rng.bit_generator.state = resumed["numpy_rng"]
        if on_gpu and resumed.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(resumed["cuda_rng"])
        step, first_epoch, elapsed_before = resumed["step"], resumed["epoch"], resumed["elapsed_s"]

    from tqdm import tqdm

    start = time.monotonic() - elapsed_before
    last_saved = time.monotonic()
    out_of_time = False
    epochs_done = first_epoch
    for epoch in range(first_epoch, run.epochs):
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
            types = types_t[rows]
            # mixing commutes with the per-channel normalisation, so it is done on the [0, 1] photos
            x01, y_a, y_b, lam = mix_batch(augment(images_t[rows.to(device)], types, gen), targets_t[rows],
                                           types, run, rng)
            types_d = types.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                logits = model(normalise(resized(x01, run.image_size), m_t, s_t), types_d).float()
            loss = lam * F.cross_entropy(logits, y_a.to(device), weight=class_weight,
                                         label_smoothing=run.label_smoothing)
            if lam < 1.0:
                loss = loss + (1 - lam) * F.cross_entropy(logits, y_b.to(device), weight=class_weight,
                                                          label_smoothing=run.label_smoothing)
            if teacher is not None:
                loss = (1 - run.distill_alpha) * loss + run.distill_alpha * teacher.loss(
                    logits, x01, types_d, run.distill_temperature, on_gpu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            ema.update(model)
            step += 1
            running += loss.detach() * len(rows)  # no host sync per step
            seen += len(rows)
        epochs_done = epoch + 1 if not out_of_time else epoch + (1 if seen else 0)
        # a cheap look at the EMA weights (one view): for the log only, nothing is selected on it
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": float(running) / max(1, seen),
                                  "lr": opt.param_groups[0]["lr"]}
        look = (epoch + 1) % max(1, run.val_every) == 0 or out_of_time or epoch + 1 == run.epochs
        if look and len(val_ham):
            lv = logits_for(ema.model, labelled.images[val_ham], labelled.image_type[val_ham], mean, std,
                            device=device)
            record["val_ham_balanced_acc"] = ham7_metrics(lv, class_codes,
                                                          [labelled.codes[i] for i in val_ham])["balanced_acc"]
        if look and len(val_dn):
            ln = logits_for(ema.model, labelled.images[val_dn], labelled.image_type[val_dn], mean, std,
                            device=device)
            dn = topk_metrics(torch.softmax(ln, 1).numpy(), class_codes, [labelled.codes[i] for i in val_dn])
            record["val_dermnet_top1"], record["val_dermnet_top3"] = dn["top1"], dn["top3"]
        record["elapsed_s"] = round(time.monotonic() - start, 1)
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if out_of_time:
            break
        end_of_sitting = bool(run.sitting_epochs and epoch + 1 - first_epoch >= run.sitting_epochs
                              and epoch + 1 < run.epochs)
        if not (end_of_sitting or time.monotonic() - last_saved >= run.checkpoint_every_s):
            continue
        last_saved = time.monotonic()
        save_checkpoint(checkpoint_path, {
            "run": _schedule_key(run), "class_codes": class_codes, "epoch": epoch + 1, "step": step,
            "elapsed_s": time.monotonic() - start, "model": model.state_dict(), "ema": ema.model.state_dict(),
            "ema_steps": ema.steps, "optimizer": opt.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state,
            "cuda_rng": torch.cuda.get_rng_state_all() if on_gpu else None,  # dropout draws on a GPU
        })
        if end_of_sitting:
            print(f"stopped after {run.sitting_epochs} epochs; continue with --resume", flush=True)
            return None

    final = ema.model.eval()  # the last EMA weights: no epoch is picked on validation data
    if run.half_weights:
        final = final.half()
    training = {
        "seed": run.seed, "epochs_planned": run.epochs, "epochs_done": epochs_done, "steps": step,
        "time_budget_s": run.time_budget_s, "wall_s": round(time.monotonic() - start, 1),
        "batch_size": run.batch_size, "lr": run.lr, "class_balance": run.class_balance,
        "mix_prob": run.mix_prob, "mix_alpha": run.mix_alpha, "label_smoothing": run.label_smoothing,
        "train_images": int(len(train_rows)), "class_counts": {c: counts[c] for c in class_codes},
        "device": device, "subset_per_label": run.items_per_label, "resumed": resumed is not None,
        "weights_dtype": "float16" if run.half_weights else "float32",
    }
    if teacher is not None:
        training["teacher"] = {"folder": str(run.teacher), "image_size": teacher.image_size,
                               "width": teacher.width, "weights_sha256": teacher.weights_sha256,
                               "alpha": run.distill_alpha, "temperature": run.distill_temperature}
    config = ClassifierConfig(
        num_classes=len(class_codes), class_codes=class_codes, image_size=run.image_size, mean=mean, std=std,
        width=run.width, model_version=time.strftime("%Y.%m.%d"), tta_views=run.tta_views,
        cam_stage=run.cam_stage,
    )
    from inference.engines.classifier import save_classifier

    save_classifier(run.out, final, config)
    metrics = calibrate_and_evaluate(run.out, labelled, masks, training=training,
                                     sensitivity=run.melanoma_sensitivity, docs_img=run.docs_img, device=device)
    checkpoint_path.unlink(missing_ok=True)
    return metrics


def _schedule_key(run: ClassifierRun) -> dict[str, Any]:
    """What must not change between the sittings of one run."""
    key = {k: getattr(run, k) for k in ("epochs", "image_size", "width", "batch_size", "lr", "seed",
                                        "class_balance", "mix_prob", "mix_alpha", "time_budget_s")}
    if run.teacher:
        key.update(teacher=str(run.teacher), distill_alpha=run.distill_alpha,
                   distill_temperature=run.distill_temperature)
    return key


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """A BCHW batch at ``size`` px (area-like antialiased downsizing, as the cache's own resize)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass
class Teacher:
    """A trained classifier whose softened predictions the student learns from (Hinton et al. 2015)."""

    model: torch.nn.Module
    image_size: int
    width: int
    mean: torch.Tensor
    std: torch.Tensor
    weights_sha256: str

    @classmethod
    def load(cls, run: ClassifierRun, class_codes: list[str], device: str) -> Teacher:
        from inference.engines.base import model_sha256
        from inference.engines.classifier_net import WEIGHTS_NAME

        assert run.teacher is not None
        model, config = load_model(run.teacher)
        if list(config["class_codes"]) != class_codes:
            raise TeacherMismatch(f"the teacher in {run.teacher} knows other classes than this run learns "
                                  "(train it on the same data and --min-per-class)")
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model.to(device).eval(), int(config["image_size"]), int(config["width"]),
                   torch.tensor(config["mean"], device=device), torch.tensor(config["std"], device=device),
                   model_sha256(run.teacher / WEIGHTS_NAME))

    def loss(self, student_logits: torch.Tensor, x01: torch.Tensor, types: torch.Tensor, temperature: float,
             on_gpu: bool) -> torch.Tensor:
        """KL(teacher || student) of the temperature-softened predictions, scaled by T^2 (Hinton)."""
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            target = self.model(normalise(resized(x01, self.image_size), self.mean, self.std), types).float()
        return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(target / temperature, 1),
                        log_target=True, reduction="batchmean") * temperature ** 2


def calibrate_and_evaluate(out: Path, labelled: D.Labelled, masks: dict[str, np.ndarray], *,
                           training: dict[str, Any], sensitivity: float = 0.90,
                           docs_img: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Temperature, per-photo-type operating points and test metrics for the classifier in ``out``.

    Everything is chosen on the grouped validation splits (HAM10000 for dermoscopic photos, DermNet
    for clinical ones) and measured on the grouped test splits, which nothing was tuned on.
    """
    from inference.vocabulary import load_vocabulary

    model, _ = load_model(out)
    model = model.to(device)
    config = ClassifierConfig.load(out)
    codes = config.class_codes
    index = {c: k for k, c in enumerate(codes)}
    targets = np.asarray([index.get(c, -1) for c in labelled.codes])
    # each validation photo through the net once (all its views): for the temperature and the points
    val: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
    for source in ("ham", "dermnet"):
        rows = np.flatnonzero(masks[f"{source}-grouped-val"] & (targets >= 0))
        val[source] = rows, logits_for(model, labelled.images[rows], labelled.image_type[rows], config.mean,
                                       config.std, views=config.tta_views, device=device)
    val_rows = np.concatenate([rows for rows, _ in val.values()])
    config.temperature = (fit_temperature(torch.cat([lv for _, lv in val.values()]),
                                          torch.from_numpy(targets[val_rows])) if len(val_rows) else 1.0)
    vocab = load_vocabulary()
    config.malignant_codes = [c for c in codes if c in vocab and vocab.get(c).malignant]
    points: dict[str, Any] = {}
    for image_type, source in (("dermoscopic", "ham"), ("clinical", "dermnet")):
        rows, lv = val[source]
        probs = torch.softmax(lv / config.temperature, 1).numpy() if len(rows) else np.zeros((0, len(codes)))
        true = [labelled.codes[i] for i in rows]
        points[image_type] = {}
        for key in ("melanoma", ANY_MALIGNANT):
            members = point_members(key, codes, config.malignant_codes)
            if not members:
                continue
            score, positive = point_scores(probs, codes, true, members)
            if positive.any():
                points[image_type][key] = {"validation": operating_point(score, positive, sensitivity)}
    config.operating_points = {image_type: {key: report["validation"]["threshold"] for key, report in kinds.items()}
                               for image_type, kinds in points.items()}
    config_dict = {**asdict(config), "training": training}
    (out / "config.json").write_text(json.dumps(config_dict, indent=2), encoding="utf-8")

    metrics: dict[str, Any] = {"temperature": config.temperature, "operating_points": points}
    for split in ("ham-grouped-test", "ham-grouped-val", "dermnet-grouped-test", "dermnet-grouped-val",
                  "dermamnist-test"):
        mask = masks[split] & ~masks["train"] if split == "dermamnist-test" else masks[split]
        metrics[split] = evaluate_split(model, config_dict, labelled, mask, split, device=device)
    for image_type, split in (("dermoscopic", "ham-grouped-test"), ("clinical", "dermnet-grouped-test")):
        for key, report in points[image_type].items():
            report["test"] = metrics[split]["operating_points"].get(key)
    write_artifacts(out, metrics)
    if docs_img is not None:
        plot_confusion(metrics["ham-grouped-test"], docs_img / "classifier_confusion_ham_test.png",
                       "HAM10000 lesion-grouped test (7 classes), counts; colour = row-normalised")
    return metrics


def write_artifacts(out: Path, metrics: dict[str, Any]) -> None:
    """metrics.json + weights.sha256 (what tests/test_shipped_models.py checks)."""
    from inference.engines.base import model_sha256
    from inference.engines.classifier_net import WEIGHTS_NAME

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "weights.sha256").write_text(f"{model_sha256(out / WEIGHTS_NAME)}  {WEIGHTS_NAME}\n")

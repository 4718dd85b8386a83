"""Train the class-conditional diffusion generator of explanation images (DDPM loss, DDIM sampling).

Classifier-free guidance: during training the class label is replaced by a "null" class with
probability ``p_uncond``; sampling mixes conditional and unconditional noise predictions, which
makes the pictures far more typical of their class than the plain conditional model. The null class
is stored as the LAST entry of ``class_codes`` (``NULL_CODE``) and named in ``config.extra``.

Measured afterwards: how often the shipped classifier recognises a generated picture as the class it
was generated for (per class + overall), and a sample grid for docs/img.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.engines.generator_net import (
    GeneratorConfig,
    build_generator_unet,
    ddim_sample,
    load_generator_parts,
    predict,
    save_generator,
    to_uint8,
)
from inference.training import data as D
from inference.training.run import TrainingRun, prepare_run, run_items

NULL_CODE = "_unconditional"


class ClassSelectionError(ValueError):
    """A requested class that cannot be learnt (unknown code or too few training photos)."""


class InitFromError(ValueError):
    """A generator to continue from that does not fit the run (fewer classes, other size, patches or target)."""


@dataclass
class GeneratorRun(TrainingRun):
    epochs: int = 30
    sample_size: int = 64
    patch_size: int = 4  # the UNet sees 16 x 16 grids of 4 x 4 pixel patches: what a 2-core CPU affords
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    batch_size: int = 32
    lr: float = 5e-4
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    min_snr_gamma: float = 0.0  # Min-SNR loss weighting (Hang et al., 2023), e.g. 5; 0 = plain DDPM loss
    prediction_type: str = "epsilon"  # what the UNet learns to predict: the noise, or v ("v_prediction")
    shift_patches: bool = False  # sampling setting stored in the config (see generator_net)
    dynamic_threshold: float = 0.0  # sampling setting stored in the config (see generator_net)
    guidance_scale: float = 3.0
    num_inference_steps: int = 25
    min_per_class: int = 40  # DermNet-grouped codes need this many training photos to be learnt
    # how often a photo is drawn, as (photos of its class) ** -class_balance: 0 = as the data come
    # (two-thirds of HAM10000 are naevi, 1 % dermatofibromas), 1 = every class equally often
    class_balance: float = 0.0
    init_from: Path | None = None  # continue this generator (its classes, maybe more; same size, patches, target)
    classes: tuple[str, ...] | None = None  # learn only these codes (compute goes further on fewer classes)
    classifier: Path | None = None  # for the recognition metric
    samples_per_class: int = 16


def _lr(run: GeneratorRun, step: int, elapsed_s: float, total_steps: int) -> float:
    """Linear warm-up over 200 steps, then cosine decay to 5 % over the time budget (or all epochs):
    a constant rate of 1e-3 let a CPU run diverge after 4,000 steps."""
    import math

    frac = elapsed_s / run.time_budget_s if run.time_budget_s else step / max(1, total_steps)
    return run.lr * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _loss_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma weights of the loss, min(SNR, gamma) / SNR for epsilon (/ (SNR + 1) for v, whose
    loss is already SNR + 1 times the epsilon loss): the nearly clean timesteps, easy and many, stop
    dominating the gradient, so the scarce CPU steps go to the noisy ones where a picture's overall
    shape and colour are decided. gamma <= 0 gives the plain (unweighted) loss."""
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


def _target(x: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet learns to output for x_t = sqrt(a) x + sqrt(1 - a) noise: the noise itself, or
    v = sqrt(a) noise - sqrt(1 - a) x (Salimans & Ho, 2022), which stays well scaled at every noise level."""
    if prediction_type == "epsilon":
        return noise
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x


def patch_grid_strength(images: torch.Tensor, period: int) -> float:
    """How strongly pictures (B x 3 x S x S) show a pattern repeating every ``period`` px, the residual
    grid of a patched UNet: the mean spectral power at the pattern's harmonics (multiples of S / period
    cycles, both axes) over the mean power of the frequencies next to them. Natural photos give about
    1.4 (64 px HAM10000 photos, period 4); a visible grid gives far more."""
    x = images - images.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=tuple(range(x.dim() - 2)))
    size = power.shape[-1]
    on = torch.zeros(size, size, dtype=torch.bool)
    on[:: size // period, :: size // period] = True
    on[0, 0] = False  # the mean, not a pattern
    near = torch.zeros_like(on)
    for d in (1, -1):
        near |= torch.roll(on, d, 0) | torch.roll(on, d, 1)
    near &= ~on
    near[0, 0] = False
    return float(power[on].mean() / power[near].mean().clamp(min=1e-12))


def _learnable_codes(codes: list[str], train: np.ndarray, min_per_class: int,
                     classes: tuple[str, ...] | None = None) -> list[str]:
    """The codes (per row, with the train mask) with at least ``min_per_class`` training photos, or the
    requested ``classes``. Asking for a class that cannot be learnt is an error, not a silent skip."""
    counts: dict[str, int] = {}
    for i in np.flatnonzero(train):
        counts[codes[i]] = counts.get(codes[i], 0) + 1
    usable = sorted(c for c, n in counts.items() if n >= min_per_class)
    if not classes:
        return usable
    unusable = sorted(set(classes) - set(usable))
    if unusable:
        raise ClassSelectionError(f"cannot learn {', '.join(unusable)}: not a vocabulary code with "
                                  f">= {min_per_class} training photos; usable: {', '.join(usable)}")
    return sorted(set(classes))


def check_classes(run: GeneratorRun) -> list[str]:
    """The classes the run will learn, from the labels alone: a bad ``--classes`` fails before the
    photos are decoded."""
    items = run_items(run)
    keep, codes = D.item_codes(items)
    train = D.split_masks(run.data, [items[i] for i in keep])["train"]
    return _learnable_codes(codes, train, run.min_per_class, run.classes)


def class_balanced_weights(row_codes: list[str], power: float) -> torch.Tensor:
    """Sampling weight per training row: (rows of its class) ** -power, so each class is drawn in
    proportion to (its rows) ** (1 - power)."""
    counts: dict[str, int] = {}
    for c in row_codes:
        counts[c] = counts.get(c, 0) + 1
    return torch.tensor([counts[c] ** -power for c in row_codes], dtype=torch.float64)


def check_init_from(run: GeneratorRun, codes: list[str]) -> dict[str, Any] | None:
    """The config of the generator ``run.init_from`` if the run can continue it (checked before any
    photo is decoded), else InitFromError saying what differs."""
    if run.init_from is None:
        return None
    from inference.engines.base import model_sha256

    try:
        prev = GeneratorConfig.load(run.init_from)
    except (OSError, ValueError, TypeError) as exc:
        raise InitFromError(f"no generator to continue at {run.init_from}: {exc}") from exc
    wanted = {"sample_size": run.sample_size, "patch_size": run.patch_size, "prediction_type": run.prediction_type}
    differ = [f"{k} {getattr(prev, k)!r} (this run: {v!r})" for k, v in wanted.items() if getattr(prev, k) != v]
    known = [c for c in prev.class_codes if c != NULL_CODE]
    dropped = sorted(set(known) - set(codes))
    if dropped or prev.class_codes[-1:] != [NULL_CODE]:  # classes may be added, never dropped
        differ.append(f"class_codes {prev.class_codes!r} (this run: {[*codes, NULL_CODE]!r}; "
                      "a continued run keeps every class and may add new ones)")
    if differ:
        raise InitFromError(f"cannot continue {run.init_from}: it has " + "; ".join(differ))
    return {"path": str(run.init_from), "model_version": prev.model_version,
            "weights_sha256": model_sha256(run.init_from / "unet"), "training": prev.extra.get("training", {}),
            "class_codes": prev.class_codes, "added_classes": [c for c in codes if c not in known]}


def widen_classes(unet: Any, old_codes: list[str], new_codes: list[str]) -> Any:
    """``unet`` (trained on ``old_codes``, the null class last) as a UNet for ``new_codes`` (a superset,
    null class last): every known class keeps its label embedding, each added class starts from the
    null class's, so it begins as "skin in general" and guidance grows with training."""
    if new_codes == old_codes:
        return unet
    wide = type(unet).from_config(unet.config, num_class_embeds=len(new_codes))
    state = unet.state_dict()
    old = state["class_embedding.weight"]
    null_row = old[old_codes.index(NULL_CODE)]
    state["class_embedding.weight"] = torch.stack(
        [old[old_codes.index(c)] if c in old_codes else null_row for c in new_codes])
    wide.load_state_dict(state)  # in fp32, whatever the stored weights were
    return wide


def _training_rows(labelled: D.Labelled, masks: dict[str, np.ndarray], codes: list[str]) -> np.ndarray:
    """Training rows of the classes ``codes`` (as check_classes chose them)."""
    wanted = set(codes)
    return np.asarray([i for i in np.flatnonzero(masks["train"]) if labelled.codes[i] in wanted], dtype=np.int64)


@torch.no_grad()
def sample(unet: Any, config: Any, class_index: int, n: int, seed: int, *, guidance_scale: float | None = None,
           steps: int | None = None, device: str = "cpu") -> torch.Tensor:
    """n images of one class, B x 3 x S x S in [0, 1]: the serving sampler, from one seeded noise batch."""
    s = config.sample_size
    noise = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed)).to(device)
    return ddim_sample(unet, config, class_index, noise, guidance_scale=guidance_scale, steps=steps)


def train_generator(run: GeneratorRun) -> dict[str, Any]:
    codes = check_classes(run)  # from the labels: a bad --classes fails before any photo is decoded
    continued_from = check_init_from(run, codes)  # likewise a generator that cannot be continued
    gen, device, log_path, labelled, masks = prepare_run(run, run.sample_size)
    rows = _training_rows(labelled, masks, codes)
    index = {c: k for k, c in enumerate(codes)}
    # the image type a class is mostly photographed with (for the recognition check)
    image_types = {}
    for c in codes:
        t = [labelled.image_type[i] for i in rows if labelled.codes[i] == c]
        image_types[c] = "clinical" if np.mean(t) >= 0.5 else "dermoscopic"

    on_gpu = device.startswith("cuda")
    if on_gpu:  # tuned convolution kernels, TF32 matrix maths
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # on a GPU the photos stay there (10k 64 px photos: 120 MB) and noise is drawn there: for a UNet
    # this small, copying batches from the host would cost more than computing them
    images_t = torch.from_numpy(np.ascontiguousarray(labelled.images)).to(device if on_gpu else "cpu")
    noise_gen = torch.Generator(device=device).manual_seed(run.seed) if on_gpu else gen
    types_t = torch.from_numpy(labelled.image_type)
    targets_t = torch.tensor([index.get(c, -1) for c in labelled.codes])
    null_index = len(codes)
    config = GeneratorConfig(
        class_codes=[*codes, NULL_CODE], sample_size=run.sample_size, num_inference_steps=run.num_inference_steps,
        patch_size=run.patch_size, model_version=time.strftime("%Y.%m.%d"), prediction_type=run.prediction_type,
        shift_patches=run.shift_patches, dynamic_threshold=run.dynamic_threshold,
        extra={"null_class_index": null_index, "guidance_scale": run.guidance_scale, "image_types": image_types},
    )
    if continued_from:  # its architecture, its weights (fp16 on disk, trained on in fp32)
        unet = widen_classes(load_generator_parts(run.init_from)[0], continued_from["class_codes"],
                             config.class_codes).float().to(device)
    else:
        unet = build_generator_unet(len(codes) + 1, run.sample_size, tuple(run.block_out_channels),
                                    run.layers_per_block, norm_num_groups=16, patch_size=run.patch_size).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = config.make_scheduler()
    alphas = noise_sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=run.lr, weight_decay=0.0)
    steps_per_epoch = max(1, len(rows) // run.batch_size)
    row_weights = class_balanced_weights([labelled.codes[i] for i in rows], run.class_balance)

    from tqdm import tqdm

    start = time.monotonic()
    step, epochs_done, stop = 0, 0, False
    for epoch in range(run.epochs):
        unet.train()
        if run.class_balance > 0:  # drawn with replacement, rare classes more often
            draw = torch.multinomial(row_weights, len(rows), replacement=True, generator=gen)
        else:
            draw = torch.randperm(len(rows), generator=gen)
        perm = rows[draw.numpy()]
        running, seen = 0.0, 0
        for b in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{run.epochs}", mininterval=30):
            if run.time_budget_s and time.monotonic() - start >= run.time_budget_s:
                stop = True
                break
            for grp in opt.param_groups:
                grp["lr"] = _lr(run, step, time.monotonic() - start, run.epochs * steps_per_epoch)
            idx = torch.from_numpy(perm[b * run.batch_size : (b + 1) * run.batch_size])
            x = images_t[idx.to(images_t.device)].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            # flips; dermoscopy also vertically (no "up")
            flip_h = (torch.rand(len(idx), generator=gen) < 0.5).to(x.device)
            x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(3), x)
            flip_v = ((torch.rand(len(idx), generator=gen) < 0.5) & (types_t[idx] == D.DERMOSCOPIC)).to(x.device)
            x = torch.where(flip_v.view(-1, 1, 1, 1), x.flip(2), x).to(device)
            y = targets_t[idx].clone()
            y[torch.rand(len(idx), generator=gen) < run.p_uncond] = null_index
            noise = torch.randn(x.shape, generator=noise_gen, device=noise_gen.device)
            t = torch.randint(0, config.num_train_timesteps, (len(idx),), generator=noise_gen, device=noise_gen.device)
            a = alphas[t]
            noisy = a.sqrt().view(-1, 1, 1, 1) * x + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
            target = _target(x, noise, a, config.prediction_type)
            err = (predict(unet, config, noisy, t, y.to(device)) - target).pow(2).mean(dim=(1, 2, 3))
            loss = (err * _loss_weight(a, run.min_snr_gamma, config.prediction_type)).mean()
            if not torch.isfinite(loss):  # a bad batch must not poison the weights (or the EMA)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            d = min(run.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
            step += 1
            running += loss.item() * len(idx)
            seen += len(idx)
        if seen:
            epochs_done = epoch + 1
        record = {"epoch": epoch + 1, "step": step, "loss": running / max(1, seen),
                  "elapsed_s": round(time.monotonic() - start, 1)}
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if stop:
            break

    config.extra["training"] = {
        "seed": run.seed, "epochs_done": epochs_done, "steps": step, "batch_size": run.batch_size,
        "train_images": int(len(rows)), "wall_s": round(time.monotonic() - start, 1),
        "time_budget_s": run.time_budget_s, "device": device, "subset_per_label": run.items_per_label,
        "dtype": "float16", "chosen_classes": bool(run.classes), "min_per_class": run.min_per_class,
        "min_snr_gamma": run.min_snr_gamma, "prediction_type": run.prediction_type,
        "class_balance": run.class_balance, "lr": run.lr,
    }
    if continued_from:
        config.extra["training"]["continued_from"] = continued_from
    # shipped in fp16 (half the bytes); measured as shipped: reloaded from disk, computed in fp32
    save_generator(run.out, copy.deepcopy(ema).half(), config)
    shipped, _scheduler, config = load_generator_parts(run.out)
    shipped = shipped.float().to(device).eval()
    metrics: dict[str, Any] = {"steps": step, "epochs_done": epochs_done}
    if run.classifier is not None:
        metrics["recognition"] = recognition(shipped, config, run.classifier, run.samples_per_class, seed=run.seed,
                                             device=device, data=run.data)
    if run.docs_img is not None:
        sample_grid(shipped, config, run.docs_img / "generator_samples.png", seed=run.seed, device=device)
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    from inference.engines.base import model_sha256

    # the same digest ClassConditionalExplainer reports as weights_sha256
    (run.out / "weights.sha256").write_text(f"{model_sha256(run.out / 'unet')}  unet/\n")
    return metrics


@torch.no_grad()
def recognition(unet: Any, config: Any, classifier_dir: Path, n: int, *, seed: int = 0, device: str = "cpu",
                data: Path | None = None) -> dict[str, Any]:
    """Share of generated images the classifier assigns (top-1) to the class they were generated for.

    With ``data``, also the reference the goal should be read against: how often the same classifier
    names held-out real photos of each class correctly (``real_photos``), and whether the pictures are
    near-copies of training photos (``memorisation``)."""
    from inference.training.evaluate import load_model

    model, cconf = load_model(classifier_dir)
    size = int(cconf["image_size"])
    image_types = config.extra.get("image_types", {})
    per_class: dict[str, float] = {}
    hits = total = 0
    grid: list[float] = []
    drawn: dict[str, np.ndarray] = {}
    for k, code in enumerate(config.class_codes[:-1]):
        imgs = sample(unet, config, k, n, seed + k, device=device)
        u8 = drawn[code] = to_uint8(imgs)
        if config.patch_size > 1:
            grid.append(patch_grid_strength(imgs, config.patch_size))
        if imgs.shape[-1] != size:
            u8 = to_uint8(F.interpolate(imgs, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1))
        itype = D.IMAGE_TYPES.get(image_types.get(code, ""), D.DERMOSCOPIC)
        pred = _top1_codes(model, cconf, u8, np.full(len(u8), itype))
        h = sum(p == code for p in pred)
        per_class[code] = h / len(pred)
        hits += h
        total += len(pred)
    result: dict[str, Any] = {
        "overall": hits / max(1, total), "per_class": per_class, "samples_per_class": n, "seed": seed,
        "guidance_scale": config.extra.get("guidance_scale"), "steps": config.num_inference_steps,
        "shift_patches": config.shift_patches, "dynamic_threshold": config.dynamic_threshold,
    }
    if grid:  # the mean over classes; photos give about 1.4
        result["patch_grid"] = round(float(np.mean(grid)), 2)
    if data is not None:
        result["real_photos"] = real_photo_recognition(model, cconf, data, image_types)
        result["memorisation"] = memorisation(drawn, data)
    return result


def real_photo_recognition(model: Any, cconf: dict[str, Any], data: Path, image_types: dict[str, str]) -> dict[str, Any]:
    """The classifier's top-1 recall on real photos of each generator class that it never trained on (the
    grouped validation and test splits), taken with the image type the generator draws it in."""
    from inference.training.evaluate import decode_items

    items = D.ham_items(data) + D.dermnet_items(data)
    masks = D.split_masks(data, items)
    held_out = masks["val"] | masks["ham-grouped-test"] | masks["dermnet-grouped-test"]
    wanted = [it for i, it in enumerate(items) if held_out[i]]
    labelled = D.label(decode_items(data, wanted, int(cconf["image_size"])))
    rows = [i for i, c in enumerate(labelled.codes)
            if c in image_types and labelled.image_type[i] == D.IMAGE_TYPES[image_types[c]]]
    pred = _top1_codes(model, cconf, labelled.images[rows], labelled.image_type[rows])
    true = [labelled.codes[i] for i in rows]
    per_class, counts = {}, {}
    for code in image_types:
        hits = [p == t for p, t in zip(pred, true, strict=True) if t == code]
        counts[code] = len(hits)
        if hits:
            per_class[code] = sum(hits) / len(hits)
    overall = sum(p == t for p, t in zip(pred, true, strict=True)) / max(1, len(true))
    return {"overall": overall, "per_class": per_class, "n_per_class": counts,
            "photos": "grouped validation + test splits, never trained on by the classifier"}


@torch.no_grad()
def memorisation(generated: dict[str, np.ndarray], data: Path, *, quantile: float = 0.05) -> dict[str, Any]:
    """Whether the generator copies its training photos: each generated picture's distance to the nearest
    training photo of its class (RMS over pixels in [0, 1], at half the sample size, flipped copies
    included as training showed them), against the same distance for unseen real photos of the class
    (held out by both split schemes: :func:`~inference.training.data.never_trained_on`). A picture closer than the ``quantile`` of
    the unseen photos' distances counts as a near-copy: a generator that draws new pictures has about
    ``quantile`` of them, one that memorises far more. ``generated``: code -> N x S x S x 3 uint8."""
    from inference.training.evaluate import decode_items

    size = next(iter(generated.values())).shape[1]
    items = D.ham_items(data) + D.dermnet_items(data)
    keep, codes = D.item_codes(items)
    code_of = {items[i]: c for i, c in zip(keep, codes, strict=True)}
    masks = D.split_masks(data, items)
    never = D.never_trained_on(masks)

    def photos(mask: np.ndarray) -> dict[str, torch.Tensor]:
        chosen = [it for i, it in enumerate(items) if mask[i] and code_of.get(it) in generated]
        cache = decode_items(data, chosen, size)
        return {c: _small(cache.images[[k for k, it in enumerate(chosen) if code_of[it] == c]]) for c in generated}

    # whichever split scheme the generator trained on: every photo it may have seen, against photos neither saw
    train, unseen = photos(D.ever_trained_on(masks)), photos(never["ham10000"] | never["dermnet"])

    def nearest(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if not len(x) or not len(ref):
            return torch.empty(0)
        n = ref.shape[-1]
        flips = torch.cat([ref, ref.flip(-1), ref.flip(-2), ref.flip(-1, -2)]).flatten(1)
        d = torch.cat([torch.cdist(chunk.flatten(1), flips).min(1).values for chunk in x.split(256)])
        return d / (3 * n * n) ** 0.5

    gen_d = {c: nearest(_small(g), train[c]) for c, g in generated.items()}
    real_d = torch.cat([nearest(unseen[c], train[c]) for c in generated])
    if not len(real_d):
        return {}
    threshold = float(torch.quantile(real_d, quantile))
    near = {c: float((d < threshold).float().mean()) for c, d in gen_d.items() if len(d)}
    all_gen = torch.cat(list(gen_d.values()))
    return {"near_copies": float((all_gen < threshold).float().mean()), "per_class": near, "quantile": quantile,
            "threshold": round(threshold, 4), "compared_at": size // 2, "unseen_photos": len(real_d),
            "median_distance": {"generated": round(float(all_gen.median()), 4),
                                "unseen_photos": round(float(real_d.median()), 4)}}


def _small(u8: np.ndarray) -> torch.Tensor:
    """N x S x S x 3 uint8 -> N x 3 x S/2 x S/2 in [0, 1]: small differences in texture do not make a copy."""
    return F.avg_pool2d(torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).float() / 255, 2)


def _top1_codes(model: Any, cconf: dict[str, Any], images: np.ndarray, image_type: np.ndarray) -> list[str]:
    """The classifier's top-1 class code per uint8 image, with the views it serves with."""
    from inference.training.evaluate import logits_for

    logits = logits_for(model, images, image_type, cconf["mean"], cconf["std"], views=cconf.get("tta_views", 1))
    return [cconf["class_codes"][i] for i in logits.argmax(1).tolist()]


def sample_grid(unet: Any, config: Any, path: Path, *, per_class: int = 8, seed: int = 0, device: str = "cpu",
                tile: int = 128) -> Path:
    """A PNG grid: one row per class, labelled, captioned as AI-generated; tiles of at least ``tile`` px."""
    from PIL import Image, ImageDraw

    codes = config.class_codes[:-1]
    s = config.sample_size * max(1, tile // config.sample_size)
    label_w, caption_h = 190, 24
    grid = Image.new("RGB", (label_w + per_class * s, caption_h + len(codes) * s), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "AI-GENERATED illustrations (SkinBridge generator) - not patient photos, not for diagnosis",
              fill=(160, 0, 0))
    for k, code in enumerate(codes):
        imgs = sample(unet, config, k, per_class, seed + 1000 + k, device=device)
        draw.text((4, caption_h + k * s + s // 2 - 6), code, fill=(0, 0, 0))
        for j, img in enumerate(to_uint8(imgs)):
            tile = Image.fromarray(img)
            grid.paste(tile.resize((s, s), Image.Resampling.NEAREST), (label_w + j * s, caption_h + k * s))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def evaluate_generator(folder: Path, classifier_dir: Path, samples_per_class: int = 16, *, seed: int = 0,
                       steps: int | None = None, guidance_scale: float | None = None,
                       shift_patches: bool | None = None, dynamic_threshold: float | None = None,
                       data: Path | None = None, docs_img: Path | None = None) -> dict[str, Any]:
    """Recognition metric of a saved generator folder, recorded into its metrics.json (and the sampling
    settings given, ``steps``, ``guidance_scale``, ``shift_patches``, ``dynamic_threshold``, into its
    config.json: serving then samples the way it was measured)."""
    import dataclasses

    unet, _scheduler, config = load_generator_parts(folder)
    unet = unet.float().eval()
    changes: dict[str, Any] = {k: v for k, v in {"num_inference_steps": steps or None, "shift_patches": shift_patches,
                                                 "dynamic_threshold": dynamic_threshold}.items() if v is not None}
    if changes or guidance_scale is not None:
        extra = dict(config.extra)
        if guidance_scale is not None:
            extra["guidance_scale"] = guidance_scale
        config = dataclasses.replace(config, extra=extra, **changes)  # validated like a loaded config
        config.save(folder)
    result = recognition(unet, config, classifier_dir, samples_per_class, seed=seed, data=data)
    if docs_img is not None:
        sample_grid(unet, config, docs_img / "generator_samples.png", seed=seed)
    path = folder / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["recognition"] = result
    metrics["recognition"]["classifier_sha256"] = _sha(classifier_dir)
    path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return result


def _sha(classifier_dir: Path) -> str:
    from inference.engines.base import model_sha256

    return model_sha256(classifier_dir / "model.safetensors")

"""`skinbridge train ...`: train and evaluate the project's own default models.

Registered by the main CLI as ``main.add_command(train_command)``.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click

from inference.training.data import EVALUATION_SPLITS

# Defaults relative to the current folder, the repository root (as for the data): relative to this file
# they would point into site-packages for the installed CLI, and results would land there.
WEIGHTS = Path("inference/weights")
REPO_DOCS = Path("docs")
DEFAULT_DATA = Path("../shared/data")


def _common(f):  # type: ignore[no-untyped-def]
    f = click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True,
                     help="folder with ham10000/ and dermnet/")(f)
    f = click.option("--epochs", type=int, default=30, show_default=True)(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--device", default="auto", show_default=True, help='"auto", "cpu", "cuda", "cuda:1"')(f)
    f = click.option("--time-budget", type=float, default=None,
                     help="wall-clock minutes; the schedule follows elapsed time and training stops there")(f)
    f = click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads")(f)
    f = click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("var/cache"), show_default=True)(f)
    f = click.option("--subset-per-label", type=int, default=None, hidden=True,
                     help="tests: train on a few photos per dataset label only")(f)
    f = click.option("--docs", type=click.Path(path_type=Path), default=REPO_DOCS, show_default=True,
                     help="docs folder: models.md and img/ are updated")(f)
    return f


@click.group("train")
def train_command() -> None:
    """Train and evaluate SkinBridge's own classifier and explanation-image generator."""


@train_command.command("classifier")
@_common
@click.option("--out", type=click.Path(path_type=Path), default=WEIGHTS / "classifier", show_default=True)
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--width", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--class-balance", type=float, default=0.5, show_default=True,
              help="loss weight ~ n_class^-x: 0 = plain cross-entropy, 1 = inverse frequency")
@click.option("--tta-views", type=click.Choice(["1", "2", "4", "8"]), default="8", show_default=True,
              help="flips/rotations averaged at calibration, evaluation and serving")
@click.option("--mix-prob", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="share of batches mixed (half mixup, half CutMix)")
@click.option("--cam-stage", type=click.Choice(["-1", "-2"]), default="-1", show_default=True,
              help="network stage Grad-CAM reads: -1 the last, -2 one finer")
@click.option("--resume", is_flag=True, help="continue the run checkpointed in --out (same options)")
@click.option("--sitting-epochs", type=int, default=None,
              help="stop after this many epochs with a checkpoint; continue later with --resume")
@click.option("--checkpoint-every", type=click.FloatRange(0), default=0.0, show_default=True,
              help="seconds between checkpoints (0: after every epoch); a sitting's end always saves one")
@click.option("--teacher", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="a trained classifier folder (same classes) to distil from")
@click.option("--distill-alpha", type=click.FloatRange(0.0, 1.0), default=0.7, show_default=True,
              help="weight of the teacher's term in the loss")
@click.option("--distill-temperature", type=click.FloatRange(0.5, 10.0), default=2.0, show_default=True)
@click.option("--val-every", type=click.IntRange(1), default=1, show_default=True,
              help="epochs between the logged validation looks")
@click.option("--half-weights", is_flag=True, help="store the weights as float16 (half the file)")
def classifier_cmd(data: Path, epochs: int, seed: int, device: str, time_budget: float | None, threads: int,
                   cache_dir: Path, subset_per_label: int | None, docs: Path, out: Path, image_size: int,
                   width: int, lr: float, batch_size: int, class_balance: float, tta_views: str, mix_prob: float,
                   cam_stage: str, resume: bool, sitting_epochs: int | None, checkpoint_every: float,
                   teacher: Path | None, distill_alpha: float, distill_temperature: float, val_every: int,
                   half_weights: bool) -> None:
    """Train the classifier on HAM10000 + DermNet; writes weights, config, metrics and MODEL_CARD.md."""
    from inference.training.train_classifier import ClassifierRun, ResumeMismatch, TeacherMismatch, train_classifier

    if resume and not (out / "checkpoint.pt").exists():
        raise click.BadParameter(f"no checkpoint to resume in {out}", param_hint="--resume")
    if teacher is not None and not (teacher / "config.json").exists():
        raise click.BadParameter(f"no classifier in {teacher}", param_hint="--teacher")
    try:
        metrics = train_classifier(ClassifierRun(
            data=data, out=out, epochs=epochs, seed=seed, device=device, image_size=image_size, width=width, lr=lr,
            batch_size=batch_size, time_budget_s=time_budget * 60 if time_budget else None, threads=threads,
            cache_dir=cache_dir, docs_img=docs / "img", items_per_label=subset_per_label,
            min_per_class=2 if subset_per_label else 10, class_balance=class_balance, tta_views=int(tta_views),
            mix_prob=mix_prob, cam_stage=int(cam_stage), resume=resume, sitting_epochs=sitting_epochs,
            checkpoint_every_s=checkpoint_every, teacher=teacher, distill_alpha=distill_alpha,
            distill_temperature=distill_temperature, val_every=val_every, half_weights=half_weights,
        ))
    except ResumeMismatch as exc:
        raise click.BadParameter(str(exc), param_hint="--resume") from exc
    except TeacherMismatch as exc:
        raise click.BadParameter(str(exc), param_hint="--teacher") from exc
    if metrics is None:
        click.echo(f"checkpoint saved in {out}; continue with the same command and --resume")
        return
    # the schedule, not how it was split into sittings: the recorded command reruns the whole run
    _refresh_classifier_card(out, docs, trained_with=_command_line(skip=("resume", "sitting_epochs")))
    click.echo(json.dumps(_summary(metrics), indent=2))


@train_command.command("classifier-report")
@click.option("--model", type=click.Path(path_type=Path), default=WEIGHTS / "classifier", show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--ab", "ab_runs", multiple=True, metavar="LABEL=FOLDER",
              help="a finished training run to list in the card's A/B table (repeatable)")
@click.option("--saliency/--no-saliency", default=True, show_default=True,
              help="measure Grad-CAM on the lesion and draw the grid of validation photos")
@click.option("--photos", type=click.IntRange(1, 2000), default=200, show_default=True,
              help="dermoscopic validation photos the Grad-CAM measurement uses")
@click.option("--docs", type=click.Path(path_type=Path), default=REPO_DOCS, show_default=True)
def classifier_report_cmd(model: Path, data: Path, ab_runs: tuple[str, ...], saliency: bool, photos: int,
                          docs: Path) -> None:
    """Add the A/B table and the Grad-CAM measurements to a classifier's metrics; rewrite its card."""
    from inference.training.model_card import ab_summary, load_json

    metrics = load_json(model / "metrics.json")
    if ab_runs:
        rows = {}
        for spec in ab_runs:
            label, sep, folder = spec.partition("=")
            if not sep or not (Path(folder) / "metrics.json").exists():
                raise click.BadParameter(f"{spec!r}: expected LABEL=FOLDER of a finished run", param_hint="--ab")
            rows[label] = ab_summary(load_json(Path(folder) / "metrics.json"), load_json(Path(folder) / "config.json"))
        metrics["ab"], metrics["ab_command"] = rows, _command_line()
    if saliency:
        from inference.training.saliency import lesion_overlap, saliency_grid

        metrics["saliency"] = lesion_overlap(model, data, n=photos)
        saliency_grid(model, data, docs / "img" / "classifier_gradcam_grid.png")
    (model / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _refresh_classifier_card(model, docs)
    click.echo(json.dumps({k: metrics[k] for k in ("ab", "saliency") if k in metrics}, indent=2))


@train_command.command("classifier-ensemble")
@click.argument("members", nargs=-1, required=True,
                type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="a new folder for the ensemble")
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--tta-views", type=click.Choice(["1", "2", "4", "8"]), default=None,
              help="flips/rotations averaged per member (default: the members')")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("var/cache"), show_default=True)
@click.option("--subset-per-label", type=int, default=None, hidden=True, help="tests: a few photos per label")
@click.option("--docs", type=click.Path(path_type=Path), default=REPO_DOCS, show_default=True)
def classifier_ensemble_cmd(members: tuple[Path, ...], out: Path, data: Path, tta_views: str | None, device: str,
                            threads: int, cache_dir: Path, subset_per_label: int | None, docs: Path) -> None:
    """Join finished classifier runs of one recipe (other seeds) into one ensemble: their logits averaged,
    calibrated and thresholded on validation, measured on test; writes the folder, card and metrics."""
    import torch

    from inference.engines.base import pick_device
    from inference.training.ensemble import EnsembleMismatch, join_classifiers

    if len(members) < 2:
        raise click.BadParameter("an ensemble needs at least two finished classifier runs", param_hint="MEMBERS")
    for folder in members:
        if not (folder / "metrics.json").exists() or not (folder / "config.json").exists():
            raise click.BadParameter(f"{folder} is not a finished classifier run", param_hint="MEMBERS")
    torch.set_num_threads(threads)
    try:
        metrics = join_classifiers(
            list(members), out, data=data, cache_dir=cache_dir, tta_views=int(tta_views) if tta_views else None,
            commands=[_card_command(folder, "Trained with") for folder in members], docs_img=docs / "img",
            device=pick_device(device), items_per_label=subset_per_label)
    except EnsembleMismatch as exc:
        raise click.BadParameter(str(exc), param_hint="MEMBERS") from exc
    _refresh_classifier_card(out, docs, trained_with=_command_line())
    click.echo(json.dumps(_summary({k: v for k, v in metrics.items() if k != "ab"}), indent=2))


@train_command.command("photo-type")
@click.option("--model", type=click.Path(path_type=Path), default=WEIGHTS / "classifier", show_default=True,
              help="the classifier folder the photo-type model is stored in (photo_type.json)")
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("var/cache"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--subset-per-label", type=int, default=None, hidden=True, help="tests: a few photos per label")
@click.option("--docs", type=click.Path(path_type=Path), default=REPO_DOCS, show_default=True)
def photo_type_cmd(model: Path, data: Path, cache_dir: Path, seed: int, subset_per_label: int | None,
                   docs: Path) -> None:
    """Train the dermoscopic-vs-clinical photo model that picks the classifier's operating points."""
    from inference.training.model_card import load_json
    from inference.training.photo_type import train_photo_type
    from inference.training.run import small_subset

    if not (model / "config.json").exists():
        raise click.BadParameter(f"no classifier in {model}", param_hint="--model")
    items = small_subset(data, subset_per_label) if subset_per_label else None
    result = train_photo_type(data, model, cache_dir=cache_dir, seed=seed, items=items)
    metrics = load_json(model / "metrics.json") if (model / "metrics.json").exists() else {}
    metrics["photo_type"] = {"threshold": result.threshold, **(result.metrics or {}), "command": _command_line()}
    (model / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if "ham-grouped-test" in metrics:
        _refresh_classifier_card(model, docs)
    click.echo(json.dumps(metrics["photo_type"], indent=2))


def _card_command(model: Path, label: str) -> str | None:
    """The command a model folder's card records after ``label`` ("Trained with", "Measured with")."""
    card = model / "MODEL_CARD.md"
    found = re.search(label + r": `([^`]*)`", card.read_text(encoding="utf-8")) if card.exists() else None
    return found.group(1) if found else None


def _refresh_classifier_card(model: Path, docs: Path, trained_with: str | None = None) -> None:
    """Rewrite a classifier folder's card (and its docs/models.md section) from its config and metrics,
    keeping the recorded training command unless a new one is given."""
    from inference.training.model_card import classifier_card, load_json, write_card

    if trained_with is None:  # an ensemble's card records how it was joined (its members' commands are in its config)
        trained_with = _card_command(model, "Trained with") or _card_command(model, "Joined with")
    card = classifier_card(load_json(model / "config.json"), load_json(model / "metrics.json"), _rel(model),
                           trained_with)
    write_card(model, card, docs / "models.md", "classifier")


def _sampling_options(f):
    """Sampling settings stored in a generator's config (and bound by its clinical review)."""
    f = click.option("--dynamic-threshold", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
                     help="threshold the predicted picture at this quantile of |x0|, e.g. 0.95 (0: plain clipping)"
                     )(f)
    return click.option("--shift-patches/--fixed-patches", default=None,
                        help="move the UNet's patch grid every sampling step (hides the patch grid)")(f)


@train_command.command("generator")
@_common
@click.option("--out", type=click.Path(path_type=Path), default=WEIGHTS / "generator", show_default=True)
@click.option("--classifier", type=click.Path(path_type=Path), default=WEIGHTS / "classifier", show_default=True,
              help="classifier folder for the recognition metric")
@click.option("--sample-size", type=int, default=64, show_default=True, help="image size in px")
@click.option("--patch-size", type=int, default=4, show_default=True,
              help="the UNet sees patches of this many px square (1: plain pixels; larger: cheaper)")
@click.option("--samples-per-class", type=int, default=16, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="DDIM sampling steps")
@click.option("--channels", default="64,128,128", show_default=True, help="UNet block widths")
@click.option("--layers-per-block", type=click.IntRange(1, 4), default=1, show_default=True,
              help="ResNet layers per UNet block (more: a deeper, slower UNet)")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--classes", default=None,
              help="comma-separated vocabulary codes to learn (default: every class with enough training photos)")
@click.option("--min-snr-gamma", type=float, default=0.0, show_default=True,
              help="Min-SNR-gamma loss weighting, e.g. 5 (0: plain DDPM loss, as every measured run so far)")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon",
              show_default=True, help="what the UNet learns to predict: the noise, or v")
@click.option("--class-balance", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="draw photos as (photos of their class) ** -X: 0 = as the data come, 1 = every class equally often")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="continue training this generator folder (its classes, plus any new ones in --classes; same size, "
                   "patches and prediction type; "
                   "its architecture wins over --channels/--layers-per-block)")
@_sampling_options
def generator_cmd(data: Path, epochs: int, seed: int, device: str, time_budget: float | None, threads: int,
                  cache_dir: Path, subset_per_label: int | None, docs: Path, out: Path, classifier: Path,
                  sample_size: int, patch_size: int,
                  samples_per_class: int, steps: int, channels: str, layers_per_block: int, batch_size: int, lr: float,
                  classes: str | None, min_snr_gamma: float, prediction_type: str, class_balance: float,
                  init_from: Path | None, shift_patches: bool | None, dynamic_threshold: float | None) -> None:
    """Train the class-conditional diffusion generator; measures recognition by the classifier."""
    from inference.training.model_card import generator_card, load_json, write_card
    from inference.training.train_generator import ClassSelectionError, GeneratorRun, InitFromError, train_generator

    chosen = tuple(c.strip() for c in (classes or "").split(",") if c.strip()) or None
    run = GeneratorRun(
        data=data, out=out, epochs=epochs, seed=seed, device=device, sample_size=sample_size, patch_size=patch_size,
        time_budget_s=time_budget * 60 if time_budget else None, threads=threads, cache_dir=cache_dir,
        classifier=classifier if (classifier / "config.json").exists() else None,
        samples_per_class=samples_per_class, docs_img=docs / "img", items_per_label=subset_per_label,
        min_per_class=2 if subset_per_label else 40,
        num_inference_steps=steps, block_out_channels=tuple(int(c) for c in channels.split(",")),
        layers_per_block=layers_per_block,
        batch_size=batch_size, lr=lr, classes=chosen, min_snr_gamma=min_snr_gamma, prediction_type=prediction_type,
        shift_patches=bool(shift_patches), dynamic_threshold=dynamic_threshold or 0.0,
        class_balance=class_balance, init_from=init_from,
    )
    try:
        metrics = train_generator(run)
    except ClassSelectionError as exc:
        raise click.BadParameter(str(exc), param_hint="--classes") from exc
    except InitFromError as exc:
        raise click.BadParameter(str(exc), param_hint="--init-from") from exc
    write_card(out, generator_card(load_json(out / "config.json"), metrics, _command_line()),
               docs / "models.md", "generator")
    click.echo(json.dumps(metrics, indent=2))


@train_command.command("device-kit")
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path(".devkit/data"), show_default=True)
@click.option("--size", type=int, default=64, show_default=True, help="the training size in px")
@click.option("--quality", type=click.IntRange(50, 100), default=95, show_default=True, help="JPEG/WebP quality")
@click.option("--format", "image_format", type=click.Choice(["jpeg", "webp"]), default="jpeg", show_default=True,
              help="webp: about 30 %% smaller at the same error (128 px kits fit a device call)")
@click.option("--sources", default="ham10000,dermnet", show_default=True, help="data sets to include")
def device_kit_cmd(data: Path, out: Path, size: int, quality: int, image_format: str, sources: str) -> None:
    """The training data cropped and resized for a GPU machine (use the folder as --data there)."""
    from inference.training.device_kit import build_device_kit

    try:
        kit = build_device_kit(data, out, size, quality=quality, image_format=image_format,
                               sources=tuple(s.strip() for s in sources.split(",") if s.strip()))
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(json.dumps({**kit, "mib": round(kit["bytes"] / 2**20, 1), "out": str(out)}))


@train_command.command("evaluate-classifier")
@click.option("--model", type=click.Path(path_type=Path), default=WEIGHTS / "classifier", show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--split", type=click.Choice(list(EVALUATION_SPLITS)), default="ham-grouped-test", show_default=True)
def evaluate_classifier_cmd(model: Path, data: Path, split: str) -> None:
    """Re-evaluate a classifier folder on one split, decoding the photos afresh."""
    from inference.training.evaluate import evaluate_classifier

    result = evaluate_classifier(model, data, split)
    result.pop("confusion", None)
    click.echo(json.dumps(result, indent=2))


@train_command.command("evaluate-generator")
@click.option("--model", type=click.Path(path_type=Path), default=WEIGHTS / "generator", show_default=True)
@click.option("--classifier", type=click.Path(path_type=Path), default=WEIGHTS / "classifier", show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True,
              help="for the real-photo reference")
@click.option("--samples-per-class", type=int, default=16, show_default=True)
@click.option("--steps", type=int, default=None, help="DDIM steps to sample with (stored in the config)")
@click.option("--guidance-scale", type=float, default=None, help="guidance to sample with (stored in the config)")
@_sampling_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="noise seed of the first class (class k: seed + k); another seed checks a result on fresh pictures")
@click.option("--docs", type=click.Path(path_type=Path), default=REPO_DOCS, show_default=True)
def evaluate_generator_cmd(model: Path, classifier: Path, data: Path, samples_per_class: int, steps: int | None,
                           guidance_scale: float | None, shift_patches: bool | None, dynamic_threshold: float | None,
                           seed: int, docs: Path) -> None:
    """Share of generated pictures the classifier recognises as their class; updates metrics, card and grid."""
    from inference.training.train_generator import evaluate_generator

    result = evaluate_generator(model, classifier, samples_per_class, seed=seed, steps=steps,
                                guidance_scale=guidance_scale,
                                shift_patches=shift_patches, dynamic_threshold=dynamic_threshold,
                                data=data if data.exists() else None, docs_img=docs / "img")
    _refresh_generator_card(model, docs, evaluated_with=_command_line())
    click.echo(json.dumps(result, indent=2))


def _refresh_generator_card(model: Path, docs: Path, evaluated_with: str | None = None) -> None:
    """Rewrite a generator folder's card (and its docs/models.md section) from its config and metrics,
    keeping the recorded training command (and measuring command, unless a new one)."""
    from inference.training.model_card import generator_card, load_json, write_card

    if evaluated_with is None:
        evaluated_with = _card_command(model, "Measured with")
    metrics = load_json(model / "metrics.json") if (model / "metrics.json").exists() else {}
    card = generator_card(load_json(model / "config.json"), metrics, _card_command(model, "Trained with"),
                          evaluated_with=evaluated_with)
    write_card(model, card, docs / "models.md", "generator")


@train_command.command("review-sheet")
@click.option("--model", type=click.Path(path_type=Path), default=WEIGHTS / "generator", show_default=True,
              help="the project generator's folder, or a Stable-Diffusion folder with loras/")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG to write")
@click.option("--per-class", type=int, default=6, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def review_sheet_cmd(model: Path, out: Path, per_class: int, seed: int) -> None:
    """Draw every class as patients would get it, on one sheet (the console's *Explanation pictures*
    page shows the same pictures to the dermatologist who signs them off)."""
    from inference.engines.clinical_review import review_sheet

    explainer = _explainer(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    review_sheet(explainer, per_class=per_class, seed=seed).save(out)
    click.echo(json.dumps({"sheet": str(out), "model_id": explainer.model_id,
                           "weights_sha256": explainer.review_subject.weights_sha256,
                           "settings": explainer.review_subject.settings}, indent=2))


def _explainer(model: Path):  # type: ignore[no-untyped-def]
    from inference.engines.explainer import load_explainer

    try:
        return load_explainer(model, "cpu", vocabulary=None)
    except (FileNotFoundError, OSError) as exc:
        raise click.BadParameter(f"no generator at {model}: {exc}", param_hint="--model") from exc


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _command_line(skip: tuple[str, ...] = ()) -> str:
    """The invoking command with every option spelled out (defaults included), for the model card."""
    ctx = click.get_current_context()
    parts = ["skinbridge", "train", ctx.info_name or ""]
    options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    for name, value in ctx.params.items():
        if value is None or name in ("docs", "cache_dir", *skip):
            continue
        opt = options.get(name)
        if opt is not None and opt.is_flag:  # --shift-patches / --fixed-patches: the flag itself, no value
            flags = opt.opts if value else opt.secondary_opts
            parts += flags[:1]
            continue
        flag = [opt.opts[0]] if opt is not None else []  # an argument (classifier-ensemble's members): bare
        for item in (value if isinstance(value, tuple) else (value,)):  # a repeatable option: once per value
            parts += [*flag, shlex.quote(_rel(item) if isinstance(item, Path) else str(item))]
    return " ".join(parts)


def _summary(metrics: dict) -> dict:  # type: ignore[type-arg]
    return {k: ({kk: vv for kk, vv in v.items() if kk != "confusion"} if isinstance(v, dict) else v)
            for k, v in metrics.items()}


if __name__ == "__main__":  # `python -m inference.training.cli ...`: training without the server's dependencies
    train_command()

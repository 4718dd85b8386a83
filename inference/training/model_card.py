"""Model cards (MODEL_CARD.md beside the weights, merged into docs/models.md between markers)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ATTRIBUTION = """\
- **HAM10000** — Tschandl P., Rosendahl C., Kittler H. *The HAM10000 dataset, a large collection of
  multi-source dermatoscopic images of common pigmented skin lesions.* Sci. Data 5, 180161 (2018).
  Licence CC BY-NC-SA 4.0 (non-commercial, attribution, share-alike). Split for comparison: DermaMNIST
  (MedMNIST v2, Yang et al. 2023).
- **DermNet** — clinical photographs © DermNet (dermnetnz.org), licence CC BY-NC-ND 3.0 NZ
  (non-commercial, attribution, no derivatives of the photos). Topics grouped into the SkinBridge
  vocabulary by `inference/data/dermnet_grouping.csv`.
- Because of these licences the trained weights are for **non-commercial** use; the photos themselves
  are not part of this repository."""

LIMITS = """\
- **Intended use:** preliminary triage support inside SkinBridge. The output is *never* a diagnosis;
  every result is shown as preliminary until a dermatologist has reviewed the case.
- **Known biases:** HAM10000 is mostly light skin (Fitzpatrick I-III) from Austria and Australia;
  performance on darker skin is unknown and likely worse. DermNet has more skin tones but few photos
  per condition. Dermoscopic and phone photos look very different; the model is told the image type,
  but a phone photo of a pigmented lesion is closer to the DermNet data than to HAM10000. Most DermNet
  photos carry a watermark in the lower-left corner, which the model may partly have learnt.
- **Not validated** prospectively or on patients; the DermNet numbers are a development estimate (part
  of each condition's photos is held back by the data provider)."""


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{100 * float(v):.1f} %"


def _trained_with(command: str | None, label: str = "Trained with") -> str:
    return f"\n{label}: `{command}`\n" if command else ""


def _trained_on(training: dict[str, Any]) -> str:
    return "a GPU" if str(training.get("device", "cpu")).startswith("cuda") else "a shared 2-core CPU"


SKIN_TONE = """\
- **Skin tone:** HAM10000 and DermNet are mostly light skin. How well the classifier works on darker
  skin (Fitzpatrick V–VI) is not known from these data; independent measurements on clinical photos
  found malignant lesions missed more often on darker skin. Treat a reassuring result on dark skin
  with extra caution."""

POINT_NAMES = {"melanoma": "Melanoma", "any_malignant": "Any skin cancer (melanoma, BCC, SCC, other)"}


def _point_rows(metrics: dict[str, Any]) -> str:
    rows = []
    for image_type, source in (("dermoscopic", "HAM10000"), ("clinical", "DermNet")):
        for key, report in metrics.get("operating_points", {}).get(image_type, {}).items():
            val, test = report.get("validation", {}), report.get("test") or {}
            rows.append(
                f"| {image_type} | {POINT_NAMES.get(key, key)} | {val.get('threshold', float('nan')):.4f} | "
                f"{_pct(val.get('sensitivity'))} / {_pct(val.get('specificity'))} | "
                f"{_pct(test.get('sensitivity'))} / {_pct(test.get('specificity'))} "
                f"({test.get('n_positive', 0)} positives of {test.get('n', 0)}) | {_pct(test.get('flagged_share'))} |")
    return "\n".join(rows)


def _recipe(tr: dict[str, Any]) -> str:
    """How one classifier run trained, from its config's ``training`` record."""
    mixing = f", mixup/CutMix on {100 * tr['mix_prob']:.0f} % of batches" if tr.get("mix_prob") else ""
    return ("AdamW + warm-up/cosine, EMA (the last EMA weights ship: no epoch was picked on validation data), "
            f"class-balanced loss (weights ∝ n^-{tr.get('class_balance')}), label smoothing "
            f"{tr.get('label_smoothing', 0.05)}{mixing}, flips/rotations/colour jitter/random resized crops")


def classifier_card(config: dict[str, Any], metrics: dict[str, Any], model_dir: str,
                    command: str | None = None) -> str:
    tr = config.get("training", {})
    ht, hv = metrics["ham-grouped-test"], metrics["ham-grouped-val"]
    dt, dv = metrics["dermnet-grouped-test"], metrics["dermnet-grouped-val"]
    dm = metrics.get("dermamnist-test", {})
    ev = f"skinbridge train evaluate-classifier --model {model_dir} --split"
    where = _trained_on(tr)
    views = int(config.get("tta_views", 1))
    tta = (f"Each prediction averages the logits of {views} flips/rotations of the photo (test-time "
           "augmentation) — in calibration, evaluation and serving alike. ") if views > 1 else ""
    stage = "the last stage (1/32 of the input)" if config.get("cam_stage", -1) == -1 else \
        "the second-to-last stage (1/16 of the input: 6×6 cells at 96 px)"
    ab = ""
    if metrics.get("ab"):
        ab = ("\n### What each choice bought (A/B on validation)\n\nShort runs with equal epochs on one CPU thread "
              "each (trained by `inference/training/ab_classifier.sh`, tabled by "
              f"`{metrics.get('ab_command', 'skinbridge train classifier-report --ab ...')}`); the shipped "
              "run is longer. Validation numbers only: the test splits were not looked at to choose.\n\n"
              f"{ab_table(metrics['ab'])}\n")
    sal = metrics.get("saliency")
    saliency = ""
    if sal:
        chosen = sal.get(f"stage{config.get('cam_stage', -1)}", {})
        others = "; ".join(f"stage {k.removeprefix('stage')}: {_pct(v['heat_on_lesion'])} / {_pct(v['peak_on_lesion'])}"
                           for k, v in sal.items() if k.startswith("stage"))
        saliency = (f"\n**Grad-CAM on the lesion** ({sal['n']} dermoscopic validation photos, lesion = the dark "
                    f"part of the photo by Otsu's threshold, {_pct(chosen.get('lesion_area'))} of the photo on "
                    f"average): {_pct(chosen.get('heat_on_lesion'))} of the heat lies on the lesion and the hottest "
                    f"point is on it in {_pct(chosen.get('peak_on_lesion'))} of photos (heat / peak by stage: "
                    f"{others}). A map spread evenly would put {_pct(chosen.get('lesion_area'))} on the lesion.\n\n"
                    "![Grad-CAM on validation photos](img/classifier_gradcam_grid.png)\n")
    splits = """**Splits without leakage:** HAM10000
is split 70/15/15 by `lesion_id` (no lesion on two sides) and DermNet 70/15/15 by photo series, both
stratified by diagnosis; training, temperature, operating points and every choice below used the
train and validation parts only, the test parts were measured once."""
    members = tr.get("ensemble_of")
    if members:
        runs = "\n".join(
            f"- seed {m.get('seed')}: {m.get('epochs_done')} epochs ({m.get('steps')} steps, batch "
            f"{m.get('batch_size')}, {m.get('wall_s')} s wall on {_trained_on(m)}), weights "
            f"`{str(m.get('weights_sha256', ''))[:12]}`" + (f": `{m['command']}`" if m.get("command") else "")
            for m in members)
        head = f"""An **ensemble of {len(members)} SkinClassifierNets** (compact ResNet, width {config['width']}, image-type
embedding), each trained **from scratch** at **{config['image_size']}×{config['image_size']} px** with the same recipe and another
seed; each prediction averages their logits. {len(config['class_codes'])} vocabulary classes, HAM10000 (dermoscopic) + DermNet (clinical)
jointly. {splits} Every member trained on the same training photos (the splits do not move with the seed).
Recipe of each member: {_recipe(members[0])}.

{runs}

{tta}Temperature scaling of the averaged logits on validation data: T = {config['temperature']:.3f}. Grad-CAM reads
{stage} of every member and sums their maps (the gradient of the averaged logit weighs each).
{_trained_with(command, "Joined with")}
"""
    else:
        head = f"""SkinClassifierNet (compact ResNet, width {config['width']}, image-type embedding), trained **from
scratch on {where}** at **{config['image_size']}×{config['image_size']} px**, {len(config['class_codes'])} vocabulary
classes, on HAM10000 (dermoscopic) + DermNet (clinical) jointly. {splits}
Training: {tr.get('epochs_done')} epochs ({tr.get('steps')} steps, batch {tr.get('batch_size')},
{tr.get('wall_s')} s wall, seed {tr.get('seed')}), {_recipe(tr)}. {tta}Temperature scaling on validation data: T = {config['temperature']:.3f}. Grad-CAM reads {stage}.
{_trained_with(command)}
"""
    members_table = ""
    if metrics.get("ensemble"):
        members_table = ("\n### The members and the ensemble (validation)\n\nEach member alone (its own "
                         "temperature and operating points) against the ensemble; validation numbers only.\n\n"
                         f"{ab_table(metrics['ensemble'])}\n")
    return f"""## Classifier `{config['model_id']}` {config['model_version']}

{head}| Metric | Value | Reproduce |
|---|---|---|
| HAM10000 lesion-grouped **test** balanced accuracy (7 classes, n={ht['n']}) | **{ht['balanced_acc']:.3f}** | `{ev} ham-grouped-test` |
| HAM10000 lesion-grouped test ACC / macro AUC | {ht['acc']:.3f} / {ht['auc_macro_ovr']:.3f} | same |
| HAM10000 lesion-grouped validation balanced accuracy (n={hv['n']}) | {hv['balanced_acc']:.3f} | `{ev} ham-grouped-val` |
| DermNet series-grouped **test** top-1 / top-3 (n={dt['n']}) | **{dt['top1']:.3f} / {dt['top3']:.3f}** | `{ev} dermnet-grouped-test` |
| DermNet series-grouped validation top-1 / top-3 (n={dv['n']}) | {dv['top1']:.3f} / {dv['top3']:.3f} | `{ev} dermnet-grouped-val` |
| DermaMNIST test ACC / AUC, only photos outside our training split (n={dm.get('n', 0)}) | {dm.get('acc', float('nan')):.3f} / {dm.get('auc_macro_ovr', float('nan')):.3f} | `{ev} dermamnist-test` (all 2,005: includes training lesions) |

The 7-class numbers restrict the softmax to the HAM10000 classes with image type "dermoscopic"; the
operating points use the full calibrated softmax, as the engine does. Published DermaMNIST references
(28 px): ResNet-18 ACC 0.735 / AUC 0.917 — not comparable with ours, whose split keeps lesions apart.

**Operating points per photo type.** Chosen on the photo type's own validation photos for sensitivity
≥ 90 %; the engine applies the one of the photo's type and flags the case for a dermatologist
(`suspect:<condition>`, triage reason "malignancy suspected"). "Flagged" is the share of all test photos
of that type the point sends to review on its own (other rules add low-confidence cases).{_photo_type_text(metrics)}

| Photo type | Flag | Threshold | Validation sensitivity / specificity | Test sensitivity / specificity | Test photos flagged |
|---|---|---|---|---|---|
{_point_rows(metrics)}
{saliency}{members_table}{ab}
![HAM10000 lesion-grouped test confusion matrix](img/classifier_confusion_ham_test.png)

### Data and licences
{ATTRIBUTION}

### Intended use, limits and biases
{LIMITS}
{SKIN_TONE}
"""


def _photo_type_text(metrics: dict[str, Any]) -> str:
    pt = metrics.get("photo_type")
    if not pt:
        return (" No photo-type model is stored with these weights: every photo a patient sends counts as "
                "clinical.")
    test = pt.get("test", {})
    return (f" Patients do not say which kind of photo they send: a small photo-type model "
            f"(`photo_type.json`, `{pt.get('command', 'skinbridge train photo-type')}`) reads it from the "
            f"photo and recognised {_pct(test.get('dermoscopic_recognised'))} of the dermoscopic test photos "
            f"while keeping {_pct(test.get('clinical_kept_clinical'))} of the clinical ones clinical. A photo it "
            "is unsure about counts as clinical, whose operating points flag more: a doubt costs a review, "
            "not a missed flag. The console shows which type was applied.")


def ab_summary(metrics: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """One A/B row from a finished run's metrics and config (validation numbers only)."""
    mel = metrics.get("operating_points", {}).get("dermoscopic", {}).get("melanoma", {}).get("validation", {})
    tr = config.get("training", {})
    return {
        "ham_val_balanced_acc": metrics["ham-grouped-val"]["balanced_acc"],
        "dermnet_val_top1": metrics["dermnet-grouped-val"]["top1"],
        "dermnet_val_top3": metrics["dermnet-grouped-val"]["top3"],
        "dermoscopic_melanoma_val_specificity": mel.get("specificity"),
        "epochs": tr.get("epochs_done"), "wall_s": tr.get("wall_s"),
    }


def ab_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown A/B table from :func:`ab_summary` rows: {label: row}."""
    lines = ["| Run | HAM val balanced acc | DermNet val top-1 / top-3 | Dermoscopic melanoma specificity at "
             "≥ 90 % sensitivity (val) | Epochs, wall |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['ham_val_balanced_acc']:.3f} | {r['dermnet_val_top1']:.3f} / "
                     f"{r['dermnet_val_top3']:.3f} | {_pct(r.get('dermoscopic_melanoma_val_specificity'))} | "
                     f"{r.get('epochs')}, {r.get('wall_s')} s |")
    return "\n".join(lines)


def generator_card(config: dict[str, Any], metrics: dict[str, Any], command: str | None = None,
                   evaluated_with: str | None = None, min_recognition: float | None = None) -> str:
    from inference.engines.explainer import MIN_RECOGNITION

    min_recognition = MIN_RECOGNITION if min_recognition is None else min_recognition
    extra = config.get("extra", {})
    tr = extra.get("training", {})
    rec = metrics.get("recognition")
    codes = [c for c in config["class_codes"] if not c.startswith("_")]
    size, patch = config["sample_size"], int(config.get("patch_size", 1))
    patching = (f" The UNet works on a {size // patch}×{size // patch} grid of {patch}×{patch} px patches (pixel "
                "unshuffle, as in *simple diffusion*): the diffusion stays in pixel space, the network is "
                f"{patch * patch}× cheaper.") if patch > 1 else ""
    predicts = "v-prediction" if config.get("prediction_type") == "v_prediction" else "ε-prediction"
    tuning = [t for t in (
        "the patch grid moved every sampling step" if patch > 1 and config.get("shift_patches") else "",
        f"dynamic thresholding at the {config.get('dynamic_threshold', 0):g} quantile"
        if config.get("dynamic_threshold") else "",
    ) if t]
    if rec:
        real = rec.get("real_photos") or {}
        real_pc, real_n = real.get("per_class", {}), real.get("n_per_class", {})
        types = extra.get("image_types", {})
        offered = sorted(c for c, v in rec["per_class"].items() if v >= min_recognition)
        rows = "\n".join(
            f"| {c} | {types.get(c, '')} | {_pct(v)} | "
            f"{_pct(real_pc.get(c)) + f' (n={real_n[c]})' if real_n.get(c) else 'n/a'} | "
            f"{'yes' if c in offered else 'no'} |"
            for c, v in sorted(rec["per_class"].items()))
        reference = (f" For reference, the same classifier names **{_pct(real['overall'])}** of held-out *real* photos "
                     f"of these classes correctly ({real.get('photos', 'DermaMNIST test + DermNet validation, never trained on')}, "
                     "each class in the image type it is drawn in): the classifier, not only the generator, limits this "
                     "measure.") if real else ""
        reference += _by_image_type(rec["per_class"], real_pc, real_n, types)
        grid = (f" Patch-grid strength of the pictures: {rec['patch_grid']} (spectral power at the patch period "
                "over its neighbours; photos ≈ 1.4).") if rec.get("patch_grid") is not None else ""
        grid += _memorisation_text(rec.get("memorisation"))
        measured_by = (f"The classifier with weights `{rec['classifier_sha256'][:12]}` (the one shipped when this was "
                       "measured)" if rec.get("classifier_sha256") else "The shipped classifier")
        rec_text = (f"{measured_by} recognises **{_pct(rec['overall'])}** of generated pictures as the "
                    f"class they were generated for ({rec['samples_per_class']} per class, guidance "
                    f"{rec['guidance_scale']}, {rec['steps']} DDIM steps; goal ≥ 80 %).{reference}{grid}\n\n"
                    f"SkinBridge offers pictures of the classes recognised ≥ {_pct(min_recognition)} "
                    f"(`SKINBRIDGE_EXPLANATION_MIN_RECOGNITION`): **{len(offered)} of {len(rec['per_class'])}**"
                    f"{': ' + ', '.join(offered) if offered else ''}. For the others it shows no picture rather "
                    "than an unconvincing one. Patients get an offered class only after a dermatologist of the "
                    "clinic approved its pictures in the console (*Explanation pictures*), for exactly these "
                    "weights and sampling settings; until then, none.\n\n"
                    "| Class | Drawn as | Generated pictures recognised | Real held-out photos recognised | "
                    f"Offered |\n|---|---|---|---|---|\n{rows}\n")
        if evaluated_with:
            rec_text += f"\nMeasured with: `{evaluated_with}`\n"
    else:
        rec_text = "Recognition by the classifier: not measured yet.\n"
    return f"""## Generator `{config['model_id']}` {config['model_version']}

Class-conditional diffusion UNet (diffusers `UNet2DModel`, DDPM {predicts} training, DDIM sampling,
classifier-free guidance with scale {extra.get('guidance_scale')}{''.join(', ' + t for t in tuning)}), **{size}×{size} px**,
{_class_choice(codes, tr)}.{patching}
Trained from scratch {_training_story(tr)}; weights stored in {tr.get('dtype', 'float32')}. That is a small
budget for a diffusion model: pictures are low-resolution and show colour, shape and texture more than
fine detail. They are *illustrations*, always marked as AI-generated, never patient photos and never
evidence for a diagnosis. The null class for guidance is the last entry of `class_codes`
(`{config['class_codes'][-1]}`), its index in `extra.null_class_index`.
{_trained_with(command)}
{rec_text}
![Generated samples](img/generator_samples.png)

### Data and licences
{ATTRIBUTION}
- DermNet's licence forbids publishing altered copies of its photos; the generator produces new
  low-resolution pictures, not copies, but a model this small can memorise — do not present its
  output as DermNet material.

### Intended use, limits and biases
{LIMITS}
"""


def _by_image_type(generated: dict[str, float], real: dict[str, float], real_n: dict[str, int],
                   types: dict[str, str]) -> str:
    """The recognition of dermoscopic and of clinical classes apart, when the generator draws both: the
    classifier knows the two kinds of photo very differently well."""
    kinds = sorted({types.get(c) for c in generated} - {None})
    if len(kinds) < 2:
        return ""
    parts = []
    for kind in kinds:
        codes = [c for c in generated if types.get(c) == kind]
        n = sum(real_n.get(c, 0) for c in codes)
        real_share = sum(real.get(c, 0.0) * real_n.get(c, 0) for c in codes) / n if n else None
        parts.append(f"{kind} classes ({len(codes)}): **{_pct(sum(generated[c] for c in codes) / len(codes))}** "
                     f"of generated pictures, {_pct(real_share) if real_share is not None else 'n/a'} of real photos")
    return " By image type: " + "; ".join(parts) + "."


def _memorisation_text(mem: dict[str, Any] | None) -> str:
    if not mem:
        return ""
    q = _pct(mem["quantile"])
    worst = max(mem["per_class"].items(), key=lambda kv: kv[1])
    most = f"; most: {worst[0]} {_pct(worst[1])}" if worst[1] > 0 else ""
    return (f" Near-copies of training photos: **{_pct(mem['near_copies'])}** of the pictures lie closer to a "
            f"training photo of their class than {q} of {mem['unseen_photos']} unseen real photos do (pixel RMS at "
            f"{mem['compared_at']} px, flips included; {q} or less means no copying{most}).")


def _training_story(tr: dict[str, Any]) -> str:
    """How the weights came about, oldest run first: a continued run names the one it continued."""
    balance = tr.get("class_balance") or 0
    drawn = ("" if not balance else ", every class drawn equally often" if balance == 1 else
             f", photos drawn as (photos of their class)^-{balance:g}")
    this = (f"**on {_trained_on(tr)}** for {tr.get('steps')} steps ({tr.get('epochs_done')} epochs, "
            f"{tr.get('wall_s')} s, batch {tr.get('batch_size')}, seed {tr.get('seed')}{drawn})")
    origin = tr.get("continued_from")
    if not origin:
        return this
    added = origin.get("added_classes") or []
    widened = f", adding {', '.join(added)}," if added else ""
    return (f"{_training_story(origin.get('training', {}))}, then continued from `{origin.get('path')}` "
            f"(weights {str(origin.get('weights_sha256'))[:12]}){widened} {this}")


def _class_choice(codes: list[str], training: dict[str, Any]) -> str:
    if training.get("chosen_classes"):
        return f"{len(codes)} classes chosen for this run ({', '.join(codes)})"
    return (f"{len(codes)} classes (HAM10000 classes + grouped DermNet classes with ≥ "
            f"{training.get('min_per_class', 40)} training photos)")


def write_card(model_dir: Path, card: str, docs: Path | None, section: str) -> None:
    # the card beside the weights links the plots in docs/img (inference/weights/<model>/ -> repo root)
    (model_dir / "MODEL_CARD.md").write_text(card.replace("](img/", "](../../../docs/img/"), encoding="utf-8")
    if docs is not None:
        merge_into_docs(docs, section, card)


def merge_into_docs(docs: Path, section: str, card: str) -> None:
    """Replace (or append) the section between ``<!-- BEGIN section -->`` / ``<!-- END section -->``."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{card.rstrip()}\n{end}"
    text = docs.read_text(encoding="utf-8") if docs.exists() else "# SkinBridge models\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text, encoding="utf-8")


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))

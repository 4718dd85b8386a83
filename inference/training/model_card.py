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


def _trained_with(command: str | None) -> str:
    return f"\nTrained with: `{command}`\n" if command else ""


def _trained_on(training: dict[str, Any]) -> str:
    return "a GPU" if str(training.get("device", "cpu")).startswith("cuda") else "a shared 2-core CPU"


def classifier_card(config: dict[str, Any], metrics: dict[str, Any], model_dir: str,
                    command: str | None = None) -> str:
    tr = config.get("training", {})
    dm, hl, dn = metrics["dermamnist-test"], metrics["ham-lesion-test"], metrics["dermnet-val"]
    mel = hl.get("melanoma", {})
    dn_mel = dn.get("melanoma", {})
    ev = f"skinbridge train evaluate-classifier --model {model_dir} --split"
    where = _trained_on(tr)
    views = int(config.get("tta_views", 1))
    tta = (f"Each prediction averages the logits of {views} flips/rotations of the photo (test-time "
           "augmentation) — in calibration, evaluation and serving alike. ") if views > 1 else ""
    threshold = config["thresholds"]["melanoma"]
    low = (" Such a low threshold means the model separates melanoma poorly in some photos (mostly the "
           "clinical DermNet ones): at ≥ 90 % sensitivity it flags many benign lesions (see specificity) — "
           "acceptable for \"ask a dermatologist\", not for ruling anything out.") if threshold < 0.05 else ""
    return f"""## Classifier `{config['model_id']}` {config['model_version']}

SkinClassifierNet (compact ResNet, width {config['width']}, image-type embedding), trained **from
scratch on {where}** at **{config['image_size']}×{config['image_size']} px**, {len(config['class_codes'])} vocabulary
classes, on HAM10000 (dermoscopic, DermaMNIST train split) + DermNet (clinical, 80 % per topic)
jointly. Training: {tr.get('epochs_done')} epochs ({tr.get('steps')} steps, batch {tr.get('batch_size')},
{tr.get('wall_s')} s wall, seed {tr.get('seed')}), AdamW + warm-up/cosine, EMA,
class-balanced loss (weights ∝ n^-{tr.get('class_balance')}), flips/rotations/colour jitter/random resized
crops. {tta}Temperature scaling on validation data: T = {config['temperature']:.3f}. Melanoma triage threshold
(P(melanoma) ≥ {threshold:.4f}) chosen on lesion-disjoint HAM10000 + DermNet
validation photos for sensitivity ≥ 90 %.{low}
{_trained_with(command)}
| Metric | Value | Reproduce |
|---|---|---|
| DermaMNIST test ACC (7 classes, n={dm['n']}) | **{dm['acc']:.3f}** | `{ev} dermamnist-test` |
| DermaMNIST test AUC (macro one-vs-rest) | **{dm['auc_macro_ovr']:.3f}** | same |
| HAM10000 lesion-disjoint test balanced accuracy (n={hl['n']}) | {hl['balanced_acc']:.3f} | `{ev} ham-lesion-test` |
| HAM10000 lesion-disjoint test ACC | {hl['acc']:.3f} | same |
| Melanoma sensitivity / specificity at threshold (HAM lesion-disjoint test, {mel.get('n_melanoma')} melanomas) | {_pct(mel.get('sensitivity'))} / {_pct(mel.get('specificity'))} | same |
| DermNet validation top-1 / top-3 (n={dn['n']}) | {dn['top1']:.3f} / {dn['top3']:.3f} | `{ev} dermnet-val` |
| Melanoma sensitivity / specificity, DermNet validation ({dn_mel.get('n_melanoma')} melanomas) | {_pct(dn_mel.get('sensitivity'))} / {_pct(dn_mel.get('specificity'))} | same |

Published DermaMNIST references (28 px): ResNet-18 ACC 0.735 / AUC 0.917; best published ACC 0.768.
The DermaMNIST split shares lesions between train and test (1,006 lesions), so its numbers are
optimistic; the *lesion-disjoint* test keeps only DermaMNIST-test images whose lesion has no image in
train/val. Lesions photographed several times are more often melanomas or keratoses, so that subset
has more naevi and a higher plain ACC; its *balanced* accuracy is the fairer figure. The 7-class numbers restrict the softmax to the HAM10000 classes with image type
"dermoscopic"; the triage threshold uses the full calibrated softmax, as the engine does.

![DermaMNIST test confusion matrix](img/classifier_confusion_dermamnist_test.png)

### Data and licences
{ATTRIBUTION}

### Intended use, limits and biases
{LIMITS}
"""


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
                     "of these classes correctly (DermaMNIST test + DermNet validation, never trained on, each class "
                     "in the image type it is drawn in): the classifier, not only the generator, limits this "
                     "measure.") if real else ""
        reference += _by_image_type(rec["per_class"], real_pc, real_n, types)
        grid = (f" Patch-grid strength of the pictures: {rec['patch_grid']} (spectral power at the patch period "
                "over its neighbours; photos ≈ 1.4).") if rec.get("patch_grid") is not None else ""
        grid += _memorisation_text(rec.get("memorisation"))
        rec_text = (f"The shipped classifier recognises **{_pct(rec['overall'])}** of generated pictures as the "
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

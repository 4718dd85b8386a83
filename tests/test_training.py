"""The training code on a handful of real HAM10000/DermNet photos: one tiny epoch of each trainer
through the `skinbridge train` CLI, outputs loaded by the real engines, plus the data and metric helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from inference.training import data as D

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data_dir(shared_data: Path) -> Path:
    return shared_data  # the fixture fails loudly when the data set is missing


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny epoch of both trainers via the CLI (3 photos per dataset label)."""
    from inference.training.cli import train_command

    root = tmp_path_factory.mktemp("train")
    common = ["--data", str(data_dir), "--epochs", "1", "--threads", "1", "--cache-dir", str(root / "cache"),
              "--docs", str(root / "docs"), "--subset-per-label", "3"]
    runner = CliRunner()
    clf = root / "classifier"
    res = runner.invoke(train_command, ["classifier", *common, "--out", str(clf), "--width", "8"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    gen = root / "generator"
    res = runner.invoke(train_command, ["generator", *common, "--out", str(gen), "--classifier", str(clf),
                                        "--samples-per-class", "1", "--steps", "2", "--channels", "16,16,32",
                                        "--prediction-type", "v_prediction"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return {"classifier": clf, "generator": gen, "docs": root / "docs"}


def test_cache_pixels_match_what_the_engine_sees(data_dir: Path) -> None:
    from inference.engines.classifier import ClassifierEngine
    from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet

    config = ClassifierConfig(num_classes=2, class_codes=["a", "b"], image_size=32)
    engine = ClassifierEngine(SkinClassifierNet(2, width=8), config, "cpu", "x")
    ham = data_dir / "ham10000" / "images" / "ISIC_0027419.jpg"
    dermnet = data_dir / "dermnet" / D.dermnet_items(data_dir)[0].key
    for path in (ham, dermnet):
        with Image.open(path) as img:
            expected = np.asarray(engine._square(img))
        assert np.array_equal(D.load_image(path, 32), expected), path


def test_splits_are_the_published_and_lesion_disjoint_ones(data_dir: Path) -> None:
    dm = D.dermamnist_split(data_dir)
    assert sorted(np.unique(list(dm.values()), return_counts=True)[1].tolist()) == [1003, 2005, 7007]
    lesion = {it.key: it.group for it in D.ham_items(data_dir)}
    hl = D.ham_lesion_split(data_dir)
    train_lesions = {lesion[i] for i, s in hl.items() if s == "train"}
    test_lesions = {lesion[i] for i, s in hl.items() if s == "test"}
    val_lesions = {lesion[i] for i, s in hl.items() if s == "val"}
    assert test_lesions and not test_lesions & train_lesions and not test_lesions & val_lesions
    assert val_lesions and not val_lesions & train_lesions
    # DermaMNIST's own test split does share lesions with its train split: that is why we add ours
    assert {lesion[i] for i, s in dm.items() if s == "test"} & train_lesions

    items = D.dermnet_items(data_dir)
    split = D.dermnet_split(items)
    topics_val = {it.raw_label for it in items if split[it.key] == "val"}
    assert topics_val == {it.raw_label for it in items}  # stratified: every topic validated
    assert 0.17 < sum(s == "val" for s in split.values()) / len(split) < 0.23


def test_grouped_splits_keep_every_lesion_and_photo_series_on_one_side(data_dir: Path) -> None:
    items = D.ham_items(data_dir) + D.dermnet_items(data_dir)
    split = D.grouped_splits(items)
    sides: dict[str, set[str]] = {}
    for it in items:
        group = it.group if it.source == "ham10000" else D.series(it.key)
        sides.setdefault(f"{it.source}|{group}", set()).add(split[it.key])
    assert all(len(s) == 1 for s in sides.values())  # no lesion / series on two sides
    assert D.series("images/acne/acne-face-1-12.jpg") == D.series("images/acne/acne-face-1-28.jpg")
    assert D.series("images/acne/acne-face-48.jpg") != D.series("images/acne/acne-face-47.jpg")
    for source in ("ham10000", "dermnet"):
        mine = [split[it.key] for it in items if it.source == source]
        assert 0.12 < mine.count("test") / len(mine) < 0.18 and 0.12 < mine.count("val") / len(mine) < 0.18
    # stratified: every HAM10000 diagnosis is validated and tested
    for dx in D.HAM_DX:
        assert {split[it.key] for it in items if it.raw_label == dx} == {"train", "val", "test"}, dx
    # a subset (one split's photos, a test's handful) lands on the same sides as in the whole data set
    subset = items[::7]
    masks = D.split_masks(data_dir, subset)
    assert all(masks[f"{'ham' if it.source == 'ham10000' else 'dermnet'}-grouped-{split[it.key]}"][i]
               for i, it in enumerate(subset))


def test_a_runs_seed_never_moves_the_held_out_photos(data_dir: Path, tmp_path: Path) -> None:
    """Runs with other seeds (ensemble members, repeats) train on the same photos and are measured on the
    same held-out ones: otherwise one run's test photos would be another's training photos."""
    from inference.training.run import TrainingRun, prepare_run

    masks = [prepare_run(TrainingRun(data=data_dir, out=tmp_path / f"s{seed}", seed=seed, threads=1,
                                     items_per_label=2, cache_dir=tmp_path / "cache"), 16)[4] for seed in (0, 1, 7)]
    for other in masks[1:]:
        assert other.keys() == masks[0].keys()
        assert all(np.array_equal(other[k], masks[0][k]) for k in masks[0]), "a seed moved a split"
    assert masks[0]["dermnet-grouped-test"].any() and masks[0]["ham-grouped-test"].any()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(data_dir: Path, tmp_path: Path) -> None:
    """A schedule longer than one sitting: stop after one epoch, continue with --resume, same weights."""
    from inference.training.cli import train_command

    common = ["classifier", "--data", str(data_dir), "--epochs", "3", "--threads", "1", "--subset-per-label", "2",
              "--cache-dir", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs"), "--width", "8",
              "--image-size", "16", "--mix-prob", "0.5", "--tta-views", "1"]
    runner = CliRunner()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert runner.invoke(train_command, [*common, "--out", str(whole)], catch_exceptions=False).exit_code == 0
    res = runner.invoke(train_command, [*common, "--out", str(parts), "--sitting-epochs", "1",
                                        "--checkpoint-every", "3600"], catch_exceptions=False)
    assert res.exit_code == 0 and "--resume" in res.output
    assert (parts / "checkpoint.pt").exists() and not (parts / "model.safetensors").exists()
    res = runner.invoke(train_command, [*common, "--out", str(parts), "--resume", "--lr", "0.1"])
    assert res.exit_code == 2 and "different run" in res.output  # the schedule cannot change midway
    res = runner.invoke(train_command, [*common, "--out", str(parts), "--resume"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (parts / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not (parts / "checkpoint.pt").exists()  # finished: nothing left to resume
    log = [json.loads(line) for line in (parts / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    res = runner.invoke(train_command, [*common, "--out", str(tmp_path / "none"), "--resume"])
    assert res.exit_code == 2 and "no checkpoint" in res.output


def test_operating_points_follow_the_photo_type() -> None:
    from inference.engines.classifier import ClassifierEngine
    from inference.engines.classifier_net import ClassifierConfig, SkinClassifierNet

    codes = ["basal_cell_carcinoma", "melanoma", "nevus"]
    config = ClassifierConfig(num_classes=3, class_codes=codes, image_size=16, malignant_codes=codes[:2],
                              operating_points={"dermoscopic": {"melanoma": 0.05, "any_malignant": 0.5},
                                                "clinical": {"melanoma": 0.2, "any_malignant": 0.35}})
    engine = ClassifierEngine(SkinClassifierNet(3, width=8), config, "cpu", "x")
    row = torch.tensor([0.3, 0.1, 0.6])  # BCC 30 %, melanoma 10 %: 40 % some skin cancer
    assert engine.flags(row, "dermoscopic") == ["suspect:melanoma"]
    # clinical: melanoma below its point, but "any skin cancer" reached: named by its likeliest member
    assert engine.flags(row, "clinical") == ["suspect:basal_cell_carcinoma"]
    config.operating_points = {}
    config.thresholds = {"melanoma": 0.1}  # older configs: one threshold for every photo type
    assert engine.flags(row, "clinical") == ["suspect:melanoma"]


def test_mixing_pairs_only_photos_of_one_type_and_keeps_the_label_shares() -> None:
    from inference.training.train_classifier import ClassifierRun, mix_batch

    run = ClassifierRun(data=Path("."), out=Path("."), mix_prob=1.0, mix_alpha=1.0)
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()
    y, types = torch.arange(8), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rng = np.random.default_rng(0)
    for _ in range(20):
        mixed, a, b, lam = mix_batch(x, y, types, run, rng)
        assert torch.equal(a, y) and torch.equal(types[b], types)  # partners share the image type
        assert 0.0 <= lam <= 1.0
        # every pixel is one of the two photos or a blend of them with the stated share
        expected = lam * x[:, :1].mean((1, 2, 3)) + (1 - lam) * x[b][:, :1].mean((1, 2, 3))
        assert torch.allclose(mixed[:, :1].mean((1, 2, 3)), expected, atol=1e-4)


def test_labels_map_through_the_vocabulary_grouping(data_dir: Path, tmp_path: Path) -> None:
    dermnet = D.dermnet_items(data_dir)
    items = [it for it in D.ham_items(data_dir) if it.raw_label == "mel"][:2]
    items += [it for it in dermnet if it.raw_label == "Acral lentiginous melanoma"][:2]
    items += [it for it in dermnet if it.raw_label == "Acne vulgaris"][:2]
    labelled = D.label(D.build_cache(data_dir, 16, tmp_path, items=items, progress=False))
    mapping = dict(zip((it.raw_label for it in labelled.items), labelled.codes, strict=True))
    assert mapping["mel"] == "melanoma"
    assert mapping["Acral lentiginous melanoma"] == "melanoma"  # DermNet topic grouped with HAM class
    assert mapping["Acne vulgaris"] == "acne"
    assert labelled.images.shape == (len(labelled.items), 16, 16, 3)
    assert set(labelled.image_type[: 2].tolist()) == {D.DERMOSCOPIC}


def test_augmentation_keeps_range_and_is_seeded() -> None:
    from inference.training.augment import augment

    imgs = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    types = torch.tensor([0, 1, 0, 1, 0, 1])
    a = augment(imgs, types, torch.Generator().manual_seed(1))
    b = augment(imgs, types, torch.Generator().manual_seed(1))
    c = augment(imgs, types, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_scaling_recovers_overconfidence() -> None:
    from inference.training.evaluate import fit_temperature

    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=gen) * 2
    targets = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen).squeeze(1)
    t = fit_temperature(true_logits * 3.0, targets)  # a model 3x over-confident
    assert 2.6 < t < 3.4


def test_melanoma_threshold_reaches_the_sensitivity_target() -> None:
    from inference.training.evaluate import sensitivity_threshold

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.2, 1.0, 50), rng.uniform(0, 0.6, 500)])
    positive = np.arange(550) < 50
    thr = sensitivity_threshold(scores, positive, 0.90)
    sens = (scores[positive] >= thr).mean()
    assert sens >= 0.90
    assert (scores[positive] >= thr + 1e-9).mean() < 0.90  # the highest such threshold


def test_min_snr_weighting_only_tempers_the_nearly_clean_timesteps() -> None:
    from inference.engines.generator_net import GeneratorConfig
    from inference.training.train_generator import _loss_weight

    alpha_bar = GeneratorConfig(class_codes=["a"]).make_scheduler().alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    w = _loss_weight(alpha_bar, 5.0)
    assert torch.equal(_loss_weight(alpha_bar, 0.0), torch.ones_like(alpha_bar))  # off: the plain DDPM loss
    noisy = snr <= 5.0
    assert noisy.any() and (~noisy).any()
    assert torch.allclose(w[noisy], torch.ones_like(w[noisy]))  # noisy timesteps keep their full weight
    assert torch.allclose(w[~noisy], 5.0 / snr[~noisy]) and float(w[0]) < 0.01  # clean ones count far less


def test_v_prediction_weighting_keeps_the_epsilon_weights() -> None:
    from inference.engines.generator_net import GeneratorConfig
    from inference.training.train_generator import _loss_weight

    alpha_bar = GeneratorConfig(class_codes=["a"]).make_scheduler().alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    # the v loss is (SNR + 1) times the epsilon loss, so the same Min-SNR weighting divides by SNR + 1
    w_v = _loss_weight(alpha_bar, 5.0, "v_prediction")
    assert torch.allclose(w_v * (snr + 1), _loss_weight(alpha_bar, 5.0) * snr)
    assert torch.equal(_loss_weight(alpha_bar, 0.0, "v_prediction"), torch.ones_like(alpha_bar))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_sampler_reads_back_the_picture_from_the_training_target(prediction_type: str) -> None:
    """What training teaches the UNet to output is what the DDIM sampler expects: given the exact
    target, the sampler's estimate of the clean picture is the picture, at every noise level."""
    from inference.engines.generator_net import GeneratorConfig
    from inference.training.train_generator import _target

    sched = GeneratorConfig(class_codes=["a"], prediction_type=prediction_type).make_scheduler()
    sched.set_timesteps(20)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=gen) * 1.8 - 0.9
    for t in sched.timesteps[::4]:
        noise = torch.randn(x.shape, generator=gen)
        a = sched.alphas_cumprod[t].expand(2)
        x_t = a.sqrt().view(-1, 1, 1, 1) * x + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
        out = sched.step(_target(x, noise, a, prediction_type), t, x_t, eta=0.0)
        assert torch.allclose(out.pred_original_sample, x, atol=1e-3), int(t)
    with pytest.raises(ValueError, match="prediction_type"):
        GeneratorConfig(class_codes=["a"], prediction_type="sample")


def test_patch_grid_strength_tells_a_patch_grid_from_photos(trained: dict[str, Path]) -> None:
    from inference.training.train_generator import patch_grid_strength

    cache = next((trained["generator"].parent / "cache").glob("*_64px_*.npy"))
    photos = torch.from_numpy(np.load(cache)[:64]).permute(0, 3, 1, 2).float() / 255
    # the same faint pattern (within +-3 % of the range) in every 4 x 4 px patch: a patched UNet's grid
    pattern = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.06
    assert patch_grid_strength(photos, 4) < 2.0
    assert patch_grid_strength((photos + pattern.repeat(1, 16, 16)).clamp(0, 1), 4) > 10


def test_tiny_classifier_run_loads_in_the_engine(trained: dict[str, Path], data_dir: Path) -> None:
    from inference.engines.base import model_sha256
    from inference.engines.classifier import ClassifierEngine

    folder = trained["classifier"]
    config = json.loads((folder / "config.json").read_text())
    assert {"melanoma", "nevus", "basal_cell_carcinoma", "acne"} <= set(config["class_codes"])
    assert config["image_size"] == 32 and config["temperature"] > 0
    points = config["operating_points"]
    assert set(points) == {"dermoscopic", "clinical"} and 0.0 <= points["dermoscopic"]["melanoma"] <= 1.0
    assert set(config["malignant_codes"]) <= set(config["class_codes"]) and "melanoma" in config["malignant_codes"]
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert log and log[0]["epoch"] == 1 and "val_ham_balanced_acc" in log[0]
    assert (folder / "weights.sha256").read_text().split()[0] == model_sha256(folder / "model.safetensors")

    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"ham-grouped-test", "dermnet-grouped-test", "dermnet-grouped-val", "dermamnist-test"} <= set(metrics)
    assert 0.0 <= metrics["ham-grouped-test"]["balanced_acc"] <= 1.0
    test_point = metrics["operating_points"]["dermoscopic"]["melanoma"]["test"]
    assert test_point == metrics["ham-grouped-test"]["operating_points"]["melanoma"]

    engine = ClassifierEngine.load(folder, device="cpu")
    with Image.open(data_dir / "ham10000" / "images" / "ISIC_0027419.jpg") as img:
        [pred] = engine.predict([img.copy()], "dermoscopic", saliency=False)
    assert pred.differential[0]["code"] in config["class_codes"]
    assert pred.weights_sha256 == model_sha256(folder / "model.safetensors")

    card = (folder / "MODEL_CARD.md").read_text()
    assert "Tschandl" in card and "CC BY-NC-ND 3.0 NZ" in card and "never* a diagnosis" in card
    docs = (trained["docs"] / "models.md").read_text()
    assert "<!-- BEGIN classifier -->" in docs and "<!-- BEGIN generator -->" in docs
    assert (trained["docs"] / "img" / "classifier_confusion_ham_test.png").stat().st_size > 1000
    assert "Operating points per photo type" in card and "Skin tone" in card


def test_classifier_report_adds_the_ab_table_and_grad_cam_on_the_lesion(trained: dict[str, Path], data_dir: Path,
                                                                        tmp_path: Path) -> None:
    import shutil

    from inference.training.cli import train_command

    model = shutil.copytree(trained["classifier"], tmp_path / "clf")
    trained_with = (model / "MODEL_CARD.md").read_text().split("Trained with: ")[1].split("\n")[0]
    res = CliRunner().invoke(train_command, [
        "classifier-report", "--model", str(model), "--data", str(data_dir), "--photos", "6",
        "--ab", f"tiny run={trained['classifier']}", "--ab", f"same again={trained['classifier']}",
        "--docs", str(tmp_path / "docs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads((model / "metrics.json").read_text())
    assert list(metrics["ab"]) == ["tiny run", "same again"]
    assert "--ab 'tiny run=" in metrics["ab_command"] and "--ab 'same again=" in metrics["ab_command"]
    sal = metrics["saliency"]
    assert sal["n"] == 6 and {"stage-1", "stage-2"} <= set(sal)
    assert all(0.0 <= v["heat_on_lesion"] <= 1.0 and 0.0 < v["lesion_area"] < 1.0 for k, v in sal.items()
               if k.startswith("stage"))
    card = (model / "MODEL_CARD.md").read_text()
    assert "What each choice bought" in card and "| tiny run |" in card and "Grad-CAM on the lesion" in card
    assert f"Trained with: {trained_with}" in card  # the training command is kept
    with Image.open(tmp_path / "docs" / "img" / "classifier_gradcam_grid.png") as grid:
        assert grid.width >= 6 * 100 and grid.height >= 4 * 100  # 24 validation photos
    res = CliRunner().invoke(train_command, ["classifier-report", "--model", str(model), "--no-saliency",
                                             "--ab", "no folder", "--docs", str(tmp_path / "docs")])
    assert res.exit_code == 2 and "LABEL=FOLDER" in res.output


def test_runs_with_other_seeds_join_into_an_ensemble_the_engine_serves(trained: dict[str, Path], data_dir: Path,
                                                                       tmp_path: Path) -> None:
    import shutil

    from inference.engines.classifier import ClassifierEngine
    from inference.engines.classifier_net import dihedral_logits
    from inference.training.cli import train_command
    from inference.training.evaluate import load_model

    runner = CliRunner()
    common = ["--data", str(data_dir), "--threads", "1", "--cache-dir", str(trained["generator"].parent / "cache"),
              "--subset-per-label", "3"]
    seed0 = trained["classifier"]
    seed1 = tmp_path / "seed1"
    res = runner.invoke(train_command, ["classifier", *common, "--epochs", "1", "--docs", str(tmp_path / "d1"),
                                        "--out", str(seed1), "--width", "8", "--seed", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "ensemble"
    res = runner.invoke(train_command, ["classifier-ensemble", str(seed0), str(seed1), "--out", str(out), *common,
                                        "--docs", str(tmp_path / "docs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    config = json.loads((out / "config.json").read_text())
    assert config["members"] == 2 and config["temperature"] > 0
    assert set(config["operating_points"]) == {"dermoscopic", "clinical"}
    assert [m["seed"] for m in config["training"]["ensemble_of"]] == [0, 1]
    # served: the engine averages the members' logits, then applies the ensemble's own temperature
    engine = ClassifierEngine.load(out, device="cpu")
    with Image.open(data_dir / "ham10000" / "images" / "ISIC_0027419.jpg") as img:
        photo = img.copy()
    [pred] = engine.predict([photo], "dermoscopic")
    x, types = engine.preprocess([photo]), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        logits = torch.stack([dihedral_logits(load_model(m)[0], x, types, config["tta_views"])
                              for m in (seed0, seed1)]).mean(0)
    expected = torch.softmax(logits / config["temperature"], -1)[0]
    top = pred.differential[0]
    assert top["code"] == config["class_codes"][int(expected.argmax())]
    assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert pred.saliency_png and Image.open(__import__("io").BytesIO(pred.saliency_png)).size == photo.size

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["ensemble"]) == ["member · seed 0", "member · seed 1", "ensemble of 2"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "ensemble of 2 SkinClassifierNets" in card and "Joined with: `skinbridge train classifier-ensemble" in card
    assert "--seed 1" in card and "The members and the ensemble" in card  # each member's own command
    assert f" {seed0} {seed1} " in card  # the joined command reruns as recorded
    # the report measures Grad-CAM over both members and keeps how the ensemble was joined
    res = runner.invoke(train_command, ["classifier-report", "--model", str(out), "--data", str(data_dir),
                                        "--photos", "4", "--docs", str(tmp_path / "docs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    card = (out / "MODEL_CARD.md").read_text()
    assert "Joined with: `skinbridge train classifier-ensemble" in card and "Grad-CAM on the lesion" in card
    assert "The members and the ensemble" in card

    # a new run joins the ensemble itself (its member folders may be gone): three members, each with its
    # own record and validation figures, served as the average of all three
    seed2 = tmp_path / "seed2"
    res = runner.invoke(train_command, ["classifier", *common, "--epochs", "1", "--docs", str(tmp_path / "d2"),
                                        "--out", str(seed2), "--width", "8", "--seed", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    shutil.rmtree(seed1)  # only the ensemble holds seed 1 now
    three = tmp_path / "three"
    res = runner.invoke(train_command, ["classifier-ensemble", str(out), str(seed2), "--out", str(three), *common,
                                        "--docs", str(tmp_path / "docs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    config3 = json.loads((three / "config.json").read_text())
    assert config3["members"] == 3 and [m["seed"] for m in config3["training"]["ensemble_of"]] == [0, 1, 2]
    assert config3["training"]["ensemble_of"][:2] == config["training"]["ensemble_of"]
    metrics3 = json.loads((three / "metrics.json").read_text())
    assert list(metrics3["ensemble"]) == ["member · seed 0", "member · seed 1", "member · seed 2", "ensemble of 3"]
    assert metrics3["ensemble"]["member · seed 1"] == metrics["ensemble"]["member · seed 1"]
    [pred3] = ClassifierEngine.load(three, device="cpu").predict([photo], "dermoscopic")
    with torch.no_grad():
        two = load_model(out)[0]
        logits3 = (dihedral_logits(two, x, types, config3["tta_views"]) * 2
                   + dihedral_logits(load_model(seed2)[0], x, types, config3["tta_views"])) / 3
    expected3 = torch.softmax(logits3 / config3["temperature"], -1)[0]
    assert pred3.differential[0]["probability"] == pytest.approx(float(expected3.max()), abs=1e-5)

    # refused, and nothing written: another recipe, a lone run, a member twice, the ensemble over a member
    other = shutil.copytree(seed2, tmp_path / "wider")
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()), "width": 16}))
    for args, says in (([str(seed0), str(other)], "differs from"), ([str(seed0)], "at least two"),
                       ([str(out), str(seed0)], "twice")):
        res = runner.invoke(train_command, ["classifier-ensemble", *args, "--out", str(tmp_path / "no"), *common])
        assert res.exit_code == 2 and says in res.output, res.output
        assert not (tmp_path / "no").exists()
    res = runner.invoke(train_command, ["classifier-ensemble", str(seed0), str(seed2), "--out", str(seed2), *common])
    assert res.exit_code == 2 and "one of the members" in res.output


def test_photo_type_model_is_trained_beside_the_classifier_and_used_by_the_engine(
        trained: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    import shutil

    from inference.engines.classifier import ClassifierEngine
    from inference.training.cli import train_command

    model = shutil.copytree(trained["classifier"], tmp_path / "clf")
    res = CliRunner().invoke(train_command, [
        "photo-type", "--model", str(model), "--data", str(data_dir), "--subset-per-label", "4",
        "--cache-dir", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    stored = json.loads((model / "photo_type.json").read_text())
    assert 0.5 <= stored["threshold"] <= 1.0 and len(stored["layers"]) == 2
    pt = json.loads((model / "metrics.json").read_text())["photo_type"]
    assert {"val", "test", "threshold", "command"} <= set(pt)
    assert "photo-type model" in (model / "MODEL_CARD.md").read_text()
    res = CliRunner().invoke(train_command, ["photo-type", "--model", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no classifier" in res.output

    engine = ClassifierEngine.load(model, device="cpu")
    assert engine.photo_types is not None
    with Image.open(data_dir / "ham10000" / "images" / "ISIC_0027419.jpg") as img:
        photo = img.convert("RGB")
    read_as = engine.photo_type(photo)
    [pred] = engine.predict([photo], saliency=False)
    assert f"photo_type:{read_as}" in pred.flags  # the type whose operating points were applied
    [given] = engine.predict([photo], "clinical", saliency=False)
    assert "photo_type:clinical" in given.flags
    engine.photo_types = None  # a classifier without a photo-type model: every photo counts as clinical
    assert "photo_type:clinical" in engine.predict([photo], saliency=False)[0].flags


def test_lesion_mask_finds_the_dark_lesion() -> None:
    from inference.training.saliency import lesion_mask

    photo = Image.new("RGB", (120, 90), (220, 170, 150))
    photo.paste((90, 50, 40), (45, 30, 75, 60))  # a dark 30 x 30 px lesion in the middle
    mask = lesion_mask(photo, 30)
    assert mask[15, 15] and not mask[2, 2] and 0.05 < mask.mean() < 0.3


def test_tiny_generator_run_samples_and_is_measured(trained: dict[str, Path]) -> None:
    from inference.engines.generator_net import load_generator_parts
    from inference.training.train_generator import NULL_CODE, sample

    unet, _scheduler, config = load_generator_parts(trained["generator"])
    assert config.class_codes[-1] == NULL_CODE and config.extra["null_class_index"] == len(config.class_codes) - 1
    assert "melanoma" in config.class_codes
    imgs = sample(unet.eval(), config, config.class_codes.index("melanoma"), 2, seed=0, steps=2)
    # 64 px pictures from a UNet that works on a 16 x 16 grid of 4 x 4 px patches (the CLI defaults)
    assert imgs.shape == (2, 3, 64, 64) and float(imgs.min()) >= 0 and float(imgs.max()) <= 1
    assert unet.config.sample_size == 16 and unet.config.in_channels == 48
    assert config.prediction_type == "v_prediction"  # trained for v, and sampled as v
    assert json.loads((trained["generator"] / "scheduler" / "scheduler_config.json").read_text())[
        "prediction_type"] == "v_prediction"
    metrics = json.loads((trained["generator"] / "metrics.json").read_text())
    rec = metrics["recognition"]
    assert set(rec["per_class"]) == set(config.class_codes[:-1]) and 0.0 <= rec["overall"] <= 1.0
    assert rec["patch_grid"] > 0
    with Image.open(trained["docs"] / "img" / "generator_samples.png") as grid:
        assert grid.height >= 128 * (len(config.class_codes) - 1)


def test_generator_learns_only_the_chosen_classes_and_refuses_unknown_ones(data_dir: Path, tmp_path: Path) -> None:
    from inference.training.cli import train_command

    common = ["generator", "--data", str(data_dir), "--epochs", "1", "--threads", "1", "--subset-per-label", "3",
              "--cache-dir", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs"), "--samples-per-class", "1",
              "--steps", "2", "--channels", "16,16,32", "--classifier", str(tmp_path / "no-classifier")]
    runner = CliRunner()
    res = runner.invoke(train_command, [*common, "--out", str(tmp_path / "bad"), "--classes", "nevus,not_a_code"])
    assert res.exit_code == 2 and "not_a_code" in res.output and "--classes" in res.output
    assert not (tmp_path / "bad").exists()
    assert not (tmp_path / "cache").exists()  # refused from the labels, before any photo is decoded

    gen = tmp_path / "gen"
    res = runner.invoke(train_command, [*common, "--out", str(gen), "--classes", "nevus, melanoma"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    config = json.loads((gen / "config.json").read_text())
    assert config["class_codes"] == ["melanoma", "nevus", "_unconditional"]
    assert "2 classes chosen for this run (melanoma, nevus)" in (gen / "MODEL_CARD.md").read_text()

    # continued with a class added (at a learning rate of 0): the known classes draw what they drew before,
    # the new one starts as the unconditional model, and the card says which class was added
    from inference.engines.generator_net import load_generator_parts, predict

    wide = tmp_path / "wide"
    res = runner.invoke(train_command, [*common, "--out", str(wide), "--classes", "acne,nevus,melanoma",
                                        "--init-from", str(gen), "--lr", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (before, _, old), (after, _, new) = load_generator_parts(gen), load_generator_parts(wide)
    assert new.class_codes == ["acne", "melanoma", "nevus", "_unconditional"]
    x, t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 100])

    def out(unet: object, config: object, code: str) -> torch.Tensor:
        label = torch.tensor([config.class_codes.index(code)] * 2)
        return predict(unet.float().eval(), config, x, t, label)

    with torch.no_grad():
        for code in ("melanoma", "nevus", "_unconditional"):
            assert torch.allclose(out(before, old, code), out(after, new, code), atol=1e-4), code
        assert torch.allclose(out(after, new, "acne"), out(before, old, "_unconditional"), atol=1e-4)
        assert not torch.allclose(out(after, new, "acne"), out(after, new, "nevus"), atol=1e-4)
    origin = json.loads((wide / "config.json").read_text())["extra"]["training"]["continued_from"]
    assert origin["added_classes"] == ["acne"] and origin["class_codes"] == config["class_codes"]
    assert "adding acne" in (wide / "MODEL_CARD.md").read_text()
    # classes may be added, never dropped: a continued generator still draws everything it drew
    res = runner.invoke(train_command, [*common, "--out", str(tmp_path / "narrow"), "--classes", "acne,nevus",
                                        "--init-from", str(gen)])
    assert res.exit_code == 2 and "--init-from" in res.output and "keeps every class" in res.output
    assert not (tmp_path / "narrow").exists()


def test_class_balance_evens_out_how_often_each_class_is_drawn() -> None:
    from inference.training.train_generator import class_balanced_weights

    codes = ["nevus"] * 60 + ["melanoma"] * 10 + ["dermatofibroma"] * 2
    share = lambda w: {c: float(w[[k for k, x in enumerate(codes) if x == c]].sum() / w.sum()) for c in set(codes)}
    assert share(class_balanced_weights(codes, 0.0)) == pytest.approx({"nevus": 60 / 72, "melanoma": 10 / 72,
                                                                        "dermatofibroma": 2 / 72})
    assert share(class_balanced_weights(codes, 1.0)) == pytest.approx({c: 1 / 3 for c in set(codes)})
    half = share(class_balanced_weights(codes, 0.5))  # in proportion to the square root of the counts
    assert half["dermatofibroma"] / half["nevus"] == pytest.approx((2 / 60) ** 0.5)


def test_memorisation_check_tells_copies_of_training_photos_from_new_pictures(data_dir: Path) -> None:
    from inference.training.evaluate import decode_items, split_items
    from inference.training.train_generator import memorisation

    train = [it for it in split_items(data_dir, D.ham_items(data_dir), "dermamnist-train") if it.raw_label == "df"]
    photos = decode_items(data_dir, train[:12], 64).images
    copies = np.ascontiguousarray(photos[:, :, ::-1])  # mirrored, as training showed them
    brighter = np.clip(photos.astype(int) + 6, 0, 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, photos.shape, dtype=np.uint8)
    result = memorisation({"dermatofibroma": np.concatenate([copies, brighter, noise])}, data_dir)
    assert result["near_copies"] == pytest.approx(2 / 3)  # the copies and the brightened copies, not the noise
    assert result["unseen_photos"] >= 3 and 0 < result["threshold"] < result["median_distance"]["unseen_photos"]
    assert memorisation({"dermatofibroma": noise}, data_dir)["near_copies"] == 0.0


def test_generator_training_continues_a_trained_generator(trained: dict[str, Path], data_dir: Path,
                                                         tmp_path: Path) -> None:
    from inference.engines.generator_net import load_generator_parts
    from inference.training.cli import train_command

    prev = trained["generator"]
    common = ["generator", "--data", str(data_dir), "--epochs", "1", "--threads", "1", "--subset-per-label", "3",
              "--cache-dir", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs"), "--samples-per-class", "1",
              "--steps", "2", "--classifier", str(tmp_path / "no-classifier"), "--init-from", str(prev)]
    runner = CliRunner()
    # a generator of other classes (or size, patches, target) cannot be continued: refused before decoding
    res = runner.invoke(train_command, [*common, "--out", str(tmp_path / "bad"), "--classes", "nevus,melanoma",
                                        "--prediction-type", "v_prediction"])
    assert res.exit_code == 2 and "--init-from" in res.output and "class_codes" in res.output
    res = runner.invoke(train_command, [*common, "--out", str(tmp_path / "bad")])  # epsilon, it learnt v
    assert res.exit_code == 2 and "prediction_type" in res.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cache").exists()

    # with a learning rate of 0 the continued generator is the one it started from: its weights were loaded,
    # its architecture kept (--channels is ignored), and the run records where it came from
    out = tmp_path / "continued"
    res = runner.invoke(train_command, [*common, "--out", str(out), "--prediction-type", "v_prediction",
                                        "--lr", "0", "--class-balance", "1", "--channels", "8,8,8"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    before, after = load_generator_parts(prev)[0], load_generator_parts(out)[0]
    assert after.config.block_out_channels == before.config.block_out_channels
    for (name, a), b in zip(after.state_dict().items(), before.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-3), name
    training = json.loads((out / "config.json").read_text())["extra"]["training"]
    origin = training["continued_from"]
    assert origin["weights_sha256"] == (prev / "weights.sha256").read_text().split()[0]
    assert origin["training"]["steps"] >= 1 and training["class_balance"] == 1.0
    assert "continued from" in (out / "MODEL_CARD.md").read_text()


def test_evaluate_classifier_cli_decodes_the_split_afresh(trained: dict[str, Path], data_dir: Path) -> None:
    from inference.training.cli import train_command
    from inference.training.evaluate import evaluate_classifier

    res = CliRunner().invoke(train_command, ["evaluate-classifier", "--model", str(trained["classifier"]),
                                             "--data", str(data_dir), "--split", "ham-grouped-val"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["split"] == "ham-grouped-val" and out["n"] > 1000
    assert set(out["operating_points"]) == {"melanoma", "any_malignant"}
    # same numbers as the in-memory evaluation
    again = evaluate_classifier(trained["classifier"], data_dir, "ham-grouped-val")
    assert again["acc"] == pytest.approx(out["acc"])


def test_evaluate_generator_cli_records_settings_reference_and_card(trained: dict[str, Path], data_dir: Path) -> None:
    from inference.training.cli import train_command

    gen, docs = trained["generator"], trained["docs"]
    res = CliRunner().invoke(train_command, [
        "evaluate-generator", "--model", str(gen), "--classifier", str(trained["classifier"]), "--data", str(data_dir),
        "--samples-per-class", "2", "--steps", "2", "--guidance-scale", "1.5", "--shift-patches",
        "--dynamic-threshold", "0.95", "--seed", "5", "--docs", str(docs)])
    assert res.exit_code == 0, res.output
    config = json.loads((gen / "config.json").read_text())
    assert config["extra"]["guidance_scale"] == 1.5 and config["num_inference_steps"] == 2
    assert config["shift_patches"] is True and config["dynamic_threshold"] == 0.95  # serving samples the same way
    rec = json.loads((gen / "metrics.json").read_text())["recognition"]
    assert rec["samples_per_class"] == 2 and rec["guidance_scale"] == 1.5 and rec["seed"] == 5
    assert rec["shift_patches"] is True and rec["dynamic_threshold"] == 0.95
    # the reference: held-out real photos (DermaMNIST test, DermNet validation) of the generator's classes
    real = rec["real_photos"]
    assert set(real["n_per_class"]) == set(rec["per_class"]) and sum(real["n_per_class"].values()) > 500
    assert real["n_per_class"]["melanoma"] > 10 and 0.0 <= real["overall"] <= 1.0
    # and whether the pictures copy training photos
    mem = rec["memorisation"]
    assert set(mem["per_class"]) == set(rec["per_class"]) and 0.0 <= mem["near_copies"] <= 1.0
    card = (gen / "MODEL_CARD.md").read_text()
    assert "Measured with: `skinbridge train evaluate-generator" in card and "Real held-out photos" in card
    assert "Near-copies of training photos" in card
    assert "weights stored in float16" in card
    measured = card.split("Measured with: ")[1].split("\n")[0]
    assert " --shift-patches " in measured and "True" not in measured  # a command that can be run again
    assert f"Measured with: {measured}" in (docs / "models.md").read_text()  # docs/models.md holds the same card


def test_evaluate_generator_refuses_a_threshold_that_is_not_a_quantile(trained: dict[str, Path]) -> None:
    from inference.training.cli import train_command

    before = (trained["generator"] / "config.json").read_bytes()
    res = CliRunner().invoke(train_command, ["evaluate-generator", "--model", str(trained["generator"]),
                                             "--classifier", str(trained["classifier"]), "--dynamic-threshold", "95"])
    assert res.exit_code == 2 and "--dynamic-threshold" in res.output
    assert (trained["generator"] / "config.json").read_bytes() == before  # nothing stored


def test_review_sheet_and_card_show_which_classes_are_offered(trained: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from inference.engines.explainer import ClassConditionalExplainer
    from inference.training.cli import _refresh_generator_card, train_command

    gen = shutil.copytree(trained["generator"], tmp_path / "gen")
    docs = tmp_path / "docs"
    codes = json.loads((gen / "config.json").read_text())["class_codes"][:-1]
    # as if the tiny generator had drawn melanoma and nevus recognisably
    (gen / "metrics.json").write_text(json.dumps({"recognition": {
        "overall": 0.9, "samples_per_class": 4, "guidance_scale": 3.0, "steps": 2,
        "per_class": {c: (0.9 if c in ("melanoma", "nevus") else 0.1) for c in codes}}}))
    assert ClassConditionalExplainer.load(gen, device="cpu").offered == ["melanoma", "nevus"]

    runner = CliRunner()
    # what a dermatologist can look at offline: every class as a patient would get it
    res = runner.invoke(train_command, ["review-sheet", "--model", str(gen), "--out", str(tmp_path / "sheet.png"),
                                        "--per-class", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sheet = json.loads(res.output)
    cfg = json.loads((gen / "config.json").read_text())  # the sheet names every setting the pictures depend on
    assert sheet["settings"] == {"guidance_scale": cfg["extra"]["guidance_scale"],
                                 "num_inference_steps": cfg["num_inference_steps"],
                                 "shift_patches": cfg["shift_patches"], "dynamic_threshold": cfg["dynamic_threshold"]}
    assert sheet["weights_sha256"] == (gen / "weights.sha256").read_text().split()[0]
    with Image.open(tmp_path / "sheet.png") as img:
        assert img.height > 2 * len(codes) * 64  # one row per class, pictures shown at display size

    _refresh_generator_card(gen, docs)
    card = (gen / "MODEL_CARD.md").read_text()
    assert f"**2 of {len(codes)}**: melanoma, nevus." in card
    assert "approved its pictures in the console" in card
    assert "| melanoma |" in card and card.count("| yes |") == 2

    # drawing dermoscopic and clinical classes, the card tells the two apart (the classifier knows
    # dermoscopic photos far better), real photos weighted by how many there are
    config = json.loads((gen / "config.json").read_text())
    config["extra"]["image_types"] = {c: "dermoscopic" if c in ("melanoma", "nevus") else "clinical" for c in codes}
    (gen / "config.json").write_text(json.dumps(config))
    _refresh_generator_card(gen, docs)
    assert ("dermoscopic classes (2): **90.0 %** of generated pictures, n/a of real photos."
            in (gen / "MODEL_CARD.md").read_text())  # the real-photo reference was not measured
    metrics = json.loads((gen / "metrics.json").read_text())
    metrics["recognition"]["real_photos"] = {
        "overall": 0.5, "per_class": {c: {"melanoma": 0.5, "nevus": 0.9}.get(c, 0.2) for c in codes},
        "n_per_class": {c: {"melanoma": 10, "nevus": 30}.get(c, 5) for c in codes}}
    (gen / "metrics.json").write_text(json.dumps(metrics))
    _refresh_generator_card(gen, docs)
    card = (gen / "MODEL_CARD.md").read_text()
    assert (f"By image type: clinical classes ({len(codes) - 2}): **10.0 %** of generated pictures, 20.0 % of real "
            "photos; dermoscopic classes (2): **90.0 %** of generated pictures, 80.0 % of real photos.") in card


def test_the_device_kit_carries_the_trainers_pixels_to_a_gpu_run(data_dir: Path, tmp_path: Path) -> None:
    """The GPU machine gets the repository, not ../shared: the kit holds the photos at training size, and
    the device script trains from it and packs the result into the few files a device call returns."""
    import os
    import subprocess
    import sys
    import tarfile

    from inference.training.cli import train_command
    from inference.training.device_kit import build_device_kit

    kit = tmp_path / "kit"
    res = CliRunner().invoke(train_command, ["device-kit", "--data", str(data_dir), "--out", str(kit),
                                             "--sources", "ham10000,isic"])
    assert res.exit_code == 2 and "isic" in res.output and not kit.exists()

    made = build_device_kit(data_dir, kit, 64, sources=("ham10000",), per_label=2)
    assert made["photos"] == 2 * 7 * 3  # two per HAM10000 label and DermaMNIST split
    with pytest.raises(FileNotFoundError):  # a failed rebuild keeps the kit that was there
        build_device_kit(tmp_path / "no-data", kit, 64, sources=("ham10000",), per_label=2)
    assert len(list((kit / "ham10000" / "images").glob("*.jpg"))) == made["photos"]
    assert not (tmp_path / "kit.partial").exists()
    assert D.ham_items(kit) == D.ham_items(data_dir) and D.dermnet_items(kit) == []
    assert (kit / "ham10000" / "README.md").read_text() == (data_dir / "ham10000" / "README.md").read_text()
    item = D.ham_items(data_dir)[0]
    kit_px = D.load_image(D.item_path(kit, item), 64).astype(int)
    assert np.abs(kit_px - D.load_image(D.item_path(data_dir, item), 64).astype(int)).mean() < 3  # JPEG rounding

    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "KIT": str(kit), "PYTHON": sys.executable, "OUT": str(out),
           "WHEELS": str(tmp_path / "no-wheels")}
    script = Path(__file__).resolve().parent.parent / "inference" / "training" / "device_train.sh"
    done = subprocess.run(["bash", str(script), "generator", "tiny", "1", "--subset-per-label", "2", "--epochs", "1",
                           "--classes", "melanoma,nevus", "--steps", "2", "--channels", "16,16,32",
                           "--classifier", str(tmp_path / "no-classifier")],
                          cwd=script.parents[2], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (out / "tiny.log").read_text() if (out / "tiny.log").exists() else done.stderr
    with tarfile.open(out / "tiny.tgz") as tgz:
        names = set(tgz.getnames())
        config = json.load(tgz.extractfile("./generator/config.json"))  # type: ignore[arg-type]
    assert {"./generator/unet/diffusion_pytorch_model.safetensors", "./generator/MODEL_CARD.md",
            "./docs/img/generator_samples.png"} <= names
    assert config["class_codes"] == ["melanoma", "nevus", "_unconditional"]


def test_a_gpu_classifier_run_and_its_distilled_student_come_back_from_the_device_script(
        data_dir: Path, tmp_path: Path) -> None:
    """The classifier's device call on a CPU: a WebP kit, a float16 teacher, a student distilled from it
    at a smaller size, each packed into the archive a device call returns; the student serves."""
    import os
    import subprocess
    import sys
    import tarfile

    from safetensors.torch import load_file

    from inference.engines.classifier import ClassifierEngine
    from inference.training.device_kit import build_device_kit

    kit = tmp_path / "kit"
    build_device_kit(data_dir, kit, 32, quality=85, image_format="webp", per_label=2)
    photo = next((kit / "ham10000" / "images").glob("*.jpg"))
    with Image.open(photo) as img:
        assert img.format == "WEBP"  # under the data folder's own name, so every trainer finds it
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "KIT": str(kit), "PYTHON": sys.executable, "OUT": str(out),
           "WHEELS": str(tmp_path / "no-wheels"), "CACHE": str(tmp_path / "cache")}
    script = Path(__file__).resolve().parent.parent / "inference" / "training" / "device_train.sh"
    common = ["--subset-per-label", "2", "--epochs", "2", "--width", "8", "--tta-views", "1", "--val-every", "5"]

    def device_run(name: str, *options: str) -> Path:
        done = subprocess.run(["bash", str(script), "classifier", name, "1", *common, *options],
                              cwd=script.parents[2], env=env, capture_output=True, text=True, timeout=600)
        unpacked = tmp_path / name
        with tarfile.open(out / f"{name}.tgz") as tgz:
            tgz.extractall(unpacked, filter="data")
        assert done.returncode == 0, (unpacked / f"{name}.log").read_text()
        return unpacked / "classifier"

    teacher = device_run("t-teacher", "--image-size", "32", "--half-weights")
    assert {t.dtype for k, t in load_file(str(teacher / "model.safetensors")).items() if t.is_floating_point()} \
        == {torch.float16}
    assert json.loads((teacher / "config.json").read_text())["training"]["weights_dtype"] == "float16"
    log = [json.loads(line) for line in (teacher / "train_log.jsonl").read_text().splitlines()]
    assert [("val_ham_balanced_acc" in r) for r in log] == [False, True]  # --val-every 5: the last epoch only

    student = device_run("t-student", "--image-size", "16", "--teacher", str(teacher))
    config = json.loads((student / "config.json").read_text())
    assert config["image_size"] == 16
    assert config["training"]["teacher"]["image_size"] == 32
    assert len(config["training"]["teacher"]["weights_sha256"]) == 64
    engine = ClassifierEngine.load(student, device="cpu")
    with Image.open(photo) as img:
        prediction, = engine.predict([img.convert("RGB")])
    assert prediction.weights_sha256 == (student / "weights.sha256").read_text().split()[0]
    assert prediction.differential[0]["code"] in config["class_codes"]

    # a teacher that knows other classes is refused before any training
    other = tmp_path / "other-teacher"
    other.mkdir()
    for f in teacher.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    wrong = json.loads((other / "config.json").read_text())
    wrong["class_codes"] = wrong["class_codes"][::-1]
    (other / "config.json").write_text(json.dumps(wrong))
    from inference.training.cli import train_command

    res = CliRunner().invoke(train_command, ["classifier", "--data", str(kit), "--out", str(tmp_path / "refused"),
                                             "--cache-dir", str(tmp_path / "cache"), "--docs", str(tmp_path / "d"),
                                             *common, "--image-size", "16", "--teacher", str(other)])
    assert res.exit_code == 2 and "other classes" in res.output


def test_the_teachers_term_vanishes_when_the_student_agrees_and_grows_when_it_does_not() -> None:
    from inference.engines.classifier_net import SkinClassifierNet
    from inference.training.train_classifier import Teacher

    torch.manual_seed(0)
    net = SkinClassifierNet(5, 2, 4).eval()
    teacher = Teacher(net, 16, 4, torch.zeros(3), torch.ones(3), "0" * 64)
    x01, types = torch.rand(6, 3, 16, 16), torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        same = net(x01, types)
    assert float(teacher.loss(same, x01, types, 2.0, on_gpu=False)) == pytest.approx(0.0, abs=1e-5)
    assert float(teacher.loss(same.flip(1) * 3, x01, types, 2.0, on_gpu=False)) > 0.01

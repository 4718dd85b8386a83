"""The condition vocabulary: dataset coverage, both languages, valid SNOMED CT ids, free-text matching."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from inference.vocabulary import (
    CATEGORIES,
    DATA_DIR,
    LANGUAGES,
    URGENCIES,
    fold,
    load_from,
    load_vocabulary,
    valid_concept_sctid,
)


def test_verhoeff_check_catches_typos():
    assert valid_concept_sctid("254701007")  # basal cell carcinoma of skin
    assert not valid_concept_sctid("254701008")  # wrong check digit
    assert not valid_concept_sctid("254710007")  # transposed digits
    assert not valid_concept_sctid("254701027")  # partition 02 = a description id, not a concept


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def test_every_snomed_id_is_a_valid_concept_id(vocab):
    bad = {c.code: c.snomed for c in vocab if not valid_concept_sctid(c.snomed)}
    assert not bad
    for c in vocab:
        assert c.snomed_display and c.snomed_match in ("exact", "broader", "representative")


def test_key_cancer_codes_are_the_verified_concepts(vocab):
    # 372130007 is "Malignant neoplasm of skin"; melanoma of skin is 93655004
    assert (vocab.get("melanoma").snomed, vocab.get("melanoma").snomed_display) == ("93655004", "Malignant melanoma of skin")
    assert vocab.get("basal_cell_carcinoma").snomed == "254701007"
    assert vocab.get("squamous_cell_carcinoma").snomed == "254651007"
    assert vocab.get("actinic_keratosis").snomed == "201101007"
    assert vocab.get("nevus").snomed == "400096001"
    assert all(vocab.get(c).snomed_checked for c in ("melanoma", "basal_cell_carcinoma", "squamous_cell_carcinoma",
                                                     "actinic_keratosis", "nevus"))


def test_all_108_dermnet_topics_map_to_exactly_one_condition(vocab, shared_data):
    with open(shared_data / "dermnet" / "labels.csv", newline="") as fh:
        topics = {row["condition"] for row in csv.DictReader(fh)}
    assert len(topics) == 108
    with open(DATA_DIR / "dermnet_grouping.csv", newline="") as fh:
        rows = [(r["topic"], r["condition_code"]) for r in csv.DictReader(fh)]
    counts = Counter(t for t, _ in rows)
    assert {t for t, n in counts.items() if n > 1} == set()
    assert set(counts) == topics
    assert {code for _, code in rows} <= set(vocab.codes)
    grouping = vocab.dataset_grouping("dermnet")
    assert grouping["Melanoma in situ"] == "melanoma"
    assert grouping["Atopic dermatitis"] == "atopic_dermatitis"
    assert grouping["Tinea corporis"] == "fungal_infection"
    assert grouping["Herpes zoster"] == "herpes_zoster"


def test_ham10000_classes_map_exactly_once(vocab, shared_data):
    with open(shared_data / "ham10000" / "HAM10000_metadata.csv", newline="") as fh:
        dx = {row["dx"] for row in csv.DictReader(fh)}
    grouping = vocab.dataset_grouping("ham10000")
    assert set(grouping) == dx == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert grouping == {"akiec": "actinic_keratosis", "bcc": "basal_cell_carcinoma", "bkl": "seborrheic_keratosis",
                        "df": "dermatofibroma", "mel": "melanoma", "nv": "nevus", "vasc": "vascular_lesion"}


def test_training_loader_reads_the_same_grouping(vocab):
    from inference.training import data

    assert data.ham_grouping() == vocab.dataset_grouping("ham10000")
    assert data.dermnet_grouping() == vocab.dataset_grouping("dermnet")


def test_every_condition_speaks_english_and_german(vocab):
    assert 25 <= len(vocab) <= 40
    for c in vocab:
        for lang in LANGUAGES:
            assert c.name(lang).strip() and c.description(lang).strip() and c.advice(lang).strip(), (c.code, lang)
            assert c.synonyms.get(lang), (c.code, lang)
        assert c.description("en") != c.description("de") and c.advice("en") != c.advice("de"), c.code
        assert c.category in CATEGORIES and c.default_urgency in URGENCIES
        assert c.malignant == (c.category == "malignant"), c.code
    assert vocab.get("nevus").name("fr") == vocab.get("nevus").name("en")  # unknown language falls back


def test_classifier_classes_are_the_codes_with_training_data(vocab):
    classes = vocab.classifier_classes()
    assert len(classes) == len(set(classes))
    assert set(classes) == set(vocab.dataset_grouping("ham10000").values()) | set(vocab.dataset_grouping("dermnet").values())
    assert classes == [c for c in vocab.codes if c in set(classes)]  # stable vocabulary order
    assert {"melanoma", "nevus", "acne", "psoriasis"} <= set(classes)


@pytest.mark.parametrize("text,code", [
    ("mole", "nevus"), ("naevus", "nevus"), ("Muttermal", "nevus"), ("NÄVUS", "nevus"), ("Leberfleck", "nevus"),
    ("BCC", "basal_cell_carcinoma"), ("Basaliom", "basal_cell_carcinoma"), ("melanom", "melanoma"),
    ("Malignant Melanoma", "melanoma"), ("Gürtelrose", "herpes_zoster"), ("guertelrose", "herpes_zoster"),
    ("shingles on my back", "herpes_zoster"), ("Neurodermitis", "atopic_dermatitis"), ("eczema", "eczema"),
    ("Schuppenflechte", "psoriasis"), ("psoriasiss", "psoriasis"), ("athlete's foot", "fungal_infection"),
    ("Fußpilz", "fungal_infection"), ("hives", "urticaria"), ("pimples", "acne"),
])
def test_match_understands_names_and_synonyms_in_both_languages(vocab, text, code):
    found = vocab.match(text)
    assert found is not None and found.code == code


@pytest.mark.parametrize("text", ["", "   ", "xyzzy", "I like turtles", "12345"])
def test_match_returns_none_for_unrelated_text(vocab, text):
    assert vocab.match(text) is None


def test_search_for_the_condition_picker(vocab):
    assert vocab.search("psor", "en")[0].code == "psoriasis"
    assert vocab.search("Mutter", "de")[0].code == "nevus"
    assert vocab.search("melanoma", "en")[0].code == "melanoma"
    assert vocab.search("basal", "en")[0].code == "basal_cell_carcinoma"
    everything = vocab.search("", "de")
    assert len(everything) == len(vocab)
    assert [fold(c.name("de")) for c in everything] == sorted(fold(c.name("de")) for c in everything)
    assert vocab.search("qqqqzzz", "en") == []


def test_unknown_code_raises_key_error(vocab):
    with pytest.raises(KeyError):
        vocab.get("no_such_condition")


def test_grouping_to_an_unknown_code_is_refused(tmp_path: Path):
    for name in ("conditions.json", "ham10000_grouping.csv", "dermnet_grouping.csv"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    with open(tmp_path / "dermnet_grouping.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["Made-up topic", "made_up_code"])
    with pytest.raises(ValueError, match="made_up_code"):
        load_from(tmp_path)

"""The VLM engine on a tiny LLaVA (CLIP vision tower + Llama) saved to disk and loaded through the
production path. Random weights emit garbage, so answers are driven by a LogitsProcessor that forces
a chosen text through the real ``generate()`` call: parsing, repair and guard rails run for real."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from inference.engines.base import model_sha256
from inference.engines.synthetic import TINY_LLAVA, build_llava, save_vlm, train_tokenizer
from inference.engines.vlm import FLAG_REPAIRED, FLAG_UNPARSEABLE, VLMEngine, parse_diagnosis


@dataclass(frozen=True)
class FakeCondition:
    code: str
    names: tuple[str, ...]

    def name(self, lang: str = "en") -> str:
        return self.names[0]


class FakeVocabulary:
    """A three-condition vocabulary with the interface of inference.vocabulary.Vocabulary."""

    def __init__(self) -> None:
        self._items = [
            FakeCondition("melanoma", ("Melanoma", "malignant melanoma")),
            FakeCondition("nevus", ("Melanocytic nevus", "mole")),
            FakeCondition("basal_cell_carcinoma", ("Basal cell carcinoma", "bcc")),
        ]

    @property
    def codes(self) -> list[str]:
        return [c.code for c in self._items]

    def get(self, code: str) -> FakeCondition:
        return next(c for c in self._items if c.code == code)

    def match(self, free_text: str) -> FakeCondition | None:
        text = free_text.strip().lower()
        return next((c for c in self._items if text in (n.lower() for n in c.names)), None)


class ForceText(LogitsProcessor):
    """Makes greedy decoding spell ``token_ids`` and then end: a deterministic 'model answer'."""

    def __init__(self, token_ids: list[int], prompt_len: int, eos_id: int) -> None:
        self.ids = token_ids + [eos_id]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = min(input_ids.shape[1] - self.prompt_len, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[step]] = 0.0
        return forced


class ScriptedAnswers:
    """Generation hook: answers per step from a script; records which steps ran."""

    def __init__(self, tokenizer, script: dict[str, list[str]]) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.script = {k: list(v) for k, v in script.items()}
        self.steps: list[str] = []

    def __call__(self, step: str, prompt_len: int) -> list[LogitsProcessor]:
        self.steps.append(step)
        text = self.script[step].pop(0)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [ForceText(ids, prompt_len, self.tokenizer.eos_token_id)]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    model, processor = build_llava(TINY_LLAVA, tokenizer)
    return save_vlm(tmp_path_factory.mktemp("vlm"), model, processor)


@pytest.fixture(scope="module")
def engine(vlm_dir: Path) -> VLMEngine:
    return VLMEngine.load(vlm_dir, device="cpu", vocabulary=FakeVocabulary(), max_new_tokens=160)


@pytest.fixture
def photo() -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), (190, 140, 120))]


def _script(engine: VLMEngine, script: dict[str, list[str]]) -> ScriptedAnswers:
    hook = ScriptedAnswers(engine.processor.tokenizer, script)
    engine.generation_hook = hook
    return hook


GOOD = (
    '{"differential": [{"condition": "Melanoma", "probability": 0.6}, {"condition": "mole", "probability": 0.3}],'
    ' "features": {"colour": "dark brown", "border": "irregular"}, "urgency_hints": ["bleeding", "be scared"],'
    ' "advice": "Please see a dermatologist."}'
)


def test_valid_answer_maps_to_vocabulary_codes(engine: VLMEngine, vlm_dir: Path, photo: list[Image.Image]) -> None:
    hook = _script(engine, {"describe": ["Dark brown patch, irregular border."], "diagnose": [f"Sure! {GOOD}"]})
    pred = engine.diagnose(photo, {"duration": "3 months", "itching": True}, "en")
    assert hook.steps == ["describe", "diagnose"]
    assert pred.engine == "vlm" and pred.flags == []
    assert pred.differential == [{"code": "melanoma", "probability": 0.6}, {"code": "nevus", "probability": 0.3}]
    assert pred.description == "Dark brown patch, irregular border."
    assert pred.features == {"colour": "dark brown", "border": "irregular"}
    assert pred.urgency_hints == ["bleeding"]  # unknown hints are dropped
    assert pred.advice == "Please see a dermatologist."
    assert pred.weights_sha256 == model_sha256(vlm_dir) and pred.model_id == vlm_dir.name


def test_invalid_answer_gets_exactly_one_repair(engine: VLMEngine, photo: list[Image.Image]) -> None:
    hook = _script(engine, {
        "describe": ["Red scaly plaque."],
        "diagnose": ['{"differential": [{"condition": "Dragon pox", "probability": 0.9}]}'],
        "repair": ['{"differential": [{"condition": "bcc", "probability": 0.8}]}'],
    })
    pred = engine.diagnose(photo, {}, "en")
    assert hook.steps == ["describe", "diagnose", "repair"]
    assert pred.differential == [{"code": "basal_cell_carcinoma", "probability": 0.8}]
    assert FLAG_REPAIRED in pred.flags


def test_two_bad_answers_are_unparseable(engine: VLMEngine, photo: list[Image.Image]) -> None:
    hook = _script(engine, {
        "describe": ["A lesion."],
        "diagnose": ["I think it is probably melanoma."],
        "repair": ['{"differential": [{"condition": "Melanoma", "probability": 7}]}'],
    })
    pred = engine.diagnose(photo, {}, "en")
    assert hook.steps == ["describe", "diagnose", "repair"]  # one repair, never a second
    assert pred.differential == [] and pred.flags == [FLAG_UNPARSEABLE]


def test_dosing_question_is_refused_without_asking_the_model(engine: VLMEngine, photo: list[Image.Image]) -> None:
    hook = _script(engine, {})
    answer = engine.followup(photo, {"preliminary": "acne"}, "How much isotretinoin should I take per day?", "en")
    assert hook.steps == []
    assert "dosing_refused" in answer.flags
    assert "can't advise on doses" in answer and "preliminary" in answer and "not a diagnosis" in answer


def test_model_answer_with_a_dose_is_replaced(engine: VLMEngine, photo: list[Image.Image]) -> None:
    _script(engine, {"followup": ["Take 40 mg twice a day."]})
    answer = engine.followup(photo, {}, "What helps against the itching?", "en")
    assert "40 mg" not in answer and "dosing_refused" in answer.flags


@pytest.mark.parametrize(
    ("question", "lang", "flag"),
    [
        ("The mole started bleeding yesterday, is that bad?", "en", "red_flag:bleeding"),
        ("It is growing really fast since last week", "en", "red_flag:rapid_growth"),
        ("I have a fever and the rash is spreading to my arms", "en", "red_flag:fever_spreading_rash"),
        ("Ich habe Fieber und der Ausschlag breitet sich aus", "de", "red_flag:fever_spreading_rash"),
    ],
)
def test_red_flag_question_escalates(engine: VLMEngine, photo: list[Image.Image], question: str, lang: str,
                                     flag: str) -> None:
    hook = _script(engine, {})
    answer = engine.followup(photo, {}, question, lang)
    assert hook.steps == []
    assert answer.needs_dermatologist and flag in answer.flags
    expected = "dermatologist will look" if lang == "en" else "Hautarzt sieht sich Ihren Fall"
    assert expected in answer
    assert ("not a diagnosis" if lang == "en" else "keine Diagnose") in answer


def test_ordinary_followup_gets_model_answer_with_disclaimer(engine: VLMEngine, photo: list[Image.Image]) -> None:
    hook = _script(engine, {"followup": ["Keep the skin moisturised and avoid scratching."]})
    answer = engine.followup(photo, {"preliminary": "eczema"}, "What can I do about dry skin?", "en")
    assert hook.steps == ["followup"] and answer.flags == []
    assert answer.startswith("Keep the skin moisturised and avoid scratching.")
    assert "preliminary" in answer and "not a diagnosis" in answer


def test_random_tiny_model_runs_end_to_end(engine: VLMEngine, photo: list[Image.Image]) -> None:
    engine.generation_hook = None  # real greedy decoding of a random model: garbage, but no crash
    engine.max_new_tokens = 24
    pred = engine.diagnose(photo * 2, {"age": 40}, "de")
    assert pred.engine == "vlm"
    # garbage is either rejected (no differential, flagged) or, if it happened to parse, in-vocabulary
    assert pred.flags == [FLAG_UNPARSEABLE] or all(d["code"] in FakeVocabulary().codes for d in pred.differential)
    assert set(pred.timings) >= {"describe_s", "diagnose_s"}
    answer = engine.followup(photo, {}, "Is it contagious?", "de")
    assert "keine Diagnose" in answer


def test_parser_rejects_out_of_range_and_renormalises() -> None:
    vocab = FakeVocabulary()
    _, diff = parse_diagnosis(
        '```json\n{"differential": [{"condition": "melanoma", "probability": 0.9},'
        ' {"condition": "Malignant melanoma", "probability": 0.3}, {"condition": "mole", "probability": 0.8}]}\n```',
        vocab, [],
    )
    # two names of one condition are merged; scores summing over 1 become a distribution
    assert [d["code"] for d in diff] == ["melanoma", "nevus"]
    assert sum(d["probability"] for d in diff) == pytest.approx(1.0, abs=1e-5)

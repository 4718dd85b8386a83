"""Each VLM family a clinic may bring answers a patient in the sandbox chat (issue 21, "done when"): one
system (Bot API emulator, the bot, a real `skinbridge worker`), the worker restarted with
SKINBRIDGE_VLM_PATH set to a tiny random-weight checkpoint of each family (tests/family_models.py), and a
new patient each time consulting over the emulator's HTTP API as in the sandbox page.

Random weights write no usable diagnosis: what is checked is that the worker loaded the family, called it
on the case (its answer is on record under the checkpoint's name), and that the patient got exactly one
preliminary result either way. Runs on SQLite only (the worker's path does not depend on the database)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from clinic_db import patients
from clinic_db.models import AIResult, Case
from tests.e2e_support import (
    HISTORY,
    Chat,
    Worker,
    answer_history,
    bot_environment,
    consent,
    dermnet_photos,
    running_system,
    tiny_model_env,
)
from tests.family_models import BUILDERS, build_family

FIRST_PATIENT = 7400
RESULT_S = 240.0  # a worker restart (torch import, three models) plus the chain, on a busy 2-core machine
TEXTS = ['{"differential": [{"condition": "Melanocytic nevus", "probability": 0.7}]}', "Keep it moisturised."] * 20


def _vlm_results(clinic, user_id: int) -> list[AIResult]:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        patient = patients.find_by_telegram(clinic, s, user_id)
        case = s.scalar(select(Case).where(Case.patient_id == patient.id))
        return list(s.scalars(select(AIResult).where(AIResult.case_id == case.id, AIResult.engine == "vlm")))


def test_every_family_answers_a_patient_from_the_sandbox_chat(clinic_on, sqlite_url: str, tmp_path: Path,
                                                              shared_data: Path) -> None:
    clinic = clinic_on(sqlite_url)
    models = {**tiny_model_env(tmp_path / "models", clinic), "SKINBRIDGE_DEVICE": "cpu"}
    photo = dermnet_photos(shared_data, "melanocytic-naevus/3152.jpg")[0].read_bytes()
    with running_system(tmp_path, models, web=False) as system:
        for i, family in enumerate(sorted(BUILDERS)):
            folder = build_family(family, tmp_path / "vlm" / family, TEXTS)
            system.worker.stop()  # this family's worker, on the same broker and database
            system.worker = Worker(bot_environment(system.emulator, {**models, "SKINBRIDGE_VLM_PATH": str(folder)}),
                                   tmp_path, log_name=f"worker-{family}.log").start()

            user_id = FIRST_PATIENT + i
            chat = Chat(system.emulator, user_id)
            consent(chat)
            chat.photo(photo)
            saved = chat.expect_text("Photo saved")
            chat.tap(saved, "photos:done")
            answer_history(chat, HISTORY)
            chat.expect(lambda m: "c:doc:" in json.dumps(m.get("reply_markup") or {}),
                        f"the preliminary result with {family}", timeout=RESULT_S)

            results = _vlm_results(clinic, user_id)
            assert [r.model_id for r in results] == [family], (family, system.logs())
            assert sum("c:doc:" in json.dumps(m.get("reply_markup") or {}) for m in chat.messages()) == 1

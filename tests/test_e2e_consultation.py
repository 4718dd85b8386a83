"""One whole teleconsultation through every real part of SkinBridge.

The Telegram emulator, the web app (FHIR API + SMART + console) on uvicorn, a Celery worker process
with tiny models and the bot process (``skinbridge bot``) share one var dir, SQLite database and key
directory. A patient consults through the emulator, a dermatologist signs an amended assessment in
the console over HTTP, the patient gets the dermatologist's message, and an EHR reads the signed
DiagnosticReport and its Provenance with a real SMART backend-services token.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage
from sqlalchemy import select

from bot.i18n import t
from bot.render import likelihood
from clinic_db import clinicians
from clinic_db.models import AIResult, Case, Clinician, ReviewTask
from clinic_db.states import CaseStatus
from fhir.smart import register_client
from inference.vocabulary import load_vocabulary
from skinbridge.cli import main as skinbridge_cli
from tests.e2e_support import (
    HISTORY,
    Chat,
    System,
    answer_history,
    console_login,
    consent,
    csrf_token,
    dermnet_photos,
    running_system,
    tiny_model_env,
)
from tests.test_fhir_support import Ehr, rsa_key

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
QUESTION = "Is this something that usually goes away on its own?"
NOTE = "I think this is a harmless spot. Please show it to your GP at your next visit."
PATIENT = 7001
PROGRESS_TEXTS = [t("en", f"progress.{stage}") for stage in ("received", "analysing", "pictures", "ready")]
PIPELINE_S = 180.0  # worker start (torch import, tiny models) plus the chain, on a busy 2-core machine


@pytest.fixture
def system(clinic, tmp_path: Path) -> Iterator[System]:  # type: ignore[no-untyped-def]
    with running_system(tmp_path, tiny_model_env(tmp_path / "models", clinic), web=True) as running:
        yield running


def _case(clinic) -> Case:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        rows = session.scalars(select(Case)).all()
        assert len(rows) == 1, f"expected one case, found {len(rows)}"
        return rows[0]


def _differential(clinic, case_id: uuid.UUID) -> list[dict]:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        result = session.scalars(select(AIResult).where(AIResult.case_id == case_id)).one()
        return clinic.vault.get_json(session, result, "differential", owner=result.case.patient_id)


def _other_condition(code: str) -> str:
    """A vocabulary condition the dermatologist amends to (not what the AI said)."""
    return next(c for c in ("seborrheic_keratosis", "nevus") if c != code)


def test_patient_to_dermatologist_to_ehr(clinic, system: System, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    vocab = load_vocabulary()
    chat = Chat(system.emulator, PATIENT)

    # --- the patient: consent, an album of two real photos, the history questions ---------------
    consent(chat)
    photos = dermnet_photos(shared_data, "melanocytic-naevus/3152.jpg", "melanocytic-naevus/3154.jpg")
    chat.album([p.read_bytes() for p in photos])
    saved = chat.expect_text("2 photos saved")
    chat.tap(saved, "photos:done")
    answer_history(chat, HISTORY)
    chat.expect_text("submitted")

    # --- the worker analyses the case; ONE progress message is edited up to "ready" (through "drawing
    # example pictures" while the pictures are drawn after the result) ---------------------------------
    ready = chat.expect(lambda m: m.get("text") == t("en", "progress.ready"), "the progress message at 'ready'",
                        timeout=PIPELINE_S)
    progress = [m for m in chat.messages() if (m.get("text") or "") in PROGRESS_TEXTS]
    assert [m["message_id"] for m in progress] == [ready["message_id"]], progress
    assert ready["edited"]
    edits = chat.http.get("/_emulator/calls", params={"method": "editMessageText"}).json()
    assert any(str(c["params"].get("message_id")) == str(ready["message_id"]) for c in edits)

    case = _case(clinic)
    assert case.status in (CaseStatus.preliminary.value, CaseStatus.in_review.value)
    differential = _differential(clinic, case.id)
    top = differential[0]
    assert case.condition_code == top["code"]
    top_name = vocab.get(top["code"]).name("en")

    # --- the preliminary result and the AI-generated example images -------------------------------
    result = chat.expect_text("PRELIMINARY AI ASSESSMENT")
    text = result["text"]
    word = likelihood("en", top["probability"])
    # a weak top guess (the tiny model's often is) is not introduced as "most likely"
    assert (f"Most likely: {top_name} – {word}." if top["probability"] >= 0.2
            else f"Its closest guess, {top_name}, is {word}.") in text
    assert "NOT a diagnosis" in text and "until a dermatologist reviews it" in text
    album = chat.expect(lambda m: m["kind"] == "media_group", "the AI-generated example images")
    assert len(album["files"]) == 2
    assert all(c.startswith(f"AI-generated example of {top_name}") for c in album["captions"]), album["captions"]
    example = httpx.get(system.emulator + album["files"][0])
    assert example.status_code == 200
    assert min(PILImage.open(io.BytesIO(example.content)).size) > 0  # a real picture reached the chat

    # --- a follow-up question, answered by the worker with the disclaimer -----------------------
    chat.tap(result, "c:ask:")
    chat.expect_text("Type your question")
    chat.text(QUESTION)
    chat.expect_text("question was received")
    answer = chat.expect_text("The preliminary assessment points most to", timeout=60)
    assert top_name in answer["text"] and "not a diagnosis" in answer["text"]

    # --- the patient asks for a dermatologist ----------------------------------------------------
    chat.tap(answer, "c:doc:")
    chat.expect_text("A dermatologist will review your case")
    with clinic.session() as session:
        assert session.get(Case, case.id).status == CaseStatus.in_review.value
        task = session.scalars(select(ReviewTask).where(ReviewTask.case_id == case.id)).one()
        assert task.status == "open" and "patient_requested" in task.reasons
        task_id = task.id

    # --- a dermatologist (created with the CLI) claims, amends and signs in the console ----------
    created = CliRunner().invoke(skinbridge_cli, ["clinician", "add", "ada", "--name", "Dr. Ada Weber",
                                                  "--password-stdin"], input=PASSWORD + "\n")
    assert created.exit_code == 0, created.output
    with clinic.session() as session:
        clinicians.create(clinic, session, "bob", display_name="Dr. Bob Brandt", role="dermatologist",
                          password=PASSWORD)
        session.commit()
        ada_id = session.scalars(select(Clinician.id).where(Clinician.username == "ada")).one()

    ada = console_login(system.web, "ada", PASSWORD)
    bob = console_login(system.web, "bob", PASSWORD)
    queue = ada.get("/console/queue")
    assert f'data-task="{task_id}"' in queue.text
    ada_token, bob_token = csrf_token(queue.text), csrf_token(bob.get("/console/queue").text)
    claimed = ada.post(f"/console/tasks/{task_id}/claim", data={"csrf_token": ada_token})
    assert claimed.status_code == 303 and claimed.headers["location"] == f"/console/tasks/{task_id}"
    second = bob.post(f"/console/tasks/{task_id}/claim", data={"csrf_token": bob_token})
    assert second.status_code == 409 and "Dr. Ada Weber is already reviewing this case" in second.text

    page = ada.get(f"/console/tasks/{task_id}")
    assert page.status_code == 200
    assert QUESTION in page.text  # the patient's follow-up question is part of the case view
    amended_code = _other_condition(top["code"])
    signed = ada.post(f"/console/tasks/{task_id}/decision", data={
        "csrf_token": ada_token, "decision": "amend", "condition_code": amended_code, "urgency": "routine",
        "recommendation": "see_gp", "note": NOTE,
    })
    assert signed.status_code == 303 and signed.headers["location"] == "/console/queue?done=signed", signed.text

    # --- the patient receives the dermatologist's decision and note -----------------------------
    amended_name = vocab.get(amended_code).name("en")
    final = chat.expect_text("A dermatologist has reviewed your case.")
    assert f"Assessment: {amended_name}." in final["text"] and NOTE in final["text"]

    # --- an EHR reads the signed report with a SMART backend-services token ---------------------
    key = rsa_key()
    ehr = Ehr(system.web, register_client(clinic, "E2E EHR", {"keys": [key.public_jwk]}, ["system/*.rs"]), key)
    headers = ehr.headers()
    assert httpx.get(f"{ehr.fhir}/DiagnosticReport/{case.id}").status_code == 401  # no token, no data
    report = httpx.get(f"{ehr.fhir}/DiagnosticReport/{case.id}", headers=headers)
    assert report.status_code == 200, report.text
    dr = report.json()
    assert dr["status"] == "final"  # the first signature, though it amended the AI
    assert dr["resultsInterpreter"] == [{"reference": f"Practitioner/{ada_id}"}]
    codes = {c["code"] for concept in dr.get("conclusionCode", []) for c in concept.get("coding", [])}
    assert vocab.get(amended_code).snomed in codes
    practitioner = httpx.get(f"{ehr.fhir}/Practitioner/{ada_id}", headers=headers).json()
    assert "Ada Weber" in str(practitioner.get("name"))

    provenance = httpx.get(f"{ehr.fhir}/Provenance/{task_id}", headers=headers)
    assert provenance.status_code == 200, provenance.text
    signature = provenance.json()
    assert any(tg["reference"].startswith(f"DiagnosticReport/{case.id}/_history/") for tg in signature["target"])
    assert {"reference": f"Practitioner/{ada_id}"} in [a["who"] for a in signature["agent"]]
    assert "Traceback" not in system.bot.log()

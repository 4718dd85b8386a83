"""A request for information in the console, over real HTTP: the dermatologist's own request and the
patient's reply are the case's conversation, and the queue row says that the patient replied
(issue 22, item 8)."""

from __future__ import annotations

import uuid

from clinic_db import review
from clinic_db.models import CaseMessage, ReviewTask
from tests.e2e_support import csrf_token
from tests.test_console_http import World, _login, world  # noqa: F401 - fixture used by name

ASKED = "Please send a close-up next to a ruler."
REPLIED = "Here it is, about 6 mm."


def _row(html: str, task_id: uuid.UUID) -> str:
    start = html.index(f'data-task="{task_id}"')
    return html[start:html.index("</tr>", start)]


def test_the_request_and_the_reply_are_shown_and_the_queue_says_the_patient_replied(world: World) -> None:
    clinic = world.clinic
    rc = world.cases[0]
    ada = _login(world.base, "ada")
    token = csrf_token(ada.get("/console/queue").text)
    assert ada.post(f"/console/tasks/{rc.task_id}/claim", data={"csrf_token": token}).status_code == 303
    r = ada.post(f"/console/tasks/{rc.task_id}/decision",
                 data={"csrf_token": token, "decision": "request_info", "note": ASKED})
    assert r.status_code == 303
    queue = ada.get("/console/queue").text
    assert "waiting for patient" in _row(queue, rc.task_id) and "patient replied" not in _row(queue, rc.task_id)
    page = ada.get(f"/console/tasks/{rc.task_id}").text
    assert "Conversation" in page and ASKED in page.split("<h2>Conversation</h2>", 1)[1]

    # the patient answers (what bot.handlers._answer_info_request writes)
    with clinic.session() as s:  # type: ignore[attr-defined]
        task = s.get(ReviewTask, rc.task_id)
        reply = CaseMessage(case_id=rc.case_id, patient_id=task.case.patient_id, role="patient", flags=["info_reply"])
        reply.ensure_id()
        clinic.vault.set_text(s, reply, "text", REPLIED, owner=task.case.patient_id)  # type: ignore[attr-defined]
        s.add(reply)
        review.patient_replied(s, rc.case_id)
        s.commit()

    row = _row(ada.get("/console/queue").text, rc.task_id)
    assert "patient replied" in row and "waiting for patient" not in row
    conversation = ada.get(f"/console/tasks/{rc.task_id}").text.split("<h2>Conversation</h2>", 1)[1]
    assert conversation.index(ASKED) < conversation.index(REPLIED)  # the request first, then the answer

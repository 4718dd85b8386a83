"""The review console in a real browser (Playwright + Debian chromium against uvicorn).

One dermatologist works through the queue end to end while a colleague with a stale page tries to
take the same case; an admin looks at the service figures. Screenshots go to docs/img/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from sqlalchemy import select

from clinic_db import cases, clinicians, outbox, review
from clinic_db.models import Case, CaseMessage, Clinician, OutboxMessage, ReviewTask
from console import demo
from console.app import build_router
from tests.e2e_support import CHROMIUM, CHROMIUM_ARGS, Worker, pythonpath_env
from tests.support import serve_app
from tests.conftest import service_missing

pytestmark = pytest.mark.browser

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
PASSWORD = "correct horse battery"
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        service_missing("Debian chromium", "not installed at /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def site(clinic) -> Iterator[tuple[str, dict[str, object]]]:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        for username, name, role in (("ada", "Dr. Ada Weber", "dermatologist"),
                                     ("bob", "Dr. Bob Brandt", "dermatologist"), ("ops", "Clinic admin", "admin")):
            clinicians.create(clinic, s, username, display_name=name, role=role, password=PASSWORD)
        routine, urgent, soon = demo.seed_queue(clinic, s)
        # patient-supplied text with markup: must show as text, never run
        cases.set_history(clinic, s, urgent.case, free_text=HOSTILE)
        msg = CaseMessage(case_id=urgent.case.id, patient_id=urgent.patient.id, role="patient", flags=[])
        msg.ensure_id()
        clinic.vault.set_text(s, msg, "text", "Is it dangerous? " + HOSTILE, owner=urgent.patient.id)
        s.add(msg)
        clinic.vault.set_text(s, urgent.patient, "name", "Mia </td><b>Bold</b>")
        s.commit()
        ids = {"routine": routine.task.id, "urgent": urgent.task.id, "soon": soon.task.id,
               "urgent_case": urgent.case.id, "routine_case": routine.case.id}
    app = FastAPI()
    app.include_router(build_router(), prefix="/console")
    with serve_app(app) as base:
        yield base, ids


def _login(browser, base: str, username: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.console_errors = []  # CSP violations and script errors show up here
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.goto(f"{base}/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    return page


def test_review_workflow_in_the_browser(browser, site, clinic) -> None:  # type: ignore[no-untyped-def]
    base, ids = site
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    ada = _login(browser, base, "ada")
    dialogs: list[str] = []
    ada.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    # the queue: most urgent first, overdue highlighted
    assert ada.url.endswith("/console/queue")
    order = ada.locator("tr[data-task]").evaluate_all("rows => rows.map(r => r.dataset.task)")
    assert order == [str(ids["urgent"]), str(ids["soon"]), str(ids["routine"])]
    urgent_row = ada.locator(f"tr[data-task='{ids['urgent']}']")
    assert "overdue" in (urgent_row.get_attribute("class") or "")
    assert "Melanoma" in urgent_row.inner_text()
    ada.screenshot(path=str(DOCS_IMG / "console-queue.png"), full_page=True)

    # a colleague opens the queue now, before Ada claims (his page will be stale)
    bob = _login(browser, base, "bob")
    bob_claim = bob.locator(f"tr[data-task='{ids['urgent']}'] button:has-text('Claim')")
    assert bob_claim.count() == 1

    # Ada claims and lands on the case
    urgent_row.locator("button:has-text('Claim')").click()
    ada.wait_for_url(re.compile(rf"/console/tasks/{ids['urgent']}$"))
    assert ada.get_by_text("preliminary — not a diagnosis").is_visible()
    assert ada.locator("table.differential").inner_text().count("%") == 3
    # hostile patient text is shown literally and nothing ran
    assert HOSTILE in ada.locator("dl.history").inner_text()
    assert "Is it dangerous? " + HOSTILE in ada.locator("ol.messages").inner_text()
    assert ada.locator("main img[src='x']").count() == 0 and ada.locator("main b").count() == 0
    assert "Mia </td><b>Bold</b>" in ada.locator("p.meta").inner_text()
    assert ada.evaluate("window.__pwned") is None and dialogs == []
    # photos load (decrypted on the fly) and are not cacheable
    photo = ada.locator("img[alt='Patient photo 1']")
    assert photo.evaluate("img => img.complete && img.naturalWidth") == 384
    with ada.expect_response(re.compile(r"/console/images/")) as resp_info:
        ada.evaluate("src => fetch(src)", photo.get_attribute("src"))
    assert resp_info.value.headers["cache-control"] == "no-store"
    ada.screenshot(path=str(DOCS_IMG / "console-case.png"), full_page=True)

    # Bob's stale Claim button is refused with a clear message
    bob_claim.click()
    assert bob.locator("p.alert").inner_text() == (
        "Dr. Ada Weber is already reviewing this case. It is not available to you.")

    # Ada amends: searches the vocabulary, picks a condition, sets urgency and recommendation, signs
    ada.check("input[name=decision][value=amend]")
    assert ada.locator("#condition-select").is_visible()
    ada.fill("#condition-search", "nev")
    ada.wait_for_function("() => [...document.querySelectorAll('#condition-select option')]"
                          ".some(o => o.value === 'nevus')")
    ada.select_option("#condition-select", "nevus")
    # the recommendation list follows the urgency: nothing on offer contradicts it
    ada.select_option("select[name=urgency]", "urgent")
    assert ada.eval_on_selector("#recommendation option[value=self_care]", "o => o.disabled")
    assert not ada.eval_on_selector("#recommendation option[value=urgent_in_person]", "o => o.disabled")
    assert ada.get_attribute("input[name=days]", "max") == "1"
    ada.select_option("select[name=urgency]", "routine")
    assert ada.eval_on_selector("#recommendation option[value=urgent_in_person]", "o => o.disabled")
    ada.select_option("#recommendation", "dermatologist_within_days")
    ada.fill("input[name=days]", "30")
    ada.fill("textarea[name=note]", "A benign mole. Have it checked within a month.")
    ada.click("button:has-text('Sign and send')")
    ada.wait_for_url(re.compile(r"/console/queue\?done=signed$"))
    assert ada.console_errors == []
    assert all("409 (Conflict)" in e for e in bob.console_errors)  # only the refused claim itself
    assert "Decision signed" in ada.locator("p.notice").inner_text()
    assert ada.locator(f"tr[data-task='{ids['urgent']}']").count() == 0

    with clinic.session() as s:
        case = s.get(Case, ids["urgent_case"])
        task = s.get(ReviewTask, ids["urgent"])
        assert (case.status, case.condition_code, case.urgency) == ("final", "nevus", "routine")
        assert (task.decision, task.recommendation) == ("amend", "dermatologist_within_days:30")
        final = s.scalar(select(OutboxMessage).where(OutboxMessage.kind == "final"))
        assert outbox.payload(clinic, s, final) == {"case_id": str(case.id), "task_id": str(task.id)}
        # a second signed decision (accepting the routine acne case) so the agreement plot has both outcomes
        ada_row = s.scalar(select(Clinician).where(Clinician.username == "ada"))
        assert review.claim(s, ids["routine"], ada_row.id)
        routine = s.get(ReviewTask, ids["routine"])
        s.refresh(routine)
        review.decide(clinic, s, routine, ada_row, "accept", recommendation="self_care")
        s.commit()

    # the admin sees the service figures with the agreement plot
    ops = _login(browser, base, "ops")
    assert ops.url.endswith("/console/admin")
    assert ops.locator("#waiting-total").inner_text() == "1"
    assert ops.locator("[data-urgency=soon]").inner_text() == "1"
    table = ops.locator("table.agreement-table").inner_text()
    assert "skinbridge-classifier\t1\t1\t50%" in table
    assert ops.locator("svg.agreement rect").count() >= 2 + 2
    assert ops.console_errors == []
    ops.screenshot(path=str(DOCS_IMG / "console-admin.png"), full_page=True)


def test_explanation_pictures_arrive_from_a_worker_and_a_second_sign_off_keeps_the_first(  # type: ignore[no-untyped-def]
        browser, site, clinic, tmp_path, monkeypatch) -> None:
    """A real worker draws the pictures while the page is open; they arrive without a reload, and a second
    sign-off keeps the first one's decisions. Tiny models: the shipped generator takes minutes on a busy CPU."""
    from clinic_db import explainer_review
    from inference.engines.clinical_review import generator_subject
    from inference.vocabulary import load_vocabulary
    from skinbridge.celery_app import app as celery, configure
    from skinbridge.settings import get_settings, reset_settings_cache
    from tests.e2e_support import tiny_model_env

    base, _ = site
    models = tiny_model_env(tmp_path / "models")
    weak = load_vocabulary().classifier_classes()[-1]  # measured below the bar: never sent, never approvable
    recognition = {c: 0.5 if c == weak else 0.9 for c in load_vocabulary().classifier_classes()}
    Path(models["SKINBRIDGE_GENERATOR_PATH"], "metrics.json").write_text(
        json.dumps({"recognition": {"overall": 0.85, "per_class": recognition}}))
    for key, value in models.items():  # the web app and the worker serve the same generator
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    configure(celery, get_settings())  # the page asks workers through this test's broker
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env.update({k: os.environ[k] for k in ("SKINBRIDGE_VAR_DIR", "SKINBRIDGE_DATABASE_URL")}, **models,
               **pythonpath_env())
    worker = Worker(env, tmp_path).start()
    try:
        ada = _login(browser, base, "ada")
        ada.click("nav >> text=Explanation pictures")
        ada.wait_for_url(re.compile(r"/console/explainer$"))
        # the page answers before a single picture exists: one slot per picture, and the progress
        assert "patients get no pictures" in ada.locator("#in-force").inner_text()
        rows = ada.locator("tr[data-code]")
        codes = rows.evaluate_all("rows => rows.map(r => r.dataset.code)")
        assert "nevus" in codes and "seborrheic_keratosis" in codes and weak in codes
        assert ada.locator("td.samples span.slot").count() == 4 * len(codes)
        assert f"0 of {4 * len(codes)}" in ada.locator("#drawing").inner_text()
        # the worker's pictures arrive while the page stays open (no reload: a choice made meanwhile stays)
        ada.check("input[name=decision-nevus][value=approve]")
        ada.wait_for_function("() => document.querySelector('#drawing').classList.contains('done')"
                              " && [...document.querySelectorAll('td.samples img')]"
                              ".every(i => i.complete && i.naturalWidth === 256)", timeout=240_000)
        assert ada.locator("td.samples img").count() == 4 * len(codes)
        assert ada.locator("td.samples span.slot").count() == 0
        assert ada.locator("input[name=decision-nevus][value=approve]").is_checked()
        assert "All " in ada.locator("#drawing").inner_text()
    finally:
        worker.stop()
    # quiet logs: the worker says it is ready, not every periodic task it ran meanwhile
    log = worker.log.read_text()
    assert "ready" in log and "Sending due task" not in log and "deliver_subscriptions" not in log
    # below the bar: never sent, so approval is not offered
    assert ada.locator(f"input[name=decision-{weak}][value=approve]").is_disabled()
    assert "never sent" in ada.locator(f"tr[data-code={weak}]").inner_text()
    below = [weak]

    ada.check("input[name=decision-seborrheic_keratosis][value=reject]")
    ada.fill("input[name=reason-seborrheic_keratosis]", "grey texture, not a keratosis")
    ada.click("button:has-text('Sign off')")
    ada.wait_for_url(re.compile(r"/console/explainer\?done=signed$"))
    assert "Sign-off recorded" in ada.locator("p.notice").inner_text()
    assert ada.locator("tr[data-code=nevus] td.state").inner_text() == "approved"
    assert "grey texture" in ada.locator("tr[data-code=seborrheic_keratosis] td.state").inner_text()
    assert "Dr. Ada Weber" in ada.locator("#in-force").inner_text()

    # signing again: the form starts from the decisions in force, so adding one approval keeps the others
    assert ada.locator("input[name=decision-nevus][value=approve]").is_checked()
    assert ada.locator("input[name=decision-seborrheic_keratosis][value=reject]").is_checked()
    assert ada.input_value("input[name=reason-seborrheic_keratosis]") == "grey texture, not a keratosis"
    more = next(c for c in codes if c not in below and c not in ("nevus", "seborrheic_keratosis"))
    ada.check(f"input[name=decision-{more}][value=approve]")
    ada.click("button:has-text('Sign off')")
    ada.wait_for_url(re.compile(r"/console/explainer\?done=signed$"))
    assert ada.console_errors == []
    with clinic.session() as s:
        subject = generator_subject(models["SKINBRIDGE_GENERATOR_PATH"])
        assert explainer_review.approved_codes(s, subject) == {"nevus", more}
        assert explainer_review.in_force(s, subject).rejected == {
            "seborrheic_keratosis": "grey texture, not a keratosis"}

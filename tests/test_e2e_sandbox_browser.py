"""A patient consults through the sandbox chat page in a real browser, with the real bot and worker behind it.

Playwright drives Debian's chromium against the emulator's page; ``skinbridge bot`` and a Celery
worker with tiny models run as processes on this test's database. The screenshots it saves are
the ones docs/bot.md shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.i18n import t
from clinic_db import patients
from clinic_db.models import Case, CaseMessage
from clinic_db.states import CaseStatus
from tests.e2e_support import CHROMIUM, CHROMIUM_ARGS, HISTORY, System, dermnet_photos, running_system, tiny_model_env
from tests.conftest import service_missing

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
PIPELINE_MS = 180_000  # worker start (torch import, tiny models) plus the chain, on a busy 2-core machine
MAX_SCREENSHOT_PX = 8000


@pytest.fixture
def system(clinic, tmp_path: Path) -> Iterator[System]:  # type: ignore[no-untyped-def]
    if not CHROMIUM.exists():
        service_missing("Debian chromium", "not installed at /usr/bin/chromium (apt-get install chromium)")
    with running_system(tmp_path, tiny_model_env(tmp_path / "models", clinic), web=False) as running:
        yield running


def test_consultation_in_the_sandbox_page(clinic, system: System, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    photos = dermnet_photos(shared_data, "melanocytic-naevus/3152.jpg", "melanocytic-naevus/3154.jpg")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 440, "height": 900})
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(system.emulator + "/")
            user_id = int(page.locator("#user-id").inner_text())
            bot_says = lambda text: page.locator("li.msg.bot", has_text=text).last  # noqa: E731

            # consent
            page.fill("#first-name", "Mia")
            page.fill("#text", "/start")
            page.click("#send")
            bot_says("Do you agree?").get_by_role("button", name=t("en", "start.accept")).click()
            expect(bot_says(t("en", "start.accepted"))).to_be_visible()

            # two real photos picked at once: one album
            page.set_input_files("#files", [str(path) for path in photos])
            expect(page.locator("li.msg.user[data-kind=media_group] .album img")).to_have_count(2)
            saved = bot_says("2 photos saved")
            saved.get_by_role("button", name=t("en", "photo.continue")).click()

            # the history questions, answered with the inline buttons
            for field, value in HISTORY.items():
                question = bot_says(t("en", f"history.q.{field}"))
                question.get_by_role("button", name=t("en", f"history.a.{value}"), exact=True).click()
                expect(question.get_by_role("button")).to_have_count(0)  # answered: the keyboard is gone
            expect(bot_says(t("en", "history.done"))).to_be_visible()

            # the worker's result: one progress message edited to "ready", the text, the AI-generated images
            result = page.locator("li.msg.bot[data-kind=text]", has_text=t("en", "result.title").upper())
            expect(result).to_be_visible(timeout=PIPELINE_MS)
            expect(result).to_contain_text("NOT a diagnosis")
            ready = bot_says(t("en", "progress.ready"))
            expect(ready).to_contain_text("edited")
            for stage in ("received", "analysing"):
                expect(page.locator("li.msg.bot", has_text=t("en", f"progress.{stage}"))).to_have_count(0)
            captions = page.locator("li.msg.bot[data-kind=media_group] figcaption")
            expect(captions).to_have_count(2)
            for i in range(2):
                expect(captions.nth(i)).to_contain_text("AI-generated example of")
            examples = page.locator("li.msg.bot[data-kind=media_group] img")
            for i in range(2):
                page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                       arg=examples.nth(i).element_handle())
            expect(result.get_by_role("button", name=t("en", "button.doctor"))).to_be_visible()
            assert page_errors == []

            # the case the page created is in the clinic's database, analysed
            with clinic.session() as session:
                patient = patients.find_by_telegram(clinic, session, user_id)
                assert patient is not None and patient.has_consent
                case = session.scalars(select(Case).where(Case.patient_id == patient.id)).one()
                assert case.status in (CaseStatus.preliminary.value, CaseStatus.in_review.value)
                assert len(case.images) == 2 and len(case.explanation_images) == 2

            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            result.screenshot(path=str(DOCS_IMG / "bot-result.png"))
            page.locator("li.msg.bot[data-kind=media_group]").screenshot(path=str(DOCS_IMG / "bot-examples.png"))
            # a tall screenshot of the whole conversation: grow the window until the chat needs no scrolling
            extra = page.eval_on_selector("#chat", "chat => chat.scrollHeight - chat.clientHeight")
            page.set_viewport_size({"width": 440, "height": min(MAX_SCREENSHOT_PX, 900 + int(extra))})
            page.eval_on_selector("#chat", "chat => { chat.scrollTop = 0; }")
            page.screenshot(path=str(DOCS_IMG / "sandbox-consultation.png"))
        finally:
            browser.close()


def test_german_patient_in_the_sandbox_page(clinic, system: System, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    """A German-speaking patient: every message in German, a note typed between the questions is kept
    and acknowledged, the result has one timeframe, one disclaimer and no internal code."""
    from playwright.sync_api import expect, sync_playwright

    photo = dermnet_photos(shared_data, "melanocytic-naevus/3152.jpg")[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 440, "height": 900})
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(system.emulator + "/")
            page.select_option("#language", "de")
            bot_says = lambda text: page.locator("li.msg.bot", has_text=text).last  # noqa: E731

            page.fill("#first-name", "Lena")
            page.fill("#text", "/start")
            page.click("#send")
            bot_says("Sind Sie einverstanden?").get_by_role("button", name=t("de", "start.accept")).click()
            expect(bot_says(t("de", "start.accepted"))).to_be_visible()

            page.set_input_files("#files", [str(photo)])
            bot_says("Foto gespeichert").get_by_role("button", name=t("de", "photo.continue")).click()
            fields = list(HISTORY.items())
            for i, (field, value) in enumerate(fields):
                question = bot_says(t("de", f"history.q.{field}"))
                if i == 1:  # the patient types instead of tapping: kept as a note, and the question comes again
                    page.fill("#text", "Es ist am linken Unterarm und juckt nachts.")
                    page.click("#send")
                    expect(bot_says(t("de", "note.saved_history"))).to_be_visible()
                    expect(page.locator("li.msg.bot", has_text=t("de", f"history.q.{field}"))).to_have_count(2)
                question.get_by_role("button", name=t("de", f"history.a.{value}"), exact=True).click()
                expect(question.get_by_role("button")).to_have_count(0)
            expect(bot_says(t("de", "history.done"))).to_be_visible()

            result = page.locator("li.msg.bot[data-kind=text]", has_text=t("de", "result.title").upper())
            expect(result).to_be_visible(timeout=PIPELINE_MS)
            text = result.inner_text()
            assert text.count("KEINE Diagnose") == 1
            assert "_" not in text and "Most likely" not in text  # no internal code, nothing in English
            assert "Am wahrscheinlichsten:" in text or "nächstliegende Vermutung" in text
            expect(result.get_by_role("button", name=t("de", "button.doctor"))).to_be_visible()
            assert page_errors == []
            with clinic.session() as session:  # the note is on the case, encrypted
                case = session.scalars(select(Case)).one()
                notes = session.scalars(select(CaseMessage).where(CaseMessage.case_id == case.id,
                                                                  CaseMessage.role == "patient")).all()
                assert notes and b"Unterarm" not in notes[0].text_enc
                assert clinic.vault.get_text(session, notes[0], "text", owner=case.patient_id).startswith("Es ist")
        finally:
            browser.close()

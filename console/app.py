"""The dermatologist review console: server-rendered pages on one FastAPI router.

Mounted by the web app at ``/console``. Every page needs a logged-in clinician; review pages need
the dermatologist role, the service page the admin role. Every POST carries the session's CSRF
token. Patient data is decrypted per request and never written to disk; each read is audited.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.render import action_text
from clinic_db import audit, cases, clinicians, explainer_review, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.models import AIResult, Case, CaseMessage, Clinician, ExplanationImage, Image, ReviewTask, utcnow
from console import conditions, explainer_pictures, stats
from console.labels import HISTORY_LABELS, reason_label, status_label
from inference.engines.limits import classifier_limits
from skinbridge.settings import get_settings
from console.security import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    ConsoleSession,
    SecureRoute,
    check_csrf,
    check_login_csrf,
    cookie_path,
    end_session,
    load_session,
    login_csrf,
    set_cookie,
    start_session,
)

HERE = Path(__file__).resolve().parent
STATIC_FILES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
LANG = "en"

RECOMMENDATIONS = {
    "self_care": "Self-care (advice only)",
    "see_gp": "See a general practitioner",
    "dermatologist_within_days": "See a dermatologist within N days",
    "urgent_in_person": "Urgent in-person assessment",
}
WAIT_FILTERS = {"": 0, "4h": 4, "24h": 24, "72h": 72}
LOGIN_MESSAGES = {
    "bad_credentials": "Wrong username or password.",
    "inactive": "Wrong username or password.",
    "totp_required": "Enter the 6-digit code from your authenticator app.",
    "bad_totp": "The authenticator code is wrong or expired.",
}


def _hours_since(then: datetime, now: datetime) -> str:
    hours = (now - then).total_seconds() / 3600
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.1f} d"


def _fmt(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC") if when else "—"


_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
_env.filters["when"] = _fmt
_env.filters["condition"] = lambda code: conditions.label(code, LANG)
_env.filters["reason"] = reason_label
_env.filters["status"] = status_label
_env.filters["pct"] = lambda p: f"{float(p):.0%}" if p is not None else "—"
# measured shares next to a bar: 79.7 % must not read as "80 %, below the 80 % bar"
_env.filters["pct1"] = lambda p: f"{float(p):.1%}" if p is not None else "—"


@contextmanager
def _db() -> Iterator[tuple[Clinic, Session]]:
    clinic = get_clinic()
    with clinic.session() as session:
        yield clinic, session


def _url(request: Request, name: str, **params: Any) -> str:
    return request.url_for(name, **{k: str(v) for k, v in params.items()}).path


def _render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(url=lambda name, **p: _url(request, name, **p), **context)
    return HTMLResponse(html, status_code=status)


def _require(request: Request, session: Session, role: str | None = "dermatologist") -> ConsoleSession:
    """The request's session, or a redirect to the login page; 403 for the wrong role."""
    current = load_session(session, request)
    if current is None:
        raise HTTPException(303, "log in first", headers={"Location": _url(request, "login_form")})
    if role is not None and current.clinician.role != role:
        audit.record(session, Actor("clinician", str(current.clinician.id)), "console.access", "Console",
                     request.url.path, outcome="denied", purpose="operations")
        session.commit()
        raise HTTPException(403, f"this page is for the {role} role")
    return current


def _task(session: Session, task_id: uuid.UUID) -> ReviewTask:
    task = session.get(ReviewTask, task_id)
    if task is None:
        raise HTTPException(404, "no such review task")
    return task


def build_router() -> APIRouter:
    router = APIRouter(route_class=SecureRoute, include_in_schema=False)

    # --- static assets (no inline script or style: the CSP forbids them) ----------------------
    @router.get("/static/{asset}", name="console_static")
    def static(asset: str) -> Response:
        if asset not in STATIC_FILES:  # a fixed list: no path traversal possible
            raise HTTPException(404)
        return Response((HERE / "static" / asset).read_bytes(), media_type=STATIC_FILES[asset],
                        headers={"Cache-Control": "private, max-age=300"})

    # --- login / logout -------------------------------------------------------------------
    def _login_page(request: Request, status: int = 200, message: str | None = None,
                    username: str = "", need_totp: bool = False) -> HTMLResponse:
        nonce, token = login_csrf(request)
        response = _render(request, "login.html", status, csrf=token, message=message, username=username,
                           need_totp=need_totp, me=None)
        set_cookie(request, response, LOGIN_COOKIE, nonce, max_age=3600)
        return response

    @router.get("/login", name="login_form")
    def login_form(request: Request) -> Response:
        with _db() as (_, session):
            if load_session(session, request) is not None:
                return RedirectResponse(_url(request, "home"), 303)
        return _login_page(request)

    @router.post("/login", name="login")
    def login(
        request: Request,
        username: str = Form(""),
        password: str = Form(""),
        totp: str = Form(""),
        csrf_token: str | None = Form(None),
    ) -> Response:
        check_login_csrf(request, csrf_token)
        with _db() as (clinic, session):
            result = clinicians.verify(clinic, session, username, password, totp or None)
            if not result.ok:
                session.commit()  # failures count towards the lockout
                if result.reason == "locked":
                    until = result.locked_until.strftime("%H:%M UTC") if result.locked_until else "later"
                    return _login_page(request, 423, f"Too many failed attempts: this account is locked until "
                                                     f"{until}.", username)
                return _login_page(request, 401, LOGIN_MESSAGES[result.reason], username,
                                   need_totp=result.reason in ("totp_required", "bad_totp"))
            assert result.clinician is not None
            token, _ = start_session(session, result.clinician)
            session.commit()
        response = RedirectResponse(_url(request, "home"), 303)
        set_cookie(request, response, SESSION_COOKIE, token)
        response.delete_cookie(LOGIN_COOKIE, path=cookie_path(request))
        return response

    @router.post("/logout", name="logout")
    def logout(request: Request, csrf_token: str | None = Form(None)) -> Response:
        with _db() as (_, session):
            current = _require(request, session, role=None)
            check_csrf(current, csrf_token)
            end_session(session, current)
            audit.record(session, Actor("clinician", str(current.clinician.id)), "auth.logout", "Clinician",
                         current.clinician.id, purpose="operations")
            session.commit()
        response = RedirectResponse(_url(request, "login_form"), 303)
        response.delete_cookie(SESSION_COOKIE, path=cookie_path(request))
        return response

    @router.get("/", name="home")
    def home(request: Request) -> Response:
        with _db() as (_, session):
            current = _require(request, session, role=None)
            target = "admin_page" if current.clinician.role == "admin" else "queue_page"
        return RedirectResponse(_url(request, target), 303)

    # --- the queue -------------------------------------------------------------------------
    def _queue_page(request: Request, session: Session, current: ConsoleSession, *, reason: str = "",
                    status: str = "", condition: str = "", waited: str = "", message: str | None = None,
                    notice: str | None = None, http_status: int = 200) -> HTMLResponse:
        now = utcnow()
        tasks = review.queue(session, now=now)
        all_reasons = sorted({r for t in tasks for r in t.reasons})
        all_conditions = sorted({t.case.condition_code for t in tasks if t.case.condition_code})
        min_wait = timedelta(hours=WAIT_FILTERS.get(waited, 0))
        shown = [
            t for t in tasks
            if (not reason or reason in t.reasons)
            and (not status or t.status == status)
            and (not condition or t.case.condition_code == condition)
            and now - t.created_at >= min_wait
        ]
        names = {c.id: c.display_name for c in session.scalars(
            select(Clinician).where(Clinician.id.in_({t.claimed_by for t in shown if t.claimed_by})))}
        rows = [{
            "task": t,
            "case": t.case,
            "overdue": review.overdue(t, now),
            "waiting": _hours_since(t.created_at, now),
            "mine": review.holds_claim(t, current.clinician.id, now) or (
                t.status == "waiting_patient" and t.claimed_by == current.clinician.id),
            "claimed_by": names.get(t.claimed_by) if t.claimed_by and (
                t.claim_expires_at is None or t.claim_expires_at > now) else None,
        } for t in shown]
        counts = {u: sum(1 for t in tasks if t.urgency == u) for u in review.URGENCY_PRIORITY}
        return _render(
            request, "queue.html", http_status, me=current.clinician, csrf=current.csrf, rows=rows,
            total=len(tasks), counts=counts, overdue_count=sum(1 for t in tasks if review.overdue(t, now)),
            reasons=all_reasons, conditions=all_conditions, wait_filters=[k for k in WAIT_FILTERS if k],
            f={"reason": reason, "status": status, "condition": condition, "waited": waited},
            message=message, notice=notice,
        )

    @router.get("/queue", name="queue_page")
    def queue_page(request: Request, reason: str = "", status: str = "", condition: str = "",
                   waited: str = "", done: str = "") -> Response:
        notices = {"signed": "Decision signed; the patient will be notified.",
                   "requested": "Request sent to the patient; the case will come back to you.",
                   "released": "Case released to the queue."}
        with _db() as (_, session):
            current = _require(request, session)
            return _queue_page(request, session, current, reason=reason, status=status, condition=condition,
                               waited=waited, notice=notices.get(done))

    @router.post("/tasks/{task_id}/claim", name="claim_task")
    def claim_task(request: Request, task_id: uuid.UUID, csrf_token: str | None = Form(None)) -> Response:
        with _db() as (_, session):
            current = _require(request, session)
            check_csrf(current, csrf_token)
            task = _task(session, task_id)
            if review.claim(session, task.id, current.clinician.id):
                return RedirectResponse(_url(request, "case_page", task_id=task.id), 303)
            session.refresh(task)
            holder = session.get(Clinician, task.claimed_by) if task.claimed_by else None
            if task.status == "open" and holder is not None:
                message = f"{holder.display_name} is already reviewing this case. It is not available to you."
            else:
                message = "This case can no longer be claimed (it was decided or is waiting for the patient)."
            return _queue_page(request, session, current, message=message, http_status=409)

    @router.post("/tasks/{task_id}/release", name="release_task")
    def release_task(request: Request, task_id: uuid.UUID, csrf_token: str | None = Form(None)) -> Response:
        with _db() as (_, session):
            current = _require(request, session)
            check_csrf(current, csrf_token)
            review.release(session, _task(session, task_id).id, current.clinician.id)
        return RedirectResponse(_url(request, "queue_page") + "?done=released", 303)

    # --- the case view ---------------------------------------------------------------------
    def _case_page(request: Request, clinic: Clinic, session: Session, current: ConsoleSession, task: ReviewTask,
                   *, error: str | None = None, form: dict[str, str] | None = None,
                   http_status: int = 200) -> HTMLResponse:
        now = utcnow()
        case: Case = task.case
        owner = case.patient_id
        vault = clinic.vault
        patient = case.patient
        ai = []
        limits = classifier_limits(get_settings().classifier_path)
        for result in sorted(case.ai_results, key=lambda r: r.created_at, reverse=True):
            ai.append({
                "row": result,
                "differential": vault.get_json(session, result, "differential", owner=owner) or [],
                "description": vault.get_text(session, result, "description", owner=owner),
                "has_saliency": result.saliency_enc is not None,
                # the known limits of exactly these weights (none for a model whose numbers we do not have)
                "limits": limits["lines"] if limits and result.engine == "classifier"
                and result.weights_sha256 == limits["weights_sha256"] else [],
            })
        messages = [
            {"role": m.role, "at": m.created_at, "text": vault.get_text(session, m, "text", owner=owner)}
            for m in session.scalars(select(CaseMessage).where(CaseMessage.case_id == case.id)
                                     .order_by(CaseMessage.created_at))
        ]
        earlier = []
        for other in session.scalars(select(Case).where(Case.patient_id == owner, Case.id != case.id)
                                     .order_by(Case.created_at.desc())):
            last_task = other.review_tasks[-1] if other.review_tasks else None
            earlier.append({"case": other, "task": last_task})
        holder = session.get(Clinician, task.claimed_by) if task.claimed_by else None
        decider = session.get(Clinician, task.decided_by) if task.decided_by else None
        differential_codes = [d["code"] for a in ai for d in a["differential"]]
        note = vault.get_text(session, task, "note", owner=owner) if task.note_enc else None
        audit.record(session, Actor("clinician", str(current.clinician.id)), "case.view", "Case", case.id,
                     purpose="treatment", task=str(task.id))
        session.commit()
        top = ai[0]["row"].top_condition_code if ai else case.condition_code
        default_form = {
            "decision": "accept" if top else "amend",
            "condition_code": top or "",
            "urgency": case.urgency,
            "recommendation": "",
            # a number of days that fits the urgency (review.WITHIN_DAYS_BY_URGENCY)
            "days": str(review.WITHIN_DAYS_BY_URGENCY.get(case.urgency or "", (1, 1))[1]) if case.urgency != "routine"
            else "14",
            "note": "",
        }
        return _render(
            request, "case.html", http_status, me=current.clinician, csrf=current.csrf, task=task, case=case,
            patient=patient, patient_name=vault.get_text(session, patient, "name"),
            history=cases.history(clinic, session, case), history_labels=HISTORY_LABELS,
            ai=ai, messages=messages, earlier=earlier, holder=holder, decider=decider, note=note,
            images=case.images, explanations=case.explanation_images,
            mine=review.holds_claim(task, current.clinician.id, now), overdue=review.overdue(task, now),
            holder_active=holder is not None and (task.claim_expires_at is None or task.claim_expires_at > now),
            options=conditions.options(differential_codes + [case.condition_code or ""], LANG),
            vocabulary=conditions.available(), urgencies=list(review.URGENCY_PRIORITY),
            recommendations=RECOMMENDATIONS, error=error, form=default_form | (form or {}),
            # which recommendation fits which urgency: the form offers only those (console.js), decide() checks
            fits={key: review.RECOMMENDATION_URGENCIES.get(key, tuple(review.WITHIN_DAYS_BY_URGENCY))
                  for key in RECOMMENDATIONS},
            days_by_urgency=review.WITHIN_DAYS_BY_URGENCY,
            decided_action=action_text(LANG, task.decision_urgency, task.recommendation)
            if task.status == "decided" and task.recommendation else None,
        )

    @router.get("/tasks/{task_id}", name="case_page")
    def case_page(request: Request, task_id: uuid.UUID) -> Response:
        with _db() as (clinic, session):
            current = _require(request, session)
            return _case_page(request, clinic, session, current, _task(session, task_id))

    @router.post("/tasks/{task_id}/decision", name="decide_task")
    def decide_task(
        request: Request,
        task_id: uuid.UUID,
        csrf_token: str | None = Form(None),
        decision: str = Form(""),
        condition_code: str = Form(""),
        urgency: str = Form(""),
        recommendation: str = Form(""),
        days: str = Form(""),
        note: str = Form(""),
    ) -> Response:
        with _db() as (clinic, session):
            current = _require(request, session)
            check_csrf(current, csrf_token)
            task = _task(session, task_id)
            rec = f"{review.WITHIN_DAYS_PREFIX}{days.strip()}" if recommendation == "dermatologist_within_days" \
                else recommendation
            try:
                review.decide(clinic, session, task, current.clinician, decision,
                              condition_code=condition_code or None, urgency=urgency or None,
                              recommendation=rec or None, note=note)
            except review.DecisionError as exc:
                session.rollback()
                form = {"decision": decision, "condition_code": condition_code, "urgency": urgency,
                        "recommendation": recommendation, "days": days, "note": note}
                status = 409 if exc.code == "not_claimed" else 400
                return _case_page(request, clinic, session, current, _task(session, task_id), error=str(exc),
                                  form=form, http_status=status)
            session.commit()
        done = "requested" if decision == "request_info" else "signed"
        return RedirectResponse(_url(request, "queue_page") + f"?done={done}", 303)

    @router.get("/conditions", name="condition_search")
    def condition_search(request: Request, q: str = Query("", max_length=100)) -> Response:
        with _db() as (_, session):
            _require(request, session)
        return JSONResponse([{"code": c.code, "name": c.name} for c in conditions.search(q, LANG)])

    # --- images: decrypted per request, never cached --------------------------------------
    def _image_response(data: bytes, mime: str) -> Response:
        return Response(data, media_type=mime, headers={"Cache-Control": "no-store", "Pragma": "no-cache",
                                                        "Content-Disposition": "inline"})

    @router.get("/images/{image_id}", name="case_image")
    def case_image(request: Request, image_id: uuid.UUID) -> Response:
        with _db() as (clinic, session):
            current = _require(request, session)
            image = session.get(Image, image_id)
            if image is None:
                raise HTTPException(404)
            data = cases.image_bytes(clinic, session, image, Actor("clinician", str(current.clinician.id)))
            session.commit()
            return _image_response(data, image.mime)

    @router.get("/saliency/{result_id}", name="saliency_image")
    def saliency_image(request: Request, result_id: uuid.UUID) -> Response:
        with _db() as (clinic, session):
            current = _require(request, session)
            result = session.get(AIResult, result_id)
            if result is None or result.saliency_enc is None:
                raise HTTPException(404)
            data = clinic.vault.decrypt(session, result, "saliency", owner=result.case.patient_id)
            audit.record(session, Actor("clinician", str(current.clinician.id)), "saliency.read", "AIResult",
                         result.id, case=str(result.case_id))
            session.commit()
            assert data is not None
            return _image_response(data, "image/png")

    @router.get("/explanations/{image_id}", name="explanation_image")
    def explanation_image(request: Request, image_id: uuid.UUID) -> Response:
        with _db() as (clinic, session):
            current = _require(request, session)
            row = session.get(ExplanationImage, image_id)
            if row is None:
                raise HTTPException(404)
            data = clinic.vault.decrypt(session, row, "data")
            audit.record(session, Actor("clinician", str(current.clinician.id)), "explanation.read",
                         "ExplanationImage", row.id, case=str(row.case_id))
            session.commit()
            assert data is not None
            return _image_response(data, row.mime)

    # --- explanation pictures: the dermatologist's sign-off ---------------------------------
    # Pictures are drawn by a gpu worker (console.explainer_pictures); the page answers at once and
    # console.js fills them in as they arrive. The form starts from the sign-off in force, so signing
    # again never silently withdraws an earlier decision.
    def _explainer_page(request: Request, session: Session, current: ConsoleSession, *,
                        message: str | None = None, notice: str | None = None, form: dict[str, str] | None = None,
                        http_status: int = 200) -> HTMLResponse:
        explainer = explainer_pictures.current_explainer()
        rows, in_force, digest, progress = [], None, "", None
        if explainer is not None:
            subject = explainer.review_subject
            digest = explainer_pictures.subject_digest(explainer)
            in_force = explainer_review.in_force(session, subject)
            progress = explainer_pictures.drawing(session, explainer)
            recognition = getattr(explainer, "recognition", None) or {}
            decided = form if form is not None else _decisions_in_force(in_force, explainer)
            for code in subject.codes:
                offered = explainer.knows(code)
                state = ("rejected" if in_force and code in in_force.rejected else
                         "not offered" if not offered else  # never "approved" beside "never sent"
                         "approved" if in_force and code in in_force.approved else "not reviewed")
                rows.append({
                    "code": code, "offered": offered, "recognition": recognition.get(code), "state": state,
                    "reason": (in_force.rejected.get(code) if in_force else None),
                    "drawn": progress.counts.get(code, 0),
                    "decision": decided.get(f"decision-{code}", ""), "why": decided.get(f"reason-{code}", ""),
                })
        audit.record(session, Actor("clinician", str(current.clinician.id)), "explainer.view", "Console",
                     None, purpose="operations")
        session.commit()
        return _render(
            request, "explainer.html", http_status, me=current.clinician, csrf=current.csrf, explainer=explainer,
            rows=rows, in_force=in_force, digest=digest, history=explainer_review.history(session),
            min_recognition=getattr(explainer, "min_recognition", None), progress=progress,
            per_condition=explainer_review.REVIEW_PICTURES, message=message, notice=notice,
        )

    def _decisions_in_force(in_force: Any, explainer: Any) -> dict[str, str]:
        """The form's starting point: the decisions in force (an approval below the bar is not offered)."""
        if in_force is None:
            return {}
        decided = {f"decision-{c}": "approve" for c in in_force.approved if explainer.knows(c)}
        for code, why in in_force.rejected.items():
            decided |= {f"decision-{code}": "reject", f"reason-{code}": str(why)}
        return decided

    @router.get("/explainer", name="explainer_page")
    def explainer_page(request: Request, done: str = "") -> Response:
        with _db() as (_, session):
            current = _require(request, session)
            notice = "Sign-off recorded; it applies to the next results." if done == "signed" else None
            return _explainer_page(request, session, current, notice=notice)

    @router.get("/explainer/progress/{digest}", name="explainer_progress")
    def explainer_progress(request: Request, digest: str) -> Response:
        """How many pictures are drawn (polled by console.js); 409 once the generator changed."""
        with _db() as (_, session):
            _require(request, session)
            explainer = explainer_pictures.current_explainer()
            if explainer is None or digest != explainer_pictures.subject_digest(explainer):
                return JSONResponse({"problem": "The explanation generator changed: reload the page."}, 409)
            return JSONResponse(explainer_pictures.drawing(session, explainer).as_json(),
                                headers={"Cache-Control": "no-store"})

    @router.get("/explainer/pictures/{digest}/{code}/{index}", name="explainer_picture")
    def explainer_picture(request: Request, digest: str, code: str, index: int) -> Response:
        with _db() as (_, session):
            _require(request, session)
            png = explainer_review.picture(session, digest, code, index)
        if png is None:
            raise HTTPException(404, "not drawn (yet)")
        # keyed by the digest: these bytes never change
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @router.post("/explainer/review", name="explainer_review")
    async def explainer_review_post(request: Request) -> Response:
        data = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        return await run_in_threadpool(_sign_off, request, data)

    def _sign_off(request: Request, data: dict[str, str]) -> Response:
        with _db() as (_, session):
            current = _require(request, session)
            check_csrf(current, data.get("csrf_token"))
            explainer = explainer_pictures.current_explainer()
            if explainer is None:
                raise HTTPException(404, "no explanation generator is configured")
            if data.get("subject") != explainer_pictures.subject_digest(explainer):
                return _explainer_page(request, session, current, http_status=409, message=(
                    "The explanation generator changed since this page was loaded (new weights or settings). "
                    "Look at its pictures again before signing off."))
            codes = explainer.review_subject.codes
            decisions = {c: data.get(f"decision-{c}", "") for c in codes}
            approve = [c for c, d in decisions.items() if d == "approve"]
            reject = {c: data.get(f"reason-{c}", "").strip() for c, d in decisions.items() if d == "reject"}
            try:
                explainer_review.record(session, current.clinician, explainer.review_subject,
                                        explainer_id=explainer.model_id, approve=approve, reject=reject,
                                        below_bar=[c for c in codes if not explainer.knows(c)])
            except explainer_review.ReviewError as exc:
                session.rollback()
                labels = ", ".join(conditions.label(c, LANG) for c in getattr(exc, "codes", []))
                if isinstance(exc, explainer_review.MissingReason):
                    message = f"Say why the pictures are not fit to show: {labels}."
                elif isinstance(exc, explainer_review.BelowBar):
                    bar = getattr(explainer, "min_recognition", None)
                    message = (f"{labels}: the classifier recognised too few of these pictures (below the "
                               f"{bar:.0%} bar), so patients never get them and they cannot be approved. "
                               "Choose \"not fit\" or \"no decision\".")
                else:
                    message = str(exc)
                return _explainer_page(request, session, current, http_status=400, message=message, form=data)
            session.commit()
        return RedirectResponse(_url(request, "explainer_page") + "?done=signed", 303)

    # --- service figures (admin) ----------------------------------------------------------
    @router.get("/admin", name="admin_page")
    def admin_page(request: Request) -> Response:
        with _db() as (_, session):
            current = _require(request, session, role="admin")
            figures = stats.compute(session)
            audit.record(session, Actor("clinician", str(current.clinician.id)), "console.admin", "Console",
                         None, purpose="operations")
            session.commit()
            return _render(request, "admin.html", me=current.clinician, csrf=current.csrf, s=figures,
                           bars=stats.agreement_bars(figures.agreement))

    return router

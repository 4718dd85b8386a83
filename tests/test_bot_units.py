"""Bot building blocks on a real database: locales, sealed persistence, update dedup, rate limit."""

from __future__ import annotations

import asyncio
import json
import string

from sqlalchemy import select

from bot.app import UserRateLimit
from bot.i18n import LOCALE_DIR, catalog, pick_language, t
from bot.persistence import NS_CONV, NS_USER, SqlPersistence
from bot.render import likelihood
from clinic_db.models import KeyValue


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_locales_share_one_key_set_and_placeholders() -> None:
    files = sorted(p.stem for p in LOCALE_DIR.glob("*.json"))
    assert files == ["de", "en"]
    en, de = catalog("en"), catalog("de")
    assert set(en) == set(de)
    for key in en:
        assert en[key].strip() and de[key].strip(), key
        assert _fields(en[key]) == _fields(de[key]), key
    assert en["start.accept"] != de["start.accept"]  # really translated, not copied


def test_language_follows_the_telegram_client() -> None:
    assert pick_language("de-AT") == "de"
    assert pick_language("en-GB") == "en"
    assert pick_language("fr") == "en"
    assert pick_language(None) == "en"
    assert "KEINE Diagnose" in t("de", "result.disclaimer")


def test_likelihood_words() -> None:
    assert likelihood("en", 0.9) == "very likely"
    assert likelihood("en", 0.55) == "likely"
    assert likelihood("en", 0.3) == "possible"
    assert likelihood("de", 0.01) == "unwahrscheinlich"


def test_persistence_round_trip_is_sealed(clinic) -> None:  # type: ignore[no-untyped-def]
    user_id = 777000111
    data = {"step": "history", "case_id": "c0ffee", "q": 3, "note": "itchy mole on back"}

    async def write() -> None:
        p = SqlPersistence(clinic)
        await p.update_user_data(user_id, data)
        await p.update_conversation("case", (user_id, user_id), "PHOTOS")

    asyncio.run(write())
    with clinic.session() as session:
        rows = session.scalars(select(KeyValue).where(KeyValue.namespace.in_([NS_USER, NS_CONV]))).all()
        assert len(rows) == 2
        for row in rows:
            raw = row.key.encode() + (row.value_enc or b"") + json.dumps(row.value).encode()
            assert str(user_id).encode() not in raw  # neither the Telegram id ...
            assert b"itchy" not in raw and b"PHOTOS" not in raw  # ... nor the state is readable

    async def read() -> tuple[dict, dict]:
        p = SqlPersistence(clinic)  # a fresh process after a restart
        return await p.get_user_data(), await p.get_conversations("case")

    users, conversations = asyncio.run(read())
    assert users == {user_id: data}
    assert conversations == {(user_id, user_id): "PHOTOS"}

    async def clear() -> None:
        p = SqlPersistence(clinic)
        await p.update_user_data(user_id, {})  # emptied state leaves no row
        await p.update_conversation("case", (user_id, user_id), None)

    asyncio.run(clear())
    with clinic.session() as session:
        assert session.scalars(select(KeyValue).where(KeyValue.namespace.in_([NS_USER, NS_CONV]))).all() == []


def test_user_rate_limit_warns_once_per_window() -> None:
    limit = UserRateLimit(limit=20, window_s=60)
    results = [limit.allow(1, now=100.0 + i * 0.1) for i in range(23)]
    assert all(ok for ok, _ in results[:20])
    assert results[20] == (False, True)
    assert results[21] == (False, False) and results[22] == (False, False)
    assert limit.allow(2, now=102.0) == (True, False)  # other users are not affected
    assert limit.allow(1, now=161.0)[0]  # the window moved on


def test_result_says_when_a_dermatologist_already_reviews_the_case() -> None:
    from bot.render import result_text

    differential = [{"code": "nevus", "probability": 0.6}, {"code": "melanoma", "probability": 0.2}]
    queued = result_text("en", differential, "urgent", in_review=True)
    plain = result_text("en", differential, "routine")
    assert "A dermatologist will also look at your case" in queued
    assert "A dermatologist will also look at your case" not in plain
    assert "NOT a diagnosis" in queued and "NOT a diagnosis" in plain
    assert "zusätzlich an" in result_text("de", differential, "urgent", in_review=True)

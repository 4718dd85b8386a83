"""PHI at rest: nothing planted shows in a raw dump; tampering and moving ciphertexts fail loudly;
key rotation keeps every record readable without the old key; erasure crypto-shreds one patient."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select, text, update

from clinic_db import cases, patients, review
from clinic_db.audit import Actor
from clinic_db.keys import DecryptionError, KeyUnavailable
from clinic_db.models import AuditEvent, Case, Image, Patient, PatientKey
from clinic_db.rotation import rotate

PLANTED_NAME = "Zebulon Quixwright"
PLANTED_ANSWER = "itchy since the ferris-wheel holiday"
PLANTED_TG_ID = 987654321012
PLANTED_PIXEL_TEXT = b"PLANTED-PHOTO-MARKER-7f3a"


def _photo() -> bytes:
    img = PILImage.new("RGB", (64, 48), (180, 120, 100))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue() + PLANTED_PIXEL_TEXT  # trailing bytes stand in for identifiable content


def _store_patient(clinic, tg_id: int = PLANTED_TG_ID, name: str = PLANTED_NAME) -> tuple:
    with clinic.session() as s:
        p = patients.register(clinic, s, tg_id, consent_version="2026-11", name=name)
        case = cases.open_case(clinic, s, p)
        cases.set_history(clinic, s, case, free_text=PLANTED_ANSWER, body_site="left forearm")
        photo = _photo()
        cases.add_image(clinic, s, case, cases.CleanImage(photo, "image/png", 64, 48))
        s.commit()
        return p.id, case.id, photo


def _dump(clinic, url: str) -> bytes:
    if url.startswith("sqlite"):
        clinic.engine.dispose()  # flush WAL into the main file
        path = Path(url.split("///", 1)[1])
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        pytest.fail("pg_dump is needed for the PostgreSQL dump test (postgresql-client)")
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    return subprocess.run([pg_dump, "--data-only", "--inserts", dsn], check=True, capture_output=True).stdout


def test_dump_contains_no_planted_plaintext(any_clinic, db_url):
    _, _, photo = _store_patient(any_clinic)
    dump = _dump(any_clinic, db_url)
    assert len(dump) > 1000
    # the photo's plain SHA-256 neither: whoever holds the photo must not be able to confirm it is stored
    photo_sha256 = hashlib.sha256(photo).hexdigest().encode()
    for planted in (PLANTED_NAME.encode(), PLANTED_ANSWER.encode(), str(PLANTED_TG_ID).encode(),
                    PLANTED_PIXEL_TEXT, b"left forearm", photo_sha256):
        assert planted not in dump, planted
    with any_clinic.session() as s:  # but the owner of the keys reads everything back
        p = patients.find_by_telegram(any_clinic, s, PLANTED_TG_ID)
        assert any_clinic.vault.get_text(s, p, "name") == PLANTED_NAME
        img = s.scalars(select(Image)).one()
        assert cases.image_bytes(any_clinic, s, img, Actor("clinician", "c1")) == photo


def test_flipped_byte_fails_loudly(any_clinic):
    patient_id, _, _ = _store_patient(any_clinic)
    with any_clinic.session() as s:
        p = s.get(Patient, patient_id)
        blob = bytearray(p.name_enc)
        blob[len(blob) // 2] ^= 0x01
        s.execute(update(Patient).where(Patient.id == patient_id).values(name_enc=bytes(blob)))
        s.commit()
    with any_clinic.session() as s:
        with pytest.raises(DecryptionError):
            any_clinic.vault.get_text(s, s.get(Patient, patient_id), "name")


def test_ciphertext_swapped_between_rows_or_columns_fails(any_clinic):
    a, _, _ = _store_patient(any_clinic, 1001, "Alice Alpha")
    b, _, _ = _store_patient(any_clinic, 1002, "Bob Beta")
    with any_clinic.session() as s:
        pa, pb = s.get(Patient, a), s.get(Patient, b)
        a_name, b_name = pa.name_enc, pb.name_enc
        s.execute(update(Patient).where(Patient.id == a).values(name_enc=b_name))
        s.execute(update(Patient).where(Patient.id == b).values(name_enc=a_name, telegram_id_enc=a_name))
        s.commit()
    with any_clinic.session() as s:
        with pytest.raises(DecryptionError):  # b's ciphertext in a's row (different data key and AAD)
            any_clinic.vault.get_text(s, s.get(Patient, a), "name")
        with pytest.raises(DecryptionError):  # same key, other column
            any_clinic.vault.get_text(s, s.get(Patient, b), "telegram_id")


def test_ciphertext_moved_between_rows_of_one_patient_fails(any_clinic):
    """Same data key, different row: only the AAD (table|row|column) stops it."""
    with any_clinic.session() as s:
        p = patients.register(any_clinic, s, 77, consent_version="v1")
        c1, c2 = cases.open_case(any_clinic, s, p), cases.open_case(any_clinic, s, p)
        cases.set_history(any_clinic, s, c1, free_text="first")
        s.commit()
        s.execute(update(Case).where(Case.id == c2.id).values(history_enc=c1.history_enc))
        s.commit()
        s.expire_all()
        with pytest.raises(DecryptionError):
            cases.history(any_clinic, s, s.get(Case, c2.id))


def test_rotation_rewraps_and_old_key_is_not_needed(any_clinic):
    ids = [_store_patient(any_clinic, 2000 + i, f"Patient {i}") for i in range(3)]
    ring = any_clinic.vault.keyring
    old_kid = ring.active_kid
    old_key_file = ring.key_dir / f"{old_kid}.key"
    assert old_key_file.exists()

    report = rotate(any_clinic, retire_old=True)

    assert report.rewrapped == 3 and old_kid in report.retired
    assert not old_key_file.exists()
    assert old_kid not in ring.masters
    with any_clinic.session() as s:
        assert set(s.scalars(select(PatientKey.master_kid))) == {report.new_kid}
        for i, (pid, case_id, photo) in enumerate(ids):
            p = s.get(Patient, pid)
            assert any_clinic.vault.get_text(s, p, "name") == f"Patient {i}"
            img = s.scalars(select(Image).where(Image.case_id == case_id)).one()
            assert cases.image_bytes(any_clinic, s, img, Actor.system("test")) == photo
    # a fresh process that only has the key directory reads everything too
    from clinic_db.db import Clinic
    from clinic_db.keys import KeyRing

    fresh = Clinic.open(str(any_clinic.engine.url.render_as_string(hide_password=False)),
                        KeyRing.from_directory(ring.key_dir, create=False))
    with fresh.session() as s:
        assert fresh.vault.get_text(s, s.get(Patient, ids[0][0]), "name") == "Patient 0"
    fresh.dispose()


def test_rotation_leaves_images_untouched(any_clinic):
    _, case_id, _ = _store_patient(any_clinic)
    with any_clinic.session() as s:
        before = s.scalars(select(Image.data_enc)).one()
    rotate(any_clinic)
    with any_clinic.session() as s:
        assert s.scalars(select(Image.data_enc)).one() == before  # no re-encryption of images


def test_erasure_shreds_one_patient_only(any_clinic):
    victim, victim_case, _ = _store_patient(any_clinic, 3001, "Erase Me")
    keeper, keeper_case, keeper_photo = _store_patient(any_clinic, 3002, "Keep Me")
    with any_clinic.session() as s:
        stolen = s.get(Patient, victim).name_enc  # e.g. a copy that escaped into a backup
        s.expunge_all()
        patients.erase(any_clinic, s, victim, Actor("patient", str(victim)))
        s.commit()
    with any_clinic.session() as s:
        assert s.get(Patient, victim) is None
        assert s.get(Case, victim_case) is None
        assert s.get(PatientKey, victim) is None
        assert patients.find_by_telegram(any_clinic, s, 3001) is None
        ghost = Patient(id=victim, telegram_index="x", telegram_id_enc=b"", name_enc=stolen)
        with pytest.raises(KeyUnavailable):
            any_clinic.vault.get_text(s, ghost, "name")
        # the other patient is untouched
        p = s.get(Patient, keeper)
        assert any_clinic.vault.get_text(s, p, "name") == "Keep Me"
        img = s.scalars(select(Image).where(Image.case_id == keeper_case)).one()
        assert cases.image_bytes(any_clinic, s, img, Actor.system("test")) == keeper_photo
        # one content-free audit entry of the erasure remains
        erase_events = s.scalars(select(AuditEvent).where(AuditEvent.action == "patient.erase")).all()
        assert len(erase_events) == 1 and erase_events[0].entity_id == str(victim)
        assert "Erase Me" not in str(erase_events[0].detail)


def test_audit_trail_is_append_only(any_clinic):
    _store_patient(any_clinic)
    with any_clinic.session() as s:
        event_id = s.scalars(select(AuditEvent.id)).first()
    with any_clinic.engine.connect() as conn:
        with pytest.raises(Exception, match="append-only"):
            conn.execute(text("UPDATE audit_events SET action='x' WHERE id=:i"), {"i": event_id})
        conn.rollback()
        with pytest.raises(Exception, match="append-only"):
            conn.execute(text("DELETE FROM audit_events WHERE id=:i"), {"i": event_id})


def test_blind_index_finds_patient_without_storing_the_id(any_clinic):
    _store_patient(any_clinic)
    with any_clinic.session() as s:
        p = patients.find_by_telegram(any_clinic, s, PLANTED_TG_ID)
        assert p is not None
        assert str(PLANTED_TG_ID) not in p.telegram_index
        assert patients.find_by_telegram(any_clinic, s, PLANTED_TG_ID + 1) is None


def test_review_claim_race_has_exactly_one_winner(pg_clinic):
    """Two clinicians, two PostgreSQL connections, one task: exactly one claim succeeds."""
    import threading

    from clinic_db.models import Clinician

    _, case_id, _ = _store_patient(pg_clinic)
    with pg_clinic.session() as s:
        doctors = [Clinician(username=f"d{i}", display_name=f"Dr {i}", password_hash="x") for i in range(2)]
        for d in doctors:
            d.ensure_id()
        s.add_all(doctors)
        task = review.open_task(s, s.get(Case, case_id), urgency="urgent", reasons=["malignancy_suspected"])
        s.commit()
        task_id, doctor_ids = task.id, [d.id for d in doctors]

    for _round in range(5):
        barrier = threading.Barrier(2)
        results: dict = {}

        def attempt(doctor_id) -> None:  # type: ignore[no-untyped-def]
            with pg_clinic.session() as s:
                s.execute(text("select 1"))  # own connection checked out before the race
                barrier.wait()
                results[doctor_id] = review.claim(s, task_id, doctor_id)

        threads = [threading.Thread(target=attempt, args=(d,)) for d in doctor_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [False, True]
        winner = next(d for d, won in results.items() if won)
        with pg_clinic.session() as s:
            from clinic_db.models import ReviewTask

            assert s.get(ReviewTask, task_id).claimed_by == winner
            review.release(s, task_id, winner)


def test_photo_digest_is_keyed(any_clinic, tmp_path):
    """Equal photos get equal digests under one clinic's key (duplicates stay recognisable); without
    the key the digest cannot be computed from the photo."""
    _, case_id, photo = _store_patient(any_clinic)
    ring = any_clinic.vault.keyring
    with any_clinic.session() as s:
        stored = s.scalars(select(Image.content_mac).where(Image.case_id == case_id)).one()
    assert stored == ring.content_mac(photo) != ring.content_mac(photo + b"x")
    from clinic_db.keys import KeyRing

    other = KeyRing.from_directory(tmp_path / "other-keys")
    assert other.content_mac(photo) != stored and hashlib.sha256(photo).hexdigest() != stored

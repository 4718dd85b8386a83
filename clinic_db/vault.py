"""Envelope encryption of row fields, bound to (table, row id, column).

Each patient has a random 256-bit data key, stored wrapped by the active master key in
``patient_keys``. Fields are sealed with AES-256-GCM under that data key; the additional
authenticated data is ``table|row-id|column``, so a ciphertext copied into another row or column
fails to decrypt. Non-patient secrets (e.g. the bot's conversation state) use the *system* data key,
which lives in the same table under the nil UUID and is rotated with the others (clinic_db.rotation).
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from clinic_db.keys import KEY_BYTES, KeyRing, KeyUnavailable, seal, unseal
from clinic_db.models import PatientKey

SYSTEM_KEY_ID = uuid.UUID(int=0)


def _aad(table: str, row_id: uuid.UUID | str, column: str) -> bytes:
    return f"{table}|{row_id}|{column}".encode()


class Vault:
    def __init__(self, keyring: KeyRing):
        self.keyring = keyring

    # --- data keys -------------------------------------------------------------------------
    def create_data_key(self, session: Session, owner_id: uuid.UUID) -> bytes:
        data_key = secrets.token_bytes(KEY_BYTES)
        wrapped, kid = self.keyring.wrap(data_key, str(owner_id))
        session.add(PatientKey(patient_id=owner_id, wrapped_key=wrapped, master_kid=kid))
        session.flush()
        return data_key

    def data_key(self, session: Session, owner_id: uuid.UUID) -> bytes:
        row = session.get(PatientKey, owner_id)
        if row is None:
            if owner_id == SYSTEM_KEY_ID:
                return self.create_data_key(session, owner_id)
            raise KeyUnavailable(f"no data key for {owner_id} (erased?)")
        return self.keyring.unwrap(row.wrapped_key, row.master_kid, str(owner_id))

    def destroy_data_key(self, session: Session, owner_id: uuid.UUID) -> None:
        row = session.get(PatientKey, owner_id)
        if row is not None:
            session.delete(row)

    # --- raw sealing (rows without a UUID id, files) ----------------------------------------
    def seal_for(self, session: Session, owner: uuid.UUID, table: str, row_id: str, column: str, data: bytes) -> bytes:
        return seal(self.data_key(session, owner), data, _aad(table, row_id, column))

    def open_for(self, session: Session, owner: uuid.UUID, table: str, row_id: str, column: str, blob: bytes) -> bytes:
        return unseal(self.data_key(session, owner), blob, _aad(table, row_id, column))

    # --- fields ----------------------------------------------------------------------------
    def _owner(self, row: Any) -> uuid.UUID:
        table = row.__tablename__
        if table == "patients":
            return row.id
        owner = getattr(row, "patient_id", None)
        if owner is None and getattr(row, "case", None) is not None:
            owner = row.case.patient_id
        if owner is None:
            raise ValueError(f"cannot tell which patient owns this {table} row")
        return owner

    def encrypt(self, session: Session, row: Any, column: str, value: bytes | None, owner: uuid.UUID | None = None) -> None:
        """Seal ``value`` into ``row.<column>_enc``."""
        if value is None:
            setattr(row, f"{column}_enc", None)
            return
        row_id = row.ensure_id()
        blob = self.seal_for(session, owner or self._owner(row), row.__tablename__, str(row_id), column, value)
        setattr(row, f"{column}_enc", blob)

    def decrypt(self, session: Session, row: Any, column: str, owner: uuid.UUID | None = None) -> bytes | None:
        blob = getattr(row, f"{column}_enc")
        if blob is None:
            return None
        return self.open_for(session, owner or self._owner(row), row.__tablename__, str(row.id), column, blob)

    # Typed conveniences ---------------------------------------------------------------------
    def set_text(self, session: Session, row: Any, column: str, text: str | None, owner: uuid.UUID | None = None) -> None:
        self.encrypt(session, row, column, None if text is None else text.encode("utf-8"), owner)

    def get_text(self, session: Session, row: Any, column: str, owner: uuid.UUID | None = None) -> str | None:
        raw = self.decrypt(session, row, column, owner)
        return None if raw is None else raw.decode("utf-8")

    def set_json(self, session: Session, row: Any, column: str, value: Any, owner: uuid.UUID | None = None) -> None:
        data = None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
        self.encrypt(session, row, column, data, owner)

    def get_json(self, session: Session, row: Any, column: str, owner: uuid.UUID | None = None) -> Any:
        raw = self.decrypt(session, row, column, owner)
        return None if raw is None else json.loads(raw)

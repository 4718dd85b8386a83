"""PTB persistence on the clinic database (``kv`` table) instead of a pickle file.

Every value is JSON sealed with the system data key (it can hold case ids, answers in progress),
and rows are addressed by a keyed blind index of the Telegram id, so neither ids nor state are
readable from the table. Each write commits at once; :class:`bot.app.SkinBridgeApplication`
calls ``update_persistence()`` after every update, so a killed process loses no conversation step.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import delete, select
from telegram.ext import BasePersistence, PersistenceInput
from telegram.ext._utils.types import CDCData, ConversationDict, ConversationKey

from clinic_db.db import Clinic
from clinic_db.models import KeyValue, utcnow
from clinic_db.vault import SYSTEM_KEY_ID

NS_USER = "bot_user"
NS_CHAT = "bot_chat"
NS_CONV = "bot_conv"
NS_BOT = "bot_data"
NS_CALLBACK = "bot_callback"


class SqlPersistence(BasePersistence[dict, dict, dict]):
    def __init__(self, clinic: Clinic, *, store_data: PersistenceInput | None = None, update_interval: float = 5):
        super().__init__(
            store_data=store_data
            or PersistenceInput(bot_data=False, chat_data=False, user_data=True, callback_data=False),
            update_interval=update_interval,
        )
        self.clinic = clinic

    # --- sealed rows ---------------------------------------------------------------------------
    def _index(self, namespace: str, ident: str) -> str:
        return self.clinic.vault.keyring.blind_index(namespace, ident)

    def _write(self, namespace: str, ident: str, value: Any) -> None:
        key = self._index(namespace, ident)
        with self.clinic.session() as session:
            row = session.get(KeyValue, (namespace, key))
            if value is None:
                if row is not None:
                    session.delete(row)
                    session.commit()
                return
            blob = self.clinic.vault.seal_for(
                session, SYSTEM_KEY_ID, "kv", f"{namespace}/{key}", "value",
                json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8"),
            )
            if row is None:
                session.add(KeyValue(namespace=namespace, key=key, value_enc=blob, value=None))
            else:
                row.value_enc = blob
                row.updated_at = utcnow()
            session.commit()

    def _read_all(self, namespace: str) -> list[Any]:
        with self.clinic.session() as session:
            rows = session.scalars(select(KeyValue).where(KeyValue.namespace == namespace)).all()
            return [
                json.loads(self.clinic.vault.open_for(
                    session, SYSTEM_KEY_ID, "kv", f"{namespace}/{row.key}", "value", row.value_enc
                ))
                for row in rows
                if row.value_enc is not None
            ]

    # --- user and chat data ----------------------------------------------------------------------
    async def get_user_data(self) -> dict[int, dict]:
        return {int(item["id"]): item["data"] for item in self._read_all(NS_USER)}

    async def update_user_data(self, user_id: int, data: dict) -> None:
        # an empty dict is not written: a person who never consented leaves no row behind
        self._write(NS_USER, str(user_id), {"id": user_id, "data": data} if data else None)

    async def drop_user_data(self, user_id: int) -> None:
        self._write(NS_USER, str(user_id), None)

    async def refresh_user_data(self, user_id: int, user_data: dict) -> None:
        """Nothing to do: this process is the only writer of its users' data."""

    async def get_chat_data(self) -> dict[int, dict]:
        return {int(item["id"]): item["data"] for item in self._read_all(NS_CHAT)}

    async def update_chat_data(self, chat_id: int, data: dict) -> None:
        self._write(NS_CHAT, str(chat_id), {"id": chat_id, "data": data} if data else None)

    async def drop_chat_data(self, chat_id: int) -> None:
        self._write(NS_CHAT, str(chat_id), None)

    async def refresh_chat_data(self, chat_id: int, chat_data: dict) -> None:
        """Nothing to do (single writer)."""

    # --- bot data and callback data --------------------------------------------------------------
    async def get_bot_data(self) -> dict:
        items = self._read_all(NS_BOT)
        return items[0] if items else {}

    async def update_bot_data(self, data: dict) -> None:
        self._write(NS_BOT, "bot", data)

    async def refresh_bot_data(self, bot_data: dict) -> None:
        """Nothing to do (single writer)."""

    async def get_callback_data(self) -> CDCData | None:
        items = self._read_all(NS_CALLBACK)
        if not items:
            return None
        stored = items[0]
        return [(k, ts, data) for k, ts, data in stored["queue"]], stored["mapping"]

    async def update_callback_data(self, data: CDCData) -> None:
        queue, mapping = data
        self._write(NS_CALLBACK, "callback", {"queue": [list(q) for q in queue], "mapping": mapping})

    # --- conversations ---------------------------------------------------------------------------
    async def get_conversations(self, name: str) -> ConversationDict:
        return {
            tuple(item["key"]): item["state"] for item in self._read_all(NS_CONV) if item["name"] == name
        }

    async def update_conversation(self, name: str, key: ConversationKey, new_state: object | None) -> None:
        ident = json.dumps([name, list(key)])
        self._write(NS_CONV, ident, None if new_state is None else {"name": name, "key": list(key), "state": new_state})

    async def flush(self) -> None:
        """Every write above is already committed."""


def purge_user(clinic: Clinic, user_id: int) -> None:
    """Remove the persisted bot state of one Telegram user (used by /delete)."""
    key = clinic.vault.keyring.blind_index(NS_USER, str(user_id))
    with clinic.session() as session:
        session.execute(delete(KeyValue).where(KeyValue.namespace == NS_USER, KeyValue.key == key))
        session.commit()

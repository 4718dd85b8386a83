"""Append-only audit trail. Every read or change of patient data records who, what, which, why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from clinic_db.models import AuditEvent


@dataclass(frozen=True)
class Actor:
    type: str  # patient | clinician | system | client
    id: str

    @classmethod
    def system(cls, component: str) -> "Actor":
        return cls("system", component)


def record(
    session: Session,
    actor: Actor,
    action: str,
    entity_type: str,
    entity_id: Any = None,
    *,
    outcome: str = "success",
    purpose: str = "treatment",
    **detail: Any,
) -> AuditEvent:
    """Add an audit event to the session (committed with the change it describes).

    ``detail`` must hold codes and ids only: the audit trail outlives erasure.
    """
    event = AuditEvent(
        actor_type=actor.type,
        actor_id=str(actor.id),
        action=action,
        entity_type=entity_type,
        entity_id=None if entity_id is None else str(entity_id),
        outcome=outcome,
        purpose=purpose,
        detail={k: (str(v) if not isinstance(v, (int, float, bool, list, type(None))) else v) for k, v in detail.items()},
    )
    session.add(event)
    return event

"""Master-key rotation: new master key, data keys re-wrapped, old key retired when unused."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import PatientKey


@dataclass
class RotationReport:
    new_kid: str
    rewrapped: int
    retired: list[str] = field(default_factory=list)


def rotate(clinic: Clinic, *, retire_old: bool = False) -> RotationReport:
    ring = clinic.vault.keyring
    old = set(ring.masters)
    new_kid = ring.add_master()  # from now on new data keys are wrapped with it
    with clinic.session() as session:
        rewrapped = clinic.vault.rewrap_all(session)
        audit.record(session, Actor.system("keys"), "keys.rotate", "MasterKey", new_kid,
                     purpose="operations", rewrapped=rewrapped)
        session.commit()
        retired: list[str] = []
        if retire_old:
            for kid in sorted(old):
                still = session.scalar(select(func.count()).select_from(PatientKey).where(PatientKey.master_kid == kid))
                if still:
                    continue
                ring.retire(kid)
                retired.append(kid)
                audit.record(session, Actor.system("keys"), "keys.retire", "MasterKey", kid, purpose="operations")
            session.commit()
    return RotationReport(new_kid=new_kid, rewrapped=rewrapped, retired=retired)

"""The clinical data model (SQLAlchemy 2.0, typed).

Columns ending in ``_enc`` hold AES-256-GCM ciphertexts made by :class:`clinic_db.vault.Vault`,
bound to (table, row id, column). Only what queues sort and filter on stays clear: statuses,
urgency, times, condition codes, reason codes. See docs/architecture.md.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from clinic_db.states import CaseStatus


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON, bytes: LargeBinary}


class UUIDPk:
    """Client-side UUIDs: the id is known before INSERT, so ciphertexts can be bound to it."""

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)

    def ensure_id(self) -> uuid.UUID:
        if self.id is None:
            self.id = uuid.uuid4()
        return self.id


class Patient(UUIDPk, Base):
    __tablename__ = "patients"

    telegram_index: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC blind index
    telegram_id_enc: Mapped[bytes]
    name_enc: Mapped[bytes | None]  # only if the patient gave one
    language: Mapped[str] = mapped_column(String(8), default="en")
    consent_version: Mapped[str | None] = mapped_column(String(32))
    consent_at: Mapped[datetime | None]
    consent_withdrawn_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    cases: Mapped[list["Case"]] = relationship(back_populates="patient", cascade="all, delete-orphan")

    @property
    def has_consent(self) -> bool:
        return self.consent_at is not None and self.consent_withdrawn_at is None


class PatientKey(Base):
    """The patient's data key, wrapped by a master key. Deleting it crypto-shreds the patient."""

    __tablename__ = "patient_keys"

    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    wrapped_key: Mapped[bytes]
    master_kid: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None]


class Case(UUIDPk, Base):
    __tablename__ = "cases"
    __table_args__ = (
        Index("ix_cases_status_updated", "status", "status_changed_at"),
        # a replayed photo that opened a case finds that case instead of opening a second one
        UniqueConstraint("patient_id", "opening_message_id"),
    )

    patient_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    # the patient's Telegram message (ids are per chat) whose photo opened the case; NULL for other intakes
    opening_message_id: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=CaseStatus.received.value)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    # history answers (body site, duration, itch, bleeding, growth, pain, prior treatment, Fitzpatrick)
    history_enc: Mapped[bytes | None]
    urgency: Mapped[str] = mapped_column(String(16), default="routine")
    condition_code: Mapped[str | None] = mapped_column(String(32))  # current top condition (vocabulary code)
    failure_reason: Mapped[str | None] = mapped_column(String(200))  # a reason code, never patient text
    pipeline_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the bot saved the last history answer: the sweeper submits such a case if it stays `received`
    history_completed_at: Mapped[datetime | None]
    report_version: Mapped[int] = mapped_column(Integer, default=0)  # FHIR DiagnosticReport versionId
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="cases")
    images: Mapped[list["Image"]] = relationship(
        back_populates="case", cascade="all, delete-orphan", order_by="Image.created_at"
    )
    ai_results: Mapped[list["AIResult"]] = relationship(
        back_populates="case", cascade="all, delete-orphan", order_by="AIResult.created_at"
    )
    explanation_images: Mapped[list["ExplanationImage"]] = relationship(
        back_populates="case", cascade="all, delete-orphan", order_by="ExplanationImage.created_at"
    )
    review_tasks: Mapped[list["ReviewTask"]] = relationship(
        back_populates="case", cascade="all, delete-orphan", order_by="ReviewTask.created_at"
    )

    @property
    def status_enum(self) -> CaseStatus:
        return CaseStatus(self.status)


class Image(UUIDPk, Base):
    __tablename__ = "images"

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)  # which data key seals it
    data_enc: Mapped[bytes]  # the photo, EXIF removed, orientation applied
    # keyed digest (KeyRing.content_mac), never a plain SHA-256: holding a photo must not confirm it is
    # stored; NULL for photos stored before migration 0004 dropped the clear hashes
    content_mac: Mapped[str | None] = mapped_column(String(64))
    mime: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    quality: Mapped[dict[str, Any] | None]  # blur/exposure metrics: numbers only
    source_ref: Mapped[str | None] = mapped_column(String(128), unique=True)  # e.g. telegram file_unique_id+case
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    case: Mapped[Case] = relationship(back_populates="images")


class AIResult(UUIDPk, Base):
    __tablename__ = "ai_results"
    # one result per engine per case: a redelivered or re-enqueued task cannot add a second
    __table_args__ = (UniqueConstraint("case_id", "engine"),)

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    engine: Mapped[str] = mapped_column(String(32))  # classifier | vlm
    model_id: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    differential_enc: Mapped[bytes]  # JSON [{code, probability}, ...]
    description_enc: Mapped[bytes | None]  # model's free text (features, explanation)
    saliency_enc: Mapped[bytes | None]  # PNG heat map, if the engine makes one
    top_condition_code: Mapped[str | None] = mapped_column(String(32))
    top_probability: Mapped[float | None] = mapped_column(Float)
    flags: Mapped[list[str]] = mapped_column(default=list)  # codes, e.g. "malignancy_suspected"
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # ms per step
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    case: Mapped[Case] = relationship(back_populates="ai_results")


class ExplanationImage(UUIDPk, Base):
    __tablename__ = "explanation_images"
    __table_args__ = (UniqueConstraint("case_id", "condition_code", "seed"),)

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    condition_code: Mapped[str] = mapped_column(String(32))
    data_enc: Mapped[bytes]  # PNG, marked AI-generated
    content_mac: Mapped[str | None] = mapped_column(String(64))  # keyed digest, as Image.content_mac
    mime: Mapped[str] = mapped_column(String(32), default="image/png")
    model_id: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    case: Mapped[Case] = relationship(back_populates="explanation_images")


class Clinician(UUIDPk, Base):
    __tablename__ = "clinicians"

    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16), default="dermatologist")  # dermatologist | admin
    password_hash: Mapped[str] = mapped_column(String(255))
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    telegram_index: Mapped[str | None] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ExplainerReview(UUIDPk, Base):
    """A dermatologist's decision on which conditions an explainer may draw for patients.

    Bound to what was looked at: the explainer's weights digest and sampling settings. Append-only;
    the newest review of the same weights and settings is the one in force (clinic_db.explainer_review).
    """

    __tablename__ = "explainer_reviews"
    __table_args__ = (Index("ix_explainer_reviews_weights", "weights_sha256", "created_at"),)

    explainer_id: Mapped[str] = mapped_column(String(200))  # model_id@version, for people reading it
    weights_sha256: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict[str, Any]]  # guidance, steps, ... the pictures depend on
    approved: Mapped[list[str]] = mapped_column(default=list)  # condition codes
    rejected: Mapped[dict[str, Any]] = mapped_column(default=dict)  # code -> the reviewer's reason
    reviewer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clinicians.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    reviewer: Mapped[Clinician] = relationship()


class ReviewTask(UUIDPk, Base):
    __tablename__ = "review_tasks"
    __table_args__ = (Index("ix_review_tasks_queue", "status", "priority", "due_at"),)

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | waiting_patient | decided
    priority: Mapped[int] = mapped_column(Integer)  # 0 = most urgent
    urgency: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[str]] = mapped_column(default=list)  # reason codes
    due_at: Mapped[datetime]
    claimed_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("clinicians.id"))
    claimed_at: Mapped[datetime | None]
    claim_expires_at: Mapped[datetime | None]
    decision: Mapped[str | None] = mapped_column(String(16))  # accept | amend | request_info
    decision_condition_code: Mapped[str | None] = mapped_column(String(32))
    decision_urgency: Mapped[str | None] = mapped_column(String(16))
    recommendation: Mapped[str | None] = mapped_column(String(64))
    note_enc: Mapped[bytes | None]  # the dermatologist's note to the patient
    decided_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("clinicians.id"))
    decided_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    case: Mapped[Case] = relationship(back_populates="review_tasks")


class AuditEvent(Base):
    """Append-only audit trail. Content-free: ids, codes and times, never patient text."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor_type: Mapped[str] = mapped_column(String(16))  # patient | clinician | system | client
    actor_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))  # e.g. case.transition, image.read, patient.erase
    entity_type: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    purpose: Mapped[str] = mapped_column(String(32), default="treatment")  # treatment | operations | ...
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)  # codes only


class OutboxMessage(UUIDPk, Base):
    """Messages to patients: written in the same transaction as the state that causes them,
    delivered at least once by the bot, de-duplicated by ``dedup_key``."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "status", "next_attempt_at"),)

    patient_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    case_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    kind: Mapped[str] = mapped_column(String(32))  # progress | result | final | request_info | ...
    dedup_key: Mapped[str] = mapped_column(String(128), unique=True)
    payload_enc: Mapped[bytes]
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KeyValue(Base):
    """Small durable state that is not clinical (e.g. bot conversation state, processed update ids)."""

    __tablename__ = "kv"

    namespace: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value_enc: Mapped[bytes | None]  # sealed with a system key when it may contain patient data
    value: Mapped[dict[str, Any] | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CaseMessage(UUIDPk, Base):
    """The conversation about a case: patient follow-up questions, AI answers, clinician messages."""

    __tablename__ = "case_messages"
    # a replayed Telegram message finds the row it made instead of adding a second (and a second answer)
    __table_args__ = (UniqueConstraint("patient_id", "role", "telegram_message_id"),)

    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    role: Mapped[str] = mapped_column(String(16))  # patient | assistant | clinician
    # the patient's Telegram message this row came from (ids are per chat); NULL for every other source
    telegram_message_id: Mapped[int | None] = mapped_column(BigInteger)
    text_enc: Mapped[bytes]
    flags: Mapped[list[str]] = mapped_column(default=list)  # e.g. red_flag, dosing_refused
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- FHIR publication and EHR access ---------------------------------------------------------------


class FhirResource(Base):
    """Every version of every published FHIR resource (JSON sealed with the patient's key).

    Clear columns carry what search needs; ``is_current`` marks the latest version.
    """

    __tablename__ = "fhir_resources"
    __table_args__ = (
        Index("ix_fhir_resources_search", "resource_type", "is_current", "last_updated"),
        Index("ix_fhir_resources_patient", "patient_id", "resource_type"),
        # migration 0005: the snapshot's "no newer version" probe, and one index per search parameter
        Index("ix_fhir_resources_versions", "resource_type", "id", "seq"),
        Index("ix_fhir_resources_type_seq", "resource_type", "seq"),
        Index("ix_fhir_resources_status", "resource_type", "status", "seq"),
        Index("ix_fhir_resources_code", "resource_type", "code"),
        Index("ix_fhir_resources_category", "resource_type", "category"),
        Index("ix_fhir_resources_identifier", "resource_type", "identifier"),
        Index("ix_fhir_resources_effective", "resource_type", "effective_at"),
        Index("ix_fhir_resources_issued", "resource_type", "issued_at"),
        Index("ix_fhir_resources_updated", "resource_type", "last_updated"),
    )

    resource_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    patient_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)  # owner key; None for Organization/Device/...
    case_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    status: Mapped[str | None] = mapped_column(String(32))
    code: Mapped[str | None] = mapped_column(String(64))  # e.g. system|code of DiagnosticReport.code
    category: Mapped[str | None] = mapped_column(String(64))
    identifier: Mapped[str | None] = mapped_column(String(128))
    effective_at: Mapped[datetime | None]
    issued_at: Mapped[datetime | None]
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), index=True)  # stable paging
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    data_enc: Mapped[bytes | None]  # sealed JSON when patient_id is set
    data: Mapped[dict[str, Any] | None]  # clear JSON for non-patient resources (Organization, Device)


class FhirClient(UUIDPk, Base):
    """An EHR registered for SMART Backend Services (client_credentials + private_key_jwt)."""

    __tablename__ = "fhir_clients"

    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    jwks: Mapped[dict[str, Any]]  # public keys only
    scopes: Mapped[list[str]] = mapped_column(default=list)  # allowed, e.g. system/DiagnosticReport.rs
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsedJti(Base):
    """Client-assertion ids seen before their expiry: a replay is refused."""

    __tablename__ = "fhir_used_jti"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class BulkExportJob(UUIDPk, Base):
    __tablename__ = "fhir_bulk_jobs"

    client_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="accepted")  # accepted|running|complete|error|cancelled
    level: Mapped[str] = mapped_column(String(16))  # system | patient
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)  # _type, _since, request url
    progress: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(String(500))
    transaction_time: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]


class BulkExportFile(UUIDPk, Base):
    __tablename__ = "fhir_bulk_files"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("fhir_bulk_jobs.id", ondelete="CASCADE"), index=True)
    resource_type: Mapped[str] = mapped_column(String(32))
    count: Mapped[int] = mapped_column(Integer)
    data_enc: Mapped[bytes]  # NDJSON sealed with the system key


class FhirSubscription(UUIDPk, Base):
    """R4 Subscription (rest-hook, id-only payloads)."""

    __tablename__ = "fhir_subscriptions"

    client_id: Mapped[str] = mapped_column(String(64), index=True)
    criteria: Mapped[str] = mapped_column(String(500))
    endpoint: Mapped[str] = mapped_column(String(500))
    headers: Mapped[list[str]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(16), default="requested")  # requested|active|error|off
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500))
    resource: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the Subscription as created
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SubscriptionNotification(UUIDPk, Base):
    __tablename__ = "fhir_subscription_notifications"
    __table_args__ = (Index("ix_fhir_sub_notif_due", "status", "next_attempt_at"),)

    subscription_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("fhir_subscriptions.id", ondelete="CASCADE"), index=True
    )
    resource_ref: Mapped[str] = mapped_column(String(128))  # e.g. DiagnosticReport/<id>/_history/2
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|sent|dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


@event.listens_for(AuditEvent, "before_update")
@event.listens_for(AuditEvent, "before_delete")
@event.listens_for(ExplainerReview, "before_update")
@event.listens_for(ExplainerReview, "before_delete")
def _append_only(mapper: Any, connection: Any, target: Any) -> None:
    raise PermissionError(f"{type(target).__tablename__} rows are append-only")


class InboxUpdate(Base):
    """A Telegram update, written before it is confirmed to the Bot API and handled from here
    (bot.inbox): a bot killed at any point replays what it had not finished. The payload is sealed
    with the system data key and dropped once the update is handled; the id row stays a week
    so a re-delivered update is recognised."""

    __tablename__ = "bot_inbox"

    update_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | failed
    payload_enc: Mapped[bytes | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(200))  # an error class and reference, never content
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    handled_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_bot_inbox_status", "status", "update_id"),)


class ProcessHeartbeat(Base):
    """One row per live SkinBridge process (clinic_db.heartbeat): liveness for supervisors, and which
    master key the process wraps new data keys with, so `keys rotate --retire` never deletes a key in use."""

    __tablename__ = "process_heartbeats"
    __table_args__ = (Index("ix_process_heartbeats_component_seen", "component", "last_seen"),)

    process_id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:start time
    component: Mapped[str] = mapped_column(String(32))  # bot | worker | api | ...
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    ppid: Mapped[int] = mapped_column(Integer)  # a supervisor finds its child's pool processes by it
    started_at: Mapped[datetime]
    last_seen: Mapped[datetime]
    master_kid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None]  # numbers and codes only, never patient data


class TaskLease(Base):
    """A pipeline step (or a chain hand-off to the broker) held by a live process (inference.leases):
    renewed while it runs, released when it ends. The sweeper counts a step as lost only when its lease
    expired unreleased; a case waiting in the queue holds none, and waiting is never failure."""

    __tablename__ = "task_leases"

    task_id: Mapped[str] = mapped_column(String(80), primary_key=True)  # Celery task id (a retry reuses it)
    case_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(64))
    holder: Mapped[str] = mapped_column(String(200))  # host:pid, for the logs
    acquired_at: Mapped[datetime]
    renewed_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    released_at: Mapped[datetime | None]


class ExplainerReviewPicture(Base):
    """A sample picture an explainer drew for the dermatologists' sign-off (console ``/explainer``): drawn
    by a gpu worker (inference.explainer_tasks), keyed by the explainer's subject digest
    (clinic_db.explainer_review.subject_digest). AI-made, no patient data: stored as plain PNG."""

    __tablename__ = "explainer_review_pictures"

    subject_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    condition_code: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    png: Mapped[bytes]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

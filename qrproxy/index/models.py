"""The index: what qrproxy knows (patients, studies, series, instances, worklist items), what it holds
(spool objects), and what it owes (forward rows, commitment requests), in one database.

Queries answer from `identifier` columns that hold pre-encoded DICOM (explicit VR little endian,
dataset bytes without preamble): encoding once when a row is written is what lets C-FIND answer at
wire speed. The other columns exist to be matched in SQL; the ones matched in practice are indexed.
Schema changes go through Alembic migrations only (migrations/), never `create_all` in production.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (BigInteger, DateTime, Enum, ForeignKey, Index, Integer, LargeBinary, MetaData, String,
                        Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)
AE = String(16)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: DateTime(timezone=True)}


# --- The query index --------------------------------------------------------------------------


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))
    # Upper-cased, caret-normalised name: PN matching is case-insensitive by site convention.
    patient_name_norm: Mapped[str | None] = mapped_column(String(324), index=True)
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))
    identifier: Mapped[bytes | None] = mapped_column(LargeBinary)
    source_node: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    modalities_in_study: Mapped[str | None] = mapped_column(String(128))
    number_of_series: Mapped[int | None] = mapped_column(Integer)
    number_of_instances: Mapped[int | None] = mapped_column(Integer)
    identifier: Mapped[bytes | None] = mapped_column(LargeBinary)
    source_node: Mapped[str | None] = mapped_column(String(64), index=True)
    refreshed_at: Mapped[dt.datetime | None]
    last_access_at: Mapped[dt.datetime | None]
    pinned_until: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    number_of_instances: Mapped[int | None] = mapped_column(Integer)
    identifier: Mapped[bytes | None] = mapped_column(LargeBinary)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    identifier: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The local copy, when the spool holds one; NULL when only the upstream has it.
    object_pk: Mapped[int | None] = mapped_column(ForeignKey("spool_objects.id", ondelete="SET NULL"), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")
    object: Mapped[SpoolObject | None] = relationship()


# --- The spool and what is owed ---------------------------------------------------------------


class SpoolObject(Base):
    """One file in spool/objects/. The row is committed only after the file is fsynced in place."""

    __tablename__ = "spool_objects"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(255), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(32))
    calling_ae: Mapped[str | None] = mapped_column(AE)
    called_ae: Mapped[str | None] = mapped_column(AE)
    peer_address: Mapped[str | None] = mapped_column(String(64))
    # received | superseded | retrieved: how it got here and whether a newer copy replaced it.
    origin: Mapped[str] = mapped_column(String(16), default="received")
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_access_at: Mapped[dt.datetime | None]


class ForwardState(str, enum.Enum):
    pending = "pending"
    inflight = "inflight"
    sent = "sent"
    held = "held"


class ForwardItem(Base):
    """One instance owed to one destination: the forward queue, Postfix-style, one row per recipient."""

    __tablename__ = "forward_queue"
    __table_args__ = (
        Index("ix_forward_queue_claim", "node", "state", "next_attempt_at"),
        Index("ix_forward_queue_node_study", "node", "study_instance_uid"),
        UniqueConstraint("object_pk", "node", name="uq_forward_queue_object_node"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    object_pk: Mapped[int] = mapped_column(ForeignKey("spool_objects.id", ondelete="CASCADE"), index=True)
    node: Mapped[str] = mapped_column(String(64))
    state: Mapped[ForwardState] = mapped_column(
        Enum(ForwardState, name="forward_state", native_enum=False, length=16), default=ForwardState.pending
    )
    calling_ae: Mapped[str | None] = mapped_column(AE)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # higher first (a route's `priority`); then the study's arrival, then series and instance number
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[dt.datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]


class WorklistItem(Base):
    """One scheduled procedure step as the worklist node listed it (after `on: worklist` mutations)."""

    __tablename__ = "worklist_items"
    __table_args__ = (UniqueConstraint("source_node", "item_key", name="uq_worklist_items_source_node_item_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source_node: Mapped[str] = mapped_column(String(64))
    # Stable identity across refreshes: accession + requested procedure + step ids, or a content hash.
    item_key: Mapped[str] = mapped_column(String(200))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name_norm: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    requested_procedure_id: Mapped[str | None] = mapped_column(String(16))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    scheduled_station_ae: Mapped[str | None] = mapped_column(AE, index=True)
    scheduled_station_name: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    sps_id: Mapped[str | None] = mapped_column(String(16))
    sps_start_date: Mapped[str | None] = mapped_column(String(8), index=True)
    sps_start_time: Mapped[str | None] = mapped_column(String(16))
    identifier: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="scheduled")
    refreshed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Set when the proxy saw the procedure done (MPPS COMPLETED/DISCONTINUED, or the study arriving
    # with `worklist.remove_on_store`): the item is no longer answered, but kept so that the next
    # refresh, which may still list it, does not bring it back. Retention deletes it later.
    done_at: Mapped[dt.datetime | None]
    done_reason: Mapped[str | None] = mapped_column(String(64))


class MppsStep(Base):
    """A Modality Performed Procedure Step received by qrproxy's MPPS SCP: its latest attributes
    (N-CREATE merged with every N-SET, pre-encoded like worklist items) and status."""

    __tablename__ = "mpps_steps"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    # IN PROGRESS | COMPLETED | DISCONTINUED (PerformedProcedureStepStatus)
    status: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    attributes: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class MppsMessage(Base):
    """One N-CREATE or N-SET owed to one `mpps` node, sent in id order per node (an N-SET never
    overtakes its N-CREATE). `payload` is the attribute list exactly as the modality sent it."""

    __tablename__ = "mpps_queue"
    __table_args__ = (Index("ix_mpps_queue_claim", "node", "state", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    step_pk: Mapped[int] = mapped_column(ForeignKey("mpps_steps.id", ondelete="CASCADE"), index=True)
    node: Mapped[str] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(8))  # create | set
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    state: Mapped[ForwardState] = mapped_column(
        Enum(ForwardState, name="mpps_state", native_enum=False, length=16), default=ForwardState.pending
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]


class CommitmentRequest(Base):
    """A storage commitment transaction (jobs/commitment.py has the states).

    direction "in" (a modality asked qrproxy): pending -> ready (every item decided, the report is
    owed) -> reporting (claimed by one sender, `lease_*`) -> reported | expired. The report is owed
    until `reported_at` is set.
    direction "out" (qrproxy asked node `node`): new (committed, N-ACTION not yet answered) ->
    requested -> done (the node's report recorded, `reported_at`) | expired (no report in time)."""

    __tablename__ = "commitment_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID, unique=True)
    # "in": a modality asked qrproxy; "out": qrproxy asked an upstream node.
    direction: Mapped[str] = mapped_column(String(3), default="in")
    node: Mapped[str | None] = mapped_column(String(64))
    requester_ae: Mapped[str] = mapped_column(AE)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    # "local" | "upstream" for direction "in": what committed means for this transaction.
    policy: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    deadline_at: Mapped[dt.datetime | None]
    report_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None]
    reported_at: Mapped[dt.datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)

    items: Mapped[list[CommitmentItem]] = relationship(back_populates="request", cascade="all, delete-orphan")


class CommitmentItem(Base):
    __tablename__ = "commitment_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_pk: Mapped[int] = mapped_column(ForeignKey("commitment_requests.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    # pending | committed | failed (failure_reason: PS3.4 J.3.2.1.2 code) | expired (out: no report)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    failure_reason: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)

    request: Mapped[CommitmentRequest] = relationship(back_populates="items")


class RefreshRun(Base):
    __tablename__ = "refresh_runs"
    __table_args__ = (Index("ix_refresh_runs_job_started", "job_name", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_name: Mapped[str] = mapped_column(String(100))
    node: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    status: Mapped[str] = mapped_column(String(16), default="running")
    rows: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class UidMap(Base):
    """Pseudonyms handed out by `anonymize` mutations: one replacement per original value and kind.

    Stored (not derived from a secret) so that a study sent again, after a restart or from another
    worker or proxy sharing the database, gets the same UIDs at the destination; rows are written with
    INSERT ... ON CONFLICT DO NOTHING and read back, so concurrent senders agree on the first one.
    `kind` is `uid` for UIDs and `patient_id` for patient ID pseudonyms. The table links pseudonyms to
    real identities: it is as sensitive as the index itself.
    """

    __tablename__ = "uid_map"
    __table_args__ = (UniqueConstraint("kind", "original", name="uq_uid_map_kind_original"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    original: Mapped[str] = mapped_column(String(255))
    replacement: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PrefetchItem(Base):
    """One prior study a prefetch rule decided to fetch for a patient on the worklist, and how that
    went: pending (to fetch, at next_attempt_at), done (local, pinned), failed (retried with
    backoff), held (gave up after max_attempts, or filtered out: `last_error` says why)."""

    __tablename__ = "prefetch_items"
    __table_args__ = (
        UniqueConstraint("rule", "study_instance_uid", name="uq_prefetch_items_rule_study"),
        Index("ix_prefetch_items_claim", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    rule: Mapped[str] = mapped_column(String(100))
    node: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(UID)
    study_date: Mapped[str | None] = mapped_column(String(8))
    # The worklist day the prior is wanted for: the study is pinned until this day + the rule's pin.
    needed_on: Mapped[str | None] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

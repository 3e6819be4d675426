"""Metadata database (SQLAlchemy 2; SQLite in the data dir by default).

Holds what must outlive a request: sessions, training runs, sampling sessions, checkpoints
and futures. Tensors never go here; checkpoint folders are referenced by path.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from lathe.protocol.messages import LoraConfig
from lathe.store import migrate, tinker_paths


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(t: dt.datetime) -> dt.datetime:
    """An aware UTC datetime: SQLite hands back naive ones (they are stored in UTC)."""
    return t.astimezone(dt.UTC) if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class UserRow(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    key_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC-SHA256, never the key
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class SessionRow(Base):
    __tablename__ = "sessions"
    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))  # who created it
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    sdk_version: Mapped[str | None] = mapped_column(String(32))
    tags: Mapped[list[str]] = mapped_column(default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    project_id: Mapped[str | None] = mapped_column(String(256))
    display_name: Mapped[str | None] = mapped_column(String(256))
    # how it ended: success | errored | interrupted (the client said) | expired (no heartbeat)
    end_reason: Mapped[str | None] = mapped_column(String(32))
    end_detail: Mapped[str | None] = mapped_column(Text)


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    model_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))  # who created it
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.session_id"))
    base_model: Mapped[str] = mapped_column(String(256))
    lora_rank: Mapped[int] = mapped_column(Integer)
    train_attn: Mapped[bool] = mapped_column(Boolean)
    train_mlp: Mapped[bool] = mapped_column(Boolean)
    train_unembed: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_request_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)

    @classmethod
    def of_adapter(
        cls,
        model_id: str,
        owner_id: int,
        session_id: str,
        base_model: str,
        lora: LoraConfig,
        user_metadata: dict | None = None,
    ) -> TrainingRunRow:
        """The row of a training run holding a LoRA adapter of this configuration."""
        return cls(
            model_id=model_id,
            owner_id=owner_id,
            session_id=session_id,
            base_model=base_model,
            lora_rank=lora.rank,
            train_attn=lora.train_attn,
            train_mlp=lora.train_mlp,
            train_unembed=lora.train_unembed,
            user_metadata=user_metadata or {},
        )


class SamplingSessionRow(Base):
    __tablename__ = "sampling_sessions"
    sampler_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))  # who created it
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.session_id"))
    base_model: Mapped[str] = mapped_column(String(256))
    model_path: Mapped[str | None] = mapped_column(Text)  # tinker:// path, if from a checkpoint
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    clones: Mapped[int] = mapped_column(Integer, default=0)  # SamplingClient copies that joined


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("model_id", "kind", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("training_runs.model_id"))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))  # the run's owner
    public: Mapped[bool] = mapped_column(Boolean, default=False)  # readable by every user
    kind: Mapped[str] = mapped_column(String(32))  # weights | sampler_weights
    name: Mapped[str] = mapped_column(String(256))
    directory: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # merged exports pass 2 GiB
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))  # TTL
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)

    @property
    def directory_path(self) -> Path:
        return Path(self.directory)

    @property
    def tinker_path(self) -> str:
        return tinker_paths.format_path(self.model_id, self.kind, self.name)


class CustomLossRow(Base):
    __tablename__ = "custom_losses"
    loss_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))  # who created it
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.session_id"))
    name: Mapped[str] = mapped_column(String(256))
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, rank}], logprobs first
    graph: Mapped[dict[str, Any]] = mapped_column(JSON)  # the traced graph as the SDK sent it
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FutureRow(Base):
    __tablename__ = "futures"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))  # who created it
    kind: Mapped[str] = mapped_column(String(64))  # request type, e.g. forward_backward
    natural_key: Mapped[str | None] = mapped_column(Text, unique=True)  # retries map to it
    fingerprint: Mapped[str] = mapped_column(String(64), default="")  # hash of the request
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|done|failed
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    media_type: Mapped[str | None] = mapped_column(String(64))  # of the stored payload
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(16))
    # the API replica that submitted its work and will write its result (None: before 0002)
    replica_id: Mapped[str | None] = mapped_column(String(32))


class SampleCompletionRow(Base):
    """A finished sample request, in the order its session's poller sees it."""

    __tablename__ = "sample_completions"
    __table_args__ = (
        Index("ix_sample_completions_target", "sampler_id", "clone", "seq"),
        {"sqlite_autoincrement": True},  # never reuse a deleted seq: cursors only go forward
    )
    # the poller's cursor: increasing in commit order within a (sampler, clone)
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    sampler_id: Mapped[str] = mapped_column(String(128))
    clone: Mapped[int] = mapped_column(BigInteger)  # the SamplingClient copy: seq_id // 1e9
    request_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # finished | failed
    payload_size: Mapped[int | None] = mapped_column(BigInteger)


class AuditEventRow(Base):
    """A change to a user's checkpoints or sessions' projects, for their audit log (/audit)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_owner_at", "owner_id", "at"),)
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))  # whose log it is in
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    event: Mapped[str] = mapped_column(String(64))  # <resource>_<action>: checkpoint_delete
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_id: Mapped[str | None] = mapped_column(String(128))  # checkpoint events
    tinker_path: Mapped[str | None] = mapped_column(Text)  # checkpoint events


def audit_checkpoint(s: Session, event: str, row: CheckpointRow, **details: Any) -> None:
    """Log a change to a checkpoint in its owner's audit log, in the change's transaction."""
    path = row.tinker_path
    details = {"tinker_path": path, "model_id": row.model_id, **details}
    s.add(
        AuditEventRow(
            owner_id=row.owner_id,
            event=event,
            details=details,
            model_id=row.model_id,
            tinker_path=path,
        )
    )


class UsageRow(Base):
    """What one successful request used (api/usage_accounting.py), added up per hour on read."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_owner_at", "owner_id", "at"),)
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    session_id: Mapped[str | None] = mapped_column(String(64))  # attributed to
    base_model: Mapped[str | None] = mapped_column(String(256))
    event: Mapped[str] = mapped_column(String(32))  # training | sampling_prefill | ...
    cached: Mapped[bool] = mapped_column(Boolean, default=False)  # prefill from the cache
    count: Mapped[int] = mapped_column(BigInteger)  # tokens


class StepMetricsRow(Base):
    """The metrics one forward_backward or optim_step of a training run reported: the
    run's curves (GET /training_runs/{id}/metrics, the console), written with its result."""

    __tablename__ = "step_metrics"
    __table_args__ = (Index("ix_step_metrics_run", "model_id", "seq_id"),)
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    model_id: Mapped[str] = mapped_column(String(128))
    seq_id: Mapped[int] = mapped_column(BigInteger)  # the request's place in the run
    kind: Mapped[str] = mapped_column(String(32))  # forward_backward | forward | optim_step
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)


class ReplicaRow(Base):
    """An API process sharing this database; `seen_at` is its last heartbeat."""

    __tablename__ = "api_replicas"
    replica_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Store:
    """Opens the database and hands out short-lived ORM sessions."""

    def __init__(self, url: str) -> None:
        """Open (and migrate, store/migrate.py) the database at `url`: `sqlite:///PATH` or
        `postgresql+psycopg://USER:PASSWORD@HOST/NAME`."""
        sqlite = url.startswith("sqlite")
        connect_args = {"check_same_thread": False} if sqlite else {}
        # pool_pre_ping: a PostgreSQL connection that was dropped is replaced, not used
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not sqlite)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate.upgrade(self.engine)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, db_path: Path, url: str | None = None) -> Store:
        """The database at `url`, or else the SQLite file `db_path`."""
        if url:
            return cls(url)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{db_path}")

    def get(self, row_type: type, key: Any) -> Any:
        with self.session() as s:
            return s.get(row_type, key)

    def add(self, row: Any) -> None:
        with self.session() as s, s.begin():
            s.add(row)

    def add_finished_run(
        self,
        owner_id: int,
        base_model: str,
        lora: LoraConfig,
        origin: dict[str, Any],
        project_id: str | None = None,
    ) -> str:
        """A training run made outside any client session (a copy, an import), in a session of
        its own that is already finished; `origin` says where it came from. Its model id."""
        session_id = tinker_paths.new_session_id()
        model_id = tinker_paths.model_id_for(session_id, 0)
        with self.session() as s, s.begin():
            s.add(
                SessionRow(
                    session_id=session_id,
                    owner_id=owner_id,
                    project_id=project_id,
                    finished_at=utcnow(),
                    user_metadata=origin,
                )
            )
            s.flush()  # the run's foreign key needs the session row first
            s.add(TrainingRunRow.of_adapter(model_id, owner_id, session_id, base_model, lora))
        return model_id

    def step_metrics(self, model_id: str, after_seq: int, limit: int) -> list[StepMetricsRow]:
        """A run's step metrics after seq id `after_seq`, in seq order, one page."""
        with self.session() as s:
            q = (
                select(StepMetricsRow)
                .where(StepMetricsRow.model_id == model_id, StepMetricsRow.seq_id > after_seq)
                .order_by(StepMetricsRow.seq_id)
                .limit(limit)
            )
            return list(s.scalars(q))

    def count_steps(self, model_id: str, kind: str) -> int:
        """How many requests of this kind of the run succeeded (their metrics were kept)."""
        with self.session() as s:
            q = select(func.count(StepMetricsRow.id)).where(
                StepMetricsRow.model_id == model_id, StepMetricsRow.kind == kind
            )
            return s.scalar(q) or 0

    def checkpoints_of(self, model_id: str) -> list[CheckpointRow]:
        """A run's checkpoints that have not expired, oldest first."""
        with self.session() as s:
            q = select(CheckpointRow).where(CheckpointRow.model_id == model_id, live())
            return list(s.scalars(q.order_by(CheckpointRow.created_at, CheckpointRow.id)))

    def find_checkpoint(self, model_id: str, kind: str, name: str) -> CheckpointRow | None:
        with self.session() as s:
            q = select(CheckpointRow).where(
                CheckpointRow.model_id == model_id,
                CheckpointRow.kind == kind,
                CheckpointRow.name == name,
                live(),
            )
            return s.scalars(q).first()

    def checkpoints_of_user(
        self, owner_id: int, limit: int, offset: int
    ) -> tuple[list[CheckpointRow], int]:
        """A user's live checkpoints, newest first, one page; and how many there are."""
        with self.session() as s:
            where = (CheckpointRow.owner_id == owner_id, live())
            total = s.scalar(select(func.count(CheckpointRow.id)).where(*where)) or 0
            q = (
                select(CheckpointRow)
                .where(*where)
                .order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc())
            )
            return list(s.scalars(q.limit(limit).offset(offset))), total

    def all_checkpoints(self) -> list[CheckpointRow]:
        with self.session() as s:
            q = select(CheckpointRow).where(live()).order_by(CheckpointRow.created_at.desc())
            return list(s.scalars(q))

    def expired_checkpoints(self) -> list[CheckpointRow]:
        with self.session() as s:
            q = select(CheckpointRow).where(
                CheckpointRow.expires_at.is_not(None), CheckpointRow.expires_at <= utcnow()
            )
            return list(s.scalars(q))

    def set_expiry(self, row_id: int, expires_at: dt.datetime | None) -> None:
        with self.session() as s, s.begin():
            row = s.get(CheckpointRow, row_id)
            if row is not None:
                row.expires_at = expires_at
                until = None if expires_at is None else expires_at.isoformat()
                audit_checkpoint(s, "checkpoint_ttl_set", row, expires_at=until)

    def training_runs_of(
        self, owner_id: int, limit: int, offset: int
    ) -> tuple[list[TrainingRunRow], int]:
        with self.session() as s:
            where = TrainingRunRow.owner_id == owner_id
            total = s.scalar(select(func.count(TrainingRunRow.model_id)).where(where)) or 0
            q = (
                select(TrainingRunRow)
                .where(where)
                .order_by(TrainingRunRow.created_at.desc(), TrainingRunRow.model_id)
            )
            return list(s.scalars(q.limit(limit).offset(offset))), total

    def sessions_of(self, owner_id: int, limit: int, offset: int) -> list[SessionRow]:
        with self.session() as s:
            q = (
                select(SessionRow)
                .where(SessionRow.owner_id == owner_id)
                .order_by(SessionRow.created_at.desc())
            )
            return list(s.scalars(q.limit(limit).offset(offset)))

    def rows_of_session(self, session_id: str) -> tuple[list[str], list[str]]:
        """(training run ids, sampler ids) of a session."""
        with self.session() as s:
            runs = s.scalars(
                select(TrainingRunRow.model_id).where(TrainingRunRow.session_id == session_id)
            )
            samplers = s.scalars(
                select(SamplingSessionRow.sampler_id).where(
                    SamplingSessionRow.session_id == session_id
                )
            )
            return list(runs), list(samplers)

    def touch_run(self, model_id: str) -> None:
        with self.session() as s, s.begin():
            row = s.get(TrainingRunRow, model_id)
            if row is not None:
                row.last_request_at = utcnow()

    def upsert_checkpoint(
        self,
        model_id: str,
        owner_id: int,
        kind: str,
        name: str,
        directory: str,
        size_bytes: int,
        expires_at: dt.datetime | None = None,
        user_metadata: dict[str, Any] | None = None,
    ) -> CheckpointRow:
        with self.session() as s, s.begin():
            q = select(CheckpointRow).where(
                CheckpointRow.model_id == model_id,
                CheckpointRow.kind == kind,
                CheckpointRow.name == name,
            )
            row = s.scalars(q).first()
            if row is None:
                row = CheckpointRow(model_id=model_id, owner_id=owner_id, kind=kind, name=name)
                s.add(row)
            row.directory, row.size_bytes, row.created_at = directory, size_bytes, utcnow()
            row.expires_at, row.user_metadata = expires_at, user_metadata or {}
            audit_checkpoint(s, "checkpoint_create", row, size_bytes=size_bytes)
            return row

    def checkpoint_bytes_of(self, owner_id: int) -> int:
        with self.session() as s:
            q = select(func.coalesce(func.sum(CheckpointRow.size_bytes), 0))
            return int(s.scalar(q.where(CheckpointRow.owner_id == owner_id)) or 0)

    def delete_checkpoint(self, row_id: int, why: str = "owner") -> None:
        """why: "owner" (the owner's request), "ttl" (expired) or "admin" (`lathe checkpoint
        delete`)."""
        with self.session() as s, s.begin():
            row = s.get(CheckpointRow, row_id)
            if row is not None:
                audit_checkpoint(s, "checkpoint_delete", row, reason=why)
                s.delete(row)

    def remove_checkpoint(self, row: CheckpointRow, why: str = "owner") -> None:
        """Unlist first, then delete the files: nobody finds a listed half-deleted checkpoint."""
        self.delete_checkpoint(row.id, why)
        shutil.rmtree(row.directory_path, ignore_errors=True)

    def set_public(self, row_id: int, public: bool) -> None:
        with self.session() as s, s.begin():
            row = s.get(CheckpointRow, row_id)
            if row is not None:
                row.public = public
                audit_checkpoint(s, "checkpoint_publish" if public else "checkpoint_unpublish", row)

    def beat(self, replica_id: str) -> None:
        """Record that this API replica is alive (it holds its pending futures)."""
        with self.session() as s, s.begin():
            row = s.get(ReplicaRow, replica_id)
            if row is None:
                s.add(ReplicaRow(replica_id=replica_id))
            else:
                row.seen_at = utcnow()

    def replica_alive(self, replica_id: str, within: dt.timedelta) -> bool:
        """Whether the replica beat within `within` (a stopped replica has no row)."""
        with self.session() as s:
            q = select(ReplicaRow.replica_id).where(
                ReplicaRow.replica_id == replica_id, ReplicaRow.seen_at > utcnow() - within
            )
            return s.scalars(q).first() is not None

    def forget_replica(self, replica_id: str) -> None:
        """A replica that stops says so: its pending futures are lost at once."""
        with self.session() as s, s.begin():
            row = s.get(ReplicaRow, replica_id)
            if row is not None:
                s.delete(row)

    def future_by_key(self, natural_key: str) -> FutureRow | None:
        with self.session() as s:
            return s.scalars(select(FutureRow).where(FutureRow.natural_key == natural_key)).first()

    def stale_sessions(self, cutoff: dt.datetime) -> list[str]:
        """Unfinished sessions whose last heartbeat is older than `cutoff`."""
        with self.session() as s:
            q = select(SessionRow.session_id).where(
                SessionRow.finished_at.is_(None), SessionRow.last_heartbeat_at < cutoff
            )
            return list(s.scalars(q))

    def finish_session(
        self, session_id: str, reason: str = "success", detail: str | None = None
    ) -> bool:
        """Mark it finished and why; False if it already was (the first finish wins)."""
        with self.session() as s, s.begin():
            row = s.get(SessionRow, session_id)
            if row is None or row.finished_at is not None:
                return False
            row.finished_at, row.end_reason, row.end_detail = utcnow(), reason, detail
            return True

    def touch_session(self, session_id: str) -> bool:
        with self.session() as s, s.begin():
            row = s.get(SessionRow, session_id)
            if row is None:
                return False
            row.last_heartbeat_at = utcnow()
            return True

    def finish_future(
        self,
        request_id: str,
        status: str,
        media_type: str | None,
        payload: bytes | None,
        error: str | None,
        category: str | None,
        records: Sequence[UsageRow | StepMetricsRow] = (),
    ) -> None:
        """Store a future's result, and what it used and reported (kept only with its
        result, in the same commit)."""
        with self.session() as s, s.begin():
            row = s.get(FutureRow, request_id)
            if row is None:
                return
            s.add_all(records)
            row.status, row.media_type, row.payload = status, media_type, payload
            row.error, row.category, row.completed_at = error, category, utcnow()
            if row.natural_key is not None and row.natural_key.startswith("sample:"):
                record_completion(s, row)  # for the session's poller, in the same commit


CLONE_SEQ_IDS = 1_000_000_000  # a SamplingClient copy numbers its requests from clone * this


def record_completion(s: Session, row: FutureRow) -> None:
    """A finished sample future, as its sampling session's poller (/retrieve_futures) sees it.

    On PostgreSQL a lock per sampler makes completions of one sampler commit in `seq` order
    (two replicas may finish two of its samples at once), so a poller that has seen seq n
    never misses a smaller one committed later. SQLite commits one writer at a time."""
    sampler_id, seq_id = (row.natural_key or "").removeprefix("sample:").rsplit(":", 1)
    if s.bind is not None and s.bind.dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": sampler_id})
    s.add(
        SampleCompletionRow(
            sampler_id=sampler_id,
            clone=int(seq_id) // CLONE_SEQ_IDS,
            request_id=row.request_id,
            state="finished" if row.status == "done" else "failed",
            payload_size=len(row.payload) if row.payload is not None else None,
        )
    )


def live():  # noqa: ANN201 - a SQL condition
    """Checkpoints that have not expired (the reaper deletes the others shortly after)."""
    return or_(CheckpointRow.expires_at.is_(None), CheckpointRow.expires_at > utcnow())


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()

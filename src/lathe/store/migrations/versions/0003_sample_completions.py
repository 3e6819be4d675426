"""Sample completions for SDK 0.38's session-wide poller (/retrieve_futures), the clone
counter of each sampling session (/join_sampling_session), how each session ended
(/sessions/search reports it), the audit log of checkpoint and project changes (/audit), and
what each request used (/billing/usage/events).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sample_completions",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sampler_id", sa.String(length=128), nullable=False),
        sa.Column("clone", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("payload_size", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sqlite_autoincrement=True,  # never reuse a deleted seq: cursors only go forward
    )
    op.create_index(
        "ix_sample_completions_target", "sample_completions", ["sampler_id", "clone", "seq"]
    )
    with op.batch_alter_table("sampling_sessions") as batch:
        batch.add_column(sa.Column("clones", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("end_reason", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("end_detail", sa.Text(), nullable=True))
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=True),
        sa.Column("tinker_path", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["owner_id"], ["users.user_id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_events_owner_at", "audit_events", ["owner_id", "at"])
    op.create_table(
        "usage",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=True),
        sa.Column("base_model", sa.String(length=256), nullable=True),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.user_id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_usage_owner_at", "usage", ["owner_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_usage_owner_at", table_name="usage")
    op.drop_table("usage")
    op.drop_index("ix_audit_events_owner_at", table_name="audit_events")
    op.drop_table("audit_events")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("end_detail")
        batch.drop_column("end_reason")
    with op.batch_alter_table("sampling_sessions") as batch:
        batch.drop_column("clones")
    op.drop_index("ix_sample_completions_target", table_name="sample_completions")
    op.drop_table("sample_completions")

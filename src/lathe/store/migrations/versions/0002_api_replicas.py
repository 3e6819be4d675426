"""API replicas: which replica holds each pending future, and when each replica was last alive.

Several `lathe serve` replicas may share one database and one engine service. A future is
finished by the replica that submitted its work; another replica asked for it while it is
pending waits for that replica to write the result, unless that replica stopped beating.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_replicas",
        sa.Column("replica_id", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("replica_id"),
    )
    with op.batch_alter_table("futures") as batch:  # batch: SQLite cannot ALTER much in place
        batch.add_column(sa.Column("replica_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("futures") as batch:
        batch.drop_column("replica_id")
    op.drop_table("api_replicas")

"""The metrics each forward_backward and optim_step of a training run reported, for the run's
curves (GET /training_runs/{id}/metrics and the console).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_metrics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("seq_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_step_metrics_run", "step_metrics", ["model_id", "seq_id"])


def downgrade() -> None:
    op.drop_index("ix_step_metrics_run", table_name="step_metrics")
    op.drop_table("step_metrics")

"""Admission refusals: one row per compute-session request that policy refused (HTTP 403),
with where it asked to run and why, and nothing about who asked (hub/metrics.py counts
them for Prometheus).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admission_refusals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("partition", sa.String(64), nullable=False),
        sa.Column("country", sa.String(2), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
    )
    op.create_index(
        "ix_admission_refusals_where", "admission_refusals", ["partition", "country", "reason"]
    )


def downgrade() -> None:
    op.drop_index("ix_admission_refusals_where", table_name="admission_refusals")
    op.drop_table("admission_refusals")

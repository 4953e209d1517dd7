"""Class starts: each class window a course pre-warms (its state, its Slurm reservation,
how many servers it asked for and got) and each pre-warmed server (whose, its state,
when it was asked for, became ready, was claimed or stopped, and its warm ledger record)
(hub/class_start.py describes the rules; hub/class_start_store.py keeps these tables).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "class_windows",
        sa.Column("course_id", sa.String(40), sa.ForeignKey("courses.id"), primary_key=True),
        sa.Column("start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reservation", sa.String(80), nullable=True),
        sa.Column("requested", sa.Integer, nullable=False),
        sa.Column("started_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_class_windows_state", "class_windows", ["state"])
    op.create_table(
        "class_warm",
        sa.Column("course_id", sa.String(40), primary_key=True),
        sa.Column("start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("user", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("record_id", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(255), nullable=True),
        sa.ForeignKeyConstraint(
            ["course_id", "start"], ["class_windows.course_id", "class_windows.start"]
        ),
    )
    op.create_index("ix_class_warm_user_state", "class_warm", ["user", "state"])


def downgrade() -> None:
    op.drop_index("ix_class_warm_user_state", table_name="class_warm")
    op.drop_table("class_warm")
    op.drop_index("ix_class_windows_state", table_name="class_windows")
    op.drop_table("class_windows")

"""Courses: the course record (its spec as JSON), its staff (instructors and teaching
assistants) and the roster additions and removals an instructor makes
(hub/courses.py describes the model; budgets stay in the budget tables of 0003).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "courses",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_courses_created_by", "courses", ["created_by"])
    op.create_table(
        "course_staff",
        sa.Column("course_id", sa.String(40), sa.ForeignKey("courses.id"), primary_key=True),
        sa.Column("user", sa.String(255), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    op.create_index("ix_course_staff_user", "course_staff", ["user"])
    op.create_table(
        "course_roster",
        sa.Column("course_id", sa.String(40), sa.ForeignKey("courses.id"), primary_key=True),
        sa.Column("user", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_course_roster_user", "course_roster", ["user"])


def downgrade() -> None:
    op.drop_index("ix_course_roster_user", table_name="course_roster")
    op.drop_table("course_roster")
    op.drop_index("ix_course_staff_user", table_name="course_staff")
    op.drop_table("course_staff")
    op.drop_index("ix_courses_created_by", table_name="courses")
    op.drop_table("courses")

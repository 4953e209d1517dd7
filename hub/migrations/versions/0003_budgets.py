"""Budgets: periods, budgets (user, course or project), per-student allowances, and the
holds and settled charges of admission (hub/budgets.py describes the model).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_periods",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "budgets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner_kind", sa.String(16), nullable=False),
        sa.Column("owner_id", sa.String(255), nullable=False),
        sa.Column("period", sa.String(32), sa.ForeignKey("budget_periods.name"), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("amount", sa.Float, nullable=False),
        sa.Column("per_student", sa.Float, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
        sa.UniqueConstraint("owner_kind", "owner_id", "period", name="uq_budgets_owner_period"),
    )
    op.create_table(
        "budget_allowances",
        sa.Column("budget_id", sa.Integer, sa.ForeignKey("budgets.id"), primary_key=True),
        sa.Column("user", sa.String(255), primary_key=True),
        sa.Column("amount", sa.Float, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
    )
    op.create_table(
        "budget_charges",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("budget_id", sa.Integer, sa.ForeignKey("budgets.id"), nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("ref", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("held", sa.Float, nullable=False),
        sa.Column("settled", sa.Float, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_budget_charges_budget_state", "budget_charges", ["budget_id", "state"])
    op.create_index("ix_budget_charges_ref", "budget_charges", ["ref"])


def downgrade() -> None:
    op.drop_index("ix_budget_charges_ref", table_name="budget_charges")
    op.drop_index("ix_budget_charges_budget_state", table_name="budget_charges")
    op.drop_table("budget_charges")
    op.drop_table("budget_allowances")
    op.drop_table("budgets")
    op.drop_table("budget_periods")

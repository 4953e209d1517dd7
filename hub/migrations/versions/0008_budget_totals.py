"""Running totals of settled budget charges: admission reads O(1) rows.

``budget_totals`` holds, per budget, what its settled charges add up to (``user`` = '')
and, per (budget, user), what that user's settled charges add up to (a course
allowance), with how many charges each figure sums. It is a cache of
``budget_charges``: every settle writes it in the same transaction as the charge
(hub/budget_store.py), and ``sovereign-portal ledger verify`` checks it against the sums.
Open holds are few (one per running job) and are still read from ``budget_charges``.

The upgrade backfills the totals from the charges already settled.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_totals",
        sa.Column("budget_id", sa.Integer, sa.ForeignKey("budgets.id"), primary_key=True),
        sa.Column("user", sa.String(255), primary_key=True),
        sa.Column("settled", sa.Float, nullable=False),
        sa.Column("charges", sa.Integer, nullable=False),
    )
    # backfill: one row per budget ('' user) and one per (budget, user) with settled charges
    op.execute(
        'INSERT INTO budget_totals (budget_id, "user", settled, charges) '
        "SELECT budget_id, '', SUM(COALESCE(settled, 0.0)), COUNT(*) FROM budget_charges "
        "WHERE state = 'settled' GROUP BY budget_id"
    )
    op.execute(
        'INSERT INTO budget_totals (budget_id, "user", settled, charges) '
        'SELECT budget_id, "user", SUM(COALESCE(settled, 0.0)), COUNT(*) FROM budget_charges '
        "WHERE state = 'settled' AND \"user\" != '' GROUP BY budget_id, \"user\""
    )


def downgrade() -> None:
    op.drop_table("budget_totals")

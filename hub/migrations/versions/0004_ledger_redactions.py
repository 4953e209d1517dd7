"""The ledger's redaction log: which chained rows were pseudonymised (GDPR erase,
retention), with their original and redacted hashes (hub/ledger_redactions.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_redactions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("record_id", sa.String(32), nullable=False),
        sa.Column("record_seq", sa.Integer, nullable=True),
        sa.Column("original_hash", sa.String(64), nullable=True),
        sa.Column("redacted_hash", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_ledger_redactions_record_id", "ledger_redactions", ["record_id"])


def downgrade() -> None:
    op.drop_index("ix_ledger_redactions_record_id", table_name="ledger_redactions")
    op.drop_table("ledger_redactions")

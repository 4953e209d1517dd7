"""The ledger: one row per notebook server or compute session, plus adjustments, and the
head of the hash chain (hub/ledger.py describes the model).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    op.create_table(
        "ledger_records",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=True, unique=True),
        sa.Column("row_type", sa.String(16), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("owner_type", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size", sa.String(64), nullable=False),
        sa.Column("accelerator", sa.String(16), nullable=False),
        sa.Column("slice", sa.String(32), nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("image", sa.String(128), nullable=False),
        sa.Column("walltime_minutes", sa.Integer, nullable=False),
        sa.Column("partition", sa.String(64), nullable=False),
        sa.Column("site", sa.String(128), nullable=False),
        sa.Column("nodes", sa.Text, nullable=False),
        sa.Column("country", sa.String(2), nullable=False),
        sa.Column("operator", sa.String(128), nullable=False),
        sa.Column("job_ids", sa.Text, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("opened_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double, nullable=True),
        sa.Column("ended_at", sa.Double, nullable=True),
        sa.Column("end_reason", sa.String(16), nullable=True),
        sa.Column("rate_gpu_equivalents", sa.Double, nullable=False),
        sa.Column("rate_eur_per_hour", sa.Double, nullable=False),
        sa.Column("rate_power_w", sa.Double, nullable=False),
        sa.Column("rate_carbon_g_per_kwh", sa.Double, nullable=False),
        sa.Column("gpu_seconds", sa.Double, nullable=True),
        sa.Column("eur", sa.Double, nullable=True),
        sa.Column("energy_wh", sa.Double, nullable=True),
        sa.Column("co2_g", sa.Double, nullable=True),
        sa.Column("gpu_seconds_basis", sa.String(16), nullable=True),
        sa.Column("eur_basis", sa.String(16), nullable=True),
        sa.Column("energy_basis", sa.String(16), nullable=True),
        sa.Column("co2_basis", sa.String(16), nullable=True),
        sa.Column("corrects", sa.String(32), nullable=False, server_default=""),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("prev_hash", sa.String(64), nullable=True),
        sa.Column("hash", sa.String(64), nullable=True),
    )
    op.create_index("ix_ledger_user_ended", "ledger_records", ["username", "ended_at"])
    op.create_index("ix_ledger_owner_ended", "ledger_records", ["owner_type", "owner", "ended_at"])
    op.create_index("ix_ledger_ended", "ledger_records", ["ended_at"])
    op.create_index("ix_ledger_source", "ledger_records", ["source"])
    chain = op.create_table(
        "ledger_chain",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(chain, [{"id": 1, "seq": 0, "hash": GENESIS}])


def downgrade() -> None:
    op.drop_table("ledger_chain")
    for name in (
        "ix_ledger_source",
        "ix_ledger_ended",
        "ix_ledger_owner_ended",
        "ix_ledger_user_ended",
    ):
        op.drop_index(name, table_name="ledger_records")
    op.drop_table("ledger_records")

"""Indexes for admission with a large ledger: each query of the admission path is one
index range, and the sums are index-only.

- ``ix_budget_charges_balance`` (budget_id, state, user, expires_at, held, settled)
  replaces ``ix_budget_charges_budget_state``: a budget's balance is one aggregate read
  from the index alone, however many charges the period has made (hub/budget_store.py,
  ``BudgetStore._fold``).
- ``ix_ledger_source_opened`` (source, opened_at) replaces ``ix_ledger_source``: the
  record that settles a hold (its source, opened after the hold) is one seek, not a scan
  of every record the same server name ever had.
- ``ix_ledger_owner_amounts`` replaces ``ix_ledger_owner_ended``: (owner_type, owner,
  ended_at) with the amounts, so an owner's totals (``LedgerStore.balance``) are
  index-only (PostgreSQL: ``INCLUDE``; SQLite: trailing key columns).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

AMOUNTS = ["gpu_seconds", "eur", "energy_wh", "co2_g"]


def _owner_index() -> None:
    key = ["owner_type", "owner", "ended_at"]
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_ledger_owner_amounts", "ledger_records", key, postgresql_include=AMOUNTS
        )
    else:
        op.create_index("ix_ledger_owner_amounts", "ledger_records", key + AMOUNTS)


def upgrade() -> None:
    op.create_index(
        "ix_budget_charges_balance",
        "budget_charges",
        ["budget_id", "state", "user", "expires_at", "held", "settled"],
    )
    op.drop_index("ix_budget_charges_budget_state", table_name="budget_charges")
    op.create_index("ix_ledger_source_opened", "ledger_records", ["source", "opened_at"])
    op.drop_index("ix_ledger_source", table_name="ledger_records")
    _owner_index()
    op.drop_index("ix_ledger_owner_ended", table_name="ledger_records")


def downgrade() -> None:
    op.create_index("ix_ledger_owner_ended", "ledger_records", ["owner_type", "owner", "ended_at"])
    op.drop_index("ix_ledger_owner_amounts", table_name="ledger_records")
    op.create_index("ix_ledger_source", "ledger_records", ["source"])
    op.drop_index("ix_ledger_source_opened", table_name="ledger_records")
    op.create_index("ix_budget_charges_budget_state", "budget_charges", ["budget_id", "state"])
    op.drop_index("ix_budget_charges_balance", table_name="budget_charges")

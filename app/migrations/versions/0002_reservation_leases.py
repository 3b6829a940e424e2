"""Reservations held per lease (one per server process), so a crashed process's are freed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.auth.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False, index=True),
    )
    op.create_table(
        "reservations",
        sa.Column("lease_id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.BigInteger(), primary_key=True),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
    )
    # Reservations made before this revision belong to no lease, so nothing could ever
    # give them back: a process that died mid-request held them for good. Start from zero
    # (a request still running on an older replica then settles to 0, not below).
    op.execute("UPDATE api_keys SET reserved_tokens = 0")


def downgrade() -> None:
    op.drop_table("reservations")
    op.drop_table("leases")

"""API keys and usage records.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.auth.models import BigId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("email", sa.String(320)),
        sa.Column("organisation", sa.String(200)),
        sa.Column("role", sa.String(10), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(20), nullable=False),
        sa.Column("valid_from", UTCDateTime()),
        sa.Column("expires_at", UTCDateTime()),
        sa.Column("max_requests", sa.BigInteger()),
        sa.Column("max_tokens", sa.BigInteger()),
        sa.Column("rpm", sa.BigInteger()),
        sa.Column("tpm", sa.BigInteger()),
        sa.Column("max_parallel", sa.Integer()),
        sa.Column("allowed_models", sa.JSON(), nullable=False),
        sa.Column("revoked_at", UTCDateTime()),
        sa.Column("revoked_reason", sa.String(500)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime()),
        sa.Column("used_requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("used_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "usage",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.BigInteger(), index=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(200), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("prompt_words", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("usage")
    op.drop_table("api_keys")

"""per-key limits: caps, rate limits, expiry, scopes, rotation; tier defaults; key counters

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_counters",
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("window_start", sa.DateTime(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_key_counters_key_id_api_keys"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("key_id", "kind", name=op.f("pk_key_counters")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        for name in ("daily_cap", "monthly_cap", "rpm", "tpm"):
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("models", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("ips", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("previous_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("previous_valid_until", sa.DateTime(), nullable=True))
        batch_op.create_index(batch_op.f("ix_api_keys_previous_hash"), ["previous_hash"], unique=False)
    with op.batch_alter_table("tiers", schema=None) as batch_op:
        for name in ("rpm", "tpm", "max_keys"):
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))
    with op.batch_alter_table("usage_ledger", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tokens_reserved", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_ledger", schema=None) as batch_op:
        batch_op.drop_column("tokens_reserved")
    with op.batch_alter_table("tiers", schema=None) as batch_op:
        for name in ("max_keys", "tpm", "rpm"):
            batch_op.drop_column(name)
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_previous_hash"))
        for name in ("previous_valid_until", "previous_hash", "ips", "models", "expires_at"):
            batch_op.drop_column(name)
        for name in ("tpm", "rpm", "monthly_cap", "daily_cap"):
            batch_op.drop_column(name)
    op.drop_table("key_counters")

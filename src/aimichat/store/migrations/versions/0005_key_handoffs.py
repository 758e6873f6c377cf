"""key hand-offs: a new key's secret between the POST that made it and the page that shows it once

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_handoffs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sealed", sa.String(length=256), nullable=False),
        sa.Column("old_prefix", sa.String(length=32), nullable=True),
        sa.Column("old_valid_until", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_key_handoffs_key_id_api_keys"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["web_sessions.id"],
            name=op.f("fk_key_handoffs_session_id_web_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_handoffs")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_key_handoffs_token_hash")),
    )
    with op.batch_alter_table("key_handoffs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_key_handoffs_session_id"), ["session_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("key_handoffs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_key_handoffs_session_id"))
    op.drop_table("key_handoffs")

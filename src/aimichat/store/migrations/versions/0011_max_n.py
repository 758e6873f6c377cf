"""tiers: the most choices (n) one request may ask for (issue 13)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tiers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_n", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tiers", schema=None) as batch_op:
        batch_op.drop_column("max_n")

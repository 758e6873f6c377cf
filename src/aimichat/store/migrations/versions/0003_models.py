"""many models: the registry (models, aliases, sources, prices), tier access and the ledger's model

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("engine", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_table(
        "model_aliases",
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("alias", name=op.f("pk_model_aliases")),
    )
    op.create_table(
        "model_sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("urls", sa.JSON(), nullable=False),
        sa.Column("prefix", sa.String(length=64), nullable=False),
        sa.Column("api_key_env", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_sources")),
        sa.UniqueConstraint("prefix", name=op.f("uq_model_sources_prefix")),
    )
    op.create_table(
        "model_prices",
        sa.Column("tier_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("per_request", sa.Integer(), nullable=True),
        sa.Column("prompt_per_1m", sa.Float(), nullable=True),
        sa.Column("completion_per_1m", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tier_id"], ["tiers.id"], name=op.f("fk_model_prices_tier_id_tiers"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tier_id", "model", name=op.f("pk_model_prices")),
    )
    op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_version")),
    )
    with op.batch_alter_table("tiers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("models", sa.JSON(), nullable=True))
    with op.batch_alter_table("usage_ledger", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_ledger", schema=None) as batch_op:
        batch_op.drop_column("model")
    with op.batch_alter_table("tiers", schema=None) as batch_op:
        batch_op.drop_column("models")
    op.drop_table("registry_version")
    op.drop_table("model_prices")
    op.drop_table("model_sources")
    op.drop_table("model_aliases")
    op.drop_table("models")

"""prefetch: prior studies fetched ahead of time for patients on the worklist

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'prefetch_items',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('rule', sa.String(length=100), nullable=False),
        sa.Column('node', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('study_date', sa.String(length=8), nullable=True),
        sa.Column('needed_on', sa.String(length=8), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('instances', sa.Integer(), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_prefetch_items')),
        sa.UniqueConstraint('rule', 'study_instance_uid', name='uq_prefetch_items_rule_study'),
    )
    with op.batch_alter_table('prefetch_items', schema=None) as batch_op:
        batch_op.create_index('ix_prefetch_items_claim', ['state', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('prefetch_items', schema=None) as batch_op:
        batch_op.drop_index('ix_prefetch_items_claim')
    op.drop_table('prefetch_items')

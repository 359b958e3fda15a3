"""uid_map: pseudonyms of anonymize mutations

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'uid_map',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('original', sa.String(length=255), nullable=False),
        sa.Column('replacement', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_uid_map')),
        sa.UniqueConstraint('kind', 'original', name='uq_uid_map_kind_original'),
    )


def downgrade() -> None:
    op.drop_table('uid_map')

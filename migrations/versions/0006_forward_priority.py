"""forward queue priority: routes may send a study ahead of the backlog (issue 18)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('forward_queue') as batch:
        batch.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='0'))
        batch.create_index('ix_forward_queue_node_study', ['node', 'study_instance_uid'])


def downgrade() -> None:
    with op.batch_alter_table('forward_queue') as batch:
        batch.drop_index('ix_forward_queue_node_study')
        batch.drop_column('priority')

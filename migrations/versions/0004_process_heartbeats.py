"""process heartbeats and key-use registry; keyed photo digests replace the clear SHA-256

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

The clear ``sha256`` of stored photos and explanation pictures is dropped, not converted: the key
for the keyed digest is not available to migrations, and nothing read the old hashes. Rows stored
before this revision have ``content_mac`` NULL; new rows get HMAC-SHA256 under a key derived from
the blind-index key (clinic_db.keys.KeyRing.content_mac).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('process_heartbeats',
    sa.Column('process_id', sa.String(length=200), nullable=False),
    sa.Column('component', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=128), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('ppid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('master_kid', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('process_id', name=op.f('pk_process_heartbeats'))
    )
    with op.batch_alter_table('process_heartbeats', schema=None) as batch_op:
        batch_op.create_index('ix_process_heartbeats_component_seen', ['component', 'last_seen'], unique=False)

    for table in ('images', 'explanation_images'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('content_mac', sa.String(length=64), nullable=True))
            batch_op.drop_column('sha256')


def downgrade() -> None:
    for table in ('images', 'explanation_images'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            # the clear hashes are gone for good; an empty string keeps the old NOT NULL column valid
            batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=False, server_default=''))
            batch_op.drop_column('content_mac')

    with op.batch_alter_table('process_heartbeats', schema=None) as batch_op:
        batch_op.drop_index('ix_process_heartbeats_component_seen')

    op.drop_table('process_heartbeats')
